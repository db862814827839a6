"""CPU cost per request of request logging: the proxy with --request-logging vs without.

Runs the aiohttp test upstream and a real proxy process on 127.0.0.1, drives
GET /items/1 with wrk for a fixed time, and divides the proxy's CPU time
(user+sys, from psutil) by the requests wrk completed. Bounded: a few seconds per run.

    .venv/bin/python bench/bench_logging.py [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.proxy_cpu import proxy_cpu_per_request
from tests.support.upstream import Upstream

CONFIG = """
[request_log]
log_request_headers = true
log_request_body = true
log_response_body = true
"""


async def run_once(upstream_url: str, logging_on: bool, seconds: int, conns: int) -> dict:
    args = ["--sync-interval", "2", "--framework", "none"]
    if logging_on:
        args.append("--request-logging")
    result = await proxy_cpu_per_request(
        upstream_url,
        args,
        path="/items/1?token=abc",
        config=CONFIG if logging_on else None,
        seconds=seconds,
        connections=conns,
        settle=2.5,  # let the sync (and log write/upload) for the run happen
    )
    return {"logging": logging_on, **result}


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
