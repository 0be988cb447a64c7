"""Thread pools that keep CPU work off the event loop.

`KdfPool` runs scrypt. Its admission is bounded: `workers` derivations run
and at most `queue_size` wait; a request beyond that is rejected at once with
503, so an overload costs the rejected client one round trip instead of a
queue that grows without limit. cryptography >= 50 releases the GIL inside
scrypt, so the event loop keeps running while every worker derives.

`run_cpu` runs shorter CPU work (AES over large payloads, parsing large JSON
bodies) in the loop's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, ParamSpec, TypeVar

from ots.errors import ServiceUnavailable

P = ParamSpec("P")
R = TypeVar("R")

BUSY_RETRY_AFTER_SECONDS: Final = 1

log = logging.getLogger("ots.app")


class KdfPool:
    """A bounded pool for key derivations with non-blocking admission."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self.admitted = 0
        self.rejected = 0
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="ots-kdf", initializer=_lower_priority
        )

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Hold one place in the pool for the duration of the block.

        Take it before any state changes that a rejection should not leave
        behind (such as reserving a passphrase attempt).

        Raises:
            ServiceUnavailable: every worker is busy and the queue is full.

        """
        if self.admitted >= self.capacity:
            self.rejected += 1
            raise ServiceUnavailable(
                BUSY_RETRY_AFTER_SECONDS, log_message="key derivation queue is full"
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `function` on a KDF worker; call inside `admission()`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs)
        )

    def shutdown(self) -> None:
        """Stop the workers after the derivations already submitted."""
        self._executor.shutdown(wait=False, cancel_futures=True)


# Niceness of KDF threads: when every core is busy with scrypt, the scheduler
# still prefers the event loop thread, so cheap requests keep low latency.
KDF_THREAD_NICENESS: Final = 10


def _lower_priority() -> None:
    """Lower the scheduling priority of the calling KDF thread (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        # On Linux, PRIO_PROCESS with a thread id sets that thread alone.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), KDF_THREAD_NICENESS)
    except OSError as error:
        log.warning("could not lower the priority of a KDF thread: %s", error)


async def run_cpu(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run short CPU-bound work in the event loop's default executor."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(function, *args, **kwargs))
