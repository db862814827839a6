#!/usr/bin/env python3
"""Benchmark apitally-proxy against nginx as a reverse proxy, on 127.0.0.1 only.

    .venv/bin/python bench/run.py [--duration S] [--rounds N] [--connections N]
                                  [--requests-for-memory N] [--no-pin]

What it starts (free ports, temp dirs, all torn down at the end):
  * upstream       nginx, 1 worker, answers `{"ok":true}` (or ~10 KB on /large/...)
  * nginx          nginx, 1 worker, reverse proxy to the upstream (keepalive pool)
  * apitally-proxy 1 worker, local mode, --sync-interval 1, same upstream

What it measures, per scenario and target, in interleaved rounds (median reported):
  * wrk requests/s and latency p50/p99 (wrk -t1 --latency)
  * the proxy's own CPU time (user+sys, psutil, all its processes) → CPU µs/request
  * the ratio apitally-proxy CPU/request ÷ nginx CPU/request, per round
And apitally-proxy's RSS at rest and after N requests with varied paths/consumers.

Results: a table on stdout and bench/results/latest.json. Needs `nginx` and `wrk`
on PATH (apt-get update && apt-get install -y nginx wrk); installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latest.json"
TARGETS = ("upstream", "nginx", "apitally-proxy")
PROXIES = ("nginx", "apitally-proxy")
LARGE_BODY_BYTES = 10 * 1024

# scenario name -> (path, connections; None = --connections)
SCENARIOS: dict[str, tuple[str, int | None]] = {
    "small": ("/items/42", None),  # {"ok":true}, saturating load
    "10kb": ("/large/42", None),  # ~10 KB body, saturating load
    "c1": ("/items/42", 1),  # one connection: latency without queueing
}

INSTALL_HINT = "apt-get update && apt-get install -y nginx wrk"

# --------------------------------------------------------------------------- wrk scripts

# done() prints one machine-readable line; latency values are in microseconds.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
    .. '"err_connect":%.0f,"err_read":%.0f,"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f,'
    .. '"lat_mean_us":%.1f,"lat_max_us":%.0f,'
    .. '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""

# Varied paths and consumers, stopping after N responses (per thread; we run -t1).
# The upstream echoes X-Bench-Consumer back as X-Apitally-Consumer.
WRK_MEMORY_LUA = (
    r"""
local limit = 100000
local count = 0
local consumers = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"}
local shapes = {
  function() return "/items/" .. math.random(1, 10000000) end,
  function() return "/items/" .. math.random(1, 10000000) end,
  function() return "/users/" .. math.random(1, 1000000) .. "/orders" end,
  function()
    local hi, lo = math.random(0, 2147483646), math.random(0, 2147483646)
    return "/orders/" .. string.format("%08x%08x", hi, lo)
  end,
  function() return "/search?q=" .. math.random(1, 1000000) end,
  function() return "/health" end,
}

local marker = nil

init = function(args)
  if args[1] then limit = tonumber(args[1]) end
  marker = args[2]
  math.randomseed(os.time())
end

request = function()
  local path = shapes[math.random(1, #shapes)]()
  local headers = {}
  if math.random() < 0.8 then
    headers["X-Bench-Consumer"] = consumers[math.random(1, #consumers)]
  end
  return wrk.format("GET", path, headers)
end

response = function(status, headers, body)
  count = count + 1
  if count == limit then
    -- thread:stop() ends this thread, but wrk's main thread sleeps out -d;
    -- the marker file tells bench/run.py to SIGINT wrk, which ends it early.
    if marker then
      local f = io.open(marker, "w")
      if f then f:write("done\n"); f:close() end
    end
    wrk.thread:stop()
  end
end
"""
    + WRK_REPORT_LUA
)

# --------------------------------------------------------------------------- processes


class ProcessSet:
    """Every child we start, each in its own session, so teardown can be complete."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any], int]] = []

    def start(
        self, name: str, cmd: list[str], cpus: list[int] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        def pre() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        p = subprocess.Popen(cmd, start_new_session=True, preexec_fn=pre, **kw)
        self.procs.append((name, p, p.pid))
        return p

    def forget(self, p: subprocess.Popen[Any]) -> None:
        self.procs = [t for t in self.procs if t[1] is not p]

    @staticmethod
    def stop(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the process, wait, then SIGKILL its whole process group (our session)."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)
        # Sweep anything left in the group (e.g. nginx workers), then reap.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)

    def stop_all(self) -> None:
        # Last started first: wrk, then the proxies, then the upstream.
        for name, p, _pid in reversed(self.procs):
            sig = signal.SIGQUIT if name.startswith("nginx") else signal.SIGTERM
            self.stop(p, sig, grace=10.0 if name == "apitally-proxy" else 5.0)
        self.procs.clear()


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


def http_get(
    url: str, timeout: float = 3.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- nginx configs


def _nginx_common(workdir: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""  access_log off;
  client_body_temp_path {workdir}/client_body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  sendfile on;
"""


def upstream_conf(workdir: Path, port: int) -> str:
    # Too long for an nginx `return` string: serve it as a (page-cached) file.
    filler = "x" * (LARGE_BODY_BYTES - len('{"data":""}\n'))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "large.json").write_text('{"data":"' + filler + '"}\n')
    return (
        _nginx_common(workdir)
        + "http {\n"
        + _nginx_http_common(workdir)
        + f"""  server {{
    listen {HOST}:{port} backlog=4096;
    default_type application/json;
    # Lets the memory run vary consumers; not added when the request header is absent.
    add_header X-Apitally-Consumer $http_x_bench_consumer;
    location / {{ return 200 '{{"ok":true}}'; }}
    location /large {{ root {workdir}; try_files /large.json =404; }}
  }}
}}
"""
    )


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int) -> str:
    return (
        _nginx_common(workdir)
        + "http {\n"
        + _nginx_http_common(workdir)
        + f"""  upstream app {{
    server {HOST}:{upstream_port};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen {HOST}:{port} backlog=4096;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""
    )


def start_nginx(
    ps: ProcessSet, name: str, workdir: Path, conf: str, port: int, cpus: list[int] | None
) -> subprocess.Popen[Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    log = open(workdir / "stderr.log", "wb")  # noqa: SIM115 - closed with the process
    p = ps.start(
        name,
        ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf_path)],
        cpus=cpus,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_port(port, p)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{name}: {exc}\n{tail(workdir / 'error.log')}\n{tail(workdir / 'stderr.log')}"
        ) from None
    return p


def start_apitally(
    ps: ProcessSet,
    workdir: Path,
    port: int,
    admin_port: int,
    upstream_port: int,
    cpus: list[int] | None,
) -> subprocess.Popen[Any]:
    state = workdir / "state"
    state.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "apitally_proxy",
        "--upstream", f"http://{HOST}:{upstream_port}",
        "--listen", f"{HOST}:{port}",
        "--admin-listen", f"{HOST}:{admin_port}",
        "--state-dir", str(state),
        "--sync-interval", "1",
        "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY")}
    log = open(workdir / "apitally-proxy.log", "wb")  # noqa: SIM115
    p = ps.start(
        "apitally-proxy",
        cmd,
        cpus=cpus,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(workdir),
    )
    deadline = time.monotonic() + 30
    while True:
        if p.poll() is not None:
            raise RuntimeError(
                f"apitally-proxy exited with {p.returncode}:\n"
                + tail(workdir / "apitally-proxy.log")
            )
        with contextlib.suppress(OSError):
            if http_get(f"http://{HOST}:{admin_port}/health", timeout=1)[0] == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"apitally-proxy not healthy after 30s:\n{tail(workdir / 'apitally-proxy.log')}"
            )
        time.sleep(0.1)
    wait_port(port, p)
    return p


# --------------------------------------------------------------------------- measuring


def proc_tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    import psutil

    total = 0.0
    for p in proc_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(
    ps: ProcessSet,
    url: str,
    duration: int,
    connections: int,
    script: Path,
    cpus: list[int] | None,
    script_args: list[str] | None = None,
    done_marker: Path | None = None,
) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    if script_args:
        cmd += ["--", *script_args]
    p = ps.start(
        "wrk",
        cmd,
        cpus=cpus,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        if done_marker is not None:
            # wrk has no request-count limit: stop it (SIGINT → it prints its summary)
            # as soon as the script says the target count was reached.
            deadline = time.monotonic() + duration
            while p.poll() is None and time.monotonic() < deadline and not done_marker.exists():
                time.sleep(0.05)
            if p.poll() is None and done_marker.exists():
                p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {duration + 30}s: {' '.join(cmd)}") from None
    finally:
        # Also on Ctrl-C: never leave a wrk behind.
        if p.poll() is None:
            ps.stop(p, signal.SIGKILL, grace=1)
        ps.forget(p)
    m = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {' '.join(cmd)}\n{out}\n{err}")
    res: dict[str, Any] = json.loads(m.group(1))
    # Cross-check with wrk's own text summary (these lines only appear when non-zero).
    n2 = _NON2XX.search(out)
    res["non_2xx_3xx"] = int(n2.group(1)) if n2 else 0
    se = _SOCKERR.search(out)
    res["socket_errors_line"] = se.group(0) if se else None
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
    res["errors_total"] = sum(
        res[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
    )
    return res


def measure(
    ps: ProcessSet,
    target: str,
    url: str,
    pids: dict[str, int],
    duration: int,
    connections: int,
    script: Path,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    watched = {name: pid for name, pid in pids.items() if name == "upstream" or name == target}
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    t0 = time.monotonic()
    res = run_wrk(ps, url, duration, connections, script, client_cpus)
    wall = time.monotonic() - t0
    after = {name: cpu_seconds(pid) for name, pid in watched.items()}
    n = max(res["requests"], 1)
    out: dict[str, Any] = {
        "rps": round(res["rps"], 1),
        "requests": res["requests"],
        "p50_ms": res["p50_us"] / 1000,
        "p90_ms": res["p90_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "max_ms": res["lat_max_us"] / 1000,
        "non_2xx_3xx": res["err_status"],
        "socket_errors": {
            k[4:]: res[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")
        },
        "wrk_text_non_2xx_3xx": res["non_2xx_3xx"],
        "wrk_text_socket_errors": res["socket_errors_line"],
    }
    up_cpu = after["upstream"] - before["upstream"]
    out["upstream_cpu_us_per_req"] = round(up_cpu / n * 1e6, 2)
    if target != "upstream":
        cpu = after[target] - before[target]
        out["proxy_cpu_s"] = round(cpu, 3)
        out["proxy_cpu_us_per_req"] = round(cpu / n * 1e6, 2)
        out["proxy_cpu_util"] = round(cpu / wall, 3)  # 1.0 = one core busy
    return out


# --------------------------------------------------------------------------- main flow


def check_prereqs() -> list[str]:
    problems = []
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found on PATH. Install it with: {INSTALL_HINT}")
    if importlib.util.find_spec("psutil") is None:
        problems.append("python package `psutil` missing in this interpreter (pip install psutil)")
    if importlib.util.find_spec("apitally_proxy") is None:
        problems.append(
            f"apitally_proxy not importable by {sys.executable}; "
            "run with the project venv (.venv/bin/python)"
        )
    return problems


def pick_cpus(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(proxy cpus, client cpus): proxies get their own core; wrk + upstream share the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return [cpus[-1]], cpus[:-1]


def versions() -> dict[str, Any]:
    def cmd(*args: str) -> str:
        with contextlib.suppress(Exception):
            r = subprocess.run(args, capture_output=True, text=True, timeout=5)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        return "?"

    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    git_rev = cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "git": git_rev + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "apitally-proxy": pkg("apitally-proxy"),
        "aiohttp": pkg("aiohttp"),
        "uvloop": pkg("uvloop"),
        "nginx": cmd("nginx", "-v"),
        "wrk": cmd("wrk", "-v"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def memory_phase(
    ps: ProcessSet,
    args: argparse.Namespace,
    ap_pid: int,
    ap_url: str,
    admin_url: str,
    script: Path,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    time.sleep(1.5)  # let the first sync cycle run
    rss_rest = rss_bytes(ap_pid)
    n = args.requests_for_memory
    marker = script.parent / "memory.done"
    res = run_wrk(
        ps,
        ap_url + "/",
        args.memory_timeout,
        args.connections,
        script,
        client_cpus,
        [str(n), str(marker)],
        marker,
    )
    rss_after = rss_bytes(ap_pid)
    time.sleep(2.0)  # a couple of sync cycles: aggregates flushed to the local spool
    rss_after_sync = rss_bytes(ap_pid)
    status = json.loads(http_get(admin_url + "/status.json")[2])
    return {
        "requests_target": n,
        "requests_sent": res["requests"],
        "reached_target": res["requests"] >= n,
        "rps": round(res["rps"], 1),
        "non_2xx_3xx": res["err_status"],
        "socket_errors": res["errors_total"] - res["err_status"],
        "rss_rest_mb": round(rss_rest / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_after_sync_mb": round(rss_after_sync / 2**20, 1),
        "proxy_status": {
            k: status.get(k)
            for k in (
                "requests_total",
                "requests_by_status",
                "unmatched",
                "route_overflow",
                "consumer_overflow",
                "upstream_errors",
                "upstream_retries",
            )
        },
    }


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scen, per_target in raw.items():
        s: dict[str, Any] = {}
        for target, rounds in per_target.items():
            s[target] = {
                k: median_of(rounds, k)
                for k in (
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "proxy_cpu_us_per_req",
                    "proxy_cpu_util",
                    "upstream_cpu_us_per_req",
                )
            }
            s[target]["non_2xx_3xx_total"] = sum(r["non_2xx_3xx"] for r in rounds)
            s[target]["socket_errors_total"] = sum(sum(r["socket_errors"].values()) for r in rounds)
        ng, ap = per_target.get("nginx", []), per_target.get("apitally-proxy", [])
        ratios = [
            a["proxy_cpu_us_per_req"] / b["proxy_cpu_us_per_req"]
            for a, b in zip(ap, ng, strict=False)
            if b.get("proxy_cpu_us_per_req")
        ]
        s["cpu_ratio_apitally_vs_nginx"] = {
            "median_of_round_ratios": round(statistics.median(ratios), 2) if ratios else None,
            "per_round": [round(r, 2) for r in ratios],
        }
        up = s.get("upstream", {}).get("p50_ms")
        for t in PROXIES:
            if up is not None and s.get(t, {}).get("p50_ms") is not None:
                s[t]["added_p50_ms_vs_upstream"] = round(s[t]["p50_ms"] - up, 3)
        summary[scen] = s
    return summary


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_report(result: dict[str, Any]) -> None:
    p = result["params"]
    print()
    print(
        f"apitally-proxy benchmark  ({result['versions']['git']}, "
        f"{p['rounds']} rounds x {p['duration_s']}s, "
        f"wrk -t1 -c{p['connections']}, pinning: {p['pinning']})"
    )
    for scen, s in result["summary"].items():
        path, conns = SCENARIOS[scen]
        print(f"\n== {scen}: GET {path}, {conns or p['connections']} connection(s) — medians")
        hdr = (
            f"{'target':<15}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'CPU µs/req':>12}{'CPU util':>10}{'non-2xx':>9}{'sock err':>9}"
        )
        print(hdr)
        print("-" * len(hdr))
        for t in TARGETS:
            r = s.get(t)
            if not r:
                continue
            print(
                f"{t:<15}{fmt(r['rps'], 0):>10}{fmt(r['p50_ms'], 3):>9}{fmt(r['p99_ms'], 3):>9}"
                f"{fmt(r['proxy_cpu_us_per_req'], 1):>12}{fmt(r['proxy_cpu_util'], 2):>10}"
                f"{r['non_2xx_3xx_total']:>9}{r['socket_errors_total']:>9}"
            )
        ratio = s["cpu_ratio_apitally_vs_nginx"]
        print(
            f"CPU/request apitally-proxy ÷ nginx: {fmt(ratio['median_of_round_ratios'], 2)}x "
            f"(per round: {', '.join(f'{x:.2f}' for x in ratio['per_round'])})"
        )
    m = result.get("memory")
    if m:
        print(
            f"\n== memory (apitally-proxy RSS)\nat rest: {m['rss_rest_mb']} MB; "
            f"after {m['requests_sent']:,} requests (varied paths/consumers, "
            f"target {m['requests_target']:,}): {m['rss_after_mb']} MB, "
            f"{m['rss_after_sync_mb']} MB 2 s later; {m['rps']:,.0f} req/s, "
            f"non-2xx {m['non_2xx_3xx']}, socket errors {m['socket_errors']}"
        )
        print(f"proxy status after memory run: {json.dumps(m['proxy_status'])}")
    if result.get("apitally_log_problems"):
        print("\napitally-proxy log warnings/errors (first lines):")
        for line in result["apitally_log_problems"]:
            print("  " + line)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=int, default=5, help="seconds per wrk run (integer, default 5)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)"
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=50,
        help="wrk connections for saturating runs (default 50)",
    )
    ap.add_argument(
        "--requests-for-memory",
        type=int,
        default=100_000,
        help="requests for the RSS measurement (default 100000; 0 skips)",
    )
    ap.add_argument(
        "--memory-timeout",
        type=int,
        default=120,
        help="upper bound in seconds for the memory run (default 120)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of warm-up per target before the rounds (default 1; 0 skips)",
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    ap.add_argument(
        "--no-pin", action="store_true", help="do not pin proxies / wrk+upstream to separate CPUs"
    )
    ap.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT.relative_to(ROOT)})",
    )
    ap.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection"
    )
    args = ap.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or args.duration < 1 or args.rounds < 1:
        ap.error(
            f"bad --scenarios {unknown}" if unknown else "--duration and --rounds must be >= 1"
        )

    problems = check_prereqs()
    if problems:
        for p in problems:
            print("bench: " + p, file=sys.stderr)
        return 2

    # Ctrl-C / SIGTERM / SIGHUP: unwind through `finally`, which tears everything down.
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    proxy_cpus, client_cpus = pick_cpus(not args.no_pin)
    tmp = Path(tempfile.mkdtemp(prefix="apitally-bench-"))
    ps = ProcessSet()
    started = time.monotonic()
    try:
        up_port, ng_port, ap_port, admin_port = free_ports(4)
        print(
            f"bench: temp dir {tmp}; ports upstream={up_port} nginx={ng_port} "
            f"apitally-proxy={ap_port} admin={admin_port}; "
            f"proxy cpus={proxy_cpus} client cpus={client_cpus}",
            flush=True,
        )
        report_lua = tmp / "report.lua"
        report_lua.write_text(WRK_REPORT_LUA)
        memory_lua = tmp / "memory.lua"
        memory_lua.write_text(WRK_MEMORY_LUA)

        upstream = start_nginx(
            ps,
            "nginx-upstream",
            tmp / "upstream",
            upstream_conf(tmp / "upstream", up_port),
            up_port,
            client_cpus,
        )
        nginx = start_nginx(
            ps,
            "nginx-proxy",
            tmp / "nginx",
            nginx_proxy_conf(tmp / "nginx", ng_port, up_port),
            ng_port,
            proxy_cpus,
        )
        apx = start_apitally(ps, tmp / "apitally", ap_port, admin_port, up_port, proxy_cpus)
        pids = {"upstream": upstream.pid, "nginx": nginx.pid, "apitally-proxy": apx.pid}
        urls = {
            "upstream": f"http://{HOST}:{up_port}",
            "nginx": f"http://{HOST}:{ng_port}",
            "apitally-proxy": f"http://{HOST}:{ap_port}",
        }
        admin_url = f"http://{HOST}:{admin_port}"

        # Sanity: every target answers, and consumer headers never reach the client.
        for t, base in urls.items():
            for path in ("/items/1", "/large/1"):
                code, headers, body = http_get(base + path, headers={"X-Bench-Consumer": "sanity"})
                if code != 200 or not body:
                    raise RuntimeError(f"sanity check failed: {t} {path} -> {code}")
                if path == "/large/1" and len(body) != LARGE_BODY_BYTES:
                    raise RuntimeError(f"sanity check failed: {t} {path} body {len(body)} bytes")
                if t == "apitally-proxy" and any(
                    k.lower().startswith("x-apitally-") for k in headers
                ):
                    raise RuntimeError(
                        "sanity check failed: apitally-proxy leaked an X-Apitally-* header"
                    )

        result: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "params": {
                "duration_s": args.duration,
                "rounds": args.rounds,
                "connections": args.connections,
                "requests_for_memory": args.requests_for_memory,
                "scenarios": {
                    s: {"path": SCENARIOS[s][0], "connections": SCENARIOS[s][1] or args.connections}
                    for s in scenarios
                },
                "pinning": f"proxies on cpu {proxy_cpus}, wrk+upstream on cpu {client_cpus}"
                if proxy_cpus
                else "off",
                "wrk": "wrk -t1 --latency --timeout 5s",
            },
        }

        if args.requests_for_memory > 0:
            print(
                f"bench: memory run, {args.requests_for_memory:,} requests "
                "through apitally-proxy ...",
                flush=True,
            )
            result["memory"] = memory_phase(
                ps, args, apx.pid, urls["apitally-proxy"], admin_url, memory_lua, client_cpus
            )

        if args.warmup > 0:
            for t in TARGETS:
                run_wrk(
                    ps, urls[t] + "/items/0", args.warmup, args.connections, report_lua, client_cpus
                )

        raw: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {t: [] for t in TARGETS} for s in scenarios
        }
        for rnd in range(args.rounds):
            order = TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)]
            for scen in scenarios:
                path, conns = SCENARIOS[scen]
                for t in order:
                    r = measure(
                        ps,
                        t,
                        urls[t] + path,
                        pids,
                        args.duration,
                        conns or args.connections,
                        report_lua,
                        client_cpus,
                    )
                    r["round"] = rnd + 1
                    raw[scen][t].append(r)
                    print(
                        f"bench: round {rnd + 1}/{args.rounds} {scen:<6} {t:<15} "
                        f"{r['rps']:>10,.0f} req/s  "
                        f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                        f"cpu {r.get('proxy_cpu_us_per_req', '-')} µs/req  "
                        f"non-2xx {r['non_2xx_3xx']}  "
                        f"sock err {sum(r['socket_errors'].values())}",
                        flush=True,
                    )
                    time.sleep(0.3)

        result["summary"] = summarize(raw)
        result["rounds"] = raw
        with contextlib.suppress(Exception):
            st = json.loads(http_get(admin_url + "/status.json")[2])
            result["apitally_status_end"] = {
                k: st.get(k)
                for k in (
                    "requests_total",
                    "requests_by_status",
                    "unmatched",
                    "route_overflow",
                    "upstream_errors",
                    "upstream_retries",
                )
            }
            result["apitally_status_end"]["hub"] = {
                k: st.get("hub", {}).get(k) for k in ("mode", "ok", "problem", "sent", "queued")
            }
        result["apitally_rss_end_mb"] = round(rss_bytes(apx.pid) / 2**20, 1)
        log_lines = (
            (tmp / "apitally" / "apitally-proxy.log").read_text(errors="replace").splitlines()
        )
        problems_in_log = [
            ln for ln in log_lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln
        ]
        result["apitally_log_problem_count"] = len(problems_in_log)
        result["apitally_log_problems"] = problems_in_log[:10]
        result["elapsed_s"] = round(time.monotonic() - started, 1)

        print_report(result)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"bench: wrote {args.output} ({result['elapsed_s']} s)")
        return 0
    except KeyboardInterrupt as exc:
        print(
            f"\nbench: interrupted ({str(exc) or 'SIGINT'}); tearing down",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except RuntimeError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        # Do not let a second Ctrl-C cut the teardown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ps.stop_all()
        if args.keep_tmp:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
