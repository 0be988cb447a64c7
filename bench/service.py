"""Start and stop the processes the benchmark measures: ots, the MongoDB test server, the bare app.

Each runs as a subprocess in a process group of its own, listening on a free port of
127.0.0.1, with its output in a log file. Stopping sends SIGTERM to the group, waits,
then sends SIGKILL. Readiness is polled a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final

from bench.client import HOST, HttpClient, Request

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 15.0
POLL_INTERVAL_SECONDS: Final = 0.1
LOG_TAIL_CHARS: Final = 2000
# Variables passed through to the children; everything else, including any ots
# setting in the caller's environment, is left out so that runs are repeatable.
PASSED_VARIABLES: Final = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


class StartError(RuntimeError):
    """A child process exited or did not become ready in time."""


class ChildProcess:
    """A subprocess in its own process group, with stdout and stderr in `log_path`."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path):
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self._popen = subprocess.Popen(  # noqa: S603 - argv is built here, not from input
                argv,
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._popen.pid

    def exit_code(self) -> int | None:
        """Return the exit status, or None while the process runs."""
        return self._popen.poll()

    def log_tail(self) -> str:
        """Return the end of the process's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """Send SIGTERM to the process group; SIGKILL it if it has not exited in time.

        Signals go to the group only while its leader is running or not yet reaped, so
        the group id cannot have passed to an unrelated process.
        """
        if self._popen.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._popen.wait(STOP_TIMEOUT_SECONDS)

    def _signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)


@dataclasses.dataclass(frozen=True)
class OtsConfig:
    """How to start one ots instance; the fields become its environment variables."""

    mongo_uri: str
    database: str
    scrypt_n: int
    log_dir: Path
    max_secret_bytes: int = 32 * 1024 * 1024

    def environment(self, port: int) -> dict[str, str]:
        """Build the service's environment; KDF_WORKERS and KDF_QUEUE_SIZE keep their defaults."""
        env = base_environment()
        env.update(
            HOST=HOST,
            PORT=str(port),
            MONGO_URI=self.mongo_uri,
            MONGO_DATABASE=self.database,
            RATE_LIMIT_PER_MINUTE="0",
            SCRYPT_N=str(self.scrypt_n),
            MAX_SECRET_BYTES=str(self.max_secret_bytes),
            LOG_LEVEL="WARNING",
        )
        return env


@dataclasses.dataclass(frozen=True)
class RunningServer:
    """A started server: its process and the port it listens on."""

    process: ChildProcess
    port: int


def base_environment() -> dict[str, str]:
    """Return the variables every child inherits from the benchmark's environment."""
    return {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    NOTE: another process may take the port before the child binds it; the child then
    exits and `wait_until_healthy` reports its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def running_ots(config: OtsConfig, name: str = "ots") -> AsyncIterator[RunningServer]:
    """Run `python -m ots` until the block ends; enter once `/healthz` returns 200."""
    port = free_port()
    argv = [sys.executable, "-m", "ots"]
    process = ChildProcess(name, argv, config.environment(port), config.log_dir / f"{name}.log")
    try:
        await wait_until_healthy(process, port)
        yield RunningServer(process, port)
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def running_bare(log_dir: Path) -> AsyncIterator[RunningServer]:
    """Run the bare Tornado app (`python -m bench.bare`) until the block ends."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare", "--port", str(port)]
    process = ChildProcess("bare", argv, base_environment(), log_dir / "bare.log")
    try:
        await wait_until_healthy(process, port)
        yield RunningServer(process, port)
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def running_mongo_test_server(log_dir: Path) -> AsyncIterator[str]:
    """Run `python -m tests.mongo_server` until the block ends; yield its URI."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.mongo_server", "--port", str(port)]
    argv += ["--log-level", "WARNING"]
    process = ChildProcess("mongo-test-server", argv, base_environment(), log_dir / "mongo.log")
    try:
        await wait_until_listening(process, port)
        yield f"mongodb://{HOST}:{port}"
    finally:
        process.stop()


async def wait_until_listening(process: ChildProcess, port: int) -> None:
    """Poll until `port` accepts a TCP connection.

    Raises:
        StartError: the process exited, or did not listen within `START_TIMEOUT_SECONDS`.

    """
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        _check_alive(process)
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
            continue
        writer.close()
        return
    raise StartError(_failure(process, f"did not listen in {START_TIMEOUT_SECONDS}s"))


async def wait_until_healthy(process: ChildProcess, port: int) -> None:
    """Poll `GET /healthz` until it returns 200.

    Raises:
        StartError: the process exited, or `/healthz` did not return 200 within
            `START_TIMEOUT_SECONDS`.

    """
    client = HttpClient(port, timeout=1.0, max_connections=1)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            _check_alive(process)
            outcome = await client.send(Request("GET", "/healthz"))
            if outcome.status == 200:
                return
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
    finally:
        client.close()
    raise StartError(
        _failure(process, f"/healthz did not return 200 within {START_TIMEOUT_SECONDS}s")
    )


def _check_alive(process: ChildProcess) -> None:
    code = process.exit_code()
    if code is not None:
        raise StartError(_failure(process, f"exited with status {code}"))


def _failure(process: ChildProcess, problem: str) -> str:
    return f"{process.name} {problem}; end of {process.log_path}:\n{process.log_tail()}"
