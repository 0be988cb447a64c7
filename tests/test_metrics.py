"""Prometheus metrics: the exposition parses, counters move, labels stay harmless."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ots.app import make_metrics_app, services_of
from ots.metrics import Metrics
from tests.conftest import Api, problem

PASSPHRASE = "metrics test passphrase"
UNKNOWN_KEY = "B" * 43


def parse(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


async def scrape(api: Api) -> list[Sample]:
    response = await api.request("GET", "/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return parse(response.body.decode("utf-8"))


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Return the value of the sample with exactly these labels, or 0 if it is absent."""
    for sample in samples:
        if sample.name == name and sample.labels == labels:
            return sample.value
    return 0.0


@pytest.mark.gen_test
async def test_exposition_lists_every_metric(api: Api) -> None:
    names = {sample.name for sample in await scrape(api)}

    assert {
        "ots_secrets_created_total",
        "ots_secrets_read_total",
        "ots_wrong_passphrases_total",
        "ots_secrets_destroyed_total",
        "ots_kdf_admitted",
        "ots_kdf_capacity",
        "ots_kdf_rejected_total",
    } <= names


@pytest.mark.gen_test
async def test_request_counter_and_histogram_move(api: Api) -> None:
    labels = {"method": "POST", "route": "/generate", "status": "201"}
    before = await scrape(api)

    await api.create("counted secret", PASSPHRASE)
    after = await scrape(api)

    assert value(after, "ots_http_requests_total", **labels) == (
        value(before, "ots_http_requests_total", **labels) + 1
    )
    histogram = {"route": "/generate", "status": "201"}
    assert value(after, "ots_http_request_duration_seconds_count", **histogram) == (
        value(before, "ots_http_request_duration_seconds_count", **histogram) + 1
    )


@pytest.mark.gen_test
async def test_secret_counters_move(api: Api) -> None:
    key = await api.create("secret counter secret", PASSPHRASE)
    wrong = await api.read(key, "wrong metrics passphrase")
    read = await api.read(key, PASSPHRASE)

    samples = await scrape(api)

    assert wrong.code == 403
    assert read.code == 200
    assert value(samples, "ots_secrets_created_total") == 1
    assert value(samples, "ots_wrong_passphrases_total") == 1
    assert value(samples, "ots_secrets_read_total") == 1
    assert value(samples, "ots_secrets_destroyed_total") == 0


@pytest.mark.gen_test
@pytest.mark.settings(max_passphrase_attempts=2)
async def test_attempt_limit_counts_destroyed_secret(api: Api) -> None:
    key = await api.create("destroyed counter secret", PASSPHRASE)
    first = await api.read(key, "wrong metrics passphrase")
    last = await api.read(key, "wrong metrics passphrase")

    samples = await scrape(api)

    assert json.loads(last.body)["attempts_left"] == 0
    assert first.code == last.code == 403
    assert value(samples, "ots_wrong_passphrases_total") == 2
    assert value(samples, "ots_secrets_destroyed_total") == 1


@pytest.mark.gen_test
async def test_kdf_pool_state_is_exported(api: Api, app: tornado.web.Application) -> None:
    pool = services_of(app).kdf_pool

    samples = await scrape(api)

    assert value(samples, "ots_kdf_capacity") == pool.capacity
    assert value(samples, "ots_kdf_admitted") == 0
    assert value(samples, "ots_kdf_rejected_total") == pool.rejected


@pytest.mark.gen_test
async def test_unknown_route_is_labelled_dash(api: Api) -> None:
    await api.request("GET", "/no/such/route")

    samples = await scrape(api)

    labels = {"method": "GET", "route": "-", "status": "404"}
    assert value(samples, "ots_http_requests_total", **labels) == 1


@pytest.mark.gen_test
async def test_unknown_method_is_labelled_other(api: Api) -> None:
    await api.request("BREW", "/generate")

    samples = await scrape(api)

    methods = {sample.labels.get("method") for sample in samples}
    assert "BREW" not in methods
    assert "OTHER" in methods


@pytest.mark.gen_test
async def test_labels_never_carry_keys_or_addresses(api: Api) -> None:
    key = await api.create("label check secret", PASSPHRASE)
    await api.read(key, "wrong metrics passphrase")
    await api.read(key, PASSPHRASE)
    await api.read(UNKNOWN_KEY, PASSPHRASE)
    await api.request("GET", f"/secrets/{key}")

    samples = await scrape(api)

    label_values = [text for sample in samples for text in sample.labels.values()]
    assert label_values
    for text in label_values:
        assert key not in text
        assert UNKNOWN_KEY not in text
        assert "127.0.0.1" not in text
        assert "localhost" not in text
    routes = {sample.labels["route"] for sample in samples if "route" in sample.labels}
    assert "/secrets/{key}" in routes


@pytest.mark.gen_test
async def test_purge_and_rate_limit_counters_are_exported(
    api: Api, app: tornado.web.Application
) -> None:
    metrics = services_of(app).metrics
    metrics.purged.labels(kind="records").inc(3)
    metrics.rate_limited.labels(route="/generate").inc()

    samples = await scrape(api)

    assert value(samples, "ots_purged_total", kind="records") == 3
    assert value(samples, "ots_rate_limited_total", route="/generate") == 1


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()

    first.secrets_created.inc()

    assert value(parse(first.exposition().decode()), "ots_secrets_created_total") == 1
    assert value(parse(second.exposition().decode()), "ots_secrets_created_total") == 0


@pytest.mark.gen_test
@pytest.mark.settings(metrics_enabled=False)
async def test_metrics_off_is_404(api: Api) -> None:
    response = await api.request("GET", "/metrics")

    assert response.code == 404
    assert problem(response)["type"] == "/problems/not-found"


@pytest.fixture
def metrics_port() -> Iterator[tuple[socket.socket, int]]:
    """A bound loopback socket for the separate metrics listener."""
    sock, port = tornado.testing.bind_unused_port()
    yield sock, port
    sock.close()


@pytest.mark.gen_test
@pytest.mark.settings(metrics_port=9)
async def test_separate_port_serves_metrics(
    api: Api,
    app: tornado.web.Application,
    http_client: tornado.httpclient.AsyncHTTPClient,
    metrics_port: tuple[socket.socket, int],
) -> None:
    sock, port = metrics_port
    server = tornado.httpserver.HTTPServer(make_metrics_app(app))
    server.add_sockets([sock])
    base = f"http://127.0.0.1:{port}"
    try:
        await api.create("separate port secret", PASSPHRASE)
        on_main = await api.request("GET", "/metrics")
        scraped = await http_client.fetch(f"{base}/metrics", raise_error=False)
        other = await http_client.fetch(f"{base}/generate", raise_error=False)
    finally:
        server.stop()

    assert on_main.code == 404
    assert scraped.code == 200
    assert scraped.headers["Content-Type"] == CONTENT_TYPE_LATEST
    samples = parse(scraped.body.decode("utf-8"))
    assert value(samples, "ots_secrets_created_total") == 1
    assert other.code == 404
