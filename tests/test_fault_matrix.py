"""Database faults at each step of generate and read, and bursts of concurrent reads.

Faults come from the MongoDB test server: `set_down` (a stopped mongod),
`fail_next` (a command that fails, drops the connection or never replies)
and `set_delay` (replies later than the deadline). Generate of a GridFS
secret inserts each payload chunk into `payloads.chunks`, then the file
document into `payloads.files`, then the record into `secrets`. Read sends
`find` (the record), `findAndModify` (reserve an attempt), `findAndModify`
(claim), then one `find` per payload chunk.

Two kinds of fault need a trigger inside a request. `SteppedKdfPool` runs a
test's action when the next key derivation starts, which is after the
attempt reservation and before the claim. Mid-stream faults are armed when
the client receives the first bytes of the body, so they hit a later chunk.

Each fault must get a 503 with `Retry-After`, never a 500 or a hang. In the
middle of a stream the status line is already sent, so there the connection
must be cut instead of ending as a complete 200. Beyond that, no secret is
served twice, nothing half-written is readable, the service serves again
once the database is back, and `Purger.run_once` removes whatever the fault
left behind.

The module shrinks the payload chunk size to 1 KiB, so a secret of a few
dozen KiB spans as many chunks; the code paths are those of the real
256 KiB chunks.

`OTS_RACE_ROUNDS` sets how often the burst of 50 concurrent reads of one
secret repeats (default 5; `tox -e reliability` uses 40, the full run 200).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any, Final, ParamSpec, TypeVar

import pytest
import tornado.httpclient
import tornado.simple_httpclient
import tornado.web
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from tornado.iostream import StreamClosedError

from ots import crypto
from ots import store as store_module
from ots.app import make_app
from ots.purge import STREAM_GRACE, UPLOAD_GRACE, Purger
from ots.settings import Settings
from ots.store import BUCKET, SECRETS, SecretStore
from ots.workers import KdfPool
from tests.conftest import (
    RECORDER,
    TRANSFER_FAILED,
    Api,
    FakeClock,
    add_to_sweep,
    problem,
    quiet_loggers,
    read_outcome,
    report,
    serves_secret,
)
from tests.mongo_server import FaultMode, MongoTestServer

P = ParamSpec("P")
R = TypeVar("R")

RACE_ROUNDS: Final = int(os.environ.get("OTS_RACE_ROUNDS", "5"))
RACE_READERS: Final = 50

PASSPHRASE: Final = "fault matrix passphrase"
WRONG_PASSPHRASE: Final = "not the fault matrix passphrase"
CHUNK_BYTES: Final = 1024
GRIDFS_CHUNKS: Final = 40
# Seconds; longer than the test settings' 1.5 s operation deadline.
PAST_DEADLINE: Final = 3.0
TTL: Final = 60

FILES: Final = f"{BUCKET}.files"
CHUNKS: Final = f"{BUCKET}.chunks"
COLLECTIONS: Final = (SECRETS, FILES, CHUNKS)

SETTINGS: Final[dict[str, Any]] = {"inline_secret_bytes": 1024, "max_secret_bytes": 1024 * 1024}
pytestmark = pytest.mark.settings(**SETTINGS)

FAULT_MODES: Final[tuple[FaultMode, ...]] = ("error", "drop", "hang")


def fault_mode(name: str) -> FaultMode:
    """Return `name` as a `fail_next` mode.

    Raises:
        ValueError: `name` is not a mode.

    """
    for mode in FAULT_MODES:
        if mode == name:
            return mode
    raise ValueError(f"not a fault mode: {name}")


class SteppedKdfPool(KdfPool):
    """A KDF pool that runs a test's action once, when the next derivation starts.

    A read reserves its attempt before it derives and claims the record
    after, so an action armed here lands exactly between the two.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        super().__init__(workers, queue_size)
        self.before_next_derivation: Callable[[], None] | None = None

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the armed action, if any, then derive as usual."""
        action, self.before_next_derivation = self.before_next_derivation, None
        if action is not None:
            action()
        return await super().run(function, *args, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def quiet_driver_logs() -> Iterator[None]:
    """Leave PyMongo's DEBUG records out of the secrecy sweep's input.

    They trace every command, connection and server selection: almost all
    of the records this module causes. The database dumps taken during the
    tests cover what the commands carried.
    """
    with quiet_loggers("pymongo"):
        yield


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Payload chunks of 1 KiB, set before the store creates its GridFS bucket."""
    monkeypatch.setattr(crypto, "PLAIN_CHUNK_BYTES", CHUNK_BYTES)
    monkeypatch.setattr(crypto, "CIPHER_CHUNK_BYTES", CHUNK_BYTES + crypto.TAG_BYTES)
    monkeypatch.setattr(store_module, "CIPHER_CHUNK_BYTES", CHUNK_BYTES + crypto.TAG_BYTES)


@pytest.fixture
def kdf_pool(settings: Settings) -> Iterator[SteppedKdfPool]:
    """The app's KDF pool, through which tests arm faults between reservation and claim."""
    pool = SteppedKdfPool(settings.kdf_workers, settings.kdf_queue_size)
    yield pool
    pool.shutdown()


@pytest.fixture
def app(
    settings: Settings, store: SecretStore, clock: FakeClock, kdf_pool: SteppedKdfPool
) -> tornado.web.Application:
    """The application under test, with the stepped KDF pool."""
    return make_app(settings, store, clock=clock, kdf_pool=kdf_pool)


def gridfs_secret(label: str) -> str:
    """Build a random ASCII secret of `GRIDFS_CHUNKS` payload chunks."""
    head = f"{label}:{secrets.token_urlsafe(16)}:"
    return head + "g" * (GRIDFS_CHUNKS * CHUNK_BYTES - len(head))


def inline_secret(label: str) -> str:
    """Build a random secret small enough to be stored in its record."""
    return f"{label}:{secrets.token_urlsafe(16)}"


async def stored_counts(store: SecretStore) -> dict[str, int]:
    """Count the documents of the records, payload files and payload chunks."""
    return {name: await store.database[name].count_documents({}) for name in COLLECTIONS}


async def sweep_database(store: SecretStore) -> None:
    """Hand every stored document, as BSON, to the session's secrecy sweep."""
    raw = store.database.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    dump = bytearray()
    for name in await raw.list_collection_names():
        async for document in raw[name].find({}):
            dump += document.raw
    add_to_sweep("database dump", bytes(dump))


async def purge_leftovers(store: SecretStore, clock: FakeClock) -> None:
    """Run the purge twice, far enough apart to delete expired and orphaned data of any kind.

    Orphan files are marked by one run and deleted by a run `STREAM_GRACE`
    later; orphan chunks and files are spared for `UPLOAD_GRACE`.
    """
    purger = Purger(store, clock)
    minute = datetime.timedelta(minutes=1)
    clock.advance((UPLOAD_GRACE + minute).total_seconds())
    await purger.run_once()
    clock.advance((STREAM_GRACE + minute).total_seconds())
    await purger.run_once()
    assert purger.failures == 0


async def assert_empty_after_purge(store: SecretStore, clock: FakeClock) -> None:
    """Check that the purge leaves no record, payload file or chunk."""
    await sweep_database(store)
    await purge_leftovers(store, clock)
    assert await stored_counts(store) == dict.fromkeys(COLLECTIONS, 0)


def assert_unavailable(response: tornado.httpclient.HTTPResponse) -> None:
    """Check for a 503 service-unavailable problem with a numeric Retry-After."""
    assert response.code == 503, response.body
    assert problem(response)["type"] == "/problems/service-unavailable"
    assert response.headers["Retry-After"].isdigit()
    assert response.headers["Cache-Control"] == "no-store"


async def wait_until_ready(api: Api) -> None:
    """Poll `GET /readyz` until the database responds again; at most 50 tries."""
    for _ in range(50):
        response = await api.request("GET", "/readyz")
        if response.code == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the service did not become ready after the database came back")


async def assert_serves_again(api: Api, store: SecretStore) -> None:
    """Check that the service stores and reads a GridFS secret after the fault."""
    await wait_until_ready(api)
    secret = gridfs_secret("after the fault")
    key = await api.create(secret, PASSPHRASE, ttl=TTL)
    await sweep_database(store)

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert serves_secret(code, body, secret)


def heal(test_server: MongoTestServer) -> None:
    """Bring the database back: up, no delay, no planned failures."""
    test_server.set_down(False)
    test_server.reset_faults()


# -- generate -----------------------------------------------------------------

# (step, fault): how the database fails, and whether the handler itself can
# clean up (the database responds again by the time it tries).
GENERATE_FAULTS: Final = [
    pytest.param("before GridFS", "down", True, id="before-gridfs-down"),
    pytest.param("before GridFS", "delay", True, id="before-gridfs-delay"),
    *(
        pytest.param("chunks insert", mode, True, id=f"chunks-insert-{mode}")
        for mode in FAULT_MODES
    ),
    *(
        pytest.param("files insert", mode, True, id=f"between-gridfs-and-record-{mode}")
        for mode in FAULT_MODES
    ),
    pytest.param(
        "files insert", "drop, abort fails", False, id="between-gridfs-and-record-orphan"
    ),
    *(
        pytest.param("record insert", mode, True, id=f"record-insert-{mode}")
        for mode in FAULT_MODES
    ),
    pytest.param("record insert", "drop, delete fails", False, id="record-insert-orphan"),
]


def arm_generate_fault(test_server: MongoTestServer, step: str, fault: str) -> None:
    """Plan one fault of the generate matrix on the test server."""
    if fault == "down":
        test_server.set_down(True)
    elif fault == "delay":
        test_server.set_delay(PAST_DEADLINE)
    elif step == "chunks insert":
        test_server.fail_next("insert", collection=CHUNKS, mode=fault_mode(fault))
    elif step == "files insert" and fault == "drop, abort fails":
        test_server.fail_next("insert", collection=FILES, mode="drop")
        test_server.fail_next("delete", collection=CHUNKS, mode="drop")
    elif step == "files insert":
        test_server.fail_next("insert", collection=FILES, mode=fault_mode(fault))
    elif fault == "drop, delete fails":
        test_server.fail_next("insert", collection=SECRETS, mode="drop")
        test_server.fail_next("delete", collection=FILES, mode="drop")
    else:
        test_server.fail_next("insert", collection=SECRETS, mode=fault_mode(fault))


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("step", "fault", "handler_cleans_up"), GENERATE_FAULTS)
async def test_generate_fault_leaves_nothing_readable(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    step: str,
    fault: str,
    handler_cleans_up: bool,
) -> None:
    arm_generate_fault(test_server, step, fault)

    response = await api.generate(gridfs_secret(f"generate {step} {fault}"), PASSPHRASE, ttl=TTL)

    assert_unavailable(response)
    heal(test_server)
    left = await stored_counts(store)
    assert left[SECRETS] == 0
    if handler_cleans_up:
        assert left == dict.fromkeys(COLLECTIONS, 0)
    await assert_empty_after_purge(store, clock)
    await assert_serves_again(api, store)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("fault", ["down", "delay", *FAULT_MODES])
async def test_inline_generate_fault_stores_nothing(
    api: Api, store: SecretStore, clock: FakeClock, test_server: MongoTestServer, fault: str
) -> None:
    arm_generate_fault(test_server, "record insert", fault)

    response = await api.generate(inline_secret(f"inline generate {fault}"), PASSPHRASE)

    assert_unavailable(response)
    heal(test_server)
    assert await stored_counts(store) == dict.fromkeys(COLLECTIONS, 0)
    await assert_serves_again(api, store)


# -- read: between the attempt reservation and the claim ------------------------


def arm_after_reservation(test_server: MongoTestServer, fault: str) -> Callable[[], None]:
    """Return the action that injects `fault` once the attempt is reserved."""

    def inject() -> None:
        if fault == "down":
            test_server.set_down(True)
        elif fault == "delay":
            test_server.set_delay(PAST_DEADLINE)
        else:
            test_server.fail_next(
                "findAndModify",
                collection=SECRETS,
                mode=fault_mode(fault),
            )

    return inject


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("size", ["inline", "gridfs"])
@pytest.mark.parametrize("fault", ["down", "delay", *FAULT_MODES])
async def test_fault_before_claim_keeps_secret(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    kdf_pool: SteppedKdfPool,
    fault: str,
    size: str,
) -> None:
    make = gridfs_secret if size == "gridfs" else inline_secret
    secret = make(f"claim {fault}")
    key = await api.create(secret, PASSPHRASE, ttl=TTL)
    kdf_pool.before_next_derivation = arm_after_reservation(test_server, fault)

    response = await api.read(key, PASSPHRASE)

    assert_unavailable(response)
    heal(test_server)
    await wait_until_ready(api)
    first_code, first_body = await read_outcome(api, key, PASSPHRASE)
    second_code, _ = await read_outcome(api, key, PASSPHRASE)
    assert serves_secret(first_code, first_body, secret)
    assert second_code == 404
    await assert_empty_after_purge(store, clock)
    await assert_serves_again(api, store)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("fault", ["down", "delay", "drop"])
async def test_last_guess_fault_leaves_secret_unreadable(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    kdf_pool: SteppedKdfPool,
    fault: str,
) -> None:
    secret = gridfs_secret(f"last guess {fault}")
    key = await api.create(secret, PASSPHRASE, ttl=TTL)
    for _ in range(4):
        assert (await api.read(key, WRONG_PASSPHRASE)).code == 403

    def inject() -> None:
        # The last wrong guess deletes the record and then its payload file.
        if fault == "drop":
            test_server.fail_next("delete", collection=SECRETS, mode="drop")
        else:
            arm_after_reservation(test_server, fault)()

    kdf_pool.before_next_derivation = inject
    response = await api.read(key, WRONG_PASSPHRASE)

    assert_unavailable(response)
    heal(test_server)
    await wait_until_ready(api)
    code, body = await read_outcome(api, key, PASSPHRASE)
    assert code == 404
    assert not serves_secret(code, body, secret)
    # The record is unreadable but stays until it expires; then the purge removes it.
    clock.advance(TTL)
    await assert_empty_after_purge(store, clock)
    await assert_serves_again(api, store)


# -- read: while the payload streams --------------------------------------------


def read_attempts(mode: str) -> int:
    """Return how many commands a read fault must hit to fail the read.

    With `timeoutMS` set, PyMongo 4.20 retries a read after a dropped
    connection more than once (two drops were not enough), so a drop lasts
    until `heal`.
    """
    return 10_000 if mode == "drop" else 1


async def read_streaming(
    api: Api, key: str, passphrase: str, on_first_bytes: Callable[[], None]
) -> tuple[int, bytes]:
    """Read a secret, calling `on_first_bytes` when the body starts to arrive.

    Returns the status and the body, or 599 and the bytes received before the cut.
    """
    pieces: list[bytes] = []

    def receive(piece: bytes) -> None:
        if not pieces:
            on_first_bytes()
        pieces.append(piece)

    try:
        response = await api.client.fetch(
            f"{api.base_url}/secrets/{key}",
            method="POST",
            body=json.dumps({"passphrase": passphrase}).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            streaming_callback=receive,
            raise_error=False,
            request_timeout=60,
        )
    except (tornado.httpclient.HTTPClientError, StreamClosedError, ConnectionError) as error:
        code = getattr(error, "code", TRANSFER_FAILED)
        assert code == TRANSFER_FAILED, f"unexpected client error {code}"
        return TRANSFER_FAILED, b"".join(pieces)
    return response.code, b"".join(pieces)


# (fault, whether the handler can delete the payload file after the cut).
# When the database is down or slow, that delete fails too.
MID_STREAM_FAULTS: Final = [
    *(pytest.param(mode, True, id=mode) for mode in FAULT_MODES),
    pytest.param("drop, delete fails", False, id="drop-delete-fails"),
    pytest.param("down", False, id="down"),
    pytest.param("delay", False, id="delay"),
]


def arm_mid_stream_fault(test_server: MongoTestServer, fault: str) -> None:
    """Make the next payload chunk read fail in the way `fault` names."""
    if fault == "down":
        test_server.set_down(True)
        return
    if fault == "delay":
        test_server.set_delay(PAST_DEADLINE)
        return
    mode = "drop" if fault == "drop, delete fails" else fault
    test_server.fail_next(
        "find", collection=CHUNKS, mode=fault_mode(mode), count=read_attempts(mode)
    )
    if fault == "drop, delete fails":
        test_server.fail_next("delete", collection=FILES, mode="drop")


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("fault", "handler_cleans_up"), MID_STREAM_FAULTS)
async def test_fault_mid_stream_cuts_connection(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    fault: str,
    handler_cleans_up: bool,
) -> None:
    secret = gridfs_secret(f"mid-stream {fault}")
    key = await api.create(secret, PASSPHRASE, ttl=TTL)

    code, body = await read_streaming(
        api, key, PASSPHRASE, lambda: arm_mid_stream_fault(test_server, fault)
    )

    assert code == TRANSFER_FAILED
    assert body.startswith(b'{"secret": "')
    assert not serves_secret(code, body, secret)
    heal(test_server)
    await wait_until_ready(api)
    again, _ = await read_outcome(api, key, PASSPHRASE)
    assert again == 404
    left = await stored_counts(store)
    assert left[SECRETS] == 0
    if handler_cleans_up:
        assert left == dict.fromkeys(COLLECTIONS, 0)
    await assert_empty_after_purge(store, clock)
    await assert_serves_again(api, store)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("fault", FAULT_MODES)
async def test_fault_before_first_chunk_serves_nothing(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    kdf_pool: SteppedKdfPool,
    fault: str,
) -> None:
    secret = gridfs_secret(f"first chunk {fault}")
    key = await api.create(secret, PASSPHRASE, ttl=TTL)

    def inject() -> None:
        # The payload's chunks are read only after the claim.
        test_server.fail_next(
            "find",
            collection=CHUNKS,
            mode=fault_mode(fault),
            count=read_attempts(fault),
        )

    kdf_pool.before_next_derivation = inject

    response = await api.read(key, PASSPHRASE)

    # NOTE: the record was claimed before the first chunk was read, so the
    # secret is gone and a retry gets 404: served at most once, but lost.
    assert_unavailable(response)
    heal(test_server)
    await wait_until_ready(api)
    again, _ = await read_outcome(api, key, PASSPHRASE)
    assert again == 404
    await assert_empty_after_purge(store, clock)
    await assert_serves_again(api, store)


# -- concurrent reads -------------------------------------------------------------


async def read_all_at_once(
    client: tornado.httpclient.AsyncHTTPClient, base_url: str, key: str, passphrase: str
) -> list[tuple[int, bytes]]:
    """Send `RACE_READERS` reads of one secret at the same time; return statuses and bodies."""
    body = json.dumps({"passphrase": passphrase}).encode("utf-8")

    async def read_once() -> tuple[int, bytes]:
        response = await client.fetch(
            f"{base_url}/secrets/{key}",
            method="POST",
            body=body,
            headers={"Content-Type": "application/json"},
            raise_error=False,
            request_timeout=60,
        )
        return response.code, response.body

    return await asyncio.gather(*(read_once() for _ in range(RACE_READERS)))


@pytest.fixture
def burst_client() -> Iterator[tornado.httpclient.AsyncHTTPClient]:
    """An HTTP client that sends all `RACE_READERS` requests at once instead of queueing them."""
    client = tornado.simple_httpclient.SimpleAsyncHTTPClient(
        force_instance=True, max_clients=RACE_READERS
    )
    yield client
    client.close()


@pytest.mark.gen_test(timeout=600)
@pytest.mark.settings(**SETTINGS, max_passphrase_attempts=RACE_READERS)
async def test_concurrent_reads_serve_secret_once(
    api: Api,
    store: SecretStore,
    base_url: str,
    burst_client: tornado.httpclient.AsyncHTTPClient,
    pytestconfig: pytest.Config,
) -> None:
    for round_number in range(RACE_ROUNDS):
        # Alternate inline and GridFS payloads (three chunks).
        if round_number % 2:
            secret = inline_secret(f"race {round_number}")
        else:
            secret = f"race {round_number}:" + secrets.token_urlsafe(2 * CHUNK_BYTES)
        key = await api.create(secret, PASSPHRASE)

        outcomes = await read_all_at_once(burst_client, base_url, key, PASSPHRASE)

        codes = sorted(code for code, _ in outcomes)
        assert codes == [200] + [404] * (RACE_READERS - 1), f"round {round_number}"
        served = [body for code, body in outcomes if code == 200]
        assert json.loads(served[0]) == {"secret": secret}
    assert await stored_counts(store) == dict.fromkeys(COLLECTIONS, 0)
    report(
        pytestconfig,
        f"race: {RACE_ROUNDS} rounds of {RACE_READERS} concurrent reads of one secret: "
        "one 200 in each",
    )


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_wrong_guesses_stay_within_budget(
    api: Api,
    store: SecretStore,
    base_url: str,
    settings: Settings,
    burst_client: tornado.httpclient.AsyncHTTPClient,
) -> None:
    secret = gridfs_secret("wrong guesses at once")
    key = await api.create(secret, PASSPHRASE)
    RECORDER.add(WRONG_PASSPHRASE)

    outcomes = await read_all_at_once(burst_client, base_url, key, WRONG_PASSPHRASE)

    budget = settings.max_passphrase_attempts
    forbidden = [json.loads(body) for code, body in outcomes if code == 403]
    assert sorted(document["attempts_left"] for document in forbidden) == list(range(budget))
    assert sorted(code for code, _ in outcomes) == [403] * budget + [404] * (RACE_READERS - budget)
    assert (await api.read(key, PASSPHRASE)).code == 404
    assert await stored_counts(store) == dict.fromkeys(COLLECTIONS, 0)
