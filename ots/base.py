"""Shared request handling: problem responses, strict JSON bodies, safe logging.

`ApiHandler` is the base of every route. It turns any exception into an
`application/problem+json` response, and it logs exceptions with the route
pattern and a keyed hash of the record id instead of the raw path, which
contains the secret key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from marshmallow import Schema, ValidationError
from tornado.httputil import HTTPServerRequest
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from ots.body import parse_json_object
from ots.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Problem,
    UnsupportedMediaType,
    ValidationFailed,
)
from ots.logs import REQUEST_ID_HEADER, accept_request_id, bind_request_id
from ots.metrics import Metrics
from ots.settings import Settings
from ots.workers import KdfPool, run_cpu

if TYPE_CHECKING:
    from types import TracebackType

    from ots.ratelimit import RateLimiter
    from ots.store import SecretStore

app_log = logging.getLogger("ots.app")

# Bodies up to this size are parsed on the event loop; larger ones in a thread.
INLINE_PARSE_BYTES: Final = 64 * 1024

# Unknown member names are echoed in `errors` only when they look like field
# names; anything else (which might be pasted secret text) is reported under
# a fixed key.
FIELD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
UNPRINTABLE_FIELD: Final = "(unknown field name)"


@dataclasses.dataclass
class Services:
    """Shared state of the handlers of one application."""

    settings: Settings
    store: SecretStore
    kdf_pool: KdfPool
    clock: Callable[[], datetime.datetime]
    log_key: bytes
    shutting_down: bool = False
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    # Every ApiHandler adds itself, and graceful shutdown waits for the unfinished
    # ones. The set holds weak references, so a handler leaves it when collected.
    requests: weakref.WeakSet[ApiHandler] = dataclasses.field(default_factory=weakref.WeakSet)
    # Handlers that list RateLimitMixin count their requests here; None: no limit.
    rate_limiter: RateLimiter | None = None

    def record_ref(self, record_id: str) -> str:
        """Short keyed hash of a record id for logs: correlates lines, reveals nothing."""
        digest = hmac.new(self.log_key, record_id.encode("ascii"), hashlib.sha256)
        return digest.hexdigest()[:12]

    def unfinished_requests(self) -> list[ApiHandler]:
        """Return the handlers whose response has not been finished yet."""
        return [handler for handler in self.requests if not handler._finished]


class BaseHandler(RequestHandler):
    """Base of every handler: a request id on the response and in each log line.

    The id is the client's `X-Request-ID` when it is 1 to 64 of
    `[A-Za-z0-9._-]`, otherwise a new random one. `route` is the pattern that
    the access line and the metrics show in place of the raw path.
    """

    route: ClassVar[str] = "-"
    request_id: str

    def __init__(
        self, application: Application, request: HTTPServerRequest, **kwargs: Any
    ) -> None:
        # Set before RequestHandler.__init__, which calls clear() and then
        # initialize(), so the header and every log line of the request have it.
        self.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        bind_request_id(self.request_id)
        super().__init__(application, request, **kwargs)

    def clear(self) -> None:
        """Reset the response and add `X-Request-ID`, also before an error is written."""
        super().clear()
        self.set_header(REQUEST_ID_HEADER, self.request_id)


class ApiHandler(BaseHandler):
    """Base handler: problem+json errors, `Cache-Control: no-store`, safe logs."""

    route: ClassVar[str] = "-"
    allowed_methods: ClassVar[tuple[str, ...]] = ()
    services: Services
    record_ref: str | None
    # Set once the handler has deleted a record to send its secret: from then
    # on, cutting the response off loses the secret.
    claimed_secret: bool

    def initialize(self, services: Services) -> None:
        """Receive the application's shared services and join its running requests."""
        self.services = services
        self.record_ref = None
        self.claimed_secret = False
        services.requests.add(self)

    def set_default_headers(self) -> None:
        """Mark every response, errors included, as not to be stored by any cache."""
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Write the current exception as an RFC 9457 problem."""
        problem = _as_problem(status_code, kwargs.get("exc_info"))
        self.set_status(problem.status)
        self.set_header("Content-Type", PROBLEM_CONTENT_TYPE)
        if problem.retry_after is not None:
            self.set_header("Retry-After", str(problem.retry_after))
        if isinstance(problem, MethodNotAllowed):
            self.set_header("Allow", ", ".join(self.allowed_methods))
        self.finish(json.dumps(problem.body()))

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Log an exception by route pattern, never the raw path, headers or body."""
        if isinstance(value, HTTPError):
            message = value.log_message
            if message:
                app_log.warning(
                    "%s %s ref=%s: %s", self.request.method, self.route, self.record_ref, message
                )
            return
        if isinstance(value, asyncio.CancelledError):
            # Shutdown cancels the work of requests its grace period cut off.
            app_log.warning(
                "%s %s ref=%s cancelled by shutdown",
                self.request.method,
                self.route,
                self.record_ref,
            )
            return
        app_log.error(
            "unexpected error in %s %s ref=%s",
            self.request.method,
            self.route,
            self.record_ref,
            exc_info=(typ, value, tb),  # type: ignore[arg-type]
        )

    def write_json(self, status: int, document: dict[str, Any]) -> None:
        """Finish the response with a JSON document."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(document, ensure_ascii=False))

    def get(self, *args: str) -> None:
        """Reject GET: reading must never consume a secret through a link preview."""
        raise MethodNotAllowed()

    head = put = patch = delete = options = get


@stream_request_body
class JsonBodyHandler(ApiHandler):
    """A handler that accepts a JSON body of at most `body_limit()` bytes.

    The body streams in through `data_received`, so a body over the limit is
    rejected with 413 as soon as it crosses the limit, before it is buffered.
    """

    _chunks: list[bytes]
    _received: int

    def body_limit(self) -> int:
        """Largest body this route accepts, in bytes."""
        return 64 * 1024

    async def prepare(self) -> None:
        """Check the headers of a POST before its body is read."""
        self._chunks = []
        self._received = 0
        if self.request.method != "POST":
            return
        _check_content_type(self.request.headers.get("Content-Type"))
        declared = self.request.headers.get("Content-Length", "0")
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is invalid.")
        if int(declared) > self.body_limit():
            raise PayloadTooLarge()
        # A generous connection cap, because `data_received` returns 413 as soon
        # as the body crosses the limit; Tornado's cap only stops runaway bodies.
        self.request.connection.set_max_body_size(2 * self.body_limit())  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        """Collect one piece of the body, rejecting it once it exceeds the limit."""
        if self._finished:
            return
        self._received += len(chunk)
        if self._received > self.body_limit():
            self._chunks = []
            self.send_error(413, exc_info=(PayloadTooLarge, PayloadTooLarge(), None))
            return
        self._chunks.append(chunk)

    async def load_body(self, schema: Schema) -> dict[str, Any]:
        """Parse the body and validate it against `schema`.

        Raises:
            BadRequest: the body is not a well-formed JSON object.
            ValidationFailed: the object does not match the schema.

        """
        body = b"".join(self._chunks)
        self._chunks = []
        if len(body) > INLINE_PARSE_BYTES:
            document = await run_cpu(parse_json_object, body)
        else:
            document = parse_json_object(body)
        del body
        try:
            result: dict[str, Any] = schema.load(document)
        except ValidationError as error:
            raise ValidationFailed(_field_errors(error)) from None
        return result


class NotFoundHandler(JsonBodyHandler):
    """Every unknown route: 404 problem for any method, without reading a body."""

    async def prepare(self) -> None:
        """Reject the request before its body is read."""
        raise NotFound()


def _check_content_type(header: str | None) -> None:
    if header is None:
        raise UnsupportedMediaType()
    media_type, _, parameters = header.partition(";")
    if media_type.strip().lower() != "application/json":
        raise UnsupportedMediaType()
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise UnsupportedMediaType("JSON bodies must be UTF-8; use charset=utf-8 or none.")


def _field_errors(error: ValidationError) -> dict[str, list[str]]:
    messages = error.normalized_messages()  # type: ignore[no-untyped-call]
    result: dict[str, list[str]] = {}
    for field, value in messages.items():
        items = value if isinstance(value, list) else [value]
        name = str(field) if FIELD_NAME.fullmatch(str(field)) else UNPRINTABLE_FIELD
        result.setdefault(name, []).extend(str(item) for item in items)
    return result


def _as_problem(status_code: int, exc_info: Any) -> Problem:
    """Map whatever was raised onto a problem; unknown errors become a bare 500."""
    value = exc_info[1] if exc_info else None
    if isinstance(value, Problem):
        return value
    by_status: dict[int, type[Problem]] = {
        400: BadRequest,
        404: NotFound,
        405: MethodNotAllowed,
        413: PayloadTooLarge,
        415: UnsupportedMediaType,
    }
    problem_class = by_status.get(status_code, InternalError)
    return problem_class()
