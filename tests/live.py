"""The service on a real loopback port, for clients that are not Tornado coroutines.

`ServiceThread` runs `make_app` on an event loop of its own in a background
thread, so synchronous clients (schemathesis, `http.client`, hypothesis's
`@given` tests) can talk to it while the test thread blocks. Its log records
reach the session's secrecy sweep like any others.

`ServiceProcess` runs `python -m ots` as a child process, configured only
through the environment, as an operator runs it. Its stderr goes to a file
that the caller scans afterwards.

Both listen on 127.0.0.1 only. `dump_database` and `drop_database` serve
the tests that give such a service a database of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Final

import pymongo
import tornado.httpserver
import tornado.netutil
import tornado.web
from bson.raw_bson import RawBSONDocument

from ots.app import make_app, services_of
from ots.settings import Settings
from ots.store import SecretStore, make_client

HOST: Final = "127.0.0.1"
START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 30.0


class ServiceThread:
    """The application served on a free loopback port from a background thread.

    Use it as a context manager; `base_url` is set once it has started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = ""
        self.application: tornado.web.Application | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="ots-service", daemon=True)
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> ServiceThread:
        """Start serving and wait until the port is bound."""
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_SECONDS):
            raise RuntimeError("the service thread did not start")
        if self._failure is not None:
            raise RuntimeError("the service thread failed to start") from self._failure
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop serving, close the database client and end the thread."""
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise RuntimeError("the service thread did not stop")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        client = make_client(self.settings)
        store = SecretStore(client[self.settings.mongo_database])
        try:
            self.application = make_app(self.settings, store)
            server = tornado.httpserver.HTTPServer(self.application)
            sockets = tornado.netutil.bind_sockets(0, HOST)
            server.add_sockets(sockets)
            self.base_url = f"http://{HOST}:{sockets[0].getsockname()[1]}"
        except BaseException as error:
            self._failure = error
            self._started.set()
            await client.close()
            raise
        self._started.set()

        await self._stopped.wait()
        server.stop()
        await server.close_all_connections()
        services_of(self.application).kdf_pool.shutdown()
        await client.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class ServiceProcess:
    """`python -m ots` as a child process on a free loopback port.

    `environment` is added to a copy of this process's environment, with
    HOST and PORT set here. stderr, where the service logs, goes to
    `log_path`.
    """

    def __init__(self, environment: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.environment = {**os.environ, **environment, "HOST": HOST, "PORT": str(self.port)}
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        """Process id of the running service."""
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServiceProcess:
        """Start the service and wait until `GET /healthz` returns 200."""
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ots"],
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"python -m ots exited with {self.process.returncode}")
            if self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("python -m ots did not respond to GET /healthz within 30 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the service."""
        self.stop()

    def stop(self) -> None:
        """Send SIGTERM, wait for a graceful exit and record its code; kill it if it hangs."""
        if self.process is None or self.exit_code is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait(STOP_TIMEOUT_SECONDS)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as response:  # noqa: S310 - a loopback http URL built here
                healthy: bool = response.status == 200
                return healthy
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def dump_database(mongo_uri: str, database: str) -> bytes:
    """Return every stored document of `database` as concatenated BSON."""
    client: pymongo.MongoClient[RawBSONDocument]
    with pymongo.MongoClient(
        mongo_uri, document_class=RawBSONDocument, serverSelectionTimeoutMS=2000
    ) as client:
        db = client[database]
        return b"".join(
            document.raw for name in db.list_collection_names() for document in db[name].find({})
        )


def drop_database(mongo_uri: str, database: str) -> None:
    """Drop `database`."""
    client: pymongo.MongoClient[RawBSONDocument]
    with pymongo.MongoClient(
        mongo_uri, document_class=RawBSONDocument, serverSelectionTimeoutMS=2000
    ) as client:
        client.drop_database(database)
