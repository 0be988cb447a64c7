"""Property tests: the envelope, the passphrase rules and the JSON endpoints under random input.

The envelope tests shrink `crypto.PLAIN_CHUNK_BYTES` to a few bytes, so a
short plaintext spans many chunks. `PayloadCipher` and `chunk_count` read the
module constant at call time, so the patched size applies to both.

The endpoint test sends JSON of random shape to both POST routes of an app
on a loopback port and checks that no response is a 5xx.

`OTS_PROPERTY_EXAMPLES` sets the examples per property (default 50;
`tox -e reliability` uses 200, the full run 1000). The passphrase
properties run four times as many, the endpoint properties twice as many.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import unicodedata
import urllib.parse
from collections.abc import Iterator
from typing import Any, Final
from unittest import mock

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from marshmallow import ValidationError

from ots import crypto
from ots import store as store_module
from ots.schemas import normalize_passphrase
from tests.conftest import RECORDER, add_to_sweep, make_settings, quiet_loggers
from tests.live import ServiceThread, drop_database, dump_database

PROPERTY_EXAMPLES: Final = int(os.environ.get("OTS_PROPERTY_EXAMPLES", "50"))
RECORD: Final = "ab" * 32
OTHER_RECORD: Final = "cd" * 32
PASSPHRASE: Final = "property test passphrase"
STREAM_CHUNK_BYTES: Final = 16

chunk_sizes = st.integers(min_value=16, max_value=64)
plaintexts = st.binary(max_size=600)
# A chunk size and a plaintext of at least two chunks at that size.
multi_chunk = chunk_sizes.flatmap(
    lambda size: st.tuples(st.just(size), st.binary(min_size=size + 1, max_size=600))
)


def examples(factor: float = 1.0) -> hypothesis.settings:
    """Hypothesis settings: `factor` times the budget, no deadline, no example database."""
    return hypothesis.settings(
        max_examples=max(1, int(PROPERTY_EXAMPLES * factor)),
        deadline=None,
        database=None,
        # Several properties discard inputs that the code under test rejects
        # (a passphrase of spaces, a chunk list that cannot be reordered);
        # how many varies from run to run, so the filter check is off.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def seal(plaintext: bytes, chunk_bytes: int, record: str = RECORD) -> tuple[bytes, list[bytes]]:
    """Seal `plaintext` in chunks of `chunk_bytes` under a fresh data key."""
    data_key = crypto.new_data_key()
    with mock.patch.object(crypto, "PLAIN_CHUNK_BYTES", chunk_bytes):
        return data_key, crypto.PayloadCipher(data_key, record, len(plaintext)).seal_all(plaintext)


def opens(
    data_key: bytes, sealed: list[bytes], size: int, chunk_bytes: int, record: str = RECORD
) -> bool:
    """Return True when `sealed` decrypts as a payload of `size` bytes, False when it fails."""
    with mock.patch.object(crypto, "PLAIN_CHUNK_BYTES", chunk_bytes):
        cipher = crypto.PayloadCipher(data_key, record, size)
        try:
            cipher.open_all(sealed)
        except crypto.DecryptionError:
            return False
    return True


@examples()
@hypothesis.given(plaintext=plaintexts, chunk_bytes=chunk_sizes)
def test_envelope_round_trips_any_bytes(plaintext: bytes, chunk_bytes: int) -> None:
    data_key, sealed = seal(plaintext, chunk_bytes)

    with mock.patch.object(crypto, "PLAIN_CHUNK_BYTES", chunk_bytes):
        cipher = crypto.PayloadCipher(data_key, RECORD, len(plaintext))
        opened = cipher.open_all(sealed)

    assert opened == plaintext
    assert len(sealed) == max(1, -(-len(plaintext) // chunk_bytes))


@examples()
@hypothesis.given(plaintext=plaintexts, chunk_bytes=chunk_sizes, data=st.data())
def test_envelope_flipped_bit_fails(
    plaintext: bytes, chunk_bytes: int, data: st.DataObject
) -> None:
    data_key, sealed = seal(plaintext, chunk_bytes)
    index = data.draw(st.integers(0, len(sealed) - 1), label="chunk")
    bit = data.draw(st.integers(0, 8 * len(sealed[index]) - 1), label="bit")
    damaged = bytearray(sealed[index])
    damaged[bit // 8] ^= 1 << (bit % 8)
    sealed[index] = bytes(damaged)

    assert not opens(data_key, sealed, len(plaintext), chunk_bytes)


@examples()
@hypothesis.given(sample=multi_chunk, data=st.data())
def test_envelope_dropped_chunk_fails(sample: tuple[int, bytes], data: st.DataObject) -> None:
    chunk_bytes, plaintext = sample
    data_key, sealed = seal(plaintext, chunk_bytes)
    index = data.draw(st.integers(0, len(sealed) - 1), label="dropped chunk")
    del sealed[index]
    # The stored size may have been rewritten to match the shorter payload.
    shorter = len(plaintext) - chunk_bytes if index < len(sealed) else len(sealed) * chunk_bytes

    assert not opens(data_key, sealed, len(plaintext), chunk_bytes)
    assert not opens(data_key, sealed, shorter, chunk_bytes)


@examples()
@hypothesis.given(sample=multi_chunk, data=st.data())
def test_envelope_reordered_chunks_fail(sample: tuple[int, bytes], data: st.DataObject) -> None:
    chunk_bytes, plaintext = sample
    data_key, sealed = seal(plaintext, chunk_bytes)
    order = data.draw(st.permutations(range(len(sealed))), label="order")
    if order == sorted(order):
        # Rotate the identity, so every example reorders something.
        order = order[1:] + order[:1]

    assert not opens(data_key, [sealed[i] for i in order], len(plaintext), chunk_bytes)


@examples()
@hypothesis.given(sample=multi_chunk, data=st.data())
def test_envelope_duplicated_chunk_fails(sample: tuple[int, bytes], data: st.DataObject) -> None:
    chunk_bytes, plaintext = sample
    data_key, sealed = seal(plaintext, chunk_bytes)
    source = data.draw(st.integers(0, len(sealed) - 1), label="duplicated chunk")
    offset = data.draw(st.integers(1, len(sealed) - 1), label="distance to the overwritten chunk")
    target = (source + offset) % len(sealed)
    overwritten = list(sealed)
    overwritten[target] = sealed[source]
    inserted = list(sealed)
    inserted.insert(target, sealed[source])

    assert not opens(data_key, overwritten, len(plaintext), chunk_bytes)
    assert not opens(data_key, inserted, len(plaintext), chunk_bytes)
    assert not opens(data_key, inserted, len(plaintext) + chunk_bytes, chunk_bytes)


@examples()
@hypothesis.given(plaintext=plaintexts, chunk_bytes=chunk_sizes, data=st.data())
def test_envelope_chunk_from_other_record_fails(
    plaintext: bytes, chunk_bytes: int, data: st.DataObject
) -> None:
    data_key, sealed = seal(plaintext, chunk_bytes)
    other_key, other_sealed = seal(plaintext, chunk_bytes, OTHER_RECORD)
    index = data.draw(st.integers(0, len(sealed) - 1), label="moved chunk")
    # Same data key, other record id: the associated data differs.
    _, same_key_other_record = seal(plaintext, chunk_bytes, OTHER_RECORD)
    mixed = list(sealed)
    mixed[index] = other_sealed[index]

    assert not opens(data_key, mixed, len(plaintext), chunk_bytes)
    assert not opens(data_key, sealed, len(plaintext), chunk_bytes, OTHER_RECORD)
    assert not opens(other_key, sealed, len(plaintext), chunk_bytes, OTHER_RECORD)
    assert not opens(data_key, same_key_other_record, len(plaintext), chunk_bytes)


@examples()
@hypothesis.given(data_key=st.binary(min_size=32, max_size=32), data=st.data())
def test_wrapped_key_flipped_bit_fails(data_key: bytes, data: st.DataObject) -> None:
    kek = crypto.new_data_key()
    wrapped = crypto.wrap_data_key(kek, data_key, RECORD)
    bit = data.draw(st.integers(0, 8 * len(wrapped) - 1), label="bit")
    damaged = bytearray(wrapped)
    damaged[bit // 8] ^= 1 << (bit % 8)

    assert crypto.unwrap_data_key(kek, wrapped, RECORD) == data_key
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(kek, bytes(damaged), RECORD)
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(kek, wrapped, OTHER_RECORD)


def prepared(text: str) -> str | None:
    """Return the prepared passphrase, or None when it is rejected."""
    try:
        return normalize_passphrase(text)
    except ValidationError:
        return None


# Combining marks and precomposed letters make NFC and NFD differ often.
passphrase_text = st.text(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from("aeouAEOU \u00a0\u2003\u0301\u0308\u0327\u00e9\u00c5\u212b\u1e9b\uac00"),
    ),
    max_size=40,
)


@examples(4)
@hypothesis.given(text=passphrase_text)
def test_passphrase_normaliser_is_idempotent(text: str) -> None:
    once = prepared(text)
    hypothesis.assume(once is not None)
    assert once is not None

    assert prepared(once) == once


@examples(4)
@hypothesis.given(text=passphrase_text)
def test_passphrase_nfc_and_nfd_are_alike(text: str) -> None:
    composed = prepared(unicodedata.normalize("NFC", text))
    decomposed = prepared(unicodedata.normalize("NFD", text))

    assert composed == decomposed
    assert prepared(text) == composed


@examples(4)
@hypothesis.given(text=passphrase_text)
def test_passphrase_is_never_trimmed(text: str) -> None:
    inner = prepared(text)
    hypothesis.assume(inner is not None)

    assert prepared(f"  {text} ") == f"  {inner} "


# JSON of any shape, and objects whose members are the endpoints' field names
# with values of any type, so validation gets both strangers and near misses.
# Text may hold lone surrogates, which JSON can escape (\ud800) but UTF-8 cannot encode.
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(["secret", "passphrase", "ttl", "Secret", "ttl ", ""])
near_miss_values = st.one_of(
    json_values,
    st.text(min_size=1, max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([59, 60, 3600, 30 * 24 * 3600, 30 * 24 * 3600 + 1, 1.5, "3600", True]),
)
bodies = st.one_of(
    json_values,
    st.dictionaries(field_names, near_miss_values, max_size=4),
    st.fixed_dictionaries(
        {"secret": st.text(min_size=1, max_size=50), "passphrase": any_text},
        optional={"ttl": near_miss_values},
    ),
)
key_texts = st.one_of(
    st.text(max_size=50),
    st.text(alphabet="ABCDEFGHabcdefgh0123456789_-", min_size=43, max_size=43),
)


@pytest.fixture(scope="module")
def service(mongo_uri: str) -> Iterator[ServiceThread]:
    """The app on a loopback port, with a database of its own; GridFS above 256 bytes.

    PyMongo's DEBUG records would make up almost all of the secrecy sweep's
    input. The database dump taken at the end covers what the commands carried.
    """
    database = f"ots_properties_{secrets.token_hex(6)}"
    settings = make_settings(
        mongo_uri, database, inline_secret_bytes=256, max_passphrase_attempts=100
    )
    with quiet_loggers("pymongo"), ServiceThread(settings) as running:
        yield running
    add_to_sweep("database dump", dump_database(mongo_uri, database))
    drop_database(mongo_uri, database)


@pytest.fixture(scope="module")
def streaming_service(mongo_uri: str) -> Iterator[ServiceThread]:
    """The app with every secret in GridFS, in payload chunks of 16 bytes.

    A UTF-8 character or a JSON escape then often spans two chunks, which
    the streaming read must join. The chunk size is set before the store
    creates its GridFS bucket and restored when the module ends.
    """
    database = f"ots_streaming_{secrets.token_hex(6)}"
    settings = make_settings(mongo_uri, database, inline_secret_bytes=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crypto, "PLAIN_CHUNK_BYTES", STREAM_CHUNK_BYTES)
        patch.setattr(crypto, "CIPHER_CHUNK_BYTES", STREAM_CHUNK_BYTES + crypto.TAG_BYTES)
        patch.setattr(store_module, "CIPHER_CHUNK_BYTES", STREAM_CHUNK_BYTES + crypto.TAG_BYTES)
        with quiet_loggers("pymongo"), ServiceThread(settings) as running:
            yield running
    add_to_sweep("database dump", dump_database(mongo_uri, database))
    drop_database(mongo_uri, database)


@pytest.fixture(scope="module")
def stored_key(service: ServiceThread) -> str:
    """The key of a secret stored under `PASSPHRASE`, for reads that reach the store."""
    status, body = post(service, "/generate", {"secret": "x" * 300, "passphrase": PASSPHRASE})
    assert status == 201
    key: str = body["secret_key"]
    RECORDER.add(key)
    return key


def post_bytes(service: ServiceThread, path: str, payload: bytes) -> tuple[int, Any]:
    """POST `payload` as a JSON body; return the status and the decoded response body."""
    address = urllib.parse.urlsplit(service.base_url).netloc
    connection = http.client.HTTPConnection(address, timeout=30)
    try:
        connection.request(
            "POST", path, body=payload, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = response.read()
        content_type = response.getheader("Content-Type", "")
    finally:
        connection.close()
    assert content_type in ("application/json", "application/problem+json")
    return response.status, json.loads(answer)


def post(service: ServiceThread, path: str, document: Any) -> tuple[int, Any]:
    """POST `document` as JSON; return the status and the decoded response body."""
    return post_bytes(service, path, json.dumps(document).encode("utf-8"))


@examples(2)
@hypothesis.given(body=bodies)
def test_generate_random_json_is_never_5xx(service: ServiceThread, body: Any) -> None:
    status, answer = post(service, "/generate", body)

    assert status < 500, answer
    assert status in (201, 400, 413, 422)


@examples(2)
@hypothesis.given(body=bodies, key=st.one_of(key_texts, st.just("")), use_stored=st.booleans())
def test_read_random_json_is_never_5xx(
    service: ServiceThread, stored_key: str, body: Any, key: str, use_stored: bool
) -> None:
    path = "/secrets/" + urllib.parse.quote(stored_key if use_stored else key, safe="")

    status, answer = post(service, path, body)

    assert status < 500, answer
    assert status in (200, 400, 403, 404, 422)


@pytest.mark.parametrize("path", ["/generate", "/secrets/" + "A" * 43])
@pytest.mark.parametrize("number", [b"1" + b"0" * 5000, b"-" + b"9" * 4301])
def test_overlong_json_number_is_400(service: ServiceThread, path: str, number: bytes) -> None:
    # Python refuses to convert integers of more than 4300 digits (CVE-2020-10735),
    # and json.loads raises a plain ValueError for them, not a JSONDecodeError.
    status, answer = post_bytes(service, path, b'{"ttl": ' + number + b"}")

    assert status == 400
    assert answer["type"] == "/problems/invalid-body"


@examples()
@hypothesis.given(secret=st.text(st.characters(codec="utf-8"), min_size=1, max_size=120))
def test_streamed_secret_round_trips_exactly(
    streaming_service: ServiceThread, secret: str
) -> None:
    stored, created = post(
        streaming_service, "/generate", {"secret": secret, "passphrase": PASSPHRASE}
    )
    key = created["secret_key"]
    RECORDER.add(key)

    status, answer = post(streaming_service, f"/secrets/{key}", {"passphrase": PASSPHRASE})

    assert stored == 201
    assert status == 200
    assert answer == {"secret": secret}
