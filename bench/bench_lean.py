#!/usr/bin/env python3
"""CPU per request: nginx vs apitally-proxy vs the lean server prototype (issue 12).

    .venv/bin/python bench/bench_lean.py [--duration 10] [--rounds 3] [--connections 50]
                                         [--sizes 100,65536] [--targets nginx,apitally-proxy,lean]

Everything on 127.0.0.1, free ports, temp dirs; every process started here is
stopped by its PID (its own session) at the end, also on error or Ctrl-C.

  upstream        nginx, 1 worker: /small → 100-byte JSON file, /large → 64 KB file
  nginx           the baseline: nginx, 1 worker, proxy_pass with a keepalive pool
  apitally-proxy  the product (`python -m apitally_proxy --workers 1`, local mode)
  lean            apitally_proxy.lean.LeanServer in front of the same upstream, each
                  request metered by the real Meter (same route resolver, same gc
                  settings as the product's worker); `serve` below

Per round, size and target (order rotates each round), `wrk -t1 -cN -dS` runs
against the target; the target's CPU time (user+sys of its process tree, psutil)
before and after, divided by the requests wrk completed, is its CPU/request. The
ratio to nginx is taken per round (back-to-back runs) and the median of the rounds
is reported. Proxies share one CPU, wrk and the upstream the other (bench/run.py's
pinning). Results: a table on stdout and bench/results/lean.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402  (bench/run.py: processes, nginx configs, wrk)

HOST = bench.HOST
SIZES = {100: "/small", 65536: "/large"}
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "lean.json"


def write_bodies(workdir: Path) -> None:
    """The upstream's two files: small.json (100 B) and large.json (64 KB)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, size in (("small.json", 100), ("large.json", 65536)):
        filler = "x" * (size - len('{"data":""}\n'))
        (workdir / name).write_text('{"data":"' + filler + '"}\n')


def upstream_conf(workdir: Path, port: int) -> str:
    write_bodies(workdir)
    return (
        bench._nginx_common(workdir)
        + "http {\n"
        + bench._nginx_http_common(workdir)
        + f"""  server {{
    listen {HOST}:{port} backlog=4096;
    default_type application/json;
    location /small {{ root {workdir}; try_files /small.json =404; }}
    location /large {{ root {workdir}; try_files /large.json =404; }}
  }}
}}
"""
    )


def start_lean(
    ps: bench.ProcessSet, workdir: Path, port: int, upstream_port: int, cpus: list[int] | None
) -> subprocess.Popen[Any]:
    argv = [str(Path(__file__).resolve()), "serve", "--upstream", f"http://{HOST}:{upstream_port}"]
    return bench.start_serving(
        ps, "lean", [*argv, "--listen", f"{HOST}:{port}"], workdir, port, cpus
    )


def measure(
    ps: bench.ProcessSet,
    pid: int,
    url: str,
    duration: int,
    connections: int,
    script: Path,
    cpus: list[int] | None,
) -> dict[str, Any]:
    before = bench.cpu_seconds(pid)
    t0 = time.monotonic()
    res = bench.run_wrk(ps, url, duration, connections, script, cpus)
    wall = time.monotonic() - t0
    cpu = bench.cpu_seconds(pid) - before
    n = max(res["requests"], 1)
    return {
        "requests": res["requests"],
        "rps": round(res["rps"]),
        "cpu_us_per_req": round(cpu / n * 1e6, 2),
        "cpu_util": round(cpu / wall, 3),
        "p50_ms": res["p50_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "errors": res["errors_total"],
        "non_2xx": res["err_status"],
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = args.targets.split(",")
    proxy_cpus, client_cpus = bench.pick_cpus(not args.no_pin)
    ps = bench.ProcessSet()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(s): {t: [] for t in targets} for s in sizes
    }

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            up_port, ngx_port, ap_port, admin_port, lean_port = bench.free_ports(5)
            bench.start_nginx(
                ps, "nginx-upstream", tmp / "up", upstream_conf(tmp / "up", up_port), up_port,
                client_cpus,
            )  # fmt: skip
            pids: dict[str, int] = {}
            ports = {"nginx": ngx_port, "apitally-proxy": ap_port, "lean": lean_port}
            if "nginx" in targets:
                conf = bench.nginx_proxy_conf(tmp / "ngx", ngx_port, up_port)
                pids["nginx"] = bench.start_nginx(
                    ps, "nginx", tmp / "ngx", conf, ngx_port, proxy_cpus
                ).pid
            if "apitally-proxy" in targets:
                pids["apitally-proxy"] = bench.start_apitally(
                    ps, tmp / "apitally", ap_port, admin_port, up_port, proxy_cpus
                ).pid
            if "lean" in targets:
                pids["lean"] = start_lean(ps, tmp / "lean", lean_port, up_port, proxy_cpus).pid
            script = tmp / "report.lua"
            script.write_text(bench.WRK_REPORT_LUA)
            for target in targets:  # warm-up: imports, pools, caches
                for size in sizes:
                    url = f"http://{HOST}:{ports[target]}{SIZES[size]}"
                    bench.run_wrk(ps, url, 1, args.connections, script, client_cpus)
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                for size in sizes:
                    for target in order:
                        url = f"http://{HOST}:{ports[target]}{SIZES[size]}/{rnd}"
                        res = measure(
                            ps, pids[target], url, args.duration, args.connections, script,
                            client_cpus,
                        )  # fmt: skip
                        raw[str(size)][target].append(res)
                        print(
                            f"round {rnd + 1} {size:>6} B {target:<15} "
                            f"{res['cpu_us_per_req']:>7.1f} µs/req  {res['rps']:>6} req/s  "
                            f"util {res['cpu_util']:.2f}  errors {res['errors']}",
                            flush=True,
                        )
        finally:
            ps.stop_all()
    return summarize(raw, args, proxy_cpus, client_cpus)


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]],
    args: argparse.Namespace,
    proxy_cpus: list[int] | None,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for size, per_target in raw.items():
        row: dict[str, Any] = {}
        base = per_target.get("nginx", [])
        for target, rounds in per_target.items():
            cpu = [r["cpu_us_per_req"] for r in rounds]
            entry: dict[str, Any] = {
                "cpu_us_per_req_median": round(statistics.median(cpu), 1),
                "cpu_us_per_req_rounds": cpu,
                "rps_median": round(statistics.median(r["rps"] for r in rounds)),
                "errors": sum(r["errors"] + r["non_2xx"] for r in rounds),
            }
            if base and target != "nginx":
                ratios = [
                    r["cpu_us_per_req"] / b["cpu_us_per_req"]
                    for r, b in zip(rounds, base, strict=True)
                ]
                entry["ratio_vs_nginx_median"] = round(statistics.median(ratios), 2)
                entry["ratio_vs_nginx_rounds"] = [round(x, 2) for x in ratios]
            row[target] = entry
        if "apitally-proxy" in per_target and "lean" in per_target:
            ratios = [
                a["cpu_us_per_req"] / b["cpu_us_per_req"]
                for a, b in zip(per_target["lean"], per_target["apitally-proxy"], strict=True)
            ]
            row["lean_vs_apitally_proxy_median"] = round(statistics.median(ratios), 2)
        summary[size] = row
    return {
        "parameters": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "pinning": f"proxies on {proxy_cpus}, wrk+upstream on {client_cpus}",
            "git": bench.git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "summary": summary,
        "raw": raw,
    }


def print_report(result: dict[str, Any]) -> None:
    p = result["parameters"]
    print(
        f"\nCPU µs/request, median of {p['rounds']} rounds of {p['duration_s']} s, "
        f"wrk -t1 -c{p['connections']} ({p['pinning']})"
    )
    print(f"{'response':>9}  {'target':<15} {'µs/req':>8} {'x nginx':>8} {'req/s':>7}  rounds")
    for size, row in result["summary"].items():
        for target, e in row.items():
            if not isinstance(e, dict):
                continue
            ratio = e.get("ratio_vs_nginx_median")
            print(
                f"{int(size):>7} B  {target:<15} {e['cpu_us_per_req_median']:>8.1f} "
                f"{(f'{ratio:.2f}' if ratio else '1.00'):>8} {e['rps_median']:>7}  "
                f"{e['cpu_us_per_req_rounds']}"
            )
        if "lean_vs_apitally_proxy_median" in row:
            print(f"{'':>11}lean ÷ apitally-proxy: {row['lean_vs_apitally_proxy_median']:.2f}")


# --------------------------------------------------------------------------- serve


def serve(upstream: str, listen: str, meter: bool = True) -> None:
    """Run the lean server in front of `upstream` until SIGTERM, metering every request."""
    import gc
    import logging

    import uvloop

    from apitally_proxy.config import parse_host_port, parse_upstream
    from apitally_proxy.lean.server import LeanConfig, LeanServer
    from apitally_proxy.metering import Meter
    from apitally_proxy.routes import RouteResolver

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        target = parse_upstream(upstream)
        meters = Meter(RouteResolver(base_path=target.base_path))
        server = LeanServer(
            LeanConfig(upstream=target), meters.record if meter else (lambda exchange: None)
        )
        addr = parse_host_port(listen)
        await server.start(addr.host, addr.port)
        # As the product's worker does after start-up (server.serve).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.drain(5.0)
        print(json.dumps({"recorded": meters.recorded, "statuses": meters.status_counts}))

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        sp = argparse.ArgumentParser(prog="bench_lean.py serve")
        sp.add_argument("--upstream", required=True)
        sp.add_argument("--listen", required=True)
        sp.add_argument("--no-meter", action="store_true")
        sa = sp.parse_args(argv[1:])
        serve(sa.upstream, sa.listen, meter=not sa.no_meter)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, median reported (default 3)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--sizes", default="100,65536", help="response sizes (100 and/or 65536)")
    ap.add_argument("--targets", default="nginx,apitally-proxy,lean")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args(argv)
    problems = bench.check_prereqs()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    try:
        result = run_bench(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    print(f"\nwritten to {shown}")
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    sys.exit(main())
