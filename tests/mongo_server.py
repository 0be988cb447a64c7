"""MongoDB wire-protocol server for tests, with its data kept in mongomock.

No MongoDB server can be installed on the build machines, so the suite points the real
PyMongo async driver (``pymongo.AsyncMongoClient``, ``gridfs.AsyncGridFSBucket``) at this
server over a TCP socket on 127.0.0.1. The server decodes OP_MSG requests, runs each
command on an in-memory mongomock client and sends replies shaped like those of a
standalone mongod 7.0, so PyMongo raises its usual exceptions (``DuplicateKeyError``,
``OperationFailure``, ``ServerSelectionTimeoutError`` and so on).

In a test::

    with MongoTestServer() as server:
        client = AsyncMongoClient(server.uri, tz_aware=True)

On its own, for manual runs and benchmarks, until SIGINT or SIGTERM::

    python -m tests.mongo_server --port 27017

The server runs its own asyncio event loop in its own thread, never on the caller's
loop. Commands run one at a time on that thread, so every command is atomic, as a
single-document operation is in mongod. The fault-injection methods (``set_delay``,
``set_down``, ``fail_next``, ``reset_faults``) are thread-safe and return at once.

Commands: hello, isMaster, ping, buildInfo, endSessions, insert, find, getMore,
killCursors, findAndModify, update, delete, count, aggregate, distinct, createIndexes,
listIndexes, dropIndexes, listCollections, listDatabases, create, drop and dropDatabase.
Any other command gets ``CommandNotFound`` (code 59).

Known differences from a real mongod:

- No TTL monitor. TTL indexes are stored and listed with ``expireAfterSeconds``, but the
  server never removes expired documents by itself. ``expire_documents()`` runs one pass.
- Error codes and messages are simplified: the common codes match mongod (11000, 26, 43,
  50, 59, 85, 86), but other input errors mostly get BadValue (2) with mongomock's text.
- Standalone only: no replication, no transactions (a command with ``txnNumber`` gets
  IllegalOperation, as on a standalone mongod), no authentication, TLS or compression.
- Query, update and aggregation semantics are mongomock's (4.3). Features that mongomock
  lacks, such as collation, ``arrayFilters`` and tailable cursors, get NotImplemented
  (code 238).
- Indexes keep only the ``unique``, ``sparse``, ``partialFilterExpression`` and
  ``expireAfterSeconds`` options and ignore the rest. Queries scan every document, so
  ``hint`` is ignored.
- A cursor returns its results as they were when it was opened. Cursors idle for 10
  minutes are closed, and ``set_down(True)`` closes all of them.
- ``readConcern`` and ``writeConcern`` are ignored: writes are applied at once and
  acknowledged, except that a request flagged ``moreToCome`` (``w: 0``) gets no reply.
- ``maxTimeMS`` is enforced only while a command waits out ``set_delay``.
- OP_QUERY is accepted only for the hello handshake. Other legacy opcodes and
  OP_COMPRESSED close the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import enum
import itertools
import logging
import math
import secrets
import signal
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import FrameType, TracebackType
from typing import Any, Final, Literal, TypeVar

import bson
import mongomock
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from mongomock import filtering as mongomock_filtering
from pymongo.errors import DuplicateKeyError, InvalidName, OperationFailure
from pymongo.results import UpdateResult

logger = logging.getLogger(__name__)

Document = dict[str, Any]
FaultMode = Literal["error", "drop", "hang"]
_T = TypeVar("_T")

HOST: Final = "127.0.0.1"
SERVER_VERSION: Final = "7.0.0"
MAX_WIRE_VERSION: Final = 21  # MongoDB 7.0
MAX_BSON_OBJECT_SIZE: Final = 16 * 1024 * 1024
MAX_MESSAGE_SIZE_BYTES: Final = 48_000_000
MAX_WRITE_BATCH_SIZE: Final = 100_000
LOGICAL_SESSION_TIMEOUT_MINUTES: Final = 30
DEFAULT_FIRST_BATCH_SIZE: Final = 101  # mongod's first batch for find and aggregate
CURSOR_IDLE_TIMEOUT_SECONDS: Final = 600.0  # mongod's default cursorTimeoutMillis

# Error codes and their names, as mongod sends them in ``code`` and ``codeName``.
INTERNAL_ERROR: Final = 1
BAD_VALUE: Final = 2
HOST_UNREACHABLE: Final = 6
FAILED_TO_PARSE: Final = 9
UNAUTHORIZED: Final = 13
TYPE_MISMATCH: Final = 14
INVALID_LENGTH: Final = 16
ILLEGAL_OPERATION: Final = 20
NAMESPACE_NOT_FOUND: Final = 26
INDEX_NOT_FOUND: Final = 27
CURSOR_NOT_FOUND: Final = 43
NAMESPACE_EXISTS: Final = 48
MAX_TIME_MS_EXPIRED: Final = 50
COMMAND_NOT_FOUND: Final = 59
INVALID_OPTIONS: Final = 72
INVALID_NAMESPACE: Final = 73
INDEX_OPTIONS_CONFLICT: Final = 85
INDEX_KEY_SPECS_CONFLICT: Final = 86
SHUTDOWN_IN_PROGRESS: Final = 91
NOT_IMPLEMENTED: Final = 238
UNSUPPORTED_OP_QUERY_COMMAND: Final = 352
DUPLICATE_KEY: Final = 11000
MISSING_DATABASE_ARGUMENT: Final = 40571

_CODE_NAMES: Final[dict[int, str]] = {
    INTERNAL_ERROR: "InternalError",
    BAD_VALUE: "BadValue",
    HOST_UNREACHABLE: "HostUnreachable",
    FAILED_TO_PARSE: "FailedToParse",
    UNAUTHORIZED: "Unauthorized",
    TYPE_MISMATCH: "TypeMismatch",
    INVALID_LENGTH: "InvalidLength",
    ILLEGAL_OPERATION: "IllegalOperation",
    NAMESPACE_NOT_FOUND: "NamespaceNotFound",
    INDEX_NOT_FOUND: "IndexNotFound",
    CURSOR_NOT_FOUND: "CursorNotFound",
    NAMESPACE_EXISTS: "NamespaceExists",
    MAX_TIME_MS_EXPIRED: "MaxTimeMSExpired",
    COMMAND_NOT_FOUND: "CommandNotFound",
    INVALID_OPTIONS: "InvalidOptions",
    INVALID_NAMESPACE: "InvalidNamespace",
    INDEX_OPTIONS_CONFLICT: "IndexOptionsConflict",
    INDEX_KEY_SPECS_CONFLICT: "IndexKeySpecsConflict",
    SHUTDOWN_IN_PROGRESS: "ShutdownInProgress",
    NOT_IMPLEMENTED: "NotImplemented",
    UNSUPPORTED_OP_QUERY_COMMAND: "UnsupportedOpQueryCommand",
    DUPLICATE_KEY: "DuplicateKey",
}

# Commands that a client sends to open and check connections. set_delay() leaves them
# alone unless asked, so server selection still works while data commands are slow.
_HANDSHAKE_COMMANDS: Final = frozenset({"hello", "isMaster", "ismaster"})
_UNDELAYED_COMMANDS: Final = _HANDSHAKE_COMMANDS | {"ping", "endSessions"}
_FAULT_MODES: Final = frozenset({"error", "drop", "hang"})

_OP_REPLY: Final = 1
_OP_QUERY: Final = 2004
_OP_MSG: Final = 2013
_HEADER: Final = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_OP_MSG_CHECKSUM_PRESENT: Final = 1
_OP_MSG_MORE_TO_COME: Final = 1 << 1
_OP_MSG_REQUIRED_BITS: Final = 0xFFFF  # the OP_MSG spec: reject unknown bits 0-15
_STREAM_LIMIT: Final = 1 << 20
_CONTROL_TIMEOUT_SECONDS: Final = 30.0
_DUMP_CODEC_OPTIONS: Final[CodecOptions[Document]] = CodecOptions(
    tz_aware=True, tzinfo=datetime.UTC
)


def error_reply(code: int, message: str) -> Document:
    """Build a failed command reply in mongod's shape: ``{ok: 0, errmsg, code, codeName}``."""
    return {
        "ok": 0.0,
        "errmsg": message,
        "code": int(code),
        "codeName": _CODE_NAMES.get(code, f"Location{code}"),
    }


class CommandError(Exception):
    """A command failure that the server sends to the client as an error reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ProtocolError(Exception):
    """A malformed or unsupported message: the server closes the connection."""


# Exceptions that mongomock raises for invalid input. Any other exception is a bug here.
_CLIENT_ERRORS: Final = (
    CommandError,
    OperationFailure,
    InvalidName,
    NotImplementedError,
    TypeError,
    ValueError,
)


def _describe_client_error(error: BaseException) -> tuple[int, str]:
    """Return the error code and message that a client gets for one of `_CLIENT_ERRORS`."""
    if isinstance(error, CommandError):
        return error.code, error.message
    if isinstance(error, DuplicateKeyError):
        return DUPLICATE_KEY, str(error) or "E11000 duplicate key error"
    if isinstance(error, OperationFailure):
        return error.code or BAD_VALUE, str(error)
    if isinstance(error, InvalidName):
        return INVALID_NAMESPACE, str(error)
    if isinstance(error, NotImplementedError):
        return NOT_IMPLEMENTED, f"not supported by the test server (mongomock): {error}"
    return BAD_VALUE, str(error)


# ---------------------------------------------------------------------------
# Wire protocol
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Request:
    """One decoded command message."""

    request_id: int
    database: str | None
    command: Document
    legacy: bool  # an OP_QUERY, which gets an OP_REPLY
    more_to_come: bool  # the client expects no reply


async def _read_message(reader: asyncio.StreamReader) -> tuple[int, int, bytes] | None:
    """Read one message and return its request id, opcode and payload; None at a clean EOF."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise _ProtocolError("connection closed inside a message header") from error
        return None
    length, request_id, _response_to, op_code = _HEADER.unpack(header)
    if not _HEADER.size < length <= MAX_MESSAGE_SIZE_BYTES:
        raise _ProtocolError(f"invalid message length {length}")
    payload = await reader.readexactly(length - _HEADER.size)
    return request_id, op_code, payload


def _decode_request(request_id: int, op_code: int, payload: bytes) -> _Request:
    """Decode an OP_MSG or OP_QUERY payload.

    Raises:
        _ProtocolError: the opcode is not supported or the payload is malformed.

    """
    try:
        if op_code == _OP_MSG:
            command, more_to_come = _decode_op_msg(payload)
            database = command.get("$db")
            return _Request(
                request_id,
                database if isinstance(database, str) else None,
                command,
                legacy=False,
                more_to_come=more_to_come,
            )
        if op_code == _OP_QUERY:
            namespace, command = _decode_op_query(payload)
            database, _, collection = namespace.partition(".")
            valid = collection == "$cmd" and bool(database)
            return _Request(
                request_id,
                database if valid else None,
                command,
                legacy=True,
                more_to_come=False,
            )
    except (BSONError, struct.error, ValueError, IndexError) as error:
        raise _ProtocolError(f"malformed message: {error}") from error
    raise _ProtocolError(f"unsupported opcode {op_code}")


def _decode_op_msg(payload: bytes) -> tuple[Document, bool]:
    """Decode OP_MSG flags and sections into one command document.

    Document sequences (kind 1 sections, such as the documents of ``insert_many``) become
    list fields of the command, named by their identifiers.
    """
    (flags,) = struct.unpack_from("<I", payload)
    unknown = flags & _OP_MSG_REQUIRED_BITS & ~(_OP_MSG_CHECKSUM_PRESENT | _OP_MSG_MORE_TO_COME)
    if unknown:
        raise _ProtocolError(f"unsupported OP_MSG flag bits {unknown:#x}")
    end = len(payload) - 4 if flags & _OP_MSG_CHECKSUM_PRESENT else len(payload)
    view = memoryview(payload)  # slices of a memoryview do not copy the documents
    position = 4
    body: Document | None = None
    sequences: dict[str, list[Document]] = {}
    while position < end:
        kind = payload[position]
        start = position + 1
        (size,) = struct.unpack_from("<i", payload, start)
        section_end = start + size
        if size < 5 or section_end > end:
            raise _ProtocolError(f"invalid OP_MSG section size {size}")
        if kind == 0:
            body = bson.decode(view[start:section_end])
        elif kind == 1:
            name_end = payload.index(b"\x00", start + 4, section_end)
            identifier = payload[start + 4 : name_end].decode()
            sequences[identifier] = bson.decode_all(view[name_end + 1 : section_end])
        else:
            raise _ProtocolError(f"unknown OP_MSG section kind {kind}")
        position = section_end
    if body is None:
        raise _ProtocolError("OP_MSG without a body section")
    for identifier, documents in sequences.items():
        if identifier in body:
            raise _ProtocolError(f"OP_MSG field {identifier!r} is both in the body and a sequence")
        body[identifier] = documents
    return body, bool(flags & _OP_MSG_MORE_TO_COME)


def _decode_op_query(payload: bytes) -> tuple[str, Document]:
    """Decode an OP_QUERY payload into its namespace and query document."""
    name_end = payload.index(b"\x00", 4)
    namespace = payload[4:name_end].decode()
    position = name_end + 1 + 8  # skip numberToSkip and numberToReturn
    (size,) = struct.unpack_from("<i", payload, position)
    query = bson.decode(payload[position : position + size])
    wrapped = query.get("$query")
    return namespace, wrapped if isinstance(wrapped, dict) else query


def _encode_op_msg(request_id: int, response_to: int, reply: Document) -> bytes:
    """Encode a reply as an OP_MSG with no flags and one body section."""
    body = bson.encode(reply)
    header = _HEADER.pack(_HEADER.size + 5 + len(body), request_id, response_to, _OP_MSG)
    return b"".join((header, b"\x00\x00\x00\x00\x00", body))


def _encode_op_reply(request_id: int, response_to: int, reply: Document) -> bytes:
    """Encode a reply to an OP_QUERY handshake as an OP_REPLY with one document."""
    body = bson.encode(reply)
    fields = struct.pack("<iqii", 0, 0, 0, 1)  # flags, cursorID, startingFrom, numberReturned
    header = _HEADER.pack(
        _HEADER.size + len(fields) + len(body), request_id, response_to, _OP_REPLY
    )
    return b"".join((header, fields, body))


# ---------------------------------------------------------------------------
# Command arguments
# ---------------------------------------------------------------------------


def _collection_name(command: Document, field: str) -> str:
    """Return the collection name in `field` of `command`."""
    value = command.get(field)
    if not isinstance(value, str):
        raise CommandError(
            INVALID_NAMESPACE, f"collection name has invalid type {type(value).__name__}"
        )
    if not value or "\x00" in value:
        raise CommandError(INVALID_NAMESPACE, f"invalid collection name {value!r}")
    return value


def _document_field(command: Document, field: str) -> Document:
    """Return the sub-document in `field`, or an empty one when the field is missing or null."""
    value = command.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CommandError(
            TYPE_MISMATCH, f"field '{field}' must be a document, not {type(value).__name__}"
        )
    return value


def _int_field(command: Document, field: str, default: int) -> int:
    """Return the number in `field` as an int, or `default` when it is missing or null."""
    value = command.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CommandError(TYPE_MISMATCH, f"field '{field}' must be a number, not {value!r}")
    return int(value)


def _write_statements(command: Document, field: str) -> list[Document]:
    """Return the statements of a write command, checked against the batch size limit."""
    statements = command.get(field)
    if not isinstance(statements, list):
        raise CommandError(FAILED_TO_PARSE, f"field '{field}' must be an array of documents")
    if not 0 < len(statements) <= MAX_WRITE_BATCH_SIZE:
        raise CommandError(
            INVALID_LENGTH,
            f"Write batch sizes must be between 1 and {MAX_WRITE_BATCH_SIZE}. "
            f"Got {len(statements)} operations.",
        )
    for statement in statements:
        if not isinstance(statement, dict):
            raise CommandError(TYPE_MISMATCH, f"every element of '{field}' must be a document")
    return statements


def _sort_list(sort: Document) -> list[tuple[str, Any]] | None:
    """Convert a sort document to the (key, direction) list that mongomock takes."""
    return list(sort.items()) or None


def _is_replacement(update: Any) -> bool:
    """Tell a replacement document from an operator update or a pipeline, as mongod does."""
    return isinstance(update, dict) and not (update and next(iter(update)).startswith("$"))


def _value_at_path(document: Document, path: str) -> Any:
    """Return the value at a dotted path, or None when a part is missing."""
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _write_reply(count: int, write_errors: list[Document], **fields: Any) -> Document:
    """Build the reply of insert, update or delete."""
    reply: Document = {"n": count, **fields}
    if write_errors:
        reply["writeErrors"] = write_errors
    reply["ok"] = 1.0
    return reply


def _write_error(index: int, error: BaseException) -> Document:
    """Build one entry of a write reply's ``writeErrors``."""
    code, message = _describe_client_error(error)
    return {"index": index, "code": code, "errmsg": message}


# ---------------------------------------------------------------------------
# Cursors
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    """An open server cursor: the encoded documents it has not returned yet."""

    namespace: str
    pending: collections.deque[bytes]
    last_used: float


def _take_batch(pending: collections.deque[bytes], max_count: int | None) -> list[RawBSONDocument]:
    """Take up to `max_count` documents, and at most 16 MiB of them unless the first is larger."""
    batch: list[RawBSONDocument] = []
    size = 0
    while pending and (max_count is None or len(batch) < max_count):
        if batch and size + len(pending[0]) > MAX_BSON_OBJECT_SIZE:
            break
        encoded = pending.popleft()
        size += len(encoded)
        batch.append(RawBSONDocument(encoded))
    return batch


class _CursorStore:
    """Server cursors by id, with mongod's batching rules."""

    def __init__(self) -> None:
        self._cursors: dict[int, _Cursor] = {}

    def first_batch(
        self,
        namespace: str,
        documents: Iterable[Document],
        max_count: int,
        *,
        single_batch: bool = False,
    ) -> Document:
        """Return a reply with the first batch of `documents`, and keep a cursor for the rest."""
        pending = collections.deque(bson.encode(document) for document in documents)
        batch = _take_batch(pending, max_count)
        cursor_id = 0
        if pending and not single_batch:
            self._close_idle()
            cursor_id = secrets.randbelow(2**62) + 1
            self._cursors[cursor_id] = _Cursor(namespace, pending, time.monotonic())
        return {
            "cursor": {"firstBatch": batch, "id": Int64(cursor_id), "ns": namespace},
            "ok": 1.0,
        }

    def next_batch(self, cursor_id: int, namespace: str, max_count: int | None) -> Document:
        """Return a getMore reply with the next batch of a cursor, closing it when drained.

        Raises:
            CommandError: no such cursor, or it belongs to another namespace.

        """
        cursor = self._cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(CURSOR_NOT_FOUND, f"cursor id {cursor_id} not found")
        if cursor.namespace != namespace:
            raise CommandError(
                UNAUTHORIZED,
                f"Requested getMore on namespace '{namespace}', "
                f"but cursor belongs to a different namespace {cursor.namespace}",
            )
        batch = _take_batch(cursor.pending, max_count)
        cursor.last_used = time.monotonic()
        if not cursor.pending:
            del self._cursors[cursor_id]
            cursor_id = 0
        return {
            "cursor": {"nextBatch": batch, "id": Int64(cursor_id), "ns": namespace},
            "ok": 1.0,
        }

    def kill(self, cursor_ids: Iterable[int]) -> tuple[list[Int64], list[Int64]]:
        """Close cursors and return the ids that were killed and those not found."""
        killed: list[Int64] = []
        not_found: list[Int64] = []
        for cursor_id in cursor_ids:
            found = self._cursors.pop(cursor_id, None) is not None
            (killed if found else not_found).append(Int64(cursor_id))
        return killed, not_found

    def close_namespace(self, namespace: str) -> None:
        """Close every cursor on a namespace, as dropping its collection does."""
        for cursor_id, cursor in list(self._cursors.items()):
            if cursor.namespace == namespace:
                del self._cursors[cursor_id]

    def close_all(self) -> None:
        """Close every cursor."""
        self._cursors.clear()

    def _close_idle(self) -> None:
        deadline = time.monotonic() - CURSOR_IDLE_TIMEOUT_SECONDS
        for cursor_id, cursor in list(self._cursors.items()):
            if cursor.last_used < deadline:
                del self._cursors[cursor_id]


# ---------------------------------------------------------------------------
# Commands on mongomock
# ---------------------------------------------------------------------------

_CommandHandler = Callable[[str, Document], Document]
_UNSUPPORTED_FIND_OPTIONS: Final = (
    "tailable",
    "awaitData",
    "collation",
    "min",
    "max",
    "returnKey",
    "showRecordId",
    "let",
)
_UNSUPPORTED_CREATE_OPTIONS: Final = (
    "capped",
    "validator",
    "timeseries",
    "clusteredIndex",
    "viewOn",
    "collation",
)
_ID_INDEX: Final[Document] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


class _MongomockBackend:
    """Runs database commands on a mongomock client and keeps their cursors.

    mongomock does not know TTL options here: this class keeps ``expireAfterSeconds``
    itself, because mongomock would otherwise remove expired documents whenever a
    collection is read, which no mongod does.
    """

    def __init__(self) -> None:
        self._client: mongomock.MongoClient[Document] = mongomock.MongoClient()
        self._cursors = _CursorStore()
        self._expire_after: dict[tuple[str, str, str], float] = {}
        self._handlers: dict[str, _CommandHandler] = {
            "ping": self._ping,
            "endSessions": self._ping,
            "buildInfo": self._build_info,
            "buildinfo": self._build_info,
            "insert": self._insert,
            "find": self._find,
            "getMore": self._get_more,
            "killCursors": self._kill_cursors,
            "findAndModify": self._find_and_modify,
            "update": self._update,
            "delete": self._delete,
            "count": self._count,
            "aggregate": self._aggregate,
            "distinct": self._distinct,
            "createIndexes": self._create_indexes,
            "listIndexes": self._list_indexes,
            "dropIndexes": self._drop_indexes,
            "listCollections": self._list_collections,
            "listDatabases": self._list_databases,
            "create": self._create,
            "drop": self._drop,
            "dropDatabase": self._drop_database,
        }

    def run(self, database: str, command: Document) -> Document:
        """Run one command on `database` and return its reply, an error reply on failure."""
        name = next(iter(command))
        handler = self._handlers.get(name)
        if handler is None:
            return error_reply(COMMAND_NOT_FOUND, f"no such command: '{name}'")
        if "txnNumber" in command or "startTransaction" in command:
            return error_reply(
                ILLEGAL_OPERATION,
                "Transaction numbers are only allowed on a replica set member or mongos",
            )
        try:
            return handler(database, command)
        except _CLIENT_ERRORS as error:
            code, message = _describe_client_error(error)
            logger.debug("command %s on %s failed with code %d: %s", name, database, code, message)
            return error_reply(code, message)
        except Exception:
            logger.exception("command %s on %s failed inside the test server", name, database)
            return error_reply(INTERNAL_ERROR, f"test server failed to run '{name}'")

    def dump(self) -> dict[str, dict[str, list[Document]]]:
        """Return copies of all stored documents by database and collection."""
        result: dict[str, dict[str, list[Document]]] = {}
        for database_name in self._client.list_database_names():
            database = self._client[database_name]
            result[database_name] = {
                name: [
                    bson.decode(bson.encode(document), _DUMP_CODEC_OPTIONS)
                    for document in database[name].find()
                ]
                for name in database.list_collection_names()
            }
        return result

    def clear(self) -> None:
        """Drop all databases and close all cursors."""
        self._client = mongomock.MongoClient()
        self._cursors.close_all()
        self._expire_after.clear()

    def close_cursors(self) -> None:
        """Close all cursors, as a mongod restart does."""
        self._cursors.close_all()

    def expire_documents(self, now: datetime.datetime) -> int:
        """Delete documents that their TTL index has expired and return how many."""
        cutoff_now = now.astimezone(datetime.UTC).replace(tzinfo=None)
        removed = 0
        for (database, name, index_name), seconds in list(self._expire_after.items()):
            collection = self._client[database][name]
            index = collection.index_information().get(index_name)
            if index is None or len(index["key"]) != 1:
                continue  # mongod ignores expireAfterSeconds on compound indexes
            field = index["key"][0][0]
            cutoff = cutoff_now - datetime.timedelta(seconds=seconds)
            removed += collection.delete_many({field: {"$lte": cutoff}}).deleted_count
        return removed

    # -- small commands ----------------------------------------------------

    def _ping(self, _database: str, _command: Document) -> Document:
        return {"ok": 1.0}

    def _build_info(self, _database: str, _command: Document) -> Document:
        return {
            "version": SERVER_VERSION,
            "versionArray": [int(part) for part in SERVER_VERSION.split(".")] + [0],
            "gitVersion": "0000000000000000000000000000000000000000",
            "bits": 64,
            "debug": False,
            "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
            "storageEngines": ["ephemeralForTest"],
            "ok": 1.0,
        }

    # -- writes ------------------------------------------------------------

    def _insert(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "insert")
        documents = _write_statements(command, "documents")
        ordered = bool(command.get("ordered", True))
        collection = self._client[database][name]
        inserted = 0
        write_errors: list[Document] = []

        for index, document in enumerate(documents):
            try:
                collection.insert_one(document)
            except DuplicateKeyError:
                write_errors.append(self._duplicate_key_error(index, database, name, document))
            except _CLIENT_ERRORS as error:
                write_errors.append(_write_error(index, error))
            else:
                inserted += 1
                continue
            if ordered:
                break

        return _write_reply(inserted, write_errors)

    def _duplicate_key_error(
        self, index: int, database: str, name: str, document: Document
    ) -> Document:
        """Build a write error for a duplicate key, naming the unique index it broke."""
        collection = self._client[database][name]
        message = f"E11000 duplicate key error collection: {database}.{name}"
        error: Document = {"index": index, "code": DUPLICATE_KEY, "errmsg": message}
        for index_name, information in collection.index_information().items():
            if index_name != "_id_" and not information.get("unique"):
                continue
            key_value = {field: _value_at_path(document, field) for field, _ in information["key"]}
            if collection.find_one(key_value) is not None:
                error["errmsg"] = f"{message} index: {index_name} dup key: {key_value}"
                error["keyPattern"] = dict(information["key"])
                error["keyValue"] = key_value
                break
        return error

    def _update(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "update")
        statements = _write_statements(command, "updates")
        ordered = bool(command.get("ordered", True))
        collection = self._client[database][name]
        matched = 0
        modified = 0
        upserted: list[Document] = []
        write_errors: list[Document] = []

        for index, statement in enumerate(statements):
            try:
                result = self._apply_update(
                    collection,
                    _document_field(statement, "q"),
                    statement.get("u"),
                    upsert=bool(statement.get("upsert", False)),
                    multi=bool(statement.get("multi", False)),
                    array_filters=statement.get("arrayFilters"),
                )
            except _CLIENT_ERRORS as error:
                write_errors.append(_write_error(index, error))
                if ordered:
                    break
                continue
            if result.upserted_id is not None:
                upserted.append({"index": index, "_id": result.upserted_id})
                matched += 1
            else:
                matched += result.matched_count
                modified += result.modified_count

        extra: Document = {"nModified": modified}
        if upserted:
            extra["upserted"] = upserted
        return _write_reply(matched, write_errors, **extra)

    @staticmethod
    def _apply_update(
        collection: Any,
        selector: Document,
        update: Any,
        *,
        upsert: bool,
        multi: bool,
        array_filters: Any = None,
    ) -> UpdateResult:
        """Apply a replacement, an operator update or a pipeline to matching documents."""
        if update is None:
            raise CommandError(FAILED_TO_PARSE, "the update statement has no 'u' field")
        if _is_replacement(update):
            if multi:
                raise CommandError(
                    FAILED_TO_PARSE, "multi update is not supported for replacement-style update"
                )
            result: UpdateResult = collection.replace_one(selector, update, upsert=upsert)
            return result
        method = collection.update_many if multi else collection.update_one
        result = method(selector, update, upsert=upsert, array_filters=array_filters)
        return result

    def _delete(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "delete")
        statements = _write_statements(command, "deletes")
        ordered = bool(command.get("ordered", True))
        collection = self._client[database][name]
        deleted = 0
        write_errors: list[Document] = []

        for index, statement in enumerate(statements):
            try:
                selector = _document_field(statement, "q")
                limit = _int_field(statement, "limit", 0)
                if limit not in (0, 1):
                    raise CommandError(
                        FAILED_TO_PARSE,
                        f"The limit field in delete objects must be 0 or 1. Got {limit}",
                    )
                method = collection.delete_one if limit == 1 else collection.delete_many
                deleted += method(selector).deleted_count
            except _CLIENT_ERRORS as error:
                write_errors.append(_write_error(index, error))
                if ordered:
                    break

        return _write_reply(deleted, write_errors)

    def _find_and_modify(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "findAndModify")
        query = _document_field(command, "query")
        sort = _document_field(command, "sort")
        fields = _document_field(command, "fields") or None
        remove = bool(command.get("remove", False))
        new = bool(command.get("new", False))
        upsert = bool(command.get("upsert", False))
        update = command.get("update")
        if remove and (update is not None or new or upsert):
            raise CommandError(
                FAILED_TO_PARSE, "remove=true cannot be combined with update, new or upsert"
            )
        if not remove and update is None:
            raise CommandError(
                FAILED_TO_PARSE, "Either an update or remove=true must be specified"
            )

        collection = self._client[database][name]
        found = collection.find_one(query, sort=_sort_list(sort))
        if found is None and not upsert:
            return {
                "lastErrorObject": {"n": 0, "updatedExisting": False},
                "value": None,
                "ok": 1.0,
            }
        if found is None:
            result = self._apply_update(
                collection,
                query,
                update,
                upsert=True,
                multi=False,
                array_filters=command.get("arrayFilters"),
            )
            selector = {"_id": result.upserted_id}
            value = collection.find_one(selector, projection=fields) if new else None
            last_error = {"n": 1, "updatedExisting": False, "upserted": result.upserted_id}
            return {"lastErrorObject": last_error, "value": value, "ok": 1.0}

        selector = {"_id": found["_id"]}
        before = collection.find_one(selector, projection=fields)
        if remove:
            collection.delete_one(selector)
            return {"lastErrorObject": {"n": 1}, "value": before, "ok": 1.0}
        self._apply_update(
            collection,
            selector,
            update,
            upsert=False,
            multi=False,
            array_filters=command.get("arrayFilters"),
        )
        value = collection.find_one(selector, projection=fields) if new else before
        return {"lastErrorObject": {"n": 1, "updatedExisting": True}, "value": value, "ok": 1.0}

    # -- reads -------------------------------------------------------------

    def _find(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "find")
        for option in _UNSUPPORTED_FIND_OPTIONS:
            if command.get(option):
                raise CommandError(
                    NOT_IMPLEMENTED, f"find option '{option}' is not supported by the test server"
                )
        skip = _int_field(command, "skip", 0)
        limit = _int_field(command, "limit", 0)
        if skip < 0 or limit < 0:
            raise CommandError(BAD_VALUE, "skip and limit values must be non-negative")
        batch_size = _int_field(command, "batchSize", DEFAULT_FIRST_BATCH_SIZE)
        if batch_size < 0:
            raise CommandError(BAD_VALUE, "batchSize value must be non-negative")
        cursor = self._client[database][name].find(
            _document_field(command, "filter"),
            projection=_document_field(command, "projection") or None,
            skip=skip,
            limit=limit,
            sort=_sort_list(_document_field(command, "sort")),
        )
        return self._cursors.first_batch(
            f"{database}.{name}",
            list(cursor),
            batch_size,
            single_batch=bool(command.get("singleBatch", False)),
        )

    def _get_more(self, database: str, command: Document) -> Document:
        cursor_id = command["getMore"]
        if isinstance(cursor_id, bool) or not isinstance(cursor_id, int):
            raise CommandError(TYPE_MISMATCH, "field 'getMore' must be a 64-bit integer")
        name = _collection_name(command, "collection")
        batch_size = _int_field(command, "batchSize", 0)
        return self._cursors.next_batch(
            cursor_id, f"{database}.{name}", batch_size if batch_size > 0 else None
        )

    def _kill_cursors(self, database: str, command: Document) -> Document:
        _collection_name(command, "killCursors")
        cursor_ids = command.get("cursors")
        if not isinstance(cursor_ids, list):
            raise CommandError(FAILED_TO_PARSE, "field 'cursors' must be an array of cursor ids")
        killed, not_found = self._cursors.kill(int(cursor_id) for cursor_id in cursor_ids)
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": not_found,
            "cursorsAlive": [],
            "cursorsUnknown": [],
            "ok": 1.0,
        }

    def _count(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "count")
        options: Document = {"skip": max(_int_field(command, "skip", 0), 0)}
        limit = abs(_int_field(command, "limit", 0))
        if limit:
            options["limit"] = limit  # 0 means no limit
        count = self._client[database][name].count_documents(
            _document_field(command, "query"), **options
        )
        return {"n": count, "ok": 1.0}

    def _aggregate(self, database: str, command: Document) -> Document:
        if not isinstance(command["aggregate"], str):
            raise CommandError(
                NOT_IMPLEMENTED, "database-level aggregate (aggregate: 1) is not supported"
            )
        name = _collection_name(command, "aggregate")
        pipeline = command.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(TYPE_MISMATCH, "field 'pipeline' must be an array of stages")
        if command.get("explain"):
            raise CommandError(NOT_IMPLEMENTED, "explain is not supported by the test server")
        if "cursor" not in command:
            raise CommandError(
                FAILED_TO_PARSE,
                "The 'cursor' option is required, except for aggregate with the explain argument",
            )
        batch_size = _int_field(_document_field(command, "cursor"), "batchSize", 101)
        documents = list(self._client[database][name].aggregate(pipeline))
        return self._cursors.first_batch(f"{database}.{name}", documents, batch_size)

    def _distinct(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "distinct")
        key = command.get("key")
        if not isinstance(key, str):
            raise CommandError(TYPE_MISMATCH, "field 'key' must be a string")
        query = _document_field(command, "query")
        values = self._client[database][name].distinct(key, query)
        return {"values": values, "ok": 1.0}

    # -- collections and indexes -------------------------------------------

    def _collection_exists(self, database: str, name: str) -> bool:
        return name in self._client[database].list_collection_names()

    def _index_specs(self, database: str, name: str) -> dict[str, Document]:
        """Return the index documents of a collection by name, as listIndexes shows them."""
        specs: dict[str, Document] = {"_id_": dict(_ID_INDEX)}
        information = self._client[database][name].index_information()
        for index_name, details in information.items():
            if index_name == "_id_":
                continue
            spec: Document = {"v": 2, "key": dict(details["key"]), "name": index_name}
            for option in ("unique", "sparse", "partialFilterExpression"):
                if option in details:
                    spec[option] = details[option]
            seconds = self._expire_after.get((database, name, index_name))
            if seconds is not None:
                spec["expireAfterSeconds"] = seconds
            specs[index_name] = spec
        return specs

    def _create_indexes(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "createIndexes")
        requested = command.get("indexes")
        if not isinstance(requested, list) or not requested:
            raise CommandError(FAILED_TO_PARSE, "field 'indexes' must be a non-empty array")
        created_collection = not self._collection_exists(database, name)
        existing = self._index_specs(database, name)
        before = len(existing)
        for request in requested:
            spec = _normalize_index_spec(request)
            if _find_matching_index(existing, spec):
                continue
            self._create_index(database, name, spec)
            existing[spec["name"]] = spec
        reply: Document = {
            "numIndexesBefore": before,
            "numIndexesAfter": len(existing),
            "createdCollectionAutomatically": created_collection,
            "ok": 1.0,
        }
        if len(existing) == before:
            reply["note"] = "all indexes already exist"
        return reply

    def _create_index(self, database: str, name: str, spec: Document) -> None:
        collection = self._client[database][name]
        options = {
            option: spec[option]
            for option in ("unique", "sparse", "partialFilterExpression")
            if option in spec
        }
        collection.create_index(list(spec["key"].items()), name=spec["name"], **options)
        if "expireAfterSeconds" in spec:
            self._expire_after[(database, name, spec["name"])] = spec["expireAfterSeconds"]

    def _list_indexes(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "listIndexes")
        if not self._collection_exists(database, name):
            raise CommandError(NAMESPACE_NOT_FOUND, f"ns does not exist: {database}.{name}")
        batch_size = _int_field(_document_field(command, "cursor"), "batchSize", 101)
        specs = list(self._index_specs(database, name).values())
        return self._cursors.first_batch(f"{database}.{name}", specs, batch_size)

    def _drop_indexes(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "dropIndexes")
        if not self._collection_exists(database, name):
            raise CommandError(NAMESPACE_NOT_FOUND, f"ns not found {database}.{name}")
        existing = self._index_specs(database, name)
        target = command.get("index")
        if target == "*":
            names = [index_name for index_name in existing if index_name != "_id_"]
        elif isinstance(target, str):
            names = [target]
        elif isinstance(target, list) and all(isinstance(item, str) for item in target):
            names = list(target)
        elif isinstance(target, dict):
            names = [
                n
                for n, spec in existing.items()
                if list(spec["key"].items()) == list(target.items())
            ]
            if not names:
                raise CommandError(INDEX_NOT_FOUND, f"can't find index with key: {target}")
        else:
            raise CommandError(TYPE_MISMATCH, "field 'index' must be a string, array or document")
        for index_name in names:
            if index_name == "_id_":
                raise CommandError(INVALID_OPTIONS, "cannot drop _id index")
            if index_name not in existing:
                raise CommandError(INDEX_NOT_FOUND, f"index not found with name [{index_name}]")
        collection = self._client[database][name]
        for index_name in names:
            collection.drop_index(index_name)
            self._expire_after.pop((database, name, index_name), None)
        return {"nIndexesWas": len(existing), "ok": 1.0}

    def _list_collections(self, database: str, command: Document) -> Document:
        query = _document_field(command, "filter")
        name_only = bool(command.get("nameOnly", False))
        infos: list[Document] = []
        for name in sorted(self._client[database].list_collection_names()):
            info: Document = {
                "name": name,
                "type": "collection",
                "options": {},
                "info": {"readOnly": False},
                "idIndex": dict(_ID_INDEX),
            }
            if not mongomock_filtering.filter_applies(query, info):  # type: ignore[no-untyped-call]
                continue
            infos.append({"name": name, "type": "collection"} if name_only else info)
        batch_size = _int_field(_document_field(command, "cursor"), "batchSize", 101)
        return self._cursors.first_batch(f"{database}.$cmd.listCollections", infos, batch_size)

    def _list_databases(self, database: str, command: Document) -> Document:
        if database != "admin":
            raise CommandError(
                UNAUTHORIZED, "listDatabases may only be run against the admin database."
            )
        query = _document_field(command, "filter")
        name_only = bool(command.get("nameOnly", False))
        databases: list[Document] = []
        for name in sorted(self._client.list_database_names()):
            entry: Document = {"name": name, "sizeOnDisk": 0, "empty": False}
            if mongomock_filtering.filter_applies(query, entry):  # type: ignore[no-untyped-call]
                databases.append({"name": name} if name_only else entry)
        reply: Document = {"databases": databases}
        if not name_only:
            reply["totalSize"] = 0
        reply["ok"] = 1.0
        return reply

    def _create(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "create")
        for option in _UNSUPPORTED_CREATE_OPTIONS:
            if command.get(option):
                raise CommandError(
                    NOT_IMPLEMENTED,
                    f"create option '{option}' is not supported by the test server",
                )
        if self._collection_exists(database, name):
            raise CommandError(NAMESPACE_EXISTS, f"Collection {database}.{name} already exists.")
        self._client[database].create_collection(name)
        return {"ok": 1.0}

    def _drop(self, database: str, command: Document) -> Document:
        name = _collection_name(command, "drop")
        if not self._collection_exists(database, name):
            # Recent mongod releases treat this as a no-op. PyMongo ignores the older
            # NamespaceNotFound reply either way.
            return {"ok": 1.0}
        index_count = len(self._index_specs(database, name))
        self._client[database].drop_collection(name)
        self._forget_collection(database, name)
        return {"nIndexesWas": index_count, "ns": f"{database}.{name}", "ok": 1.0}

    def _drop_database(self, database: str, _command: Document) -> Document:
        for name in self._client[database].list_collection_names():
            self._forget_collection(database, name)
        self._client.drop_database(database)
        return {"dropped": database, "ok": 1.0}

    def _forget_collection(self, database: str, name: str) -> None:
        self._cursors.close_namespace(f"{database}.{name}")
        for key in [key for key in self._expire_after if key[:2] == (database, name)]:
            del self._expire_after[key]


_INDEX_OPTIONS: Final = ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds")


def _normalize_index_spec(request: Any) -> Document:
    """Check one createIndexes entry and keep the fields this server supports."""
    if not isinstance(request, dict):
        raise CommandError(TYPE_MISMATCH, "every element of 'indexes' must be a document")
    key = request.get("key")
    if not isinstance(key, dict) or not key:
        raise CommandError(FAILED_TO_PARSE, "an index specification needs a non-empty 'key'")
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise CommandError(FAILED_TO_PARSE, "an index specification needs a string 'name'")
    spec: Document = {"v": 2, "key": dict(key), "name": name}
    for option in ("unique", "sparse"):
        if request.get(option):
            spec[option] = True
    if isinstance(request.get("partialFilterExpression"), dict):
        spec["partialFilterExpression"] = request["partialFilterExpression"]
    seconds = request.get("expireAfterSeconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise CommandError(
                INVALID_OPTIONS, "expireAfterSeconds must be a non-negative number of seconds"
            )
        spec["expireAfterSeconds"] = seconds
    return spec


def _find_matching_index(existing: dict[str, Document], spec: Document) -> bool:
    """Tell whether an equal index exists already.

    Raises:
        CommandError: an index has the same name or key but other options, as in mongod.

    """
    key = list(spec["key"].items())
    options = {option: spec.get(option) for option in _INDEX_OPTIONS}
    for name, other in existing.items():
        same_key = list(other["key"].items()) == key
        same_options = options == {option: other.get(option) for option in _INDEX_OPTIONS}
        if name == spec["name"]:
            if not same_key:
                raise CommandError(
                    INDEX_KEY_SPECS_CONFLICT,
                    f"An existing index has the same name as the requested index: {name}",
                )
            if not same_options:
                raise CommandError(
                    INDEX_OPTIONS_CONFLICT,
                    f"An equivalent index already exists with different options: {name}",
                )
            return True
        if same_key:
            raise CommandError(
                INDEX_OPTIONS_CONFLICT,
                f"Index already exists with a different name: {name}",
            )
    return False


# ---------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Fault:
    """A planned failure of the next `remaining` matching commands."""

    command: str
    collection: str | None
    remaining: int
    mode: FaultMode
    code: int
    message: str


def _collection_of(command: Document) -> str | None:
    """Return the collection that a command works on, or None."""
    name = next(iter(command))
    value = command.get("collection") if name == "getMore" else command[name]
    return value if isinstance(value, str) else None


class _FaultPlan:
    """The delay and planned failures, shared between the caller's and the server's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0
        self._delay_handshake = False
        self._faults: list[_Fault] = []

    def set_delay(self, seconds: float, delay_handshake: bool) -> None:
        with self._lock:
            self._delay = seconds
            self._delay_handshake = delay_handshake

    def delay_for(self, command_name: str) -> float:
        with self._lock:
            if command_name in _UNDELAYED_COMMANDS and not self._delay_handshake:
                return 0.0
            return self._delay

    def add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, command_name: str, collection: str | None) -> _Fault | None:
        """Consume one use of the first fault that matches a command, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.command != command_name:
                    continue
                if fault.collection is not None and fault.collection != collection:
                    continue
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    def reset(self) -> None:
        with self._lock:
            self._delay = 0.0
            self._delay_handshake = False
            self._faults.clear()


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class _NoReply(enum.Enum):
    """What to do with a connection instead of replying."""

    DROP = "drop"  # close it at once
    HANG = "hang"  # keep it open and silent until the client closes it
    GONE = "gone"  # the client closed it while the command waited


@dataclasses.dataclass
class _Connection:
    """One client connection and the task that serves it."""

    connection_id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None

    def is_closed(self) -> bool:
        return (
            self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None
        )


def _run_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run `loop` until stopped, then cancel its tasks and close it (the server thread's body)."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class MongoTestServer:
    """A MongoDB wire-protocol server on 127.0.0.1 that keeps its data in mongomock.

    Use it as a context manager, or call `start` and `stop`. See the module docstring
    for what it supports and how it differs from mongod.
    """

    def __init__(self, port: int = 0) -> None:
        """Prepare a server for `port` on 127.0.0.1. Port 0 lets the system pick a free port."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, not {port}")
        self._port = port
        self._backend = _MongomockBackend()
        self._faults = _FaultPlan()
        self._lifecycle_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The attributes below belong to the server thread.
        self._listener: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._connection_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._down = False
        self._closing = False

    def __enter__(self) -> MongoTestServer:
        """Start the server and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port, known only after `start` when the server was created with port 0."""
        if self._port == 0:
            raise RuntimeError("the port is assigned when the server starts")
        return self._port

    @property
    def uri(self) -> str:
        """The connection string for PyMongo, with ``directConnection=true``."""
        return f"mongodb://{HOST}:{self.port}/?directConnection=true"

    def start(self) -> None:
        """Bind 127.0.0.1 and serve in a new thread. A restart keeps the data and the port.

        Raises:
            RuntimeError: the server is running already.
            OSError: the port cannot be bound.

        """
        with self._lifecycle_lock:
            if self._loop is not None:
                raise RuntimeError("the MongoDB test server is running already")
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_run_event_loop, args=(loop,), name="mongo-test-server", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                self._call_in_server_thread(self._listen())
            except BaseException:
                self._stop_event_loop()
                raise
        logger.info("listening on %s:%d", HOST, self._port)

    def stop(self) -> None:
        """Close the listener and every connection, and end the server thread.

        Calling it again does nothing. Stored data stays, so `start` serves it again.
        """
        with self._lifecycle_lock:
            if self._loop is None:
                return
            try:
                self._call_in_server_thread(self._close())
            finally:
                self._stop_event_loop()
        logger.info("stopped listening on %s:%d", HOST, self._port)

    def set_delay(self, seconds: float, *, delay_handshake: bool = False) -> None:
        """Make every command wait `seconds` before it runs. 0 restores normal service.

        hello, isMaster, ping and endSessions are not delayed unless `delay_handshake` is
        true, so the driver still finds the server. A command whose ``maxTimeMS`` is shorter
        than the delay gets MaxTimeMSExpired (code 50) after ``maxTimeMS`` and does not run,
        as in mongod. A command whose client closes the connection during the wait does not
        run either.

        Raises:
            ValueError: `seconds` is negative or not finite.

        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a non-negative number of seconds, not {seconds}")
        self._faults.set_delay(seconds, delay_handshake)

    def set_down(self, down: bool) -> None:
        """Act like a stopped mongod (True) or a restarted one (False), on the same port.

        While down, the server drops every open connection, closes every cursor and
        closes each new connection as soon as it is accepted. Stored data stays. After
        `set_down(False)`, PyMongo finds the server at its next heartbeat, which comes at
        most about 0.5 s after an operation starts waiting in server selection.

        NOTE: PyMongo 4.20.1 can leak a socket (a ResourceWarning) when a client is closed
        while its server is unreachable, a stopped mongod included: its monitor's connect
        does not close the socket on cancellation. Call `set_down(False)` before closing.

        Raises:
            RuntimeError: the server is not running.

        """
        with self._lifecycle_lock:
            if self._loop is None:
                raise RuntimeError("the MongoDB test server is not running")
            self._call_in_server_thread(self._set_down(down))

    def fail_next(
        self,
        command: str,
        *,
        collection: str | None = None,
        count: int = 1,
        mode: FaultMode = "error",
        code: int = INTERNAL_ERROR,
        message: str | None = None,
    ) -> None:
        """Make the next `count` commands named `command` fail.

        Matching is by exact command name ("insert", "find", "findAndModify", "getMore",
        ...) and, when `collection` is given, by collection. Modes:

        - "error": reply ``{ok: 0, code, codeName, errmsg}`` without running the command.
          The default code InternalError (1) is one that PyMongo never retries. Codes such
          as HostUnreachable (6) or ShutdownInProgress (91) are retryable: PyMongo retries
          a read once on them, so `count` must be 2 to make that read fail.
        - "drop": close the connection without a reply; PyMongo raises AutoReconnect.
          PyMongo retries a read once after a network error (never a write on a
          standalone), so `count` must be 2 to make a read fail.
        - "hang": never reply and never run the command, until the client gives up
          (PyMongo's ``timeoutMS``) and closes the connection.

        Raises:
            ValueError: `command` is empty, `count` is below 1 or `mode` is unknown.

        """
        if not command:
            raise ValueError("command must name a database command, such as 'insert'")
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if mode not in _FAULT_MODES:
            raise ValueError(f"mode must be one of {sorted(_FAULT_MODES)}, not {mode!r}")
        text = message or f"test server: injected failure of '{command}'"
        self._faults.add(_Fault(command, collection, count, mode, code, text))

    def reset_faults(self) -> None:
        """Cancel the delay and all planned failures (not `set_down`)."""
        self._faults.reset()

    def dump(self) -> dict[str, dict[str, list[Document]]]:
        """Return copies of all stored documents as ``{database: {collection: [document]}}``.

        The copies are decoded from BSON as PyMongo with ``tz_aware=True`` decodes them:
        dates are timezone-aware UTC datetimes, binary subtype 0 is bytes.
        """
        return self._with_backend(lambda backend: backend.dump())

    def clear(self) -> None:
        """Drop every database, index and cursor."""
        self._with_backend(lambda backend: backend.clear())

    def expire_documents(self, now: datetime.datetime | None = None) -> int:
        """Delete the documents that their TTL index has expired, as mongod's TTL monitor does.

        A document expires when the date in the indexed field plus ``expireAfterSeconds``
        is at or before `now`. For an array of dates, the earliest date counts. `now` must
        be timezone-aware and defaults to the current time. Returns the number deleted.
        """
        moment = now or datetime.datetime.now(datetime.UTC)
        if moment.tzinfo is None:
            raise ValueError("now must be a timezone-aware datetime")
        return self._with_backend(lambda backend: backend.expire_documents(moment))

    # -- thread plumbing ---------------------------------------------------

    def _call_in_server_thread(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the server's event loop and wait for its result."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=_CONTROL_TIMEOUT_SECONDS)

    def _with_backend(self, function: Callable[[_MongomockBackend], _T]) -> _T:
        """Call `function` with the backend, on the server thread while the server runs."""
        with self._lifecycle_lock:
            if self._loop is None:
                return function(self._backend)

            async def call() -> _T:
                return function(self._backend)

            return self._call_in_server_thread(call())

    def _stop_event_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CONTROL_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise RuntimeError("the MongoDB test server thread did not stop")
        self._loop = None
        self._thread = None

    # -- server thread -----------------------------------------------------

    async def _listen(self) -> None:
        self._closing = False
        self._down = False
        self._listener = await asyncio.start_server(
            self._serve_connection, HOST, self._port, limit=_STREAM_LIMIT
        )
        self._port = self._listener.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        await self._drop_connections()
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        self._backend.close_cursors()

    async def _set_down(self, down: bool) -> None:
        self._down = down
        if down:
            await self._drop_connections()
            self._backend.close_cursors()
        logger.info("MongoDB test server on port %d is %s", self._port, "down" if down else "up")

    async def _drop_connections(self) -> None:
        connections = list(self._connections.values())
        for connection in connections:
            connection.writer.transport.abort()
            if connection.task is not None:
                connection.task.cancel()
        tasks = [connection.task for connection in connections if connection.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._down or self._closing:
            writer.transport.abort()
            return
        connection = _Connection(
            next(self._connection_ids), reader, writer, asyncio.current_task()
        )
        self._connections[connection.connection_id] = connection
        try:
            await self._serve_messages(connection)
        except asyncio.CancelledError:
            # The server dropped the connection (set_down or stop). The task ends normally
            # because asyncio 3.11's stream callback logs a cancelled task as an error.
            logger.debug("connection %d dropped by the server", connection.connection_id)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug("connection %d closed by the client", connection.connection_id)
        except _ProtocolError as error:
            logger.warning("closing connection %d: %s", connection.connection_id, error)
        except Exception:
            logger.exception("connection %d failed", connection.connection_id)
        finally:
            self._connections.pop(connection.connection_id, None)
            writer.transport.abort()

    async def _serve_messages(self, connection: _Connection) -> None:
        while True:
            message = await _read_message(connection.reader)
            if message is None:
                return
            request = _decode_request(*message)
            outcome = await self._execute(connection, request)
            if outcome is _NoReply.HANG:
                await _discard_until_closed(connection.reader)
                return
            if isinstance(outcome, _NoReply):
                return
            if request.more_to_come:
                continue
            encode = _encode_op_reply if request.legacy else _encode_op_msg
            connection.writer.write(encode(next(self._request_ids), request.request_id, outcome))
            await connection.writer.drain()

    async def _execute(self, connection: _Connection, request: _Request) -> Document | _NoReply:
        """Apply faults and delays to a request, then run it.

        Returns the reply, or what to do with the connection instead of replying.
        """
        command = request.command
        if not command:
            return error_reply(FAILED_TO_PARSE, "the command document is empty")
        name = next(iter(command))
        if request.legacy and name not in _HANDSHAKE_COMMANDS:
            return error_reply(
                UNSUPPORTED_OP_QUERY_COMMAND,
                f"Unsupported OP_QUERY command: {name}. Use OP_MSG for every command but hello.",
            )
        if request.database is None:
            return error_reply(MISSING_DATABASE_ARGUMENT, "OP_MSG requests require a $db argument")

        fault = self._faults.take(name, _collection_of(command))
        if fault is not None and fault.mode == "hang":
            logger.info("connection %d: hanging on '%s'", connection.connection_id, name)
            return _NoReply.HANG
        delay = self._faults.delay_for(name)
        if delay > 0:
            interruption = await _wait_out_delay(connection, delay, command.get("maxTimeMS"))
            if interruption is not None:
                return interruption
        if fault is not None:
            logger.info(
                "connection %d: injected %s on '%s'", connection.connection_id, fault.mode, name
            )
            if fault.mode == "drop":
                return _NoReply.DROP
            return error_reply(fault.code, fault.message)

        if name in _HANDSHAKE_COMMANDS:
            return _hello_reply(name, command, connection.connection_id)
        return self._backend.run(request.database, command)


def _hello_reply(name: str, command: Document, connection_id: int) -> Document:
    """Build the reply of a standalone mongod to hello or isMaster."""
    reply: Document = {"isWritablePrimary" if name == "hello" else "ismaster": True}
    if command.get("helloOk"):
        reply["helloOk"] = True
    reply.update(
        maxBsonObjectSize=MAX_BSON_OBJECT_SIZE,
        maxMessageSizeBytes=MAX_MESSAGE_SIZE_BYTES,
        maxWriteBatchSize=MAX_WRITE_BATCH_SIZE,
        localTime=datetime.datetime.now(datetime.UTC),
        logicalSessionTimeoutMinutes=LOGICAL_SESSION_TIMEOUT_MINUTES,
        connectionId=connection_id,
        minWireVersion=0,
        maxWireVersion=MAX_WIRE_VERSION,
        readOnly=False,
        ok=1.0,
    )
    return reply


async def _wait_out_delay(
    connection: _Connection, delay: float, max_time_ms: Any
) -> Document | _NoReply | None:
    """Wait before a command runs and return what replaces its reply, or None to run it."""
    limited = isinstance(max_time_ms, (int, float)) and not isinstance(max_time_ms, bool)
    if limited and 0 < max_time_ms < delay * 1000:
        await asyncio.sleep(max_time_ms / 1000)
        if connection.is_closed():
            return _NoReply.GONE
        return error_reply(MAX_TIME_MS_EXPIRED, "operation exceeded time limit")
    await asyncio.sleep(delay)
    return _NoReply.GONE if connection.is_closed() else None


async def _discard_until_closed(reader: asyncio.StreamReader) -> None:
    """Read and drop whatever the client sends until it closes the connection."""
    while await reader.read(1 << 16):
        pass


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server in the foreground until SIGINT or SIGTERM and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.mongo_server",
        description="Serve the MongoDB wire protocol on 127.0.0.1 with data kept in memory "
        "(mongomock), for tests and benchmarks.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=27017,
        help="TCP port to listen on (0 picks a free port, default: 27017)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    stop_requested = threading.Event()

    def request_stop(signal_number: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server = MongoTestServer(arguments.port)
    try:
        server.start()
    except OSError as error:
        logger.error("cannot listen on %s:%d: %s", HOST, arguments.port, error)
        return 1
    try:
        stop_requested.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
