"""Several worker processes share the port; each is its own Apitally instance."""

from __future__ import annotations

import asyncio

import aiohttp


async def test_workers_share_the_port_and_counts_add_up(hub, upstream, start_proxy, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args, "--workers", "2")
    # Health answers once worker 0 is up; wait until both have announced themselves.
    await hub.wait_for(lambda: len({p["instance_uuid"] for p in hub.accepted("startup")}) == 2)
    sent = 0
    # Fresh connections spread over the workers (SO_REUSEPORT balances per connection).
    for i in range(60):
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200
            sent += 1
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): sent}
    instances = {p["instance_uuid"] for p in hub.accepted("sync") if p["requests"]}
    assert len(instances) == 2, "both workers served traffic"


async def test_supervisor_forwards_sigterm_and_workers_flush(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(
        upstream.url, *hub_args[:-2], "--sync-interval", "3600", "--workers", "2"
    )
    await hub.wait_for(lambda: len(hub.accepted("sync")) >= 2)
    await asyncio.gather(*(http.get(f"{proxy.url}/items/{i}") for i in range(20)))
    assert await proxy.stop() == 0
    assert sum(hub.request_counts().values()) == 20
