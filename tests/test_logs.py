"""Logs: JSON and text lines, request ids in headers and log lines, nothing secret."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pythonjsonlogger.json import JsonFormatter

from ots.logs import (
    REQUEST_ID_HEADER,
    RequestIdFilter,
    accept_request_id,
    configure_logging,
    describe_settings,
    make_log_handler,
    mask_uri,
)
from ots.settings import Settings
from tests.conftest import Api, Recorder

PASSPHRASE = "log test passphrase"
VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
ACCESS_FIELDS = {"method", "route", "status", "duration_ms", "ref"}


class LogCapture:
    """A handler from `make_log_handler` on the root logger, writing to a string."""

    def __init__(self, log_format: str) -> None:
        self.stream = io.StringIO()
        self.handler = make_log_handler(log_format, self.stream)

    def text(self) -> str:
        return self.stream.getvalue()

    def json_lines(self) -> list[dict[str, Any]]:
        """Parse every line as JSON; fails the test on a line that is not."""
        return [json.loads(line) for line in self.text().splitlines()]

    def ots_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.json_lines() if line["logger"].startswith("ots.")]


def capture(log_format: str) -> Iterator[LogCapture]:
    logs = LogCapture(log_format)
    root = logging.getLogger()
    root.addHandler(logs.handler)
    try:
        yield logs
    finally:
        root.removeHandler(logs.handler)


@pytest.fixture
def json_logs() -> Iterator[LogCapture]:
    """JSON log lines written while the test runs."""
    yield from capture("json")


@pytest.fixture
def text_logs() -> Iterator[LogCapture]:
    """Text log lines written while the test runs."""
    yield from capture("text")


@pytest.mark.gen_test
async def test_json_lines_parse_and_carry_request_id(api: Api, json_logs: LogCapture) -> None:
    created = await api.generate("json log secret", PASSPHRASE)
    key = json.loads(created.body)["secret_key"]
    read = await api.read(key, PASSPHRASE)

    ids = {created.headers[REQUEST_ID_HEADER], read.headers[REQUEST_ID_HEADER]}
    lines = json_logs.ots_lines()
    assert len(ids) == 2
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= set(line)
        assert line["request_id"] in ids, line["message"]
    assert {line["request_id"] for line in lines} == ids


@pytest.mark.gen_test
async def test_json_access_line_has_separate_fields(api: Api, json_logs: LogCapture) -> None:
    created = await api.generate("access field secret", PASSPHRASE)
    key = json.loads(created.body)["secret_key"]
    await api.read(key, PASSPHRASE)

    access = [line for line in json_logs.ots_lines() if line["logger"] == "ots.access"]
    assert [line["route"] for line in access] == ["/generate", "/secrets/{key}"]
    for line in access:
        assert ACCESS_FIELDS <= set(line)
        assert line["method"] == "POST"
        assert isinstance(line["duration_ms"], float)
        assert re.fullmatch(r"[0-9a-f]{12}", line["ref"])
    assert [line["status"] for line in access] == [201, 200]
    assert access[0]["ref"] == access[1]["ref"]


@pytest.mark.gen_test
async def test_json_logs_hold_no_secret_material(api: Api, json_logs: LogCapture) -> None:
    secret = "json sweep secret value"
    created = await api.generate(secret, PASSPHRASE)
    key = json.loads(created.body)["secret_key"]
    await api.read(key, "json sweep wrong passphrase")
    await api.read(key, PASSPHRASE)

    text = json_logs.text()
    assert text
    for value in (secret, PASSPHRASE, "json sweep wrong passphrase", key):
        assert value not in text


@pytest.mark.gen_test
async def test_supplied_request_id_is_echoed_and_logged(
    api: Api, json_logs: LogCapture, recorder: Recorder
) -> None:
    supplied = "trace-42.abc_DEF"
    recorder.add("echo id secret")

    response = await api.request(
        "POST",
        "/generate",
        {"secret": "echo id secret", "passphrase": PASSPHRASE},
        headers={REQUEST_ID_HEADER: supplied},
    )

    assert response.code == 201
    recorder.add(json.loads(response.body)["secret_key"])
    assert response.headers[REQUEST_ID_HEADER] == supplied
    mine = [line for line in json_logs.ots_lines() if line["request_id"] == supplied]
    assert {line["logger"] for line in mine} >= {"ots.access", "ots.app"}


INVALID_IDS = {
    "too long": "a" * 65,
    "space": "two words",
    "slash": "a/b",
    "quote": 'say"hi',
    "semicolon": "id;drop",
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", sorted(INVALID_IDS))
async def test_invalid_request_id_is_replaced(api: Api, json_logs: LogCapture, case: str) -> None:
    supplied = INVALID_IDS[case]

    response = await api.request("GET", "/healthz", headers={REQUEST_ID_HEADER: supplied})

    replaced = response.headers[REQUEST_ID_HEADER]
    assert replaced != supplied
    assert VALID_ID.fullmatch(replaced)
    assert supplied not in json_logs.text()
    access = [line for line in json_logs.ots_lines() if line["logger"] == "ots.access"]
    assert [line["request_id"] for line in access] == [replaced]


@pytest.mark.parametrize(
    "supplied",
    [
        "abc\ndef",
        "abc\r\nX-Injected: 1",
        "abc\n",
        "",
        "ünïcode",
        "a" * 65,
        None,
    ],
)
def test_accept_request_id_rejects_malformed(supplied: str | None) -> None:
    accepted = accept_request_id(supplied)

    assert accepted != supplied
    assert VALID_ID.fullmatch(accepted)


@pytest.mark.parametrize(
    "supplied", ["a", "a" * 64, "0f3c-9e.1_Z", "550e8400e29b41d4a716446655440000"]
)
def test_accept_request_id_keeps_valid(supplied: str) -> None:
    assert accept_request_id(supplied) == supplied


def test_generated_request_ids_differ() -> None:
    assert accept_request_id(None) != accept_request_id(None)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/no/such/route", 404),
        ("GET", "/generate", 405),
        ("POST", "/generate", 422),
        ("GET", "/openapi.json", 200),
        ("GET", "/metrics", 200),
    ],
)
async def test_every_response_has_request_id(
    api: Api, method: str, path: str, status: int
) -> None:
    body = {"secret": "s"} if method == "POST" else None

    response = await api.request(method, path, body, headers={REQUEST_ID_HEADER: "probe-1"})

    assert response.code == status
    assert response.headers[REQUEST_ID_HEADER] == "probe-1"


@pytest.mark.gen_test
@pytest.mark.settings(max_secret_bytes=16, inline_secret_bytes=16)
async def test_oversized_body_error_keeps_request_id(api: Api) -> None:
    # The 413 is written while the body streams in, after the response was cleared.
    raw = json.dumps({"secret": "x" * 200_000, "passphrase": PASSPHRASE}).encode()

    response = await api.request(
        "POST", "/generate", raw=raw, headers={REQUEST_ID_HEADER: "big-body"}
    )

    assert response.code == 413
    assert response.headers[REQUEST_ID_HEADER] == "big-body"


@pytest.mark.gen_test
async def test_text_lines_show_request_id(api: Api, text_logs: LogCapture) -> None:
    response = await api.request("GET", "/healthz", headers={REQUEST_ID_HEADER: "text-id-1"})

    assert response.code == 200
    access = [line for line in text_logs.text().splitlines() if " ots.access " in line]
    assert len(access) == 1
    assert re.fullmatch(
        r"\S+ \S+ INFO ots\.access \[text-id-1\] GET /healthz 200 [0-9.]+ms ref=-", access[0]
    )


def test_records_outside_requests_have_placeholder_id() -> None:
    stream = io.StringIO()
    handler = make_log_handler("json", stream)
    logger = logging.getLogger("ots.test.outside")
    logger.addHandler(handler)
    try:
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)

    line = json.loads(stream.getvalue())
    assert line["request_id"] == "-"
    assert line["level"] == "WARNING"
    assert line["logger"] == "ots.test.outside"
    assert line["message"] == "outside any request"


def test_json_exception_stays_on_one_line() -> None:
    stream = io.StringIO()
    handler = make_log_handler("json", stream)
    logger = logging.getLogger("ots.test.exception")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "RuntimeError: boom" in json.loads(lines[0])["exc_info"]


def test_configure_logging_installs_one_handler(settings: Settings) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    tornado_access = logging.getLogger("tornado.access")
    saved_disabled = tornado_access.disabled
    try:
        configure_logging(
            Settings(**{**vars(settings), "log_format": "json", "log_level": "INFO"})
        )
        installed = list(root.handlers)
        level = root.level
        disabled = tornado_access.disabled
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        tornado_access.disabled = saved_disabled

    assert len(installed) == 1
    assert isinstance(installed[0].formatter, JsonFormatter)
    assert any(isinstance(item, RequestIdFilter) for item in installed[0].filters)
    assert level == logging.INFO
    assert disabled


@pytest.mark.parametrize(
    "uri,masked",
    [
        ("mongodb://app:s3cret@db:27017/ots", "mongodb://app:***@db:27017/ots"),
        ("mongodb://app:p%40ss@h1:27017,h2:27017/ots", "mongodb://app:***@h1:27017,h2:27017/ots"),
        ("mongodb+srv://app:pw@cluster.example/ots", "mongodb+srv://app:***@cluster.example/ots"),
        ("mongodb://db:27017/ots?authSource=admin", "mongodb://db:27017/ots?authSource=admin"),
        ("mongodb://app@db/ots", "mongodb://app@db/ots"),
        (
            "mongodb://db/ots?tls=true&tlsCertificateKeyFilePassword=hunter22",
            "mongodb://db/ots?tls=true&tlsCertificateKeyFilePassword=***",
        ),
        ("mongodb://[::1/ots", "<unparsable URI>"),
    ],
)
def test_mask_uri_hides_passwords(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


def test_describe_settings_is_one_masked_line() -> None:
    settings = Settings(
        mongo_uri="mongodb://app:do-not-log-me@db:27017/ots",
        mongo_database="ots\nsecond-line",
        metrics_port=9100,
    )

    description = describe_settings(settings)

    assert "\n" not in description
    assert "do-not-log-me" not in description
    assert "mongo_uri=mongodb://app:***@db:27017/ots" in description
    assert "database=ots\\nsecond-line" in description
    assert "scrypt_n=131072" in description
    assert "log_format=text" in description
    assert "metrics_port=9100" in description
