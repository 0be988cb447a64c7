"""A small HTTP/1.1 client on asyncio streams, load patterns and latency percentiles.

The client keeps connections to one port on 127.0.0.1 alive and opens more when every
open one is busy, up to a fixed number. It understands exactly what the service and the
bare server send: `Content-Length` and chunked bodies. A general-purpose client costs
more CPU per request, and on a 2-core machine that CPU comes out of the server's share.

Every load pattern stops by itself: after a fixed number of requests or at a deadline,
whichever comes first, and every request has a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

HOST: Final = "127.0.0.1"
MAX_HEADER_LINES: Final = 100


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP request; a non-empty body is sent as `application/json`."""

    method: str
    path: str
    body: bytes = b""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result of one request: its status, or 0 and `error` when no response came.

    `started` is when the request was due (open loop) or sent (closed loop), and
    `finished` when its response was complete, both on the `time.perf_counter` clock.
    """

    status: int
    started: float
    finished: float
    body: bytes = b""
    error: str = ""

    @property
    def latency(self) -> float:
        """Seconds from `started` to `finished`."""
        return self.finished - self.started


class ProtocolError(Exception):
    """The server sent something this client cannot parse."""


class _Connection:
    """One keep-alive connection; sends one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.reusable = True

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: Request, port: int) -> tuple[int, bytes]:
        head = f"{request.method} {request.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        if request.body or request.method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(request.body)}\r\n"
        self._writer.write(head.encode("ascii") + b"\r\n")
        if request.body:
            self._writer.write(request.body)
        await self._writer.drain()
        return await self._read_response(request.method)

    async def _read_response(self, method: str) -> tuple[int, bytes]:
        status_line = await self._reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError("invalid status line")
        status = int(parts[1])
        headers = await self._read_headers()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        if method == "HEAD" or status in (204, 304):
            return status, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, await self._read_chunked()
        length = headers.get("content-length")
        if length is None:
            self.reusable = False
            return status, await self._reader.read()
        return status, await self._reader.readexactly(int(length))

    async def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await self._reader.readuntil(b"\r\n")
            if line == b"\r\n":
                return headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise ProtocolError(f"more than {MAX_HEADER_LINES} header lines")

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self._read_headers()  # trailers, normally none
                return bytes(body)
            body += await self._reader.readexactly(size)
            if await self._reader.readexactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    def close(self) -> None:
        self._writer.close()


class HttpClient:
    """Keep-alive HTTP/1.1 connections to one port on 127.0.0.1.

    `send` reuses an idle connection or opens a new one; past `max_connections`
    requests wait for a free connection, and that wait counts in their latency.
    """

    def __init__(self, port: int, *, timeout: float, max_connections: int = 256) -> None:
        self.port = port
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def send(self, request: Request, *, started: float | None = None) -> Outcome:
        """Send `request` and wait for its response, at most `timeout` seconds.

        Failures (refused or reset connections, timeouts, unparsable responses) raise
        nothing. They come back as an outcome with status 0 and the error's class name.
        """
        begin = time.perf_counter() if started is None else started
        async with self._slots:
            connection = self._idle.pop() if self._idle else None
            try:
                async with asyncio.timeout(self.timeout):
                    if connection is None:
                        connection = await _Connection.open(self.port)
                    status, body = await connection.exchange(request, self.port)
            except (
                OSError,
                EOFError,
                TimeoutError,
                asyncio.LimitOverrunError,
                ProtocolError,
                ValueError,
            ) as error:
                if connection is not None:
                    connection.close()
                return Outcome(0, begin, time.perf_counter(), error=type(error).__name__)
            if connection.reusable:
                self._idle.append(connection)
            else:
                connection.close()
        return Outcome(status, begin, time.perf_counter(), body)

    def close(self) -> None:
        """Close every idle connection."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def closed_loop(
    client: HttpClient,
    make_request: Callable[[int], Request],
    *,
    count: int,
    concurrency: int,
    duration: float,
) -> list[Outcome]:
    """Send up to `count` requests, `concurrency` at a time, for at most `duration` seconds.

    Each of the `concurrency` senders sends its next request as soon as the previous
    one gets its response. Returns the outcomes in the order they finished.
    """
    deadline = time.perf_counter() + duration
    outcomes: list[Outcome] = []
    next_index = 0

    async def sender() -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            outcomes.append(await client.send(make_request(index)))

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return outcomes


async def open_loop(
    client: HttpClient,
    make_request: Callable[[int], Request],
    *,
    rate: float,
    duration: float,
) -> list[Outcome]:
    """Send requests at a fixed `rate` per second for `duration` seconds, whatever the responses.

    Request i is due at start + i / rate, and its latency counts from then, so a
    client that falls behind cannot hide a slow server (no coordinated omission).
    Returns the outcomes in the order they were due.
    """
    count = max(1, math.floor(rate * duration))
    start = time.perf_counter()

    async def send_when_due(index: int) -> Outcome:
        due = start + index / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        return await client.send(make_request(index), started=due)

    tasks = [asyncio.create_task(send_when_due(index)) for index in range(count)]
    return list(await asyncio.gather(*tasks))


async def probe(
    client: HttpClient,
    request: Request,
    *,
    interval: float,
    count: int,
    until: asyncio.Future[Any] | None = None,
) -> list[Outcome]:
    """Send `request` `count` times, one at a time and `interval` seconds apart.

    Stops early once `until` is done.
    """
    outcomes: list[Outcome] = []
    for _ in range(count):
        if until is not None and until.done():
            break
        outcomes.append(await client.send(request))
        await asyncio.sleep(interval)
    return outcomes


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (`fraction` 0.99 for p99); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rate_of(outcomes: Sequence[Outcome]) -> float:
    """Return requests per second over the span from the first start to the last finish."""
    if not outcomes:
        return 0.0
    span = max(o.finished for o in outcomes) - min(o.started for o in outcomes)
    return len(outcomes) / span if span > 0 else math.inf


def statuses(outcomes: Sequence[Outcome]) -> dict[int, int]:
    """Count outcomes by status (0 for requests that got no response)."""
    counts: dict[int, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts
