"""Service configuration, read once from the environment into a frozen object.

`Settings.from_env` is the only place that reads environment variables. A
missing variable takes its documented default; an invalid one raises
`ConfigError` naming the variable and the accepted range, without echoing the
value (a mistyped URI may contain a password).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Final

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load
from marshmallow.validate import Length, OneOf, Range

from ots import crypto

KIB: Final = 1024
MIB: Final = 1024 * KIB

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS: Final = ("text", "json")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """An environment variable has an invalid value; start-up must stop."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Effective configuration of one service instance.

    Tests build instances directly with the fields they need; `from_env`
    builds the one that `ots` runs with.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    mongo_uri: str = "mongodb://localhost:27017"
    mongo_database: str = "ots"
    mongo_timeout_ms: int = 5000
    mongo_server_selection_timeout_ms: int = 2000
    secret_ttl_default: int = 7 * 24 * 3600
    secret_ttl_max: int = 30 * 24 * 3600
    max_secret_bytes: int = 32 * MIB
    inline_secret_bytes: int = 64 * KIB
    max_passphrase_attempts: int = 5
    scrypt_n: int = crypto.DEFAULT_KDF.n
    scrypt_r: int = crypto.DEFAULT_KDF.r
    scrypt_p: int = crypto.DEFAULT_KDF.p
    kdf_workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    kdf_queue_size: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    rate_limit_per_minute: int = 600
    trusted_proxies: tuple[Network, ...] = ()
    purge_interval_seconds: int = 60
    shutdown_grace_seconds: int = 10
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_enabled: bool = True
    # Only code can lower scrypt below the minimum, so the test suite can run
    # fast; no environment variable reaches this field.
    allow_weak_kdf: bool = False

    def __post_init__(self) -> None:
        """Check the rules that span several fields."""
        if self.secret_ttl_default > self.secret_ttl_max:
            raise ConfigError(
                "SECRET_TTL_DEFAULT must not exceed SECRET_TTL_MAX "
                f"({self.secret_ttl_max} seconds)"
            )
        if self.inline_secret_bytes > self.max_secret_bytes:
            raise ConfigError("INLINE_SECRET_BYTES must not exceed MAX_SECRET_BYTES")
        if not self.allow_weak_kdf:
            try:
                crypto.check_kdf_params(self.kdf_params)
            except ValueError as error:
                raise ConfigError(f"SCRYPT_N/SCRYPT_R/SCRYPT_P: {error}") from None

    @property
    def kdf_params(self) -> crypto.KdfParams:
        """The scrypt cost that new secrets are stored with."""
        return crypto.KdfParams(n=self.scrypt_n, r=self.scrypt_r, p=self.scrypt_p)

    @property
    def max_generate_body_bytes(self) -> int:
        """Largest `/generate` body: room for a secret escaped in JSON, plus 64 KiB."""
        return 2 * self.max_secret_bytes + 64 * KIB

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (`os.environ` by default).

        Raises:
            ConfigError: a variable is invalid; the message names it and the
                accepted range, never the value.

        """
        source = os.environ if environ is None else environ
        try:
            values = _EnvironmentSchema().load({k: v for k, v in source.items() if k in _NAMES})
        except ValidationError as error:
            messages = error.normalized_messages()  # type: ignore[no-untyped-call]
            raise ConfigError(_describe(messages)) from None
        return cls(**values)


def _int(name: str, default: int, low: int, high: int | None = None) -> fields.Integer:
    upper = "" if high is None else f" to {high}"
    accepted = (
        f"an integer from {low}{upper}" if high is not None else f"an integer, at least {low}"
    )
    return fields.Integer(
        data_key=name,
        load_default=default,
        strict=False,
        validate=Range(min=low, max=high, error=accepted),
        error_messages={"invalid": accepted},
    )


def _choice(name: str, default: str, choices: tuple[str, ...]) -> fields.String:
    accepted = "one of " + ", ".join(choices)
    return fields.String(
        data_key=name, load_default=default, validate=OneOf(choices, error=accepted)
    )


class _Networks(fields.Field[tuple[Network, ...]]):
    """Comma-separated CIDR networks, such as `10.0.0.0/8, 172.16.0.0/12`."""

    def _deserialize(
        self, value: object, attr: str | None, data: object, **kwargs: object
    ) -> tuple[Network, ...]:
        if not isinstance(value, str):
            raise ValidationError(_NETWORKS_ACCEPTED)
        networks = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValidationError(_NETWORKS_ACCEPTED) from None
        return tuple(networks)


_NETWORKS_ACCEPTED: Final = (
    "a comma-separated list of CIDR networks, such as 10.0.0.0/8,172.16.0.0/12"
)
_CPUS: Final = os.cpu_count() or 1


class _EnvironmentSchema(Schema):
    """Every environment variable the service reads, with its default and range."""

    class Meta:
        unknown = EXCLUDE

    host = fields.String(data_key="HOST", load_default="127.0.0.1")
    port = _int("PORT", 8000, 1, 65535)
    mongo_uri = fields.String(data_key="MONGO_URI", load_default="mongodb://localhost:27017")
    mongo_database = fields.String(
        data_key="MONGO_DATABASE",
        load_default="ots",
        validate=Length(min=1, max=63, error="a database name of 1 to 63 characters"),
    )
    mongo_timeout_ms = _int("MONGO_TIMEOUT_MS", 5000, 100, 600_000)
    mongo_server_selection_timeout_ms = _int(
        "MONGO_SERVER_SELECTION_TIMEOUT_MS", 2000, 100, 600_000
    )
    secret_ttl_default = _int("SECRET_TTL_DEFAULT", 7 * 24 * 3600, 60)
    secret_ttl_max = _int("SECRET_TTL_MAX", 30 * 24 * 3600, 60)
    max_secret_bytes = _int("MAX_SECRET_BYTES", 32 * MIB, 1, 256 * MIB)
    # A MongoDB document stops at 16 MiB, so inline ciphertext stays well below.
    inline_secret_bytes = _int("INLINE_SECRET_BYTES", 64 * KIB, 0, 8 * MIB)
    max_passphrase_attempts = _int("MAX_PASSPHRASE_ATTEMPTS", 5, 1, 100)
    scrypt_n = _int("SCRYPT_N", crypto.DEFAULT_KDF.n, crypto.MIN_KDF_N, crypto.MAX_KDF.n)
    scrypt_r = _int("SCRYPT_R", crypto.DEFAULT_KDF.r, 1, crypto.MAX_KDF.r)
    scrypt_p = _int("SCRYPT_P", crypto.DEFAULT_KDF.p, 1, crypto.MAX_KDF.p)
    kdf_workers = _int("KDF_WORKERS", _CPUS, 1, 256)
    kdf_queue_size = _int("KDF_QUEUE_SIZE", 4 * _CPUS, 0, 10_000)
    rate_limit_per_minute = _int("RATE_LIMIT_PER_MINUTE", 600, 0)
    trusted_proxies = _Networks(data_key="TRUSTED_PROXIES", load_default=())
    purge_interval_seconds = _int("PURGE_INTERVAL_SECONDS", 60, 1, 86_400)
    shutdown_grace_seconds = _int("SHUTDOWN_GRACE_SECONDS", 10, 0, 3600)
    log_level = _choice("LOG_LEVEL", "INFO", LOG_LEVELS)
    log_format = _choice("LOG_FORMAT", "text", LOG_FORMATS)
    metrics = _choice("METRICS", "on", ("on", "off"))
    metrics_port = _int("METRICS_PORT", 0, 0, 65535)

    @post_load
    def _to_settings_fields(self, data: dict[str, Any], **kwargs: object) -> dict[str, Any]:
        data["metrics_enabled"] = data.pop("metrics") == "on"
        data["metrics_port"] = data["metrics_port"] or None
        return data


_NAMES: Final = frozenset(
    field.data_key for field in _EnvironmentSchema().fields.values() if field.data_key
)


def _describe(messages: dict[str, Any] | list[Any]) -> str:
    """Build one message naming each invalid variable and what it accepts."""
    if isinstance(messages, list):
        return "; ".join(str(message) for message in messages)
    parts = [
        f"{name} is invalid: expected {'; '.join(map(str, errors))}"
        for name, errors in sorted(messages.items())
    ]
    return ". ".join(parts)
