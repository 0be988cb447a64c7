"""MongoDB storage of encrypted secrets: records in `secrets`, large payloads in GridFS.

A record holds only what cannot reveal a secret on its own: the id (a hash of
the key), KDF parameters and salt, the wrapped data key, times, the attempt
budget, the plaintext size and the sealed payload (inline chunks, or the id
of a GridFS file of sealed chunks).

Every method turns a driver failure (timeout, unreachable server, network
error) into `ServiceUnavailable`, so the client gets 503 with `Retry-After`
instead of a hang or a 500. The deadline of every call is the client's
`timeoutMS`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Final, NotRequired, TypedDict, TypeVar

from bson import ObjectId
from gridfs import AsyncGridFSBucket, NoFile
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from ots.crypto import CIPHER_CHUNK_BYTES
from ots.errors import ServiceUnavailable
from ots.settings import Settings

log = logging.getLogger("ots.store")

SECRETS: Final = "secrets"
BUCKET: Final = "payloads"
DATABASE_RETRY_AFTER_SECONDS: Final = 5

T = TypeVar("T")


class KdfDocument(TypedDict):
    """scrypt parameters as stored in a record."""

    n: int
    r: int
    p: int


class SecretRecord(TypedDict):
    """A document of the `secrets` collection."""

    _id: str
    version: int
    kdf: KdfDocument
    salt: bytes
    wrapped_key: bytes
    created_at: datetime.datetime
    expires_at: datetime.datetime
    attempts_left: int
    size: int
    chunks: NotRequired[list[bytes]]
    file_id: NotRequired[ObjectId]


def make_client(settings: Settings) -> AsyncMongoClient[dict[str, Any]]:
    """Create the MongoDB client with the service's deadlines. Connects lazily."""
    return AsyncMongoClient(
        settings.mongo_uri,
        tz_aware=True,
        timeoutMS=settings.mongo_timeout_ms,
        serverSelectionTimeoutMS=settings.mongo_server_selection_timeout_ms,
        connectTimeoutMS=settings.mongo_server_selection_timeout_ms,
        appname="ots",
    )


class SecretStore:
    """Storage operations for secret records and their GridFS payloads."""

    def __init__(self, database: AsyncDatabase[dict[str, Any]]) -> None:
        self.database = database
        self.secrets = database[SECRETS]
        self.bucket = AsyncGridFSBucket(
            database, bucket_name=BUCKET, chunk_size_bytes=CIPHER_CHUNK_BYTES
        )

    async def ensure_indexes(self) -> None:
        """Create the TTL index that lets MongoDB remove expired records itself."""
        await _guard(
            "create indexes", self.secrets.create_index("expires_at", expireAfterSeconds=0)
        )
        await _guard("create indexes", self._files.create_index("metadata.expires_at"))
        # The index GridFS drivers create themselves; uploads here bypass the
        # driver's upload stream, so it is created here.
        await _guard(
            "create indexes",
            self._chunks.create_index([("files_id", 1), ("n", 1)], unique=True),
        )

    async def ping(self) -> None:
        """Check that the database responds.

        Raises:
            ServiceUnavailable: it does not, within the deadline.

        """
        await _guard("ping", self.database.command("ping"))

    async def insert(self, record: SecretRecord) -> None:
        """Insert a new record.

        Raises:
            ServiceUnavailable: the insert failed or timed out.

        """
        await _guard("insert", self.secrets.insert_one(dict(record)))

    async def find_live(self, record_id: str, now: datetime.datetime) -> SecretRecord | None:
        """Return the record if it exists and has not expired, whether or not purged yet."""
        document = await _guard(
            "find", self.secrets.find_one({"_id": record_id, "expires_at": {"$gt": now}})
        )
        return _as_record(document)

    async def reserve_attempt(self, record_id: str, now: datetime.datetime) -> int | None:
        """Use one passphrase attempt atomically, before any scrypt run.

        Returns:
            The attempts left after this one, or None when the record is gone,
            expired or has no attempts left.

        """
        document = await _guard(
            "reserve attempt",
            self.secrets.find_one_and_update(
                {"_id": record_id, "expires_at": {"$gt": now}, "attempts_left": {"$gt": 0}},
                {"$inc": {"attempts_left": -1}},
                projection={"attempts_left": True},
                return_document=ReturnDocument.AFTER,
            ),
        )
        if document is None:
            return None
        attempts_left: int = document["attempts_left"]
        return attempts_left

    async def claim(self, record_id: str) -> SecretRecord | None:
        """Delete the record and return it; only one caller can ever get it."""
        document = await _guard("claim", self.secrets.find_one_and_delete({"_id": record_id}))
        return _as_record(document)

    async def destroy(self, record_id: str, file_id: ObjectId | None) -> None:
        """Delete a record and its payload file; missing ones are not an error."""
        await _guard("delete", self.secrets.delete_one({"_id": record_id}))
        if file_id is not None:
            await self.delete_file(file_id)

    async def upload(
        self, record_id: str, expires_at: datetime.datetime, chunks: AsyncIterator[bytes]
    ) -> ObjectId:
        """Store sealed chunks as a GridFS file and return its id.

        Each chunk is inserted as it comes and the files document last, so
        memory stays at one chunk whatever the payload size. (PyMongo 4.20's
        upload stream buffers up to 48 MB of chunks before its first insert.)
        A failed upload deletes the chunks it wrote.

        Raises:
            ServiceUnavailable: an insert failed or timed out.

        """
        file_id = ObjectId()
        length = 0
        index = 0
        try:
            async for chunk in chunks:
                document = {"files_id": file_id, "n": index, "data": chunk}
                await _guard("upload", self._chunks.insert_one(document))
                length += len(chunk)
                index += 1
            files_document = {
                "_id": file_id,
                "length": length,
                "chunkSize": CIPHER_CHUNK_BYTES,
                "uploadDate": datetime.datetime.now(datetime.UTC),
                "filename": record_id,
                "metadata": {"record_id": record_id, "expires_at": expires_at},
            }
            await _guard("upload", self._files.insert_one(files_document))
        except BaseException:
            await _discard_quietly(self._chunks, file_id)
            raise
        return file_id

    async def read_chunk(self, file_id: ObjectId, index: int) -> bytes | None:
        """Return chunk `index` of a payload file, or None if it does not exist.

        One query per chunk keeps memory at one chunk; a GridFS download
        cursor would fetch up to 16 MiB of chunks per reply.
        """
        document = await _guard(
            "read payload", self._chunks.find_one({"files_id": file_id, "n": index})
        )
        if document is None:
            return None
        return bytes(document["data"])

    async def delete_file(self, file_id: ObjectId) -> None:
        """Delete a payload file and its chunks; a missing file is not an error."""
        try:
            await _guard("delete payload", self.bucket.delete(file_id))
        except NoFile:
            pass

    # The methods below serve `ots.purge`. Each one is idempotent, so several
    # replicas can run them at the same time, and each takes a `limit` so one
    # call stays bounded however large the backlog is.

    async def delete_expired_records(self, now: datetime.datetime, limit: int) -> int:
        """Delete up to `limit` records whose `expires_at` is at or before `now`.

        Returns:
            The number of records this call deleted.

        Raises:
            ServiceUnavailable: the database failed or timed out.

        """
        expired = {"expires_at": {"$lte": now}}
        documents = await _guard(
            "find expired records",
            self.secrets.find(expired, projection={"_id": True}, limit=limit).to_list(),
        )
        if not documents:
            return 0
        ids = [document["_id"] for document in documents]
        result = await _guard(
            "delete expired records", self.secrets.delete_many({"_id": {"$in": ids}, **expired})
        )
        return result.deleted_count

    async def find_expired_files(self, before: datetime.datetime, limit: int) -> list[ObjectId]:
        """Return the ids of up to `limit` payload files that expired at or before `before`."""
        documents = await _guard(
            "find expired files",
            self._files.find(
                {"metadata.expires_at": {"$lte": before}}, projection={"_id": True}, limit=limit
            ).to_list(),
        )
        return [document["_id"] for document in documents]

    async def find_orphan_files(
        self, uploaded_before: datetime.datetime, limit: int
    ) -> list[dict[str, Any]]:
        """Return up to `limit` payload files, uploaded before `uploaded_before`, without a record.

        Each item has `_id` and, once `mark_orphan_files` has marked the
        file, `metadata.orphaned_at`.
        """
        pipeline: list[dict[str, Any]] = [
            {"$match": {"uploadDate": {"$lte": uploaded_before}}},
            {
                "$lookup": {
                    "from": SECRETS,
                    "localField": "metadata.record_id",
                    "foreignField": "_id",
                    "as": "records",
                }
            },
            {"$match": {"records": {"$size": 0}}},
            {"$limit": limit},
            {"$project": {"_id": True, "metadata.orphaned_at": True}},
        ]
        return await _guard("find orphan files", _aggregate(self._files, pipeline))

    async def mark_orphan_files(self, file_ids: list[ObjectId], now: datetime.datetime) -> None:
        """Set `metadata.orphaned_at` to `now` on the files that do not have it yet."""
        await _guard(
            "mark orphan files",
            self._files.update_many(
                {"_id": {"$in": file_ids}, "metadata.orphaned_at": {"$exists": False}},
                {"$set": {"metadata.orphaned_at": now}},
            ),
        )

    async def delete_files(self, file_ids: list[ObjectId]) -> int:
        """Delete payload files and their chunks; return how many files this call deleted."""
        if not file_ids:
            return 0
        # The file documents go first, as in GridFS's own delete: if the chunk
        # delete fails, the chunks are left without a file and a later purge
        # of orphan chunks removes them.
        result = await _guard("delete files", self._files.delete_many({"_id": {"$in": file_ids}}))
        await _guard("delete chunks", self._chunks.delete_many({"files_id": {"$in": file_ids}}))
        return result.deleted_count

    async def find_orphan_chunk_owners(self, limit: int) -> list[Any]:
        """Return up to `limit` `files_id` values of chunks whose file document does not exist.

        An upload in progress has such chunks too: GridFS writes the file
        document after the last chunk. `delete_orphan_chunks` applies the age
        limit that spares them.
        """
        pipeline: list[dict[str, Any]] = [
            {"$sort": {"files_id": 1}},
            {"$group": {"_id": "$files_id"}},
            {
                "$lookup": {
                    "from": f"{BUCKET}.files",
                    "localField": "_id",
                    "foreignField": "_id",
                    "as": "files",
                }
            },
            {"$match": {"files": {"$size": 0}}},
            {"$limit": limit},
        ]
        groups = await _guard("find orphan chunks", _aggregate(self._chunks, pipeline))
        return [group["_id"] for group in groups]

    async def delete_orphan_chunks(self, files_ids: list[Any], written_before: ObjectId) -> int:
        """Delete the chunks of `files_ids` whose `_id` is older than `written_before`.

        The driver creates each chunk's ObjectId `_id` as it writes the chunk,
        so the id carries the time of the write (to the second, by the
        writer's clock). Returns the number of chunks deleted.
        """
        if not files_ids:
            return 0
        result = await _guard(
            "delete orphan chunks",
            self._chunks.delete_many(
                {"files_id": {"$in": files_ids}, "_id": {"$lt": written_before}}
            ),
        )
        return result.deleted_count

    @property
    def _files(self) -> AsyncCollection[dict[str, Any]]:
        return self.database[f"{BUCKET}.files"]

    @property
    def _chunks(self) -> AsyncCollection[dict[str, Any]]:
        return self.database[f"{BUCKET}.chunks"]


async def _aggregate(
    collection: AsyncCollection[dict[str, Any]], pipeline: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    cursor = await collection.aggregate(pipeline)
    return await cursor.to_list()


async def _guard(operation: str, call: Awaitable[T]) -> T:
    """Await a driver call, turning driver failures into `ServiceUnavailable`."""
    try:
        return await call
    except (DuplicateKeyError, NoFile):
        # Not an outage: a duplicate id is a bug, a missing file is a result.
        raise
    except PyMongoError as error:
        raise _unavailable(operation, error) from None


def _unavailable(operation: str, error: PyMongoError) -> ServiceUnavailable:
    return ServiceUnavailable(
        DATABASE_RETRY_AFTER_SECONDS,
        log_message=f"database {operation} failed: {type(error).__name__}",
    )


async def _discard_quietly(chunks: AsyncCollection[dict[str, Any]], file_id: ObjectId) -> None:
    try:
        await chunks.delete_many({"files_id": file_id})
    except PyMongoError as error:
        # The chunks stay behind; the purge job removes chunks without a file.
        log.warning("could not delete the chunks of a failed upload: %s", type(error).__name__)


def _as_record(document: dict[str, Any] | None) -> SecretRecord | None:
    if document is None:
        return None
    record: SecretRecord = document  # type: ignore[assignment]
    return record
