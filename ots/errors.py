"""Errors a client can see, each an RFC 9457 problem type.

Every error the API returns is one of these classes::

    Problem (tornado.web.HTTPError)
    ├── BadRequest              400  /problems/invalid-body
    ├── WrongPassphrase         403  /problems/wrong-passphrase   + attempts_left
    ├── NotFound                404  /problems/not-found
    ├── MethodNotAllowed        405  /problems/method-not-allowed
    ├── PayloadTooLarge         413  /problems/payload-too-large
    ├── UnsupportedMediaType    415  /problems/unsupported-media-type
    ├── ValidationFailed        422  /problems/validation-failed  + errors
    ├── RateLimited             429  /problems/rate-limited       (Retry-After)
    ├── ServiceUnavailable      503  /problems/service-unavailable (Retry-After)
    └── InternalError           500  /problems/internal-error

Clients match on `type`, which never changes; `title` and `detail` are
English prose for people and may be reworded. `detail` never contains
client input, secret material or internals.

The `type` values are URI references relative to the service, and
`GET /problems/{name}` returns the description of each.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

from tornado.web import HTTPError

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
PROBLEM_BASE: Final = "/problems/"


class Problem(HTTPError):
    """Base class: an error with an HTTP status and a stable problem type."""

    status: ClassVar[int] = 500
    name: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"
    description: ClassVar[str] = "The service failed; the log contains the details."
    retry_after: int | None = None

    def __init__(self, detail: str | None = None, *, log_message: str | None = None) -> None:
        super().__init__(self.status, log_message)
        self.detail = detail or self.description

    @classmethod
    def type_uri(cls) -> str:
        """Return the stable URI that identifies this problem type."""
        return PROBLEM_BASE + cls.name

    def extensions(self) -> dict[str, Any]:
        """Return the extension members of this problem (none by default)."""
        return {}

    def body(self) -> dict[str, Any]:
        """Build the problem details object sent to the client."""
        return {
            "type": self.type_uri(),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extensions(),
        }


class BadRequest(Problem):
    """The body is not a well-formed JSON object."""

    status = 400
    name = "invalid-body"
    title = "Invalid request body"
    description = "The request body must be one JSON object in UTF-8."


class WrongPassphrase(Problem):
    """The passphrase did not open the secret; an attempt was used."""

    status = 403
    name = "wrong-passphrase"
    title = "Wrong passphrase"
    description = "The passphrase does not open this secret."

    def __init__(self, attempts_left: int) -> None:
        super().__init__()
        self.attempts_left = attempts_left

    def extensions(self) -> dict[str, Any]:
        """Return `attempts_left`: how many more passphrases may be tried."""
        return {"attempts_left": self.attempts_left}


class NotFound(Problem):
    """No such secret or route; one body for every reason."""

    status = 404
    name = "not-found"
    title = "Not found"
    description = (
        "Nothing is here: the secret never existed, has expired, was already read, "
        "or was destroyed after too many wrong passphrases."
    )


class MethodNotAllowed(Problem):
    """The route exists but does not accept this method."""

    status = 405
    name = "method-not-allowed"
    title = "Method not allowed"
    description = "This method is not allowed here; the Allow header lists the methods that are."


class PayloadTooLarge(Problem):
    """The body or the secret is larger than the configured limit."""

    status = 413
    name = "payload-too-large"
    title = "Payload too large"
    description = "The request body or the secret exceeds the size limit."


class UnsupportedMediaType(Problem):
    """The request does not declare a JSON body."""

    status = 415
    name = "unsupported-media-type"
    title = "Unsupported media type"
    description = "Send the body as Content-Type: application/json."


class ValidationFailed(Problem):
    """Well-formed JSON whose fields are wrong; `errors` maps each field to messages."""

    status = 422
    name = "validation-failed"
    title = "Validation failed"
    description = "One or more fields are invalid; see errors."

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__()
        self.errors = errors

    def extensions(self) -> dict[str, Any]:
        """Return `errors`: messages per field name."""
        return {"errors": self.errors}


class RateLimited(Problem):
    """The client sent more requests than the per-minute limit allows."""

    status = 429
    name = "rate-limited"
    title = "Too many requests"
    description = "The rate limit for this endpoint is exceeded; retry after Retry-After seconds."

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after


class ServiceUnavailable(Problem):
    """The database or the key-derivation pool cannot take the request now."""

    status = 503
    name = "service-unavailable"
    title = "Service unavailable"
    description = (
        "The service is busy or its database is unreachable; retry after Retry-After seconds."
    )

    def __init__(self, retry_after: int, *, log_message: str | None = None) -> None:
        super().__init__(log_message=log_message)
        self.retry_after = retry_after


class InternalError(Problem):
    """A bug; the client learns nothing internal."""


PROBLEM_CLASSES: Final[tuple[type[Problem], ...]] = (
    BadRequest,
    WrongPassphrase,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    RateLimited,
    ServiceUnavailable,
    InternalError,
)
