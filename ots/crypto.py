"""Keys, key derivation and the chunked AES-256-GCM envelope.

Layering, from what a client holds to what the database holds:

* `secret_key`: 32 random bytes, sent to the client as URL-safe base64 and
  never stored. The record id is HKDF(secret_key) under its own label, so a
  database dump holds no usable link.
* key-encryption key (KEK): HKDF-SHA256 over scrypt(passphrase, salt) joined
  with the secret_key bytes. Both the link and the passphrase are needed, and
  every passphrase guess costs one full scrypt run.
* data key: 32 random bytes per secret, stored wrapped (AES-256-GCM) under the
  KEK. A wrong passphrase fails the unwrap before any payload is read.
* payload: the secret's UTF-8 bytes, split into `PLAIN_CHUNK_BYTES` chunks,
  each sealed with AES-256-GCM under the data key. The associated data binds
  format version, record id, chunk index and a last-chunk flag, so chunks
  cannot be reordered, dropped, truncated or moved to another record.

Everything here is synchronous and CPU-bound: callers run scrypt and large
payloads in a thread pool, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import secrets
from typing import Final, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

FORMAT_VERSION: Final = 1
SECRET_KEY_BYTES: Final = 32
SECRET_KEY_CHARS: Final = 43  # unpadded URL-safe base64 of 32 bytes
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
PLAIN_CHUNK_BYTES: Final = 256 * 1024
CIPHER_CHUNK_BYTES: Final = PLAIN_CHUNK_BYTES + TAG_BYTES

_RECORD_ID_LABEL: Final = b"ots/v1 record id"
_KEK_LABEL: Final = b"ots/v1 key-encryption key"
_WRAP_AAD: Final = b"ots/v1 data key"
_CHUNK_AAD: Final = b"ots/v1 payload"

T = TypeVar("T")


class Sensitive(Generic[T]):
    """A value that must not reach a log line: its `repr` and `str` are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        """Return the wrapped value, for the code that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"

    __str__ = __repr__


class DecryptionError(Exception):
    """Authentication of a wrapped key or payload chunk failed."""


@dataclasses.dataclass(frozen=True)
class KdfParams:
    """scrypt cost parameters (RFC 7914): CPU/memory cost `n`, block size `r`, parallelism `p`."""

    n: int
    r: int
    p: int

    @property
    def memory_bytes(self) -> int:
        """Memory one derivation allocates: 128 * n * r bytes."""
        return 128 * self.n * self.r


# 128 MiB and about a third of a second of one core per derivation; raise N
# (stored per record) as hardware gets faster.
DEFAULT_KDF: Final = KdfParams(n=2**17, r=8, p=1)
MIN_KDF_N: Final = 2**14
# Ceiling for parameters read back from a record: a tampered record must not
# make the service allocate more than 1 GiB or spin for minutes.
MAX_KDF: Final = KdfParams(n=2**20, r=16, p=4)
MAX_KDF_MEMORY_BYTES: Final = 1024 * 1024 * 1024


def check_kdf_params(params: KdfParams) -> None:
    """Check that `params` are fit to protect new secrets.

    Raises:
        ValueError: N is not a power of two or below 2^14, or a value
            exceeds the read ceiling.

    """
    if params.n < MIN_KDF_N:
        raise ValueError(f"scrypt N must be at least {MIN_KDF_N}")
    check_stored_kdf_params(params)


def check_stored_kdf_params(params: KdfParams) -> None:
    """Check parameters read from a record against the ceiling.

    Raises:
        ValueError: the parameters are malformed or above the ceiling.

    """
    if params.n < 2 or params.n & (params.n - 1):
        raise ValueError("scrypt N must be a power of two")
    if not (1 <= params.r <= MAX_KDF.r and 1 <= params.p <= MAX_KDF.p):
        raise ValueError(f"scrypt r must be 1 to {MAX_KDF.r} and p 1 to {MAX_KDF.p}")
    if params.n > MAX_KDF.n or params.memory_bytes > MAX_KDF_MEMORY_BYTES:
        raise ValueError(f"scrypt N must be at most {MAX_KDF.n} and use at most 1 GiB")


def new_secret_key() -> tuple[str, bytes]:
    """Create a 256-bit secret key; return its URL form and its bytes."""
    raw = secrets.token_bytes(SECRET_KEY_BYTES)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"), raw


def parse_secret_key(text: str) -> bytes | None:
    """Return the bytes of a secret key in URL form, or None if it is malformed.

    Only the canonical encoding is accepted, so one secret has one URL.
    """
    if len(text) != SECRET_KEY_CHARS or not text.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        return None
    return raw


def record_id(secret_key: bytes) -> str:
    """Derive the database id of a secret from its key (hex, 64 characters)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_RECORD_ID_LABEL)
    return hkdf.derive(secret_key).hex()


def new_salt() -> bytes:
    """Return a fresh per-record scrypt salt."""
    return os.urandom(SALT_BYTES)


def new_data_key() -> bytes:
    """Return a fresh AES-256 data key."""
    return AESGCM.generate_key(bit_length=256)


def derive_kek(passphrase: bytes, secret_key: bytes, salt: bytes, params: KdfParams) -> bytes:
    """Derive the key-encryption key. Slow by design: run it in the KDF pool."""
    kdf = Scrypt(salt=salt, length=32, n=params.n, r=params.r, p=params.p)
    stretched = kdf.derive(passphrase)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_KEK_LABEL)
    return hkdf.derive(stretched + secret_key)


def wrap_data_key(kek: bytes, data_key: bytes, record: str) -> bytes:
    """Seal the data key under the KEK; return nonce followed by ciphertext."""
    # A fresh salt makes each KEK unique to one record, and this is the only
    # encryption under it, so a random nonce cannot repeat.
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(record))


def unwrap_data_key(kek: bytes, wrapped: bytes, record: str) -> bytes:
    """Open a wrapped data key.

    Raises:
        DecryptionError: wrong passphrase, or the record was altered.

    """
    nonce, sealed = wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:]
    try:
        return AESGCM(kek).decrypt(nonce, sealed, _wrap_aad(record))
    except (InvalidTag, ValueError):
        raise DecryptionError("data key failed authentication") from None


def chunk_count(plaintext_size: int) -> int:
    """Count the payload chunks of a plaintext of this size (at least one)."""
    return max(1, -(-plaintext_size // PLAIN_CHUNK_BYTES))


class PayloadCipher:
    """Seal or open the payload chunks of one record under its data key."""

    def __init__(self, data_key: bytes, record: str, plaintext_size: int) -> None:
        self._aead = AESGCM(data_key)
        self._record = bytes.fromhex(record)
        self._size = plaintext_size
        self.chunks = chunk_count(plaintext_size)

    def seal(self, index: int, plaintext: bytes) -> bytes:
        """Encrypt chunk `index`; the last index gets the last-chunk flag."""
        return self._aead.encrypt(_chunk_nonce(index), plaintext, self._aad(index))

    def open(self, index: int, sealed: bytes) -> bytes:
        """Decrypt chunk `index`.

        Raises:
            DecryptionError: the chunk was altered, moved or is not at `index`,
                or its length does not match the plaintext size.

        """
        try:
            plaintext = self._aead.decrypt(_chunk_nonce(index), sealed, self._aad(index))
        except (InvalidTag, ValueError):
            raise DecryptionError("payload chunk failed authentication") from None
        # The size is stored beside the chunks, not inside them, so a changed
        # size that keeps the chunk count would otherwise go unnoticed.
        if len(plaintext) != self._plain_length(index):
            raise DecryptionError("payload chunk does not match the stored size")
        return plaintext

    def seal_all(self, plaintext: bytes) -> list[bytes]:
        """Encrypt a whole plaintext into its list of sealed chunks."""
        return [
            self.seal(
                index, plaintext[index * PLAIN_CHUNK_BYTES : (index + 1) * PLAIN_CHUNK_BYTES]
            )
            for index in range(self.chunks)
        ]

    def open_all(self, sealed_chunks: list[bytes]) -> bytes:
        """Decrypt every chunk; the chunk count must match the stored size.

        Raises:
            DecryptionError: a chunk is missing, extra, altered or out of place.

        """
        if len(sealed_chunks) != self.chunks:
            raise DecryptionError("payload has the wrong number of chunks")
        return b"".join(self.open(index, chunk) for index, chunk in enumerate(sealed_chunks))

    def _plain_length(self, index: int) -> int:
        if index < self.chunks - 1:
            return PLAIN_CHUNK_BYTES
        return self._size - (self.chunks - 1) * PLAIN_CHUNK_BYTES

    def _aad(self, index: int) -> bytes:
        last = b"\x01" if index == self.chunks - 1 else b"\x00"
        version = FORMAT_VERSION.to_bytes(1, "big")
        return _CHUNK_AAD + version + self._record + index.to_bytes(8, "big") + last


def _chunk_nonce(index: int) -> bytes:
    # The data key is fresh for every record and each chunk index is sealed
    # once, so a counter nonce never repeats under one key.
    return index.to_bytes(NONCE_BYTES, "big")


def _wrap_aad(record: str) -> bytes:
    return _WRAP_AAD + FORMAT_VERSION.to_bytes(1, "big") + bytes.fromhex(record)
