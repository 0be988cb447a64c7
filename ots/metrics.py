"""Prometheus metrics of one application, kept in a registry of its own.

Each application gets its own `CollectorRegistry` instead of prometheus-client's
global one, so tests can build many applications in one process.

Label values come from a closed set: route patterns (`/secrets/{key}`, never
the raw path), status codes, HTTP method names and purge kinds. No label
carries a secret key, a record id or a client address.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ots.workers import KdfPool

# Tornado accepts only these methods; anything else is counted as OTHER, so a
# client cannot create label values at will.
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Seconds; from a fast 404 up to a key derivation under load.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and histograms of one application, and its registry.

    Other modules increment the attributes directly, for example
    `metrics.purged.labels(kind="records").inc(count)` or
    `metrics.rate_limited.labels(route=handler.route).inc()`.
    """

    def __init__(self) -> None:
        # auto_describe makes register() reject a collector whose names clash.
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ots_http_requests",
            "HTTP requests handled, by method, route pattern and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "ots_http_request_duration_seconds",
            "Time from the start of a request to its last byte, by route pattern and status.",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.secrets_created = Counter(
            "ots_secrets_created", "Secrets stored.", registry=self.registry
        )
        self.secrets_read = Counter(
            "ots_secrets_read", "Secrets sent to a reader and deleted.", registry=self.registry
        )
        self.wrong_passphrases = Counter(
            "ots_wrong_passphrases",
            "Read attempts with a wrong passphrase, the destroying one included.",
            registry=self.registry,
        )
        self.secrets_destroyed = Counter(
            "ots_secrets_destroyed",
            "Secrets deleted after the last allowed wrong passphrase.",
            registry=self.registry,
        )
        self.purged = Counter(
            "ots_purged",
            "Expired or orphaned items deleted by the purge job, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "ots_rate_limited",
            "Requests rejected with 429 by the rate limiter, by route pattern.",
            ["route"],
            registry=self.registry,
        )

    def watch_kdf_pool(self, pool: KdfPool) -> None:
        """Export the admission state of `pool` on every scrape."""
        self.registry.register(_KdfPoolCollector(pool))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and record its duration."""
        method = method if method in KNOWN_METHODS else "OTHER"
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.request_duration.labels(route=route, status=str(status)).observe(seconds)

    def exposition(self) -> bytes:
        """Render every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class _KdfPoolCollector:
    """Reads the pool's counters at scrape time, so the pool needs no metrics code."""

    def __init__(self, pool: KdfPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ots_kdf_admitted",
            "Key derivations running or waiting in the pool.",
            value=self.pool.admitted,
        )
        yield GaugeMetricFamily(
            "ots_kdf_capacity",
            "Key derivations the pool admits at once: workers plus queue places.",
            value=self.pool.capacity,
        )
        yield CounterMetricFamily(
            "ots_kdf_rejected",
            "Requests answered 503 because the key derivation queue was full.",
            value=self.pool.rejected,
        )
