"""Per-client, per-endpoint rate limits, counted in MongoDB so every replica enforces one limit.

A handler opts in by listing `RateLimitMixin` before its base class. The
mixin counts the request in `prepare()`, before the body is read, parsed or
handed to scrypt, so rejected and malformed requests (400, 405, 413, 415,
422, 429) use the budget too. An endpoint is a route pattern:
`/secrets/{key}` is one endpoint whatever the key.

Window: fixed windows of one minute, one counter document per client,
endpoint and window, bumped by a single atomic `findAndModify` (upsert and
`$inc`). One round trip gives an exact count that all replicas share, with
no read-modify-write race. The cost is the edge burst: a client can send up
to twice the limit in a short span that straddles the end of a window. A
sliding-window estimate would need the previous window's count as a second
read on every request, and it only estimates. Here the burst is bounded
anyway, because scrypt runs behind the bounded KDF admission queue (503 when
full) and each secret allows only `MAX_PASSPHRASE_ATTEMPTS` guesses. Each
bucket's windows start at a second derived from its hash, so throttled
clients do not all retry at the same second of the minute. Windows follow
each replica's clock: replicas whose clocks differ by a few seconds disagree
on where a window ends, which moves a few requests into the neighbouring
window.

Bucket key: SHA-256 of the route pattern and the client address, so the
database stores no address in clear. This is pseudonymisation, not
anonymity: someone holding a dump can hash all 2^32 IPv4 addresses and
match them. The documents expire one window after their window ends (TTL
index on `expires_at`). IPv6 clients are counted per /64 prefix, the block
that one host or home network usually gets, so rotating addresses inside it
does not buy a fresh budget.

Failures: the counter call runs under a short deadline
(`COUNTER_DEADLINE_SECONDS`, at most `MONGO_TIMEOUT_MS`), so a slow or
unreachable database adds about that much to a request instead of the full
database timeout. When the call fails the request proceeds without a
limit and without RateLimit headers, and a warning is logged at most once
per `FAILURE_LOG_INTERVAL_SECONDS`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import pymongo
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError
from tornado.httputil import HTTPServerRequest

from ots.base import ApiHandler
from ots.errors import RateLimited
from ots.settings import Network, Settings

log = logging.getLogger("ots.ratelimit")

RATE_LIMITS: Final = "rate_limits"
WINDOW_SECONDS: Final = 60
# An estimate: a healthy MongoDB nearby completes an upsert by _id in a few
# milliseconds. A quarter of a second leaves room for load spikes, and an
# outage costs each request that much instead of MONGO_TIMEOUT_MS (5 s by default).
COUNTER_DEADLINE_SECONDS: Final = 0.25
FAILURE_LOG_INTERVAL_SECONDS: Final = 60.0
IPV6_CLIENT_PREFIX: Final = 64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True)
class Quota:
    """One client's budget on one endpoint, right after a request was counted."""

    limit: int
    count: int
    reset_seconds: int

    @property
    def exceeded(self) -> bool:
        """Whether the counted request is over the limit and must get 429."""
        return self.count > self.limit

    @property
    def remaining(self) -> int:
        """Requests the client may still send in this window."""
        return max(0, self.limit - self.count)

    def headers(self) -> dict[str, str]:
        """Build the RateLimit header fields of draft-ietf-httpapi-ratelimit-headers (-00 to -06).

        Later drafts merged the three fields into one `RateLimit` field;
        these three separate ones are what clients and proxies commonly read.
        `RateLimit-Reset` is delta-seconds until the window ends.
        """
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class RateLimiter:
    """Request counters per client and endpoint, kept in the `rate_limits` collection.

    `rejections` counts the requests that got 429, and `failures` the
    counter calls that failed, for the metrics.
    """

    def __init__(
        self,
        database: AsyncDatabase[dict[str, Any]],
        limit: int,
        *,
        clock: Callable[[], datetime.datetime],
        deadline_seconds: float = COUNTER_DEADLINE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = database[RATE_LIMITS]
        self.limit = limit
        self.deadline_seconds = deadline_seconds
        self.rejections = 0
        self.failures = 0
        self._clock = clock
        self._monotonic = monotonic
        self._next_failure_log = -math.inf
        self._unlogged_failures = 0

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        database: AsyncDatabase[dict[str, Any]],
        clock: Callable[[], datetime.datetime],
    ) -> RateLimiter:
        """Build the limiter that `RATE_LIMIT_PER_MINUTE` and `MONGO_TIMEOUT_MS` describe."""
        deadline = min(COUNTER_DEADLINE_SECONDS, settings.mongo_timeout_ms / 1000)
        return cls(
            database, settings.rate_limit_per_minute, clock=clock, deadline_seconds=deadline
        )

    @property
    def enabled(self) -> bool:
        """Whether requests are limited at all; a limit of 0 disables it."""
        return self.limit > 0

    async def count(self, route: str, client: str) -> Quota | None:
        """Count one request of `client` on `route` and return the budget that is left.

        Returns:
            The quota after this request, or None when limiting is disabled
            or the counter store failed. A driver error (`PyMongoError`) is
            logged and not raised.

        """
        if not self.enabled:
            return None
        digest = hashlib.sha256(f"{route}\n{client}".encode()).digest()
        # The bucket's own phase spreads window ends over the minute.
        phase = int.from_bytes(digest[16:18], "big") % WINDOW_SECONDS
        now = self._clock().timestamp()
        window = math.floor((now - phase) / WINDOW_SECONDS)
        window_end = window * WINDOW_SECONDS + phase + WINDOW_SECONDS
        document_id = f"{digest[:16].hex()}:{window}"
        # One spare window keeps the document while a replica with a
        # slightly slow clock may still count into it.
        expires_at = datetime.datetime.fromtimestamp(window_end + WINDOW_SECONDS, datetime.UTC)

        try:
            with pymongo.timeout(self.deadline_seconds):
                count = await self._increment(document_id, expires_at)
        except PyMongoError as error:
            self._report_failure(error)
            return None
        self._report_recovery()

        quota = Quota(self.limit, count, reset_seconds=max(1, math.ceil(window_end - now)))
        if quota.exceeded:
            self.rejections += 1
        return quota

    async def _increment(self, document_id: str, expires_at: datetime.datetime) -> int:
        """Add one to a window's counter, creating it if needed; return the new count."""
        try:
            document = await self._upsert(document_id, expires_at)
        except DuplicateKeyError:
            # Two first requests of a window can race to insert the document.
            # The one that lost finds the document on its retry and updates it.
            document = await self._upsert(document_id, expires_at)
        if document is None:
            raise RuntimeError("findAndModify with upsert returned no document")
        count: int = document["count"]
        return count

    async def _upsert(
        self, document_id: str, expires_at: datetime.datetime
    ) -> dict[str, Any] | None:
        return await self.collection.find_one_and_update(
            {"_id": document_id},
            {"$inc": {"count": 1}, "$setOnInsert": {"expires_at": expires_at}},
            projection={"count": True},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )

    def _report_failure(self, error: PyMongoError) -> None:
        """Log a counter failure, at most once per interval, with the count of unlogged ones."""
        self.failures += 1
        now = self._monotonic()
        if now < self._next_failure_log:
            self._unlogged_failures += 1
            return
        log.warning(
            "rate limit counter failed (%s), so requests pass without a limit until the "
            "database responds; %d failures since the last warning were not logged",
            type(error).__name__,
            self._unlogged_failures,
        )
        self._next_failure_log = now + FAILURE_LOG_INTERVAL_SECONDS
        self._unlogged_failures = 0

    def _report_recovery(self) -> None:
        if self._next_failure_log == -math.inf:
            return
        log.info("rate limit counter works again, so requests are limited again")
        self._next_failure_log = -math.inf
        self._unlogged_failures = 0


async def ensure_rate_limit_indexes(database: AsyncDatabase[dict[str, Any]]) -> None:
    """Create the TTL index that removes counters of past windows.

    Raises:
        PyMongoError: the database failed or timed out, and the caller should retry.

    """
    await database[RATE_LIMITS].create_index("expires_at", expireAfterSeconds=0)


def client_address(
    request: HTTPServerRequest, trusted_proxies: Sequence[Network]
) -> IPAddress | None:
    """Return the address of the client that sent `request`.

    That is the TCP peer, unless the peer is a trusted proxy. Then it is the
    right-most address in `X-Forwarded-For` that is not a trusted proxy
    (every hop to its right was appended by a proxy we trust, and everything
    to its left was written by the client), or else `X-Real-IP`. A header
    with an invalid address is ignored. Returns None when the peer is not
    an IP address (a Unix socket).

    `X-Forwarded-For` is read first, so a proxy that sets only `X-Real-IP`
    must remove the client's `X-Forwarded-For`, or the client chooses its
    own address.
    """
    peer = parse_address(request.remote_ip or "")
    if peer is None or not _is_trusted(peer, trusted_proxies):
        return peer
    forwarded = _forwarded_client(request.headers.get_list("X-Forwarded-For"), trusted_proxies)
    if forwarded is not None:
        return forwarded
    real_ip = parse_address(request.headers.get("X-Real-IP", ""))
    return real_ip or peer


def client_bucket(address: IPAddress | None) -> str:
    """Return the string that identifies a client's budget: the IPv4 address or IPv6 /64."""
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        prefix = ipaddress.IPv6Network((int(address) >> 64 << 64, IPV6_CLIENT_PREFIX))
        return str(prefix)
    return str(address)


def parse_address(text: str) -> IPAddress | None:
    """Parse an IP address, mapping `::ffff:a.b.c.d` to IPv4; None if it is not one."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: IPAddress, trusted_proxies: Sequence[Network]) -> bool:
    return any(address in network for network in trusted_proxies)


def _forwarded_client(values: list[str], trusted_proxies: Sequence[Network]) -> IPAddress | None:
    """Return the right-most untrusted hop, or None if a hop before it is invalid."""
    hops = [hop.strip() for value in values for hop in value.split(",") if hop.strip()]
    if not hops:
        return None
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return None
        if not _is_trusted(address, trusted_proxies):
            return address
    # Every hop is a trusted proxy: the request started inside the proxies,
    # and the left-most hop is where.
    return parse_address(hops[0])


class RateLimitMixin(ApiHandler):
    """Limit a route per client: list it first, as in `class H(RateLimitMixin, JsonBodyHandler)`.

    The request is counted before the base class's `prepare()` checks the
    headers, so nothing expensive runs for a client over its limit.

    NOTE: Tornado rejects a method outside `SUPPORTED_METHODS` (such as
    PROPFIND) with 405 before `prepare()`, so such a request is not counted
    and its response has no RateLimit fields.
    """

    # A class attribute, because `set_default_headers` runs in the
    # constructor, before `prepare()` has counted the request.
    quota: Quota | None = None

    def set_default_headers(self) -> None:
        """Add the RateLimit fields, also after `send_error` has cleared the headers."""
        super().set_default_headers()
        self._set_quota_headers()

    async def prepare(self) -> None:
        """Count the request, reject it with 429 over the limit, then run the base checks.

        Raises:
            RateLimited: the client has used its budget for this window.

        """
        limiter = self.services.rate_limiter
        if limiter is not None and limiter.enabled:
            address = client_address(self.request, self.services.settings.trusted_proxies)
            self.quota = await limiter.count(self.route, client_bucket(address))
            self._set_quota_headers()
            if self.quota is not None and self.quota.exceeded:
                self.services.metrics.rate_limited.labels(route=self.route).inc()
                raise RateLimited(self.quota.reset_seconds)
        base_prepare = super().prepare()
        if base_prepare is not None:
            await base_prepare

    def _set_quota_headers(self) -> None:
        if self.quota is None:
            return
        for name, value in self.quota.headers().items():
            self.set_header(name, value)
