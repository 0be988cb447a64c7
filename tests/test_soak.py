"""Soak: a bounded mixed workload against `python -m ots`, watching its memory and descriptors.

Runs only when `OTS_SOAK_SECONDS` is set (`tox -e reliability` sets 30, the
full run 300). The service runs as a child process, as an operator runs it,
in front of the suite's MongoDB. Its scrypt N comes from `OTS_SOAK_SCRYPT_N`:
by default 2^14, the lowest the service accepts, and in the full run 2^17,
the production default.

The load runs at the KDF pool's ceiling: `SOAK_CLIENTS` clients, as many as
the pool admits (workers plus queue), send requests back to back, so the pool
stays full without overflowing. They store small and GridFS-sized secrets,
read with the right and wrong passphrases, and send bad requests. Every
response must have the expected status, and none may be a 5xx.

Once a second the test samples the service's resident memory and open file
descriptors from /proc, so the soak runs on Linux only. The maximum of the
last quarter of the run may exceed the maximum of the first quarter
(warm-up) by at most 10%.

Afterwards every secret still stored is read, the purge runs, and the
database must be empty. The database dump taken before the reads and the
service's log go to the session's secrecy sweep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
import tornado.httpclient
import tornado.simple_httpclient

from ots.purge import STREAM_GRACE, UPLOAD_GRACE, Purger
from ots.store import BUCKET, SECRETS, SecretStore, make_client
from tests.conftest import RECORDER, FakeClock, add_to_sweep, make_settings, report
from tests.live import ServiceProcess, drop_database, dump_database

SOAK_SECONDS: Final = float(os.environ.get("OTS_SOAK_SECONDS", "0"))
SOAK_SCRYPT_N: Final = int(os.environ.get("OTS_SOAK_SCRYPT_N", str(2**14)))
KDF_WORKERS: Final = 2
KDF_QUEUE_SIZE: Final = 8
SOAK_CLIENTS: Final = KDF_WORKERS + KDF_QUEUE_SIZE
INLINE_SECRET_BYTES: Final = 16 * 1024
MAX_ATTEMPTS: Final = 100
SAMPLE_SECONDS: Final = 1.0
WARM_UP_SHARE: Final = 0.25
ALLOWED_GROWTH: Final = 1.10
REQUEST_TIMEOUT_SECONDS: Final = 60.0
COLLECTIONS: Final = (SECRETS, f"{BUCKET}.files", f"{BUCKET}.chunks")

pytestmark = [
    pytest.mark.skipif(
        not SOAK_SECONDS, reason="the soak runs when OTS_SOAK_SECONDS is set (tox -e reliability)"
    ),
    pytest.mark.skipif(sys.platform != "linux", reason="the soak samples /proc"),
]

# Bad requests, each with the status it must get: (method, path, content type, body, status).
# `{key}` stands for the key of a stored secret.
BAD_REQUESTS: Final = (
    ("POST", "/generate", "application/json", b"{not json", 400),
    ("POST", "/generate", "application/json", b"", 400),
    ("POST", "/generate", "text/plain", b'{"secret": "s", "passphrase": "p"}', 415),
    (
        "POST",
        "/generate",
        "application/json",
        b'{"secret": "s", "passphrase": "p", "tll": 60}',
        422,
    ),
    (
        "POST",
        "/generate",
        "application/json",
        b'{"secret": "s", "passphrase": "p", "ttl": 1}',
        422,
    ),
    ("POST", "/secrets/{key}", "application/json", b'{"passphrase": 5}', 422),
    ("POST", "/secrets/{key}", "application/json", b"[]", 400),
    ("GET", "/secrets/{key}", None, None, 405),
    ("POST", "/secrets/not-a-key", "application/json", b'{"passphrase": "soak"}', 404),
)


@dataclasses.dataclass
class Stored:
    """A secret the workload stored and has not read yet."""

    key: str
    secret: str
    passphrase: str
    wrong_guesses: int = 0


@dataclasses.dataclass
class Workload:
    """What the clients share: the unread secrets, the statuses seen, and the failures."""

    base_url: str
    client: tornado.httpclient.AsyncHTTPClient
    rng: random.Random
    unread: list[Stored] = dataclasses.field(default_factory=list)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    requests: int = 0

    async def send(
        self, method: str, path: str, body: bytes | None, content_type: str | None
    ) -> tornado.httpclient.HTTPResponse:
        """Send one request and count its status."""
        headers = {"Content-Type": content_type} if content_type else {}
        response = await self.client.fetch(
            self.base_url + path,
            method=method,
            body=body,
            headers=headers,
            raise_error=False,
            allow_nonstandard_methods=True,
            request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
        self.requests += 1
        self.statuses[response.code] += 1
        return response

    def expect(self, label: str, response: tornado.httpclient.HTTPResponse, status: int) -> bool:
        """Record a failure unless `response` has `status`; return whether it has."""
        if response.code == status:
            return True
        self.failures.append(f"{label}: expected {status}, got {response.code}")
        return False

    async def store(self) -> None:
        """Store a small or a GridFS-sized secret under a fresh passphrase."""
        size = self.rng.choice((40, 2000, INLINE_SECRET_BYTES + 5000))
        secret = secrets.token_urlsafe(size)[:size]
        passphrase = secrets.token_urlsafe(12)
        RECORDER.add(secret)
        RECORDER.add(passphrase)
        body = json.dumps({"secret": secret, "passphrase": passphrase, "ttl": 3600}).encode()
        response = await self.send("POST", "/generate", body, "application/json")
        if self.expect("store", response, 201):
            key = json.loads(response.body)["secret_key"]
            RECORDER.add(key)
            self.unread.append(Stored(key, secret, passphrase))

    async def read(self) -> None:
        """Read a stored secret with its passphrase; it must come back exactly."""
        if not self.unread:
            return
        stored = self.unread.pop(self.rng.randrange(len(self.unread)))
        response = await self.read_with(stored, stored.passphrase)
        if self.expect("read", response, 200) and json.loads(response.body) != {
            "secret": stored.secret
        }:
            self.failures.append("read: the body is not the stored secret")

    async def guess_wrong(self) -> None:
        """Read a stored secret with a wrong passphrase; the secret must stay."""
        candidates = [item for item in self.unread if item.wrong_guesses < MAX_ATTEMPTS - 1]
        if not candidates:
            return
        stored = self.rng.choice(candidates)
        stored.wrong_guesses += 1
        response = await self.read_with(stored, "wrong " + stored.passphrase)
        self.expect("wrong passphrase", response, 403)

    async def send_bad_request(self) -> None:
        """Send one of `BAD_REQUESTS`."""
        method, path, content_type, body, status = self.rng.choice(BAD_REQUESTS)
        if "{key}" in path:
            if not self.unread:
                return
            path = path.replace("{key}", self.rng.choice(self.unread).key)
        response = await self.send(method, path, body, content_type)
        self.expect(f"{method} {path.split('/')[1]} bad request", response, status)

    async def read_with(self, stored: Stored, passphrase: str) -> tornado.httpclient.HTTPResponse:
        """POST /secrets/{key} with a passphrase."""
        body = json.dumps({"passphrase": passphrase}).encode()
        return await self.send("POST", f"/secrets/{stored.key}", body, "application/json")

    async def run_client(self, deadline: float) -> None:
        """Send requests back to back until `deadline`: 40% stores, 30% reads, 15% each else."""
        actions = (self.store, self.read, self.guess_wrong, self.send_bad_request)
        while time.monotonic() < deadline:
            action = self.rng.choices(actions, weights=(40, 30, 15, 15))[0]
            await action()


@dataclasses.dataclass(frozen=True)
class Sample:
    """Resource use of the service at one moment."""

    seconds: float
    rss_bytes: int
    open_fds: int


def resource_use(pid: int) -> tuple[int, int]:
    """Return the resident memory in bytes and the open file descriptors of process `pid`.

    Reads Linux's /proc: `VmRSS` of /proc/PID/status and the entries of /proc/PID/fd.
    """
    proc = Path("/proc") / str(pid)
    rss_bytes = 0
    for line in (proc / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_bytes = int(line.split()[1]) * 1024
    return rss_bytes, len(list((proc / "fd").iterdir()))


async def sample_resources(pid: int, deadline: float, samples: list[Sample]) -> None:
    """Append a `Sample` of process `pid` every `SAMPLE_SECONDS` until `deadline`."""
    start = time.monotonic()
    while time.monotonic() < deadline:
        rss_bytes, open_fds = resource_use(pid)
        samples.append(Sample(time.monotonic() - start, rss_bytes, open_fds))
        await asyncio.sleep(SAMPLE_SECONDS)


async def run_workload(
    base_url: str, pid: int, samples: list[Sample], between: Callable[[], None]
) -> Workload:
    """Run the clients and the sampler for `SOAK_SECONDS`, call `between`, then read the rest.

    Every secret still stored at the end is read, so that nothing is left
    once the purge runs.
    """
    client = tornado.simple_httpclient.SimpleAsyncHTTPClient(
        force_instance=True, max_clients=SOAK_CLIENTS
    )
    workload = Workload(base_url, client, random.Random(secrets.randbits(64)))
    deadline = time.monotonic() + SOAK_SECONDS
    try:
        await asyncio.gather(
            sample_resources(pid, deadline, samples),
            *(workload.run_client(deadline) for _ in range(SOAK_CLIENTS)),
        )
        between()
        while workload.unread:
            await workload.read()
    finally:
        client.close()
    return workload


async def purge_and_count(mongo_uri: str, database: str) -> dict[str, int]:
    """Run the purge as far in the future as it takes to delete orphans; count what remains."""
    settings = make_settings(mongo_uri, database)
    client = make_client(settings)
    try:
        store = SecretStore(client[database])
        clock = FakeClock()
        purger = Purger(store, clock)
        for grace in (UPLOAD_GRACE, STREAM_GRACE):
            clock.advance((grace + datetime.timedelta(minutes=1)).total_seconds())
            await purger.run_once()
        assert purger.failures == 0
        return {name: await store.database[name].count_documents({}) for name in COLLECTIONS}
    finally:
        await client.close()


def window_max(
    samples: list[Sample], start: float, end: float, measure: Callable[[Sample], int]
) -> int:
    """Return the maximum of `measure` over the samples taken between `start` and `end` seconds."""
    values = [measure(sample) for sample in samples if start <= sample.seconds <= end]
    assert values, f"no samples between {start:.0f} s and {end:.0f} s"
    return max(values)


def describe_curve(samples: list[Sample]) -> list[str]:
    """Return about ten lines of the memory and descriptor curve."""
    step = max(1, len(samples) // 10)
    return [
        f"  {sample.seconds:6.1f} s: RSS {sample.rss_bytes / 2**20:6.1f} MiB, "
        f"{sample.open_fds} fds"
        for sample in samples[::step]
    ]


@pytest.fixture
def soak_database(mongo_uri: str) -> Iterator[str]:
    """A database of the soak's own, dropped afterwards."""
    name = f"ots_soak_{secrets.token_hex(6)}"
    yield name
    drop_database(mongo_uri, name)


def test_soak_stays_flat_and_leaves_nothing(
    mongo_uri: str, soak_database: str, tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    environment = {
        "MONGO_URI": mongo_uri,
        "MONGO_DATABASE": soak_database,
        "SCRYPT_N": str(SOAK_SCRYPT_N),
        "KDF_WORKERS": str(KDF_WORKERS),
        "KDF_QUEUE_SIZE": str(KDF_QUEUE_SIZE),
        "RATE_LIMIT_PER_MINUTE": "0",
        "INLINE_SECRET_BYTES": str(INLINE_SECRET_BYTES),
        "MAX_PASSPHRASE_ATTEMPTS": str(MAX_ATTEMPTS),
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
    }
    samples: list[Sample] = []
    log_path = tmp_path / "service.log"

    def sweep_database() -> None:
        add_to_sweep("database dump", dump_database(mongo_uri, soak_database))

    with ServiceProcess(environment, log_path) as service:
        workload = asyncio.run(
            run_workload(service.base_url, service.pid, samples, sweep_database)
        )
    log = log_path.read_bytes()
    add_to_sweep("service log", log)
    left = asyncio.run(purge_and_count(mongo_uri, soak_database))

    warm_up_end = SOAK_SECONDS * WARM_UP_SHARE
    last_start = SOAK_SECONDS * (1 - WARM_UP_SHARE)
    rss_warm = window_max(samples, 0, warm_up_end, lambda sample: sample.rss_bytes)
    rss_last = window_max(samples, last_start, SOAK_SECONDS, lambda sample: sample.rss_bytes)
    fds_warm = window_max(samples, 0, warm_up_end, lambda sample: sample.open_fds)
    fds_last = window_max(samples, last_start, SOAK_SECONDS, lambda sample: sample.open_fds)
    report(
        pytestconfig,
        f"soak: {SOAK_SECONDS:.0f} s, scrypt N={SOAK_SCRYPT_N}, {SOAK_CLIENTS} clients, "
        f"{workload.requests} requests, statuses {dict(sorted(workload.statuses.items()))}",
        f"  RSS max {rss_warm / 2**20:.1f} MiB in warm-up, {rss_last / 2**20:.1f} MiB at the end; "
        f"fds max {fds_warm} in warm-up, {fds_last} at the end",
        *describe_curve(samples),
    )
    assert workload.failures == []
    assert not [status for status in workload.statuses if status >= 500]
    assert service.exit_code == 0
    assert b" ERROR " not in log
    assert left == dict.fromkeys(COLLECTIONS, 0)
    assert rss_last <= rss_warm * ALLOWED_GROWTH
    assert fds_last <= math.ceil(fds_warm * ALLOWED_GROWTH)
