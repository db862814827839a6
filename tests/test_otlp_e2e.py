"""OpenTelemetry export (Apitally 1.x, a write token): what a recording OTLP receiver gets
from a real proxy process in front of a real upstream."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import psutil

from apitally_proxy.metering.histograms import bucket_index
from apitally_proxy.otlp.codec import OtlpCodec
from tests.conftest import CLIENT_ID
from tests.support.fake_otlp import TOKEN, get, otlp_env


async def test_requests_arrive_as_exponential_histograms_per_method_route_status_consumer(
    otlp, upstream, http, start_proxy
):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await get(http, proxy.url + "/status/200")  # heuristics learn /status/{id} from a 2xx
    plan = {"/items/1?consumer=alice": 7, "/items/2": 5, "/status/404?consumer=bob": 3}
    for path, n in plan.items():
        for _ in range(n):
            await get(http, proxy.url + path)
    await get(http, proxy.url + "/never-seen")  # a 404 on no known route: not counted
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {
        ("GET", "/status/{id}", 200, None): 1,
        ("GET", "/items/{id}", 200, "alice"): 7,
        ("GET", "/items/{id}", 200, None): 5,
        ("GET", "/status/{id}", 404, "bob"): 3,
    }
    sizes = otlp.buckets("http.server.response.body.size")
    alice = sizes[("GET", "/items/{id}", 200, "alice")]
    body = len(b'{"id": "1", "ok": true}')
    assert alice["count"] == 7 and alice["sum"] == 7 * body
    assert alice["buckets"] == {bucket_index(body): 7}
    # GETs carry no body: no request-size observation, as in apitally 1.0.0.
    assert otlp.buckets("http.server.request.body.size") == {}


async def test_every_export_is_authenticated_gzip_protobuf_with_the_env(
    otlp, upstream, http, start_proxy
):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await get(http, proxy.url + "/items/1")
    assert await proxy.stop() == 0
    assert otlp.calls
    for call in otlp.calls:
        assert call.headers["Authorization"] == f"Bearer {TOKEN}"
        assert call.headers["Apitally-Env"] == "test"
        assert call.headers["Content-Type"] == "application/x-protobuf"
        assert call.headers["Content-Encoding"] == "gzip"
    (resource,) = {tuple(sorted(r.items())) for r in otlp.resources()}
    attrs = dict(resource)
    assert attrs["deployment.environment.name"] == "test"
    assert attrs["telemetry.distro.name"] == "apitally-proxy"
    assert len(attrs["service.instance.id"]) == 36
    assert TOKEN not in proxy.log()


async def test_metrics_say_where_payloads_go(otlp, upstream, start_proxy):
    proxy = await start_proxy(upstream.url, env=otlp_env(otlp))
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'apitally_proxy_export_mode{mode="otlp"} 1.0' in text


async def test_an_idle_proxy_exports_its_heartbeat_every_interval(otlp, upstream, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await otlp.wait_for(lambda: len(otlp.gauges()) >= 5, timeout=10)
    assert await proxy.stop() == 0
    gauges = otlp.gauges()
    assert all(
        set(g) == {"process.uptime", "process.cpu.utilization", "process.memory.usage"}
        for g in gauges
    )
    assert 0 <= gauges[-1]["process.cpu.utilization"] <= 1
    assert gauges[-1]["process.memory.usage"] > 10_000_000
    assert gauges[-1]["process.uptime"] > gauges[0]["process.uptime"]
    assert otlp.request_counts() == {}


async def test_startup_event_announces_the_paths(otlp, upstream, http, start_proxy, tmp_path):
    cfg = tmp_path / "routes.toml"
    cfg.write_text('routes = ["GET /items/{id}", "POST /echo"]\nframework = "starlette"\n')
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.3", "--config", str(cfg), env=otlp_env(otlp)
    )
    await otlp.wait_for(lambda: otlp.events("apitally.app.startup"))
    assert await proxy.stop() == 0
    (startup,) = otlp.events("apitally.app.startup")
    assert startup["framework"] == "starlette"
    assert startup["paths"] == [
        {"method": "GET", "path": "/items/{id}"},
        {"method": "POST", "path": "/echo"},
    ]
    assert set(startup["versions"]) >= {"python", "apitally-proxy"}


async def test_consumer_names_travel_as_update_events_once(otlp, upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    for _ in range(3):
        await get(http, proxy.url + "/items/1?consumer=c1&name=Alice&group=Admins")
    await get(http, proxy.url + "/items/1?consumer=c2&name=Bob")
    assert await proxy.stop() == 0
    updates = otlp.events("apitally.consumer.update")
    assert sorted(updates, key=lambda u: u["identifier"]) == [
        {"identifier": "c1", "name": "Alice", "group": "Admins"},
        {"identifier": "c2", "name": "Bob"},
    ]


async def test_a_malformed_token_never_stops_traffic(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, env={"APITALLY_WRITE_TOKEN": "apt_short-secret"})
    assert await get(http, proxy.url + "/items/1") == 200
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/health") as r:
        health = await r.json()
    assert health["mode"] == "local"
    assert (
        "write token" in health["hub_problem"] and "APITALLY_WRITE_TOKEN" in health["hub_problem"]
    )
    assert "apt_short-secret" not in proxy.log() and "short-secret" not in health["hub_problem"]


async def test_with_both_credentials_the_write_token_wins_and_the_client_id_is_named(
    otlp, upstream, http, start_proxy
):
    proxy = await start_proxy(
        upstream.url,
        "--client-id",
        CLIENT_ID,
        "--sync-interval",
        "0.3",
        env=otlp_env(otlp),
    )
    await get(http, proxy.url + "/items/1")
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {("GET", "/items/{id}", 200, None): 1}
    assert f"client id {CLIENT_ID} are set: the write token wins" in proxy.log()


async def test_any_collector_gets_the_same_export_with_its_own_headers(
    otlp, upstream, http, start_proxy
):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=key%20one,x-tenant=acme",
        "OTEL_SERVICE_NAME": "orders-api",
    }
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=env)
    await get(http, proxy.url + "/items/1")
    assert await proxy.stop() == 0
    assert otlp.request_counts() == {("GET", "/items/{id}", 200, None): 1}
    call = otlp.calls[0]
    assert call.headers["x-honeycomb-team"] == "key one" and call.headers["x-tenant"] == "acme"
    assert "Authorization" not in call.headers
    assert {r["service.name"] for r in otlp.resources()} == {"orders-api"}


async def test_the_server_sets_the_export_interval(otlp, upstream, start_proxy):
    otlp.interval_header = "5"
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await asyncio.sleep(3)
    assert await proxy.stop(signal.SIGTERM) == 0
    # Without the header a 0.3 s interval would have made ~10 gauge exports in 3 s.
    assert len(otlp.gauges()) <= 3


async def logging_proxy(start_proxy, upstream, otlp, config):
    """A proxy exporting OTLP every 0.3 s with request logging on, as `config` says."""
    return await start_proxy(
        upstream.url,
        "--sync-interval",
        "0.3",
        "--request-logging",
        "--config",
        str(config),
        env=otlp_env(otlp),
    )


async def test_request_logs_are_server_spans_redacted_as_apitally_1x(
    otlp, upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "log.toml"
    cfg.write_text(
        "[request_log]\nlog_request_headers = true\nlog_request_body = true\n"
        "log_response_body = true\n"
    )
    proxy = await logging_proxy(start_proxy, upstream, otlp, cfg)
    headers = {"Authorization": "Bearer s3cret", "X-Note": "kept", "User-Agent": "agent/1"}
    body = b'{"name": "pen", "password": "hunter2", "nested": {"token": "t", "n": 1}}'
    async with http.post(
        proxy.url + "/echo?api_key=k1&q=ok",
        data=body,
        headers={**headers, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 200
        await r.read()
    await get(http, proxy.url + "/status/503")
    async with http.get(proxy.url + "/any/health") as r:  # excluded from the log, still counted
        await r.read()
    async with http.get(proxy.url + "/items/9", headers={"User-Agent": "kube-probe/1.30"}) as r:
        await r.read()
    assert await proxy.stop() == 0
    spans = {s["name"]: s for s in otlp.spans()}
    assert set(spans) == {"POST /echo", "GET /status/{id}"}
    echo = spans["POST /echo"]
    attrs = echo["attrs"]
    assert echo["kind"] == "SPAN_KIND_SERVER"
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/echo"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/echo" and attrs["url.query"] == "api_key=[REDACTED]&q=ok"
    assert attrs["http.request.body.size"] == len(body) == attrs["http.response.body.size"]
    assert attrs["http.request.header.authorization"] == ["[REDACTED]"]
    assert attrs["http.request.header.x-note"] == ["kept"]
    assert attrs["user_agent.original"] == "agent/1"
    assert attrs["client.address"] == "127.0.0.1"
    redacted = '{"name":"pen","password":"[REDACTED]","nested":{"token":"[REDACTED]","n":1}}'
    assert attrs["apitally.request.body"] == redacted
    # The echo answers application/octet-stream: not a content type whose body is kept.
    assert "apitally.response.body" not in attrs
    failed = spans["GET /status/{id}"]
    assert failed["status"]["code"] == "STATUS_CODE_ERROR"
    assert failed["attrs"]["error.type"] == "503"
    counts = otlp.request_counts()
    assert counts[("GET", "/any/health", 200, None)] == 1  # metered though not logged
    assert counts[("GET", "/items/{id}", 200, None)] == 1


async def test_sample_rate_thins_spans_never_metrics(otlp, upstream, http, start_proxy, tmp_path):
    cfg = tmp_path / "log.toml"
    cfg.write_text("[request_log]\nsample_rate = 0.0\n")
    proxy = await logging_proxy(start_proxy, upstream, otlp, cfg)
    for i in range(20):
        await get(http, f"{proxy.url}/items/{i}")
    assert await proxy.stop() == 0
    assert otlp.spans() == []
    assert otlp.request_counts() == {("GET", "/items/{id}", 200, None): 20}


async def test_402_on_traces_drops_that_export_and_metrics_still_flow(
    otlp, upstream, http, start_proxy
):
    otlp.script["traces"] = [402]
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.3", "--request-logging", env=otlp_env(otlp)
    )
    await get(http, proxy.url + "/items/1")
    await otlp.wait_for(lambda: any(c.signal == "traces" for c in otlp.calls))
    await get(http, proxy.url + "/items/2")
    assert await proxy.stop() == 0
    assert len(otlp.spans()) == 1  # the first export was refused for quota and dropped
    assert otlp.request_counts() == {("GET", "/items/{id}", 200, None): 2}


def test_cpu_utilization_is_a_fraction_even_when_a_short_interval_overshoots():
    # Over a few milliseconds (the final export just after the last) one clock tick of
    # CPU time reads as more than every core: psutil's figure overshoots, ours does not.
    class Overshooting(psutil.Process):
        def cpu_percent(self, interval: float | None = None) -> float:
            return 110.0 * (psutil.cpu_count() or 1)

    codec = OtlpCodec({})
    assert 0 <= codec._gauges()["process.cpu.utilization"][1] <= 1
    codec._process = Overshooting()
    assert codec._gauges()["process.cpu.utilization"] == ("1", 1.0)
