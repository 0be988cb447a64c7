"""The API routes: store a secret, read it once, and the health probes."""

from __future__ import annotations

import codecs
import datetime
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from tornado.iostream import StreamClosedError

from ots import crypto
from ots.base import ApiHandler, BaseHandler, JsonBodyHandler, Services
from ots.errors import (
    PROBLEM_CLASSES,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    WrongPassphrase,
)
from ots.ratelimit import RateLimitMixin
from ots.schemas import GenerateRequest, ReadRequest
from ots.store import SecretRecord
from ots.workers import run_cpu

log = logging.getLogger("ots.app")

# Payloads up to this size are sealed or opened on the event loop (well under
# a millisecond of AES-GCM); larger ones in a thread.
LOOP_CRYPTO_BYTES = 64 * 1024


def format_time(moment: datetime.datetime) -> str:
    """Format a UTC time as RFC 3339 with a `Z` suffix, to the second."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GenerateHandler(RateLimitMixin, JsonBodyHandler):
    """`POST /generate`: encrypt and store a secret, return its key once."""

    route = "/generate"
    allowed_methods = ("POST",)

    def body_limit(self) -> int:
        """Room for a secret of `MAX_SECRET_BYTES` escaped in JSON, plus 64 KiB."""
        return self.services.settings.max_generate_body_bytes

    async def post(self) -> None:
        """Store the secret and respond 201 with its key."""
        settings = self.services.settings
        request = await self.load_body(_generate_schema(settings.secret_ttl_max))
        # Drop the text as soon as it is encoded: at 32 MiB every copy counts.
        plaintext = await _encode(request.pop("secret").reveal())
        if len(plaintext) > settings.max_secret_bytes:
            raise PayloadTooLarge(
                f"The secret exceeds {settings.max_secret_bytes} bytes of UTF-8."
            )
        ttl: int = request.get("ttl", settings.secret_ttl_default)
        passphrase = request["passphrase"].reveal().encode("utf-8")

        key_text, key = crypto.new_secret_key()
        record_id = crypto.record_id(key)
        self.record_ref = self.services.record_ref(record_id)
        salt = crypto.new_salt()
        params = settings.kdf_params
        pool = self.services.kdf_pool
        async with pool.admission():
            kek = await pool.run(crypto.derive_kek, passphrase, key, salt, params)

        data_key = crypto.new_data_key()
        cipher = crypto.PayloadCipher(data_key, record_id, len(plaintext))
        now = self.services.clock().replace(microsecond=0)
        expires_at = now + datetime.timedelta(seconds=ttl)
        record: SecretRecord = {
            "_id": record_id,
            "version": crypto.FORMAT_VERSION,
            "kdf": {"n": params.n, "r": params.r, "p": params.p},
            "salt": salt,
            "wrapped_key": crypto.wrap_data_key(kek, data_key, record_id),
            "created_at": now,
            "expires_at": expires_at,
            "attempts_left": settings.max_passphrase_attempts,
            "size": len(plaintext),
        }
        await self._store(record, cipher, plaintext)

        self.set_header("Location", f"/secrets/{key_text}")
        self.write_json(
            201, {"secret_key": key_text, "expires_at": format_time(expires_at), "ttl": ttl}
        )
        log.info("secret stored ref=%s size=%d ttl=%d", self.record_ref, len(plaintext), ttl)
        self.services.metrics.secrets_created.inc()

    async def _store(
        self, record: SecretRecord, cipher: crypto.PayloadCipher, plaintext: bytes
    ) -> None:
        """Write the payload (GridFS first when large), then the record."""
        store = self.services.store
        if len(plaintext) <= self.services.settings.inline_secret_bytes:
            record["chunks"] = await _maybe_in_thread(cipher.seal_all, plaintext)
            await store.insert(record)
            return

        chunks = _seal_chunks(cipher, plaintext)
        file_id = await store.upload(record["_id"], record["expires_at"], chunks)
        record["file_id"] = file_id
        try:
            await store.insert(record)
        except BaseException:
            # No record points at the file, so no request could ever read it;
            # delete it now instead of waiting for the purge of orphans.
            await _delete_quietly(self.services, file_id)
            raise


class SecretHandler(RateLimitMixin, JsonBodyHandler):
    """`POST /secrets/{secret_key}`: return the secret once to the right passphrase."""

    route = "/secrets/{key}"
    allowed_methods = ("POST",)

    async def post(self, key_text: str) -> None:
        """Check the passphrase, claim the record and send the secret."""
        request = await self.load_body(_READ_SCHEMA)
        key = crypto.parse_secret_key(key_text)
        if key is None:
            raise NotFound()
        record_id = crypto.record_id(key)
        self.record_ref = self.services.record_ref(record_id)
        store = self.services.store
        now = self.services.clock()

        record = await store.find_live(record_id, now)
        if record is None:
            raise NotFound()
        params = self._stored_params(record)
        passphrase = request["passphrase"].reveal().encode("utf-8")
        pool = self.services.kdf_pool
        async with pool.admission():
            # The attempt is used before scrypt runs, so parallel guesses can
            # never exceed the budget.
            attempts_left = await store.reserve_attempt(record_id, now)
            if attempts_left is None:
                raise NotFound()
            kek = await pool.run(crypto.derive_kek, passphrase, key, record["salt"], params)

        try:
            data_key = crypto.unwrap_data_key(kek, record["wrapped_key"], record_id)
        except crypto.DecryptionError:
            await self._wrong_passphrase(record, attempts_left)
            raise WrongPassphrase(attempts_left) from None

        # One atomic find_one_and_delete: of all the readers that got this
        # far, only the one that deletes the record sends the secret.
        claimed = await store.claim(record_id)
        if claimed is None:
            raise NotFound()
        self.claimed_secret = True
        cipher = crypto.PayloadCipher(data_key, record_id, claimed["size"])
        if "file_id" in claimed:
            await self._stream(claimed, cipher)
        else:
            await self._send_inline(claimed, cipher)

    def _stored_params(self, record: SecretRecord) -> crypto.KdfParams:
        """Read the record's KDF parameters, refusing values above the ceiling.

        A record of another format version, or with missing or mistyped KDF
        fields, gets 404 before an attempt is used or scrypt runs.
        """
        try:
            if record["version"] != crypto.FORMAT_VERSION:
                raise ValueError("unknown format version")
            stored = record["kdf"]
            params = crypto.KdfParams(n=stored["n"], r=stored["r"], p=stored["p"])
            crypto.check_stored_kdf_params(params)
        except (KeyError, TypeError, ValueError) as error:
            log.error(
                "unreadable record ref=%s: %s: %s", self.record_ref, type(error).__name__, error
            )
            raise NotFound() from None
        return params

    async def _wrong_passphrase(self, record: SecretRecord, attempts_left: int) -> None:
        self.services.metrics.wrong_passphrases.inc()
        if attempts_left > 0:
            log.info("wrong passphrase ref=%s attempts_left=%d", self.record_ref, attempts_left)
            return
        await self.services.store.destroy(record["_id"], record.get("file_id"))
        log.info("secret destroyed after too many wrong passphrases ref=%s", self.record_ref)
        self.services.metrics.secrets_destroyed.inc()

    async def _send_inline(self, record: SecretRecord, cipher: crypto.PayloadCipher) -> None:
        try:
            plaintext = await _maybe_in_thread(cipher.open_all, record.get("chunks", []))
        except crypto.DecryptionError:
            log.error("stored payload failed authentication ref=%s", self.record_ref)
            raise NotFound() from None
        text = plaintext.decode("utf-8")
        self.write_json(200, {"secret": text})
        log.info("secret read ref=%s", self.record_ref)
        self.services.metrics.secrets_read.inc()

    async def _stream(self, record: SecretRecord, cipher: crypto.PayloadCipher) -> None:
        """Decrypt a GridFS payload chunk by chunk and send it as it comes.

        The first chunk is verified before the status line goes out, so a
        payload damaged at its start gets 404. Damage found later can only
        cut the connection: the client sees a truncated transfer, never a
        complete 200. The file is deleted afterwards whatever the client does; if shutdown cuts
        the request off first, the purge job deletes it later.
        """
        file_id = record["file_id"]
        try:
            await self._send_chunks(file_id, cipher)
        finally:
            await _delete_quietly(self.services, file_id)

    async def _send_chunks(self, file_id: Any, cipher: crypto.PayloadCipher) -> None:
        store = self.services.store
        decoder = codecs.getincrementaldecoder("utf-8")()
        started = False
        try:
            for index in range(cipher.chunks):
                sealed = await store.read_chunk(file_id, index)
                if sealed is None:
                    raise crypto.DecryptionError("payload chunk is missing")
                plain = await run_cpu(cipher.open, index, sealed)
                last = index == cipher.chunks - 1
                piece = json.dumps(decoder.decode(plain, final=last), ensure_ascii=False)[1:-1]
                if not started:
                    self.set_status(200)
                    self.set_header("Content-Type", "application/json")
                    self.write('{"secret": "')
                    started = True
                self.write(piece)
                await self.flush()
        except crypto.DecryptionError:
            log.error("stored payload failed authentication ref=%s", self.record_ref)
            if not started:
                raise NotFound() from None
            self._abort_response()
            return
        except ServiceUnavailable:
            if not started:
                # NOTE: the record is claimed already, so this 503 loses the
                # secret: a retry after Retry-After gets 404.
                raise
            log.error("database failed while streaming ref=%s", self.record_ref)
            self._abort_response()
            return
        except StreamClosedError:
            log.info("client disconnected while reading ref=%s", self.record_ref)
            return
        self.finish('"}')
        log.info("secret read ref=%s size=%d", self.record_ref, cipher.chunks)
        self.services.metrics.secrets_read.inc()

    def _abort_response(self) -> None:
        """Drop the connection mid-response so the partial body cannot pass as complete.

        `finish` would send the zero-length chunk that ends a chunked body, so
        the stream is detached (which marks the response finished) and closed
        instead. The client sees a truncated transfer. `finish` also writes the
        access line, so it is written here.
        """
        # NOTE: an HTTP/1.0 response has no chunked framing, so there the cut
        # looks like the end of the body. The JSON still lacks its closing `"}`.
        self.detach().close()
        self.application.log_request(self)


class HealthHandler(BaseHandler):
    """`GET /healthz`: the process is up; checks no dependency."""

    route = "/healthz"

    def get(self) -> None:
        """Return 200 while the event loop runs."""
        self.write({"status": "ok"})


class ReadyHandler(BaseHandler):
    """`GET /readyz`: 200 when the database responds to a ping, 503 otherwise or while stopping."""

    route = "/readyz"

    services: Services

    def initialize(self, services: Services) -> None:
        """Receive the application's shared services."""
        self.services = services

    async def get(self) -> None:
        """Ping the database within its deadline."""
        ready = not self.services.shutting_down
        if ready:
            try:
                await self.services.store.ping()
            except ServiceUnavailable:
                ready = False
        self.set_status(200 if ready else 503)
        if not ready:
            self.set_header("Retry-After", "5")
        self.write({"status": "ready" if ready else "unavailable"})


class ProblemTypeHandler(ApiHandler):
    """`GET /problems/{name}`: describe a problem type, so its `type` URI resolves."""

    route = "/problems/{name}"
    allowed_methods = ("GET",)

    def get(self, *args: str) -> None:
        """Return the title, status and description of one problem type."""
        for problem in PROBLEM_CLASSES:
            if problem.name == args[0]:
                self.set_header("Content-Type", "application/json")
                self.finish(
                    {
                        "type": problem.type_uri(),
                        "title": problem.title,
                        "status": problem.status,
                        "description": problem.description,
                    }
                )
                return
        raise NotFound()

    head = put = patch = delete = options = post = ApiHandler.get


class MetricsHandler(ApiHandler):
    """`GET /metrics`: this application's metrics in the Prometheus text format."""

    route = "/metrics"
    allowed_methods = ("GET",)

    def get(self, *args: str) -> None:
        """Render every metric of the application's registry."""
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.services.metrics.exposition())

    head = put = patch = delete = options = post = ApiHandler.get


# Building a marshmallow schema deep-copies its fields, which costs more than
# validating a small body, so each schema is built once and reused.
_READ_SCHEMA = ReadRequest()


@functools.lru_cache(maxsize=8)
def _generate_schema(ttl_max: int) -> GenerateRequest:
    return GenerateRequest(ttl_max=ttl_max)


async def _encode(text: str) -> bytes:
    if len(text) > LOOP_CRYPTO_BYTES:
        return await run_cpu(text.encode, "utf-8")
    return text.encode("utf-8")


async def _maybe_in_thread(function: Any, value: Any) -> Any:
    if len(value) > LOOP_CRYPTO_BYTES:
        return await run_cpu(function, value)
    return function(value)


async def _seal_chunks(cipher: crypto.PayloadCipher, plaintext: bytes) -> AsyncIterator[bytes]:
    step = crypto.PLAIN_CHUNK_BYTES
    for index in range(cipher.chunks):
        yield await run_cpu(cipher.seal, index, plaintext[index * step : (index + 1) * step])


async def _delete_quietly(services: Services, file_id: Any) -> None:
    try:
        await services.store.delete_file(file_id)
    except ServiceUnavailable:
        # The purge job removes files whose record is gone.
        log.warning("could not delete a payload file; the purge job will")


__all__ = [
    "GenerateHandler",
    "HealthHandler",
    "MetricsHandler",
    "ProblemTypeHandler",
    "ReadyHandler",
    "SecretHandler",
]
