"""Configuration from the environment: defaults, ranges, and messages that name the variable."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from ots.logs import mask_uri
from ots.server import main, serve
from ots.settings import ConfigError, Settings


def test_defaults_match_documentation() -> None:
    settings = Settings.from_env({})

    assert settings.port == 8000
    assert settings.mongo_database == "ots"
    assert settings.secret_ttl_default == 7 * 24 * 3600
    assert settings.secret_ttl_max == 30 * 24 * 3600
    assert settings.max_secret_bytes == 32 * 1024 * 1024
    assert settings.inline_secret_bytes == 64 * 1024
    assert settings.max_passphrase_attempts == 5
    assert (settings.scrypt_n, settings.scrypt_r, settings.scrypt_p) == (2**17, 8, 1)
    assert settings.rate_limit_per_minute == 600
    assert settings.trusted_proxies == ()


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "MONGO_URI": "mongodb://127.0.0.1:27018",
            "MONGO_DATABASE": "other",
            "RATE_LIMIT_PER_MINUTE": "0",
            "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
            "SCRYPT_N": "16384",
            "LOG_FORMAT": "json",
            "UNRELATED": "ignored",
        }
    )

    assert settings.port == 9000
    assert settings.mongo_uri == "mongodb://127.0.0.1:27018"
    assert settings.mongo_database == "other"
    assert settings.rate_limit_per_minute == 0
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.1/32"),
    )
    assert settings.scrypt_n == 2**14
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("RATE_LIMIT_PER_MINUTE", "-1"),
        ("RATE_LIMIT_PER_MINUTE", "1.5"),
        ("SCRYPT_N", "8192"),
        ("SCRYPT_N", "2097152"),
        ("MAX_PASSPHRASE_ATTEMPTS", "0"),
        ("SECRET_TTL_MAX", "59"),
        ("TRUSTED_PROXIES", "not-a-network"),
        ("LOG_LEVEL", "LOUD"),
        ("METRICS", "maybe"),
    ],
)
def test_invalid_value_names_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})

    message = str(caught.value)
    assert name in message
    assert value not in message or value in ("0", "-1")


def test_scrypt_n_must_be_power_of_two() -> None:
    with pytest.raises(ConfigError, match="SCRYPT"):
        Settings.from_env({"SCRYPT_N": str(3 * 2**14)})


def test_ttl_default_above_max_rejected() -> None:
    with pytest.raises(ConfigError, match="SECRET_TTL_DEFAULT"):
        Settings.from_env({"SECRET_TTL_DEFAULT": "7200", "SECRET_TTL_MAX": "3600"})


def test_weak_kdf_only_when_code_asks() -> None:
    with pytest.raises(ConfigError):
        Settings(scrypt_n=2**10)

    assert Settings(scrypt_n=2**10, allow_weak_kdf=True).scrypt_n == 2**10


def test_config_error_never_echoes_uri_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MONGO_URI": "mongodb://u:pa55word@h", "PORT": "x"})

    assert "pa55word" not in str(caught.value)


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("mongodb://user:pa55@db:27017/ots", "mongodb://user:***@db:27017/ots"),
        ("mongodb://db:27017", "mongodb://db:27017"),
        (
            "mongodb+srv://u:p%40ss@cluster.example/?tls=true",
            "mongodb+srv://u:***@cluster.example/?tls=true",
        ),
    ],
)
def test_mask_uri_hides_password(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


def test_version_option_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("ots ")


@pytest.mark.parametrize(
    "uri", ["http://example.invalid", "mongodb://alice:pa55word@127.0.0.1:99999", "mongodb://"]
)
def test_invalid_mongo_uri_exits_with_status_2(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(mongo_uri=uri, port=1, allow_weak_kdf=True)

    status = asyncio.run(serve(settings))

    assert status == 2
    assert "MONGO_URI is invalid" in caplog.text
    assert "pa55word" not in caplog.text
