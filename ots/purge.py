"""Periodic cleanup of expired and orphaned data.

MongoDB's TTL monitor removes expired records through the TTL index on
`expires_at`, but it runs only about once a minute, it does not touch GridFS,
and some test servers have none. `Purger` covers all of it. Each run deletes:

- records whose `expires_at` has passed;
- payload files whose `metadata.expires_at` passed more than `STREAM_GRACE`
  ago, with their chunks. The file of an expired record goes here too, so a
  read that claimed its record just before expiry can finish streaming;
- orphan files: files uploaded more than `UPLOAD_GRACE` ago that no record
  names. The first run that finds one marks it (`metadata.orphaned_at`), and
  a run at least `STREAM_GRACE` later deletes it, because a claimed read is
  still streaming a file whose record it has deleted;
- orphan chunks: chunks whose file document does not exist, written more
  than `UPLOAD_GRACE` ago.

Every delete is idempotent, so any number of replicas can purge the same
database at once. Each kind is capped at `batch_size` per run, so one run
stays short however large the backlog is, and later runs work it off.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
from collections.abc import Callable
from typing import Final

from bson import ObjectId
from tornado.ioloop import PeriodicCallback

from ots.errors import ServiceUnavailable
from ots.store import SecretStore

log = logging.getLogger("ots.purge")

# Generate writes the GridFS chunks, then the file document, then the
# record, so a young file or chunk without an owner may belong to an upload
# in progress. NOTE: ten minutes is a generous guess, not a measured bound;
# an upload slower than that would lose its first chunks.
UPLOAD_GRACE: Final = datetime.timedelta(minutes=10)

# A read deletes the record when it claims it and only then streams the
# file. This is how long such a stream may last before the purge deletes
# the file under it, which cuts the response off.
STREAM_GRACE: Final = datetime.timedelta(minutes=10)

BATCH_SIZE: Final = 1000

# Replicas started together would otherwise purge in lockstep.
INTERVAL_JITTER: Final = 0.1

RECORDS: Final = "records"
FILES: Final = "files"
ORPHAN_FILES: Final = "orphan_files"
ORPHAN_CHUNKS: Final = "orphan_chunks"
KINDS: Final = (RECORDS, FILES, ORPHAN_FILES, ORPHAN_CHUNKS)


class Purger:
    """Deletes expired and orphaned data, once per `run_once` or on a schedule.

    For metrics, `deleted` counts the documents deleted since start-up per
    kind: `records`, `files`, `orphan_files` and `orphan_chunks`. Chunks of
    deleted files are not counted. `runs` counts runs, and `failures` counts
    runs that stopped on an error. `on_deleted(kind, count)`, when given, is
    called after each run for every kind it deleted something of.
    """

    def __init__(
        self,
        store: SecretStore,
        clock: Callable[[], datetime.datetime],
        *,
        batch_size: int = BATCH_SIZE,
        on_deleted: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        self.on_deleted = on_deleted
        self.deleted: collections.Counter[str] = collections.Counter(dict.fromkeys(KINDS, 0))
        self.runs = 0
        self.failures = 0
        self._callback: PeriodicCallback | None = None
        self._current: asyncio.Task[dict[str, int]] | None = None

    async def run_once(self) -> dict[str, int]:
        """Run one purge and return the number of documents it deleted per kind.

        A database error or a bug in a step is logged and counted in
        `failures` instead of raised, so the next run still happens. The
        counts then show what was deleted before the failure.
        """
        now = self.clock()
        counts = dict.fromkeys(KINDS, 0)
        steps = (
            (RECORDS, self._purge_records),
            (FILES, self._purge_expired_files),
            (ORPHAN_FILES, self._purge_orphan_files),
            (ORPHAN_CHUNKS, self._purge_orphan_chunks),
        )
        self.runs += 1
        try:
            for kind, step in steps:
                counts[kind] = await step(now)
        except ServiceUnavailable as error:
            self.failures += 1
            log.error(
                "purge failed, the next run retries: %s (%s)", error.log_message, _describe(counts)
            )
        except Exception:
            self.failures += 1
            log.exception("purge failed unexpectedly (%s)", _describe(counts))
        else:
            if any(counts.values()):
                log.info("purge deleted %s", _describe(counts))
        self.deleted.update(counts)
        if self.on_deleted is not None:
            for kind, count in counts.items():
                if count:
                    self.on_deleted(kind, count)
        return counts

    def start(self, interval_seconds: float) -> None:
        """Run the purge every `interval_seconds` (give or take 5%) on the current event loop.

        The first run starts one interval from now. A run that is still
        going when the next one is due delays it, so runs never overlap.
        """
        if self._callback is not None:
            raise RuntimeError("the purge is running already")
        self._callback = PeriodicCallback(
            self._scheduled_run, interval_seconds * 1000, jitter=INTERVAL_JITTER
        )
        self._callback.start()

    async def stop(self) -> None:
        """Stop the schedule and cancel a run in progress; its deletes need no undo."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        current = self._current
        if current is not None and not current.done():
            current.cancel()
            await asyncio.wait({current})

    async def _scheduled_run(self) -> None:
        self._current = asyncio.create_task(self.run_once())
        # asyncio.wait returns normally when stop() cancels the run, so the
        # cancellation does not reach PeriodicCallback, which would log it.
        await asyncio.wait({self._current})

    async def _purge_records(self, now: datetime.datetime) -> int:
        return await self.store.delete_expired_records(now, self.batch_size)

    async def _purge_expired_files(self, now: datetime.datetime) -> int:
        file_ids = await self.store.find_expired_files(now - STREAM_GRACE, self.batch_size)
        return await self.store.delete_files(file_ids)

    async def _purge_orphan_files(self, now: datetime.datetime) -> int:
        orphans = await self.store.find_orphan_files(now - UPLOAD_GRACE, self.batch_size)
        unmarked = []
        due = []
        for orphan in orphans:
            orphaned_at = orphan.get("metadata", {}).get("orphaned_at")
            if orphaned_at is None:
                unmarked.append(orphan["_id"])
            elif orphaned_at <= now - STREAM_GRACE:
                due.append(orphan["_id"])
        if unmarked:
            await self.store.mark_orphan_files(unmarked, now)
        return await self.store.delete_files(due)

    async def _purge_orphan_chunks(self, now: datetime.datetime) -> int:
        owners = await self.store.find_orphan_chunk_owners(self.batch_size)
        written_before = ObjectId.from_datetime(now - UPLOAD_GRACE)
        return await self.store.delete_orphan_chunks(owners, written_before)


def _describe(counts: dict[str, int]) -> str:
    return " ".join(f"{kind}={count}" for kind, count in counts.items())
