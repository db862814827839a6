"""Several worker processes share the port; each is its own Apitally instance."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest


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
    hub, upstream, http, start_proxy, hub_args_long
):
    proxy = await start_proxy(upstream.url, *hub_args_long, "--workers", "2")
    await hub.wait_for(lambda: len(hub.accepted("sync")) >= 2)
    await asyncio.gather(*(http.get(f"{proxy.url}/items/{i}") for i in range(20)))
    assert await proxy.stop() == 0
    assert sum(hub.request_counts().values()) == 20


async def test_signalling_the_whole_process_group_still_drains(
    hub, upstream, http, start_proxy, hub_args
):
    """systemd's control-group kill or a terminal's Ctrl-C signal every process at once:
    the in-flight request still finishes (the repeat is not read as "hurry")."""
    import os
    import signal as sig

    proxy = await start_proxy(upstream.url, *hub_args, "--workers", "2")
    await hub.wait_for(lambda: len({p["instance_uuid"] for p in hub.accepted("startup")}) == 2)
    slow = asyncio.ensure_future(http.get(proxy.url + "/slow?delay=1.5"))
    await asyncio.sleep(0.3)
    import psutil

    # What a control-group kill does: every process gets the signal at the same moment
    # (and the supervisor then forwards its own copy).
    for child in psutil.Process(proxy.pid).children():
        os.kill(child.pid, sig.SIGTERM)
    proxy.proc.send_signal(sig.SIGTERM)
    r = await slow
    assert r.status == 200
    assert await asyncio.wait_for(proxy.proc.wait(), 20) == 0
    assert "skipping the grace period" not in proxy.log()
    assert sum(hub.request_counts().values()) == 1  # the slow request, flushed


async def test_admin_endpoints_report_every_worker(hub, upstream, start_proxy, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args, "--workers", "2")
    await hub.wait_for(lambda: len({p["instance_uuid"] for p in hub.accepted("startup")}) == 2)
    for i in range(40):
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        st = await proxy.status()
        if st["requests_total"] == 40 or loop.time() > deadline:
            break
        await asyncio.sleep(0.3)
    assert st["requests_total"] == 40
    assert st["requests_by_status"] == {"200": 40}
    assert st["workers_reporting"] == [0, 1]
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        assert 'apitally_proxy_requests_total{status="200"} 40.0' in await r.text()
    assert await proxy.stop() == 0


async def test_a_start_that_fails_half_way_stops_what_it_started(upstream, tmp_path):
    """The admin port is taken: the proxy port opened first must be closed again (no
    half-started worker keeps a listener), and the error names the setting."""
    import socket

    from apitally_proxy.config import ConfigError, load_settings
    from apitally_proxy.server import Worker
    from tests.support.proxy_process import free_port

    listen = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        settings = load_settings(
            {
                "upstream": upstream.url,
                "listen": f"127.0.0.1:{listen}",
                "admin_listen": f"127.0.0.1:{admin}",
                "state_dir": str(tmp_path),
            }
        )
        worker = Worker(settings)
        with pytest.raises(ConfigError, match="admin address"):
            await worker.start()
        worker.lease.release()
    with socket.socket() as again:  # free again: the worker closed its listener
        again.bind(("127.0.0.1", listen))
