"""`apitally-proxy check`: a healthy setup, and each broken one, in the words a person reads."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.support.app_process import uvicorn_app
from tests.support.fake_otlp import TOKEN
from tests.support.proxy_process import free_port


async def check(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run the real CLI's preflight; its exit code and stdout lines."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("APITALLY_", "OTEL_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apitally_proxy",
        "check",
        *args,
        env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines() + err.decode().splitlines()


def addresses() -> list[str]:
    return ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]


def line(lines: list[str], needle: str) -> str:
    found = [x for x in lines if needle in x]
    assert found, f"no line with {needle!r} in:\n" + "\n".join(lines)
    return found[0].strip()


async def test_a_healthy_setup_says_what_will_happen_and_exits_0(upstream, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('routes = ["GET /items/{id}", "POST /echo"]\nframework = "starlette"\n')
    code, lines = await check(
        "--upstream",
        upstream.url,
        "--config",
        str(cfg),
        "--state-dir",
        str(tmp_path / "state"),
        *addresses(),
        env={"APITALLY_WRITE_TOKEN": TOKEN, "APITALLY_ENV": "prod"},
    )
    assert code == 0, lines
    assert line(lines, "upstream").startswith(f"ok    upstream {upstream.url} reachable")
    assert line(lines, "route templates") == "ok    route templates: 2 declared routes"
    assert line(lines, "framework") == "ok    framework starlette"
    assert line(lines, "Apitally 1.x").startswith("ok    Apitally 1.x: OpenTelemetry export to")
    assert "env prod" in line(lines, "Apitally 1.x")
    assert line(lines, "state dir").startswith("ok    state dir")
    assert lines[-1] == "result: ready to proxy (0 warning(s))"
    assert TOKEN not in "\n".join(lines)


async def test_an_openapi_document_is_found_and_its_routes_counted(tmp_path):
    app = uvicorn_app("tests.apps.parity_fastapi_app:app")
    await app.start()
    try:
        code, lines = await check("--upstream", app.url, "--state-dir", str(tmp_path), *addresses())
    finally:
        await app.stop()
    assert code == 0, lines
    assert "OpenAPI document at /openapi.json" in line(lines, "route templates")
    assert line(lines, "framework") == "ok    framework fastapi"
    assert line(lines, "local mode").startswith("warn  local mode: no APITALLY_WRITE_TOKEN")


async def test_an_unreachable_upstream_fails(tmp_path):
    code, lines = await check(
        "--upstream", f"http://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path), *addresses()
    )
    assert code == 1
    assert line(lines, "upstream").startswith("FAIL  upstream http://127.0.0.1:")
    assert "requests would get 502" in line(lines, "upstream")
    assert lines[-1].startswith("result: 1 problem(s) would break traffic")


@pytest.mark.parametrize("which", ["--listen", "--admin-listen"])
async def test_a_busy_address_fails(upstream, tmp_path, which):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        args = addresses()
        args[args.index(which) + 1] = busy
        code, lines = await check("--upstream", upstream.url, "--state-dir", str(tmp_path), *args)
    assert code == 1
    assert f"{busy} is in use: the proxy would exit 2" in line(lines, busy)


async def test_an_unwritable_state_dir_fails(upstream, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, lines = await check(
        "--upstream", upstream.url, "--state-dir", str(not_a_dir / "state"), *addresses()
    )
    assert code == 1
    assert line(lines, "state dir").startswith(f"FAIL  state dir {not_a_dir / 'state'}")


async def test_a_malformed_token_and_an_env_typo_are_warnings_not_failures(upstream, tmp_path):
    code, lines = await check(
        "--upstream",
        upstream.url,
        "--state-dir",
        str(tmp_path),
        *addresses(),
        env={"APITALLY_WRITE_TOKEN": "apt_nope", "APITALLY_PROXY_FRAMWORK": "flask"},
    )
    assert code == 0, lines
    assert line(lines, "write token").startswith("warn  local mode: the write token")
    assert "did you mean APITALLY_PROXY_FRAMEWORK?" in line(lines, "FRAMWORK")
    assert "apt_nope" not in "\n".join(lines)


async def test_invalid_settings_exit_2_as_the_proxy_would(tmp_path: Path):
    code, lines = await check("--upstream", "ftp://x", "--state-dir", str(tmp_path))
    assert code == 2
    assert "is not an upstream URL" in "\n".join(lines)
