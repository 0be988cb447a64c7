"""The MongoDB wire-protocol test server, driven by the real PyMongo async client."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import bson
import pymongo
import pytest
from gridfs import AsyncGridFSBucket
from pymongo import AsyncMongoClient, ReturnDocument, WriteConcern, monitoring
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from tests.mongo_server import (
    COMMAND_NOT_FOUND,
    DUPLICATE_KEY,
    HOST_UNREACHABLE,
    INDEX_OPTIONS_CONFLICT,
    INTERNAL_ERROR,
    MongoTestServer,
)

Document = dict[str, Any]
Client = AsyncMongoClient[Document]
T = TypeVar("T")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


class CommandLog(monitoring.CommandListener):
    """Names of the commands that a client started, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def server() -> Iterator[MongoTestServer]:
    with MongoTestServer() as test_server:
        yield test_server


def run(server: MongoTestServer, scenario: Callable[[Client], Awaitable[T]], **options: Any) -> T:
    """Run `scenario` with a fresh client on a new event loop and close the client after."""

    async def main() -> T:
        options.setdefault("serverSelectionTimeoutMS", 2000)
        client: Client = AsyncMongoClient(server.uri, tz_aware=True, **options)
        try:
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(main())


# -- documents and cursors ----------------------------------------------------


def test_insert_and_find_round_trip(server: MongoTestServer) -> None:
    moment = datetime.datetime(2026, 5, 14, 12, 30, 15, 123000, tzinfo=datetime.UTC)

    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_one({"_id": "a", "at": moment, "blob": b"\x00\xff", "tags": ["x"]})
        await items.insert_many([{"_id": f"b{i}", "rank": i} for i in range(5)])

        found = await items.find_one({"_id": "a"})
        assert found == {"_id": "a", "at": moment, "blob": b"\x00\xff", "tags": ["x"]}
        assert found is not None and found["at"].tzinfo is not None
        assert await items.find_one({"at": {"$lt": moment}}) is None
        assert await items.count_documents({"rank": {"$gte": 2}}) == 3
        assert await items.estimated_document_count() == 6

    run(server, scenario)


def test_unacknowledged_write_is_applied(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        fire_and_forget = client.shop.get_collection("items", write_concern=WriteConcern(w=0))
        await fire_and_forget.insert_one({"_id": "quiet"})

        assert await client.shop.items.find_one({"_id": "quiet"}) == {"_id": "quiet"}

    run(server, scenario)


def test_find_options_are_applied(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_many([{"_id": i, "rank": i % 3, "name": f"n{i}"} for i in range(10)])

        cursor = items.find(
            {"rank": {"$in": [0, 2]}},
            projection={"name": 1, "_id": 0},
            sort=[("rank", -1), ("_id", 1)],
            skip=1,
            limit=4,
        )
        assert await cursor.to_list() == [
            {"name": "n5"},
            {"name": "n8"},
            {"name": "n0"},
            {"name": "n3"},
        ]
        single = await items.find({}, sort=[("_id", 1)], limit=-2).to_list()
        assert [document["_id"] for document in single] == [0, 1]

    run(server, scenario)


def test_cursor_batches_use_get_more(server: MongoTestServer) -> None:
    log = CommandLog()

    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_many([{"_id": i} for i in range(250)])

        documents = await items.find({}, batch_size=40, sort=[("_id", 1)]).to_list()
        assert [document["_id"] for document in documents] == list(range(250))
        assert log.names.count("getMore") == 6

        cursor = items.find({}, batch_size=10)
        await cursor.next()
        await cursor.close()
        assert log.names[-1] == "killCursors"

    run(server, scenario, event_listeners=[log])


def test_get_more_on_unknown_cursor_fails(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        with pytest.raises(OperationFailure) as raised:
            await client.shop.command({"getMore": bson.Int64(12345), "collection": "items"})
        assert raised.value.code == 43

    run(server, scenario)


# -- writes -------------------------------------------------------------------


def test_duplicate_id_raises_duplicate_key_error(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        await client.shop.items.insert_one({"_id": "same"})

        with pytest.raises(DuplicateKeyError) as raised:
            await client.shop.items.insert_one({"_id": "same"})
        assert raised.value.code == DUPLICATE_KEY
        assert raised.value.details is not None
        assert raised.value.details["keyValue"] == {"_id": "same"}

    run(server, scenario)


def test_unique_index_rejects_duplicates(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        users = client.shop.users
        await users.create_index("email", unique=True)
        await users.insert_one({"email": "a@example.org"})

        with pytest.raises(DuplicateKeyError) as raised:
            await users.insert_one({"email": "a@example.org"})
        assert raised.value.details is not None
        assert raised.value.details["keyPattern"] == {"email": 1}

        batch = [{"email": "b@example.org"}, {"email": "a@example.org"}, {"email": "c"}]
        with pytest.raises(BulkWriteError) as bulk:
            await users.insert_many(batch)
        assert bulk.value.details["nInserted"] == 1
        assert bulk.value.details["writeErrors"][0]["index"] == 1
        assert await users.count_documents({}) == 2

    run(server, scenario)


def test_find_one_and_update_upserts_then_increments(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        counters = client.shop.counters
        after = ReturnDocument.AFTER

        first = await counters.find_one_and_update(
            {"_id": "hits"}, {"$inc": {"n": 1}}, upsert=True, return_document=after
        )
        second = await counters.find_one_and_update(
            {"_id": "hits"}, {"$inc": {"n": 1}, "$set": {"seen": True}}, return_document=after
        )
        before = await counters.find_one_and_update(
            {"_id": "hits"}, {"$inc": {"n": 5}}, projection={"n": 1, "_id": 0}
        )
        missing = await counters.find_one_and_update({"_id": "none"}, {"$inc": {"n": 1}})

        assert first == {"_id": "hits", "n": 1}
        assert second == {"_id": "hits", "n": 2, "seen": True}
        assert before == {"n": 2}
        assert missing is None
        assert await counters.find_one({"_id": "hits"}) == {"_id": "hits", "n": 7, "seen": True}

    run(server, scenario)


def test_find_one_and_delete_has_one_winner(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        secrets_collection = client.shop.secrets
        await secrets_collection.insert_one({"_id": "only", "payload": b"x"})

        results = await asyncio.gather(
            *(secrets_collection.find_one_and_delete({"_id": "only"}) for _ in range(20))
        )
        winners = [result for result in results if result is not None]
        assert winners == [{"_id": "only", "payload": b"x"}]
        assert await secrets_collection.count_documents({}) == 0

    run(server, scenario)


def test_update_and_delete_report_counts(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_many([{"_id": i, "kind": "odd" if i % 2 else "even"} for i in range(6)])

        many = await items.update_many({"kind": "odd"}, {"$set": {"flag": True}})
        upsert = await items.update_one({"_id": 99}, {"$set": {"kind": "new"}}, upsert=True)
        replaced = await items.replace_one({"_id": 0}, {"kind": "replaced"})
        one = await items.delete_one({"kind": "even"})
        rest = await items.delete_many({"kind": "odd"})

        assert (many.matched_count, many.modified_count) == (3, 3)
        assert upsert.upserted_id == 99
        assert replaced.modified_count == 1
        assert await items.find_one({"_id": 0}) == {"_id": 0, "kind": "replaced"}
        assert one.deleted_count == 1
        assert rest.deleted_count == 3
        assert await items.count_documents({}) == 3

    run(server, scenario)


# -- GridFS -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [(6 * MiB, 32 * 1024), (32 * MiB, 256 * 1024)],
    ids=["6MiB-in-192-chunks", "32MiB-in-128-chunks"],
)
def test_gridfs_round_trip(server: MongoTestServer, size: int, chunk_size: int) -> None:
    data = os.urandom(size)
    log = CommandLog()

    async def scenario(client: Client) -> None:
        bucket = AsyncGridFSBucket(client.files, chunk_size_bytes=chunk_size)
        file_id = await bucket.upload_from_stream("payload.bin", data)

        stream = await bucket.open_download_stream(file_id)
        assert await stream.read() == data
        assert log.names.count("getMore") >= 1

        await bucket.delete(file_id)
        assert await client.files["fs.chunks"].count_documents({}) == 0

    run(server, scenario, event_listeners=[log])


# -- indexes, aggregation and collections ---------------------------------------


def test_indexes_are_created_and_listed(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        records = client.shop.records
        await records.create_index("expires_at", expireAfterSeconds=0)
        await records.create_index([("owner", 1), ("name", -1)], unique=True, name="owner_name")
        await records.create_index("expires_at", expireAfterSeconds=0)  # already exists

        indexes = {index["name"]: index async for index in await records.list_indexes()}
        assert set(indexes) == {"_id_", "expires_at_1", "owner_name"}
        assert indexes["expires_at_1"]["expireAfterSeconds"] == 0
        assert indexes["owner_name"]["unique"] is True
        assert list(indexes["owner_name"]["key"].items()) == [("owner", 1), ("name", -1)]

        with pytest.raises(OperationFailure) as raised:
            await records.create_index("expires_at", expireAfterSeconds=60)
        assert raised.value.code == INDEX_OPTIONS_CONFLICT

        await records.drop_index("owner_name")
        assert "owner_name" not in await records.index_information()
        assert [index async for index in await client.shop.missing.list_indexes()] == []

    run(server, scenario)


def test_ttl_documents_stay_until_expire_documents(server: MongoTestServer) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    future = past + datetime.timedelta(hours=1)

    async def scenario(client: Client) -> None:
        records = client.shop.records
        await records.create_index("expires_at", expireAfterSeconds=0)
        await records.insert_many(
            [{"_id": "old", "expires_at": past}, {"_id": "new", "expires_at": future}]
        )
        assert await records.count_documents({}) == 2

    run(server, scenario)

    assert server.expire_documents() == 1
    assert [document["_id"] for document in server.dump()["shop"]["records"]] == ["new"]


def test_aggregate_pipeline_stages(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        orders = client.shop.orders
        await client.shop.customers.insert_many(
            [{"_id": 1, "name": "Ada"}, {"_id": 2, "name": "Bob"}]
        )
        await orders.insert_many(
            [
                {"customer": 1, "total": 10},
                {"customer": 1, "total": 5},
                {"customer": 2, "total": 7},
            ]
        )

        grouped = await (
            await orders.aggregate(
                [
                    {"$match": {"total": {"$gte": 5}}},
                    {"$group": {"_id": "$customer", "sum": {"$sum": "$total"}}},
                    {"$sort": {"sum": -1}},
                    {"$limit": 1},
                    {"$project": {"_id": 0, "customer": "$_id", "sum": 1}},
                ]
            )
        ).to_list()
        counted = await (await orders.aggregate([{"$count": "n"}])).to_list()
        joined = await (
            await orders.aggregate(
                [
                    {"$match": {"customer": 2}},
                    {
                        "$lookup": {
                            "from": "customers",
                            "localField": "customer",
                            "foreignField": "_id",
                            "as": "who",
                        }
                    },
                ]
            )
        ).to_list()

        assert grouped == [{"customer": 1, "sum": 15}]
        assert counted == [{"n": 3}]
        assert joined[0]["who"] == [{"_id": 2, "name": "Bob"}]

    run(server, scenario)


def test_distinct_returns_unique_values(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_many([{"color": "red"}, {"color": "blue"}, {"color": "red"}])

        assert sorted(await items.distinct("color")) == ["blue", "red"]
        assert await items.distinct("color", {"color": "blue"}) == ["blue"]

    run(server, scenario)


def test_collections_are_listed_and_dropped(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        shop = client.shop
        await shop.create_collection("empty")
        await shop.items.insert_one({"_id": 1})
        assert sorted(await shop.list_collection_names()) == ["empty", "items"]
        assert await shop.list_collection_names(filter={"name": "items"}) == ["items"]
        assert "shop" in await client.list_database_names()

        await shop.drop_collection("items")
        await shop.drop_collection("never-existed")
        assert await shop.list_collection_names() == ["empty"]

        await client.drop_database("shop")
        assert "shop" not in await client.list_database_names()

    run(server, scenario)


def test_unknown_command_is_command_not_found(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        with pytest.raises(OperationFailure) as raised:
            await client.shop.command("frobnicate")
        assert raised.value.code == COMMAND_NOT_FOUND
        assert "frobnicate" in str(raised.value)

    run(server, scenario)


# -- fault injection ----------------------------------------------------------


def test_delay_past_timeout_raises_timeout(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        await client.admin.command("ping")
        server.set_delay(2.0)
        started = time.monotonic()
        with pytest.raises(PyMongoError) as raised, pymongo.timeout(0.3):
            await client.shop.items.insert_one({"_id": "late"})
        assert raised.value.timeout
        assert time.monotonic() - started < 1.5

        server.set_delay(0)
        await client.shop.items.insert_one({"_id": "on-time"})

    run(server, scenario)

    stored = [document["_id"] for document in server.dump()["shop"]["items"]]
    assert stored == ["on-time"]


def test_delay_within_timeout_only_slows(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> float:
        await client.admin.command("ping")
        server.set_delay(0.2)
        started = time.monotonic()
        await client.shop.items.insert_one({"_id": 1})
        return time.monotonic() - started

    assert run(server, scenario, timeoutMS=5000) >= 0.2


def test_set_down_fails_then_recovers_same_client(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        items = client.shop.items
        await items.insert_one({"_id": "kept"})

        server.set_down(True)
        with pytest.raises(ConnectionFailure), pymongo.timeout(0.5):
            await items.find_one({"_id": "kept"})
        with pytest.raises(ConnectionFailure), pymongo.timeout(0.5):
            await items.insert_one({"_id": "lost"})

        # PyMongo finds the server again at its next heartbeat, within about 0.5 s.
        server.set_down(False)
        assert await items.find_one({"_id": "kept"}) == {"_id": "kept"}

    run(server, scenario, serverSelectionTimeoutMS=5000)


def test_fail_next_error_mode(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        server.fail_next("insert", collection="items", count=2)
        server.fail_next("findAndModify", code=HOST_UNREACHABLE, message="network is down")

        await client.shop.other.insert_one({"_id": 1})  # another collection: not failed
        for attempt in range(2):
            with pytest.raises(OperationFailure) as raised:
                await client.shop.items.insert_one({"_id": attempt})
            assert raised.value.code == INTERNAL_ERROR
        await client.shop.items.insert_one({"_id": "third"})

        with pytest.raises(OperationFailure) as unreachable:
            await client.shop.items.find_one_and_delete({"_id": "third"})
        assert unreachable.value.code == HOST_UNREACHABLE
        assert "network is down" in str(unreachable.value)

    run(server, scenario)

    assert [document["_id"] for document in server.dump()["shop"]["items"]] == ["third"]


def test_fail_next_drop_mode(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        server.fail_next("insert", mode="drop")
        with pytest.raises(AutoReconnect):
            await client.shop.items.insert_one({"_id": "dropped"})

        server.fail_next("find", mode="drop", count=2)  # PyMongo retries a read once
        with pytest.raises(AutoReconnect):
            await client.shop.items.find_one({})

        await client.shop.items.insert_one({"_id": "after"})

    run(server, scenario)

    assert [document["_id"] for document in server.dump()["shop"]["items"]] == ["after"]


def test_fail_next_hang_mode(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        await client.shop.items.insert_one({"_id": 1})
        server.fail_next("find", mode="hang")

        with pytest.raises(PyMongoError) as raised, pymongo.timeout(0.4):
            await client.shop.items.find_one({"_id": 1})
        assert raised.value.timeout
        assert await client.shop.items.find_one({"_id": 1}) == {"_id": 1}

    run(server, scenario)


def test_reset_faults_cancels_plans(server: MongoTestServer) -> None:
    async def scenario(client: Client) -> None:
        await client.admin.command("ping")
        server.set_delay(5.0)
        server.fail_next("insert", count=3)
        server.reset_faults()

        with pymongo.timeout(2.0):
            await client.shop.items.insert_one({"_id": 1})

    run(server, scenario)


def test_fail_next_rejects_bad_arguments(server: MongoTestServer) -> None:
    with pytest.raises(ValueError, match="count"):
        server.fail_next("insert", count=0)
    with pytest.raises(ValueError, match="mode"):
        server.fail_next("insert", mode="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="command"):
        server.fail_next("")
    with pytest.raises(ValueError, match="delay"):
        server.set_delay(-1)


# -- data access and lifecycle --------------------------------------------------


def test_dump_returns_copies_and_clear_drops_all(server: MongoTestServer) -> None:
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

    async def scenario(client: Client) -> None:
        await client.shop.items.insert_one({"_id": 1, "at": moment, "nested": {"list": [1]}})

    run(server, scenario)

    dumped = server.dump()
    assert dumped == {"shop": {"items": [{"_id": 1, "at": moment, "nested": {"list": [1]}}]}}
    dumped["shop"]["items"][0]["nested"]["list"].append(2)
    assert server.dump()["shop"]["items"][0]["nested"] == {"list": [1]}

    server.clear()
    assert server.dump() == {}


def test_server_lifecycle() -> None:
    server = MongoTestServer()
    with pytest.raises(RuntimeError):
        _ = server.port
    server.stop()  # never started: nothing to do

    with server:
        port = server.port
        assert port > 0
        assert server.uri == f"mongodb://127.0.0.1:{port}/?directConnection=true"
        with pytest.raises(RuntimeError):
            server.start()
        run(server, lambda client: client.shop.items.insert_one({"_id": 1}))
    server.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.start()
    try:
        assert server.port == port
        found = run(server, lambda client: client.shop.items.find_one({"_id": 1}))
        assert found == {"_id": 1}
    finally:
        server.stop()


def _message(request_id: int, op_code: int, payload: bytes) -> bytes:
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, op_code) + payload


def _op_msg(request_id: int, command: Document) -> bytes:
    return _message(request_id, 2013, b"\x00\x00\x00\x00\x00" + bson.encode(command))


def _read_reply(connection: socket.socket) -> tuple[int, bytes]:
    header = connection.recv(16, socket.MSG_WAITALL)
    length, _request_id, _response_to, op_code = struct.unpack("<iiii", header)
    return op_code, connection.recv(length - 16, socket.MSG_WAITALL)


def _read_op_msg(connection: socket.socket) -> Document:
    op_code, payload = _read_reply(connection)
    assert op_code == 2013
    return bson.decode(payload[5:])


def test_raw_op_msg_replies(server: MongoTestServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(_op_msg(1, {"ping": 1}))
        missing_database = _read_op_msg(connection)
        assert missing_database["ok"] == 0
        assert missing_database["code"] == 40571

        connection.sendall(_op_msg(2, {"ping": 1, "$db": "admin"}))
        assert _read_op_msg(connection)["ok"] == 1


def test_legacy_op_query_handshake(server: MongoTestServer) -> None:
    query = b"\x00\x00\x00\x00admin.$cmd\x00" + struct.pack("<ii", 0, -1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(_message(1, 2004, query + bson.encode({"isMaster": 1})))
        op_code, payload = _read_reply(connection)
        assert op_code == 1  # OP_REPLY
        reply = bson.decode(payload[20:])
        assert reply["ismaster"] is True
        assert reply["maxWireVersion"] == 21

        connection.sendall(_message(2, 2004, query + bson.encode({"find": "items"})))
        _op_code, payload = _read_reply(connection)
        assert bson.decode(payload[20:])["code"] == 352


@pytest.mark.parametrize(
    "message",
    [
        struct.pack("<iiii", 8, 1, 0, 2013),
        _message(1, 2013, b"\x00\x00\x00\x00\x00" + struct.pack("<i", -7)),
        _message(1, 2013, b"\x00\x00\x00\x00\x07" + bson.encode({"ping": 1})),
        _message(1, 2012, b"\x00" * 16),
    ],
    ids=["short-header", "negative-section-size", "unknown-section-kind", "op-compressed"],
)
def test_malformed_message_closes_connection(server: MongoTestServer, message: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(message)
        assert connection.recv(1) == b""

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(_op_msg(2, {"ping": 1, "$db": "admin"}))
        assert _read_op_msg(connection)["ok"] == 1


def test_main_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mongo_server", "--port", "0"],
        cwd=REPOSITORY_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "listening on 127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1])

        async def ping() -> Document:
            client: Client = AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true")
            try:
                return await client.admin.command("ping")
            finally:
                await client.close()

        assert asyncio.run(ping())["ok"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
