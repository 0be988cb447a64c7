"""API fuzzing: schemathesis generates requests from the service's own `/openapi.json`.

The service runs on a loopback port (`tests.live.ServiceThread`) in front of
the suite's MongoDB. Every operation of the live document is fuzzed with
requests that fit the schema (positive), and each operation that takes a
body or a path parameter also with requests that break it (negative).
Schemathesis checks each response: no 5xx, and a status code, content type,
headers and body that the document describes. A negative request must also
get a 4xx.

Reads of random keys would only ever see 404, so positive reads sometimes
target a secret stored a moment earlier, with the passphrase of the request
or with another one, which exercises the 200 and 403 responses too.

The budget is `OTS_FUZZ_EXAMPLES` generated examples per operation and mode
(default 5; `tox -e reliability` uses 20, the full run 120). Each example is
one request, plus one `POST /generate` for a read that targets a stored secret.
"""

from __future__ import annotations

import collections
import os
import secrets
from collections.abc import Iterator
from typing import Any, Final

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from tests.conftest import RECORDER, add_to_sweep, make_settings, quiet_loggers, report
from tests.live import ServiceThread, drop_database, dump_database

FUZZ_EXAMPLES: Final = int(os.environ.get("OTS_FUZZ_EXAMPLES", "5"))

# Every operation of the document; a new one fails `test_every_operation_is_fuzzed`
# until it is added here.
OPERATIONS: Final = (
    ("POST", "/generate"),
    ("POST", "/secrets/{secret_key}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/problems/{name}"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
)
# Operations whose only input is the optional X-Request-ID header, which takes
# any string, have no invalid requests, so they are fuzzed in positive mode only.
NEGATABLE: Final = frozenset({"/generate", "/secrets/{secret_key}", "/problems/{name}"})
FUZZ_RUNS: Final = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or path in NEGATABLE
]

CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS: Final = [*CHECKS, negative_data_rejection]

# What a positive read targets: a key that was never issued, a stored secret
# with the request's passphrase, or a stored secret with another passphrase.
READ_TARGETS: Final = ("random key", "right passphrase", "wrong passphrase")

REQUEST_TIMEOUT_SECONDS: Final = 30

REQUEST_COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def service(mongo_uri: str) -> Iterator[ServiceThread]:
    """The service on a loopback port, with a database of its own; GridFS above 1 KiB.

    urllib3's DEBUG records show request paths, which contain secret keys: the
    client's own, so they stay out of the sweep of the service's logs.
    PyMongo's DEBUG records (each command, connection and server selection)
    would make up almost all of the sweep's input. The database dump taken
    at the end covers what the commands carried.
    """
    database = f"ots_fuzz_{secrets.token_hex(6)}"
    settings = make_settings(
        mongo_uri, database, inline_secret_bytes=1024, max_secret_bytes=64 * 1024
    )
    with quiet_loggers("urllib3", "pymongo"), ServiceThread(settings) as running:
        yield running
    add_to_sweep("database dump", dump_database(mongo_uri, database))
    drop_database(mongo_uri, database)


@pytest.fixture(scope="module")
def schema(service: ServiceThread) -> BaseSchema:
    """The OpenAPI document as the running service serves it.

    It is loaded from a dict: loaded from its URL, schemathesis leaves out the
    operation that serves the document itself.
    """
    response = requests.get(f"{service.base_url}/openapi.json", timeout=REQUEST_TIMEOUT_SECONDS)
    assert response.status_code == 200
    return schemathesis.openapi.from_dict(response.json())


@pytest.fixture(scope="module")
def session(pytestconfig: pytest.Config) -> Iterator[requests.Session]:
    """One HTTP session for all fuzzing requests; reports the request counts at the end."""
    with requests.Session() as http:
        yield http
    total = sum(REQUEST_COUNTS.values())
    report(
        pytestconfig,
        f"fuzzing: {total} requests, {FUZZ_EXAMPLES} examples per operation and mode",
        *(f"  {label}: {count}" for label, count in sorted(REQUEST_COUNTS.items())),
    )


def fuzz_settings() -> hypothesis.settings:
    """Hypothesis settings for one operation and mode: the budget, no example database."""
    return hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


def store_secret(service: ServiceThread, http: requests.Session, passphrase: str) -> str | None:
    """Store a random secret under `passphrase`; return its key, or None if it is rejected."""
    secret = secrets.token_urlsafe(24)
    response = http.post(
        f"{service.base_url}/generate",
        json={"secret": secret, "passphrase": passphrase},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    REQUEST_COUNTS["POST /generate (for reads)"] += 1
    assert response.status_code < 500, response.text
    if response.status_code != 201:
        return None
    key: str = response.json()["secret_key"]
    RECORDER.add(secret)
    RECORDER.add(key)
    return key


def aim_read_at_stored_secret(
    case: Case[Any], target: str, service: ServiceThread, http: requests.Session
) -> None:
    """Point a positive read at a secret stored just now, when its body allows it."""
    body: Any = case.body
    if target == "random key" or not isinstance(body, dict):
        return
    passphrase = body.get("passphrase")
    if not isinstance(passphrase, str):
        return
    stored_under = passphrase if target == "right passphrase" else passphrase + " (other)"
    key = store_secret(service, http, stored_under)
    if key is not None:
        case.path_parameters = {**(case.path_parameters or {}), "secret_key": key}


def record_generated_strings(body: Any) -> None:
    """Record the distinctive strings of a generated body for the secrecy sweep.

    Short or repetitive strings, which hypothesis favours ("0", runs of NUL),
    would match unrelated bytes of a log line or a database dump. Strings
    with lone surrogates have no UTF-8 form, so the service rejects them.
    """
    if not isinstance(body, dict):
        return
    for value in body.values():
        if not isinstance(value, str) or len(value) < 12 or len(set(value)) < 8:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            continue
        RECORDER.add(value)


def test_every_operation_is_fuzzed(schema: BaseSchema) -> None:
    served = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), "the document has an operation schemathesis cannot load"
        operation = result.ok()
        served.add((operation.method.upper(), operation.path))

    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_RUNS)
def test_operation_conforms_under_fuzzing(
    schema: BaseSchema,
    service: ServiceThread,
    session: requests.Session,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = schema[path][method]
    checks = NEGATIVE_CHECKS if mode is GenerationMode.NEGATIVE else CHECKS
    label = f"{method} {path} ({mode})"
    aims_reads = mode is GenerationMode.POSITIVE and path == "/secrets/{secret_key}"

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @fuzz_settings()
    def fuzz(case: Case[Any], data: st.DataObject) -> None:
        if aims_reads:
            target = data.draw(st.sampled_from(READ_TARGETS), label="read target")
            aim_read_at_stored_secret(case, target, service, session)
        REQUEST_COUNTS[label] += 1
        record_generated_strings(case.body)
        case.call_and_validate(
            base_url=service.base_url,
            session=session,
            checks=checks,
            timeout=REQUEST_TIMEOUT_SECONDS,
        )

    fuzz()
