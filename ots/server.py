"""The `ots` command: read the environment, serve, and stop cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import tornado.httpserver

from ots.app import make_app, services_of
from ots.logs import configure_logging, describe_settings
from ots.settings import ConfigError, Settings
from ots.store import SecretStore, make_client

log = logging.getLogger("ots.app")


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully."""
    client = make_client(settings)
    store = SecretStore(client[settings.mongo_database])
    application = make_app(settings, store)
    services = services_of(application)
    server = tornado.httpserver.HTTPServer(
        application, max_body_size=2 * settings.max_generate_body_bytes, xheaders=False
    )
    server.listen(settings.port, address=settings.host)
    log.info("listening on %s:%d", settings.host, settings.port)
    indexes = asyncio.create_task(_ensure_indexes(store))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("shutting down")
    services.shutting_down = True
    server.stop()
    try:
        await asyncio.wait_for(
            server.close_all_connections(), timeout=settings.shutdown_grace_seconds
        )
    except TimeoutError:
        log.warning(
            "requests still running after %ds; stopping anyway", settings.shutdown_grace_seconds
        )
    indexes.cancel()
    services.kdf_pool.shutdown()
    await client.close()
    log.info("stopped")


async def _ensure_indexes(store: SecretStore) -> None:
    """Create indexes, retrying while the database is unreachable at start-up."""
    delay = 1.0
    while True:
        try:
            await store.ensure_indexes()
        except Exception as error:  # noqa: BLE001 - retried and logged, never fatal
            log.warning(
                "could not create indexes (%s); retrying in %.0fs", type(error).__name__, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
        else:
            return


def main() -> int:
    """Entry point of the `ots` console script; returns the exit status."""
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.stderr.write(f"ots: invalid configuration: {error}\n")
        return 2
    configure_logging(settings)
    log.info("starting with %s", describe_settings(settings))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
