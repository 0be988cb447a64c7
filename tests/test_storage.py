"""Storage: GridFS payloads, the inline threshold, one-time reads and secrecy at rest.

Large secrets are compared by SHA-256 digest, so a failing assertion never
prints megabytes of secret text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import bson
import pytest

from ots import crypto
from ots.settings import Settings
from ots.store import SecretStore
from tests.conftest import Api, Recorder, add_to_sweep, problem
from tests.mongo_server import MongoTestServer

PASSPHRASE = "storage test passphrase"
MIB = 1024 * 1024
FILES = "payloads.files"
CHUNKS = "payloads.chunks"
# Cyrillic (2 bytes), CJK (3 bytes) and an emoji (4 bytes): 9 bytes of UTF-8.
# PLAIN_CHUNK_BYTES is 1 more than a multiple of 9, so successive chunk edges
# fall at successive byte offsets inside this unit and split every kind of
# character somewhere.
MULTIBYTE_UNIT = "Ж中🔐"
# Maximum seconds a test waits for work the server does after the response,
# such as deleting a payload file.
CLEANUP_BOUND_SECONDS = 30.0


def digest(text: str) -> str:
    """Return the SHA-256 of a text's UTF-8 bytes, for comparisons that may be printed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def secret_of(body: bytes) -> str:
    """Return the `secret` member of a 200 body."""
    document: dict[str, Any] = json.loads(body)
    assert set(document) == {"secret"}
    secret: str = document["secret"]
    return secret


def record_id_of(key: str) -> str:
    """Return the database id of the record behind a secret key."""
    raw = crypto.parse_secret_key(key)
    assert raw is not None
    return crypto.record_id(raw)


async def stored_counts(store: SecretStore) -> dict[str, int]:
    """Count the documents of the record collection and of the GridFS bucket."""
    return {
        name: await store.database[name].count_documents({}) for name in ("secrets", FILES, CHUNKS)
    }


NOTHING_STORED = {"secrets": 0, FILES: 0, CHUNKS: 0}


def split_sequence_lengths(data: bytes) -> set[int]:
    """Return the byte lengths of the UTF-8 sequences that a payload chunk edge splits."""
    lengths: set[int] = set()
    for edge in range(crypto.PLAIN_CHUNK_BYTES, len(data), crypto.PLAIN_CHUNK_BYTES):
        start = edge
        while data[start] & 0xC0 == 0x80:  # a continuation byte
            start -= 1
        if start == edge:
            continue
        lead = data[start]
        if lead < 0xE0:
            lengths.add(2)
        elif lead < 0xF0:
            lengths.add(3)
        else:
            lengths.add(4)
    return lengths


@pytest.mark.gen_test(timeout=120)
async def test_multibyte_megabytes_round_trip_exactly(api: Api, store: SecretStore) -> None:
    secret = MULTIBYTE_UNIT * (3 * MIB // 9) + "end."
    encoded = secret.encode("utf-8")
    assert len(encoded) > 3 * MIB
    assert split_sequence_lengths(encoded) == {2, 3, 4}
    key = await api.create(secret, PASSPHRASE)
    record = await store.secrets.find_one({"_id": record_id_of(key)})
    assert record is not None
    assert "file_id" in record

    response = await api.read(key, PASSPHRASE)

    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert digest(secret_of(response.body)) == digest(secret)
    assert await stored_counts(store) == NOTHING_STORED
    assert (await api.read(key, PASSPHRASE)).code == 404


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(("offset", "field"), [(-1, "chunks"), (0, "chunks"), (1, "file_id")])
async def test_inline_threshold_picks_storage(
    api: Api, store: SecretStore, settings: Settings, offset: int, field: str
) -> None:
    # "é" is 2 bytes of UTF-8: the limit counts bytes, not characters.
    size = settings.inline_secret_bytes + offset
    secret = "é" * (size // 2) + "x" * (size % 2)
    assert len(secret.encode("utf-8")) == size
    key = await api.create(secret, PASSPHRASE)

    record = await store.secrets.find_one({"_id": record_id_of(key)})
    response = await api.read(key, PASSPHRASE)

    other_field = "file_id" if field == "chunks" else "chunks"
    assert record is not None
    assert field in record
    assert other_field not in record
    assert record["size"] == size
    assert response.code == 200
    assert digest(secret_of(response.body)) == digest(secret)
    assert await stored_counts(store) == NOTHING_STORED


@pytest.mark.gen_test(timeout=120)
@pytest.mark.settings(max_passphrase_attempts=20)
async def test_concurrent_gridfs_reads_yield_one_200(api: Api, store: SecretStore) -> None:
    secret = "race for a large secret 🏁 " * 40_000
    key = await api.create(secret, PASSPHRASE)

    responses = await asyncio.gather(*(api.read(key, PASSPHRASE) for _ in range(20)))

    codes = sorted(response.code for response in responses)
    assert codes == [200] + [404] * 19
    winner = next(response for response in responses if response.code == 200)
    assert digest(secret_of(winner.body)) == digest(secret)
    for response in responses:
        if response.code == 404:
            assert problem(response)["type"] == "/problems/not-found"
    assert await stored_counts(store) == NOTHING_STORED


async def dump_database(
    store: SecretStore, mongo_server: MongoTestServer | None
) -> list[dict[str, Any]]:
    """Return every stored document: the test server's dump, or a scan of a real MongoDB."""
    if mongo_server is not None:
        dump = mongo_server.dump()
        return [
            document
            for collections in dump.values()
            for documents in collections.values()
            for document in documents
        ]
    documents: list[dict[str, Any]] = []
    for name in await store.database.list_collection_names():
        documents.extend(await store.database[name].find({}).to_list())
    return documents


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("payload", ["inline", "gridfs"])
async def test_dump_contains_no_secret_material(
    api: Api, store: SecretStore, mongo_server: MongoTestServer | None, payload: str
) -> None:
    fragment = f"dump check {payload} Ωμέγα 秘密 🔑"
    repeats = 3 if payload == "inline" else 400_000 // len(fragment.encode("utf-8"))
    secret = f"{fragment} " * repeats
    passphrase = f"dump check passphrase for {payload}"
    key = await api.create(secret, passphrase)
    sensitive = Recorder()
    for value in (fragment, secret, passphrase, key):
        sensitive.add(value)

    documents = await dump_database(store, mongo_server)

    dump = b"".join(bson.encode(document) for document in documents)
    ids = {document.get("_id") for document in documents}
    assert record_id_of(key) in ids
    assert any(document.get("files_id") for document in documents) == (payload == "gridfs")
    assert sensitive.hits(dump) == []
    add_to_sweep("database dump", dump)


@pytest.mark.gen_test(timeout=120)
async def test_client_disconnect_mid_stream_deletes_file(
    api: Api, store: SecretStore, http_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "abandoned halfway " * (6 * MIB // 18)
    key = await api.create(secret, PASSPHRASE)
    sensitive = Recorder()
    for value in ("abandoned halfway", PASSPHRASE, key):
        sensitive.add(value)

    head = await read_first_bytes_and_hang_up(http_port, key, 4096)

    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    deadline = asyncio.get_running_loop().time() + CLEANUP_BOUND_SECONDS
    while await stored_counts(store) != NOTHING_STORED:
        assert asyncio.get_running_loop().time() < deadline, "payload file never deleted"
        await asyncio.sleep(0.05)
    again = await api.read(key, PASSPHRASE)
    assert again.code == 404
    assert sensitive.hits(caplog.text.encode("utf-8")) == []
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


async def read_first_bytes_and_hang_up(port: int, key: str, count: int) -> bytes:
    """Read a secret over a raw socket, keep the headers and `count` body bytes, then close.

    Returns the response headers.
    """
    body = json.dumps({"passphrase": PASSPHRASE}).encode("utf-8")
    request = (
        f"POST /secrets/{key} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("ascii")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLEANUP_BOUND_SECONDS)
        await asyncio.wait_for(reader.readexactly(count), CLEANUP_BOUND_SECONDS)
    finally:
        writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server may reset a socket that still had unread data
    return head


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("payload", ["inline", "gridfs"])
async def test_failed_record_insert_leaves_nothing(
    api: Api, store: SecretStore, test_server: MongoTestServer, payload: str
) -> None:
    size = 100 if payload == "inline" else 3 * crypto.PLAIN_CHUNK_BYTES
    test_server.fail_next("insert", collection="secrets")

    response = await api.generate("r" * size, PASSPHRASE)

    assert response.code == 503
    assert problem(response)["type"] == "/problems/service-unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert await stored_counts(store) == NOTHING_STORED
