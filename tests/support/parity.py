"""Parity runs: the same traffic through apitally-proxy and at an app with the official client.

`run_parity` starts, for one framework, (a) the plain app behind a real proxy
process and (b) the same app with the official Apitally client enabled, each
reporting to its own recording fake hub; drives the scripted traffic at both;
stops both with SIGTERM (which is when the official clients send their final
sync); and returns what each hub received, reduced to comparable aggregates.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.app_process import AppProcess
from tests.support.fake_hub import FakeHub
from tests.support.proxy_process import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
FASTIFY_PARITY_DIR = ROOT / "tests" / "apps" / "parity_fastify"
# A version-4 UUID: the JS client refuses other versions.
CLIENT_ID = "6006a11e-0000-4000-8000-000000006006"
ENV = "parity"


@dataclass(frozen=True)
class Step:
    method: str
    path: str
    key: str | None = None  # API key sent as `Authorization: Bearer <key>`
    json: Any = None


# The scripted traffic, the same for every framework and both modes.
BIG_NAME = "x" * 1500  # request and response bodies over 1 KB (size bins "1")
TRAFFIC: tuple[Step, ...] = (
    Step("GET", "/items", "key-acme"),
    Step("GET", "/items", "key-acme"),
    Step("GET", "/items"),
    Step("GET", "/items/1", "key-acme"),
    Step("GET", "/items/2", "key-muller"),
    Step("GET", "/items/3", "key-solo"),
    Step("GET", "/items/3"),
    Step("GET", "/items/999", "key-acme"),  # the app's own 404 on a matched route
    Step("GET", "/users/7/orders/9", "key-muller"),
    Step("GET", "/users/8/orders/10", "key-muller"),
    Step("POST", "/items", "key-acme", {"name": "pen", "price": 1.5}),
    Step("POST", "/items", "key-acme", {"name": BIG_NAME, "price": 2}),
    Step("POST", "/items", "key-solo", {"name": {}, "price": 1}),  # name: wrong type
    Step("POST", "/items", "key-solo", {"name": {}, "price": 1}),
    Step("POST", "/items", None, {"name": "pen"}),  # price missing
    Step("GET", "/nope", "key-acme"),  # matches no route: 404, not counted
    Step("GET", "/items/1/nope"),
    Step("OPTIONS", "/items", "key-acme"),  # never counted
    Step("GET", "/boom", "key-acme"),  # unhandled exception: 500
    Step("GET", "/boom"),
)


@dataclass
class AppSpec:
    """How to run one framework's parity app; `argv(port)` builds the server command."""

    framework: str
    argv: Callable[[int], list[str]]
    cwd: Path = ROOT
    proxy_args: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()  # declared routes for the proxy's config file
    prepare: Callable[[], None] | None = None


@dataclass
class Side:
    """What one hub received: the raw calls and the statuses the client saw."""

    startups: list[dict[str, Any]]
    syncs: list[dict[str, Any]]
    statuses: list[int]
    log: str = ""


@dataclass
class ParityResult:
    spec: AppSpec
    proxy: Side
    official: Side
    notes: dict[str, Any] = field(default_factory=dict)


def app_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APITALLY_", "PARITY_"))}
    # The official client keeps instance lock files under $TMPDIR/apitally.
    env.update({"TMPDIR": str(tmp), "NO_PROXY": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


async def drive(base_url: str) -> list[int]:
    """Sends TRAFFIC in order, one request at a time; returns the statuses received."""
    statuses = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
        for step in TRAFFIC:
            headers = {"Authorization": f"Bearer {step.key}"} if step.key else {}
            async with http.request(
                step.method, base_url + step.path, headers=headers, json=step.json
            ) as r:
                await r.read()
                assert not any(h.lower().startswith("x-apitally") for h in r.headers), r.headers
                statuses.append(r.status)
    return statuses


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


async def _proxy_side(spec: AppSpec, tmp: Path) -> Side:
    hub = await FakeHub().start()
    port = free_port()
    app = AppProcess(spec.argv(port), port, spec.cwd, app_env(tmp), tmp / "plain-app.log")
    proxy: ProxyProcess | None = None
    try:
        await app.start()
        args = [
            "--client-id",
            CLIENT_ID,
            "--env",
            ENV,
            "--hub-url",
            hub.url,
            "--sync-interval",
            "0.5",
            "--framework",
            spec.framework,
            *spec.proxy_args,
        ]
        if spec.routes:
            config = tmp / "proxy.toml"
            config.write_text(f"routes = {_toml_list(spec.routes)}\n")
            args += ["--config", str(config)]
        proxy = await ProxyProcess(app.url, tmp / "proxy-state", *args).start()
        await _wait_for_routes(proxy)
        statuses = await drive(proxy.url)
        assert await proxy.stop() == 0, proxy.log()
        return Side(hub.accepted("startup"), hub.accepted("sync"), statuses, proxy.log())
    finally:
        if proxy is not None:
            await proxy.kill()
        await app.stop()
        await hub.stop()


async def _wait_for_routes(proxy: ProxyProcess, timeout: float = 15.0) -> None:
    """Until the proxy knows the app's route set (declared or from its OpenAPI document)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await proxy.status())["routes"]["source"] is None:
        if loop.time() > deadline:
            raise AssertionError(f"proxy learned no routes:\n{proxy.log()}")
        await asyncio.sleep(0.05)


async def _official_side(spec: AppSpec, tmp: Path) -> Side:
    hub = await FakeHub().start()
    port = free_port()
    env = app_env(
        tmp,
        {
            "PARITY_MODE": "official",
            "APITALLY_CLIENT_ID": CLIENT_ID,
            "APITALLY_ENV": ENV,
            "APITALLY_HUB_BASE_URL": hub.url,
        },
    )
    app = AppProcess(spec.argv(port), port, spec.cwd, env, tmp / "official-app.log")
    try:
        await app.start()
        # The client is up once it has announced itself (the Flask one starts after 1 s).
        await hub.wait_for(lambda: hub.accepted("startup"), timeout=15)
        statuses = await drive(app.url)
        await app.stop()
        return Side(hub.accepted("startup"), hub.accepted("sync"), statuses, app.log())
    finally:
        await app.stop()
        await hub.stop()


def run_parity(spec: AppSpec, tmp: Path) -> ParityResult:
    """Both sides of one framework, run one after the other (fair to the 2 shared cores)."""
    if spec.prepare is not None:
        spec.prepare()
    (tmp / "proxy").mkdir(parents=True, exist_ok=True)
    (tmp / "official").mkdir(parents=True, exist_ok=True)

    async def both() -> ParityResult:
        proxy = await _proxy_side(spec, tmp / "proxy")
        official = await _official_side(spec, tmp / "official")
        return ParityResult(spec, proxy, official)

    return asyncio.run(both())


# --- Aggregates, reduced to what can be compared ----------------------------

RequestKey = tuple[Any, str, str, int]


def request_rows(side: Side) -> dict[RequestKey, dict[str, Any]]:
    """Per (consumer, method, path, status): counts, size sums and size bins over all syncs."""
    out: dict[RequestKey, dict[str, Any]] = {}
    for payload in side.syncs:
        for r in payload["requests"]:
            key = (r["consumer"], r["method"], r["path"], r["status_code"])
            row = out.setdefault(
                key,
                {
                    "request_count": 0,
                    "request_size_sum": 0,
                    "response_size_sum": 0,
                    "request_sizes": {},
                    "response_sizes": {},
                },
            )
            row["request_count"] += r["request_count"]
            row["request_size_sum"] += r["request_size_sum"]
            row["response_size_sum"] += r["response_size_sum"]
            for hist in ("request_sizes", "response_sizes"):
                for k, v in r[hist].items():
                    row[hist][str(k)] = row[hist].get(str(k), 0) + v
    return out


def consumers(side: Side) -> dict[str, tuple[Any, Any]]:
    """identifier -> (name, group), as the hub would hold them after every sync."""
    out: dict[str, tuple[Any, Any]] = {}
    for payload in side.syncs:
        for c in payload["consumers"]:
            name, group = out.get(c["identifier"], (None, None))
            out[c["identifier"]] = (c.get("name") or name, c.get("group") or group)
    return out


def validation_errors(side: Side) -> dict[tuple[Any, ...], int]:
    out: dict[tuple[Any, ...], int] = {}
    for payload in side.syncs:
        for e in payload["validation_errors"]:
            key = (e["consumer"], e["method"], e["path"], tuple(e["loc"]), e["msg"], e["type"])
            out[key] = out.get(key, 0) + e["error_count"]
    return out


def startup_paths(side: Side) -> list[tuple[str, str]]:
    """The last announced `paths`, as a sorted list of (method, path)."""
    assert side.startups, "no startup payload was accepted"
    return sorted((p["method"], p["path"]) for p in side.startups[-1].get("paths", []))


def npm_ci(directory: Path) -> None:
    """Installs a Node app's locked dependencies when node_modules is missing."""
    if (directory / "node_modules").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )


def python_server(*argv: str) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, "-m", *(a.format(port=port) for a in argv)]
