"""The OpenTelemetry export's per-key histograms, against a plain reference."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from apitally_proxy.metering.histograms import HistogramCounter, bucket_index


def reference(values: list[float]) -> dict | None:
    """What an exponential histogram at scale 3 holds after `values`, computed directly."""
    if not values:
        return None
    buckets: dict[int, int] = {}
    for v in values:
        if v != 0:
            buckets[bucket_index(v)] = buckets.get(bucket_index(v), 0) + 1
    offset = min(buckets) if buckets else 0
    dense = [0] * (max(buckets) - offset + 1) if buckets else []
    for i, n in buckets.items():
        dense[i - offset] = n
    return {
        "count": len(values),
        "sum": math.fsum(values),
        "min": min(values),
        "max": max(values),
        "zero_count": sum(1 for v in values if v == 0),
        "offset": offset,
        "buckets": dense,
    }


def close(row: dict, want: dict) -> None:
    for name in ("duration", "request_size", "response_size"):
        got, exp = row[name], want[name]
        if exp is None:
            assert got is None, name
            continue
        assert got is not None, name
        assert got["sum"] == pytest.approx(exp["sum"]), name
        assert {k: v for k, v in got.items() if k != "sum"} == {
            k: v for k, v in exp.items() if k != "sum"
        }, name


def values(rng: random.Random, n: int, pool: list[float]) -> list[float]:
    return [rng.choice(pool) for _ in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_rows_match_a_direct_computation_whatever_the_values_and_renames(seed):
    rng = random.Random(seed)
    counter = HistogramCounter()
    seen: dict[str, dict[str, list[float]]] = {}
    # Few distinct values (one repeated, zeros, powers of two) and many.
    pools = [[0.0], [0.25], [0.0, 0.5], [0.001, 0.002, 2.0, 0.0]]
    sizes = [[0], [120], [0, 1000, 1024], list(range(0, 5000, 7))]
    for path in ("/a", "/b", "/c"):
        n = rng.choice([1, 1, 2, 3, 20])
        durations = values(rng, n, rng.choice([*pools, [rng.random() for _ in range(9)]]))
        request = rng.choice([None, rng.choice(sizes)])
        response = rng.choice(sizes)
        rec = seen[path] = {"duration": [], "request_size": [], "response_size": []}
        for d in durations:
            q = rng.choice(request) if request is not None and rng.random() < 0.8 else None
            r = rng.choice(response) if rng.random() < 0.9 else None
            counter.add_request("c", "GET", path, 200, d, q, r)
            rec["duration"].append(d)  # add_request records zero for a non-positive time
            if q is not None:
                rec["request_size"].append(q)
            if r is not None:
                rec["response_size"].append(r)
    if seed % 2:  # a learned position renames /b and /c into /a: their keys merge
        counter.rename_paths({"/b": "/a", "/c": "/a"})
        merged = {k: [*seen["/a"][k], *seen["/b"][k], *seen["/c"][k]] for k in seen["/a"]}
        seen = {"/a": merged}
    rows = {row["path"]: row for row in counter.get_and_reset_requests()}
    assert set(rows) == set(seen)
    for path, rec in seen.items():
        close(rows[path], {k: reference(v) for k, v in rec.items()})


def test_one_request_a_key_holds_no_bucket_dict():
    counter = HistogramCounter()
    for i in range(100):
        counter.add_request(f"c{i}", "GET", "/items/{id}", 200, 0.01 + i / 1000, None, 512)
    points = list(counter._aggregates.values())
    assert all(p.buckets is None and p.request_size is None for p in points)
    rows = counter.get_and_reset_requests()
    assert rows[0]["duration"]["buckets"] == [1] and rows[0]["request_size"] is None


def _filled(keys: int) -> HistogramCounter:
    counter = HistogramCounter(max_consumers=keys)
    for i in range(keys):
        counter.add_request(f"c{i}", "GET", "/items/{id}", 200, 0.001 * (i % 7), None, i % 3)
    return counter


def test_taken_rows_are_built_when_read_and_are_the_rows():
    want = list(_filled(600).get_and_reset_requests())
    counter = _filled(600)
    deferred = counter.get_and_reset_requests()
    assert len(counter) == 0  # taken: the counter started a new interval
    assert len(deferred) == 600
    assert deferred[10:20] == want[10:20] and deferred[599] == want[599]
    assert list(deferred) == want


async def test_live_rows_are_built_on_the_loop_a_chunk_at_a_time():
    counter = _filled(1000)
    want = list(_filled(1000).get_and_reset_requests())  # the same keys, taken
    deferred = counter.peek_requests()
    with pytest.raises(RuntimeError):
        deferred[0:10]  # live keys change under a reader in another thread
    ran: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: ran.append(len(ran)))
    await deferred.build()
    assert ran == [0]  # the loop ran other callbacks while the rows were being built
    assert deferred[:] == want
    assert len(counter) == 1000  # a peek leaves the interval as it is
