"""Logging set-up: named loggers, text for people, JSON lines for collectors, request ids.

Every record that passes through the handler of `configure_logging` carries
`request_id`: the id of the HTTP request being handled, or `-` outside one.
Handlers set it with `bind_request_id` when a request arrives, and the value
lives in a `ContextVar`, so each request's task reads its own id.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid
from typing import Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pythonjsonlogger.json import JsonFormatter

from ots.settings import Settings

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS: Final = ("levelname", "name", "message", "request_id")
JSON_RENAMES: Final = {"levelname": "level", "name": "logger"}

REQUEST_ID_HEADER: Final = "X-Request-ID"
# Ids from clients are accepted only in this shape, so a header cannot put a
# line break, a quote or a megabyte of text into the logs.
REQUEST_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
NO_REQUEST_ID: Final = "-"

# MongoDB connection-string options whose values are credentials.
SECRET_URI_OPTIONS: Final = frozenset({"authmechanismproperties", "tlscertificatekeyfilepassword"})

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "ots_request_id", default=NO_REQUEST_ID
)


def accept_request_id(supplied: str | None) -> str:
    """Return `supplied` if it is 1 to 64 of `[A-Za-z0-9._-]`, else a new random id."""
    if supplied is not None and REQUEST_ID_PATTERN.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex


def bind_request_id(request_id: str) -> None:
    """Make `request_id` the id of every record logged from the current context on."""
    _request_id.set(request_id)


def current_request_id() -> str:
    """Return the request id bound in the current context, or `-` outside a request."""
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds the current request id to each record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Set `record.request_id`; never drops a record."""
        record.request_id = _request_id.get()
        return True


def make_log_handler(log_format: str, stream: TextIO) -> logging.Handler:
    """Build a handler that writes to `stream` as `text` or `json` lines.

    JSON lines carry `time` (ISO 8601, UTC), `level`, `logger`, `message`,
    `request_id` and every field passed with `extra=` (the access line's
    `method`, `route`, `status`, `duration_ms` and `ref`).
    """
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(list(JSON_FIELDS), rename_fields=dict(JSON_RENAMES), timestamp="time")
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(settings: Settings) -> None:
    """Send log records to stderr at `LOG_LEVEL`, formatted as `LOG_FORMAT`."""
    root = logging.getLogger()
    root.handlers[:] = [make_log_handler(settings.log_format, sys.stderr)]
    root.setLevel(settings.log_level)
    # Tornado's own access log would print raw paths, which contain secret keys.
    logging.getLogger("tornado.access").disabled = True


def mask_uri(uri: str) -> str:
    """Return a MongoDB URI with its password and credential options replaced by `***`."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return "<unparsable URI>"
    if password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    if any(name.lower() in SECRET_URI_OPTIONS for name, _ in options):
        masked = [
            (name, "***" if name.lower() in SECRET_URI_OPTIONS else value)
            for name, value in options
        ]
        parts = parts._replace(query=urlencode(masked, safe="*:,/"))
    return urlunsplit(parts)


def describe_settings(settings: Settings) -> str:
    """Summarise the effective configuration on one line for the start-up log.

    Only the fields listed here appear, and the MongoDB URI is masked, so a
    credential added to `Settings` later stays out of the log until someone
    adds it here on purpose.
    """
    values: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "mongo_uri": mask_uri(settings.mongo_uri),
        "database": settings.mongo_database,
        "mongo_timeout_ms": settings.mongo_timeout_ms,
        "server_selection_timeout_ms": settings.mongo_server_selection_timeout_ms,
        "ttl_default": settings.secret_ttl_default,
        "ttl_max": settings.secret_ttl_max,
        "max_secret_bytes": settings.max_secret_bytes,
        "inline_secret_bytes": settings.inline_secret_bytes,
        "max_passphrase_attempts": settings.max_passphrase_attempts,
        "scrypt_n": settings.scrypt_n,
        "scrypt_r": settings.scrypt_r,
        "scrypt_p": settings.scrypt_p,
        "kdf_workers": settings.kdf_workers,
        "kdf_queue": settings.kdf_queue_size,
        "rate_limit_per_minute": settings.rate_limit_per_minute,
        "trusted_proxies": ",".join(map(str, settings.trusted_proxies)) or "none",
        "purge_interval_seconds": settings.purge_interval_seconds,
        "shutdown_grace_seconds": settings.shutdown_grace_seconds,
        "log_level": settings.log_level,
        "log_format": settings.log_format,
        "metrics": "on" if settings.metrics_enabled else "off",
        "metrics_port": settings.metrics_port or "main",
    }
    return " ".join(f"{name}={_printable(str(value))}" for name, value in values.items())


def _printable(text: str) -> str:
    """Escape line breaks and other unprintable characters, keeping the summary on one line."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )
