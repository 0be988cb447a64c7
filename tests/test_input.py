"""Strict input: every malformed request gets its status, a problem body, and stores nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ots.store import SecretStore
from tests.conftest import Api, problem

PASSPHRASE = "input test passphrase"
VALID = {"secret": "input test secret", "passphrase": PASSPHRASE}


async def stored_count(store: SecretStore) -> int:
    """Count records and GridFS files, which must stay at zero after a rejection."""
    records = await store.secrets.count_documents({})
    files = await store.database["payloads.files"].count_documents({})
    chunks = await store.database["payloads.chunks"].count_documents({})
    return int(records + files + chunks)


BAD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not json": b"secret=abc&passphrase=def",
    "truncated": b'{"secret": "abc", "passphrase": ',
    "invalid utf-8": b'{"secret": "\xff\xfe", "passphrase": "abcdef"}',
    "utf-8 bom": b'\xef\xbb\xbf{"secret": "abc", "passphrase": "abcdef"}',
    "duplicate member": b'{"secret": "a", "secret": "b", "passphrase": "abcdef"}',
    "nan": b'{"secret": "abc", "passphrase": "abcdef", "ttl": NaN}',
    "infinity": b'{"secret": "abc", "passphrase": "abcdef", "ttl": Infinity}',
    "deep nesting": b'{"secret": ' + b"[" * 100 + b"]" * 100 + b', "passphrase": "abcdef"}',
    "very deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "array top level": b'["secret", "passphrase"]',
    "string top level": b'"secret"',
    "null top level": b"null",
    "trailing garbage": b'{"secret": "abc", "passphrase": "abcdef"} {}',
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(BAD_BODIES))
async def test_malformed_body_is_400(api: Api, store: SecretStore, name: str) -> None:
    response = await api.request("POST", "/generate", raw=BAD_BODIES[name])

    assert response.code == 400
    assert problem(response)["type"] == "/problems/invalid-body"
    assert response.headers["Cache-Control"] == "no-store"
    assert await stored_count(store) == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("name", ["empty", "not json", "duplicate member", "array top level"])
async def test_malformed_read_body_is_400(api: Api, name: str) -> None:
    key = await api.create("malformed read body", PASSPHRASE)

    response = await api.request("POST", f"/secrets/{key}", raw=BAD_BODIES[name])
    after = await api.read(key, PASSPHRASE)

    assert response.code == 400
    assert after.code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_non_json_content_type_is_415(
    api: Api, store: SecretStore, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    if content_type is None:
        # Tornado's client adds no Content-Type for raw bodies when none is set.
        headers = {"Content-Type": ""}
    response = await api.request("POST", "/generate", VALID, headers=headers)

    assert response.code == 415
    assert problem(response)["type"] == "/problems/unsupported-media-type"
    assert await stored_count(store) == 0


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", 'application/json; charset="UTF-8"'],
)
async def test_json_content_type_variants_accepted(api: Api, content_type: str) -> None:
    response = await api.request(
        "POST", "/generate", VALID, headers={"Content-Type": content_type}
    )

    assert response.code == 201


@pytest.mark.gen_test
async def test_wrong_content_type_uses_no_attempt(api: Api) -> None:
    key = await api.create("content type on read", PASSPHRASE)

    for _ in range(6):
        response = await api.request(
            "POST", f"/secrets/{key}", {"passphrase": "x"}, headers={"Content-Type": "text/plain"}
        )
        assert response.code == 415
    after = await api.read(key, PASSPHRASE)

    assert after.code == 200


VALIDATION_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "missing secret": ({"passphrase": PASSPHRASE}, "secret"),
    "missing passphrase": ({"secret": "abc"}, "passphrase"),
    "empty secret": ({"secret": "", "passphrase": PASSPHRASE}, "secret"),
    "empty passphrase": ({"secret": "abc", "passphrase": ""}, "passphrase"),
    "spaces-only passphrase": ({"secret": "abc", "passphrase": "   "}, "passphrase"),
    "no-break-space passphrase": ({"secret": "abc", "passphrase": "\u00a0\u3000"}, "passphrase"),
    "control character": ({"secret": "abc", "passphrase": "pass\x07word"}, "passphrase"),
    "newline in passphrase": ({"secret": "abc", "passphrase": "pass\nword"}, "passphrase"),
    "long passphrase": ({"secret": "abc", "passphrase": "p" * 1025}, "passphrase"),
    "numeric secret": ({"secret": 12345, "passphrase": PASSPHRASE}, "secret"),
    "null secret": ({"secret": None, "passphrase": PASSPHRASE}, "secret"),
    "object secret": ({"secret": {"a": 1}, "passphrase": PASSPHRASE}, "secret"),
    "list passphrase": ({"secret": "abc", "passphrase": ["a"]}, "passphrase"),
    "string ttl": ({**VALID, "ttl": "3600"}, "ttl"),
    "float ttl": ({**VALID, "ttl": 3600.0}, "ttl"),
    "fractional ttl": ({**VALID, "ttl": 3600.5}, "ttl"),
    "boolean ttl": ({**VALID, "ttl": True}, "ttl"),
    "null ttl": ({**VALID, "ttl": None}, "ttl"),
    "ttl too short": ({**VALID, "ttl": 59}, "ttl"),
    "ttl too long": ({**VALID, "ttl": 30 * 24 * 3600 + 1}, "ttl"),
    "negative ttl": ({**VALID, "ttl": -60}, "ttl"),
    "misspelt ttl": ({**VALID, "tll": 3600}, "tll"),
    "unknown field": ({**VALID, "burn_after": True}, "burn_after"),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(VALIDATION_CASES))
async def test_invalid_field_is_422(api: Api, store: SecretStore, name: str) -> None:
    body, field = VALIDATION_CASES[name]

    response = await api.request("POST", "/generate", body)

    assert response.code == 422
    details = problem(response)
    assert details["type"] == "/problems/validation-failed"
    assert list(details["errors"]) == [field]
    assert all(isinstance(message, str) for message in details["errors"][field])
    assert await stored_count(store) == 0


@pytest.mark.gen_test
async def test_validation_messages_never_quote_input(api: Api) -> None:
    marker = "QUOTE ME IF YOU DARE"
    body = {"secret": marker * 2, "passphrase": marker + "\x01", "ttl": marker, marker: marker}

    response = await api.request("POST", "/generate", body)

    assert response.code == 422
    assert b"QUOTE ME" not in response.body
    assert set(problem(response)["errors"]) == {"passphrase", "ttl", "(unknown field name)"}


@pytest.mark.gen_test
async def test_lone_surrogate_secret_is_rejected(api: Api, store: SecretStore) -> None:
    response = await api.request(
        "POST", "/generate", raw=b'{"secret": "\\ud800", "passphrase": "abcdefgh"}'
    )

    assert response.code == 422
    assert list(problem(response)["errors"]) == ["secret"]
    assert await stored_count(store) == 0


@pytest.mark.gen_test
async def test_read_validation_uses_no_attempt(api: Api) -> None:
    key = await api.create("validation on read", PASSPHRASE)

    for body in ({}, {"passphrase": ""}, {"passphrase": 5}, {"passphrase": "x", "extra": 1}):
        response = await api.request("POST", f"/secrets/{key}", body)
        assert response.code == 422
    after = await api.read(key, PASSPHRASE)

    assert after.code == 200


@pytest.mark.gen_test
@pytest.mark.settings(max_secret_bytes=1000, inline_secret_bytes=1000)
async def test_secret_over_limit_is_413(api: Api, store: SecretStore) -> None:
    # 500 Cyrillic letters are 1000 bytes of UTF-8: exactly at the limit.
    at_limit = await api.generate("я" * 500, PASSPHRASE)
    over_limit = await api.generate("я" * 500 + "x", PASSPHRASE)

    assert at_limit.code == 201
    assert over_limit.code == 413
    assert problem(over_limit)["type"] == "/problems/payload-too-large"
    assert await store.secrets.count_documents({}) == 1


@pytest.mark.gen_test
@pytest.mark.settings(max_secret_bytes=1000, inline_secret_bytes=1000)
async def test_body_over_limit_is_413_before_buffering(api: Api, store: SecretStore) -> None:
    # The /generate limit is 2 * 1000 + 64 KiB; Content-Length alone decides.
    body = json.dumps({"secret": "x" * 200_000, "passphrase": PASSPHRASE}).encode()

    response = await api.request("POST", "/generate", raw=body)

    assert response.code == 413
    assert problem(response)["type"] == "/problems/payload-too-large"
    assert response.headers["Cache-Control"] == "no-store"
    assert await stored_count(store) == 0


@pytest.mark.gen_test
@pytest.mark.settings(max_secret_bytes=1000, inline_secret_bytes=1000)
async def test_chunked_body_over_limit_is_413(api: Api, store: SecretStore) -> None:
    chunk = b"x" * 16384

    async def producer(write: Any) -> None:
        await write(b'{"secret": "')
        for _ in range(20):
            await write(chunk)
        await write(b'", "passphrase": "abcdefgh"}')

    response = await api.client.fetch(
        api.base_url + "/generate",
        method="POST",
        body_producer=producer,
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        raise_error=False,
    )

    assert response.code == 413
    assert await stored_count(store) == 0


@pytest.mark.gen_test
async def test_read_body_over_limit_is_413(api: Api) -> None:
    key = await api.create("large read body", PASSPHRASE)

    response = await api.request("POST", f"/secrets/{key}", {"passphrase": "p" * 100_000})
    after = await api.read(key, PASSPHRASE)

    assert response.code == 413
    assert after.code == 200
