"""Tampered records: whatever is changed in the database, a read never returns the secret.

Each test stores a secret through the API, alters the stored documents directly
(record fields, inline chunks, GridFS chunks), then reads with the right
passphrase. Damage found before the status line goes out gets 404. Damage in
a later GridFS chunk can only cut the connection, so the client sees a failed
transfer instead of a complete 200.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ots import crypto
from ots.store import SecretStore
from tests.conftest import TRANSFER_FAILED, Api, problem, read_outcome, serves_secret

PASSPHRASE = "tamper test passphrase"
OTHER_PASSPHRASE = "other tamper passphrase"
CHUNKS = "payloads.chunks"
FILES = "payloads.files"
# Three GridFS chunks: two full ones and a short last one.
GRIDFS_SIZE = 2 * crypto.PLAIN_CHUNK_BYTES + 1000


def make_secret(size: int, label: str) -> str:
    """Build an ASCII secret of exactly `size` bytes that starts with `label`."""
    head = f"{label}:"
    return head + "x" * (size - len(head))


def record_id_of(key: str) -> str:
    """Return the database id of the record behind a secret key."""
    raw = crypto.parse_secret_key(key)
    assert raw is not None
    return crypto.record_id(raw)


def flip_byte(data: bytes, position: int) -> bytes:
    """Return `data` with one bit flipped at `position`."""
    damaged = bytearray(data)
    damaged[position] ^= 0x01
    return bytes(damaged)


def problem_type(code: int, body: bytes) -> str:
    """Return the problem type of an error body."""
    document: dict[str, Any] = json.loads(body)
    assert document["status"] == code
    type_uri: str = document["type"]
    return type_uri


async def record_of(store: SecretStore, key: str) -> dict[str, Any]:
    """Return the stored record of a secret."""
    document = await store.secrets.find_one({"_id": record_id_of(key)})
    assert document is not None
    return document


async def alter_record(store: SecretStore, key: str, changes: dict[str, Any]) -> None:
    """Set fields of a stored record."""
    result = await store.secrets.update_one({"_id": record_id_of(key)}, {"$set": changes})
    assert result.modified_count == 1


async def gridfs_chunk(store: SecretStore, key: str, index: int) -> dict[str, Any]:
    """Return GridFS chunk `index` of a secret's payload file."""
    record = await record_of(store, key)
    chunk = await store.database[CHUNKS].find_one({"files_id": record["file_id"], "n": index})
    assert chunk is not None
    return chunk


async def assert_gone(api: Api, key: str) -> None:
    """Check that a secret can no longer be read."""
    again = await api.read(key, PASSPHRASE)
    assert again.code == 404


@pytest.mark.gen_test
async def test_flipped_inline_byte_is_404(api: Api, store: SecretStore) -> None:
    secret = "inline secret with one flipped byte"
    key = await api.create(secret, PASSPHRASE)
    record = await record_of(store, key)
    await alter_record(store, key, {"chunks": [flip_byte(record["chunks"][0], 5)]})

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert code == 404
    assert not serves_secret(code, body, secret)
    await assert_gone(api, key)


@pytest.mark.gen_test
async def test_flipped_first_gridfs_chunk_is_404(api: Api, store: SecretStore) -> None:
    secret = make_secret(GRIDFS_SIZE, "first chunk flipped")
    key = await api.create(secret, PASSPHRASE)
    chunk = await gridfs_chunk(store, key, 0)
    await store.database[CHUNKS].update_one(
        {"_id": chunk["_id"]}, {"$set": {"data": flip_byte(chunk["data"], 1000)}}
    )

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert code == 404
    assert problem_type(code, body) == "/problems/not-found"
    await assert_gone(api, key)


@pytest.mark.gen_test
@pytest.mark.parametrize("index", [1, 2])
async def test_flipped_later_gridfs_chunk_cuts_transfer(
    api: Api, store: SecretStore, index: int
) -> None:
    secret = make_secret(GRIDFS_SIZE, f"chunk {index} flipped")
    key = await api.create(secret, PASSPHRASE)
    chunk = await gridfs_chunk(store, key, index)
    await store.database[CHUNKS].update_one(
        {"_id": chunk["_id"]}, {"$set": {"data": flip_byte(chunk["data"], 10)}}
    )

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert code == TRANSFER_FAILED
    assert not serves_secret(code, body, secret)
    await assert_gone(api, key)


@pytest.mark.gen_test
async def test_cut_transfer_keeps_serving_others(api: Api, store: SecretStore) -> None:
    damaged_secret = make_secret(GRIDFS_SIZE, "damaged neighbour")
    damaged_key = await api.create(damaged_secret, PASSPHRASE)
    intact_key = await api.create("intact neighbour", PASSPHRASE)
    chunk = await gridfs_chunk(store, damaged_key, 2)
    await store.database[CHUNKS].update_one(
        {"_id": chunk["_id"]}, {"$set": {"data": flip_byte(chunk["data"], 10)}}
    )

    code, _ = await read_outcome(api, damaged_key, PASSPHRASE)
    intact = await api.read(intact_key, PASSPHRASE)

    assert code == TRANSFER_FAILED
    assert intact.code == 200
    assert json.loads(intact.body) == {"secret": "intact neighbour"}
    assert await store.database[FILES].count_documents({}) == 0
    assert await store.database[CHUNKS].count_documents({}) == 0


@pytest.mark.gen_test
@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 2), (0, 2)])
async def test_swapped_gridfs_chunks_never_200(
    api: Api, store: SecretStore, first: int, second: int
) -> None:
    secret = make_secret(GRIDFS_SIZE, f"chunks {first} and {second} swapped")
    key = await api.create(secret, PASSPHRASE)
    first_chunk = await gridfs_chunk(store, key, first)
    second_chunk = await gridfs_chunk(store, key, second)
    chunks = store.database[CHUNKS]
    # A unique index covers (files_id, n), so the swap goes through a free number.
    await chunks.update_one({"_id": first_chunk["_id"]}, {"$set": {"n": 999}})
    await chunks.update_one({"_id": second_chunk["_id"]}, {"$set": {"n": first}})
    await chunks.update_one({"_id": first_chunk["_id"]}, {"$set": {"n": second}})

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert not serves_secret(code, body, secret)
    assert code == (404 if first == 0 else TRANSFER_FAILED)
    await assert_gone(api, key)


@pytest.mark.gen_test
@pytest.mark.parametrize("index", [0, 1, 2])
async def test_dropped_gridfs_chunk_never_200(api: Api, store: SecretStore, index: int) -> None:
    secret = make_secret(GRIDFS_SIZE, f"chunk {index} dropped")
    key = await api.create(secret, PASSPHRASE)
    chunk = await gridfs_chunk(store, key, index)
    await store.database[CHUNKS].delete_one({"_id": chunk["_id"]})

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert not serves_secret(code, body, secret)
    assert code == (404 if index == 0 else TRANSFER_FAILED)
    await assert_gone(api, key)


@pytest.mark.gen_test
async def test_dropped_inline_chunk_is_404(api: Api, store: SecretStore) -> None:
    secret = "inline secret whose chunk is dropped"
    key = await api.create(secret, PASSPHRASE)
    await alter_record(store, key, {"chunks": []})

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert code == 404
    assert not serves_secret(code, body, secret)


@pytest.mark.gen_test
@pytest.mark.parametrize("field", ["chunks", "file_id"])
async def test_payload_swapped_between_records_is_404(
    api: Api, store: SecretStore, field: str
) -> None:
    size = 100 if field == "chunks" else GRIDFS_SIZE
    first_secret = make_secret(size, "first record")
    second_secret = make_secret(size, "second record")
    first_key = await api.create(first_secret, PASSPHRASE)
    second_key = await api.create(second_secret, OTHER_PASSPHRASE)
    first = await record_of(store, first_key)
    second = await record_of(store, second_key)
    await alter_record(store, first_key, {field: second[field]})
    await alter_record(store, second_key, {field: first[field]})

    first_code, first_body = await read_outcome(api, first_key, PASSPHRASE)
    second_code, second_body = await read_outcome(api, second_key, OTHER_PASSPHRASE)

    assert first_code == 404
    assert second_code == 404
    assert not serves_secret(first_code, first_body, second_secret)
    assert not serves_secret(second_code, second_body, first_secret)


@pytest.mark.gen_test
async def test_swapped_wrapped_key_is_403(api: Api, store: SecretStore) -> None:
    first_key = await api.create("first wrapped key owner", PASSPHRASE)
    second_key = await api.create("second wrapped key owner", PASSPHRASE)
    first = await record_of(store, first_key)
    second = await record_of(store, second_key)
    await alter_record(store, first_key, {"wrapped_key": second["wrapped_key"]})
    await alter_record(store, second_key, {"wrapped_key": first["wrapped_key"]})

    first_read = await api.read(first_key, PASSPHRASE)
    second_read = await api.read(second_key, PASSPHRASE)

    assert first_read.code == 403
    assert second_read.code == 403
    assert problem(first_read)["attempts_left"] == 4
    assert problem(second_read)["attempts_left"] == 4


@pytest.mark.gen_test
async def test_swapped_salt_is_403(api: Api, store: SecretStore) -> None:
    first_key = await api.create("first salt owner", PASSPHRASE)
    second_key = await api.create("second salt owner", PASSPHRASE)
    second = await record_of(store, second_key)
    await alter_record(store, first_key, {"salt": second["salt"]})

    response = await api.read(first_key, PASSPHRASE)

    assert response.code == 403
    assert problem(response)["type"] == "/problems/wrong-passphrase"


INFLATED_KDF: dict[str, dict[str, Any]] = {
    "n 2^30": {"n": 2**30, "r": 8, "p": 1},
    "n 2^21": {"n": 2**21, "r": 1, "p": 1},
    "memory over 1 GiB": {"n": 2**20, "r": 16, "p": 1},
    "r huge": {"n": 2**10, "r": 2**20, "p": 1},
    "p huge": {"n": 2**10, "r": 8, "p": 2**20},
    "n not a power of two": {"n": 3 * 2**10, "r": 8, "p": 1},
    "n zero": {"n": 0, "r": 8, "p": 1},
    "r zero": {"n": 2**10, "r": 0, "p": 1},
    "n negative": {"n": -(2**10), "r": 8, "p": 1},
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(INFLATED_KDF))
async def test_inflated_kdf_cost_is_404(
    api: Api, store: SecretStore, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    key = await api.create("costly to derive", PASSPHRASE)
    await alter_record(store, key, {"kdf": INFLATED_KDF[name]})
    derivations = count_derivations(monkeypatch)

    response = await api.read(key, PASSPHRASE)

    assert response.code == 404
    assert problem(response)["type"] == "/problems/not-found"
    assert derivations == []
    assert (await record_of(store, key))["attempts_left"] == 5


MALFORMED_RECORDS: dict[str, dict[str, Any]] = {
    "version 2": {"version": 2},
    "version 0": {"version": 0},
    "version as text": {"version": "1"},
    "version null": {"version": None},
    "kdf as text": {"kdf": "scrypt"},
    "kdf n as text": {"kdf": {"n": "1024", "r": 8, "p": 1}},
    "kdf n as fraction": {"kdf": {"n": 1024.5, "r": 8, "p": 1}},
    "kdf n as boolean": {"kdf": {"n": True, "r": 8, "p": 1}},
    "kdf without r": {"kdf": {"n": 1024, "p": 1}},
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(MALFORMED_RECORDS))
async def test_unreadable_record_is_404(
    api: Api, store: SecretStore, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    key = await api.create("stored in a format nobody knows", PASSPHRASE)
    await alter_record(store, key, MALFORMED_RECORDS[name])
    derivations = count_derivations(monkeypatch)

    response = await api.read(key, PASSPHRASE)

    assert response.code == 404
    assert problem(response)["type"] == "/problems/not-found"
    assert derivations == []


def count_derivations(monkeypatch: pytest.MonkeyPatch) -> list[crypto.KdfParams]:
    """Record the parameters of every scrypt run from now on; return the list it fills."""
    calls: list[crypto.KdfParams] = []
    real: Callable[..., bytes] = crypto.derive_kek

    def spy(passphrase: bytes, key: bytes, salt: bytes, params: crypto.KdfParams) -> bytes:
        calls.append(params)
        return real(passphrase, key, salt, params)

    monkeypatch.setattr(crypto, "derive_kek", spy)
    return calls


SIZE_CHANGES: dict[str, Callable[[int], int]] = {
    "one byte less": lambda size: size - 1,
    "one byte more": lambda size: size + 1,
    "one full chunk": lambda size: crypto.PLAIN_CHUNK_BYTES,
    "one chunk more": lambda size: size + crypto.PLAIN_CHUNK_BYTES,
    "zero": lambda size: 0,
}


@pytest.mark.gen_test
@pytest.mark.parametrize("payload", ["inline", "gridfs"])
@pytest.mark.parametrize("change", sorted(SIZE_CHANGES))
async def test_changed_size_never_200(
    api: Api, store: SecretStore, payload: str, change: str
) -> None:
    size = 3000 if payload == "inline" else GRIDFS_SIZE
    secret = make_secret(size, f"{payload} size {change}")
    key = await api.create(secret, PASSPHRASE)
    await alter_record(store, key, {"size": SIZE_CHANGES[change](size)})

    code, body = await read_outcome(api, key, PASSPHRASE)

    assert not serves_secret(code, body, secret)
    assert code in (404, TRANSFER_FAILED)
    await assert_gone(api, key)
