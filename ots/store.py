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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NotRequired, TypedDict, TypeVar

from bson import ObjectId
from gridfs import AsyncGridFSBucket, NoFile
from gridfs.asynchronous.grid_file import AsyncGridOut
from pymongo import AsyncMongoClient, ReturnDocument
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
        await _guard(
            "create indexes",
            self.database[f"{BUCKET}.files"].create_index("metadata.expires_at"),
        )

    async def ping(self) -> None:
        """Check that the database answers.

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

        A failed upload is aborted, which removes the chunks it wrote.
        """
        stream = self.bucket.open_upload_stream(
            record_id, metadata={"record_id": record_id, "expires_at": expires_at}
        )
        try:
            async for chunk in chunks:
                await stream.write(chunk)
            await stream.close()
        except PyMongoError as error:
            await _abort_quietly(stream.abort)
            raise _unavailable("upload", error) from None
        except BaseException:
            await _abort_quietly(stream.abort)
            raise
        file_id: ObjectId = stream._id
        return file_id

    async def open_payload(self, file_id: ObjectId) -> AsyncGridOut | None:
        """Open a payload file for reading, or return None if it is gone."""
        try:
            return await _guard("open payload", self.bucket.open_download_stream(file_id))
        except NoFile:
            return None

    async def read_payload(self, stream: AsyncGridOut, size: int) -> bytes:
        """Read up to `size` bytes from an open payload file."""
        return await _guard("read payload", stream.read(size))

    async def delete_file(self, file_id: ObjectId) -> None:
        """Delete a payload file and its chunks; a missing file is not an error."""
        try:
            await _guard("delete payload", self.bucket.delete(file_id))
        except NoFile:
            pass


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


async def _abort_quietly(abort: Callable[[], Awaitable[None]]) -> None:
    try:
        await abort()
    except PyMongoError as error:
        # The chunks stay behind; the purge job removes chunks without a file.
        log.warning("could not abort a failed upload: %s", type(error).__name__)


def _as_record(document: dict[str, Any] | None) -> SecretRecord | None:
    if document is None:
        return None
    record: SecretRecord = document  # type: ignore[assignment]
    return record
