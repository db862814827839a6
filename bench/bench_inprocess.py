"""apitally-proxy against the official in-process clients, on the same Starlette app.

The parity app (tests/apps/parity_starlette_app.py) runs under uvicorn in three
modes, each with the same consumer-naming middleware:

- plain: the app names the consumer in `X-Apitally-Consumer*` headers;
- official: apitally 0.25.1's Starlette middleware, syncing to a local fake hub;
- official1: apitally 1.0.0 (OpenTelemetry), exporting to a local OTLP receiver.

wrk drives `GET /items/1` with a consumer's key; the app's CPU time (and, for
plain, apitally-proxy's in front of it, local mode) is divided by the requests
served. What a client adds is its mode's app CPU minus plain's; what the proxy
costs is its own CPU. Rounds interleave the modes; medians are reported.
Everything on 127.0.0.1, bounded in time, processes stopped by PID.

    .venv/bin/python bench/bench_inprocess.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.app_process import AppProcess
from tests.support.fake_hub import FakeHub
from tests.support.fake_otlp import FakeOtlp
from tests.support.proxy_process import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.parity_starlette_app:app"
PATH = "/items/1"
HEADERS = ("Authorization: Bearer key-acme",)
VENV1 = ROOT / ".venv-apitally1" / "bin" / "python"


def app_process(python: str, env: dict[str, str]) -> AppProcess:
    port = free_port()
    argv = [python, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY_")}
    base.pop("PYTEST_CURRENT_TEST", None)  # apitally 1.0.0 disables itself under pytest
    return AppProcess([*argv, "--log-level", "warning"], port, env={**base, **env})


async def wrk(url: str, seconds: int, connections: int) -> int:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    for header in HEADERS:
        cmd += ["-H", header]
    proc = await asyncio.create_subprocess_exec(*cmd, url, stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    return int(match.group(1))


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def measure(target: str, pids: list[int], seconds: int, connections: int) -> list[float]:
    """CPU µs per request of each pid while wrk drives `target`."""
    await wrk(target, 1, 2)  # warm-up
    before = [cpu(p) for p in pids]
    n = await wrk(target, seconds, connections)
    return [(cpu(p) - b) / n * 1e6 for p, b in zip(pids, before, strict=True)]


async def round_once(seconds: int, connections: int, hub: FakeHub, otlp: FakeOtlp) -> dict:
    out: dict[str, float] = {}
    plain = await app_process(sys.executable, {}).start(ready_path="/items")
    try:
        assert plain.proc is not None
        (out["plain_app"],) = await measure(
            plain.url + PATH, [plain.proc.pid], seconds, connections
        )
        with tempfile.TemporaryDirectory() as tmp:
            proxy = await ProxyProcess(plain.url, Path(tmp) / "state").start()
            try:
                out["proxy"], out["plain_app_behind_proxy"] = await measure(
                    proxy.url + PATH, [proxy.pid, plain.proc.pid], seconds, connections
                )
            finally:
                await proxy.stop()
    finally:
        await plain.stop()
    official = app_process(
        sys.executable,
        {
            "PARITY_MODE": "official",
            "APITALLY_CLIENT_ID": "00000000-0000-0000-0000-000000001234",
            "APITALLY_ENV": "bench",
            "APITALLY_HUB_BASE_URL": hub.url,
        },
    )
    await official.start(ready_path="/items")
    try:
        assert official.proc is not None
        (out["official_0_25"],) = await measure(
            official.url + PATH, [official.proc.pid], seconds, connections
        )
    finally:
        await official.stop()
    if VENV1.exists():
        official1 = app_process(
            str(VENV1),
            {
                "PARITY_MODE": "official1",
                "APITALLY_WRITE_TOKEN": "apt_" + "b" * 24,
                "APITALLY_OTLP_ENDPOINT": otlp.url,
                "APITALLY_ENV": "bench",
            },
        )
        await official1.start(ready_path="/items")
        try:
            assert official1.proc is not None
            (out["official_1_0"],) = await measure(
                official1.url + PATH, [official1.proc.pid], seconds, connections
            )
        finally:
            await official1.stop()
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/inprocess.json")
    args = parser.parse_args()
    hub = await FakeHub().start()
    otlp = await FakeOtlp().start()
    rounds = []
    try:
        for i in range(args.rounds):
            r = await round_once(args.seconds, args.connections, hub, otlp)
            rounds.append(r)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} µs" for k, v in r.items()))
    finally:
        await otlp.stop()
        await hub.stop()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    added = {k: med[k] - med["plain_app"] for k in ("official_0_25", "official_1_0") if k in med}
    summary: dict[str, object] = {
        "median_cpu_us_per_request": med,
        "client_adds_us_per_request": added,
    }
    for name, extra in added.items():
        summary[f"proxy_vs_{name}"] = round(med["proxy"] / extra, 2) if extra > 0 else None
    print(json.dumps(summary, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rounds": rounds, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
