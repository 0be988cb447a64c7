"""Rate limits per client and endpoint: 429, RateLimit headers, proxies, replicas, failures.

Tests that prove request limit+1 gets 429 use `RATE_LIMIT_PER_MINUTE` from
the environment when it is set to a positive value, and `DEFAULT_LIMIT`
otherwise. The acceptance scenario uses the limit of 5 that it describes.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.ioloop
import tornado.testing
import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from ots.app import make_app, services_of
from ots.ratelimit import (
    RATE_LIMITS,
    Quota,
    client_address,
    client_bucket,
    ensure_rate_limit_indexes,
)
from ots.settings import Settings
from ots.store import SecretStore
from tests.conftest import Api, FakeClock, Recorder, problem
from tests.mongo_server import MongoTestServer

DEFAULT_LIMIT = 3


def configured_limit() -> int:
    """Return `RATE_LIMIT_PER_MINUTE` from the environment, or `DEFAULT_LIMIT` if unset or 0."""
    name = "RATE_LIMIT_PER_MINUTE"
    if name not in os.environ:
        return DEFAULT_LIMIT
    limit = Settings.from_env({name: os.environ[name]}).rate_limit_per_minute
    return limit or DEFAULT_LIMIT


LIMIT = configured_limit()
PASSPHRASE = "rate limit test passphrase"
OTHER_CLIENT = "127.0.0.2"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
# The service rejects this with 415 before reading the body: the cheapest request that counts.
CHEAP_HEADERS = {"Content-Type": "text/plain"}

limited = pytest.mark.settings(rate_limit_per_minute=LIMIT)


async def spend(
    api: Api, path: str, count: int, headers: dict[str, str] | None = None
) -> list[tornado.httpclient.HTTPResponse]:
    """Send `count` cheap requests that use the budget of `path`; return the responses."""
    responses = []
    for _ in range(count):
        all_headers = {**CHEAP_HEADERS, **(headers or {})}
        responses.append(await api.request("POST", path, raw=b"{}", headers=all_headers))
    return responses


async def send_from(
    http_client: tornado.httpclient.AsyncHTTPClient,
    url: str,
    body: dict[str, Any],
    source: str,
) -> tornado.httpclient.HTTPResponse:
    """POST a JSON body from the loopback address `source`."""
    request = tornado.httpclient.HTTPRequest(
        url,
        method="POST",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
        network_interface=source,
        request_timeout=60,
    )
    return await http_client.fetch(request, raise_error=False)


def loopback_url(http_port: int, path: str) -> str:
    """Build a URL on 127.0.0.1, so a client bound to another loopback address reaches it."""
    return f"http://127.0.0.1:{http_port}{path}"


def assert_quota_headers(response: tornado.httpclient.HTTPResponse, remaining: int) -> None:
    """Check the three RateLimit fields of a response on a limited route."""
    assert response.headers["RateLimit-Limit"] == str(LIMIT)
    assert response.headers["RateLimit-Remaining"] == str(remaining)
    assert 1 <= int(response.headers["RateLimit-Reset"]) <= 60


def assert_limited(response: tornado.httpclient.HTTPResponse) -> None:
    """Check that a response is a 429 problem with its headers."""
    assert response.code == 429, response.body
    body = problem(response)
    assert body["type"] == "/problems/rate-limited"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["Retry-After"] == response.headers["RateLimit-Reset"]


# -- over the limit --------------------------------------------------------


@limited
@pytest.mark.gen_test
async def test_request_over_limit_is_429(api: Api, app: tornado.web.Application) -> None:
    allowed = await spend(api, "/generate", LIMIT)

    rejected = (await spend(api, "/generate", 1))[0]

    assert [response.code for response in allowed] == [415] * LIMIT
    assert_limited(rejected)
    assert rejected.headers["RateLimit-Limit"] == str(LIMIT)
    assert 1 <= int(rejected.headers["Retry-After"]) <= 60
    limiter = services_of(app).rate_limiter
    assert limiter is not None
    assert limiter.rejections == 1


@limited
@pytest.mark.gen_test
async def test_remaining_counts_down(api: Api) -> None:
    responses = await spend(api, "/generate", LIMIT)

    for index, response in enumerate(responses):
        assert_quota_headers(response, LIMIT - 1 - index)


@pytest.mark.settings(rate_limit_per_minute=5)
@pytest.mark.gen_test
async def test_sixth_generate_is_429_for_that_client_only(
    api: Api,
    http_client: tornado.httpclient.AsyncHTTPClient,
    http_port: int,
    recorder: Recorder,
) -> None:
    keys = [await api.create(f"acceptance secret {index}", PASSPHRASE) for index in range(5)]

    sixth = await api.generate("acceptance secret 5", PASSPHRASE)
    recorder.add("acceptance secret from elsewhere")
    other = await send_from(
        http_client,
        loopback_url(http_port, "/generate"),
        {"secret": "acceptance secret from elsewhere", "passphrase": PASSPHRASE},
        OTHER_CLIENT,
    )
    if other.code == 201:
        recorder.add(json.loads(other.body)["secret_key"])
    reads = [await api.read(key, PASSPHRASE) for key in keys]

    assert sixth.code == 429
    assert problem(sixth)["type"] == "/problems/rate-limited"
    assert 1 <= int(sixth.headers["Retry-After"]) <= 60
    assert sixth.headers["RateLimit-Limit"] == "5"
    assert sixth.headers["RateLimit-Remaining"] == "0"
    assert sixth.headers["RateLimit-Reset"] == sixth.headers["Retry-After"]
    assert other.code == 201
    assert other.headers["RateLimit-Remaining"] == "4"
    assert [response.code for response in reads] == [200] * 5
    assert [json.loads(response.body)["secret"] for response in reads] == [
        f"acceptance secret {index}" for index in range(5)
    ]


# -- headers on every response of a limited route --------------------------


def _chunked(size: int) -> Any:
    async def produce(write: Any) -> None:
        for _ in range(size // 4096):
            await write(b"x" * 4096)

    return produce


HEADER_CASES: dict[str, dict[str, Any]] = {
    "created": {
        "method": "POST",
        "path": "/generate",
        "body": b'{"secret": "header case secret", "passphrase": "header case passphrase"}',
        "status": 201,
    },
    "invalid json": {"method": "POST", "path": "/generate", "body": b"{", "status": 400},
    "wrong media type": {
        "method": "POST",
        "path": "/generate",
        "body": b"{}",
        "headers": CHEAP_HEADERS,
        "status": 415,
    },
    "validation failed": {
        "method": "POST",
        "path": "/generate",
        "body": b'{"secret": "", "passphrase": ""}',
        "status": 422,
    },
    "get": {"method": "GET", "path": "/generate", "status": 405},
    "head": {"method": "HEAD", "path": "/secrets/some-key", "status": 405},
    "delete": {"method": "DELETE", "path": "/secrets/some-key", "status": 405},
    "not found": {
        "method": "POST",
        "path": "/secrets/no-such-key",
        "body": b'{"passphrase": "header case passphrase"}',
        "status": 404,
    },
    "declared too large": {
        "method": "POST",
        "path": "/secrets/some-key",
        "body": b"x" * (65 * 1024),
        "status": 413,
    },
    "streamed too large": {
        "method": "POST",
        "path": "/secrets/some-key",
        "producer": 80 * 1024,
        "status": 413,
    },
}


@limited
@pytest.mark.gen_test
@pytest.mark.parametrize("case", sorted(HEADER_CASES))
async def test_limited_route_response_has_headers(
    http_client: tornado.httpclient.AsyncHTTPClient,
    base_url: str,
    recorder: Recorder,
    case: str,
) -> None:
    spec = HEADER_CASES[case]
    recorder.add("header case secret")
    recorder.add("header case passphrase")
    request = tornado.httpclient.HTTPRequest(
        base_url + spec["path"],
        method=spec["method"],
        body=spec.get("body"),
        body_producer=_chunked(spec["producer"]) if "producer" in spec else None,
        headers={"Content-Type": "application/json", **spec.get("headers", {})},
        allow_nonstandard_methods=True,
        request_timeout=60,
    )

    response = await http_client.fetch(request, raise_error=False)

    if response.code == 201:
        recorder.add(json.loads(response.body)["secret_key"])
    assert response.code == spec["status"]
    assert_quota_headers(response, LIMIT - 1)
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.settings(rate_limit_per_minute=max(LIMIT, 3))
@pytest.mark.gen_test
async def test_read_responses_have_headers(api: Api) -> None:
    key = await api.create("read header secret", PASSPHRASE)

    wrong = await api.read(key, "not the passphrase")
    right = await api.read(key, PASSPHRASE)

    assert wrong.code == 403
    assert right.code == 200
    assert wrong.headers["RateLimit-Remaining"] == str(max(LIMIT, 3) - 1)
    assert right.headers["RateLimit-Remaining"] == str(max(LIMIT, 3) - 2)


# -- what shares a budget and what does not --------------------------------


@limited
@pytest.mark.gen_test
async def test_endpoints_have_separate_budgets(api: Api) -> None:
    key = await api.create("endpoint budget secret", PASSPHRASE)
    await spend(api, "/generate", LIMIT - 1)

    generate = await api.generate("one secret too many", PASSPHRASE)
    read = await api.read(key, PASSPHRASE)

    assert_limited(generate)
    assert read.code == 200
    assert read.headers["RateLimit-Remaining"] == str(LIMIT - 1)


@limited
@pytest.mark.gen_test
async def test_secret_keys_share_one_budget(api: Api) -> None:
    await spend(api, "/secrets/first-key", LIMIT)

    response = (await spend(api, "/secrets/another-key", 1))[0]

    assert_limited(response)


@limited
@pytest.mark.gen_test
async def test_clients_have_separate_budgets(
    api: Api, http_client: tornado.httpclient.AsyncHTTPClient, http_port: int
) -> None:
    await spend(api, "/generate", LIMIT)

    same = (await spend(api, "/generate", 1))[0]
    other = await send_from(
        http_client, loopback_url(http_port, "/generate"), {"ttl": "x"}, OTHER_CLIENT
    )

    assert_limited(same)
    assert other.code == 422
    assert_quota_headers(other, LIMIT - 1)


@limited
@pytest.mark.gen_test
async def test_forwarded_headers_ignored_from_untrusted_peer(api: Api) -> None:
    await spend(api, "/generate", LIMIT)

    responses = [
        (
            await spend(
                api,
                "/generate",
                1,
                {"X-Forwarded-For": f"198.51.100.{index}", "X-Real-IP": f"203.0.113.{index}"},
            )
        )[0]
        for index in range(10)
    ]

    for response in responses:
        assert_limited(response)


@pytest.mark.settings(rate_limit_per_minute=LIMIT, trusted_proxies=LOOPBACK)
@pytest.mark.gen_test
async def test_forwarded_for_honoured_from_trusted_proxy(api: Api) -> None:
    await spend(api, "/generate", LIMIT, {"X-Forwarded-For": "203.0.113.7"})

    same = await spend(api, "/generate", 1, {"X-Forwarded-For": "203.0.113.7"})
    spoofed_left = await spend(
        api, "/generate", 1, {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 127.0.0.5"}
    )
    other = await spend(api, "/generate", 1, {"X-Forwarded-For": "203.0.113.8"})
    other_right_most = await spend(
        api, "/generate", 1, {"X-Forwarded-For": "203.0.113.7, 198.51.100.2"}
    )

    assert_limited(same[0])
    assert_limited(spoofed_left[0])
    assert other[0].code == 415
    assert_quota_headers(other[0], LIMIT - 1)
    assert other_right_most[0].code == 415
    assert_quota_headers(other_right_most[0], LIMIT - 1)


@pytest.mark.settings(rate_limit_per_minute=LIMIT, trusted_proxies=LOOPBACK)
@pytest.mark.gen_test
async def test_ipv6_clients_share_a_slash_64(api: Api) -> None:
    await spend(api, "/generate", LIMIT, {"X-Forwarded-For": "2001:db8:0:1::1"})

    same_prefix = await spend(api, "/generate", 1, {"X-Forwarded-For": "2001:db8:0:1::2"})
    other_prefix = await spend(api, "/generate", 1, {"X-Forwarded-For": "2001:db8:0:2::1"})

    assert_limited(same_prefix[0])
    assert other_prefix[0].code == 415


@limited
@pytest.mark.gen_test
async def test_malformed_requests_count(api: Api) -> None:
    kinds: list[tuple[str, bytes | None, dict[str, str]]] = [
        ("POST", b"{}", CHEAP_HEADERS),
        ("POST", b"not json", {}),
        ("POST", b'{"secret": 1}', {}),
        ("GET", None, {}),
    ]
    statuses = []
    for index in range(LIMIT):
        method, raw, headers = kinds[index % len(kinds)]
        response = await api.request(method, "/generate", raw=raw, headers=headers)
        statuses.append(response.code)

    valid = await api.generate("valid but too late", PASSPHRASE)

    assert 429 not in statuses
    assert_limited(valid)


@limited
@pytest.mark.gen_test
async def test_probes_and_problem_pages_are_not_limited(api: Api) -> None:
    responses = []
    for _ in range(LIMIT + 2):
        responses.append(await api.request("GET", "/healthz"))
        responses.append(await api.request("GET", "/readyz"))
        responses.append(await api.request("GET", "/problems/rate-limited"))

    assert {response.code for response in responses} == {200}
    for response in responses:
        assert "RateLimit-Limit" not in response.headers


@pytest.mark.settings(rate_limit_per_minute=0)
@pytest.mark.gen_test
async def test_zero_disables_limit(api: Api, store: SecretStore) -> None:
    responses = await spend(api, "/generate", max(LIMIT, DEFAULT_LIMIT) + 2)

    assert {response.code for response in responses} == {415}
    for response in responses:
        for name in RATE_LIMIT_HEADERS:
            assert name not in response.headers
    assert await store.database[RATE_LIMITS].count_documents({}) == 0


# -- replicas and windows --------------------------------------------------


@pytest.fixture
def second_replica(
    io_loop: tornado.ioloop.IOLoop, settings: Settings, store: SecretStore, clock: FakeClock
) -> Iterator[str]:
    """Serve a second app on the same database, as another replica would; yield its URL."""
    application = make_app(settings, store, clock=clock)
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(application, xheaders=False)
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}"
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)
    services_of(application).kdf_pool.shutdown()


@limited
@pytest.mark.gen_test
async def test_replicas_share_one_budget(
    api: Api,
    http_client: tornado.httpclient.AsyncHTTPClient,
    second_replica: str,
) -> None:
    replica = Api(http_client, second_replica)
    responses = []
    for index in range(LIMIT):
        target = api if index % 2 == 0 else replica
        responses.extend(await spend(target, "/generate", 1))

    on_first = (await spend(api, "/generate", 1))[0]
    on_second = (await spend(replica, "/generate", 1))[0]

    assert [response.code for response in responses] == [415] * LIMIT
    assert responses[-1].headers["RateLimit-Remaining"] == "0"
    assert_limited(on_first)
    assert_limited(on_second)


@limited
@pytest.mark.gen_test
async def test_budget_returns_when_window_ends(api: Api, clock: FakeClock) -> None:
    clock.now = clock.now.replace(microsecond=500_000)
    await spend(api, "/generate", LIMIT)
    rejected = (await spend(api, "/generate", 1))[0]
    retry_after = int(rejected.headers["Retry-After"])

    clock.advance(retry_after - 1)
    still_rejected = (await spend(api, "/generate", 1))[0]
    clock.advance(1)
    accepted = (await spend(api, "/generate", 1))[0]

    assert_limited(rejected)
    assert_limited(still_rejected)
    assert still_rejected.headers["Retry-After"] == "1"
    assert accepted.code == 415
    assert_quota_headers(accepted, LIMIT - 1)


@limited
@pytest.mark.gen_test
async def test_full_minute_restores_budget(api: Api, clock: FakeClock) -> None:
    await spend(api, "/generate", LIMIT + 1)

    clock.advance(60)
    responses = await spend(api, "/generate", LIMIT)

    assert [response.code for response in responses] == [415] * LIMIT


# -- counter store -----------------------------------------------------------


@limited
@pytest.mark.gen_test
async def test_counter_failure_lets_requests_through(
    api: Api, test_server: MongoTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    failing = LIMIT + 2
    test_server.fail_next("findAndModify", collection=RATE_LIMITS, count=failing)

    with caplog.at_level(logging.INFO, logger="ots.ratelimit"):
        responses = await spend(api, "/generate", failing)
        recovered = (await spend(api, "/generate", 1))[0]

    assert [response.code for response in responses] == [415] * failing
    for response in responses:
        assert "RateLimit-Limit" not in response.headers
    warnings = [
        r for r in caplog.records if r.name == "ots.ratelimit" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1
    assert "OperationFailure" in warnings[0].getMessage()
    assert recovered.code == 415
    assert_quota_headers(recovered, LIMIT - 1)
    assert any("works again" in r.getMessage() for r in caplog.records)


@limited
@pytest.mark.gen_test
async def test_hanging_counter_store_times_out(
    api: Api,
    app: tornado.web.Application,
    settings: Settings,
    test_server: MongoTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    test_server.fail_next("findAndModify", collection=RATE_LIMITS, mode="hang")

    with caplog.at_level(logging.WARNING, logger="ots.ratelimit"):
        response = (await spend(api, "/generate", 1))[0]

    assert response.code == 415
    messages = [r.getMessage() for r in caplog.records if r.name == "ots.ratelimit"]
    assert len(messages) == 1
    assert "Timeout" in messages[0]
    limiter = services_of(app).rate_limiter
    assert limiter is not None
    assert limiter.failures == 1
    assert limiter.deadline_seconds < settings.mongo_timeout_ms / 1000


@limited
@pytest.mark.gen_test
async def test_counters_hide_client_address(api: Api, store: SecretStore) -> None:
    await spend(api, "/generate", 1)

    documents = await store.database[RATE_LIMITS].find({}).to_list()

    assert len(documents) == 1
    assert set(documents[0]) == {"_id", "count", "expires_at"}
    assert "127.0.0.1" not in repr(documents[0])
    assert documents[0]["expires_at"] > datetime.datetime.now(datetime.UTC)


@pytest.mark.gen_test
async def test_ensure_indexes_creates_ttl_index(store: SecretStore) -> None:
    await ensure_rate_limit_indexes(store.database)

    indexes = await store.database[RATE_LIMITS].index_information()

    ttl = [spec for spec in indexes.values() if spec["key"] == [("expires_at", 1)]]
    assert len(ttl) == 1
    assert ttl[0]["expireAfterSeconds"] == 0


# -- client address and quota units -----------------------------------------


def _request(peer: str, headers: list[tuple[str, str]]) -> HTTPServerRequest:
    start_line = RequestStartLine("POST", "/generate", "HTTP/1.1")
    request = HTTPServerRequest(start_line=start_line, headers=HTTPHeaders(Host="ots.test"))
    for name, value in headers:
        request.headers.add(name, value)
    request.remote_ip = peer
    return request


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
ADDRESS_CASES = {
    "untrusted peer ignores headers": (
        "192.0.2.1",
        [("X-Forwarded-For", "198.51.100.1"), ("X-Real-IP", "198.51.100.2")],
        "192.0.2.1",
    ),
    "trusted peer, one hop": ("10.0.0.1", [("X-Forwarded-For", "198.51.100.1")], "198.51.100.1"),
    "trusted hops skipped": (
        "10.0.0.1",
        [("X-Forwarded-For", "198.51.100.1, 10.0.0.9, 10.0.0.8")],
        "198.51.100.1",
    ),
    "client-written hops ignored": (
        "10.0.0.1",
        [("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 198.51.100.1")],
        "198.51.100.1",
    ),
    "repeated header fields join": (
        "10.0.0.1",
        [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "198.51.100.1, 10.0.0.2")],
        "198.51.100.1",
    ),
    "invalid hop falls back to peer": (
        "10.0.0.1",
        [("X-Forwarded-For", "198.51.100.1, not-an-address")],
        "10.0.0.1",
    ),
    "invalid hop left of client is never read": (
        "10.0.0.1",
        [("X-Forwarded-For", "junk, 198.51.100.1")],
        "198.51.100.1",
    ),
    "only trusted hops: left-most": (
        "10.0.0.1",
        [("X-Forwarded-For", "10.0.0.7, 10.0.0.8")],
        "10.0.0.7",
    ),
    "x-real-ip without forwarded-for": (
        "10.0.0.1",
        [("X-Real-IP", "198.51.100.3")],
        "198.51.100.3",
    ),
    "invalid x-real-ip falls back to peer": ("10.0.0.1", [("X-Real-IP", "nope")], "10.0.0.1"),
    "empty forwarded-for falls back to peer": (
        "10.0.0.1",
        [("X-Forwarded-For", ",,")],
        "10.0.0.1",
    ),
    "ipv4-mapped peer": ("::ffff:192.0.2.5", [], "192.0.2.5"),
    "ipv6 trusted proxy": ("fd00::1", [("X-Forwarded-For", "2001:db8::5")], "2001:db8::5"),
}


@pytest.mark.parametrize("case", sorted(ADDRESS_CASES))
def test_client_address(case: str) -> None:
    peer, headers, expected = ADDRESS_CASES[case]

    address = client_address(_request(peer, headers), TRUSTED)

    assert address == ipaddress.ip_address(expected)


def test_unix_socket_peer_has_no_address() -> None:
    request = _request("", [("X-Forwarded-For", "198.51.100.1")])

    assert client_address(request, TRUSTED) is None
    assert client_bucket(None) == "unknown"


def test_client_bucket_groups_ipv6_by_slash_64() -> None:
    assert client_bucket(ipaddress.ip_address("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"
    assert client_bucket(ipaddress.ip_address("192.0.2.1")) == "192.0.2.1"


def test_quota_never_reports_negative_remaining() -> None:
    quota = Quota(limit=2, count=5, reset_seconds=7)

    assert quota.exceeded
    assert quota.headers() == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "7",
    }


def test_quota_at_limit_is_not_exceeded() -> None:
    quota = Quota(limit=2, count=2, reset_seconds=1)

    assert not quota.exceeded
    assert quota.remaining == 0
