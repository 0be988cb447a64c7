"""Shared fixtures: a MongoDB to talk to, apps built with test settings, a JSON client.

When `MONGO_URI` is set, the suite runs against that server in a database of
its own (`ots_test_<random>`), dropped at the end. Otherwise it starts the
wire-protocol test server from `tests.mongo_server` on a free loopback port.

Every secret, passphrase and key a test sends or receives goes through
`Recorder`; at the end of the session `secrecy_sweep` scans every captured
log record for them and fails the run on any hit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
import tornado.httpclient
import tornado.ioloop
import tornado.web
from tornado.iostream import StreamClosedError

from ots.app import make_app
from ots.settings import Settings
from ots.store import SecretStore, make_client
from tests.mongo_server import MongoTestServer

EXTERNAL_MONGO_URI = os.environ.get("MONGO_URI")


class FakeClock:
    """A clock that tests move by hand, so expiry never depends on sleeping."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class Recorder:
    """Every sensitive string the suite has used, for the secrecy sweeps."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        # Encodings are computed once per value, because the sweep checks
        # thousands of log lines and a secret of several MiB is slow to encode.
        self._encodings: dict[str, list[tuple[str, bytes]]] = {}

    def add(self, value: str) -> None:
        if len(value) >= 6:
            self.values.add(value)

    def needles(self) -> Iterator[tuple[str, bytes]]:
        """Yield (form, bytes) for each value: raw, base64, hex and percent-encoded."""
        for value in self.values:
            if value not in self._encodings:
                self._encodings[value] = _encodings(value)
            yield from self._encodings[value]

    def hits(self, haystack: bytes) -> list[str]:
        """Return the forms (never the values) of recorded strings found in `haystack`."""
        return [form for form, needle in self.needles() if needle in haystack]


def _encodings(value: str) -> list[tuple[str, bytes]]:
    raw = value.encode("utf-8")
    return [
        ("raw", raw),
        ("base64", base64.b64encode(raw).rstrip(b"=")),
        ("base64url", base64.urlsafe_b64encode(raw).rstrip(b"=")),
        ("hex", raw.hex().encode("ascii")),
        ("percent", urllib.parse.quote(value, safe="").encode("ascii")),
    ]


RECORDER = Recorder()


class _CaptureAll(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture
def io_loop() -> Iterator[tornado.ioloop.IOLoop]:
    """A fresh event loop per test.

    Replaces pytest-tornado's fixture, which calls the deprecated
    `IOLoop.make_current`; this one sets the asyncio loop directly.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    io_loop = tornado.ioloop.IOLoop.current()
    yield io_loop
    io_loop.close(all_fds=True)
    asyncio.set_event_loop(None)


# Output that is not a log record of this process, for `secrecy_sweep`: the
# stderr of services run as child processes and dumps of the database.
SWEEP_SOURCES: list[tuple[str, bytes]] = []
SEPARATOR = b"\xff"


def add_to_sweep(kind: str, data: bytes) -> None:
    """Have `secrecy_sweep` scan `data` (a database dump, a child's stderr) at session end."""
    SWEEP_SOURCES.append((kind, data))


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Drop the DEBUG records of the loggers `names` (a driver's or a client's) for a while."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


def report(config: pytest.Config, *lines: str) -> None:
    """Write lines to the terminal, past output capture, for figures a run should show."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def secrecy_sweep(pytestconfig: pytest.Config) -> Iterator[_CaptureAll]:
    """Capture every log record of the session; fail if any contains a recorded secret.

    At the end it also scans what tests handed to `add_to_sweep`, and
    reports how much it scanned and how many hits it found (never the values).
    """
    handler = _CaptureAll()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)
    # Each kind of output is joined into one haystack, so every needle is
    # searched once instead of once per line. No needle (UTF-8 text, base64,
    # hex or percent-encoding) contains the byte 0xFF, so a match cannot span
    # two joined pieces.
    log_text = SEPARATOR.join(line.encode("utf-8") for line in handler.lines)
    leaks = RECORDER.hits(log_text)
    summary = [
        f"secrecy sweep: {len(RECORDER.values)} recorded values in 5 encodings; "
        f"log records: {len(handler.lines)} scanned, {len(log_text)} bytes: {len(leaks)} hits"
    ]
    other_leaks: list[tuple[str, str]] = []
    for kind in sorted({kind for kind, _ in SWEEP_SOURCES}):
        pieces = [data for source, data in SWEEP_SOURCES if source == kind]
        haystack = SEPARATOR.join(pieces)
        hits = RECORDER.hits(haystack)
        other_leaks.extend((kind, form) for form in hits)
        summary.append(f"  {kind}: {len(pieces)} scanned, {len(haystack)} bytes: {len(hits)} hits")
    report(pytestconfig, *summary)
    assert not leaks, f"log records contain recorded secret material: {set(leaks)}"
    assert not other_leaks, f"recorded secret material found in: {set(other_leaks)}"


@pytest.fixture
def recorder() -> Recorder:
    """The session's record of sensitive strings."""
    return RECORDER


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoTestServer | None]:
    """The wire-protocol test server, or None when the suite runs against `MONGO_URI`."""
    if EXTERNAL_MONGO_URI:
        yield None
        return
    with MongoTestServer() as server:
        yield server


@pytest.fixture
def test_server(mongo_server: MongoTestServer | None) -> Iterator[MongoTestServer]:
    """The test server for fault tests; they are skipped against a real MongoDB."""
    if mongo_server is None:
        pytest.skip("fault injection needs the MongoDB test server, not MONGO_URI")
    yield mongo_server
    mongo_server.set_down(False)
    mongo_server.reset_faults()


@pytest.fixture(scope="session")
def mongo_uri(mongo_server: MongoTestServer | None) -> str:
    """Connection string of the MongoDB the suite uses."""
    if mongo_server is None:
        assert EXTERNAL_MONGO_URI
        return EXTERNAL_MONGO_URI
    return mongo_server.uri


@pytest.fixture(scope="session")
def database_name(mongo_uri: str) -> Iterator[str]:
    """A database of the suite's own, dropped when the session ends."""
    name = f"ots_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=2000) as client:
        client.drop_database(name)


def make_settings(mongo_uri: str, database: str, **overrides: Any) -> Settings:
    """Build test settings: cheap scrypt, short deadlines, rate limiting off.

    The environment is never read, so `RATE_LIMIT_PER_MINUTE` and friends
    cannot change the outcome of a test that does not ask for them.
    """
    values: dict[str, Any] = {
        "mongo_uri": mongo_uri,
        "mongo_database": database,
        "mongo_timeout_ms": 1500,
        "mongo_server_selection_timeout_ms": 1000,
        # 2^10 keeps the suite fast; production refuses anything below 2^14.
        "scrypt_n": 2**10,
        "scrypt_r": 8,
        "scrypt_p": 1,
        "allow_weak_kdf": True,
        "kdf_workers": 2,
        "kdf_queue_size": 64,
        "rate_limit_per_minute": 0,
        "max_secret_bytes": 8 * 1024 * 1024,
    }
    values.update(overrides)
    return Settings(**values)


def pytest_configure(config: pytest.Config) -> None:
    """Register the `settings` marker."""
    config.addinivalue_line(
        "markers", "settings(**fields): override fields of the app's test settings"
    )


@pytest.fixture
def settings(mongo_uri: str, database_name: str, request: pytest.FixtureRequest) -> Settings:
    """Settings for the app under test; `@pytest.mark.settings(...)` overrides fields."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    return make_settings(mongo_uri, database_name, **overrides)


@pytest.fixture
def store(
    io_loop: tornado.ioloop.IOLoop, settings: Settings, mongo_server: MongoTestServer | None
) -> Iterator[SecretStore]:
    """A store on a fresh client bound to this test's event loop; data is wiped afterwards."""
    client = make_client(settings)
    database = client[settings.mongo_database]
    yield SecretStore(database)

    if mongo_server is not None:
        # A fault test may leave the server down or slow. PyMongo 4.20 leaks
        # a monitor socket when a client closes while its server is
        # unreachable, so the server comes back before the client closes.
        mongo_server.set_down(False)
        mongo_server.reset_faults()

    async def wipe() -> None:
        for name in await database.list_collection_names():
            await database[name].delete_many({})
        await client.close()

    io_loop.run_sync(wipe, timeout=30)


@pytest.fixture
def clock() -> FakeClock:
    """A controllable clock, starting at the real current time."""
    return FakeClock()


@pytest.fixture
def app(settings: Settings, store: SecretStore, clock: FakeClock) -> tornado.web.Application:
    """The application under test (pytest-tornado serves it on `base_url`)."""
    return make_app(settings, store, clock=clock)


class Api:
    """A JSON client for the app under test that records every secret it handles."""

    def __init__(self, client: tornado.httpclient.AsyncHTTPClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tornado.httpclient.HTTPResponse:
        """Send a request; `body` is encoded as JSON unless `raw` bytes are given."""
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        return await self.client.fetch(
            self.base_url + path,
            method=method,
            body=data,
            headers=all_headers,
            raise_error=False,
            allow_nonstandard_methods=True,
            request_timeout=60,
        )

    async def generate(
        self, secret: str, passphrase: str, **fields: Any
    ) -> tornado.httpclient.HTTPResponse:
        """POST /generate and record the secret, the passphrase and the returned key."""
        RECORDER.add(secret)
        RECORDER.add(passphrase)
        response = await self.request(
            "POST", "/generate", {"secret": secret, "passphrase": passphrase, **fields}
        )
        if response.code == 201:
            RECORDER.add(json.loads(response.body)["secret_key"])
        return response

    async def create(self, secret: str, passphrase: str, **fields: Any) -> str:
        """Store a secret and return its key; fails the test unless the status is 201."""
        response = await self.generate(secret, passphrase, **fields)
        assert response.code == 201, response.body
        key: str = json.loads(response.body)["secret_key"]
        return key

    async def read(self, key: str, passphrase: str) -> tornado.httpclient.HTTPResponse:
        """POST /secrets/{key} with a passphrase."""
        RECORDER.add(passphrase)
        return await self.request("POST", f"/secrets/{key}", {"passphrase": passphrase})


@pytest.fixture
def api(http_client: tornado.httpclient.AsyncHTTPClient, base_url: str) -> Api:
    """A JSON client for the app under test."""
    return Api(http_client, base_url)


# Tornado's client code for a response cut off before its end.
TRANSFER_FAILED = 599


async def read_outcome(api: Api, key: str, passphrase: str) -> tuple[int, bytes]:
    """Read a secret; return the status and body, or 599 and no body for a cut transfer."""
    try:
        response = await api.read(key, passphrase)
    except (tornado.httpclient.HTTPClientError, StreamClosedError, ConnectionError) as error:
        code = getattr(error, "code", TRANSFER_FAILED)
        assert code == TRANSFER_FAILED, f"unexpected client error {code}"
        return TRANSFER_FAILED, b""
    return response.code, response.body


def serves_secret(code: int, body: bytes, secret: str) -> bool:
    """Return True when a response is a complete 200 whose JSON body contains `secret`."""
    if code != 200:
        return False
    try:
        document: Any = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("secret") == secret


def problem(response: tornado.httpclient.HTTPResponse) -> dict[str, Any]:
    """Parse a problem+json body, checking its media type and required members."""
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(response.body)
    assert body["status"] == response.code
    assert body["type"].startswith("/problems/")
    return body
