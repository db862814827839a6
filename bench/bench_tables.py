"""Where a worker's long-lived memory goes under hostile cardinality, table by table.

Drives a Meter + RouteResolver + TemplateLearner wired as `server.Worker` wires them
(hub mode, no consumer_header, defaults for every cap) in-process with the traffic
shape of bench/run.py's memory phase (WRK_MEMORY_LUA: random ids, random literal
segments, random queries, up to a million consumers via X-Apitally-Consumer; the
upstream answers 200 to everything). Syncs are simulated every `--sync-every`
requests with `Meter.get_and_reset(serialized=True)`, as the hub sync does (10 s at
~2,500 req/s per worker of a 2-worker proxy is 25,000 requests).

Reports, at the end (and just before the last sync, i.e. with a full open interval):
deep `sys.getsizeof` totals per table (objects shared between tables counted once,
in the order listed), and tracemalloc's top allocation sites by file:line.

    .venv/bin/python bench/bench_tables.py --requests 500000 --sync-every 25000
    .venv/bin/python bench/bench_tables.py --time-record   # Meter.record µs/request
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, ".")

from apitally_proxy.metering.meter import Meter
from apitally_proxy.proxy import Exchange
from apitally_proxy.routes import RouteResolver

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMED = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


def traffic(rng: random.Random) -> Iterator[tuple[str, dict[str, str] | None]]:
    """(path without query, apitally response headers), as WRK_MEMORY_LUA sends them."""
    ri = rng.randint

    def word() -> str:
        return "".join(LETTERS[ri(0, 25)] for _ in range(ri(3, 10)))

    def hex8() -> str:
        return f"{ri(0, 2147483646):08x}"

    shapes: list[Callable[[], str]] = [
        lambda: f"/items/{ri(1, 1_000_000_000)}",
        lambda: f"/users/{ri(1, 10_000_000)}/orders/{ri(1, 10_000_000)}",
        lambda: f"/orders/{hex8()}{hex8()}",
        lambda: f"/{word()}/{word()}",
        lambda: f"/api/{word()}/{ri(1, 1_000_000)}/{word()}",
        lambda: f"/files/{hex8()}-{hex8()}/{word()}.json",
        lambda: "/search",  # ?q=…&page=…: the query is no part of Exchange.path
        lambda: "/health",
    ]
    while True:
        path = shapes[ri(0, len(shapes) - 1)]()
        r = rng.random()
        if r < 0.5:
            headers: dict[str, str] | None = {"x-apitally-consumer": f"user-{ri(1, 1_000_000)}"}
        elif r < 0.8:
            headers = {"x-apitally-consumer": NAMED[ri(0, len(NAMED) - 1)]}
        else:
            headers = None
        yield path, headers


def benign(rng: random.Random) -> Iterator[tuple[str, dict[str, str] | None]]:
    """A real API's shape: ids vary, routes do not (the learner's taught set never fills)."""
    ri = rng.randint
    shapes: list[Callable[[], str]] = [
        lambda: f"/items/{ri(1, 1_000_000_000)}",
        lambda: f"/users/{ri(1, 10_000)}/orders/{ri(1, 10_000_000)}",
        lambda: "/health",
        lambda: "/search",
    ]
    while True:
        yield shapes[ri(0, len(shapes) - 1)](), {"x-apitally-consumer": NAMED[ri(0, 7)]}


def exchanges(n: int, seed: int, shape: str = "hostile") -> Iterator[Exchange]:
    rng = random.Random(seed)
    gen = traffic(rng) if shape == "hostile" else benign(rng)
    for _ in range(n):
        path, headers = next(gen)
        ex = Exchange("GET", path)
        ex.status = 200
        ex.response_time = 0.0002 + rng.random() * 0.002
        ex.request_size = 0
        ex.response_size = 19
        ex.apitally_headers = headers
        yield ex


def make() -> tuple[Meter, RouteResolver]:
    routes = RouteResolver(1000)  # settings.max_templates_per_method's default
    meter = Meter(routes, max_consumers=10_000)
    return meter, routes


# --- deep sizes -------------------------------------------------------------

_ATOMS = (int, float, str, bytes, bool, type(None))


def deep_size(obj: Any, seen: set[int]) -> int:
    """sys.getsizeof of obj and everything it holds, skipping what `seen` has."""
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        i = id(o)
        if i in seen or o is None or isinstance(o, bool):
            continue
        if isinstance(o, int) and -5 <= o <= 256:
            continue  # the interpreter's cached small ints
        seen.add(i)
        total += sys.getsizeof(o)
        if isinstance(o, _ATOMS):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        else:
            for cls in type(o).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(o, name):
                        stack.append(getattr(o, name))
            d = getattr(o, "__dict__", None)
            if d is not None:
                stack.append(d)
    return total


def tables(meter: Meter, routes: RouteResolver) -> list[tuple[str, Any]]:
    req = meter.requests
    return [
        ("resolver._cache (raw path -> shaped)", routes._cache),
        ("resolver._mapped (shaped -> template)", routes._mapped),
        ("resolver._taught (hashes)", routes._taught),
        ("resolver._templates (per method)", routes._templates),
        ("resolver._renames", routes._renames),
        ("learner trie", routes.learner._root),
        ("requests._aggregates (open interval)", req._aggregates),
        ("requests._consumers (open interval)", req._consumers),
        ("consumers registry", (meter.consumers._known, meter.consumers._updated)),
        ("validation errors", meter.validation_errors.__dict__),
        ("prometheus histograms", meter.histograms._series),
        ("recent window slots", meter.recent._slots),
        ("recent window names", meter.recent.names),
        ("route overrides", meter.route_overrides._seen),
        ("status_counts", meter.status_counts),
    ]


def report_sizes(meter: Meter, routes: RouteResolver, title: str) -> dict[str, float]:
    gc.collect()
    seen: set[int] = set()
    out: dict[str, float] = {}
    print(f"\n{title}: deep sys.getsizeof per table, MB (shared objects counted once)")
    for name, obj in tables(meter, routes):
        mb = deep_size(obj, seen) / 2**20
        out[name] = mb
        extra = ""
        if isinstance(obj, dict | set):
            extra = f"  ({len(obj):,} entries)"
        print(f"  {mb:8.2f}  {name}{extra}")
    print(f"  {sum(out.values()):8.2f}  total")
    return out


def report_tracemalloc(snap: tracemalloc.Snapshot, base: tracemalloc.Snapshot, top: int) -> None:
    stats = snap.compare_to(base, "lineno")
    print(f"\ntracemalloc, growth since start by file:line (top {top}):")
    for s in stats[:top]:
        f = s.traceback[0]
        name = f.filename.split("/apitally_proxy/")[-1]
        print(f"  {s.size_diff / 2**20:8.2f} MB {s.count_diff:+9,d} blocks  {name}:{f.lineno}")
    total = sum(s.size_diff for s in stats)
    print(f"  {total / 2**20:8.2f} MB  total growth traced")


def run(args: argparse.Namespace) -> None:
    meter, routes = make()
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.take_snapshot()
    n = args.requests
    last_sync = (n // args.sync_every) * args.sync_every
    t0 = time.perf_counter()
    for i, ex in enumerate(exchanges(n, args.seed), 1):
        meter.record(ex)
        if i % args.sync_every == 0 and i != last_sync:
            meter.get_and_reset(serialized=True)
    elapsed = time.perf_counter() - t0
    print(f"{n:,} exchanges in {elapsed:.1f} s (tracemalloc on); syncs every {args.sync_every:,}")
    print(
        f"templates seen {routes.templates_seen:,}, overflow {routes.overflow:,}, "
        f"learned {routes.learner.learned}, learner nodes {routes.learner._nodes:,}, "
        f"taught {getattr(routes, 'taught', None) or len(routes._taught):,}, "
        f"consumer overflow {meter.requests.consumer_overflow:,}"
    )
    gc.collect()
    snap = tracemalloc.take_snapshot()
    report_tracemalloc(snap, base, args.top)
    report_sizes(meter, routes, "with the open interval full (just before a sync)")
    meter.get_and_reset(serialized=True)
    report_sizes(meter, routes, "just after the sync")
    tracemalloc.stop()


def time_record(args: argparse.Namespace) -> None:
    """Meter.record's cost per request over warm tables (best of --rounds)."""
    meter, _ = make()
    warm = list(exchanges(200_000, args.seed, args.shape))
    for ex in warm:
        meter.record(ex)
    meter.get_and_reset(serialized=True)
    batch = list(exchanges(args.sync_every, args.seed + 1, args.shape))
    results = []
    for r in range(args.rounds):
        record = meter.record
        t0 = time.perf_counter()
        for ex in batch:
            record(ex)
        dt = time.perf_counter() - t0
        meter.get_and_reset(serialized=True)
        results.append(dt / len(batch) * 1e6)
        del r
    results.sort()
    print(
        "Meter.record µs/request over "
        f"{len(batch):,} {args.shape} exchanges x {args.rounds}: "
        f"min {results[0]:.3f}, median {results[len(results) // 2]:.3f}, max {results[-1]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500_000)
    ap.add_argument("--sync-every", type=int, default=25_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--time-record", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--shape", choices=("hostile", "benign"), default="hostile")
    args = ap.parse_args()
    if args.time_record:
        time_record(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
