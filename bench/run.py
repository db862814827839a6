#!/usr/bin/env python3
"""Benchmark apitally-proxy against nginx and the official in-process clients, on 127.0.0.1.

    .venv/bin/python bench/run.py [--duration S] [--rounds N] [--server lean,aiohttp]
                                  [--workers 1,2] [--requests-for-memory N] [--no-inprocess]
                                  [--memory-sync-interval S] [--memory-export local|otlp]

One run, four phases (free ports, temp dirs, every process stopped by its PID at the end):

  1. proxies   wrk against the upstream directly, nginx, and apitally-proxy for each
               --server x --workers (e.g. "apitally-proxy (lean, 2w)"), all in front of
               the same nginx upstream; scenarios small JSON, 64 KB, one connection (c=1).
               Per run: CPU time of the target's whole process tree per request, the
               ratio to nginx's in the same round, wrk's p50/p99; for c=1 the latency
               added over the direct upstream in the same round; with 2 workers each
               worker's connections (mid-run), requests and CPU share.
  2. in-process  the Starlette parity app under uvicorn (bench/bench_inprocess.py's
               app_process): plain, with apitally 0.25.1's middleware, with apitally
               1.0.0's init (.venv-apitally1), and plain behind apitally-proxy per
               --server and behind nginx (a reference: what any proxy costs at the
               app's pace); interleaved rounds. Reports what each client adds to the
               app's CPU per request, and each proxy's CPU per request ÷ that, per round.
  3. memory    a fresh apitally-proxy (--memory-server, --memory-workers): RSS of each
               process at rest, then at checkpoints over N requests with hostile path
               and consumer cardinality, and 2.5 s later. It syncs every
               --memory-sync-interval seconds (default 1, what every earlier run used;
               10 is the proxy's own default for its first hour, when each interval,
               and each sync payload, holds ten times the rows), in local mode or
               (--memory-export otlp) exporting to a fake OTLP receiver.
  4. report    a Markdown block (paste as is into docs/performance.md) on stdout, and
               bench/results/latest.json. Every ratio is taken per round, then the
               median of the rounds is reported.

Needs `nginx` and `wrk` on PATH (apt-get update && apt-get install -y nginx wrk) and the
project venv; installs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latest.json"
SMALL_BODY = '{"ok":true}'
LARGE_BODY_BYTES = 64 * 1024
SERVERS = ("lean", "aiohttp")

# scenario name -> (path, connections; None = --connections, label)
SCENARIOS: dict[str, tuple[str, int | None, str]] = {
    "small": ("/items/42", None, f"small JSON ({len(SMALL_BODY)} B)"),
    "64kb": ("/large/42", None, "64 KB JSON"),
    "c1": ("/items/42", 1, "c=1"),
}

# The upstreams answer 200 (nginx) or 404 (the app) on every OpenAPI probe URL.
EXPECTED_WARNING = "no OpenAPI document found"
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

# Hostile cardinality: random ids, random literal segments (every one a new "route"),
# random queries, a million possible consumers, stopping after N responses (per thread;
# we run -t1). The upstream echoes X-Bench-Consumer back as X-Apitally-Consumer.
WRK_MEMORY_LUA = (
    r"""
local limit = 100000
local count = 0
local marker = nil
local letters = "abcdefghijklmnopqrstuvwxyz"
local named = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"}

local function word()
  local t = {}
  for i = 1, math.random(3, 10) do
    local k = math.random(1, 26)
    t[i] = letters:sub(k, k)
  end
  return table.concat(t)
end

local function hex8()
  return string.format("%08x", math.random(0, 2147483646))
end

local shapes = {
  function() return "/items/" .. math.random(1, 1000000000) end,
  function()
    return "/users/" .. math.random(1, 10000000) .. "/orders/" .. math.random(1, 10000000)
  end,
  function() return "/orders/" .. hex8() .. hex8() end,
  function() return "/" .. word() .. "/" .. word() end,
  function() return "/api/" .. word() .. "/" .. math.random(1, 1000000) .. "/" .. word() end,
  function() return "/files/" .. hex8() .. "-" .. hex8() .. "/" .. word() .. ".json" end,
  function() return "/search?q=" .. word() .. "&page=" .. math.random(1, 1000) end,
  function() return "/health" end,
}

init = function(args)
  if args[1] then limit = tonumber(args[1]) end
  marker = args[2]
  math.randomseed(tonumber(args[3]) or os.time())
end

request = function()
  local path = shapes[math.random(1, #shapes)]()
  local headers = {}
  local r = math.random()
  if r < 0.5 then
    headers["X-Bench-Consumer"] = "user-" .. math.random(1, 1000000)
  elseif r < 0.8 then
    headers["X-Bench-Consumer"] = named[math.random(1, #named)]
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


def headers_lua(headers: Iterable[str]) -> str:
    """wrk Lua setting each "Name: value" header on every request, plus the report."""
    lines = []
    for header in headers:
        name, _, value = header.partition(":")
        lines.append(f"wrk.headers[{json.dumps(name.strip())}] = {json.dumps(value.strip())}")
    return "\n".join(lines) + "\n" + WRK_REPORT_LUA


# --------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[Any]:
    """psutil handles of every process below `pid` (they may live in sessions of their own,
    e.g. apitally-proxy's workers, where a process-group kill does not reach them)."""
    try:
        import psutil

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:
        return []


class ProcessSet:
    """Every child we start, each in its own session, so teardown can be complete."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any], int]] = []

    def start(
        self, name: str, cmd: list[str], cpus: list[int] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        # preexec_fn is unsafe once other threads run (the in-process phase's fake hub):
        # then `taskset` pins the command (or, without it, we do right after the spawn).
        single_threaded = threading.active_count() == 1

        def pre() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        taskset = shutil.which("taskset") if cpus and not single_threaded else None
        if cpus and taskset:  # pinned from the first instruction, no Python in the child
            cmd = [taskset, "-c", ",".join(str(c) for c in cpus), *cmd]
        p = subprocess.Popen(
            cmd,
            start_new_session=True,
            preexec_fn=pre if cpus and single_threaded else None,
            **kw,
        )
        self.procs.append((name, p, p.pid))
        if cpus and not single_threaded and not taskset:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(p.pid, cpus)
        return p

    def forget(self, p: subprocess.Popen[Any]) -> None:
        self.procs = [t for t in self.procs if t[1] is not p]

    @staticmethod
    def stop(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the process, wait, then SIGKILL its process group and its descendants."""
        below = _descendants(p.pid) if p.poll() is None else []
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)
        # Sweep anything left in the group (e.g. nginx workers), then reap.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        # Descendants by PID (psutil checks the start time: no reused PID is hit).
        for child in below:
            with contextlib.suppress(Exception):
                if child.is_running():
                    child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)

    def close(self, p: subprocess.Popen[Any], name: str) -> None:
        """Stop one process now (as stop_all would) and forget it."""
        sig = signal.SIGQUIT if name.startswith("nginx") else signal.SIGTERM
        self.stop(p, sig, grace=10.0 if name.startswith("apitally-proxy") else 5.0)
        self.forget(p)

    def stop_all(self) -> None:
        # Last started first: wrk, then the proxies, then the upstream.
        for name, p, _pid in reversed(list(self.procs)):
            self.close(p, name)
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


def get_json(url: str, timeout: float = 3.0) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        code, _, body = http_get(url, timeout=timeout)
        if code == 200:
            value = json.loads(body)
            if isinstance(value, dict):
                return value
    return {}


def start_serving(
    ps: ProcessSet,
    name: str,
    argv: list[str],
    workdir: Path,
    port: int,
    cpus: list[int] | None,
) -> subprocess.Popen[Any]:
    """A benchmark's own server process (`argv` after the interpreter), its output in
    `workdir/<name>.log`; returns once it listens on `port`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    p = ps.start(
        name,
        [sys.executable, *argv],
        cpus=cpus,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_port(port, p)
    except RuntimeError as exc:
        raise RuntimeError(f"{name}: {exc}\n{tail(log_path)}") from None
    return p


def git_rev() -> str:
    """The short commit of the tree measured, or "?" outside a git checkout."""
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return "?"


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
    location / {{ return 200 '{SMALL_BODY}'; }}
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
    *,
    workers: int = 1,
    server: str | None = None,
    name: str = "apitally-proxy",
    sync_interval: float | None = 1.0,
    export: dict[str, str] | None = None,
) -> subprocess.Popen[Any]:
    """apitally-proxy in local mode, or exporting as `export` (APITALLY_* variables) says;
    `server` goes in APITALLY_PROXY_SERVER (a proxy that predates the setting ignores it);
    `sync_interval` None keeps the proxy's own default. With workers > 1, returns once all
    of them report."""
    state = workdir / "state"
    state.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "apitally_proxy",
        "--upstream", f"http://{HOST}:{upstream_port}",
        "--listen", f"{HOST}:{port}",
        "--admin-listen", f"{HOST}:{admin_port}",
        "--state-dir", str(state),
        "--workers", str(workers),
    ]  # fmt: skip
    if sync_interval is not None:
        cmd += ["--sync-interval", f"{sync_interval:g}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY")}
    env.update(export or {})
    if server:
        env["APITALLY_PROXY_SERVER"] = server
    log_path = workdir / "apitally-proxy.log"
    log = open(log_path, "wb")  # noqa: SIM115
    p = ps.start(
        name,
        cmd,
        cpus=cpus,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(workdir),
    )
    admin = f"http://{HOST}:{admin_port}"
    deadline = time.monotonic() + 30
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n" + tail(log_path))
        with contextlib.suppress(OSError):
            if http_get(admin + "/health", timeout=1)[0] == 200:
                if workers <= 1:
                    break
                # The other workers publish their status every 2 s: all up once all report.
                if len(get_json(admin + "/status.json").get("workers_reporting") or []) >= workers:
                    break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready after 30s:\n{tail(log_path)}")
        time.sleep(0.1)
    wait_port(port, p)
    return p


def start_app(
    ps: ProcessSet,
    name: str,
    spec: Any,
    logdir: Path,
    cpus: list[int] | None,
    ready_path: str = "/items",
    timeout: float = 30.0,
) -> subprocess.Popen[Any]:
    """Start an app described by a tests.support AppProcess (argv, env, cwd, url) as our own
    child, tracked by PID like everything else; returns once `ready_path` answers 200."""
    with contextlib.suppress(OSError):
        spec.log_path.unlink()  # AppProcess made a temp log file we do not use
    log_path = logdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    p = ps.start(
        name,
        list(spec.argv),
        cpus=cpus,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=spec.env,
        cwd=str(spec.cwd),
    )
    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(OSError):
            if http_get(spec.url + ready_path, timeout=1)[0] == 200:
                return p
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready after {timeout}s:\n{tail(log_path)}")
        time.sleep(0.1)


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


def worker_procs(pid: int, workers: int) -> dict[str, Any]:
    """{"0": psutil.Process, ...} of apitally-proxy's workers (the process itself with one
    worker), plus "supervisor" with several."""
    import psutil

    root = psutil.Process(pid)
    if workers <= 1:
        return {"0": root}
    out: dict[str, Any] = {"supervisor": root}
    for child in root.children():
        with contextlib.suppress(psutil.Error, ValueError, IndexError):
            argv = child.cmdline()
            if "--worker-slot" in argv:
                out[argv[argv.index("--worker-slot") + 1]] = child
    return out


def _proc_cpu(p: Any) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except Exception:
        return 0.0


def count_connections(procs: dict[str, Any], port: int) -> dict[str, int]:
    """Established client connections on `port` held by each worker."""
    import psutil

    out: dict[str, int] = {}
    for slot, p in procs.items():
        if slot == "supervisor":
            continue
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        out[slot] = sum(
            1
            for c in conns
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
        )
    return out


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


@dataclass
class Target:
    """One thing wrk drives in the proxies phase."""

    key: str  # "upstream", "nginx", "apitally-proxy:lean:2w"
    label: str  # "upstream (direct)", "nginx", "apitally-proxy (lean, 2w)"
    url: str
    port: int
    pid: int
    workers: int = 1
    server: str | None = None
    admin_url: str | None = None
    log: Path | None = None
    state: Path | None = None
    procs: dict[str, Any] = field(default_factory=dict)  # worker slot -> psutil.Process
    # With several workers: requests each has counted, and the run that awaits its share.
    counted: dict[str, int] | None = None
    counted_after: float = 0.0
    awaiting: dict[str, Any] | None = None

    @property
    def is_proxy(self) -> bool:
        return self.key != "upstream"


def measure(
    ps: ProcessSet,
    target: Target,
    path: str,
    upstream_pid: int,
    duration: int,
    connections: int,
    script: Path,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    """One wrk run against `target`: its CPU per request (whole tree), wrk's numbers, and
    with several workers each one's connections (sampled mid-run) and CPU share."""
    per_worker = target.workers > 1
    up_before = cpu_seconds(upstream_pid)
    before = cpu_seconds(target.pid) if target.is_proxy else 0.0
    w_before = {s: _proc_cpu(p) for s, p in target.procs.items()} if per_worker else {}
    sampled: dict[str, int] = {}
    timer = None
    if per_worker and connections > 1:
        timer = threading.Timer(
            duration / 2, lambda: sampled.update(count_connections(target.procs, target.port))
        )
        timer.daemon = True
        timer.start()
    t0 = time.monotonic()
    try:
        res = run_wrk(ps, target.url + path, duration, connections, script, client_cpus)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join(timeout=10)
    wall = time.monotonic() - t0
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
        "upstream_cpu_us_per_req": round((cpu_seconds(upstream_pid) - up_before) / n * 1e6, 2),
    }
    if target.is_proxy:
        cpu = cpu_seconds(target.pid) - before
        out["cpu_s"] = round(cpu, 3)
        out["cpu_us_per_req"] = round(cpu / n * 1e6, 2)
        out["cpu_util"] = round(cpu / wall, 3)  # 1.0 = one core busy
    if per_worker:
        deltas = {
            s: _proc_cpu(p) - w_before[s] for s, p in target.procs.items() if s != "supervisor"
        }
        total = sum(deltas.values()) or 1.0
        out["workers"] = {
            s: {"cpu_share": round(d / total, 3), "connections": sampled.get(s)}
            for s, d in sorted(deltas.items())
        }
    return out


# --------------------------------------------------------------------------- setup


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


def _cmd_first_line(*args: str) -> str:
    with contextlib.suppress(Exception):
        r = subprocess.run(args, capture_output=True, text=True, timeout=15)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    return "?"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def versions() -> dict[str, Any]:
    pkg = _version

    git_rev = _cmd_first_line("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    server_setting = False
    with contextlib.suppress(Exception):
        from apitally_proxy.config import Settings

        server_setting = "server" in Settings.model_fields
    return {
        "git": git_rev + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "apitally-proxy": pkg("apitally-proxy"),
        "apitally-proxy knows the `server` setting": server_setting,
        "aiohttp": pkg("aiohttp"),
        "uvloop": pkg("uvloop"),
        "apitally (in-process, .venv)": pkg("apitally"),
        "uvicorn": pkg("uvicorn"),
        "starlette": pkg("starlette"),
        "nginx": _cmd_first_line("nginx", "-v"),
        "wrk": _cmd_first_line("wrk", "-v"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def median_or_none(values: Iterable[float | None], nd: int = 3) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), nd) if vals else None


# --------------------------------------------------------------------------- phase 1: proxies


def start_targets(
    ps: ProcessSet,
    args: argparse.Namespace,
    tmp: Path,
    proxy_cpus: list[int] | None,
    client_cpus: list[int] | None,
    proxies: bool = True,
) -> tuple[Target, list[Target]]:
    """The upstream, then (with `proxies`) nginx and every apitally-proxy variant."""
    variants = [(s, w) for s in args.servers for w in args.worker_counts]
    ports = free_ports(2 + 2 * len(variants))
    up_port, ng_port = ports[0], ports[1]
    upstream_p = start_nginx(
        ps, "nginx-upstream", tmp / "upstream", upstream_conf(tmp / "upstream", up_port),
        up_port, client_cpus,
    )  # fmt: skip
    upstream = Target("upstream", "upstream (direct)", f"http://{HOST}:{up_port}", up_port,
                      upstream_p.pid)  # fmt: skip
    if not proxies:
        return upstream, [upstream]
    nginx_p = start_nginx(
        ps, "nginx-proxy", tmp / "nginx", nginx_proxy_conf(tmp / "nginx", ng_port, up_port),
        ng_port, proxy_cpus,
    )  # fmt: skip
    targets = [upstream, Target("nginx", "nginx", f"http://{HOST}:{ng_port}", ng_port, nginx_p.pid)]
    for i, (server, workers) in enumerate(variants):
        port, admin_port = ports[2 + 2 * i], ports[3 + 2 * i]
        label = f"apitally-proxy ({server}, {workers}w)"
        workdir = tmp / f"apitally-{server}-{workers}w"
        p = start_apitally(
            ps, workdir, port, admin_port, up_port, proxy_cpus,
            workers=workers, server=server, name=label,
        )  # fmt: skip
        t = Target(
            f"apitally-proxy:{server}:{workers}w", label, f"http://{HOST}:{port}", port, p.pid,
            workers=workers, server=server, admin_url=f"http://{HOST}:{admin_port}",
            log=workdir / "apitally-proxy.log", state=workdir / "state",
        )  # fmt: skip
        t.procs = worker_procs(p.pid, workers)
        if workers > 1 and len(t.procs) != workers + 1:
            raise RuntimeError(f"{label}: found workers {sorted(t.procs)}, expected {workers}")
        targets.append(t)
    print(
        "bench: started "
        + ", ".join(f"{t.label} :{t.port} pid {t.pid}" for t in targets)
        + f"; proxy cpus={proxy_cpus} client cpus={client_cpus}",
        flush=True,
    )
    return upstream, targets


def sanity_check(targets: list[Target]) -> None:
    """Every target answers both bodies; apitally-proxy never leaks X-Apitally-* headers."""
    for t in targets:
        for path in ("/items/1", "/large/1"):
            code, headers, body = http_get(t.url + path, headers={"X-Bench-Consumer": "sanity"})
            if code != 200 or not body:
                raise RuntimeError(f"sanity check failed: {t.label} {path} -> {code}")
            want = LARGE_BODY_BYTES if path.startswith("/large") else len(SMALL_BODY)
            if len(body) != want:
                raise RuntimeError(f"sanity check failed: {t.label} {path} body {len(body)} B")
            if t.key.startswith("apitally-proxy") and any(
                k.lower().startswith("x-apitally-") for k in headers
            ):
                raise RuntimeError(f"sanity check failed: {t.label} leaked an X-Apitally-* header")


def runs_for(scen: str, target: Target) -> bool:
    # One connection reaches one worker: c=1 through a multi-worker proxy measures the
    # same thing as through one worker.
    return not (SCENARIOS[scen][1] == 1 and target.workers > 1)


def counted_per_worker(t: Target) -> dict[str, int]:
    """Requests each worker of `t` has counted so far. Workers other than 0 publish their
    status to a file every 2 s: wait (at most 5 s) until each has published since
    `t.counted_after` (the end of its last run); worker 0's share is the merged total
    minus theirs."""
    assert t.state is not None and t.admin_url is not None
    deadline = time.monotonic() + 5.0
    while True:
        published: dict[str, dict[str, Any]] = {}
        for f in t.state.rglob("slot-*.status.json"):
            with contextlib.suppress(OSError, ValueError):
                published[f.name.split(".")[0].removeprefix("slot-")] = json.loads(f.read_bytes())
        fresh = len(published) >= t.workers - 1 and all(
            v.get("published_at", 0) > t.counted_after for v in published.values()
        )
        if fresh or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = {slot: int(v.get("requests_total") or 0) for slot, v in published.items()}
    out["0"] = int(get_json(t.admin_url + "/status.json").get("requests_total") or 0) - sum(
        out.values()
    )
    return dict(sorted(out.items()))


def settle_requests(t: Target) -> None:
    """Credit the run awaiting it with the requests each worker counted since the last look."""
    now = counted_per_worker(t)
    run, before = t.awaiting, t.counted
    if run is not None and before is not None:
        deltas = {s: now.get(s, 0) - before.get(s, 0) for s in run["workers"]}
        total = sum(deltas.values()) or 1
        for s, d in deltas.items():
            run["workers"][s]["requests"] = d
            run["workers"][s]["request_share"] = round(d / total, 3)
    t.counted, t.awaiting = now, None


def proxies_phase(
    ps: ProcessSet,
    args: argparse.Namespace,
    upstream: Target,
    targets: list[Target],
    script: Path,
    client_cpus: list[int] | None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    if args.warmup > 0:
        for t in targets:
            for path in ("/items/0", "/large/0"):
                run_wrk(ps, t.url + path, args.warmup, args.connections, script, client_cpus)
    for t in targets:
        t.counted_after = time.time()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {t.key: [] for t in targets if runs_for(s, t)} for s in args.scenario_list
    }
    for rnd in range(args.rounds):
        k = rnd % len(targets)
        order = targets[k:] + targets[:k]
        for scen in args.scenario_list:
            path, conns, _label = SCENARIOS[scen]
            for t in order:
                if not runs_for(scen, t):
                    continue
                if t.workers > 1:  # the previous run's requests per worker, by now published
                    settle_requests(t)
                r = measure(
                    ps, t, path, upstream.pid, args.duration, conns or args.connections,
                    script, client_cpus,
                )  # fmt: skip
                r["round"] = rnd + 1
                if t.workers > 1 and "workers" in r:
                    t.awaiting, t.counted_after = r, time.time()
                raw[scen][t.key].append(r)
                share = ""
                if "workers" in r:
                    share = "  workers: connections " + " / ".join(
                        str(w["connections"]) for w in r["workers"].values()
                    )
                print(
                    f"bench: round {rnd + 1}/{args.rounds} {scen:<5} {t.label:<28} "
                    f"{r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms  "
                    f"cpu {r.get('cpu_us_per_req', '-')} µs/req  "
                    f"errors {r['non_2xx_3xx'] + sum(r['socket_errors'].values())}{share}",
                    flush=True,
                )
                time.sleep(0.3)
    for t in targets:
        if t.awaiting is not None:
            settle_requests(t)
    return raw


def summarize_workers(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per worker, the medians of its connections, request share and CPU share; it took its
    share if, in every round, it held and served at least half of an even split."""
    slots = sorted({s for r in rounds for s in r["workers"]})
    out: dict[str, Any] = {}
    for k in ("connections", "request_share", "cpu_share"):
        out[f"{k}_median"] = {
            s: median_or_none(r["workers"].get(s, {}).get(k) for r in rounds) for s in slots
        }
    lowest: dict[str, float | None] = {}
    for k in ("connections", "request_share"):
        shares = []
        for r in rounds:
            vals = [r["workers"].get(s, {}).get(k) for s in slots]
            if all(v is not None for v in vals):
                total = sum(vals) or 1
                shares += [v / total for v in vals]
        lowest[k] = round(min(shares), 3) if shares else None
    out["lowest_share_any_round"] = lowest
    even = 1 / len(slots)
    known = [v for v in lowest.values() if v is not None]
    out["took_its_share"] = bool(known) and all(v >= even / 2 for v in known)
    return out


def summarize_proxies(
    raw: dict[str, dict[str, list[dict[str, Any]]]], targets: list[Target]
) -> dict[str, Any]:
    labels = {t.key: t.label for t in targets}
    summary: dict[str, Any] = {}
    for scen, per_target in raw.items():
        nginx = {r["round"]: r for r in per_target.get("nginx", [])}
        direct = {r["round"]: r for r in per_target.get("upstream", [])}
        s: dict[str, Any] = {}
        for key, rounds in per_target.items():
            e: dict[str, Any] = {"label": labels[key]}
            for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_util"):
                e[k] = median_or_none(r.get(k) for r in rounds)
            e["upstream_cpu_us_per_req"] = median_or_none(
                r["upstream_cpu_us_per_req"] for r in rounds
            )
            e["errors_total"] = sum(
                r["non_2xx_3xx"] + sum(r["socket_errors"].values()) for r in rounds
            )
            if key != "upstream":
                ratios = [
                    r["cpu_us_per_req"] / nginx[r["round"]]["cpu_us_per_req"]
                    for r in rounds
                    if nginx.get(r["round"], {}).get("cpu_us_per_req")
                ]
                e["cpu_ratio_vs_nginx"] = median_or_none(ratios, 2)
                e["cpu_ratio_vs_nginx_rounds"] = [round(x, 2) for x in ratios]
                if SCENARIOS[scen][1] == 1:  # c=1: latency added over the direct upstream
                    for q in ("p50", "p99"):
                        added = [
                            r[f"{q}_ms"] - direct[r["round"]][f"{q}_ms"]
                            for r in rounds
                            if r["round"] in direct
                        ]
                        e[f"added_{q}_ms"] = median_or_none(added)
                        e[f"added_{q}_ms_rounds"] = [round(x, 3) for x in added]
            if rounds and "workers" in rounds[0]:
                e["workers"] = summarize_workers(rounds)
            s[key] = e
        summary[scen] = s
    return summary


# --------------------------------------------------------------------------- phase 2: in-process


class _LoopThread:
    """An asyncio loop in a daemon thread, for the fake hub and OTLP receiver the official
    clients report to (they must answer while the main thread drives wrk)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Fakes:
    """Fake hubs and OTLP receivers (tests.support), started in a loop thread of their
    own; `started` holds them in order. `stop()` after the processes reporting to them
    have stopped, or their final syncs log failures."""

    def __init__(self, *fakes: Any) -> None:
        self._loop = _LoopThread()
        self.started: list[Any] = []
        try:
            for fake in fakes:
                self.started.append(self._loop.run(fake.start()))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for fake in reversed(self.started):
            with contextlib.suppress(Exception):
                self._loop.run(fake.stop(), timeout=10)
        self._loop.close()


def _venv1_apitally(python: Path) -> str | None:
    with contextlib.suppress(Exception):
        r = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('apitally'))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0:
            return r.stdout.strip()
    return None


def inprocess_phase(
    ps: ProcessSet,
    args: argparse.Namespace,
    tmp: Path,
    proxy_cpus: list[int] | None,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    """bench_inprocess.py's comparison, run here: its app processes, our process control."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_inprocess as bip  # also puts ROOT on sys.path, for tests.support

    workdir = tmp / "inprocess"
    workdir.mkdir()
    script = workdir / "inprocess.lua"
    script.write_text(headers_lua(bip.HEADERS))
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("apitally") is None:
        skipped["official_0_25"] = f"apitally (0.25.1) is not installed in {sys.executable}"
    v1 = _venv1_apitally(bip.VENV1) if bip.VENV1.exists() else None
    if v1 is None:
        skipped["official_1_0"] = (
            f"{bip.VENV1.relative_to(ROOT)} missing or without apitally "
            "(scripts/test creates it from tests/requirements-apitally1.txt)"
        )
    started: list[tuple[subprocess.Popen[Any], str]] = []
    fakes: _Fakes | None = None
    try:
        fakes = _Fakes(bip.FakeHub(), bip.FakeOtlp())
        hub, otlp = fakes.started
        # mode -> (pid measured, url driven, pid of the app behind it or None, label)
        modes: dict[str, tuple[int, str, int | None, str]] = {}
        plain_spec = bip.app_process(sys.executable, {})
        plain = start_app(ps, "app-plain", plain_spec, workdir, proxy_cpus)
        started.append((plain, "app-plain"))
        modes["plain"] = (plain.pid, plain_spec.url, None, "plain app")
        # The proxy exports as the clients do, to the same fakes, at its default sync
        # interval: to the hub like 0.25.1 (every server), over OTLP like 1.0.0 (lean).
        exports = {
            "hub": {
                "APITALLY_CLIENT_ID": "00000000-0000-0000-0000-000000005678",
                "APITALLY_ENV": "bench",
                "APITALLY_HUB_BASE_URL": hub.url,
            },
            "otlp": {
                "APITALLY_WRITE_TOKEN": "apt_" + "c" * 24,
                "APITALLY_OTLP_ENDPOINT": otlp.url,
                "APITALLY_ENV": "bench",
            },
        }
        for server in args.servers:
            for export in ("hub", "otlp") if server == "lean" else ("hub",):
                port, admin_port = free_ports(2)
                label = f"apitally-proxy ({server}, 1w, {'OTLP' if export == 'otlp' else export})"
                p = start_apitally(
                    ps, workdir / f"proxy-{server}-{export}", port, admin_port, plain_spec.port,
                    proxy_cpus, server=server, name=label, sync_interval=None,
                    export=exports[export],
                )  # fmt: skip
                started.append((p, label))
                key = f"proxy:{server}" + ("" if export == "hub" else f"-{export}")
                modes[key] = (p.pid, f"http://{HOST}:{port}", plain.pid, label)
        # The reference: what nginx costs in front of the same app at the same pace (the
        # low-load costs, wake-ups and context switches, are the kernel's for any proxy).
        ng_port = free_ports(1)[0]
        ng_dir = workdir / "nginx"
        ng_conf = nginx_proxy_conf(ng_dir, ng_port, plain_spec.port)
        ng = start_nginx(ps, "nginx-app", ng_dir, ng_conf, ng_port, proxy_cpus)
        started.append((ng, "nginx-app"))
        modes["proxy:nginx"] = (ng.pid, f"http://{HOST}:{ng_port}", plain.pid, "nginx (reference)")
        official = {
            "official_0_25": (
                sys.executable,
                {
                    "PARITY_MODE": "official",
                    "APITALLY_CLIENT_ID": "00000000-0000-0000-0000-000000001234",
                    "APITALLY_ENV": "bench",
                    "APITALLY_HUB_BASE_URL": hub.url,
                },
                "apitally 0.25.1 middleware",
            ),
            "official_1_0": (
                str(bip.VENV1),
                {
                    "PARITY_MODE": "official1",
                    "APITALLY_WRITE_TOKEN": "apt_" + "b" * 24,
                    "APITALLY_OTLP_ENDPOINT": otlp.url,
                    "APITALLY_ENV": "bench",
                },
                f"apitally {v1 or '1.x'} init",
            ),
        }
        for mode, (python, env, label) in official.items():
            if mode in skipped:
                continue
            spec = bip.app_process(python, env)
            try:
                p = start_app(ps, f"app-{mode}", spec, workdir, proxy_cpus)
            except RuntimeError as exc:
                skipped[mode] = f"did not start: {str(exc).splitlines()[0]}"
                continue
            started.append((p, f"app-{mode}"))
            modes[mode] = (p.pid, spec.url, None, label)
        for mode, reason in skipped.items():
            print(f"bench: in-process: skipping {mode}: {reason}", file=sys.stderr, flush=True)

        names = list(modes)
        conns = args.inprocess_connections
        for name in names:  # warm-up: imports, first syncs, caches
            run_wrk(ps, modes[name][1] + bip.PATH, 2, conns, script, client_cpus)
        rounds: list[dict[str, Any]] = []
        for rnd in range(args.inprocess_rounds):
            k = rnd % len(names)
            row: dict[str, Any] = {"round": rnd + 1}
            for name in names[k:] + names[:k]:
                pid, url, behind, _label = modes[name]
                before = cpu_seconds(pid)
                behind_before = cpu_seconds(behind) if behind else 0.0
                res = run_wrk(ps, url + bip.PATH, args.inprocess_duration, conns, script,
                              client_cpus)  # fmt: skip
                n = max(res["requests"], 1)
                entry = {
                    "cpu_us_per_req": round((cpu_seconds(pid) - before) / n * 1e6, 2),
                    "rps": round(res["rps"], 1),
                    "requests": res["requests"],
                    "errors": res["errors_total"],
                }
                if behind:
                    entry["app_cpu_us_per_req"] = round(
                        (cpu_seconds(behind) - behind_before) / n * 1e6, 2
                    )
                row[name] = entry
                time.sleep(0.3)
            rounds.append(row)
            print(
                f"bench: in-process round {rnd + 1}/{args.inprocess_rounds}: "
                + ", ".join(f"{m} {row[m]['cpu_us_per_req']:.1f} µs/req" for m in names),
                flush=True,
            )
    finally:
        for p, name in reversed(started):
            ps.close(p, name)
        if fakes is not None:
            fakes.stop()
    return summarize_inprocess(rounds, modes, skipped, args, bip.PATH, v1)


def summarize_inprocess(
    rounds: list[dict[str, Any]],
    modes: dict[str, tuple[int, str, int | None, str]],
    skipped: dict[str, str],
    args: argparse.Namespace,
    path: str,
    v1: str | None,
) -> dict[str, Any]:
    med = {
        m: {
            "label": modes[m][3],
            "cpu_us_per_req": median_or_none((r[m]["cpu_us_per_req"] for r in rounds), 1),
            "rps": median_or_none((r[m]["rps"] for r in rounds), 0),
            "errors_total": sum(r[m]["errors"] for r in rounds),
        }
        for m in modes
    }
    for m in modes:
        if m.startswith("proxy:"):
            med[m]["app_behind_cpu_us_per_req"] = median_or_none(
                (r[m]["app_cpu_us_per_req"] for r in rounds), 1
            )
    added: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for client in ("official_0_25", "official_1_0"):
        if client not in modes:
            continue
        per_round = [r[client]["cpu_us_per_req"] - r["plain"]["cpu_us_per_req"] for r in rounds]
        added[client] = {
            "median_us": median_or_none(per_round, 1),
            "rounds_us": [round(x, 1) for x in per_round],
        }
        for m in modes:
            if not m.startswith("proxy:"):
                continue
            rr = [
                r[m]["cpu_us_per_req"]
                / (r[client]["cpu_us_per_req"] - r["plain"]["cpu_us_per_req"])
                if r[client]["cpu_us_per_req"] > r["plain"]["cpu_us_per_req"]
                else None
                for r in rounds
            ]
            ratios[f"{m} / {client}"] = {
                "median": median_or_none(rr, 2),
                "rounds": [None if x is None else round(x, 2) for x in rr],
                "rounds_without_added_cpu": sum(1 for x in rr if x is None),
            }
    return {
        "params": {
            "app": "tests/apps/parity_starlette_app.py under uvicorn (bench_inprocess.app_process)",
            "path": path,
            "connections": args.inprocess_connections,
            "duration_s": args.inprocess_duration,
            "rounds": args.inprocess_rounds,
            "apitally_1_venv_version": v1,
            "uvicorn": _version("uvicorn"),
            "starlette": _version("starlette"),
        },
        "median": med,
        "client_adds_us_per_req": added,
        "proxy_over_client_added": ratios,
        "skipped": skipped,
        "rounds": rounds,
    }


# --------------------------------------------------------------------------- phase 3: memory


def _rss_snapshot(procs: dict[str, Any], label: str, requests: int) -> dict[str, Any]:
    rss: dict[str, float | None] = {}
    for slot, p in procs.items():
        try:
            rss[slot] = round(p.memory_info().rss / 2**20, 1)
        except Exception:
            rss[slot] = None
    return {"at": label, "requests": requests, "rss_mb": rss}


def _per_worker_requests(state: Path, merged_total: int | None) -> dict[str, int | None]:
    """Requests each worker counted: slot>0 from the status files they publish, worker 0
    from the merged total minus those."""
    out: dict[str, int | None] = {}
    for f in sorted(state.rglob("slot-*.status.json")):
        with contextlib.suppress(OSError, ValueError):
            out[f.name.split(".")[0].removeprefix("slot-")] = json.loads(f.read_bytes()).get(
                "requests_total"
            )
    if merged_total is not None:
        out["0"] = merged_total - sum(v or 0 for v in out.values())
    return dict(sorted(out.items()))


def memory_phase(
    ps: ProcessSet,
    args: argparse.Namespace,
    tmp: Path,
    upstream_port: int,
    proxy_cpus: list[int] | None,
    client_cpus: list[int] | None,
) -> dict[str, Any]:
    server, workers = args.memory_server, args.memory_workers
    otlp_mode = args.memory_export == "otlp"
    label = f"apitally-proxy ({server}, {workers}w{', OTLP' if otlp_mode else ''})"
    workdir = tmp / "memory"
    workdir.mkdir()
    script = workdir / "memory.lua"
    script.write_text(WRK_MEMORY_LUA)
    port, admin_port = free_ports(2)
    admin = f"http://{HOST}:{admin_port}"
    fakes: _Fakes | None = None
    p: subprocess.Popen[Any] | None = None
    try:
        export = None
        if otlp_mode:
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from tests.support.fake_otlp import FakeOtlp

            fakes = _Fakes(FakeOtlp())
            export = {
                "APITALLY_WRITE_TOKEN": "apt_" + "d" * 24,
                "APITALLY_OTLP_ENDPOINT": fakes.started[0].url,
            }
        p = start_apitally(
            ps, workdir, port, admin_port, upstream_port, proxy_cpus,
            workers=workers, server=server, name=f"{label} memory",
            sync_interval=args.memory_sync_interval, export=export,
        )  # fmt: skip
        procs = worker_procs(p.pid, workers)
        time.sleep(1.5)  # let the first sync cycle run
        snaps = [_rss_snapshot(procs, "at rest", 0)]
        n = args.requests_for_memory
        chunks = max(1, min(args.memory_checkpoints, n))
        per_chunk_timeout = max(10, args.memory_timeout // chunks)
        sent = rps_weighted = errors = 0
        started = time.monotonic()
        reached = True
        for i in range(chunks):
            want = n // chunks + (n % chunks if i == chunks - 1 else 0)
            marker = workdir / f"memory-{i}.done"
            seed = str((int(time.time() * 1000) + 7919 * i) % 2_000_000_000)
            res = run_wrk(
                ps, f"http://{HOST}:{port}/", per_chunk_timeout, args.connections, script,
                client_cpus, [str(want), str(marker), seed], marker,
            )  # fmt: skip
            sent += res["requests"]
            rps_weighted += res["rps"] * res["requests"]
            errors += res["errors_total"]
            reached = reached and res["requests"] >= want
            snaps.append(_rss_snapshot(procs, f"{sent:,} requests", sent))
            print(
                f"bench: memory {sent:,}/{n:,} requests, {res['rps']:,.0f} req/s, RSS MB "
                + ", ".join(f"{s} {v}" for s, v in snaps[-1]["rss_mb"].items()),
                flush=True,
            )
        elapsed = time.monotonic() - started
        time.sleep(2.5)  # sync cycles flush to the spool; the workers publish their status
        snaps.append(_rss_snapshot(procs, "2.5 s later", sent))
        status = get_json(admin + "/status.json")
        per_worker_requests = _per_worker_requests(workdir / "state", status.get("requests_total"))
    finally:
        if p is not None:
            ps.close(p, f"{label} memory")
        if fakes is not None:
            fakes.stop()
    rest, end = snaps[0]["rss_mb"], snaps[-2]["rss_mb"]
    mid = min(snaps[1:-1], key=lambda s: abs(s["requests"] - sent / 2))["rss_mb"]
    growth = {
        slot: {
            "total_mb": round(end[slot] - rest[slot], 1),
            "second_half_mb": round(end[slot] - mid[slot], 1) if chunks > 1 else None,
        }
        for slot in rest
        if rest[slot] is not None and end.get(slot) is not None and mid.get(slot) is not None
    }
    return {
        "target": label,
        "sync_interval_s": args.memory_sync_interval,
        "export": args.memory_export,
        "requests_target": n,
        "requests_sent": sent,
        "reached_target": reached,
        "seconds": round(elapsed, 1),
        "rps": round(rps_weighted / sent, 1) if sent else None,
        "errors": errors,
        "snapshots": snaps,
        "growth": growth,
        "requests_per_worker": per_worker_requests,
        "proxy_status": {
            k: status.get(k)
            for k in (
                "requests_total",
                "requests_by_status",
                "unmatched",
                "route_overflow",
                "consumer_overflow",
                "histogram_overflow",
                "validation_error_overflow",
                "upstream_errors",
                "upstream_retries",
                "workers_reporting",
            )
        },
    }


# --------------------------------------------------------------------------- report


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(v: Any, nd: int = 1, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{suffix}"
    return f"{v:,}{suffix}" if isinstance(v, int) else str(v)


def print_details(result: dict[str, Any]) -> None:
    """Plain-text tables of everything measured in the proxies phase."""
    p = result["params"]
    for scen, s in result["proxies"].items():
        path, conns, label = SCENARIOS[scen]
        print(f"\n== {label}: GET {path}, {conns or p['connections']} connection(s), medians")
        hdr = (
            f"{'target':<28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}"
            f"{'x nginx':>9}{'util':>7}{'errors':>8}  ratio per round"
        )
        print(hdr)
        print("-" * len(hdr))
        for e in s.values():
            print(
                f"{e['label']:<28}{fmt(e['rps'], 0):>9}{fmt(e['p50_ms'], 3):>9}"
                f"{fmt(e['p99_ms'], 3):>9}{fmt(e['cpu_us_per_req'], 1):>12}"
                f"{fmt(e.get('cpu_ratio_vs_nginx'), 2):>9}{fmt(e['cpu_util'], 2):>7}"
                f"{e['errors_total']:>8}  {e.get('cpu_ratio_vs_nginx_rounds', '')}"
            )


def _md_header(result: dict[str, Any]) -> list[str]:
    v, p = result["versions"], result["params"]
    load = result["load_average"]
    return [
        f"`{result['command']}`",
        "",
        f"{result['date']}; git {v['git']}; {v['cpus']} CPUs, {p['pinning']}; "
        f"load average (1/5/15 min) {load['start']} at start, {load['end']} at the end; "
        f"apitally-proxy {v['apitally-proxy']}, Python {v['python']}, aiohttp {v['aiohttp']}, "
        f"uvloop {v['uvloop']}, {v['nginx'].replace('nginx version: ', '')}, "
        f"wrk {v['wrk'].split(' ')[1] if ' ' in v['wrk'] else v['wrk']}; "
        + (
            f"{plural(p['rounds'], 'round')} x {p['duration_s']} s, wrk -t1, "
            f"{p['connections']} connections unless c=1; "
            if result.get("proxies")
            else ""
        )
        + "every ratio is taken per round, then the median of the rounds.",
    ]


def _md_proxies(result: dict[str, Any]) -> list[str]:
    summary = result["proxies"]
    scens = list(summary)
    keys: list[str] = []
    for s in scens:
        keys += [k for k in summary[s] if k not in keys and k != "upstream"]
    head = ["target"]
    for s in scens:
        label = SCENARIOS[s][2]
        head += [f"{label} µs/req", "x nginx"]
    c1 = [s for s in scens if SCENARIOS[s][1] == 1]
    if c1:
        head += ["c=1 added p50", "c=1 added p99"]
    lines = [
        "CPU per request (µs, the target's whole process tree) and its ratio to nginx's:",
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
    ]
    for key in keys:
        label = next(summary[s][key]["label"] for s in scens if key in summary[s])
        row = [label]
        for s in scens:
            e = summary[s].get(key)
            if e is None:
                row += ["n/a", ""]
                continue
            ratio = 1.0 if key == "nginx" else e.get("cpu_ratio_vs_nginx")
            row += [fmt(e["cpu_us_per_req"], 1), fmt(ratio, 2, "x")]
        if c1:
            e = summary[c1[0]].get(key)
            row += (
                [fmt(e.get("added_p50_ms"), 3, " ms"), fmt(e.get("added_p99_ms"), 3, " ms")]
                if e
                else ["n/a", "n/a"]
            )
        lines.append("| " + " | ".join(row) + " |")
    rps = "; ".join(
        f"{SCENARIOS[s][2]}: "
        + ", ".join(f"{e['label']} {fmt(e['rps'], 0)}" for e in summary[s].values())
        for s in scens
    )
    lines += ["", f"Requests/s (median; with pinning the proxies get one core): {rps}."]
    if c1:
        lines.append(
            "c=1 added = the target's p50/p99 minus the direct upstream's in the same round. "
            "Multi-worker proxies are not run at c=1 (one connection reaches one worker)."
        )
    errors = sum(e["errors_total"] for s in scens for e in summary[s].values())
    lines.append(f"wrk errors (non-2xx, socket) over all runs: {errors}.")
    return lines


def _md_workers(result: dict[str, Any]) -> list[str]:
    def per_worker(values: dict[str, Any], pct: bool) -> str:
        return " / ".join(
            fmt(v * 100 if pct and v is not None else v, 0, " %" if pct else "")
            for _, v in sorted(values.items())
        )

    rows = []
    for scen, s in result["proxies"].items():
        for e in s.values():
            w = e.get("workers")
            if not w:
                continue
            low = w["lowest_share_any_round"]
            rows.append(
                f"| {e['label']} | {SCENARIOS[scen][2]} "
                f"| {per_worker(w['connections_median'], False)} "
                f"| {per_worker(w['request_share_median'], True)} "
                f"| {per_worker(w['cpu_share_median'], True)} "
                f"| {fmt(low['connections'] and low['connections'] * 100, 0, ' %')} / "
                f"{fmt(low['request_share'] and low['request_share'] * 100, 0, ' %')} "
                f"| {'yes' if w['took_its_share'] else '**no**'} |"
            )
    if not rows:
        return []
    return [
        "Workers (SO_REUSEPORT), medians: client connections each worker held mid-run, its "
        "share of the requests (the proxy's own per-worker counts) and of the CPU time. A "
        "worker took its share if it never held or served less than half an even split:",
        "",
        "| target | scenario | connections per worker | requests per worker "
        "| CPU per worker | lowest connection / request share | took its share |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *rows,
    ]


def _md_inprocess(ip: dict[str, Any]) -> list[str]:
    med, added, ratios = ip["median"], ip["client_adds_us_per_req"], ip["proxy_over_client_added"]
    pp = ip["params"]
    lines = [
        "Against the official in-process clients: the Starlette parity app "
        f"(starlette {pp['starlette']}) under uvicorn {pp['uvicorn']}, "
        f"`GET {pp['path']}` with a consumer's key, {pp['connections']} connections, "
        f"{plural(pp['rounds'], 'round')} x {pp['duration_s']} s, modes interleaved; "
        "what a client adds is its app's CPU minus the plain app's in the same round:",
        "",
        "| app | app CPU µs/req | added by the client (µs/req) |",
        "| --- | ---: | ---: |",
        f"| plain | {fmt(med['plain']['cpu_us_per_req'], 1)} | - |",
    ]
    for client in ("official_0_25", "official_1_0"):
        if client in med:
            lines.append(
                f"| {med[client]['label']} | {fmt(med[client]['cpu_us_per_req'], 1)} | "
                f"{fmt(added[client]['median_us'], 1)} |"
            )
        else:
            lines.append(f"| {client}: skipped ({ip['skipped'].get(client, '?')}) | - | - |")
    lines += [
        "",
        "| in front of the plain app | proxy CPU µs/req | ÷ 0.25.1's added | ÷ 1.0.0's added |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m, e in med.items():
        if not m.startswith("proxy:"):
            continue
        cells = []
        for client in ("official_0_25", "official_1_0"):
            r = ratios.get(f"{m} / {client}")
            if r is None:
                cells.append("skipped")
                continue
            note = (
                f" ({r['rounds_without_added_cpu']} round(s) without added CPU left out)"
                if r["rounds_without_added_cpu"]
                else ""
            )
            cells.append(fmt(r["median"], 2, "x") + note)
        lines.append(
            f"| {e['label']} | {fmt(e['cpu_us_per_req'], 1)} | " + " | ".join(cells) + " |"
        )
    return lines


def _md_memory(m: dict[str, Any]) -> list[str]:
    snaps = m["snapshots"]
    slots = list(snaps[0]["rss_mb"])
    head = ["process", *[s["at"] for s in snaps], "growth, 2nd half"]
    lines = [
        f"Memory: {m['target']}, freshly started; RSS (MB) at rest and after "
        f"{m['requests_sent']:,} requests with hostile cardinality (random ids, random path "
        f"segments and queries, up to a million consumers), {m['seconds']} s at "
        f"{fmt(m['rps'], 0)} req/s, syncing every {m.get('sync_interval_s', 1):g} s:",
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
    ]
    for slot in slots:
        name = slot if slot == "supervisor" else f"worker {slot}"
        g = m["growth"].get(slot, {})
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(s["rss_mb"].get(slot), 1) for s in snaps)
            + f" | {fmt(g.get('second_half_mb'), 1, ' MB')} |"
        )
    st = m["proxy_status"]
    lines += [
        "",
        "Requests per worker: "
        + ", ".join(f"worker {k} {fmt(v, 0)}" for k, v in m["requests_per_worker"].items())
        + "; target reached: "
        f"{'yes' if m['reached_target'] else 'no'}; wrk errors {m['errors']}; the proxy "
        f"counted {fmt(st.get('requests_total'), 0)} requests, unmatched "
        f"{fmt(st.get('unmatched'), 0)}, route overflow {fmt(st.get('route_overflow'), 0)}, "
        f"consumer overflow {fmt(st.get('consumer_overflow'), 0)}.",
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    parts = [_md_header(result)]
    if result.get("proxies"):
        parts.append(_md_proxies(result))
        parts.append(_md_workers(result))
    if result.get("inprocess"):
        parts.append(_md_inprocess(result["inprocess"]))
    if result.get("memory"):
        parts.append(_md_memory(result["memory"]))
    return "\n\n".join("\n".join(p) for p in parts if p)


# --------------------------------------------------------------------------- main


def _csv(value: str, allowed: Iterable[str] | None, what: str) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)}")
    if not items:
        raise argparse.ArgumentTypeError(f"no {what} given")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    add("--rounds", type=int, default=3, help="interleaved rounds, medians (default 3)")
    add("--connections", type=int, default=50, help="wrk connections, saturating runs (50)")
    add("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    add("--server", default=",".join(SERVERS), help="apitally-proxy servers (lean,aiohttp)")
    add("--workers", default="1,2", help="apitally-proxy worker counts (default 1,2)")
    add("--warmup", type=int, default=1, help="seconds of warm-up per target and body (1)")
    add("--no-proxies", action="store_true", help="skip phase 1 (nginx vs apitally-proxy)")
    add("--no-inprocess", action="store_true", help="skip phase 2 (official clients)")
    add("--inprocess-duration", type=int, help="seconds per in-process run (--duration)")
    add("--inprocess-rounds", type=int, help="in-process rounds (--rounds)")
    add("--inprocess-connections", type=int, default=8, help="in-process wrk connections (8)")
    add(
        "--requests-for-memory",
        type=int,
        default=1_000_000,
        help="requests for the RSS measurement (default 1000000; 0 skips)",
    )
    add("--memory-checkpoints", type=int, default=4, help="RSS readings during it (4)")
    add("--memory-timeout", type=int, default=900, help="upper bound, seconds (900)")
    add("--memory-server", help="server for the memory run (first of --server)")
    add("--memory-workers", type=int, help="workers for the memory run (largest of --workers)")
    add(
        "--memory-sync-interval",
        type=float,
        default=1.0,
        help="the memory run's --sync-interval, seconds (default 1; the proxy's own "
        "default is 10 for the first hour)",
    )
    add(
        "--memory-export",
        choices=("local", "otlp"),
        default="local",
        help="the memory run's mode: local (default) or OTLP export to a fake receiver",
    )
    add("--no-pin", action="store_true", help="no CPU pinning (proxies / wrk+upstream)")
    add("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    add("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    try:
        args.scenario_list = _csv(args.scenarios, SCENARIOS, "scenario")
        args.servers = _csv(args.server, SERVERS, "server")
        args.worker_counts = sorted({int(w) for w in _csv(args.workers, None, "worker count")})
    except (argparse.ArgumentTypeError, ValueError) as exc:
        ap.error(str(exc))
    if args.duration < 1 or args.rounds < 1 or min(args.worker_counts) < 1:
        ap.error("--duration, --rounds and --workers must be >= 1")
    args.inprocess_duration = args.inprocess_duration or args.duration
    args.inprocess_rounds = args.inprocess_rounds or args.rounds
    args.memory_server = args.memory_server or args.servers[0]
    if args.memory_server not in SERVERS:
        ap.error(f"--memory-server must be one of {', '.join(SERVERS)}")
    args.memory_workers = args.memory_workers or max(args.worker_counts)
    if args.memory_sync_interval <= 0:
        ap.error("--memory-sync-interval must be > 0")
    return args


def _command_line(argv: list[str] | None) -> str:
    python = sys.executable
    with contextlib.suppress(ValueError):
        python = os.path.relpath(sys.executable, Path.cwd())
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return shlex.join([python, script, *(sys.argv[1:] if argv is None else argv)])


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _log_problems(logs: Iterable[Path]) -> list[str]:
    out = []
    for path in logs:
        with contextlib.suppress(OSError):
            for ln in path.read_text(errors="replace").splitlines():
                if EXPECTED_WARNING in ln:
                    continue
                if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln:
                    out.append(f"{path.parent.name}: {ln}")
    return out


def _install_signal_handlers() -> None:
    # Ctrl-C / SIGTERM / SIGHUP: unwind through `finally`, which tears everything down.
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def run(args: argparse.Namespace, argv: list[str] | None, ps: ProcessSet, tmp: Path) -> int:
    proxy_cpus, client_cpus = pick_cpus(not args.no_pin)
    started = time.monotonic()
    result: dict[str, Any] = {
        "command": _command_line(argv),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_average": {"start": _loadavg()},
        "versions": versions(),
        "params": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "servers": args.servers,
            "workers": args.worker_counts,
            "requests_for_memory": args.requests_for_memory,
            "memory_sync_interval_s": args.memory_sync_interval,
            "scenarios": {
                s: {
                    "path": SCENARIOS[s][0],
                    "connections": SCENARIOS[s][1] or args.connections,
                    "label": SCENARIOS[s][2],
                }
                for s in args.scenario_list
            },
            "pinning": f"proxies on cpu {proxy_cpus}, wrk + upstream on cpu {client_cpus}"
            if proxy_cpus
            else "no pinning",
            "wrk": "wrk -t1 --latency --timeout 5s",
        },
    }
    report_lua = tmp / "report.lua"
    report_lua.write_text(WRK_REPORT_LUA)
    upstream, targets = start_targets(
        ps, args, tmp, proxy_cpus, client_cpus, proxies=not args.no_proxies
    )
    if not args.no_proxies:
        sanity_check(targets)
        raw = proxies_phase(ps, args, upstream, targets, report_lua, client_cpus)
        result["proxies"] = summarize_proxies(raw, targets)
        result["proxies_rounds"] = raw
        result["rss_end_mb"] = {
            t.label: _rss_snapshot(t.procs, "end", 0)["rss_mb"] for t in targets if t.procs
        }
    problems = _log_problems(t.log for t in targets if t.log)
    for t in targets[1:]:  # free the proxy core for the next phases; keep the upstream
        proc = next((p for name, p, pid in ps.procs if pid == t.pid), None)
        if proc is not None:
            ps.close(proc, "nginx-proxy" if t.key == "nginx" else t.label)
    if not args.no_inprocess:
        print("bench: in-process clients vs apitally-proxy ...", flush=True)
        result["inprocess"] = inprocess_phase(ps, args, tmp, proxy_cpus, client_cpus)
        problems += _log_problems((tmp / "inprocess").glob("proxy-*/apitally-proxy.log"))
    if args.requests_for_memory > 0:
        print(
            f"bench: memory run, {args.requests_for_memory:,} requests through "
            f"apitally-proxy ({args.memory_server}, {args.memory_workers}w) ...",
            flush=True,
        )
        result["memory"] = memory_phase(ps, args, tmp, upstream.port, proxy_cpus, client_cpus)
        problems += _log_problems([tmp / "memory" / "apitally-proxy.log"])
    result["load_average"]["end"] = _loadavg()
    result["apitally_log_problem_count"] = len(problems)
    result["apitally_log_problems"] = problems[:20]
    result["elapsed_s"] = round(time.monotonic() - started, 1)

    if result.get("proxies"):
        print_details(result)
    if problems:
        print(f"\napitally-proxy logs: {len(problems)} warning/error lines, the first:")
        for line in problems[:5]:
            print("  " + line[:200])
    print("\n<!-- bench/run.py: begin (paste as is) -->")
    print(markdown(result))
    print("<!-- bench/run.py: end -->\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"bench: wrote {args.output} ({result['elapsed_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = check_prereqs()
    if problems:
        for p in problems:
            print("bench: " + p, file=sys.stderr)
        return 2
    _install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="apitally-bench-"))
    ps = ProcessSet()
    print(f"bench: temp dir {tmp}", flush=True)
    try:
        return run(args, argv, ps, tmp)
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
