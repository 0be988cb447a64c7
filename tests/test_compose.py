"""Container contract: the compose files and the Dockerfile's runtime stage.

These tests read the files as text and YAML, so they need no Docker engine.
`.ci/container-checks` runs the real Compose and hadolint on the same files.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PASSTHROUGH = ("MONGO_URI", "MONGO_DATABASE", "RATE_LIMIT_PER_MINUTE")
COMPOSE_MONGO_URI = "mongodb://mongo:27017/?replicaSet=rs0"


def load_compose(name: str) -> dict[str, Any]:
    """Parse a compose file from the repository root into a dict."""
    document = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{name} is not a YAML mapping"
    return document


def variable_default(value: str, name: str) -> str:
    """Return the default of the `${NAME:-default}` reference that `value` starts with.

    Fails the calling test when `value` does not start with a reference to `name`.
    """
    match = re.match(r"\$\{" + name + r":-([^}]*)\}", value)
    assert match, f"{value!r} does not read {name} from the shell with a default"
    return match.group(1)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Split the Dockerfile into stages of (INSTRUCTION, arguments) pairs.

    Continuation lines are joined and comments dropped. Stages are keyed by
    their `AS` name, in the file's order, so the last key is the stage that
    `docker build` produces without `--target`.
    """
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n(?:\s*#[^\n]*\n)*", " ", text)
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = arguments.split()[-1] if " AS " in arguments.upper() else str(len(stages))
            current = stages.setdefault(name, [])
        current.append((instruction, arguments.strip()))
    return stages


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, the stack built from source."""
    return load_compose("docker-compose.yml")


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    """docker-compose.hub.yml, the stack that pulls the published image."""
    return load_compose("docker-compose.hub.yml")


@pytest.fixture(scope="module")
def runtime_stage() -> list[tuple[str, str]]:
    """Instructions of the Dockerfile's default (last) stage."""
    stages = dockerfile_stages()
    name = list(stages)[-1]
    assert name == "runtime", f"the last stage is {name!r}; `docker build .` must give runtime"
    return stages[name]


def instruction_values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    """Return the arguments of every `instruction` in `stage`, in order."""
    return [arguments for name, arguments in stage if name == instruction]


def test_compose_service_names(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"mongo", "app", "tests"}


def test_compose_mongo_is_replica_set(compose: dict[str, Any]) -> None:
    mongo = compose["services"]["mongo"]
    assert re.fullmatch(r"mongo:\d+\.\d+", mongo["image"]), "pin the major.minor release"
    assert "--replSet" in mongo["command"]
    assert any(volume.startswith("mongo-data:") for volume in mongo["volumes"])
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"])


def test_compose_app_publishes_8000(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    assert "8000:8000" in app["ports"]
    assert app["environment"]["HOST"] == "0.0.0.0"  # noqa: S104 - a container must listen on all interfaces
    assert str(app["environment"]["PORT"]) == "8000"


def test_compose_app_builds_runtime(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    assert app["build"]["target"] == "runtime"
    assert variable_default(app["image"], "OTS_IMAGE")
    assert app["env_file"] == "config/ots.env.example"
    assert (ROOT / app["env_file"]).is_file()


@pytest.mark.parametrize("service", ["app", "tests"])
def test_compose_passes_variables_through(compose: dict[str, Any], service: str) -> None:
    environment = compose["services"][service]["environment"]
    for name in PASSTHROUGH:
        assert name in environment, f"{service} does not receive {name}"
        assert variable_default(environment[name], name) != "", f"{service}: {name} has no default"


@pytest.mark.parametrize("service", ["app", "tests"])
def test_compose_defaults_to_compose_mongo(compose: dict[str, Any], service: str) -> None:
    uri = variable_default(compose["services"][service]["environment"]["MONGO_URI"], "MONGO_URI")
    assert uri == COMPOSE_MONGO_URI
    assert urllib.parse.urlsplit(uri).hostname in compose["services"]


def test_compose_tests_database_is_separate(compose: dict[str, Any]) -> None:
    app_database = compose["services"]["app"]["environment"]["MONGO_DATABASE"]
    tests_database = compose["services"]["tests"]["environment"]["MONGO_DATABASE"]
    assert tests_database != app_database
    assert tests_database.startswith(app_database)


def test_compose_tests_run_once(compose: dict[str, Any]) -> None:
    tests = compose["services"]["tests"]
    assert tests["build"]["target"] == "test"
    assert tests["command"] == ["pytest"]
    # Quoted in the file: a bare `no` is the YAML 1.1 boolean false.
    assert tests["restart"] == "no"


@pytest.mark.parametrize("service", ["app", "tests"])
def test_compose_waits_for_healthy_mongo(compose: dict[str, Any], service: str) -> None:
    depends_on = compose["services"][service]["depends_on"]
    assert depends_on["mongo"]["condition"] == "service_healthy"


def test_compose_app_grace_exceeds_shutdown(compose: dict[str, Any]) -> None:
    grace = compose["services"]["app"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, f"stop_grace_period {grace!r} is not in whole seconds"
    default_shutdown_grace_seconds = 10
    assert int(match.group(1)) > default_shutdown_grace_seconds


def test_hub_has_no_build(hub: dict[str, Any]) -> None:
    for name, service in hub["services"].items():
        assert "build" not in service, f"{name} builds; the hub file must only pull images"
        assert "env_file" not in service, f"{name} reads an env file that a download lacks"


def test_hub_app_matches_compose(compose: dict[str, Any], hub: dict[str, Any]) -> None:
    app = hub["services"]["app"]
    assert app["image"] == compose["services"]["app"]["image"]
    assert "127.0.0.1:8000:8000" in app["ports"], "publish plain HTTP on loopback only"
    for name in PASSTHROUGH:
        assert app["environment"][name] == compose["services"]["app"]["environment"][name]


def test_dockerfile_base_is_pinned() -> None:
    first_stage = next(iter(dockerfile_stages().values()))
    base = first_stage[0][1].split()[0]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), f"{base} is not pinned"


def test_dockerfile_cmd_is_exec_ots(runtime_stage: list[tuple[str, str]]) -> None:
    assert instruction_values(runtime_stage, "CMD")[-1] == '["ots"]'


def test_dockerfile_exposes_8000(runtime_stage: list[tuple[str, str]]) -> None:
    assert "8000" in instruction_values(runtime_stage, "EXPOSE")
    environment = " ".join(instruction_values(runtime_stage, "ENV"))
    assert "HOST=0.0.0.0" in environment
    assert "PORT=8000" in environment


def test_dockerfile_user_not_root(runtime_stage: list[tuple[str, str]]) -> None:
    users = instruction_values(runtime_stage, "USER")
    assert users, "the runtime stage sets no USER and runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_healthcheck_uses_python(runtime_stage: list[tuple[str, str]]) -> None:
    healthchecks = instruction_values(runtime_stage, "HEALTHCHECK")
    assert healthchecks, "the runtime stage has no HEALTHCHECK"
    assert "/healthz" in healthchecks[-1]
    assert "urllib" in healthchecks[-1]
    assert "curl" not in healthchecks[-1]


def test_dockerfile_stopsignal_sigterm(runtime_stage: list[tuple[str, str]]) -> None:
    assert instruction_values(runtime_stage, "STOPSIGNAL") == ["SIGTERM"]
