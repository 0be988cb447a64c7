"""Resident set size (RSS) of the service process, sampled and peak.

`RssWatch` samples the process's RSS with psutil on a thread of its own, so the
samples keep coming while the benchmark's event loop is busy. Sampling misses peaks
shorter than its interval, so on Linux the watch also reads the kernel's record of the
peak (`VmHWM` in /proc/PID/status) after resetting it at the start (writing 5 to
/proc/PID/clear_refs, Linux 4.0 and later). The reported peak is the larger of the two.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from pathlib import Path
from types import TracebackType

import psutil

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RssStats:
    """RSS over one watched interval, in bytes."""

    first: int
    median: int
    peak: int
    samples: int
    kernel_peak: bool


class RssWatch:
    """Watch the RSS of process `pid` from `__enter__` to `__exit__`; then read `stats`."""

    def __init__(self, pid: int, interval: float) -> None:
        self._process = psutil.Process(pid)
        self._pid = pid
        self._interval = interval
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-watch", daemon=True)
        self._stats: RssStats | None = None

    def __enter__(self) -> RssWatch:
        self._kernel_peak = _reset_kernel_peak(self._pid)
        self._samples.append(self._process.memory_info().rss)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(self._samples)
        kernel_peak = _read_kernel_peak(self._pid) if self._kernel_peak else None
        if kernel_peak is not None:
            peak = max(peak, kernel_peak)
        self._stats = RssStats(
            first=self._samples[0],
            median=int(statistics.median(self._samples)),
            peak=peak,
            samples=len(self._samples),
            kernel_peak=kernel_peak is not None,
        )

    @property
    def stats(self) -> RssStats:
        """The figures of the finished interval.

        Raises:
            RuntimeError: the watch has not finished yet.

        """
        if self._stats is None:
            raise RuntimeError("RssWatch.stats is available after the with block")
        return self._stats

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._samples.append(self._process.memory_info().rss)
            except psutil.Error:
                return


def current_rss(pid: int) -> int:
    """Return the RSS of process `pid` in bytes."""
    return psutil.Process(pid).memory_info().rss


def _reset_kernel_peak(pid: int) -> bool:
    """Reset the kernel's peak RSS of `pid` to its current RSS; False where unsupported."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _read_kernel_peak(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None
