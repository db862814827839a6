"""OTLP receiver down, slow or refusing; the proxy killed: nothing lost, no request slowed."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.support.fake_otlp import FakeOtlp, get, otlp_env

ITEMS = ("GET", "/items/{id}", 200, None)


async def send(http, url: str, n: int) -> float:
    """n requests; returns the slowest one's seconds."""
    worst = 0.0
    for i in range(n):
        t0 = time.monotonic()
        assert await get(http, f"{url}/items/{i}") == 200
        worst = max(worst, time.monotonic() - t0)
    return worst


async def health(proxy) -> dict:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/health") as r:
        return await r.json()


async def test_receiver_down_for_many_intervals_then_back_gets_every_request(
    upstream, http, start_proxy
):
    receiver = FakeOtlp()
    await receiver.start()
    url = receiver.url
    port = int(url.rsplit(":", 1)[1])
    await receiver.stop()  # down from the start: connections refused
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.2", env=otlp_env(receiver, APITALLY_OTLP_ENDPOINT=url)
    )
    worst = await send(http, proxy.url, 40)
    await asyncio.sleep(1.5)  # many failed cycles
    worst = max(worst, await send(http, proxy.url, 20))
    assert worst < 0.5, f"a request took {worst:.2f} s while the receiver was down"
    assert (await health(proxy))["hub_ok"] is False
    await receiver.start(port)
    try:
        await receiver.wait_for(lambda: receiver.request_counts().get(ITEMS) == 60, timeout=20)
        assert await proxy.stop() == 0
        assert receiver.request_counts() == {ITEMS: 60}
    finally:
        await receiver.stop()


async def test_503_and_429_are_retried_until_accepted(otlp, upstream, http, start_proxy):
    otlp.script["metrics"] = [503, 429, 503, 500, 503, 429]
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.2", env=otlp_env(otlp))
    await send(http, proxy.url, 15)
    await otlp.wait_for(lambda: otlp.request_counts().get(ITEMS) == 15, timeout=15)
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {ITEMS: 15}
    assert {c.status for c in otlp.calls if c.signal == "metrics"} >= {503, 429, 200}


async def test_401_stops_exporting_and_names_the_setting_while_traffic_flows(
    otlp, upstream, http, start_proxy
):
    otlp.default_status = 401
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.2", env=otlp_env(otlp))
    await otlp.wait_for(lambda: otlp.calls)
    await asyncio.sleep(0.8)
    calls = len(otlp.calls)
    assert await send(http, proxy.url, 5) < 0.5
    await asyncio.sleep(0.6)
    h = await health(proxy)
    assert h["hub_ok"] is False and "APITALLY_WRITE_TOKEN" in h["hub_problem"]
    assert len(otlp.calls) == calls, "exports went on after a 401"
    assert await proxy.stop() == 0


async def test_402_and_413_drop_that_export_and_the_rest_flows(otlp, upstream, http, start_proxy):
    otlp.script["metrics"] = [402, 413]
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.2", env=otlp_env(otlp))
    await otlp.wait_for(lambda: len([c for c in otlp.calls if c.signal == "metrics"]) >= 2)
    await send(http, proxy.url, 10)
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {ITEMS: 10}
    assert "dropping it" in proxy.log()


async def test_a_hanging_receiver_slows_no_request_and_loses_nothing(
    otlp, upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text("hub_timeout = 0.5\n")
    otlp.delay = 2.0
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.2", "--config", str(cfg), env=otlp_env(otlp)
    )
    worst = await send(http, proxy.url, 30)
    await asyncio.sleep(1.0)
    worst = max(worst, await send(http, proxy.url, 10))
    assert worst < 0.5, f"a request took {worst:.2f} s while the receiver hung"
    otlp.delay = 0
    await otlp.wait_for(lambda: otlp.request_counts().get(ITEMS, 0) >= 40, timeout=20)
    assert await proxy.stop() == 0
    # Answers the proxy gave up on were never accepted from its side: resent, not lost.
    assert otlp.request_counts() == {ITEMS: 40}


async def test_sigterm_delivers_the_last_interval(otlp, upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "3600", env=otlp_env(otlp))
    await send(http, proxy.url, 12)
    assert await proxy.stop(signal.SIGTERM) == 0
    assert otlp.request_counts() == {ITEMS: 12}


async def test_sigkill_and_restart_loses_nothing_older_than_the_checkpoint(
    otlp, upstream, http, start_proxy, tmp_path
):
    state = tmp_path / "state"
    otlp.default_status = 503  # nothing leaves before the kill
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp), state_dir=state
    )
    await send(http, proxy.url, 25)
    await asyncio.sleep(1.0)
    await send(http, proxy.url, 8)
    await asyncio.sleep(1.6)  # > checkpoint interval
    await proxy.stop(signal.SIGKILL)
    assert otlp.request_counts() == {}
    otlp.default_status = 200
    again = await start_proxy(
        upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp), state_dir=state
    )
    await otlp.wait_for(lambda: otlp.request_counts().get(ITEMS) == 33, timeout=15)
    assert await again.stop() == 0
    assert otlp.request_counts() == {ITEMS: 33}


async def test_each_worker_exports_as_its_own_instance(otlp, upstream, start_proxy):
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.3", "--workers", "2", env=otlp_env(otlp)
    )
    await otlp.wait_for(
        lambda: len({r["service.instance.id"] for r in otlp.resources("logs")}) == 2, timeout=15
    )
    sent = 0
    for i in range(60):  # fresh connections spread over the workers (SO_REUSEPORT)
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200
            sent += 1
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {ITEMS: sent}
    instances = {
        resource["service.instance.id"]
        for message in otlp.accepted("metrics")
        for rm in message.resource_metrics
        if any(
            m.name == "http.server.request.duration" for sm in rm.scope_metrics for m in sm.metrics
        )
        for resource in [dict((kv.key, kv.value.string_value) for kv in rm.resource.attributes)]
    }
    assert len(instances) == 2, "both workers served traffic and exported it"
