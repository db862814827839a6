"""Hostile cardinality: distinct paths, consumers and query strings keep RSS flat."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest


async def flood(proxy, n: int, concurrency: int = 32) -> int:
    """n requests with random paths, consumers and query strings; returns 200s."""
    rng = random.Random(42)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        todo = iter(range(n))

        async def worker():
            nonlocal ok
            for i in todo:
                token = f"{rng.getrandbits(64):x}"
                path = f"/items/{i}?consumer=c{token}&q={token}"
                if i % 3 == 0:
                    path = f"/status/200?consumer=c{token}&junk{token}=1"  # status route
                if i % 3 == 1:
                    # Random literal segments, each leading somewhere else: nothing for
                    # the learner to fold, so the per-method template cap must hold.
                    path = f"/any/r{token}/w{token}?consumer=c{token}"
                async with s.get(proxy.url + path) as r:
                    await r.read()
                    ok += r.status in (200, 404)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


async def run_flood(upstream, start_proxy, hub, hub_args, tmp_path, n: int) -> None:
    cfg = tmp_path / "p.toml"
    # max_consumers low enough that one 0.3 s interval overflows it even on a loaded
    # machine (500 needed ~1,700 requests/s; a heavily loaded machine missed it once).
    cfg.write_text("max_templates_per_method = 200\nmax_consumers = 100\n")
    proxy = await start_proxy(upstream.url, *hub_args, "--config", str(cfg))
    await flood(proxy, 2_000)  # warm up pools, caches and allocator
    baseline = proxy.rss()
    assert await flood(proxy, n) == n
    growth = proxy.rss() - baseline
    print(f"RSS {baseline / 1e6:.1f} MB -> {(baseline + growth) / 1e6:.1f} MB after {n} requests")
    status = await proxy.status()
    assert await proxy.stop() == 0
    assert growth < 25 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB over {n} hostile requests"
    assert status["route_overflow"] > 0 and status["consumer_overflow"] > 0
    assert sum(hub.request_counts().values()) == n + 2_000  # overflow buckets, nothing lost
    rows = hub.request_rows()
    assert max(len({r["path"] for r in rows if r["method"] == "GET"}), 0) <= 200 + 1


async def test_distinct_paths_consumers_and_queries_keep_memory_flat(
    upstream, start_proxy, hub, hub_args, tmp_path
):
    await run_flood(upstream, start_proxy, hub, hub_args, tmp_path, 20_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_one_million_hostile_requests_keep_memory_flat(
    upstream, start_proxy, hub, hub_args, tmp_path
):
    await run_flood(upstream, start_proxy, hub, hub_args, tmp_path, 1_000_000)


async def test_local_mode_keeps_what_the_status_page_shows_bounded(upstream, start_proxy):
    """Local mode keeps the latest payloads for /status: bounded in bytes, not in count
    alone (a hostile interval's payload is megabytes), and rendering them never stalls
    proxying."""
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.5")
    await flood(proxy, 2_000)
    baseline = proxy.rss()
    for _ in range(4):  # several intervals, each a payload of thousands of distinct rows
        await flood(proxy, 5_000)
        await asyncio.sleep(0.6)
    growth = proxy.rss() - baseline
    print(f"local mode: RSS +{growth / 1e6:.1f} MB over 20,000 hostile requests")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/status.json") as r:
            assert r.status == 200
            status = await r.read()
        async with s.get(proxy.admin_url + "/status") as r:
            assert r.status == 200
            page = await r.read()
    assert len(status) < 1_000_000 and len(page) < 1_000_000
    assert b'"truncated": true' in status or b'"truncated":true' in status
    assert await proxy.stop() == 0
    assert growth < 12 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB in local mode"
