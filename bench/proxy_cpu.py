"""One measurement the macro benchmarks share: a real proxy process's CPU per request.

Starts the proxy with the given arguments and environment in front of an upstream,
warms it up, drives one URL with wrk for a fixed time and divides the proxy's CPU
time (user+sys, from psutil) by the requests wrk completed. Bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.proxy_process import ProxyProcess


async def proxy_cpu_per_request(
    upstream_url: str,
    args: list[str],
    *,
    path: str = "/items/1",
    headers: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    config: str | None = None,
    seconds: int = 5,
    connections: int = 8,
    settle: float = 0.0,
) -> dict:
    """{"requests", "rps", "cpu_us_per_request", "rss_mb"} of one wrk run through the proxy.

    `settle` seconds after wrk are counted too: the syncs, log writes and exports that
    the run's requests cause belong to their cost.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None:
            cfg = Path(tmp) / "c.toml"
            cfg.write_text(config)
            args = [*args, "--config", str(cfg)]
        proxy = await ProxyProcess(upstream_url, Path(tmp) / "state", *args, env=env).start()
        try:
            cmd = ["wrk", "-t1"]
            for name, value in (headers or {}).items():
                cmd += ["-H", f"{name}: {value}"]
            cmd.append(proxy.url + path)
            warm = await asyncio.create_subprocess_exec(
                *cmd, "-c2", "-d1s", stdout=asyncio.subprocess.DEVNULL
            )
            await warm.wait()
            p = psutil.Process(proxy.pid)
            before = p.cpu_times()
            wrk = await asyncio.create_subprocess_exec(
                *cmd, f"-c{connections}", f"-d{seconds}s", stdout=asyncio.subprocess.PIPE
            )
            out = (await wrk.communicate())[0].decode()
            if settle:
                await asyncio.sleep(settle)
            after = p.cpu_times()
            rss = p.memory_info().rss
        finally:
            await proxy.stop()
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    requests = int(match.group(1))
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "requests": requests,
        "rps": round(requests / seconds),
        "cpu_us_per_request": round(cpu / requests * 1e6, 1),
        "rss_mb": round(rss / 1e6, 1),
    }


def bench_main(
    micro: Callable[[], None], macro: Callable[[int, int, int], Awaitable[None]]
) -> None:
    """The command line the micro+macro benchmarks share: the in-process measurements,
    then (unless --no-wrk) the wrk runs through a real proxy."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-wrk", action="store_true")
    a = ap.parse_args()
    micro()
    if a.no_wrk:
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk); use --no-wrk")
    asyncio.run(macro(a.seconds, a.connections, a.rounds))
