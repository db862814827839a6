"""The Dockerfile and docker-compose.yml, checked without a Docker daemon.

What the image promises (entrypoint, user, ports, health check, state volume) is
read from the files and held against pyproject.toml and the settings model, so
a change on one side that the other does not follow fails here.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from apitally_proxy.config import Settings, load_settings, parse_host_port, parse_upstream
from tests.conftest import StartProxy
from tests.support.proxy_process import free_port
from tests.support.upstream import Upstream

ROOT = Path(__file__).resolve().parents[1]


# ---- reading the Dockerfile --------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile() if kw == keyword]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction_args("ENV"):
        for pair in args.split():
            key, sep, value = pair.partition("=")
            assert sep, f"use ENV KEY=value, not {args!r}"
            env[key] = value
    return env


def exposed_ports() -> set[int]:
    return {int(p.split("/")[0]) for args in instruction_args("EXPOSE") for p in args.split()}


def healthcheck_command() -> list[str]:
    (args,) = instruction_args("HEALTHCHECK")
    _, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    return exec_form(command)


# ---- the Dockerfile ----------------------------------------------------------------------


def test_entrypoint_is_the_console_script_declared_in_pyproject() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = instruction_args("ENTRYPOINT")
    command = exec_form(entrypoint)
    assert command == ["apitally-proxy"]
    module, _, function = scripts[command[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_image_runs_as_a_numeric_non_root_user_it_creates() -> None:
    user = instruction_args("USER")[-1]
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it.
    assert uid.isdigit() and int(uid) > 0, user
    assert not gid or (gid.isdigit() and int(gid) > 0), user
    runs = " ".join(instruction_args("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs), "USER must be created by useradd"


def test_exposed_ports_are_the_default_listen_and_admin_ports() -> None:
    listen = parse_host_port(Settings.model_fields["listen"].default)
    admin = parse_host_port(Settings.model_fields["admin_listen"].default)
    assert exposed_ports() == {listen.port, admin.port}


def test_image_listens_on_all_interfaces_at_the_exposed_ports() -> None:
    env = image_env()
    listen = parse_host_port(env["APITALLY_PROXY_LISTEN"])
    admin = parse_host_port(env["APITALLY_PROXY_ADMIN_LISTEN"])
    assert listen.host == admin.host == "0.0.0.0"
    assert exposed_ports() == {listen.port, admin.port}


def test_image_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("APITALLY_")]:
        monkeypatch.delenv(key)
    for key, value in image_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("APITALLY_PROXY_UPSTREAM", "http://app:8000")
    settings = load_settings()
    assert settings.client_id is None  # local mode unless the operator sets a client id
    assert str(settings.state_dir) == "/var/lib/apitally-proxy"


def test_state_dir_is_a_volume_owned_by_the_runtime_user() -> None:
    state_dir = image_env()["APITALLY_PROXY_STATE_DIR"]
    assert state_dir in " ".join(instruction_args("VOLUME")).split()
    keywords = [kw for kw, _ in dockerfile()]
    chown = next(i for i, (kw, args) in enumerate(dockerfile()) if kw == "RUN" and "chown" in args)
    assert state_dir in dockerfile()[chown][1]
    # Changes to a path after VOLUME declares it are discarded.
    assert chown < keywords.index("VOLUME")


def test_stop_signal_is_sigterm() -> None:
    assert instruction_args("STOPSIGNAL") == ["SIGTERM"]


def test_healthcheck_asks_the_admin_health_endpoint_with_the_stdlib() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]  # no curl in slim images
    assert "/health" in command[2]
    assert "APITALLY_PROXY_ADMIN_LISTEN" in command[2]


async def _run_healthcheck(admin_listen: str) -> int:
    command = healthcheck_command()
    env = {"APITALLY_PROXY_ADMIN_LISTEN": admin_listen}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 10)


async def test_healthcheck_passes_against_a_running_proxy(
    start_proxy: StartProxy, upstream: Upstream
) -> None:
    proxy = await start_proxy(upstream.url)
    assert await _run_healthcheck(f"0.0.0.0:{proxy.admin_port}") == 0


async def test_healthcheck_fails_when_nothing_answers() -> None:
    assert await _run_healthcheck(f"0.0.0.0:{free_port()}") != 0


def test_image_copies_only_files_that_exist() -> None:
    for args in instruction_args("COPY"):
        *sources, _dest = args.split()
        for source in sources:
            if source.startswith("--"):
                continue
            # A wildcard may match nothing (README.md*), a plain path must exist.
            assert "*" in source or (ROOT / source).exists(), source


# ---- reading docker-compose.yml ----------------------------------------------------------
#
# PyYAML is not a dependency, so this reads the block-style subset the compose file
# sticks to: nested mappings, lists of scalars, flow lists, quoted and plain scalars.
# Anything outside it is an error, which keeps the file simple.


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _split_flow(text: str) -> list[str]:
    items, quote, start = [], "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _scalar(text: str) -> Any:
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"unterminated flow list: {text!r}")
        return [_scalar(item) for item in _split_flow(text[1:-1])]
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"unterminated string: {text!r}")
        return text[1:-1].replace("''", "'")
    if text in ("null", "~"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text[0] in "{&*!|>%@`":
        raise ValueError(f"outside the YAML subset this test reads: {text!r}")
    return text


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        items: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            items.append(_scalar(lines[i][1][2:].strip()))
            i += 1
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        text = lines[i][1]
        match = re.fullmatch(r"([\w.-]+):(?:\s+(.*))?", text)
        if not match:
            raise ValueError(f"not a `key: value` line: {text!r}")
        key, rest = match.group(1), match.group(2)
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        i += 1
        if rest:
            mapping[key] = _scalar(rest.strip())
        elif i < len(lines) and lines[i][0] > indent:
            mapping[key], i = _block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    if i < len(lines) and lines[i][0] > indent:
        raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
    return mapping, i


def parse_yaml_subset(text: str) -> Any:
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        body = line.lstrip(" ")
        if body.startswith("\t"):
            raise ValueError("tabs are not allowed in YAML indentation")
        lines.append((len(line) - len(body), body))
    value, end = _block(lines, 0, 0)
    if end != len(lines):
        raise ValueError(f"could not read past {lines[end][1]!r}")
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return parse_yaml_subset((ROOT / "docker-compose.yml").read_text())


def test_the_yaml_subset_reader_reads_what_compose_files_use() -> None:
    text = 'a:\n  b: [x, "y z", \'w\']  # note\n  c:\n    - "1:2"\n  d: 5\ne:\n'
    assert parse_yaml_subset(text) == {
        "a": {"b": ["x", "y z", "w"], "c": ["1:2"], "d": 5},
        "e": None,
    }
    with pytest.raises(ValueError):
        parse_yaml_subset("a:\n  b: 1\n   c: 2\n")


# ---- docker-compose.yml ------------------------------------------------------------------


def test_compose_file_has_the_app_and_the_proxy(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"app", "proxy"}
    for service in compose["services"].values():
        assert service["build"] == "."


def test_compose_proxy_upstream_is_the_app_service_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    upstream = parse_upstream(services["proxy"]["environment"]["APITALLY_PROXY_UPSTREAM"])
    assert upstream.host in services
    app_args = services[upstream.host]["command"]
    assert app_args[app_args.index("--port") + 1] == str(upstream.port)
    assert app_args[app_args.index("--host") + 1] == "0.0.0.0"


def test_compose_app_command_runs_an_importable_module(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    command = [*app["entrypoint"], *app["command"]]
    assert command[:2] == ["python", "-m"]
    assert importlib.util.find_spec(command[2]) is not None, command[2]


def test_compose_app_replaces_the_proxy_healthcheck(compose: dict[str, Any]) -> None:
    app_port = compose["services"]["app"]["command"][-1]
    test = compose["services"]["app"]["healthcheck"]["test"]
    assert f":{app_port}/health" in " ".join(test)


def test_compose_proxy_runs_in_local_mode_unless_the_host_sets_a_client_id(
    compose: dict[str, Any],
) -> None:
    env = compose["services"]["proxy"]["environment"]
    assert env["APITALLY_CLIENT_ID"] == "${APITALLY_CLIENT_ID:-}"
    assert env["APITALLY_ENV"] == "${APITALLY_ENV:-}"


def test_compose_proxy_publishes_the_listen_port(compose: dict[str, Any]) -> None:
    listen_port = parse_host_port(image_env()["APITALLY_PROXY_LISTEN"]).port
    assert f"{listen_port}:{listen_port}" in compose["services"]["proxy"]["ports"]


def test_compose_keeps_the_state_dir_in_a_named_volume(compose: dict[str, Any]) -> None:
    state_dir = image_env()["APITALLY_PROXY_STATE_DIR"]
    (mount,) = compose["services"]["proxy"]["volumes"]
    volume, _, target = mount.partition(":")
    assert target == state_dir
    assert volume in compose["volumes"]


def test_compose_stop_grace_outlasts_the_proxy_drain(compose: dict[str, Any]) -> None:
    grace = compose["services"]["proxy"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace), grace
    assert int(grace[:-1]) > Settings.model_fields["shutdown_grace"].default


def test_compose_proxy_waits_for_a_healthy_app(compose: dict[str, Any]) -> None:
    depends = compose["services"]["proxy"]["depends_on"]
    assert depends["app"]["condition"] == "service_healthy"
