"""Database faults, a full key-derivation queue, a busy event loop and the 500 path.

The database tests use the MongoDB test server's fault injection, so they are
skipped when the suite runs against a real MongoDB (`MONGO_URI`). A request
under a fault must get 503 with `Retry-After` within a few operation
deadlines. The tests bound the wait at `DEADLINE_FACTOR` deadlines, which
separates a response from a hang without asserting a latency.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, Final, TypeVar

import pytest
import tornado.httpclient
import tornado.web
from bson import ObjectId

from ots import crypto
from ots.app import services_of
from ots.settings import Settings
from ots.store import SecretStore
from ots.workers import KdfPool
from tests.conftest import Api, Recorder, problem
from tests.mongo_server import FaultMode, MongoTestServer

T = TypeVar("T")

PASSPHRASE: Final = "fault test passphrase"
WRONG_PASSPHRASE: Final = "not the fault test passphrase"
DEADLINE_FACTOR: Final = 4
SECRETS: Final = "secrets"
FILES: Final = "payloads.files"
CHUNKS: Final = "payloads.chunks"
GRIDFS_SIZE: Final = 2 * crypto.PLAIN_CHUNK_BYTES + 100
TRANSFER_FAILED: Final = 599  # Tornado's code for a connection closed before the response ended
# How long a test polls for a state it waits on, such as readiness.
POLL_BOUND_SECONDS: Final = 30.0


@pytest.fixture
def database(test_server: MongoTestServer, store: SecretStore) -> Iterator[MongoTestServer]:
    """The test server, brought back up and cleared of faults before the store wipes its data."""
    yield test_server
    test_server.set_down(False)
    test_server.reset_faults()


@pytest.fixture
def kdf_pool(app: tornado.web.Application) -> KdfPool:
    """The key-derivation pool of the app under test."""
    return services_of(app).kdf_pool


def deadline_bound(settings: Settings) -> float:
    """Return the longest a request under a database fault may take, in seconds."""
    return DEADLINE_FACTOR * settings.mongo_timeout_ms / 1000


async def within(seconds: float, call: Awaitable[T]) -> T:
    """Await `call`, failing the test if it takes longer than `seconds`."""
    return await asyncio.wait_for(call, timeout=seconds)


def make_secret(size: int, label: str) -> str:
    """Build an ASCII secret of exactly `size` bytes that starts with `label`."""
    head = f"{label}:"
    return head + "f" * (size - len(head))


def record_id_of(key: str) -> str:
    """Return the database id of the record behind a secret key."""
    raw = crypto.parse_secret_key(key)
    assert raw is not None
    return crypto.record_id(raw)


async def attempts_left(store: SecretStore, key: str) -> int:
    """Return the attempts a stored secret has left."""
    record = await store.secrets.find_one({"_id": record_id_of(key)})
    assert record is not None
    left: int = record["attempts_left"]
    return left


async def stored_counts(store: SecretStore) -> dict[str, int]:
    """Count the documents of the record collection and of the GridFS bucket."""
    return {
        name: await store.database[name].count_documents({}) for name in (SECRETS, FILES, CHUNKS)
    }


def assert_unavailable(response: tornado.httpclient.HTTPResponse) -> None:
    """Check for a 503 service-unavailable problem with a positive Retry-After."""
    assert response.code == 503
    assert problem(response)["type"] == "/problems/service-unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Cache-Control"] == "no-store"


def assert_served(response: tornado.httpclient.HTTPResponse, secret: str) -> None:
    """Check for a 200 whose body is exactly `secret`, without printing it on failure."""
    assert response.code == 200
    served = json.loads(response.body) == {"secret": secret}
    assert served


async def wait_until_ready(api: Api) -> None:
    """Poll `GET /readyz` until it returns 200, for at most `POLL_BOUND_SECONDS`."""
    deadline = asyncio.get_running_loop().time() + POLL_BOUND_SECONDS
    while (await api.request("GET", "/readyz")).code != 200:
        assert asyncio.get_running_loop().time() < deadline, "never ready again"
        await asyncio.sleep(0.1)


async def wait_for_admissions(pool: KdfPool, count: int) -> None:
    """Wait until `count` requests hold a place in the KDF pool."""
    deadline = asyncio.get_running_loop().time() + POLL_BOUND_SECONDS
    while pool.admitted < count:
        assert asyncio.get_running_loop().time() < deadline, "requests never reached the pool"
        await asyncio.sleep(0.005)


# -- database down and slow -------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_database_down_is_503_then_recovers(
    api: Api, store: SecretStore, database: MongoTestServer, settings: Settings
) -> None:
    secret = "written before the outage"
    key = await api.create(secret, PASSPHRASE)
    bound = deadline_bound(settings)
    database.set_down(True)

    generate = await within(bound, api.generate("written during the outage", PASSPHRASE))
    read = await within(bound, api.read(key, PASSPHRASE))
    ready = await within(bound, api.request("GET", "/readyz"))
    health = await within(bound, api.request("GET", "/healthz"))

    assert_unavailable(generate)
    assert_unavailable(read)
    assert ready.code == 503
    assert int(ready.headers["Retry-After"]) > 0
    assert health.code == 200
    database.set_down(False)
    await wait_until_ready(api)
    assert await attempts_left(store, key) == settings.max_passphrase_attempts
    assert_served(await api.read(key, PASSPHRASE), secret)
    assert (await api.generate("written after the outage", PASSPHRASE)).code == 201


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("payload", ["inline", "gridfs"])
async def test_slow_generate_leaves_nothing(
    api: Api, store: SecretStore, database: MongoTestServer, settings: Settings, payload: str
) -> None:
    size = 200 if payload == "inline" else GRIDFS_SIZE
    database.set_delay(3 * settings.mongo_timeout_ms / 1000)

    response = await within(
        deadline_bound(settings), api.generate(make_secret(size, "slow generate"), PASSPHRASE)
    )

    assert_unavailable(response)
    database.set_delay(0)
    assert await stored_counts(store) == {SECRETS: 0, FILES: 0, CHUNKS: 0}


@pytest.mark.gen_test(timeout=120)
async def test_slow_read_keeps_secret(
    api: Api, store: SecretStore, database: MongoTestServer, settings: Settings
) -> None:
    secret = make_secret(GRIDFS_SIZE, "slow read")
    key = await api.create(secret, PASSPHRASE)
    database.set_delay(3 * settings.mongo_timeout_ms / 1000)

    response = await within(deadline_bound(settings), api.read(key, PASSPHRASE))

    assert_unavailable(response)
    database.set_delay(0)
    assert await attempts_left(store, key) == settings.max_passphrase_attempts
    assert_served(await api.read(key, PASSPHRASE), secret)
    assert await stored_counts(store) == {SECRETS: 0, FILES: 0, CHUNKS: 0}


# -- faults on the attempt reservation and on the claim ------------------------------


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("mode", ["error", "drop"])
async def test_reservation_fault_uses_no_attempt(
    api: Api, store: SecretStore, database: MongoTestServer, settings: Settings, mode: FaultMode
) -> None:
    secret = "reservation fault"
    key = await api.create(secret, PASSPHRASE)
    # `count` spans requests: each read's reservation takes one planned failure.
    database.fail_next("findAndModify", collection=SECRETS, mode=mode, count=2)

    first = await api.read(key, PASSPHRASE)
    second = await api.read(key, WRONG_PASSPHRASE)

    assert_unavailable(first)
    assert_unavailable(second)
    assert await attempts_left(store, key) == settings.max_passphrase_attempts
    assert_served(await api.read(key, PASSPHRASE), secret)


class ClaimFaults:
    """Plans a failure of the claim by arming it right after the read reserves its attempt.

    Both steps are a `findAndModify` on `secrets`, so a failure planned
    before the read would hit the reservation; this one hits the claim.
    """

    def __init__(
        self, store: SecretStore, server: MongoTestServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.next_mode: FaultMode | None = None
        reserve = store.reserve_attempt

        async def reserve_then_arm(record_id: str, now: datetime.datetime) -> int | None:
            left = await reserve(record_id, now)
            mode, self.next_mode = self.next_mode, None
            if mode is not None:
                server.fail_next("findAndModify", collection=SECRETS, mode=mode)
            return left

        monkeypatch.setattr(store, "reserve_attempt", reserve_then_arm)


# Each sequence lists the fault that each read meets before the reads that
# follow succeed: "reserve" or "claim", failing with an error reply or a
# dropped connection.
FAULT_SEQUENCES: Final[dict[str, list[tuple[str, FaultMode]]]] = {
    "claim error": [("claim", "error")],
    "claim drop": [("claim", "drop")],
    "claim twice": [("claim", "error"), ("claim", "drop")],
    "reserve then claim": [("reserve", "error"), ("claim", "error")],
    "claim then reserve": [("claim", "drop"), ("reserve", "drop")],
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("payload", ["inline", "gridfs"])
@pytest.mark.parametrize("sequence", sorted(FAULT_SEQUENCES))
async def test_fault_sequence_never_serves_twice(
    api: Api,
    store: SecretStore,
    database: MongoTestServer,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    payload: str,
    sequence: str,
) -> None:
    size = 100 if payload == "inline" else GRIDFS_SIZE
    secret = make_secret(size, f"{payload} {sequence}")
    key = await api.create(secret, PASSPHRASE)
    claims = ClaimFaults(store, database, monkeypatch)
    faults = FAULT_SEQUENCES[sequence]

    codes = []
    for step, mode in faults:
        if step == "claim":
            claims.next_mode = mode
        else:
            database.fail_next("findAndModify", collection=SECRETS, mode=mode)
        response = await api.read(key, PASSPHRASE)
        assert_unavailable(response)
        codes.append(response.code)
    claim_faults = sum(1 for step, _ in faults if step == "claim")
    left_before_success = await attempts_left(store, key)
    success = await api.read(key, PASSPHRASE)
    afterwards = [(await api.read(key, PASSPHRASE)).code for _ in range(3)]

    assert codes == [503] * len(faults)
    assert left_before_success == settings.max_passphrase_attempts - claim_faults
    assert_served(success, secret)
    assert afterwards == [404, 404, 404]
    assert await stored_counts(store) == {SECRETS: 0, FILES: 0, CHUNKS: 0}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("mode", "count"), [("error", 1), ("hang", 1), ("drop", 10_000)])
async def test_fault_mid_stream_cuts_transfer(
    api: Api,
    store: SecretStore,
    database: MongoTestServer,
    monkeypatch: pytest.MonkeyPatch,
    mode: FaultMode,
    count: int,
) -> None:
    secret = make_secret(GRIDFS_SIZE, f"mid-stream {mode}")
    key = await api.create(secret, PASSPHRASE)
    read_chunk = store.read_chunk

    async def fail_from_second_chunk(file_id: ObjectId, index: int) -> bytes | None:
        # With timeoutMS set, PyMongo 4.20 retries a read after a dropped
        # connection until the deadline passes, so the drop is planned for
        # more reads than fit in it.
        if index == 1:
            database.fail_next("find", collection=CHUNKS, mode=mode, count=count)
        return await read_chunk(file_id, index)

    monkeypatch.setattr(store, "read_chunk", fail_from_second_chunk)

    try:
        response = await api.read(key, PASSPHRASE)
    except tornado.httpclient.HTTPClientError as error:
        code = error.code
    else:
        code = response.code

    assert code == TRANSFER_FAILED
    assert (await api.read(key, PASSPHRASE)).code == 404
    assert await stored_counts(store) == {SECRETS: 0, FILES: 0, CHUNKS: 0}


# -- the key-derivation queue -------------------------------------------------------


class GatedDerivations:
    """Makes every scrypt run wait for `release()`, so a test controls when the pool frees up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._gate = threading.Event()
        derive = crypto.derive_kek

        def gated_derive(
            passphrase: bytes, key: bytes, salt: bytes, params: crypto.KdfParams
        ) -> bytes:
            self._gate.wait(POLL_BOUND_SECONDS)
            return derive(passphrase, key, salt, params)

        monkeypatch.setattr(crypto, "derive_kek", gated_derive)

    def release(self) -> None:
        """Let every waiting and future derivation run."""
        self._gate.set()


@pytest.fixture
def gated_derivations(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedDerivations]:
    """Derivations held until the test releases them, or released when it ends."""
    gated = GatedDerivations(monkeypatch)
    yield gated
    gated.release()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(kdf_workers=1, kdf_queue_size=0, scrypt_n=2**14)
async def test_full_kdf_queue_rejects_at_once(
    api: Api, store: SecretStore, kdf_pool: KdfPool, gated_derivations: GatedDerivations
) -> None:
    admitted = asyncio.ensure_future(api.generate("admitted while others wait", PASSPHRASE))
    await wait_for_admissions(kdf_pool, 1)

    rejected = await asyncio.gather(
        *(api.generate(f"turned away number {n}", PASSPHRASE) for n in range(4))
    )
    pending_while_rejected = not admitted.done()
    gated_derivations.release()
    first = await admitted

    assert pending_while_rejected
    for response in rejected:
        assert_unavailable(response)
    assert first.code == 201
    assert await store.secrets.count_documents({}) == 1


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(kdf_workers=1, kdf_queue_size=0, scrypt_n=2**14)
async def test_kdf_burst_gets_201_or_503(api: Api, store: SecretStore) -> None:
    responses = await asyncio.gather(
        *(api.generate(f"burst secret number {n}", PASSPHRASE) for n in range(8))
    )

    codes = [response.code for response in responses]
    assert set(codes) <= {201, 503}
    assert 201 in codes
    for response in responses:
        if response.code == 503:
            assert_unavailable(response)
    assert await store.secrets.count_documents({}) == codes.count(201)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(kdf_workers=1, kdf_queue_size=0, scrypt_n=2**14)
async def test_queue_rejected_read_keeps_attempts(
    api: Api, store: SecretStore, kdf_pool: KdfPool, settings: Settings
) -> None:
    secret = "read while the pool is full"
    key = await api.create(secret, PASSPHRASE)

    async with kdf_pool.admission():
        right = await api.read(key, PASSPHRASE)
        wrong = await api.read(key, WRONG_PASSPHRASE)
    left = await attempts_left(store, key)
    after = await api.read(key, PASSPHRASE)

    assert_unavailable(right)
    assert_unavailable(wrong)
    assert left == settings.max_passphrase_attempts
    assert_served(after, secret)


# -- the event loop while scrypt runs --------------------------------------------------


@pytest.mark.gen_test(timeout=120)
@pytest.mark.settings(kdf_workers=2, scrypt_n=2**16)
async def test_healthz_responds_during_scrypt(api: Api, kdf_pool: KdfPool) -> None:
    generates = [
        asyncio.ensure_future(api.generate(f"costly secret number {n}", PASSPHRASE))
        for n in range(6)
    ]
    await wait_for_admissions(kdf_pool, len(generates))

    health_codes = []
    for _ in range(5):
        health_codes.append((await api.request("GET", "/healthz")).code)
    generates_pending = sum(1 for generate in generates if not generate.done())
    created = [(await generate).code for generate in generates]

    assert health_codes == [200] * 5
    # Every /healthz response arrived while derivations were still queued or running.
    assert generates_pending > 0
    assert created == [201] * len(generates)


# -- a bug returns a generic 500 ----------------------------------------------------


@pytest.mark.gen_test
async def test_bug_returns_generic_500(
    api: Api, store: SecretStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "secret behind a bug"
    key = await api.create(secret, PASSPHRASE)

    async def broken_find(*args: Any) -> None:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(store, "find_live", broken_find)
    response = await api.read(key, PASSPHRASE)

    assert response.code == 500
    body = problem(response)
    assert body["type"] == "/problems/internal-error"
    assert b"internal detail" not in response.body
    assert b"RuntimeError" not in response.body
    assert "Retry-After" not in response.headers
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], RuntimeError)
    assert "internal detail" in caplog.text
    sensitive = Recorder()
    for value in (secret, PASSPHRASE, key):
        sensitive.add(value)
    assert sensitive.hits(caplog.text.encode("utf-8")) == []


@pytest.mark.gen_test(timeout=60)
async def test_bug_after_upload_deletes_payload(
    api: Api, store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_insert(*args: Any) -> None:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(store, "insert", broken_insert)
    response = await api.generate(make_secret(GRIDFS_SIZE, "bug after upload"), PASSPHRASE)

    assert response.code == 500
    assert problem(response)["type"] == "/problems/internal-error"
    assert await stored_counts(store) == {SECRETS: 0, FILES: 0, CHUNKS: 0}
