"""The envelope: keys, key derivation, wrapping and chunked payload encryption."""

from __future__ import annotations

import pytest

from ots import crypto

WEAK = crypto.KdfParams(n=2**10, r=8, p=1)
RECORD = crypto.record_id(b"\x01" * 32)
OTHER_RECORD = crypto.record_id(b"\x02" * 32)


def test_secret_key_is_256_bits_url_safe() -> None:
    text, raw = crypto.new_secret_key()

    assert len(raw) == 32
    assert len(text) == crypto.SECRET_KEY_CHARS
    assert crypto.parse_secret_key(text) == raw
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize("text", ["", "A" * 42, "A" * 44, "+" * 43, "A" * 42 + "B", "é" * 43])
def test_malformed_key_is_rejected(text: str) -> None:
    assert crypto.parse_secret_key(text) is None


def test_record_id_is_not_the_key() -> None:
    text, raw = crypto.new_secret_key()

    record = crypto.record_id(raw)

    assert len(record) == 64
    assert raw.hex() != record
    assert text not in record
    assert crypto.record_id(raw) == record


def test_kek_needs_passphrase_and_key() -> None:
    salt = crypto.new_salt()
    key = b"\x03" * 32

    base = crypto.derive_kek(b"passphrase", key, salt, WEAK)

    assert crypto.derive_kek(b"passphrase", key, salt, WEAK) == base
    assert crypto.derive_kek(b"passphrasf", key, salt, WEAK) != base
    assert crypto.derive_kek(b"passphrase", b"\x04" * 32, salt, WEAK) != base
    assert crypto.derive_kek(b"passphrase", key, crypto.new_salt(), WEAK) != base


def test_wrapped_key_opens_only_with_kek_and_record() -> None:
    kek = b"\x05" * 32
    data_key = crypto.new_data_key()
    wrapped = crypto.wrap_data_key(kek, data_key, RECORD)

    assert crypto.unwrap_data_key(kek, wrapped, RECORD) == data_key
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(b"\x06" * 32, wrapped, RECORD)
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(kek, wrapped, OTHER_RECORD)
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(kek, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), RECORD)
    with pytest.raises(crypto.DecryptionError):
        crypto.unwrap_data_key(kek, b"short", RECORD)


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        crypto.PLAIN_CHUNK_BYTES - 1,
        crypto.PLAIN_CHUNK_BYTES,
        2 * crypto.PLAIN_CHUNK_BYTES + 7,
    ],
)
def test_payload_round_trips(size: int) -> None:
    data_key = crypto.new_data_key()
    plaintext = bytes(index % 251 for index in range(size))
    cipher = crypto.PayloadCipher(data_key, RECORD, size)

    sealed = cipher.seal_all(plaintext)

    assert len(sealed) == crypto.chunk_count(size)
    assert cipher.open_all(sealed) == plaintext


def _three_chunks() -> tuple[crypto.PayloadCipher, list[bytes], bytes]:
    data_key = crypto.new_data_key()
    size = 2 * crypto.PLAIN_CHUNK_BYTES + 10
    cipher = crypto.PayloadCipher(data_key, RECORD, size)
    return cipher, cipher.seal_all(b"z" * size), data_key


def test_flipped_bit_fails() -> None:
    cipher, sealed, _ = _three_chunks()
    damaged = bytearray(sealed[1])
    damaged[100] ^= 0x01

    with pytest.raises(crypto.DecryptionError):
        cipher.open_all([sealed[0], bytes(damaged), sealed[2]])


def test_reordered_chunks_fail() -> None:
    cipher, sealed, _ = _three_chunks()

    with pytest.raises(crypto.DecryptionError):
        cipher.open_all([sealed[1], sealed[0], sealed[2]])


def test_dropped_or_duplicated_chunk_fails() -> None:
    cipher, sealed, _ = _three_chunks()

    with pytest.raises(crypto.DecryptionError):
        cipher.open_all(sealed[:2])
    with pytest.raises(crypto.DecryptionError):
        cipher.open_all([sealed[0], sealed[0], sealed[2]])


def test_truncation_fails_by_last_chunk_flag() -> None:
    _cipher, sealed, data_key = _three_chunks()
    # A reader that expects two chunks requires chunk 1 to carry the
    # last-chunk flag; the real chunk 1 does not, so it fails.
    shorter = crypto.PayloadCipher(data_key, RECORD, 2 * crypto.PLAIN_CHUNK_BYTES)

    with pytest.raises(crypto.DecryptionError):
        shorter.open_all(sealed[:2])


def test_chunk_moved_to_other_record_fails() -> None:
    _cipher, sealed, data_key = _three_chunks()
    elsewhere = crypto.PayloadCipher(data_key, OTHER_RECORD, 2 * crypto.PLAIN_CHUNK_BYTES + 10)

    with pytest.raises(crypto.DecryptionError):
        elsewhere.open_all(sealed)


def test_sensitive_repr_is_masked() -> None:
    value = crypto.Sensitive("hunter2-hunter2")

    assert "hunter2" not in repr(value)
    assert "hunter2" not in str(value)
    assert "hunter2" not in f"{value}"
    assert value.reveal() == "hunter2-hunter2"


@pytest.mark.parametrize(
    "params",
    [
        crypto.KdfParams(n=2**13, r=8, p=1),
        crypto.KdfParams(n=3 * 2**14, r=8, p=1),
        crypto.KdfParams(n=2**21, r=8, p=1),
        crypto.KdfParams(n=2**17, r=64, p=1),
        crypto.KdfParams(n=2**17, r=8, p=64),
        crypto.KdfParams(n=2**20, r=16, p=1),
    ],
)
def test_weak_or_excessive_kdf_rejected(params: crypto.KdfParams) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        crypto.check_kdf_params(params)


def test_default_kdf_is_owasp_minimum() -> None:
    crypto.check_kdf_params(crypto.DEFAULT_KDF)

    assert crypto.DEFAULT_KDF.memory_bytes == 128 * 1024 * 1024
