"""What reaches the hub for real traffic through a real proxy process."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from tests.conftest import CLIENT_ID


async def drive(http, url, n_by_path: dict[str, int]) -> None:
    async def one(path):
        async with http.get(url + path) as r:
            await r.read()

    await asyncio.gather(*(one(p) for p, n in n_by_path.items() for _ in range(n)))


async def test_n_requests_in_are_exactly_n_counted_per_key(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    # Heuristics learn templates from answers that are not 404/405; prime /status/{id}
    # so its 404s below count under it (a 404 on a never-seen template is unmatched).
    async with http.get(proxy.url + "/status/200") as r:
        await r.read()
    plan = {
        "/items/1?consumer=alice": 37,
        "/items/2?consumer=alice": 13,
        "/items/3?consumer=bob": 21,
        "/items/4": 9,
        "/status/404?consumer=bob": 5,
        "/status/500": 3,
        "/users/7/orders/9?consumer=alice": 4,
    }
    for _ in range(3):  # spread over several sync intervals
        await drive(http, proxy.url, plan)
        await asyncio.sleep(0.35)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {
        ("alice", "GET", "/items/{id}", 200): 150,
        ("bob", "GET", "/items/{id}", 200): 63,
        (None, "GET", "/items/{id}", 200): 27,
        ("bob", "GET", "/status/{id}", 404): 15,
        (None, "GET", "/status/{id}", 500): 9,
        ("alice", "GET", "/users/{id}/orders/{id2}", 200): 12,
        (None, "GET", "/status/{id}", 200): 1,
    }
    assert len(hub.accepted("sync")) >= 3


async def test_size_sums_equal_the_bytes_forwarded_both_ways(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    sizes = [0, 1, 999, 1000, 1500, 70_000, 300_001]
    for n in sizes:
        async with http.get(f"{proxy.url}/download?n={n}&length=1") as r:  # Content-Length
            assert len(await r.read()) == n
        async with http.get(f"{proxy.url}/download?n={n}") as r:  # chunked
            assert len(await r.read()) == n
    uploads = [10, 2048, 100_000]
    for n in uploads:
        async with http.post(f"{proxy.url}/sink", data=b"u" * n) as r:  # Content-Length
            assert (await r.json())["received"] == n

        async def gen(n=n):
            yield b"c" * (n // 2)
            yield b"c" * (n - n // 2)

        async with http.post(f"{proxy.url}/sink", data=gen()) as r:  # chunked upload
            assert (await r.json())["received"] == n
    assert await proxy.stop() == 0

    (download,) = [r for r in hub.request_rows() if r["path"] == "/download"]
    assert download["request_count"] == 2 * len(sizes)
    assert download["response_size_sum"] == 2 * sum(sizes)
    expected_bins: dict[str, int] = {}
    for n in sizes:
        expected_bins[str(n // 1000)] = expected_bins.get(str(n // 1000), 0) + 2
    assert download["response_sizes"] == expected_bins
    assert download["request_size_sum"] == 0
    assert download["request_sizes"] == {}  # no request body: size unknown, like the clients

    (sink,) = [r for r in hub.request_rows() if r["path"] == "/sink"]
    assert sink["request_count"] == 2 * len(uploads)
    assert sink["request_size_sum"] == 2 * sum(uploads)
    assert sink["request_sizes"] == {"0": 2, "2": 2, "100": 2}


async def test_response_time_is_time_to_first_byte_in_10ms_bins(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.get(proxy.url + "/slow?delay=0.25") as r:
        await r.read()
    async with http.get(proxy.url + "/slow-body?delay=1") as r:  # headers at once, slow body
        await r.read()
    assert await proxy.stop() == 0
    (slow,) = [r for r in hub.request_rows() if r["path"] == "/slow"]
    (ms,) = [int(k) for k in slow["response_times"]]
    assert 250 <= ms < 400 and ms % 10 == 0
    (slow_body,) = [r for r in hub.request_rows() if r["path"] == "/slow-body"]
    (ms,) = [int(k) for k in slow_body["response_times"]]
    assert ms < 300  # the slow body does not count: time to first byte


async def test_consumer_name_and_group_are_reported_once(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    for _ in range(3):
        for _ in range(4):
            async with http.get(
                proxy.url + "/items/1?consumer=acme&name=Acme%20Inc&group=Gold"
            ) as r:
                await r.read()
        await asyncio.sleep(0.35)
    async with http.get(proxy.url + "/items/1?consumer=acme&name=Acme%20Inc&group=Platinum") as r:
        await r.read()
    async with http.get(proxy.url + "/items/1?consumer=anon-only") as r:
        await r.read()
    assert await proxy.stop() == 0
    listed = [c for p in hub.accepted("sync") for c in p["consumers"]]
    assert listed == [
        {"identifier": "acme", "name": "Acme Inc", "group": "Gold"},
        {"identifier": "acme", "name": "Acme Inc", "group": "Platinum"},
    ]


async def test_non_ascii_consumer_names_are_percent_decoded(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.get(proxy.url + "/items/1?consumer=c%25C3%25BC&name=M%25C3%25BCller") as r:
        await r.read()
    assert await proxy.stop() == 0
    (consumer,) = [c for p in hub.accepted("sync") for c in p["consumers"]]
    assert consumer == {"identifier": "cü", "name": "Müller", "group": None}


async def test_client_sent_apitally_headers_cannot_pose_as_a_consumer(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.get(proxy.url + "/items/1", headers={"X-Apitally-Consumer": "victim"}) as r:
        await r.read()
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 1}


async def test_options_requests_are_forwarded_but_not_counted(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.options(proxy.url + "/echo") as r:
        assert r.status == 200
    assert await proxy.stop() == 0
    assert hub.request_counts() == {}


async def test_client_leaving_early_is_counted_as_499(hub, upstream, start_proxy, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args)
    # Leaves while the upstream is still thinking…
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow?delay=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    # …and while the body is streaming.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow-body?delay=2 HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await asyncio.sleep(1.0)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {
        (None, "GET", "/slow", 499): 1,
        (None, "GET", "/slow-body", 499): 1,
    }


async def test_upstream_errors_are_counted_with_the_status_the_client_got(
    hub, http, start_proxy, hub_args, tmp_path
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proxy = await start_proxy(f"http://127.0.0.1:{s.getsockname()[1]}", *hub_args)
        for _ in range(3):
            async with http.get(proxy.url + "/items/1") as r:
                assert r.status == 502
        assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 502): 3}


async def test_sigterm_sends_the_final_counts_and_exits_0(
    hub, upstream, http, start_proxy, hub_args_long
):
    # A long interval: only the shutdown sync can deliver these.
    proxy = await start_proxy(upstream.url, *hub_args_long)
    await hub.wait_for(lambda: hub.accepted("sync"))  # the immediate first sync
    for i in range(17):
        async with http.get(f"{proxy.url}/items/{i}") as r:
            await r.read()
    assert await proxy.stop(signal.SIGTERM) == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 17}


async def test_sigint_also_flushes(hub, upstream, http, start_proxy, hub_args_long):
    proxy = await start_proxy(upstream.url, *hub_args_long)
    async with http.get(f"{proxy.url}/items/1") as r:
        await r.read()
    assert await proxy.stop(signal.SIGINT) == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 1}


async def test_startup_payload_and_sync_shape(hub, upstream, http, start_proxy, hub_args):
    proxy = await start_proxy(
        upstream.url, *hub_args, "--app-version", "2.3.4", "--framework", "fastapi"
    )
    async with http.get(f"{proxy.url}/items/1") as r:
        await r.read()
    assert await proxy.stop() == 0
    (startup,) = hub.accepted("startup")
    assert set(startup) >= {"instance_uuid", "message_uuid", "paths", "versions", "client"}
    assert startup["client"] == "python:starlette"
    assert startup["versions"]["app"] == "2.3.4"
    sync = hub.accepted("sync")[-1]
    assert set(sync) == {
        "instance_uuid",
        "message_uuid",
        "timestamp",
        "requests",
        "validation_errors",
        "server_errors",
        "consumers",
        "resources",
    }
    assert sync["instance_uuid"] == startup["instance_uuid"]
    assert sync["resources"]["memory_rss"] > 0
    assert all(c.client_id == CLIENT_ID and c.env == "test" for c in hub.calls)
    assert all(c.headers["Content-Type"] == "application/json" for c in hub.calls)
    uuids = [p["message_uuid"] for p in hub.accepted("sync")]
    assert len(set(uuids)) == len(uuids)


async def test_instance_uuid_is_stable_across_restarts_and_distinct_per_slot(
    hub, upstream, start_proxy, hub_args, tmp_path
):
    state = tmp_path / "shared-state"
    a = await start_proxy(upstream.url, *hub_args, state_dir=state)
    b = await start_proxy(upstream.url, *hub_args, state_dir=state)  # a second live process
    assert await a.stop() == 0 and await b.stop() == 0
    first = {p["instance_uuid"] for p in hub.accepted("startup")}
    assert len(first) == 2
    c = await start_proxy(upstream.url, *hub_args, state_dir=state)
    assert await c.stop() == 0
    assert hub.accepted("startup")[-1]["instance_uuid"] in first


async def test_hub_outage_then_recovery_loses_nothing(hub, upstream, http, start_proxy, hub_args):
    hub.default_status = 503
    proxy = await start_proxy(upstream.url, *hub_args)
    sent = 0
    for _ in range(4):
        for i in range(10):
            async with http.get(f"{proxy.url}/items/{i}") as r:
                await r.read()
                sent += 1
        await asyncio.sleep(0.4)
    await hub.wait_for(lambda: len(hub.calls) >= 6)
    assert hub.request_counts() == {}
    st = await proxy.status()
    assert st["hub"]["queued"] >= 1 and st["hub"]["ok"] is False
    hub.default_status = 202
    await hub.wait_for(lambda: sum(hub.request_counts().values()) == sent, timeout=15)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): sent}
    # Retried payloads keep their message_uuid, so duplicates would be recognisable.
    accepted = [p["message_uuid"] for p in hub.accepted("sync")]
    assert len(accepted) == len(set(accepted))


async def test_hub_down_does_not_slow_requests(upstream, http, start_proxy, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_hub = f"http://127.0.0.1:{s.getsockname()[1]}"
        proxy = await start_proxy(
            upstream.url, "--client-id", CLIENT_ID, "--hub-url", dead_hub, "--sync-interval", "0.2"
        )
        t0 = time.monotonic()
        for i in range(50):
            async with http.get(f"{proxy.url}/items/{i}") as r:
                assert r.status == 200
        assert time.monotonic() - t0 < 5
        assert await proxy.stop() == 0


async def test_hub_404_stops_syncing_and_names_the_client_id(
    hub, upstream, http, start_proxy, hub_args
):
    hub.default_status = 404
    proxy = await start_proxy(upstream.url, *hub_args)
    await hub.wait_for(lambda: len(hub.calls) >= 1)
    await asyncio.sleep(1.0)  # several intervals
    calls = len(hub.calls)
    assert calls == 1
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200  # traffic keeps flowing
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/health") as r:
        health = await r.json()
    assert health["hub_ok"] is False
    assert CLIENT_ID in health["hub_problem"]
    assert await proxy.stop() == 0
    assert len(hub.calls) == calls
    assert f"404 for client id {CLIENT_ID}" in proxy.log()


async def test_hub_422_drops_the_payload_with_a_warning(
    hub, upstream, http, start_proxy, hub_args_long
):
    hub.script["sync"] = [422]
    proxy = await start_proxy(upstream.url, *hub_args_long)
    await hub.wait_for(lambda: any(c.kind == "sync" for c in hub.calls))
    async with http.get(proxy.url + "/items/1") as r:
        await r.read()
    assert await proxy.stop() == 0
    syncs = [c for c in hub.calls if c.kind == "sync"]
    assert [c.status for c in syncs] == [422, 202]  # the rejected one is not retried
    assert "rejected by fake hub" in proxy.log()
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 1}


async def test_hub_errors_are_retried_with_backoff_within_one_sync(
    hub, upstream, http, start_proxy, hub_args_long
):
    hub.script["sync"] = [500, 503]
    proxy = await start_proxy(upstream.url, *hub_args_long)
    await hub.wait_for(lambda: len([c for c in hub.calls if c.kind == "sync"]) == 3)
    assert [c.status for c in hub.calls if c.kind == "sync"] == [500, 503, 202]
    assert await proxy.stop() == 0


async def test_slow_hub_does_not_block_shutdown_forever(
    hub, upstream, http, start_proxy, hub_args_long
):
    proxy = await start_proxy(upstream.url, *hub_args_long)
    await hub.wait_for(lambda: hub.accepted("sync"))
    hub.delay = 30
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await proxy.stop(timeout=40) == 0
    assert loop.time() - t0 < 25


@pytest.mark.parametrize("client_id", ["not-a-uuid", "   "])
async def test_bad_client_id_keeps_traffic_flowing_in_local_mode(
    client_id, upstream, http, start_proxy, hub
):
    proxy = await start_proxy(
        upstream.url, "--client-id", client_id, "--hub-url", hub.url, "--sync-interval", "0.2"
    )
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/health") as r:
        health = await r.json()
    assert await proxy.stop() == 0
    assert hub.calls == []
    assert health["mode"] == "local"
    if client_id.strip():
        assert "is not a UUID" in health["hub_problem"]
        assert "is not a UUID" in proxy.log()


async def test_local_mode_writes_every_payload_as_json_lines(upstream, http, start_proxy, tmp_path):
    state = tmp_path / "local-state"
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.2", state_dir=state)
    for i in range(7):
        async with http.get(f"{proxy.url}/items/{i}?consumer=c{i % 2}") as r:
            await r.read()
    st = await proxy.status()
    assert await proxy.stop() == 0
    lines = [
        orjson.loads(x) for x in (state / "local" / "worker-0.jsonl").read_bytes().splitlines()
    ]
    kinds = {line["kind"] for line in lines}
    assert kinds == {"startup", "sync"}
    counted = sum(
        r["request_count"]
        for line in lines
        if line["kind"] == "sync"
        for r in line["payload"]["requests"]
    )
    assert counted == 7
    assert st["hub"]["mode"] == "local"


async def test_admin_metrics_expose_proxy_counters(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with http.get(proxy.url + "/items/1") as r:
        await r.read()
    async with http.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'apitally_proxy_requests_total{status="200"} 1.0' in text
    assert "apitally_proxy_hub_queue" in text
    async with http.get(proxy.admin_url + "/status") as r:
        assert r.status == 200
        assert "apitally-proxy" in await r.text()


async def test_declared_empty_bodies_have_size_zero_like_the_clients(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.post(proxy.url + "/sink", data=b"") as r:  # Content-Length: 0
        assert (await r.json())["received"] == 0
    assert await proxy.stop() == 0
    (row,) = [r for r in hub.request_rows() if r["path"] == "/sink"]
    assert row["request_sizes"] == {"0": 1}


async def test_one_drain_deadline_the_proxy_exits_within_shutdown_grace(
    hub, upstream, http, start_proxy, hub_args_long, tmp_path
):
    """shutdown_grace bounds the whole drain, final delivery included; requests still
    running at its end are cut by the proxy and counted as such (503), not as 499."""
    cfg = tmp_path / "p.toml"
    cfg.write_text("shutdown_grace = 3\n")
    proxy = await start_proxy(upstream.url, *hub_args_long, "--config", str(cfg))
    await hub.wait_for(lambda: hub.accepted("startup"))
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(http.get(proxy.url + "/slow?delay=6"))
    quick = asyncio.ensure_future(http.get(proxy.url + "/slow?delay=0.5"))
    await asyncio.sleep(0.3)
    started = loop.time()
    assert await proxy.stop(signal.SIGTERM) == 0
    took = loop.time() - started
    assert took < 3.0, f"the drain took {took:.1f} s with shutdown_grace = 3"
    assert (await quick).status == 200  # finished inside the grace period
    cut = await slow
    assert cut.status == 503  # the client is told (the aiohttp server only cut the connection)
    assert cut.headers["Connection"] == "close"
    counts = hub.request_counts()
    assert counts[(None, "GET", "/slow", 200)] == 1
    assert counts[(None, "GET", "/slow", 503)] == 1  # cut by the proxy, said so
    assert (None, "GET", "/slow", 499) not in counts
    assert "cut by shutdown" in proxy.log()


async def test_an_export_hanging_at_sigterm_does_not_stretch_the_drain(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    """The sync in flight and the final delivery share the one deadline: a hub that
    accepts and never answers cannot make the drain twice shutdown_grace."""
    cfg = tmp_path / "p.toml"
    cfg.write_text("shutdown_grace = 3\nhub_timeout = 30\n")
    hub.delay = 60  # every hub call hangs
    proxy = await start_proxy(upstream.url, *hub_args, "--config", str(cfg))
    for i in range(5):
        async with http.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200
    await asyncio.sleep(0.8)  # a sync (0.3 s interval) is now hanging on the hub
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await proxy.stop(signal.SIGTERM) == 0
    took = loop.time() - started
    assert took < 3.0, f"the drain took {took:.1f} s with shutdown_grace = 3"
    assert "stay spooled" in proxy.log()  # kept for the next start, not lost
    spool = list(proxy.state_dir.rglob("*.spool/*-*.json"))
    assert spool, "the undelivered payloads must stay in the spool"


async def test_metrics_has_latency_and_size_histograms_per_route_template(
    upstream, http, start_proxy
):
    proxy = await start_proxy(upstream.url)
    for i in range(3):
        async with http.get(f"{proxy.url}/items/{i}") as r:
            await r.read()
    async with http.get(f"{proxy.url}/status/503") as r:
        await r.read()
    await proxy.wait_status(lambda st: st["requests_total"] == 4)
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    labels = 'method="GET",route="/items/{id}",status="200"'
    assert f'apitally_proxy_request_duration_seconds_bucket{{le="+Inf",{labels}}} 3.0' in text
    assert f"apitally_proxy_request_duration_seconds_count{{{labels}}} 3.0" in text
    assert f'apitally_proxy_response_size_bytes_bucket{{le="100",{labels}}} 3.0' in text
    assert 'route="/status/{id}",status="503"' in text


def test_route_histograms_are_bounded_and_merge_across_workers():
    from apitally_proxy.metering.prometheus import OTHER_ROUTE, RouteHistograms, merge

    h = RouteHistograms(max_series=2)
    for i in range(5):
        h.observe("GET", f"/r{i}", 200, 0.002, 10)
    snap = h.snapshot()
    assert set(snap) == {"GET 200 /r0", "GET 200 /r1", f"GET 200 {OTHER_ROUTE}"}
    assert h.overflow == 3
    total = {k: list(v) for k, v in snap.items()}
    merge(total, snap)
    assert total["GET 200 /r0"][0] == 2  # the 5 ms bucket, once from each "worker"
