"""The purge job: what it deletes, what it keeps, concurrent runs and failures."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import ObjectId

from ots import crypto
from ots.purge import STREAM_GRACE, UPLOAD_GRACE, Purger
from ots.settings import Settings
from ots.store import BUCKET, SecretStore, make_client
from tests.conftest import Api, FakeClock
from tests.mongo_server import MongoTestServer

PASSPHRASE = "purge test passphrase"
UPLOAD_GRACE_SECONDS = UPLOAD_GRACE.total_seconds()
STREAM_GRACE_SECONDS = STREAM_GRACE.total_seconds()

# Secrets above this size go to GridFS in the tests that need files.
SMALL_INLINE = {"inline_secret_bytes": 1024}


def large_secret() -> str:
    return secrets.token_urlsafe(6000)


def record_id_of(key: str) -> str:
    parsed = crypto.parse_secret_key(key)
    assert parsed is not None
    return crypto.record_id(parsed)


async def file_id_of(store: SecretStore, key: str) -> ObjectId:
    record = await store.secrets.find_one({"_id": record_id_of(key)})
    assert record is not None
    file_id: ObjectId = record["file_id"]
    return file_id


async def record_exists(store: SecretStore, key: str) -> bool:
    return await store.secrets.count_documents({"_id": record_id_of(key)}) == 1


async def file_exists(store: SecretStore, file_id: Any) -> bool:
    return await store.database[f"{BUCKET}.files"].count_documents({"_id": file_id}) == 1


async def chunk_count(store: SecretStore, file_id: Any) -> int:
    return await store.database[f"{BUCKET}.chunks"].count_documents({"files_id": file_id})


async def upload_orphan(store: SecretStore, clock: FakeClock) -> ObjectId:
    """Upload a payload file that no record names, as a failed generate leaves it."""

    async def chunks() -> AsyncIterator[bytes]:
        yield secrets.token_bytes(100)
        yield secrets.token_bytes(100)

    expires_at = clock() + datetime.timedelta(hours=1)
    return await store.upload("no-such-record", expires_at, chunks())


async def insert_orphan_chunks(store: SecretStore, count: int) -> ObjectId:
    """Insert chunks whose file document does not exist, as an interrupted upload leaves them."""
    files_id = ObjectId()
    chunks = [{"files_id": files_id, "n": n, "data": b"sealed"} for n in range(count)]
    await store.database[f"{BUCKET}.chunks"].insert_many(chunks)
    return files_id


@pytest.mark.gen_test
async def test_expired_record_deleted(api: Api, store: SecretStore, clock: FakeClock) -> None:
    key = await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)
    purger = Purger(store, clock)

    clock.advance(61)
    counts = await purger.run_once()

    assert counts["records"] == 1
    assert not await record_exists(store, key)
    assert purger.deleted["records"] == 1
    assert purger.failures == 0


@pytest.mark.gen_test
async def test_unexpired_record_kept(api: Api, store: SecretStore, clock: FakeClock) -> None:
    key = await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)
    purger = Purger(store, clock)

    clock.advance(59)
    counts = await purger.run_once()

    assert counts["records"] == 0
    assert await record_exists(store, key)


@pytest.mark.gen_test
@pytest.mark.settings(**SMALL_INLINE)
async def test_expired_file_deleted_after_stream_grace(
    api: Api, store: SecretStore, clock: FakeClock
) -> None:
    key = await api.create(large_secret(), PASSPHRASE, ttl=60)
    file_id = await file_id_of(store, key)
    purger = Purger(store, clock)

    clock.advance(61)
    first = await purger.run_once()
    clock.advance(STREAM_GRACE_SECONDS)
    second = await purger.run_once()

    assert first["records"] == 1
    assert first["files"] == 0
    assert second["files"] == 1
    assert not await file_exists(store, file_id)
    assert await chunk_count(store, file_id) == 0


@pytest.mark.gen_test
@pytest.mark.settings(**SMALL_INLINE)
async def test_expired_file_kept_within_stream_grace(
    api: Api, store: SecretStore, clock: FakeClock
) -> None:
    key = await api.create(large_secret(), PASSPHRASE, ttl=60)
    file_id = await file_id_of(store, key)
    purger = Purger(store, clock)

    clock.advance(60 + STREAM_GRACE_SECONDS - 1)
    counts = await purger.run_once()

    assert counts["files"] == 0
    assert await file_exists(store, file_id)
    assert await chunk_count(store, file_id) > 0


@pytest.mark.gen_test
@pytest.mark.settings(**SMALL_INLINE)
async def test_live_secrets_kept_and_readable(
    api: Api, store: SecretStore, clock: FakeClock
) -> None:
    inline_secret = secrets.token_urlsafe(16)
    file_secret = large_secret()
    inline_key = await api.create(inline_secret, PASSPHRASE, ttl=7200)
    file_key = await api.create(file_secret, PASSPHRASE, ttl=7200)
    purger = Purger(store, clock)

    clock.advance(UPLOAD_GRACE_SECONDS + STREAM_GRACE_SECONDS + 60)
    for _ in range(3):
        counts = await purger.run_once()
        assert sum(counts.values()) == 0

    inline_read = await api.read(inline_key, PASSPHRASE)
    file_read = await api.read(file_key, PASSPHRASE)
    assert inline_read.code == 200
    assert json.loads(inline_read.body) == {"secret": inline_secret}
    assert file_read.code == 200
    assert json.loads(file_read.body) == {"secret": file_secret}


@pytest.mark.gen_test
async def test_orphan_file_younger_than_grace_kept(store: SecretStore, clock: FakeClock) -> None:
    file_id = await upload_orphan(store, clock)
    purger = Purger(store, clock)

    clock.advance(UPLOAD_GRACE_SECONDS - 60)
    counts = await purger.run_once()

    assert counts["orphan_files"] == 0
    assert await file_exists(store, file_id)
    document = await store.database[f"{BUCKET}.files"].find_one({"_id": file_id})
    assert document is not None
    assert "orphaned_at" not in document["metadata"]


@pytest.mark.gen_test
async def test_orphan_file_marked_then_deleted(store: SecretStore, clock: FakeClock) -> None:
    file_id = await upload_orphan(store, clock)
    purger = Purger(store, clock)

    clock.advance(UPLOAD_GRACE_SECONDS + 1)
    marking = await purger.run_once()
    marked = await store.database[f"{BUCKET}.files"].find_one({"_id": file_id})
    clock.advance(STREAM_GRACE_SECONDS)
    deleting = await purger.run_once()

    assert marking["orphan_files"] == 0
    assert marked is not None
    assert "orphaned_at" in marked["metadata"]
    assert deleting["orphan_files"] == 1
    assert not await file_exists(store, file_id)
    assert await chunk_count(store, file_id) == 0


@pytest.mark.gen_test
async def test_orphan_chunks_deleted_after_grace(store: SecretStore, clock: FakeClock) -> None:
    files_id = await insert_orphan_chunks(store, 3)
    purger = Purger(store, clock)

    early = await purger.run_once()
    remaining_early = await chunk_count(store, files_id)
    clock.advance(UPLOAD_GRACE_SECONDS + 1)
    late = await purger.run_once()

    assert early["orphan_chunks"] == 0
    assert remaining_early == 3
    assert late["orphan_chunks"] == 3
    assert await chunk_count(store, files_id) == 0


@pytest.mark.gen_test
@pytest.mark.settings(**SMALL_INLINE)
async def test_chunks_of_live_file_kept(api: Api, store: SecretStore, clock: FakeClock) -> None:
    key = await api.create(large_secret(), PASSPHRASE, ttl=7200)
    file_id = await file_id_of(store, key)
    chunks_before = await chunk_count(store, file_id)
    purger = Purger(store, clock)

    clock.advance(UPLOAD_GRACE_SECONDS + 1)
    counts = await purger.run_once()

    assert counts["orphan_chunks"] == 0
    assert await chunk_count(store, file_id) == chunks_before


@pytest.mark.gen_test
async def test_batch_size_bounds_one_run(api: Api, store: SecretStore, clock: FakeClock) -> None:
    keys = [await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60) for _ in range(5)]
    purger = Purger(store, clock, batch_size=2)

    clock.advance(61)
    runs = [await purger.run_once() for _ in range(4)]

    assert [counts["records"] for counts in runs] == [2, 2, 1, 0]
    for key in keys:
        assert not await record_exists(store, key)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(**SMALL_INLINE)
async def test_concurrent_purgers_agree(
    api: Api, store: SecretStore, clock: FakeClock, settings: Settings
) -> None:
    expired_keys = [await api.create(large_secret(), PASSPHRASE, ttl=60) for _ in range(4)]
    expired_keys += [await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)]
    live_keys = [await api.create(large_secret(), PASSPHRASE, ttl=86_400) for _ in range(2)]
    expired_files = [await file_id_of(store, key) for key in expired_keys[:4]]
    live_files = [await file_id_of(store, key) for key in live_keys]
    orphan_owners = [await insert_orphan_chunks(store, 2) for _ in range(3)]
    other_client = make_client(settings)
    first = Purger(store, clock)
    second = Purger(SecretStore(other_client[settings.mongo_database]), clock)

    try:
        clock.advance(60 + STREAM_GRACE_SECONDS + UPLOAD_GRACE_SECONDS)
        await asyncio.gather(first.run_once(), second.run_once())
        await asyncio.gather(first.run_once(), second.run_once())
    finally:
        await other_client.close()

    assert first.failures == 0
    assert second.failures == 0
    deleted = first.deleted + second.deleted
    assert deleted["records"] == len(expired_keys)
    assert deleted["files"] == len(expired_files)
    # Chunks whose file another purger has just deleted may count as orphans too.
    assert deleted["orphan_chunks"] >= 2 * len(orphan_owners)
    for key in expired_keys:
        assert not await record_exists(store, key)
    for file_id in expired_files:
        assert not await file_exists(store, file_id)
        assert await chunk_count(store, file_id) == 0
    for key in live_keys:
        assert await record_exists(store, key)
    for file_id in live_files:
        assert await file_exists(store, file_id)
        assert await chunk_count(store, file_id) > 0
    for files_id in orphan_owners:
        assert await chunk_count(store, files_id) == 0


@pytest.mark.gen_test(timeout=30)
async def test_database_down_logged_next_run_retries(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)
    purger = Purger(store, clock)
    clock.advance(61)

    test_server.set_down(True)
    try:
        failed = await purger.run_once()
    finally:
        test_server.set_down(False)
    errors = [r for r in caplog.records if r.name == "ots.purge" and r.levelno == logging.ERROR]
    recovered = await purger.run_once()

    assert failed["records"] == 0
    assert purger.failures == 1
    assert len(errors) == 1
    assert "purge failed" in errors[0].getMessage()
    assert recovered["records"] == 1
    assert not await record_exists(store, key)


@pytest.mark.gen_test(timeout=30)
async def test_failed_chunk_delete_recovered_next_run(
    api: Api,
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    file_id = await upload_orphan(store, clock)
    chunks = await chunk_count(store, file_id)
    purger = Purger(store, clock)
    clock.advance(UPLOAD_GRACE_SECONDS + 1)
    await purger.run_once()
    key = await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)
    clock.advance(STREAM_GRACE_SECONDS)

    # The orphan file's document is deleted, then the delete of its chunks fails.
    test_server.fail_next("delete", collection=f"{BUCKET}.chunks")
    failed = await purger.run_once()
    errors = [r for r in caplog.records if r.name == "ots.purge" and r.levelno == logging.ERROR]
    recovered = await purger.run_once()

    assert len(errors) == 1
    assert failed["records"] == 1
    assert purger.deleted["records"] == 1
    assert purger.failures == 1
    assert not await record_exists(store, key)
    assert not await file_exists(store, file_id)
    assert chunks > 0
    assert recovered["orphan_chunks"] == chunks
    assert await chunk_count(store, file_id) == 0


@pytest.mark.gen_test(timeout=30)
async def test_schedule_runs_purge_repeatedly(
    api: Api, store: SecretStore, clock: FakeClock
) -> None:
    key = await api.create(secrets.token_urlsafe(16), PASSPHRASE, ttl=60)
    clock.advance(61)
    purger = Purger(store, clock)

    purger.start(0.05)
    try:
        for _ in range(400):
            if purger.runs >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await purger.stop()

    assert purger.runs >= 2
    assert purger.failures == 0
    assert not await record_exists(store, key)


@pytest.mark.gen_test(timeout=30)
async def test_stop_cancels_run_in_progress(
    store: SecretStore,
    clock: FakeClock,
    test_server: MongoTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    purger = Purger(store, clock)
    test_server.set_delay(0.5)

    purger.start(0.01)
    for _ in range(400):
        if purger.runs >= 1:
            break
        await asyncio.sleep(0.01)
    await purger.stop()

    assert purger.runs == 1
    assert purger.failures == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
