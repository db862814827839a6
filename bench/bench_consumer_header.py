"""Hot-path cost of consumer_header: the identity lookup alone, and the whole proxy.

Micro: ns per `ConsumerIdentity.identify` (cache hit, cache miss = one HMAC) and
per `Meter.record` with and without an identity. Macro (needs wrk): CPU µs per
request of a real proxy process with `--consumer-header X-API-Key` vs without,
as bench/bench_logging.py measures logging. A few seconds per run.

    .venv/bin/python bench/bench_consumer_header.py [--seconds 4] [--rounds 2] [--no-wrk]
"""

from __future__ import annotations

import itertools
import sys
import timeit
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apitally_proxy.metering import Meter
from apitally_proxy.metering.identity import ConsumerIdentity
from apitally_proxy.proxy import Exchange
from bench.proxy_cpu import bench_main, proxy_cpu_per_request
from tests.support.upstream import Upstream

SALT = b"bench-salt-0123456789abcdef"
KEY = "sk_live_0123456789abcdef0123456789abcdef"


class _Resolver:
    framework = None

    def resolve(
        self, method: str, path: str, learn: bool = True, loose: bool = False
    ) -> str | None:
        return "/items/{id}"

    def take_renames(self) -> dict[str, str]:
        return {}


def _ns(fn, n: int = 200_000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9


def micro() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"Host": "x", "X-API-Key": KEY, "Accept": "*/*"}))
    identity = ConsumerIdentity("X-API-Key", SALT)
    identity.identify(headers)
    keys = [CIMultiDictProxy(CIMultiDict({"X-API-Key": f"{KEY}-{i}"})) for i in range(100_000)]
    it = itertools.cycle(keys)  # with a one-entry cache every lookup misses
    miss = ConsumerIdentity("X-API-Key", SALT, cache_size=1)
    print(f"identify, cache hit:   {_ns(lambda: identity.identify(headers)):7.0f} ns")
    print(f"identify, cache miss:  {_ns(lambda: miss.identify(next(it)), 100_000):7.0f} ns")

    def record(meter: Meter) -> None:
        ex = Exchange("GET", "/items/1")
        ex.status = 200
        ex.request_headers = headers
        meter.record(ex)

    plain, with_id = Meter(_Resolver()), Meter(_Resolver(), identity=identity)
    a, b = _ns(lambda: record(plain)), _ns(lambda: record(with_id))
    print(f"Meter.record without:  {a:7.0f} ns")
    print(f"Meter.record with:     {b:7.0f} ns  (+{b - a:.0f} ns)")


async def run_once(upstream_url: str, on: bool, seconds: int, conns: int) -> dict:
    args = ["--sync-interval", "2", "--framework", "none"]
    if on:
        args += ["--consumer-header", "X-API-Key"]
    result = await proxy_cpu_per_request(
        upstream_url, args, headers={"X-API-Key": KEY}, seconds=seconds, connections=conns
    )
    return {
        "consumer_header": on,
        "rps": result["rps"],
        "cpu_us_per_request": result["cpu_us_per_request"],
    }


async def macro(seconds: int, conns: int, rounds: int) -> None:
    upstream = await Upstream().start()
    try:
        for _ in range(rounds):
            for on in (False, True):
                print(await run_once(upstream.url, on, seconds, conns), flush=True)
    finally:
        await upstream.stop()


if __name__ == "__main__":
    bench_main(micro, macro)
