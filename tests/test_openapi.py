"""The OpenAPI document: valid, complete, and true to what the service sends."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import tornado.httpclient
import tornado.web
from openapi_spec_validator import validate

from ots.base import ApiHandler
from ots.errors import PROBLEM_CLASSES, PROBLEM_CONTENT_TYPE
from ots.openapi import OpenApiHandler
from ots.settings import Settings
from tests.conftest import Api

PASSPHRASE = "openapi test passphrase"
UNKNOWN_KEY = "A" * 43
GENERATE_STATUSES = {"201", "400", "405", "413", "415", "422", "429", "503", "500"}
READ_STATUSES = {"200", "400", "403", "404", "405", "413", "415", "422", "429", "503", "500"}


async def fetch_document(api: Api) -> dict[str, Any]:
    response = await api.request("GET", "/openapi.json")
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    document: dict[str, Any] = json.loads(response.body)
    return document


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` such as `#/components/headers/Location`."""
    if "$ref" not in node:
        return node
    target: Any = document
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    result: dict[str, Any] = target
    return result


def schema_errors(document: dict[str, Any], schema: dict[str, Any], value: Any) -> list[str]:
    """Validate `value` against a schema of the document; return the error messages."""
    root = {**schema, "components": document["components"]}
    validator = jsonschema.Draft202012Validator(root)
    return [error.message for error in validator.iter_errors(value)]


def template_pattern(path: str) -> re.Pattern[str]:
    """Turn an OpenAPI path template into a regular expression for concrete paths."""
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)))


def served_rules(app: tornado.web.Application) -> list[Any]:
    return list(app.wildcard_router.rules)


def sample_path(rule: Any) -> str:
    """Build a concrete path that the rule matches, with `sample` for each group."""
    matcher = rule.matcher
    path: str = matcher.reverse(*["sample"] * matcher.regex.groups)
    return path


def assert_conforms(
    document: dict[str, Any],
    path: str,
    method: str,
    response: tornado.httpclient.HTTPResponse,
) -> None:
    """Check status, media type, body schema and headers against the document."""
    operation = document["paths"][path][method]
    assert str(response.code) in operation["responses"], (path, method, response.code)
    described = operation["responses"][str(response.code)]

    media_type = response.headers["Content-Type"].split(";")[0].strip()
    assert media_type in described["content"], (path, response.code, media_type)
    content = described["content"][media_type]
    if media_type.endswith("json"):
        body = json.loads(response.body)
        assert schema_errors(document, content["schema"], body) == [], (path, response.code)

    for name, reference in described.get("headers", {}).items():
        header = resolve(document, reference)
        if header.get("required"):
            assert name in response.headers, (path, response.code, name)
        if name in response.headers:
            value = response.headers[name]
            assert schema_errors(document, header["schema"], value) == [], (name, value)


@pytest.mark.gen_test
async def test_document_is_valid_openapi_31(api: Api) -> None:
    document = await fetch_document(api)

    validate(document)
    assert document["openapi"] == "3.1.0"


@pytest.mark.gen_test
async def test_every_served_route_is_documented(api: Api, app: tornado.web.Application) -> None:
    document = await fetch_document(api)
    patterns = [template_pattern(path) for path in document["paths"]]

    for rule in served_rules(app):
        sample = sample_path(rule)
        assert any(pattern.fullmatch(sample) for pattern in patterns), sample


@pytest.mark.gen_test
async def test_every_documented_path_is_served(api: Api, app: tornado.web.Application) -> None:
    document = await fetch_document(api)
    regexes = [rule.matcher.regex for rule in served_rules(app)]

    for path in document["paths"]:
        concrete = re.sub(r"\{[^}]+\}", "sample", path)
        assert any(regex.match(concrete) for regex in regexes), path


@pytest.mark.gen_test
async def test_documented_methods_match_handlers(api: Api, app: tornado.web.Application) -> None:
    document = await fetch_document(api)
    patterns = {path: template_pattern(path) for path in document["paths"]}

    for rule in served_rules(app):
        handler = rule.target
        if not issubclass(handler, ApiHandler):
            continue
        sample = sample_path(rule)
        path = next(path for path, pattern in patterns.items() if pattern.fullmatch(sample))
        expected = {method.lower() for method in handler.allowed_methods}
        assert set(document["paths"][path]) == expected, path


@pytest.mark.gen_test
async def test_endpoints_document_every_status(api: Api) -> None:
    document = await fetch_document(api)

    generate = document["paths"]["/generate"]["post"]["responses"]
    read = document["paths"]["/secrets/{secret_key}"]["post"]["responses"]
    assert set(generate) == GENERATE_STATUSES
    assert set(read) == READ_STATUSES


@pytest.mark.gen_test
async def test_every_problem_type_is_documented(api: Api) -> None:
    document = await fetch_document(api)
    documented: set[tuple[str, int]] = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                if PROBLEM_CONTENT_TYPE not in content:
                    continue
                schema = resolve(document, content[PROBLEM_CONTENT_TYPE]["schema"])
                narrowed = schema["allOf"][1]["properties"]
                assert narrowed["status"]["const"] == int(status)
                documented.add((narrowed["type"]["const"], int(status)))

    for problem in PROBLEM_CLASSES:
        assert (problem.type_uri(), problem.status) in documented, problem.name


@pytest.mark.gen_test
async def test_problem_name_parameter_lists_every_type(api: Api) -> None:
    document = await fetch_document(api)

    parameter = resolve(document, document["components"]["parameters"]["problem_name"])
    assert set(parameter["schema"]["enum"]) == {problem.name for problem in PROBLEM_CLASSES}


@pytest.mark.gen_test
async def test_every_example_matches_its_schema(api: Api) -> None:
    document = await fetch_document(api)
    checked = 0
    for operations in document["paths"].values():
        for operation in operations.values():
            bodies = [operation.get("requestBody", {})]
            bodies.extend(operation["responses"].values())
            for body in bodies:
                for media in body.get("content", {}).values():
                    if "example" in media:
                        assert schema_errors(document, media["schema"], media["example"]) == []
                        checked += 1

    assert checked >= len(READ_STATUSES) + len(GENERATE_STATUSES)


@pytest.mark.gen_test
async def test_request_schemas_reject_unknown_members(api: Api) -> None:
    document = await fetch_document(api)

    for name in ("GenerateRequest", "ReadRequest"):
        assert document["components"]["schemas"][name]["additionalProperties"] is False


@pytest.mark.gen_test
@pytest.mark.settings(secret_ttl_max=3600, secret_ttl_default=600)
async def test_ttl_range_follows_settings(api: Api) -> None:
    document = await fetch_document(api)

    ttl = document["components"]["schemas"]["GenerateRequest"]["properties"]["ttl"]
    assert ttl["type"] == "integer"
    assert ttl["minimum"] == 60
    assert ttl["maximum"] == 3600


GENERATE_BODIES = {
    "valid": {"secret": "s", "passphrase": PASSPHRASE, "ttl": 60},
    "no ttl": {"secret": "s", "passphrase": PASSPHRASE},
    "ttl too small": {"secret": "s", "passphrase": PASSPHRASE, "ttl": 59},
    "ttl too large": {"secret": "s", "passphrase": PASSPHRASE, "ttl": 30 * 24 * 3600 + 1},
    "ttl as string": {"secret": "s", "passphrase": PASSPHRASE, "ttl": "60"},
    "ttl as boolean": {"secret": "s", "passphrase": PASSPHRASE, "ttl": True},
    "ttl as fraction": {"secret": "s", "passphrase": PASSPHRASE, "ttl": 60.5},
    "unknown member": {"secret": "s", "passphrase": PASSPHRASE, "tll": 60},
    "no secret": {"passphrase": PASSPHRASE},
    "empty secret": {"secret": "", "passphrase": PASSPHRASE},
    "secret not a string": {"secret": 5, "passphrase": PASSPHRASE},
    "empty passphrase": {"secret": "s", "passphrase": ""},
    "only spaces": {"secret": "s", "passphrase": "   "},
    "control character": {"secret": "s", "passphrase": "tab\there"},
    "passphrase too long": {"secret": "s", "passphrase": "p" * 1025},
    "longest passphrase": {"secret": "s", "passphrase": "p" * 1024},
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", sorted(GENERATE_BODIES))
async def test_generate_schema_agrees_with_validation(api: Api, case: str) -> None:
    document = await fetch_document(api)
    body = GENERATE_BODIES[case]
    schema = {"$ref": "#/components/schemas/GenerateRequest"}

    response = await api.request("POST", "/generate", body)

    valid = schema_errors(document, schema, body) == []
    assert (response.code == 201) == valid, (case, response.code)
    assert response.code in (201, 422)


@pytest.mark.gen_test
async def test_generate_and_read_responses_conform(api: Api) -> None:
    document = await fetch_document(api)
    read_path = "/secrets/{secret_key}"

    created = await api.generate("conformance secret", PASSPHRASE, ttl=600)
    assert_conforms(document, "/generate", "post", created)
    key = json.loads(created.body)["secret_key"]

    wrong = await api.read(key, "not the passphrase")
    assert wrong.code == 403
    assert_conforms(document, read_path, "post", wrong)

    read = await api.read(key, PASSPHRASE)
    assert read.code == 200
    assert_conforms(document, read_path, "post", read)

    second_read = await api.read(key, PASSPHRASE)
    assert second_read.code == 404
    assert_conforms(document, read_path, "post", second_read)


ERROR_CASES: dict[str, tuple[str, str, Any, bytes | None, dict[str, str], str, int]] = {
    # name: method, path, JSON body, raw body, headers, documented path, status
    "generate 422": (
        "POST",
        "/generate",
        {"secret": "s", "passphrase": PASSPHRASE, "ttl": 1},
        None,
        {},
        "/generate",
        422,
    ),
    "generate 400": ("POST", "/generate", None, b"{not json", {}, "/generate", 400),
    "generate 405": ("GET", "/generate", None, None, {}, "/generate", 405),
    "generate 415": (
        "POST",
        "/generate",
        None,
        b'{"secret": "s"}',
        {"Content-Type": "text/plain"},
        "/generate",
        415,
    ),
    "read 404": (
        "POST",
        f"/secrets/{UNKNOWN_KEY}",
        {"passphrase": PASSPHRASE},
        None,
        {},
        "/secrets/{secret_key}",
        404,
    ),
    "read 422": (
        "POST",
        f"/secrets/{UNKNOWN_KEY}",
        {"passphrase": ""},
        None,
        {},
        "/secrets/{secret_key}",
        422,
    ),
    "read 405": ("HEAD", f"/secrets/{UNKNOWN_KEY}", None, None, {}, "/secrets/{secret_key}", 405),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
async def test_error_responses_conform(api: Api, case: str) -> None:
    document = await fetch_document(api)
    method, path, body, raw, headers, documented, status = ERROR_CASES[case]

    response = await api.request(method, path, body, raw=raw, headers=headers)

    assert response.code == status
    if method == "HEAD":
        # A HEAD response has no body to check; the status and headers still must match.
        assert response.headers["Allow"] == "POST"
        return
    assert_conforms(document, documented, "post", response)


@pytest.mark.gen_test
@pytest.mark.settings(max_secret_bytes=16, inline_secret_bytes=16)
async def test_payload_too_large_conforms(api: Api) -> None:
    document = await fetch_document(api)

    response = await api.generate("seventeen bytes!!", PASSPHRASE)

    assert response.code == 413
    assert_conforms(document, "/generate", "post", response)


@pytest.mark.gen_test
@pytest.mark.settings(rate_limit_per_minute=1)
async def test_rate_limited_responses_conform(api: Api) -> None:
    document = await fetch_document(api)

    allowed = await api.generate("rate limited secret", PASSPHRASE)
    limited = await api.generate("rate limited secret", PASSPHRASE)

    assert allowed.code == 201
    assert "RateLimit-Limit" in allowed.headers
    assert_conforms(document, "/generate", "post", allowed)
    assert limited.code == 429
    assert_conforms(document, "/generate", "post", limited)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "path,template",
    [
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
        ("/problems/wrong-passphrase", "/problems/{name}"),
        ("/problems/no-such-problem", "/problems/{name}"),
        ("/openapi.json", "/openapi.json"),
        ("/metrics", "/metrics"),
    ],
)
async def test_get_routes_conform(api: Api, path: str, template: str) -> None:
    document = await fetch_document(api)

    response = await api.request("GET", path)

    assert_conforms(document, template, "get", response)


@pytest.mark.gen_test
@pytest.mark.settings(metrics_enabled=False)
async def test_metrics_path_absent_when_metrics_off(api: Api) -> None:
    document = await fetch_document(api)

    assert "/metrics" not in document["paths"]


@pytest.mark.gen_test
async def test_document_is_built_with_the_app(api: Api, app: tornado.web.Application) -> None:
    rule = next(rule for rule in served_rules(app) if rule.target is OpenApiHandler)

    first = await api.request("GET", "/openapi.json")
    second = await api.request("GET", "/openapi.json")

    assert first.body == rule.target_kwargs["document"]
    assert second.body == first.body


def test_settings_fixture_serves_metrics_on_main_port(settings: Settings) -> None:
    # The route tests above rely on /metrics being on the main port by default.
    assert settings.metrics_enabled
    assert settings.metrics_port is None
