"""End-to-end demo: the sample API behind the real proxy, in local mode.

Starts both as child processes on free local ports, sends real traffic through
the proxy, stops the proxy with SIGTERM (drain, final flush), then reads the
JSON lines the proxy wrote and prints what was metered. Exits non-zero when the
proxy metered a different number of requests than were sent.

With `--otlp` the proxy gets a (made-up) Apitally 1.x write token and exports
OpenTelemetry to a recording OTLP receiver the demo runs on loopback instead;
the summary is read from the decoded exports.

    python -m apitally_proxy.demo [--requests N] [--state-dir DIR] [--keep] [--otlp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from apitally_proxy.otlp.receiver import RecordingReceiver

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
CONCURRENCY = 16
SEED = 7
REVOKED_KEY = "demo-key-revoked"  # not in the app's key table: 401, no consumer
DEMO_WRITE_TOKEN = "apt_" + "demo" * 6  # the form of a write token; goes to loopback only

Row = Sequence[object]


class DemoError(Exception):
    """The demo could not run (a child failed to start, a request failed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Child:
    """A child process the demo owns: output goes to a log file, and it is always stopped."""

    def __init__(
        self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # The demo's traffic must never reach a real Apitally account, whatever the shell has.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APITALLY_", "OTEL_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                # Own session: a Ctrl-C in the terminal reaches the demo, which stops us in order.
                start_new_session=True,
            )

    async def wait_healthy(self, http: aiohttp.ClientSession, url: str, field: str) -> None:
        """Poll `url` until it answers 200 with JSON holding `field`; fail early on exit."""
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.returncode is not None:
                raise DemoError(f"{self.name} exited with {self.proc.returncode} at start-up")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    # Checking a field makes sure it is our child answering, not a port squatter.
                    if resp.status == 200 and field in await resp.json(content_type=None):
                        return
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name} was not healthy at {url} after {STARTUP_TIMEOUT} s")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL after `timeout`; returns the exit code (None if killed)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


# ---- the traffic -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One request to send, and the consumer the proxy should count it under."""

    method: str
    path: str
    headers: dict[str, str]
    consumer: str | None
    body: bytes | None = None


Shape = Callable[[random.Random], tuple[str, str, Any]]

# Paths the app has no route for: once the proxy knows the app's routes (from its
# OpenAPI document) these are not metered, as with the official clients.
NOT_ROUTES = frozenset({"/v2/items", "/favicon.ico", "/admin"})

# What callers do, weighted: (weight, shape) where shape gives (method, path, JSON body).
SHAPES: list[tuple[int, Shape]] = [
    (14, lambda r: ("GET", f"/items?limit={r.randint(5, 50)}", None)),
    (28, lambda r: ("GET", f"/items/{r.randint(1, 1000)}", None)),
    (4, lambda r: ("GET", f"/items/{r.randint(5000, 9999)}", None)),  # 404 from the handler
    (2, lambda r: ("GET", "/items/latest", None)),  # 422: item_id is not an integer
    (12, lambda r: ("POST", "/items", {"name": f"Widget {r.randint(1, 999)}", "price": 9.5})),
    (5, lambda r: ("POST", "/items", {"price": 3})),  # 422: "name" is missing
    (12, lambda r: ("GET", f"/users/{r.randint(1, 40)}/orders/{r.randint(100, 999)}", None)),
    (6, lambda r: ("GET", f"/reports/{r.randint(1, 500)}", None)),  # 20-80 ms
    (3, lambda r: ("GET", "/health", None)),
    (3, lambda r: ("GET", r.choice(sorted(NOT_ROUTES)), None)),  # 404: no such route
]
# Always in the mix (when --requests allows): a server error and some large bodies.
SPECIALS: list[tuple[str, str, Any]] = [
    ("GET", "/fail", None),
    ("GET", "/items?limit=1000", None),
    ("GET", "/items?limit=1000", None),
    ("POST", "/items", {"name": "Big one", "description": "x" * 50_000}),
]
# Who calls: (weight, request headers, consumer the app will name in its response).
CALLERS: list[tuple[int, dict[str, str], str | None]] = [
    (30, {"Authorization": "Bearer demo-key-acme"}, "acme"),
    (20, {"X-API-Key": "demo-key-globex"}, "globex"),
    (15, {"Authorization": "Bearer demo-key-initech"}, "initech"),
    (10, {"X-API-Key": "demo-key-mueller"}, "mueller"),
    (22, {}, None),  # anonymous
    (3, {"X-API-Key": REVOKED_KEY}, None),
]


def build_plan(n: int, rng: random.Random) -> list[Call]:
    """A reproducible mix of `n` requests."""
    shapes = [
        shape(rng) for shape in rng.choices([s for _, s in SHAPES], [w for w, _ in SHAPES], k=n)
    ]
    requests = (SPECIALS + shapes)[:n]
    calls = []
    for method, path, body in requests:
        _, headers, consumer = rng.choices(CALLERS, [w for w, _, _ in CALLERS])[0]
        headers = dict(headers)
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        calls.append(Call(method, path, headers, consumer, data))
    rng.shuffle(calls)
    return calls


@dataclass
class Sent:
    """What the client side saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    consumers: Counter[str | None] = field(default_factory=Counter)
    leaked_headers: int = 0  # responses that still carried X-Apitally-* headers
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


async def send_traffic(http: aiohttp.ClientSession, base_url: str, plan: list[Call]) -> Sent:
    """Send the plan through the proxy, CONCURRENCY requests at a time."""
    sent = Sent()
    calls = iter(plan)

    async def worker() -> None:
        for call in calls:  # shared iterator: each call is taken by exactly one worker
            url = base_url + call.path
            async with http.request(call.method, url, headers=call.headers, data=call.body) as resp:
                await resp.read()
            sent.statuses[resp.status] += 1
            if call.path not in NOT_ROUTES:
                sent.consumers[call.consumer] += 1
            if any(name.lower().startswith("x-apitally-") for name in resp.headers):
                sent.leaked_headers += 1

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as workers:
            for _ in range(CONCURRENCY):
                workers.create_task(worker())
    except* (aiohttp.ClientError, TimeoutError) as failed:
        exc = failed.exceptions[0]
        raise DemoError(f"a request through the proxy failed: {type(exc).__name__}: {exc}") from exc
    sent.seconds = time.monotonic() - started
    return sent


async def proxy_status(http: aiohttp.ClientSession, admin_url: str, expect: int) -> dict[str, Any]:
    """The proxy's /status.json once it has recorded `expect` requests (or after 5 s)."""
    deadline = time.monotonic() + 5.0
    while True:
        async with http.get(admin_url + "/status.json") as resp:
            status: dict[str, Any] = await resp.json()
        if status.get("requests_total", 0) >= expect or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


# ---- what was metered --------------------------------------------------------------------


@dataclass
class Endpoint:
    count: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    time_bins: Counter[int] = field(default_factory=Counter)  # 10 ms bins (lower bound, ms)
    time_sum_ms: float = 0.0  # OTLP: the duration histograms' sums

    @property
    def approx_mean_ms(self) -> float:
        """Mean from the bin midpoints (the hub only ever sees the bins), or from the
        OTLP histograms' exact sums."""
        if self.time_sum_ms:
            return self.time_sum_ms / self.count if self.count else 0.0
        n = sum(self.time_bins.values())
        return sum((b + 5) * k for b, k in self.time_bins.items()) / n if n else 0.0


@dataclass
class Metered:
    files: list[Path] = field(default_factory=list)
    startup_payloads: int = 0
    sync_payloads: int = 0
    endpoints: dict[tuple[str, str, int], Endpoint] = field(default_factory=dict)
    consumers: Counter[str | None] = field(default_factory=Counter)
    consumer_info: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # (method, path, loc, msg) -> count, from the app's 422 bodies
    validation_errors: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(e.count for e in self.endpoints.values())


def read_local_output(directory: Path, since: float) -> Metered:
    """Sum up the local-mode JSON lines written since `since` (older runs are skipped)."""
    metered = Metered()
    for path in sorted(directory.glob("*.jsonl*")):
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            record = orjson.loads(line)
            if record.get("written_at", 0) < since:
                continue
            if path not in metered.files:
                metered.files.append(path)
            payload = record["payload"]
            if record["kind"] == "startup":
                metered.startup_payloads += 1
                continue
            metered.sync_payloads += 1
            for row in payload.get("requests", []):
                key = (row["method"], row["path"], row["status_code"])
                endpoint = metered.endpoints.setdefault(key, Endpoint())
                endpoint.count += row["request_count"]
                endpoint.bytes_in += row["request_size_sum"]
                endpoint.bytes_out += row["response_size_sum"]
                endpoint.time_bins.update(
                    {int(b): n for b, n in row.get("response_times", {}).items()}
                )
                metered.consumers[row["consumer"]] += row["request_count"]
            for err in payload.get("validation_errors", []):
                error_key = (err["method"], err["path"], ".".join(map(str, err["loc"])), err["msg"])
                metered.validation_errors[error_key] += err["error_count"]
            for consumer in payload.get("consumers", []):
                metered.consumer_info[consumer["identifier"]] = (
                    consumer.get("name"),
                    consumer.get("group"),
                )
    return metered


def read_otlp_output(receiver: RecordingReceiver) -> Metered:
    """Sum up what the recording OTLP receiver decoded."""
    metered = Metered()
    metered.startup_payloads = len(receiver.events("apitally.app.startup"))
    metered.sync_payloads = len(receiver.accepted("metrics"))
    sizes = {
        name: receiver.buckets(name)
        for name in ("http.server.request.body.size", "http.server.response.body.size")
    }
    for key, d in receiver.buckets("http.server.request.duration").items():
        method, route, status, consumer = key
        endpoint = metered.endpoints.setdefault((method, route, status), Endpoint())
        endpoint.count += d["count"]
        endpoint.time_sum_ms += d["sum"] * 1000
        endpoint.bytes_in += int(sizes["http.server.request.body.size"].get(key, {}).get("sum", 0))
        endpoint.bytes_out += int(
            sizes["http.server.response.body.size"].get(key, {}).get("sum", 0)
        )
        metered.consumers[consumer] += d["count"]
    for e in receiver.events("apitally.request.validation_error"):
        loc = ".".join(part for part in (e["source"], e["field"]) if part)
        for c in e["counts"]:
            metered.validation_errors[(e["method"], e["path"], loc, e["message"])] += c["count"]
    for u in receiver.events("apitally.consumer.update"):
        metered.consumer_info[u["identifier"]] = (u.get("name"), u.get("group"))
    return metered


# ---- the summary -------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def table(headers: Row, rows: list[Row], right: set[int]) -> str:
    """A plain-text table; columns in `right` are right-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])])


def endpoint_table(metered: Metered) -> str:
    rows: list[Row] = []
    for (method, path, status), e in sorted(
        metered.endpoints.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])
    ):
        rows.append(
            (
                method,
                path,
                status,
                e.count,
                f"{e.approx_mean_ms:.0f}",
                human_bytes(e.bytes_in),
                human_bytes(e.bytes_out),
            )
        )
    return table(
        ("METHOD", "PATH", "STATUS", "REQUESTS", "~MS", "BYTES IN", "BYTES OUT"),
        rows,
        {2, 3, 4, 5, 6},
    )


def consumer_table(metered: Metered, sent: Sent) -> str:
    rows: list[Row] = []
    ids = set(metered.consumers) | set(sent.consumers)
    for ident in sorted(ids, key=lambda c: (c is None, c or "")):
        name, group = metered.consumer_info.get(ident, (None, None)) if ident else (None, None)
        rows.append(
            (
                ident or "(anonymous)",
                name or "-",
                group or "-",
                metered.consumers.get(ident, 0),
                sent.consumers.get(ident, 0),
            )
        )
    return table(("CONSUMER", "NAME", "GROUP", "METERED", "SENT"), rows, {3, 4})


def report(
    sent: Sent,
    metered: Metered,
    status: dict[str, Any],
    proxy_exit: int | None,
    otlp: bool = False,
) -> bool:
    """Print the summary; True when every check passed."""
    unmatched = int(status.get("unmatched", 0))
    print()
    print("Metered per endpoint (method, path template, status)")
    print(endpoint_table(metered))
    if otlp:
        print("  ~MS: mean response time from the exported duration histograms' sums")
    else:
        print("  ~MS: mean response time from the hub's 10 ms bins (under 10 ms shows as 5)")
    print()
    print("Metered per consumer (from the app's X-Apitally-Consumer* response headers)")
    print(consumer_table(metered, sent))
    print()
    if metered.validation_errors:
        print("Validation errors (read from the app's 422 response bodies)")
        rows: list[Row] = [
            (method, path, loc, msg, str(n))
            for (method, path, loc, msg), n in sorted(metered.validation_errors.items())
        ]
        print(table(("METHOD", "PATH", "LOC", "MSG", "COUNT"), rows, {4}))
        print()

    bytes_in = sum(e.bytes_in for e in metered.endpoints.values())
    bytes_out = sum(e.bytes_out for e in metered.endpoints.values())
    statuses = ", ".join(f"{code} x{n}" for code, n in sorted(sent.statuses.items()))
    print("Totals")
    print(f"  requests sent        {sent.total}  ({statuses})")
    print(f"  requests metered     {metered.total}")
    if unmatched:
        print(f"  matched no route     {unmatched}  (not metered by design)")
    print(f"  bytes in / out       {human_bytes(bytes_in)} / {human_bytes(bytes_out)}")
    if otlp:
        print(
            f"  exports received     {metered.startup_payloads} startup event(s), "
            f"{metered.sync_payloads} metrics exports (the heartbeat included)"
        )
    else:
        print(
            f"  payloads written     {metered.startup_payloads} startup, "
            f"{metered.sync_payloads} sync"
        )
    print()

    consumers_ok = all(
        metered.consumers.get(c, 0) == n for c, n in sent.consumers.items() if c is not None
    )
    checks = [
        (
            metered.total + unmatched == sent.total,
            "every request sent through the proxy was metered"
            + (" (or reported as matching no route)" if unmatched else ""),
        ),
        (consumers_ok, "every consumer was counted as the app named it"),
        (sent.leaked_headers == 0, "no X-Apitally-* header reached a client"),
        (proxy_exit == 0, f"the proxy exited 0 after SIGTERM (exit code: {proxy_exit})"),
    ]
    print("Checks")
    for ok, text in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    passed = all(ok for ok, _ in checks)
    verdict = "OK" if passed else "FAILED"
    print()
    print(f"RESULT: sent={sent.total} metered={metered.total} unmatched={unmatched} {verdict}")
    return passed


def print_log_tails(*children: Child) -> None:
    for child in children:
        tail = child.log_tail()
        if tail:
            print(f"  last lines of the {child.name} log ({child.log_path}):", file=sys.stderr)
            print(tail, file=sys.stderr)


# ---- the run -----------------------------------------------------------------------------


async def run(n: int, state_dir: Path, keep_note: str, otlp: bool = False) -> int:
    started = time.time()
    receiver: RecordingReceiver | None = None
    proxy_env: dict[str, str] = {}
    if otlp:
        receiver = await RecordingReceiver().start()
        proxy_env = {
            "APITALLY_WRITE_TOKEN": DEMO_WRITE_TOKEN,
            "APITALLY_OTLP_ENDPOINT": receiver.url,
            "APITALLY_ENV": "demo",
        }
    app_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    app_url, proxy_url = f"http://{HOST}:{app_port}", f"http://{HOST}:{proxy_port}"
    admin_url = f"http://{HOST}:{admin_port}"
    app = Child(
        "sample app",
        ["-m", "apitally_proxy.demo.sample_app", "--host", HOST, "--port", str(app_port)],
        state_dir / "sample_app.log",
    )
    proxy = Child(
        "proxy",
        [
            "-m", "apitally_proxy",
            "--upstream", app_url,
            "--listen", f"{HOST}:{proxy_port}",
            "--admin-listen", f"{HOST}:{admin_port}",
            "--state-dir", str(state_dir),
            "--sync-interval", "1",
        ],
        state_dir / "proxy.log",
        env=proxy_env,
    )  # fmt: skip
    if receiver is not None:
        print(
            "apitally-proxy demo (OpenTelemetry export to a recording OTLP receiver on "
            f"{receiver.url}: nothing leaves this machine)"
        )
    else:
        print("apitally-proxy demo (local mode: nothing leaves this machine)")
    print(f"  sample app   {app_url}   log: {app.log_path}")
    print(f"  proxy        {proxy_url} -> sample app, admin {admin_url}   log: {proxy.log_path}")
    print(f"  state dir    {state_dir}{keep_note}")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            await app.start()
            await app.wait_healthy(http, app_url + "/health", "status")
            await proxy.start()
            await proxy.wait_healthy(http, admin_url + "/health", "ready")

            plan = build_plan(n, random.Random(SEED))
            print(f"Sending {len(plan)} requests through the proxy, {CONCURRENCY} at a time ...")
            sent = await send_traffic(http, proxy_url, plan)
            rate = sent.total / max(sent.seconds, 1e-3)
            print(f"  done in {sent.seconds:.1f} s ({rate:.0f} requests/s)")
            status = await proxy_status(http, admin_url, sent.total)

        print("Stopping the proxy with SIGTERM (drain, final flush) ...")
        stop_started = time.monotonic()
        proxy_exit = await proxy.stop()
        print(f"  exited {proxy_exit} in {time.monotonic() - stop_started:.1f} s")
        await app.stop()

        if receiver is not None:
            metered = read_otlp_output(receiver)
            passed = report(sent, metered, status, proxy_exit, otlp=True)
        else:
            metered = read_local_output(state_dir / "local", since=started)
            passed = report(sent, metered, status, proxy_exit)
            for path in metered.files or [state_dir / "local"]:
                print(f"Local-mode JSON lines: {path}{keep_note}")
        if not passed:
            print_log_tails(proxy)
        return 0 if passed else 1
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        print_log_tails(proxy, app)
        return 2
    finally:
        # Whatever happened above, no child outlives the demo.
        await proxy.stop(timeout=5.0)
        await app.stop(timeout=5.0)
        if receiver is not None:
            await receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apitally_proxy.demo",
        description="Run a sample API behind apitally-proxy (local mode), send traffic, "
        "and show what was metered.",
    )
    parser.add_argument(
        "--requests", type=int, default=300, metavar="N", help="requests to send (default 300)"
    )
    parser.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="proxy state dir (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument(
        "--otlp",
        action="store_true",
        help="export OpenTelemetry (Apitally 1.x) to a recording receiver on loopback",
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    if args.state_dir is not None:
        state_dir, temporary = args.state_dir.resolve(), False
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"cannot use --state-dir {state_dir}: {exc.strerror or exc}")
    else:
        state_dir, temporary = Path(tempfile.mkdtemp(prefix="apitally-proxy-demo-")), True
    keep_note = "  (deleted at exit; --keep keeps it)" if temporary and not args.keep else ""

    try:
        return asyncio.run(
            _cancel_on_signals(run(args.requests, state_dir, keep_note, otlp=args.otlp))
        )
    finally:
        if temporary and not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)


async def _cancel_on_signals(coro: Coroutine[Any, Any, int]) -> int:
    """Run `coro`; SIGINT/SIGTERM cancel it, so its cleanup (stopping the children) still runs."""
    task = asyncio.ensure_future(coro)
    received: list[signal.Signals] = []

    def cancel(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        print(f"\n{received[0].name}: stopped", file=sys.stderr)
        return 128 + received[0].value


if __name__ == "__main__":
    raise SystemExit(main())
