"""The admin dashboard: its numbers, its escaping, and the page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from apitally_proxy.dashboard import build_view, render_main, render_page
from apitally_proxy.metering.recent import (
    KEEP_SLOTS,
    MAX_KEYS,
    OTHER_ENDPOINT,
    SLOT_SECONDS,
    RecentWindow,
    merge,
    quantile,
)
from tests.support.browser import Browser, chromium_path

HOSTILE = '<img src=x onerror="window.__pwned=1">'


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def status_with(window: RecentWindow, **extra) -> dict:
    base = {
        "version": "test",
        "upstream": "http://127.0.0.1:8000",
        "listen": "127.0.0.1:8080",
        "uptime_s": 3600.0,
        "worker_slot": 0,
        "requests_total": 0,
        "in_flight": 0,
        "upstream_errors": {},
        "routes": {"source": "config", "count": 3, "framework": "flask", "problem": None},
        "consumer_overflow": 0,
        "consumer_unconfirmed": 0,
        "hub": {
            "mode": "otlp",
            "endpoint": "https://hub.apitally.io/v2/otlp",
            "ok": True,
            "problem": None,
            "stopped": False,
            "queued": 0,
            "sent": 3,
            "dropped_rejected": 0,
            "dropped_expired": 0,
            "dropped_spool_full": 0,
            "unencodable": 0,
            "spool_bytes": 0,
            "last_success": 1_800_000_000.0 - 12,
        },
        "request_log": None,
        "recent": window.snapshot(),
    }
    base.update(extra)
    return base


# ---------------------------------------------------------------- numbers


def test_percentiles_error_rates_and_consumers_over_the_last_minutes():
    clock = Clock()
    w = RecentWindow(clock)
    for i in range(100):  # 1 ms .. 100 ms, one each
        w.observe("GET", "/items/{id}", 200, "acme", (i + 1) / 1000, 1000)
    for _ in range(10):
        w.observe("POST", "/orders", 500, None, 0.2, 50)
        w.observe("POST", "/orders", 422, "acme", 0.01, 50)
    w.name_consumer("acme", "Acme Inc", "enterprise")
    view = build_view(status_with(w), now=clock.now)
    items, orders = view["endpoints"]
    assert (items["method"], items["route"], items["requests"]) == ("GET", "/items/{id}", 100)
    assert items["error_rate"] == 0
    # Bucketed estimates: within the bucket width (40 %) of the true values.
    assert 35 <= items["p50_ms"] <= 70 and 80 <= items["p95_ms"] <= 135
    assert items["mean_response_bytes"] == 1000
    assert orders["requests"] == 20 and orders["server_errors"] == 10
    assert orders["client_errors"] == 10 and orders["error_rate"] == 1.0
    (acme,) = view["consumers"]
    assert (acme["identifier"], acme["name"], acme["group"]) == ("acme", "Acme Inc", "enterprise")
    assert acme["requests"] == 110 and acme["client_errors"] == 10
    assert view["totals"]["requests"] == 120
    assert view["totals"]["per_minute"] == 120 / 5  # five minutes covered
    assert view["series"][-1]["requests"] == 120
    assert len(view["series"]) == 600 // SLOT_SECONDS


def test_old_slots_leave_the_tables_and_then_the_window():
    clock = Clock()
    w = RecentWindow(clock)
    w.observe("GET", "/old", 200, "early", 0.01, 1)
    clock.now += 400  # past the tables' five minutes, still in the chart's ten
    w.advance()  # the worker's one-second timer
    w.observe("GET", "/new", 200, None, 0.01, 1)
    view = build_view(status_with(w), now=clock.now)
    assert [r["route"] for r in view["endpoints"]] == ["/new"]
    assert view["consumers"] == []
    assert sum(p["requests"] for p in view["series"]) == 2
    clock.now += KEEP_SLOTS * SLOT_SECONDS
    w.advance()
    w.observe("GET", "/newer", 200, None, 0.01, 1)
    assert len(w.snapshot()["slots"]) == 1


def test_a_flood_of_endpoints_is_bounded_per_slot():
    w = RecentWindow(Clock())
    for i in range(MAX_KEYS * 5):
        w.observe("GET", f"/r{i}", 200, f"c{i}", 0.001, 1)
    (slot,) = w.snapshot()["slots"].values()
    assert len(slot["endpoints"]) == MAX_KEYS + 1
    assert slot["endpoints"][OTHER_ENDPOINT][0] == MAX_KEYS * 4
    assert len(slot["consumers"]) == MAX_KEYS + 1


def test_workers_windows_add_up():
    clock = Clock()
    a, b = RecentWindow(clock), RecentWindow(clock)
    for _ in range(3):
        a.observe("GET", "/x", 200, "c", 0.01, 10)
    for _ in range(4):
        b.observe("GET", "/x", 503, "c", 0.02, 10)
    b.observe_unmatched()
    merged = a.snapshot()
    merge(merged, b.snapshot())
    view = build_view(status_with(a, recent=merged), now=clock.now)
    (x,) = view["endpoints"]
    assert x["requests"] == 7 and x["server_errors"] == 4
    assert view["consumers"][0]["requests"] == 7
    assert view["totals"]["unmatched"] == 1


def test_quantile_of_nothing_is_none_and_of_one_bucket_is_inside_it():
    assert quantile([0] * 10, 0.5) is None
    buckets = [0] * 37
    buckets[10] = 5
    from apitally_proxy.metering.recent import LATENCY_BOUNDS

    assert LATENCY_BOUNDS[9] <= quantile(buckets, 0.99) <= LATENCY_BOUNDS[10]


def test_health_is_said_in_plain_words():
    w = RecentWindow(Clock())
    down = status_with(w)
    down["hub"].update(ok=False, problem="connection refused", queued=4, spool_bytes=12_345)
    down["hub"]["dropped_expired"] = 2
    down["upstream_errors"] = {"connect": 3}
    down["routes"] = {"source": None, "count": None, "framework": None, "problem": None}
    lines = {h["what"]: h for h in build_view(down, now=1_800_000_000.0)["health"]}
    assert lines["Export"]["level"] == "error"
    assert lines["Export"]["text"] == (
        "not delivering to Apitally (OpenTelemetry) at https://hub.apitally.io/v2/otlp: "
        "connection refused; 4 payloads queued (12.3 KB on disk), kept and retried"
    )
    assert lines["Dropped payloads"]["text"] == "2 since start (expired 2)"
    assert lines["Upstream"]["level"] == "warn"
    assert "3 failed exchanges since start (connect 3)" in lines["Upstream"]["text"]
    assert lines["Routes"]["text"].startswith("no route list: 0 templates inferred from traffic")
    ok = {h["what"]: h for h in build_view(status_with(w), now=1_800_000_000.0)["health"]}
    assert ok["Export"]["text"].endswith("last success 12 s ago; 0 payloads queued (0 B on disk)")
    assert ok["Routes"]["text"] == "3 routes declared in the config file; framework flask"


def test_every_value_from_the_app_or_a_client_is_escaped():
    clock = Clock()
    w = RecentWindow(clock)
    w.observe("GET", f"/x/{HOSTILE}", 200, HOSTILE, 0.01, 1)
    w.name_consumer(HOSTILE, HOSTILE, "</td></tr></table><script>alert(1)</script>")
    w.observe_validation_errors("POST", "/y", [(["body", HOSTILE], HOSTILE, "<b>type</b>")])
    st = status_with(w, upstream=HOSTILE)
    st["hub"].update(ok=False, problem=HOSTILE)
    page = render_page(build_view(st, now=clock.now))
    assert "<img" not in page and "<script>alert" not in page and "<b>type" not in page
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in page
    # The page's only script is its own refresh script.
    assert len(re.findall("<script", page)) == 1


def test_an_empty_proxy_renders_a_page_that_says_so():
    main = render_main(build_view(status_with(RecentWindow(Clock())), now=1_800_000_000.0))
    assert "No metered requests in this window." in main
    assert "No consumer identified in this window" in main


# ---------------------------------------------------------------- the real page


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = chromium_path()
    if path is None:
        if os.environ.get("APITALLY_PROXY_SKIP_BROWSER"):
            pytest.skip("APITALLY_PROXY_SKIP_BROWSER is set and chromium is not installed")
        pytest.fail("chromium is not installed (scripts/test installs it with apt-get)")
    b = await Browser(path).start()
    try:
        yield b
    finally:
        await b.close()


async def traffic(http: aiohttp.ClientSession, proxy_url: str) -> None:
    for i in range(30):
        async with http.get(f"{proxy_url}/items/{i}?consumer=acme&name=Acme%20Inc") as r:
            assert r.status == 200
    for code in (404, 500, 500, 503):
        async with http.get(f"{proxy_url}/status/{code}") as r:
            assert r.status == code
    hostile = aiohttp.helpers.quote(HOSTILE, safe="")
    async with http.get(f"{proxy_url}/items/1?consumer=evil&name={hostile}") as r:
        assert r.status == 200


async def test_the_dashboard_in_chromium_shows_live_traffic_escaped(
    upstream, http, start_proxy, browser
):
    proxy = await start_proxy(upstream.url, "--sync-interval", "1")
    await browser.goto(proxy.admin_url + "/status")
    assert await browser.evaluate("document.title") == "apitally-proxy"
    assert "No metered requests" in await browser.evaluate("document.body.innerText")
    await browser.screenshot("dashboard-empty")

    await traffic(http, proxy.url)
    # No reload: the page refreshes itself.
    text = await browser.wait_for(
        "document.body.innerText.includes('/items/{id}') && document.body.innerText"
    )
    assert await browser.evaluate("performance.getEntriesByType('navigation').length") == 1
    rows = await browser.evaluate(
        "[...document.querySelectorAll('section table')[0].rows].map(r => r.innerText)"
    )
    items_row = next(r for r in rows if "/items/{id}" in r)
    assert items_row.split("\t")[:3] == ["GET", "/items/{id}", "31"]
    status_row = next(r for r in rows if "/status/{id}" in r)
    # The 404 is not metered (a path the app does not know); the three 5xx are.
    assert status_row.split("\t")[2:4] == ["3", "100.0 %"]
    assert "Acme Inc" in text and "local mode" in text
    # The hostile consumer name is shown as text and ran nothing.
    assert HOSTILE in text
    assert await browser.evaluate("window.__pwned === undefined")
    assert await browser.evaluate("document.querySelectorAll('main img, main script').length") == 0
    assert await browser.evaluate("document.querySelectorAll('svg.chart rect.bar').length") > 0
    assert await browser.evaluate("document.getElementById('state').textContent") == "live"
    shot = await browser.screenshot("dashboard-traffic")
    assert shot.stat().st_size > 10_000
    assert browser.problems == [], browser.problems
    assert await proxy.stop() == 0


async def test_the_dashboard_says_when_apitally_is_unreachable(upstream, start_proxy, browser):
    proxy = await start_proxy(
        upstream.url,
        "--sync-interval",
        "0.3",
        env={
            "APITALLY_WRITE_TOKEN": "apt_" + "a" * 24,
            "APITALLY_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens on port 9
        },
    )
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.get(f"{proxy.url}/items/{i}") as r:
                assert r.status == 200
    await proxy.wait_status(lambda st: st["hub"]["problem"], timeout=20)
    await browser.goto(proxy.admin_url + "/status")
    text = await browser.wait_for(
        "document.body.innerText.includes('not delivering') && document.body.innerText"
    )
    assert "not delivering to Apitally (OpenTelemetry) at http://127.0.0.1:9" in text
    assert "kept and retried" in text
    level = await browser.evaluate(
        "[...document.querySelectorAll('.health li')].find(li => "
        "li.innerText.startsWith('Export')).className"
    )
    assert level == "error"
    await browser.screenshot("dashboard-export-down")
    assert browser.problems == [], browser.problems
    await proxy.kill()


async def test_the_json_api_behind_the_page(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    await traffic(http, proxy.url)
    async with http.get(proxy.admin_url + "/dashboard.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        view = await r.json()
    by_route = {(e["method"], e["route"]): e for e in view["endpoints"]}
    assert by_route["GET", "/items/{id}"]["requests"] == 31
    assert by_route["GET", "/status/{id}"]["server_errors"] == 3
    assert {c["identifier"]: c["name"] for c in view["consumers"]} == {
        "acme": "Acme Inc",
        "evil": HOSTILE,  # raw in JSON: escaping is the page's job
    }
    assert view["proxy"]["mode"] == "local"
    async with http.get(proxy.admin_url + "/status") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
        assert r.headers["Cache-Control"] == "no-store"
    async with http.get(proxy.admin_url + "/status?part=main") as r:
        part = await r.text()
    assert part.startswith('<p class="meta">') and "<script" not in part
    await asyncio.sleep(0)
    assert await proxy.stop() == 0


async def test_two_workers_show_as_one_dashboard(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--workers", "2")
    for i in range(40):
        # New connections, so both workers get some (SO_REUSEPORT spreads connections).
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200

    def counted(view: dict) -> int:
        return sum(e["requests"] for e in view["endpoints"])

    for _ in range(50):  # the other worker publishes every 2 s
        async with http.get(proxy.admin_url + "/dashboard.json") as r:
            view = await r.json()
        if counted(view) == 40 and len(view["proxy"]["workers_reporting"]) == 2:
            break
        await asyncio.sleep(0.2)
    assert counted(view) == 40
    assert view["proxy"]["workers_reporting"] == [0, 1]
    assert await proxy.stop() == 0
