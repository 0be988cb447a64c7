"""Build the Tornado application; no I/O happens until it is served."""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Callable
from typing import Any

import tornado.web

from ots.base import ApiHandler, BaseHandler, NotFoundHandler, Services
from ots.handlers import (
    GenerateHandler,
    HealthHandler,
    MetricsHandler,
    ProblemTypeHandler,
    ReadyHandler,
    SecretHandler,
)
from ots.openapi import OpenApiHandler, build_document, encode_document
from ots.ratelimit import RateLimiter
from ots.settings import Settings
from ots.store import SecretStore
from ots.workers import KdfPool

access_log = logging.getLogger("ots.access")

# The key is not validated here: a malformed one must get the same 404 as an
# unknown one, so the handler decides.
SECRET_KEY_PATTERN = r"/secrets/([^/]+)"  # noqa: S105 - a route, not a password


def utc_now() -> datetime.datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.datetime.now(datetime.UTC)


def make_app(
    settings: Settings,
    store: SecretStore,
    *,
    clock: Callable[[], datetime.datetime] = utc_now,
    kdf_pool: KdfPool | None = None,
) -> tornado.web.Application:
    """Build the application for `settings`, storing secrets in `store`.

    `clock` and `kdf_pool` exist for tests: a controlled clock for expiry,
    a pool shared between app instances.
    """
    services = Services(
        settings=settings,
        store=store,
        kdf_pool=kdf_pool or KdfPool(settings.kdf_workers, settings.kdf_queue_size),
        clock=clock,
        log_key=secrets.token_bytes(32),
        rate_limiter=RateLimiter.for_settings(settings, store.database, clock),
    )
    routes: list[Any] = [
        (r"/generate", GenerateHandler, {"services": services}),
        (SECRET_KEY_PATTERN, SecretHandler, {"services": services}),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler, {"services": services}),
        (r"/problems/([a-z-]+)", ProblemTypeHandler, {"services": services}),
    ]
    # With METRICS_PORT set, `make_metrics_app` serves /metrics on its own listener.
    metrics_here = settings.metrics_enabled and settings.metrics_port is None
    if metrics_here:
        routes.append((r"/metrics", MetricsHandler, {"services": services}))
    document = encode_document(build_document(settings, metrics=metrics_here))
    routes.append(
        (r"/openapi\.json", OpenApiHandler, {"services": services, "document": document})
    )
    services.metrics.watch_kdf_pool(services.kdf_pool)
    application = tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        log_function=log_request,
        compress_response=False,
        xheaders=False,
    )
    application.settings["ots_services"] = services
    return application


def services_of(application: tornado.web.Application) -> Services:
    """Return the shared services of an application built by `make_app`."""
    services: Services = application.settings["ots_services"]
    return services


def make_metrics_app(application: tornado.web.Application) -> tornado.web.Application:
    """Build the application that serves `GET /metrics` of `application` on a port of its own.

    Requests to any other path get 404. Its requests are counted in the same registry.
    """
    services = services_of(application)
    metrics_app = tornado.web.Application(
        [(r"/metrics", MetricsHandler, {"services": services})],
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        log_function=log_request,
        compress_response=False,
        xheaders=False,
    )
    metrics_app.settings["ots_services"] = services
    return metrics_app


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Write the access line and count the request in the metrics.

    The line shows method, route pattern, record ref, status and duration;
    with LOG_FORMAT=json they are also separate fields. The raw path is never
    logged, because it contains the secret key.
    """
    status = handler.get_status()
    route = handler.route if isinstance(handler, BaseHandler) else "-"
    ref = handler.record_ref if isinstance(handler, ApiHandler) else None
    method = handler.request.method or "-"
    seconds = handler.request.request_time()
    services_of(handler.application).metrics.observe_request(method, route, status, seconds)
    if status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING if status == 429 else logging.INFO
    else:
        level = logging.ERROR
    duration_ms = round(1000.0 * seconds, 1)
    access_log.log(
        level,
        "%s %s %d %.1fms ref=%s",
        method,
        route,
        status,
        duration_ms,
        ref or "-",
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "ref": ref,
        },
    )
