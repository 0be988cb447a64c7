"""Logging set-up: named loggers, text for people, JSON lines for collectors."""

from __future__ import annotations

import logging
import sys
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.json import JsonFormatter

from ots.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Send log records to stderr at `LOG_LEVEL`, formatted as `LOG_FORMAT`."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Tornado's own access log would print raw paths, which contain secret keys.
    logging.getLogger("tornado.access").disabled = True


def mask_uri(uri: str) -> str:
    """Return a MongoDB URI with its password replaced by `***`."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe_settings(settings: Settings) -> str:
    """Summarise the effective configuration for the start-up log line, without secrets."""
    return (
        f"mongo_uri={mask_uri(settings.mongo_uri)} database={settings.mongo_database} "
        f"port={settings.port} scrypt_n={settings.scrypt_n} r={settings.scrypt_r} "
        f"p={settings.scrypt_p} kdf_workers={settings.kdf_workers} "
        f"kdf_queue={settings.kdf_queue_size} max_secret_bytes={settings.max_secret_bytes} "
        f"inline_secret_bytes={settings.inline_secret_bytes} "
        f"rate_limit_per_minute={settings.rate_limit_per_minute} "
        f"ttl_default={settings.secret_ttl_default} ttl_max={settings.secret_ttl_max}"
    )
