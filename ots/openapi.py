"""The OpenAPI 3.1 description of the service, served at `GET /openapi.json`.

apispec's marshmallow plugin builds the request and response bodies from the
schemas in `ots.schemas`, the same classes that validate requests, so the
description cannot drift from the validation. Each error status points to the
problem type of `ots.errors` that the service sends with it.

`build_document` runs once per application, in `make_app`, because the
document depends on the settings (the TTL ceiling, whether `/metrics` is on
the main port).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Final

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from ots import __version__
from ots.base import ApiHandler, Services
from ots.errors import (
    PROBLEM_CLASSES,
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Problem,
    RateLimited,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
    WrongPassphrase,
)
from ots.logs import REQUEST_ID_HEADER
from ots.schemas import (
    SECRET_KEY_PATTERN,
    GenerateRequest,
    GenerateResponse,
    ProblemResponse,
    ProblemTypeResponse,
    ReadRequest,
    ReadResponse,
    StatusResponse,
)
from ots.settings import Settings

OPENAPI_VERSION: Final = "3.1.0"
JSON: Final = "application/json"

# Illustrations only: the key is a random value that opens nothing.
EXAMPLE_KEY: Final = "VEXRf8TplRbK3_wr9xjpVGDDT_b-XtFDbeSsaOevL94"
EXAMPLE_PASSPHRASE: Final = "correct horse battery staple"  # noqa: S105
EXAMPLE_SECRET: Final = "postgres://app:example-password@db.internal/app"  # noqa: S105

GENERATE_PROBLEMS: Final[tuple[type[Problem], ...]] = (
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    RateLimited,
    ServiceUnavailable,
    InternalError,
)
# Any problem type can be the response to a read.
READ_PROBLEMS: Final[tuple[type[Problem], ...]] = PROBLEM_CLASSES

DESCRIPTION: Final = """\
Store a secret behind a passphrase and read it exactly once.

Request bodies are JSON objects (`Content-Type: application/json`, UTF-8);
unknown members are rejected. Errors are RFC 9457 problem details
(`application/problem+json`); clients match on `type`, and
`GET /problems/{name}` describes each type. Every response carries
`X-Request-ID`, the client's own when it is 1 to 64 of `[A-Za-z0-9._-]`.
Requests to unknown routes get 404 with the `/problems/not-found` problem.
"""

HEADERS: Final[dict[str, dict[str, Any]]] = {
    REQUEST_ID_HEADER: {
        "required": True,
        "description": "Id of this request, also in every log line about it.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
    },
    "Cache-Control": {
        "required": True,
        "description": "Always `no-store`: no cache may keep a key or a secret.",
        "schema": {"type": "string", "const": "no-store"},
    },
    "Location": {
        "required": True,
        "description": "Path of the new secret.",
        "schema": {"type": "string", "pattern": "^/secrets/[A-Za-z0-9_-]{43}$"},
    },
    "Retry-After": {
        "required": True,
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Allow": {
        "required": True,
        "description": "Methods this route accepts.",
        "schema": {"type": "string"},
    },
    "RateLimit-Limit": {
        "description": "Requests per client per minute on this route (when limiting is on).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "RateLimit-Remaining": {
        "description": "Requests left in the current minute (when limiting is on).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "RateLimit-Reset": {
        "description": "Seconds until the current minute's count resets (when limiting is on).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}
RATE_LIMIT_HEADERS: Final = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")

PARAMETERS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "secret_key": (
        "path",
        {
            "name": "secret_key",
            "required": True,
            "description": (
                "The key returned by POST /generate. A malformed key gets the same 404 "
                "as an unknown one."
            ),
            "schema": {
                "type": "string",
                "pattern": SECRET_KEY_PATTERN,
                "minLength": 43,
                "maxLength": 43,
            },
            "example": EXAMPLE_KEY,
        },
    ),
    "problem_name": (
        "path",
        {
            "name": "name",
            "required": True,
            "schema": {"type": "string", "enum": [cls.name for cls in PROBLEM_CLASSES]},
        },
    ),
    "request_id": (
        "header",
        {
            "name": REQUEST_ID_HEADER,
            "required": False,
            "description": (
                "Used as the request id when it is 1 to 64 of [A-Za-z0-9._-]; any other "
                "value is replaced by a new id, never rejected."
            ),
            "schema": {"type": "string"},
        },
    ),
}


def build_document(settings: Settings, *, metrics: bool) -> dict[str, Any]:
    """Build the OpenAPI document for an application with `settings`.

    `metrics` is True when the application serves `/metrics` itself.
    """
    spec = APISpec(
        title="ots",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={"description": DESCRIPTION, "license": {"name": "MIT", "identifier": "MIT"}},
    )
    _add_components(spec, settings)
    _add_path(spec, "/generate", "post", _generate(settings))
    _add_path(spec, "/secrets/{secret_key}", "post", _read(settings), "secret_key")
    _add_path(spec, "/healthz", "get", _health())
    _add_path(spec, "/readyz", "get", _ready())
    _add_path(spec, "/problems/{name}", "get", _problem_type(), "problem_name")
    _add_path(spec, "/openapi.json", "get", _openapi())
    if metrics:
        _add_path(spec, "/metrics", "get", _metrics())
    return spec.to_dict()


def _add_components(spec: APISpec, settings: Settings) -> None:
    """Register the schemas, headers and parameters that operations refer to."""
    spec.components.schema(
        "GenerateRequest", schema=GenerateRequest(ttl_max=settings.secret_ttl_max)
    )
    spec.components.schema("ReadRequest", schema=ReadRequest)
    spec.components.schema("GenerateResponse", schema=GenerateResponse)
    spec.components.schema("ReadResponse", schema=ReadResponse)
    spec.components.schema("Problem", schema=ProblemResponse)
    spec.components.schema("ProblemType", schema=ProblemTypeResponse)
    spec.components.schema("Status", schema=StatusResponse)
    for problem in PROBLEM_CLASSES:
        spec.components.schema(_problem_schema_name(problem), _problem_schema(problem))
    for name, header in HEADERS.items():
        spec.components.header(name, header)
    for name, (location, parameter) in PARAMETERS.items():
        spec.components.parameter(name, location, parameter)


def _add_path(
    spec: APISpec, path: str, method: str, operation: dict[str, Any], *parameters: str
) -> None:
    """Add one operation; every operation takes the optional X-Request-ID header."""
    operation["parameters"] = ["request_id", *parameters]
    spec.path(path, operations={method: operation})


def _problem_schema_name(problem: type[Problem]) -> str:
    return f"{problem.__name__}Problem"


def _problem_schema(problem: type[Problem]) -> dict[str, Any]:
    """Narrow the generic problem schema to one type: fixed `type` and `status`.

    `title` stays free text, because clients match on `type` and titles may be reworded.
    """
    properties: dict[str, Any] = {
        "type": {"const": problem.type_uri()},
        "status": {"const": problem.status},
    }
    required = ["type", "title", "status", "detail"]
    if problem is WrongPassphrase:
        required.append("attempts_left")
    if problem is ValidationFailed:
        required.append("errors")
    return {
        "description": problem.description,
        "allOf": [
            {"$ref": "#/components/schemas/Problem"},
            {"type": "object", "properties": properties, "required": required},
        ],
    }


def _example_problem(problem: type[Problem], settings: Settings) -> Problem:
    """Build a realistic instance of `problem` whose body serves as the example."""
    factories: dict[type[Problem], Callable[[], Problem]] = {
        WrongPassphrase: lambda: WrongPassphrase(settings.max_passphrase_attempts - 1),
        ValidationFailed: lambda: ValidationFailed(_example_validation_errors(settings)),
        RateLimited: lambda: RateLimited(retry_after=30),
        ServiceUnavailable: lambda: ServiceUnavailable(retry_after=5),
    }
    return factories.get(problem, problem)()


def _example_validation_errors(settings: Settings) -> dict[str, list[str]]:
    """Return the real messages for a body whose `ttl` is too small."""
    schema = GenerateRequest(ttl_max=settings.secret_ttl_max)
    body = {"secret": EXAMPLE_SECRET, "passphrase": EXAMPLE_PASSPHRASE, "ttl": 1}
    messages: dict[str, list[str]] = schema.validate(body)
    return messages


def _headers(*names: str) -> dict[str, Any]:
    """Refer to header components by name; apispec turns each name into a `$ref`."""
    return {name: name for name in names}


def _problem_responses(
    problems: Sequence[type[Problem]],
    settings: Settings,
    descriptions: dict[type[Problem], str],
) -> dict[str, Any]:
    """Describe each problem status of a rate-limited route: schema, example and headers."""
    common = [REQUEST_ID_HEADER, "Cache-Control", *RATE_LIMIT_HEADERS]
    responses: dict[str, Any] = {}
    for problem in problems:
        headers = list(common)
        if problem in (RateLimited, ServiceUnavailable):
            headers.append("Retry-After")
        if problem is MethodNotAllowed:
            headers.append("Allow")
        responses[str(problem.status)] = {
            "description": descriptions.get(problem, problem.description),
            "headers": _headers(*headers),
            "content": {
                PROBLEM_CONTENT_TYPE: {
                    "schema": _problem_schema_name(problem),
                    "example": _example_problem(problem, settings).body(),
                }
            },
        }
    return responses


def _generate(settings: Settings) -> dict[str, Any]:
    descriptions = {
        BadRequest: "The body is empty, not UTF-8, not JSON, or not one JSON object.",
        MethodNotAllowed: "Any method but POST; nothing is stored.",
        PayloadTooLarge: (
            f"The body exceeds {settings.max_generate_body_bytes} bytes, or the secret "
            f"exceeds {settings.max_secret_bytes} bytes of UTF-8."
        ),
        ValidationFailed: "A field is missing, unknown, of the wrong type or out of range.",
        ServiceUnavailable: "The database is unreachable or slow, or the KDF queue is full.",
    }
    return {
        "operationId": "generateSecret",
        "summary": "Store a secret behind a passphrase",
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": "GenerateRequest",
                    "example": {
                        "secret": EXAMPLE_SECRET,
                        "passphrase": EXAMPLE_PASSPHRASE,
                        "ttl": 3600,
                    },
                }
            },
        },
        "responses": {
            "201": {
                "description": "Stored. The key is shown only here; the service keeps no copy.",
                "headers": _headers(
                    "Location", REQUEST_ID_HEADER, "Cache-Control", *RATE_LIMIT_HEADERS
                ),
                "content": {
                    JSON: {
                        "schema": "GenerateResponse",
                        "example": {
                            "secret_key": EXAMPLE_KEY,
                            "expires_at": "2030-01-01T12:00:00Z",
                            "ttl": 3600,
                        },
                    }
                },
            },
            **_problem_responses(GENERATE_PROBLEMS, settings, descriptions),
        },
    }


def _read(settings: Settings) -> dict[str, Any]:
    descriptions = {
        BadRequest: "The body is empty, not UTF-8, not JSON, or not one JSON object.",
        WrongPassphrase: (
            "Wrong passphrase; one attempt is used. After the last one "
            "(attempts_left 0) the secret is gone."
        ),
        MethodNotAllowed: "Any method but POST (GET and HEAD included); nothing is consumed.",
        ValidationFailed: "The passphrase is missing, not a string, or invalid.",
        ServiceUnavailable: "The database is unreachable or slow, or the KDF queue is full.",
    }
    return {
        "operationId": "readSecret",
        "summary": "Read a secret once",
        "description": (
            "Returns the secret to the right passphrase and deletes it. Requests "
            "rejected before the passphrase is checked (400, 413, 415, 422, 429) "
            "use no attempt."
        ),
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": "ReadRequest", "example": {"passphrase": EXAMPLE_PASSPHRASE}}
            },
        },
        "responses": {
            "200": {
                "description": "The secret, exactly as stored; it no longer exists.",
                "headers": _headers(REQUEST_ID_HEADER, "Cache-Control", *RATE_LIMIT_HEADERS),
                "content": {
                    JSON: {"schema": "ReadResponse", "example": {"secret": EXAMPLE_SECRET}}
                },
            },
            **_problem_responses(READ_PROBLEMS, settings, descriptions),
        },
    }


def _status_response(description: str, status: str, *headers: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _headers(REQUEST_ID_HEADER, *headers),
        "content": {JSON: {"schema": "Status", "example": {"status": status}}},
    }


def _health() -> dict[str, Any]:
    return {
        "operationId": "getHealth",
        "summary": "Liveness: the process is up",
        "responses": {"200": _status_response("The event loop runs.", "ok")},
    }


def _ready() -> dict[str, Any]:
    return {
        "operationId": "getReadiness",
        "summary": "Readiness: the database answers a ping",
        "responses": {
            "200": _status_response("The database answered a ping.", "ready"),
            "503": _status_response(
                "The database did not answer, or the service is shutting down.",
                "unavailable",
                "Retry-After",
            ),
        },
    }


def _problem_type() -> dict[str, Any]:
    not_found = NotFound()
    return {
        "operationId": "getProblemType",
        "summary": "Describe a problem type",
        "responses": {
            "200": {
                "description": "The problem type's title, status and description.",
                "headers": _headers(REQUEST_ID_HEADER, "Cache-Control"),
                "content": {
                    JSON: {
                        "schema": "ProblemType",
                        "example": {
                            "type": NotFound.type_uri(),
                            "title": NotFound.title,
                            "status": NotFound.status,
                            "description": NotFound.description,
                        },
                    }
                },
            },
            "404": {
                "description": "No problem type has this name.",
                "headers": _headers(REQUEST_ID_HEADER, "Cache-Control"),
                "content": {
                    PROBLEM_CONTENT_TYPE: {
                        "schema": _problem_schema_name(NotFound),
                        "example": not_found.body(),
                    }
                },
            },
        },
    }


def _openapi() -> dict[str, Any]:
    return {
        "operationId": "getOpenApi",
        "summary": "This document",
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 description of the service.",
                "headers": _headers(REQUEST_ID_HEADER, "Cache-Control"),
                "content": {JSON: {"schema": {"type": "object"}}},
            }
        },
    }


def _metrics() -> dict[str, Any]:
    return {
        "operationId": "getMetrics",
        "summary": "Prometheus metrics",
        "responses": {
            "200": {
                "description": "Every metric of this instance in the Prometheus text format.",
                "headers": _headers(REQUEST_ID_HEADER, "Cache-Control"),
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }


def encode_document(document: dict[str, Any]) -> bytes:
    """Serialise the document once, so each request only writes bytes."""
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


class OpenApiHandler(ApiHandler):
    """`GET /openapi.json`: the OpenAPI document built when the application was."""

    route = "/openapi.json"
    allowed_methods = ("GET",)
    document: bytes

    def initialize(self, services: Services, document: bytes) -> None:  # type: ignore[override]
        """Receive the shared services and the encoded document."""
        super().initialize(services)
        self.document = document

    def get(self, *args: str) -> None:
        """Send the document."""
        self.set_header("Content-Type", JSON)
        self.finish(self.document)

    head = put = patch = delete = options = post = ApiHandler.get
