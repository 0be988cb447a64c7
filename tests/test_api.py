"""The HTTP contract: store, read once, wrong passphrases, status codes and headers."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest

from tests.conftest import Api, FakeClock, problem

PASSPHRASE = "correct horse battery staple"

ROUND_TRIP_SECRETS = {
    "ascii": "postgres://admin:hunter2@db.internal/prod",
    "cyrillic": "Пароль от сервера: щука-ёж-2026",
    "emoji": "🔐🗝️ key ring 👩‍💻",
    "cjk": "秘密のメッセージ：漢字とかな",
    "newlines": "line one\nline two\r\nline three\n",
    "nul": "before\x00after\x00",
    "quotes": 'she said "hi" \\ and left',
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(ROUND_TRIP_SECRETS))
async def test_round_trip_is_exact(api: Api, name: str) -> None:
    secret = ROUND_TRIP_SECRETS[name]
    key = await api.create(secret, PASSPHRASE)

    response = await api.read(key, PASSPHRASE)

    assert response.code == 200
    assert json.loads(response.body) == {"secret": secret}
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.gen_test
async def test_generate_response_shape(api: Api, clock: FakeClock) -> None:
    response = await api.generate("shape check secret", PASSPHRASE, ttl=3600)

    assert response.code == 201
    body = json.loads(response.body)
    assert set(body) == {"secret_key", "expires_at", "ttl"}
    assert body["ttl"] == 3600
    assert response.headers["Location"] == f"/secrets/{body['secret_key']}"
    assert response.headers["Cache-Control"] == "no-store"
    assert len(body["secret_key"]) == 43
    expires_at = datetime.datetime.fromisoformat(body["expires_at"])
    expected = clock.now.replace(microsecond=0) + datetime.timedelta(seconds=3600)
    assert expires_at == expected
    assert body["expires_at"].endswith("Z")


@pytest.mark.gen_test
async def test_generate_never_echoes_input(api: Api) -> None:
    response = await api.generate("echo check secret", "echo check passphrase")

    assert b"echo check" not in response.body


@pytest.mark.gen_test
async def test_default_ttl_applies(api: Api) -> None:
    response = await api.generate("default ttl secret", PASSPHRASE)

    assert json.loads(response.body)["ttl"] == 7 * 24 * 3600


@pytest.mark.gen_test
async def test_second_read_is_404(api: Api) -> None:
    key = await api.create("read me once", PASSPHRASE)
    first = await api.read(key, PASSPHRASE)

    second = await api.read(key, PASSPHRASE)

    assert first.code == 200
    assert second.code == 404
    assert problem(second)["type"] == "/problems/not-found"
    assert second.headers["Cache-Control"] == "no-store"


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "key",
    [
        "A" * 43,  # well-formed, never issued
        "short",
        "A" * 44,
        "!" * 43,
        "A" * 42 + "B",  # non-canonical base64: the last character carries spare bits
        "%F0%9F%94%90" + "A" * 31,
    ],
)
async def test_unknown_or_malformed_key_is_404(api: Api, key: str) -> None:
    response = await api.read(key, PASSPHRASE)

    assert response.code == 404
    assert problem(response)["type"] == "/problems/not-found"


@pytest.mark.gen_test
async def test_not_found_bodies_are_identical(api: Api) -> None:
    key = await api.create("identical 404 bodies", PASSPHRASE)
    await api.read(key, PASSPHRASE)

    consumed = await api.read(key, PASSPHRASE)
    never_issued = await api.read("A" * 43, PASSPHRASE)
    malformed = await api.read("nope", PASSPHRASE)

    assert consumed.body == never_issued.body
    assert consumed.body == malformed.body


@pytest.mark.gen_test
async def test_wrong_passphrase_keeps_secret(api: Api) -> None:
    key = await api.create("guarded by a passphrase", PASSPHRASE)

    wrong = await api.read(key, "not the passphrase")
    right = await api.read(key, PASSPHRASE)

    assert wrong.code == 403
    body = problem(wrong)
    assert body["type"] == "/problems/wrong-passphrase"
    assert body["attempts_left"] == 4
    assert wrong.headers["Cache-Control"] == "no-store"
    assert right.code == 200
    assert json.loads(right.body)["secret"] == "guarded by a passphrase"


@pytest.mark.gen_test
async def test_attempts_exhausted_destroys_secret(api: Api) -> None:
    key = await api.create("five strikes", PASSPHRASE)

    answers = [await api.read(key, f"wrong guess {n}") for n in range(5)]
    after = await api.read(key, PASSPHRASE)

    assert [a.code for a in answers] == [403] * 5
    assert [problem(a)["attempts_left"] for a in answers] == [4, 3, 2, 1, 0]
    assert after.code == 404


@pytest.mark.gen_test
@pytest.mark.settings(max_passphrase_attempts=2)
async def test_attempt_budget_follows_settings(api: Api) -> None:
    key = await api.create("two strikes", PASSPHRASE)

    first = await api.read(key, "wrong one")
    second = await api.read(key, "wrong two")
    after = await api.read(key, PASSPHRASE)

    assert problem(first)["attempts_left"] == 1
    assert problem(second)["attempts_left"] == 0
    assert after.code == 404


@pytest.mark.gen_test
async def test_passphrase_is_normalized_not_trimmed(api: Api) -> None:
    # "é" composed (NFC) versus "e" + combining acute (NFD); a no-break space
    # maps to U+0020 under RFC 8265 OpaqueString.
    key = await api.create("normalized passphrase", "caf\u00e9\u00a0au lait ")

    trimmed = await api.read(key, "café au lait")
    decomposed = await api.read(key, "cafe\u0301 au lait ")

    assert trimmed.code == 403
    assert decomposed.code == 200


@pytest.mark.gen_test
async def test_passphrase_is_case_sensitive(api: Api) -> None:
    key = await api.create("case sensitive passphrase", "Secret-Phrase")

    response = await api.read(key, "secret-phrase")

    assert response.code == 403


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(max_passphrase_attempts=20)
async def test_concurrent_reads_yield_one_200(api: Api) -> None:
    key = await api.create("only one reader wins", PASSPHRASE)

    responses = await asyncio.gather(*(api.read(key, PASSPHRASE) for _ in range(20)))

    codes = sorted(r.code for r in responses)
    assert codes == [200] + [404] * 19


@pytest.mark.gen_test(timeout=60)
async def test_parallel_wrong_guesses_respect_budget(api: Api) -> None:
    key = await api.create("parallel guessing", PASSPHRASE)

    responses = await asyncio.gather(*(api.read(key, f"guess {n}") for n in range(15)))

    codes = [r.code for r in responses]
    assert codes.count(403) == 5
    assert codes.count(404) == 10
    left = sorted(problem(r)["attempts_left"] for r in responses if r.code == 403)
    assert left == [0, 1, 2, 3, 4]
    assert (await api.read(key, PASSPHRASE)).code == 404


@pytest.mark.gen_test
async def test_expired_secret_is_404_before_cleanup(api: Api, clock: FakeClock) -> None:
    key = await api.create("short lived", PASSPHRASE, ttl=60)

    clock.advance(61)
    response = await api.read(key, PASSPHRASE)

    assert response.code == 404


@pytest.mark.gen_test
async def test_secret_readable_until_expiry(api: Api, clock: FakeClock) -> None:
    key = await api.create("still alive", PASSPHRASE, ttl=60)

    clock.advance(59)
    response = await api.read(key, PASSPHRASE)

    assert response.code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_leave_secret_readable(api: Api, method: str) -> None:
    key = await api.create("not consumed by a link preview", PASSPHRASE)

    response = await api.request(method, f"/secrets/{key}")
    after = await api.read(key, PASSPHRASE)

    assert response.code == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["Cache-Control"] == "no-store"
    if method != "HEAD":
        assert problem(response)["type"] == "/problems/method-not-allowed"
    assert after.code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_generate_rejects_other_methods(api: Api, method: str) -> None:
    response = await api.request(method, "/generate")

    assert response.code == 405
    assert response.headers["Allow"] == "POST"


@pytest.mark.gen_test
async def test_unknown_route_is_404_problem(api: Api) -> None:
    response = await api.request("POST", "/secrets", {"passphrase": PASSPHRASE})

    assert response.code == 404
    assert problem(response)["type"] == "/problems/not-found"


@pytest.mark.gen_test
async def test_healthz_needs_no_database(api: Api) -> None:
    response = await api.request("GET", "/healthz")

    assert response.code == 200
    assert json.loads(response.body) == {"status": "ok"}


@pytest.mark.gen_test
async def test_readyz_pings_database(api: Api) -> None:
    response = await api.request("GET", "/readyz")

    assert response.code == 200


@pytest.mark.gen_test
async def test_problem_type_uri_resolves(api: Api) -> None:
    response = await api.request("GET", "/problems/wrong-passphrase")

    body: dict[str, Any] = json.loads(response.body)
    assert response.code == 200
    assert body["status"] == 403
    assert body["type"] == "/problems/wrong-passphrase"


@pytest.mark.gen_test
async def test_unknown_problem_type_is_404(api: Api) -> None:
    response = await api.request("GET", "/problems/no-such-problem")

    assert response.code == 404
