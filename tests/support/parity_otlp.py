"""Parity runs for Apitally 1.x: apitally-proxy's OTLP export against apitally 1.0.0's.

The same scripted traffic (tests/support/parity.py: TRAFFIC) goes (a) through a
real proxy process with a write token in front of the plain app, and (b) at the
same app instrumented with apitally 1.0.0, which runs in its own virtualenv
(`.venv-apitally1`, made by scripts/test: the package name is the same as the
0.25.1 client's). Each side exports to its own recording OTLP receiver.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.app_process import AppProcess
from tests.support.fake_otlp import FakeOtlp, otlp_env
from tests.support.parity import ROOT, AppSpec, _toml_list, _wait_for_routes, app_env, drive
from tests.support.proxy_process import ProxyProcess, free_port

VENV_1X = ROOT / ".venv-apitally1"
PYTHON_1X = VENV_1X / "bin" / "python"
ENV = "parity"


@dataclass
class OtlpSide:
    receiver: FakeOtlp
    statuses: list[int]
    log: str = ""


def _argv_1x(spec: AppSpec, port: int) -> list[str]:
    """The spec's server command, run by the apitally 1.x virtualenv's Python."""
    argv = spec.argv(port)
    return [str(PYTHON_1X), *argv[1:]]


async def proxy_side(spec: AppSpec, tmp: Path, proxy_args: tuple[str, ...] = ()) -> OtlpSide:
    receiver = await FakeOtlp().start()
    port = free_port()
    app = AppProcess(spec.argv(port), port, spec.cwd, app_env(tmp), tmp / "plain-app.log")
    proxy: ProxyProcess | None = None
    try:
        await app.start()
        args = ["--sync-interval", "0.5", "--framework", spec.framework, *proxy_args]
        if spec.routes:
            config = tmp / "proxy.toml"
            config.write_text(f"routes = {_toml_list(spec.routes)}\n")
            args += ["--config", str(config)]
        env = otlp_env(receiver, APITALLY_ENV=ENV)
        proxy = await ProxyProcess(app.url, tmp / "proxy-state", *args, env=env).start()
        await _wait_for_routes(proxy)
        statuses = await drive(proxy.url)
        assert await proxy.stop() == 0, proxy.log()
        return OtlpSide(receiver, statuses, proxy.log())
    finally:
        if proxy is not None:
            await proxy.kill()
        await app.stop()
        await receiver.stop()


async def official_side(spec: AppSpec, tmp: Path, extra_env: dict[str, str]) -> OtlpSide:
    receiver = await FakeOtlp().start()
    port = free_port()
    env = app_env(tmp, {"PARITY_MODE": "official1", **otlp_env(receiver, APITALLY_ENV=ENV)})
    env.update(extra_env)
    # apitally 1.x stays dormant under pytest (it checks PYTEST_CURRENT_TEST).
    env.pop("PYTEST_CURRENT_TEST", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    app = AppProcess(_argv_1x(spec, port), port, spec.cwd, env, tmp / "official-app.log")
    try:
        await app.start()
        # Active once it has announced itself (about 2 s after start-up).
        await receiver.wait_for(lambda: receiver.events("apitally.app.startup"), timeout=20)
        statuses = await drive(app.url)
        await app.stop()  # SIGTERM: its final export cycle
        return OtlpSide(receiver, statuses, app.log())
    finally:
        await app.stop()
        await receiver.stop()


def run_otlp_parity(
    spec: AppSpec,
    tmp: Path,
    proxy_args: tuple[str, ...] = (),
    official_env: dict[str, str] | None = None,
) -> tuple[OtlpSide, OtlpSide]:
    """Both sides of one framework, one after the other (fair to the 2 shared cores)."""
    if spec.prepare is not None:
        spec.prepare()
    (tmp / "proxy").mkdir(parents=True, exist_ok=True)
    (tmp / "official").mkdir(parents=True, exist_ok=True)

    async def both() -> tuple[OtlpSide, OtlpSide]:
        proxy = await proxy_side(spec, tmp / "proxy", proxy_args)
        official = await official_side(spec, tmp / "official", official_env or {})
        return proxy, official

    return asyncio.run(both())


def consumer_updates(receiver: FakeOtlp) -> dict[str, tuple[Any, Any]]:
    """identifier -> (name, group), as the server would hold them after every update."""
    out: dict[str, tuple[Any, Any]] = {}
    for u in receiver.events("apitally.consumer.update"):
        name, group = out.get(u["identifier"], (None, None))
        out[u["identifier"]] = (u.get("name") or name, u.get("group") or group)
    return out


def startup_paths(receiver: FakeOtlp) -> list[tuple[str, str]]:
    startups = receiver.events("apitally.app.startup")
    assert startups, "no startup event was exported"
    return sorted((p["method"], p["path"]) for p in startups[-1].get("paths", []))


def validation_errors(receiver: FakeOtlp) -> dict[tuple[Any, ...], int]:
    """(consumer, method, path, source, field, message, type) -> count, over every export."""
    out: dict[tuple[Any, ...], int] = {}
    for e in receiver.events("apitally.request.validation_error"):
        for c in e["counts"]:
            key = (
                c.get("consumer"),
                e["method"],
                e["path"],
                e["source"],
                e["field"],
                e["message"],
                e["type"],
            )
            out[key] = out.get(key, 0) + c["count"]
    return out
