"""A 1 GB body passes both ways with flat proxy memory."""

from __future__ import annotations

import asyncio

import pytest

# On both client-facing servers (lean, the default, and aiohttp).
pytestmark = pytest.mark.usefixtures("both_servers")

GIB = 1024**3
BLOCK = b"z" * (256 * 1024)


async def sample_rss(proxy, stop: asyncio.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        peaks.append(proxy.rss())
        await asyncio.sleep(0.05)


async def test_1gb_upload_and_download_keep_memory_flat(upstream, http, start_proxy, hub, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args)
    # Warm up so the baseline includes the pools and buffers of a normal request.
    async with http.post(proxy.url + "/sink", data=b"w" * 1_000_000) as r:
        await r.read()
    baseline = proxy.rss()
    stop = asyncio.Event()
    peaks: list[int] = []
    sampler = asyncio.ensure_future(sample_rss(proxy, stop, peaks))

    async def upload():
        for _ in range(GIB // len(BLOCK)):
            yield BLOCK

    async with http.post(proxy.url + "/sink", data=upload()) as r:
        assert (await r.json())["received"] == GIB

    received = 0
    async with http.get(f"{proxy.url}/download?n={GIB}&length=1") as r:
        async for chunk in r.content.iter_any():
            received += len(chunk)
    assert received == GIB
    stop.set()
    await sampler
    growth = max(peaks) - baseline
    print(f"RSS growth while streaming 1 GiB each way: {growth / 1e6:.1f} MB")
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
    assert await proxy.stop() == 0
    rows = hub.request_rows()
    assert sum(r["request_size_sum"] for r in rows if r["path"] == "/sink") == GIB + 1_000_000
    assert sum(r["response_size_sum"] for r in rows if r["path"] == "/download") == GIB
