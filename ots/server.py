"""The `ots` command: read the environment, serve, and stop cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Final

import tornado.httpserver
import tornado.netutil
import tornado.web
from pymongo.errors import PyMongoError

from ots import __version__
from ots.app import make_app, make_metrics_app, services_of
from ots.base import ApiHandler, Services
from ots.logs import configure_logging, describe_settings
from ots.purge import Purger
from ots.ratelimit import ensure_rate_limit_indexes
from ots.settings import ConfigError, Settings
from ots.store import SecretStore, make_client

log = logging.getLogger("ots.app")

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

# How often the shutdown checks whether the running requests have finished.
DRAIN_POLL_SECONDS: Final = 0.05


async def serve(settings: Settings) -> int:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully.

    The first signal starts the shutdown, which `drain` describes. After it
    the purge stops, the KDF pool shuts down and the MongoDB client closes.
    A second signal ends the wait for running requests at once.

    A secret is never served twice, shutdown or not. A read deletes the
    record in one atomic `find_one_and_delete` before it sends a byte. So a
    read that the shutdown cuts off has used the secret up, and no other
    request can get it.

    Returns:
        The exit status: 0 after a clean stop, 1 when the address cannot be bound.

    """
    try:
        client = make_client(settings)
    except (PyMongoError, ValueError) as error:
        # The driver's message may quote parts of the URI, password included.
        log.error(
            "MONGO_URI is invalid (%s): expected a mongodb:// or mongodb+srv:// connection string",
            type(error).__name__,
        )
        return 2
    ports = [settings.port]
    if settings.metrics_enabled and settings.metrics_port is not None:
        ports.append(settings.metrics_port)
    try:
        sockets, *metrics = [_bind(settings.host, port) for port in ports]
    except OSError:
        await client.close()
        return 1
    metrics_sockets = metrics[0] if metrics else []
    store = SecretStore(client[settings.mongo_database])
    application = make_app(settings, store)
    services = services_of(application)
    server = tornado.httpserver.HTTPServer(
        application, max_body_size=2 * settings.max_generate_body_bytes, xheaders=False
    )
    # The handlers go in before the first request can arrive, so a signal is
    # never handled by Python's default handlers once the service responds.
    signals = StopSignals(services)
    signals.install(asyncio.get_running_loop())
    server.add_sockets(sockets)
    log.info("listening on %s:%d", settings.host, settings.port)
    metrics_server = _serve_metrics(application, metrics_sockets)
    indexes = asyncio.create_task(_ensure_indexes(store))
    purger = Purger(store, services.clock, on_deleted=_count_purged(services))
    purger.start(settings.purge_interval_seconds)

    await signals.first.wait()
    log.info("received %s, shutting down", signals.received)
    await drain(server, services, settings.shutdown_grace_seconds, cut_short=signals.second)
    if metrics_server is not None:
        metrics_server.stop()
        await metrics_server.close_all_connections()
    await purger.stop()
    indexes.cancel()
    services.kdf_pool.shutdown()
    await client.close()
    log.info("stopped")
    return 0


class StopSignals:
    """SIGTERM and SIGINT as events: the first starts the shutdown, a second cuts it short."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.received: str | None = None
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle the stop signals on `loop` instead of Python's default handlers."""
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._handle, signum)

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.first.is_set():
            log.warning("received %s again; not waiting for running requests", name)
            self.second.set()
            return
        # Readiness turns to 503 here, before anything else happens, so load
        # balancers stop sending new requests as early as possible.
        self.services.shutting_down = True
        self.received = name
        self.first.set()


async def drain(
    server: tornado.httpserver.HTTPServer,
    services: Services,
    grace_seconds: float,
    *,
    cut_short: asyncio.Event | None = None,
) -> list[ApiHandler]:
    """Stop taking connections and let running requests finish, for up to `grace_seconds`.

    In order: `/readyz` returns 503, the listening sockets close, and the
    requests that have started (on connections accepted earlier, including
    ones a keep-alive connection sends during the wait) run until they
    finish, the grace period ends or `cut_short` is set. Then every
    connection is closed. A request still running at that point is logged
    at WARNING by route pattern and keyed record hash, never by key.

    NOTE: a request counts as finished when its response is, so work a
    handler does after its response (deleting a streamed payload file) may
    be cut off by the closing client; the purge removes such files later.

    Returns:
        The handlers whose requests were cut off.

    """
    services.shutting_down = True
    server.stop()
    running = services.unfinished_requests()
    log.info(
        "stopped accepting connections; waiting up to %gs for %d running requests",
        grace_seconds,
        len(running),
    )
    running = await _wait_for_requests(services, grace_seconds, cut_short)
    for handler in running:
        _log_cut_off(handler)
    await server.close_all_connections()
    return running


async def _wait_for_requests(
    services: Services, grace_seconds: float, cut_short: asyncio.Event | None
) -> list[ApiHandler]:
    """Poll until no request is running, the grace period ends or `cut_short` is set."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_seconds
    while True:
        running = services.unfinished_requests()
        if not running or loop.time() >= deadline:
            return running
        if cut_short is not None and cut_short.is_set():
            return running
        await asyncio.sleep(DRAIN_POLL_SECONDS)


def _log_cut_off(handler: ApiHandler) -> None:
    if handler.claimed_secret:
        # The record is gone, so the secret is lost; no other request can get it.
        log.warning(
            "shutdown cut off a read that had claimed its secret; the secret is lost ref=%s",
            handler.record_ref,
        )
        return
    log.warning(
        "shutdown cut off %s %s ref=%s",
        handler.request.method,
        handler.route,
        handler.record_ref or "-",
    )


def _bind(host: str, port: int) -> list[socket.socket]:
    """Bind the listening sockets of one port, logging the reason when that fails."""
    try:
        return tornado.netutil.bind_sockets(port, address=host)
    except OSError as error:
        log.error("could not listen on %s:%d: %s", host, port, error.strerror)
        raise


def _serve_metrics(
    application: tornado.web.Application, sockets: list[socket.socket]
) -> tornado.httpserver.HTTPServer | None:
    """Serve `/metrics` on the separate metrics sockets, if any were bound."""
    if not sockets:
        return None
    metrics_server = tornado.httpserver.HTTPServer(make_metrics_app(application), xheaders=False)
    metrics_server.add_sockets(sockets)
    log.info("serving metrics on port %d", sockets[0].getsockname()[1])
    return metrics_server


def _count_purged(services: Services) -> Callable[[str, int], None]:
    """Return a hook that adds purge counts to the application's metrics."""

    def count(kind: str, deleted: int) -> None:
        services.metrics.purged.labels(kind=kind).inc(deleted)

    return count


async def _ensure_indexes(store: SecretStore) -> None:
    """Create indexes, retrying while the database is unreachable at start-up."""
    delay = 1.0
    while True:
        try:
            await store.ensure_indexes()
            await ensure_rate_limit_indexes(store.database)
        except Exception as error:  # noqa: BLE001 - retried and logged, never fatal
            log.warning(
                "could not create indexes (%s); retrying in %.0fs", type(error).__name__, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
        else:
            return


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ots` console script; returns the exit status.

    The service is configured by environment variables only; the command
    line takes just `--help` and `--version`.
    """
    _parse_arguments(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.stderr.write(f"ots: invalid configuration: {error}\n")
        return 2
    configure_logging(settings)
    log.info("starting with %s", describe_settings(settings))
    return asyncio.run(serve(settings))


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ots",
        description=(
            "Serve the ots one-time secret API. Every setting is an environment "
            "variable (MONGO_URI, MONGO_DATABASE, PORT, RATE_LIMIT_PER_MINUTE, ...); "
            "see config/ots.env.example and the README."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ots {__version__}")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
