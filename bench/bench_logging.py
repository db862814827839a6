"""CPU cost per request of request logging: the proxy with --request-logging vs without.

Runs the aiohttp test upstream and a real proxy process on 127.0.0.1, drives
GET /items/1 with wrk for a fixed time, and divides the proxy's CPU time
(user+sys, from psutil) by the requests wrk completed. Bounded: a few seconds per run.

    .venv/bin/python bench/bench_logging.py [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream

CONFIG = """
[request_log]
log_request_headers = true
log_request_body = true
log_response_body = true
"""


async def run_once(upstream_url: str, logging_on: bool, seconds: int, conns: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.toml"
        cfg.write_text(CONFIG)
        args = ["--sync-interval", "2", "--framework", "none"]
        if logging_on:
            args += ["--request-logging", "--config", str(cfg)]
        proxy = await ProxyProcess(upstream_url, Path(tmp) / "state", *args).start()
        try:
            url = proxy.url + "/items/1?token=abc"
            warm = await asyncio.create_subprocess_exec(
                "wrk", "-t1", "-c2", "-d1s", url, stdout=asyncio.subprocess.DEVNULL
            )
            await warm.wait()
            p = psutil.Process(proxy.pid)
            before = p.cpu_times()
            wrk = await asyncio.create_subprocess_exec(
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{seconds}s",
                url,
                stdout=asyncio.subprocess.PIPE,
            )
            out = (await wrk.communicate())[0].decode()
            await asyncio.sleep(2.5)  # let the sync (and log write/upload) for the run happen
            after = p.cpu_times()
            rss = p.memory_info().rss
        finally:
            await proxy.stop()
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "logging": logging_on,
        "requests": requests,
        "rps": round(requests / seconds),
        "cpu_us_per_request": round(cpu / requests * 1e6, 1),
        "rss_mb": round(rss / 1e6, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    upstream = await Upstream().start()
    try:
        for _ in range(a.rounds):
            for on in (False, True):
                print(await run_once(upstream.url, on, a.seconds, a.connections), flush=True)
    finally:
        await upstream.stop()


if __name__ == "__main__":
    asyncio.run(main())
