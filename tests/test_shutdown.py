"""Graceful shutdown: the real `python -m ots` under SIGTERM and SIGINT, and `drain` in process.

The subprocess tests slow the MongoDB test server down (`set_delay`) so that
requests are still running when the signal arrives, and check through the
stored documents that they really are. A POST whose body is sent in two
halves keeps the drain open for as long as a test needs it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pymongo
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.web

from ots import crypto
from ots.app import services_of
from ots.handlers import GenerateHandler
from ots.server import drain
from ots.store import SecretStore
from tests.conftest import RECORDER, Api
from tests.mongo_server import MongoTestServer

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "shutdown test passphrase"
MAX_ATTEMPTS = 5
STARTUP_SECONDS = 30.0
WAIT_SECONDS = 20.0
# Every command of the test server waits this long, so a read (find, reserve,
# claim) stays in flight for about a second.
DB_DELAY_SECONDS = 0.3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting until {what}")
        time.sleep(0.02)


def record_id_of(key: str) -> str:
    parsed = crypto.parse_secret_key(key)
    assert parsed is not None
    return crypto.record_id(parsed)


class Service:
    """`python -m ots` in a subprocess, with its stderr collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ots"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._lines: list[bytes] = []
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    @property
    def port(self) -> int:
        return int(self.env["PORT"])

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self._lines.append(line)

    def stderr(self) -> bytes:
        with self._lock:
            return b"".join(self._lines)

    def wait_for_output(self, text: str) -> None:
        wait_until(lambda: text.encode() in self.stderr(), f"stderr contains {text!r}")

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ots exited with {self.process.returncode}:\n{self.stderr()!r}")
            try:
                self.connect().close()
            except OSError:
                time.sleep(0.1)
            else:
                return
        pytest.fail(f"ots did not answer /healthz within {STARTUP_SECONDS}s")

    def connect(self) -> http.client.HTTPConnection:
        """Open a keep-alive connection that the server has accepted: it responded to /healthz."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_SECONDS)
        self._connections.append(connection)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return connection

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, seconds: float) -> int:
        return self.process.wait(timeout=seconds)

    def kill(self) -> None:
        """Kill the process if it still runs, and close its pipe and connections."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT_SECONDS)
        self._reader.join(timeout=WAIT_SECONDS)
        assert self.process.stderr is not None
        self.process.stderr.close()
        for connection in self._connections:
            connection.close()


def send_json(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})


def receive_json(connection: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    response = connection.getresponse()
    document: dict[str, Any] = json.loads(response.read())
    return response.status, document


def create_secret(connection: http.client.HTTPConnection, secret: str) -> str:
    # A leak of the whole secret contains its first 48 characters in every form
    # the sweep checks (48 is a multiple of 3, so base64 keeps the prefix), and
    # the session's log sweep stays fast with a 150 kB secret.
    RECORDER.add(secret[:48])
    RECORDER.add(PASSPHRASE)
    send_json(connection, "/generate", {"secret": secret, "passphrase": PASSPHRASE})
    status, document = receive_json(connection)
    assert status == 201, document
    key: str = document["secret_key"]
    RECORDER.add(key)
    return key


class HeldRequest:
    """A `POST /generate` whose body stops halfway until `release`: the server keeps it running."""

    def __init__(self, service: Service) -> None:
        self.secret = secrets.token_urlsafe(24)
        RECORDER.add(self.secret)
        RECORDER.add(PASSPHRASE)
        self.body = json.dumps({"secret": self.secret, "passphrase": PASSPHRASE}).encode()
        self.connection = service.connect()
        self.connection.putrequest("POST", "/generate")
        self.connection.putheader("Content-Type", "application/json")
        self.connection.putheader("Content-Length", str(len(self.body)))
        self.connection.endheaders()
        self.connection.send(self.body[:10])

    def release(self) -> tuple[int, dict[str, Any]]:
        self.connection.send(self.body[10:])
        status, document = receive_json(self.connection)
        if status == 201:
            RECORDER.add(document["secret_key"])
        return status, document


def stored(server: MongoTestServer, database: str, collection: str) -> list[dict[str, Any]]:
    return server.dump().get(database, {}).get(collection, [])


def attempts_left(server: MongoTestServer, database: str, record_ids: set[str]) -> list[int]:
    return [
        record["attempts_left"]
        for record in stored(server, database, "secrets")
        if record["_id"] in record_ids
    ]


@pytest.fixture
def service_database(mongo_uri: str, database_name: str) -> Iterator[str]:
    """A database for the subprocess, dropped afterwards, so no record reaches other tests."""
    name = f"{database_name}_srv"
    yield name
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=2000) as client:
        client.drop_database(name)


@pytest.fixture
def start_service(mongo_uri: str, service_database: str) -> Iterator[Callable[..., Service]]:
    """Start `python -m ots` against the suite's MongoDB; extra keyword arguments set variables."""
    started: list[Service] = []

    def start(**variables: str) -> Service:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "MONGO_URI": mongo_uri,
            "MONGO_DATABASE": service_database,
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "SCRYPT_N": "16384",
            "KDF_WORKERS": "1",
            "RATE_LIMIT_PER_MINUTE": "0",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "LOG_LEVEL": "INFO",
        }
        env.update(variables)
        service = Service(env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


def test_sigterm_lets_running_requests_finish(
    start_service: Callable[..., Service], test_server: MongoTestServer, service_database: str
) -> None:
    service = start_service()
    service.wait_until_healthy()
    setup = service.connect()
    secrets_by_key = {}
    # Above the default INLINE_SECRET_BYTES, so this one streams from GridFS.
    for secret in [secrets.token_urlsafe(24) for _ in range(3)] + [secrets.token_urlsafe(150_000)]:
        secrets_by_key[create_secret(setup, secret)] = secret
    readers = {key: service.connect() for key in secrets_by_key}
    writers = [service.connect() for _ in range(2)]
    held = HeldRequest(service)
    probe = service.connect()
    records_before = len(stored(test_server, service_database, "secrets"))
    read_ids = {record_id_of(key) for key in secrets_by_key}

    test_server.set_delay(DB_DELAY_SECONDS)
    with ThreadPoolExecutor(max_workers=len(readers) + len(writers)) as pool:
        reads: dict[str, Future[tuple[int, dict[str, Any]]]] = {}
        for key, connection in readers.items():
            send_json(connection, f"/secrets/{key}", {"passphrase": PASSPHRASE})
            reads[key] = pool.submit(receive_json, connection)
        # Each read has used an attempt, so it is past its first database calls.
        wait_until(
            lambda: (
                attempts_left(test_server, service_database, read_ids)
                == [MAX_ATTEMPTS - 1] * len(read_ids)
            ),
            "every read has reserved an attempt",
        )
        generates = []
        for connection in writers:
            secret = secrets.token_urlsafe(24)
            RECORDER.add(secret)
            send_json(connection, "/generate", {"secret": secret, "passphrase": PASSPHRASE})
            generates.append(pool.submit(receive_json, connection))

        service.signal(signal.SIGTERM)
        service.wait_for_output("stopped accepting connections")
        probe.request("GET", "/readyz")
        readiness = probe.getresponse()
        readiness.read()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", service.port), timeout=WAIT_SECONDS).close()
        # The generates have stored their records; the held request keeps the drain open.
        wait_until(
            lambda: (
                len(stored(test_server, service_database, "secrets"))
                == records_before - len(read_ids) + len(writers)
            ),
            "the reads have claimed their records and the generates stored theirs",
        )
        held_status, _ = held.release()
        read_results = {key: future.result(timeout=WAIT_SECONDS) for key, future in reads.items()}
        generate_results = [future.result(timeout=WAIT_SECONDS) for future in generates]

    status = service.wait(10)
    output = service.stderr()
    for _, document in generate_results:
        RECORDER.add(document.get("secret_key", ""))
    assert readiness.status == 503
    assert held_status == 201
    for key, (read_status, document) in read_results.items():
        assert read_status == 200
        assert document == {"secret": secrets_by_key[key]}
    assert [generate_status for generate_status, _ in generate_results] == [201, 201]
    assert status == 0
    assert b"stopped\n" in output
    assert b"cut off" not in output
    assert RECORDER.hits(output) == []


def test_sigint_lets_running_read_finish(
    start_service: Callable[..., Service], test_server: MongoTestServer, service_database: str
) -> None:
    service = start_service()
    service.wait_until_healthy()
    secret = secrets.token_urlsafe(24)
    key = create_secret(service.connect(), secret)
    reader = service.connect()

    test_server.set_delay(DB_DELAY_SECONDS)
    with ThreadPoolExecutor(max_workers=1) as pool:
        send_json(reader, f"/secrets/{key}", {"passphrase": PASSPHRASE})
        read = pool.submit(receive_json, reader)
        wait_until(
            lambda: (
                attempts_left(test_server, service_database, {record_id_of(key)})
                == [MAX_ATTEMPTS - 1]
            ),
            "the read has reserved an attempt",
        )
        service.signal(signal.SIGINT)
        read_status, document = read.result(timeout=WAIT_SECONDS)

    status = service.wait(10)
    output = service.stderr()
    assert read_status == 200
    assert document == {"secret": secret}
    assert status == 0
    assert b"received SIGINT" in output
    assert b"stopped\n" in output
    assert b"Traceback" not in output
    assert RECORDER.hits(output) == []


def test_grace_period_cuts_off_stalled_request(
    start_service: Callable[..., Service], test_server: MongoTestServer
) -> None:
    service = start_service(SHUTDOWN_GRACE_SECONDS="1")
    service.wait_until_healthy()
    held = HeldRequest(service)
    # The request is running once the service has read its headers; a
    # request it has not seen yet would not hold the drain open.
    probe = service.connect()
    probe.request("GET", "/readyz")
    probe.getresponse().read()

    service.signal(signal.SIGTERM)
    status = service.wait(WAIT_SECONDS)
    output = service.stderr()

    assert status == 0
    assert b"shutdown cut off POST /generate" in output
    assert b"stopped\n" in output
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        held.release()
    assert RECORDER.hits(output) == []


def test_second_signal_stops_without_waiting(
    start_service: Callable[..., Service], test_server: MongoTestServer
) -> None:
    service = start_service(SHUTDOWN_GRACE_SECONDS="3600")
    service.wait_until_healthy()
    held = HeldRequest(service)
    probe = service.connect()
    probe.request("GET", "/readyz")
    probe.getresponse().read()

    service.signal(signal.SIGTERM)
    service.wait_for_output("waiting up to 3600s for 1 running requests")
    service.signal(signal.SIGTERM)
    status = service.wait(WAIT_SECONDS)
    output = service.stderr()

    assert status == 0
    assert b"received SIGTERM again" in output
    assert b"shutdown cut off POST /generate" in output
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        held.release()


def test_invalid_port_exits_with_status_2(start_service: Callable[..., Service]) -> None:
    service = start_service(PORT="abc")

    status = service.wait(WAIT_SECONDS)
    service.kill()
    output = service.stderr().decode()

    assert status == 2
    assert "PORT" in output
    assert "abc" not in output
    assert "Traceback" not in output


def test_port_in_use_exits_with_status_1(start_service: Callable[..., Service]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = start_service(PORT=str(port))

        status = service.wait(WAIT_SECONDS)

    service.kill()
    output = service.stderr().decode()
    assert status == 1
    assert f"could not listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output


async def raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """Send a GET on an open connection and return the status; the body is read and dropped."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def poll(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT_SECONDS / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting until {what}")


@pytest.mark.gen_test(timeout=30)
async def test_drain_turns_readiness_off_and_waits(
    app: tornado.web.Application,
    http_server: tornado.httpserver.HTTPServer,
    http_port: int,
    http_client: tornado.httpclient.AsyncHTTPClient,
    base_url: str,
) -> None:
    services = services_of(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    assert await raw_get(reader, writer, "/readyz") == 200
    secret = secrets.token_urlsafe(24)
    RECORDER.add(secret)
    RECORDER.add(PASSPHRASE)
    body = json.dumps({"secret": secret, "passphrase": PASSPHRASE}).encode()
    release = asyncio.Event()

    async def produce(write: Callable[[bytes], Any]) -> None:
        await write(body[:10])
        await release.wait()
        await write(body[10:])

    generating = asyncio.ensure_future(
        http_client.fetch(
            base_url + "/generate",
            method="POST",
            body_producer=produce,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
            raise_error=False,
        )
    )
    await poll(
        lambda: any(isinstance(h, GenerateHandler) for h in services.unfinished_requests()),
        "the generate request is running",
    )

    draining = asyncio.ensure_future(drain(http_server, services, 30))
    readiness = await raw_get(reader, writer, "/readyz")
    still_draining = not draining.done()
    release.set()
    response = await generating
    cut_off = await draining
    leftover = await reader.read()
    writer.close()

    assert readiness == 503
    assert still_draining
    assert response.code == 201
    RECORDER.add(json.loads(response.body)["secret_key"])
    assert cut_off == []
    assert leftover == b""


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(inline_secret_bytes=1024, mongo_timeout_ms=3000)
async def test_drain_logs_cut_off_read_by_ref(
    app: tornado.web.Application,
    http_server: tornado.httpserver.HTTPServer,
    api: Api,
    store: SecretStore,
    test_server: MongoTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = services_of(app)
    key = await api.create(secrets.token_urlsafe(6000), PASSPHRASE)
    ref = services.record_ref(record_id_of(key))
    # The read claims the record, then waits for its first chunk until the deadline.
    test_server.fail_next("find", collection="payloads.chunks", mode="hang")
    reading = asyncio.ensure_future(api.read(key, PASSPHRASE))
    await poll(
        lambda: any(h.claimed_secret for h in services.unfinished_requests()),
        "the read has claimed its record",
    )

    cut_off = await drain(http_server, services, 0)
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await reading
    await poll(lambda: not services.unfinished_requests(), "the cut-off handler has ended")

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ots.app" and r.levelno == logging.WARNING and "cut off" in r.getMessage()
    ]
    assert [handler.record_ref for handler in cut_off] == [ref]
    assert warnings == [
        f"shutdown cut off a read that had claimed its secret; the secret is lost ref={ref}"
    ]
    assert await store.secrets.count_documents({"_id": record_id_of(key)}) == 0
