"""What the OpenTelemetry export (Apitally 1.x) costs: per request, per export, on the wire.

Micro: ns per `Meter.record` with the hub's bins vs the exponential histograms;
ms to build one export cycle's OTLP exports for K keys, and their bytes (raw
protobuf and gzip'd, as sent). Macro (needs wrk): CPU µs per request of a real
proxy process in local mode (hub payloads), exporting OTLP to a recording
receiver, and exporting OTLP with request-log spans. A few seconds per run.

    .venv/bin/python bench/bench_otlp.py [--seconds 4] [--rounds 2] [--no-wrk]
"""

from __future__ import annotations

import base64
import gzip
import random
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apitally_proxy.metering import Meter
from apitally_proxy.metering.histograms import HistogramCounter
from apitally_proxy.otlp.codec import OtlpCodec, resource_attributes
from apitally_proxy.otlp.receiver import RecordingReceiver
from apitally_proxy.proxy import Exchange
from bench.proxy_cpu import bench_main, proxy_cpu_per_request
from tests.support.fake_otlp import otlp_env
from tests.support.upstream import Upstream

LOG_CONFIG = """
[request_log]
log_request_headers = true
log_response_body = true
"""


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


def micro_record() -> None:
    def record(meter: Meter) -> None:
        ex = Exchange("GET", "/items/1")
        ex.status = 200
        ex.response_time = 0.0042
        ex.response_size = 1234
        meter.record(ex)

    hub = Meter(_Resolver())
    otlp = Meter(_Resolver(), requests=HistogramCounter())
    a, b = _ns(lambda: record(hub)), _ns(lambda: record(otlp))
    print(f"Meter.record, hub bins:              {a:7.0f} ns")
    print(f"Meter.record, exponential histograms: {b:7.0f} ns  (+{b - a:.0f} ns)")


def micro_export() -> None:
    codec = OtlpCodec(resource_attributes("00000000-0000-4000-8000-000000000000", "prod", "x"))
    rng = random.Random(1)
    for keys in (0, 10, 100, 1000, 5000):
        counter = HistogramCounter()
        for k in range(keys):
            for _ in range(100):  # 100 requests a key
                counter.add_request(
                    f"consumer-{k % 50}" if k % 3 else None,
                    "GET",
                    f"/route/{k}/{{id}}",
                    200 if k % 7 else 404,
                    rng.lognormvariate(-4, 1),
                    None,
                    rng.randint(100, 20_000),
                )
        rows = counter.get_and_reset_requests()
        consumers = [
            {"identifier": f"consumer-{i}", "name": f"C {i}", "group": "g"} for i in range(50)
        ]
        aggregates = {"requests": rows, "consumers": consumers if keys else []}
        now = time.time_ns()
        started = time.perf_counter()
        exports = codec.interval(aggregates, "m", now - 15 * 10**9, now)
        ms = (time.perf_counter() - started) * 1000
        wire = [len(base64.b64decode(e["data"])) for e in exports]
        raw = [len(gzip.decompress(base64.b64decode(e["data"]))) for e in exports]
        print(
            f"export cycle, {keys:5d} keys: {len(exports)} export(s), {ms:7.1f} ms to build, "
            f"{sum(raw):9,d} B protobuf, {sum(wire):8,d} B gzip'd (largest {max(wire):,d} B)"
        )


async def macro(seconds: int, conns: int, rounds: int) -> None:
    upstream = await Upstream().start()
    receiver = await RecordingReceiver().start()
    base = ["--sync-interval", "2", "--framework", "none"]
    runs = {
        "local mode (hub payloads)": ({}, base, None),
        "OTLP export": (otlp_env(receiver), base, None),
        "OTLP export + request-log spans": (
            otlp_env(receiver),
            [*base, "--request-logging"],
            LOG_CONFIG,
        ),
    }
    try:
        for _ in range(rounds):
            for name, (env, args, config) in runs.items():
                result = await proxy_cpu_per_request(
                    upstream.url,
                    args,
                    env=env,
                    config=config,
                    seconds=seconds,
                    connections=conns,
                    settle=2.5,  # the export cycle that carries the run's data
                )
                print(f"{name:34s} {result}", flush=True)
        sizes = [c.size for c in receiver.calls]
        if sizes:
            print(
                f"receiver: {len(sizes)} exports, median {sorted(sizes)[len(sizes) // 2]:,d} B, "
                f"largest {max(sizes):,d} B on the wire"
            )
    finally:
        await receiver.stop()
        await upstream.stop()


def micro() -> None:
    micro_record()
    micro_export()


if __name__ == "__main__":
    bench_main(micro, macro)
