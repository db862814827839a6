"""The exporter families of /metrics, named for what happened whatever the destination:
scraped from real proxy processes in local, hub and OTLP mode and parsed as Prometheus
parses them. The deprecated apitally_proxy_hub_* aliases keep their values for a release.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLIENT_ID
from tests.support.fake_otlp import get, otlp_env
from tests.support.proxy_process import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = "apitally_proxy_export_payloads_total"
OUTCOMES = {"delivered", "written", "rejected", "expired", "spool_full"}
DEPRECATED = {
    "apitally_proxy_hub_queue": "apitally_proxy_export_queue_payloads",
    "apitally_proxy_hub_payloads_sent": PAYLOADS,
    "apitally_proxy_hub_payloads_dropped": PAYLOADS,
    "apitally_proxy_hub_ok": "apitally_proxy_export_ok",
}

Families = dict[str, Any]  # family name (as the parser gives it) -> Metric


# ---- scraping (also used by test_grafana_dashboard.py) ------------------------------------


async def scrape(proxy: ProxyProcess) -> Families:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: Families, sample: str, **labels: str) -> float | None:
    """The value of the sample named `sample` whose labels include `labels`, if any."""
    for family in families.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def outcomes(families: Families) -> dict[str, float]:
    family = families["apitally_proxy_export_payloads"]
    assert family.type == "counter"
    return {s.labels["outcome"]: s.value for s in family.samples}


async def wait_metrics(proxy: ProxyProcess, predicate, timeout: float = 15.0) -> Families:
    """The scrape once `predicate(families)` holds (counters move after the fact)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        families = await scrape(proxy)
        if predicate(families):
            return families
        if loop.time() > deadline:
            raise AssertionError(
                f"/metrics: condition not met in {timeout} s: {outcomes(families)}\n{proxy.log()}"
            )
        await asyncio.sleep(0.1)


def series_names(families: Families) -> set[str]:
    """The names PromQL can select, derived from each family's type: counters as
    `<name>_total`, histograms as `_bucket`/`_sum`/`_count`, gauges as they are."""
    names: set[str] = set()
    for name, family in families.items():
        if family.type == "counter":
            names.add(f"{name}_total")
        elif family.type == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
        # The suffix rules must match what is actually on the wire.
        assert {s.name for s in family.samples} <= names, family
    return names


def exposed_names(families: Families) -> set[str]:
    """Family names as documented: counters with `_total`, others as the family."""
    return {f"{n}_total" if f.type == "counter" else n for n, f in families.items()}


def check_deprecated_aliases(families: Families) -> None:
    for old, new in DEPRECATED.items():
        assert families[old].documentation.startswith(f"Deprecated: use {new}"), old
    counts = outcomes(families)
    assert value(families, "apitally_proxy_hub_payloads_sent_total") == (
        counts["delivered"] + counts["written"]
    )
    for reason in ("rejected", "expired", "spool_full"):
        dropped = value(families, "apitally_proxy_hub_payloads_dropped_total", reason=reason)
        assert dropped == counts[reason], reason
    assert value(families, "apitally_proxy_hub_queue") == value(
        families, "apitally_proxy_export_queue_payloads"
    )
    assert value(families, "apitally_proxy_hub_ok") == value(families, "apitally_proxy_export_ok")


def check_types(families: Families) -> None:
    assert families["apitally_proxy_export_payloads"].type == "counter"
    assert set(outcomes(families)) == OUTCOMES  # every outcome always present: rate() works
    for gauge in (
        "apitally_proxy_export_queue_payloads",
        "apitally_proxy_export_ok",
        "apitally_proxy_export_last_success_timestamp_seconds",
        "apitally_proxy_export_mode",
        "apitally_proxy_export_spool_bytes",
    ):
        assert families[gauge].type == "gauge", gauge
    assert families["apitally_proxy_crash_recoveries"].type == "counter"


def mode_of(families: Families) -> str:
    (sample,) = families["apitally_proxy_export_mode"].samples
    assert sample.value == 1
    return sample.labels["mode"]


async def traffic(http: aiohttp.ClientSession, url: str, n: int = 5) -> None:
    for i in range(n):
        assert await get(http, f"{url}/items/{i}") == 200


# ---- local mode ----------------------------------------------------------------------------


async def test_local_mode_counts_payloads_written_and_never_delivered(upstream, http, start_proxy):
    started = time.time()
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3")
    await traffic(http, proxy.url)
    families = await wait_metrics(proxy, lambda f: outcomes(f)["written"] >= 2)
    check_types(families)
    assert mode_of(families) == "local"
    counts = outcomes(families)
    assert counts["delivered"] == 0  # nothing leaves the machine in local mode
    assert counts["rejected"] == counts["expired"] == counts["spool_full"] == 0
    assert value(families, "apitally_proxy_export_ok") == 1
    assert value(families, "apitally_proxy_export_queue_payloads") is not None
    last = value(families, "apitally_proxy_export_last_success_timestamp_seconds")
    assert last is not None and started - 1 <= last <= time.time() + 1
    assert value(families, "apitally_proxy_crash_recoveries_total") == 0
    check_deprecated_aliases(families)
    # Written means written: at least that many sync lines are in the local file.
    lines = (proxy.state_dir / "local" / "worker-0.jsonl").read_bytes().splitlines()
    syncs = [orjson.loads(line) for line in lines if orjson.loads(line)["kind"] == "sync"]
    assert len(syncs) >= counts["written"]
    # Request logging is off: its families are absent, not zeros pretending.
    assert not [n for n in families if n.startswith("apitally_proxy_request_log")]


async def test_request_log_families_appear_with_request_logging(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", "--request-logging")
    await traffic(http, proxy.url, 3)
    families = await wait_metrics(
        proxy,
        lambda f: value(f, "apitally_proxy_request_log_requests_total", outcome="logged") == 3,
    )
    assert value(families, "apitally_proxy_request_log_requests_total", outcome="dropped") == 0
    assert value(families, "apitally_proxy_request_log_files_total", outcome="delivered") == 0
    assert value(families, "apitally_proxy_request_log_buffered_requests") == 0
    assert value(families, "apitally_proxy_request_log_waiting_files") is not None
    for reason in ("quota", "write_error"):
        assert value(families, "apitally_proxy_request_log_paused", reason=reason) == 0


async def test_a_crashed_predecessor_recovered_is_counted(upstream, http, start_proxy, tmp_path):
    state = tmp_path / "crash-state"
    first = await start_proxy(upstream.url, "--sync-interval", "3600", state_dir=state)
    await traffic(http, first.url)
    # The checkpoint runs every second; only the first (immediate) sync went out.
    await asyncio.sleep(2.5)
    await first.kill()
    second = await start_proxy(upstream.url, "--sync-interval", "3600", state_dir=state)
    await wait_metrics(second, lambda f: value(f, "apitally_proxy_crash_recoveries_total") == 1)
    await asyncio.sleep(0.5)
    assert value(await scrape(second), "apitally_proxy_crash_recoveries_total") == 1  # once


# ---- hub mode ------------------------------------------------------------------------------


async def test_hub_mode_counts_delivered_and_rejected(hub, upstream, http, start_proxy, hub_args):
    hub.script["sync"] = [422]  # the first sync payload is refused for good
    proxy = await start_proxy(upstream.url, *hub_args)
    await traffic(http, proxy.url)
    families = await wait_metrics(
        proxy, lambda f: outcomes(f)["rejected"] == 1 and outcomes(f)["delivered"] >= 2
    )
    check_types(families)
    assert mode_of(families) == "hub"
    counts = outcomes(families)
    assert counts["written"] == 0
    assert counts["expired"] == counts["spool_full"] == 0
    assert counts["rejected"] == len([c for c in hub.calls if c.kind == "sync" and c.status == 422])
    # The hub records a payload before answering; the proxy counts it after the answer.
    assert counts["delivered"] <= len(hub.accepted("sync"))
    last = value(families, "apitally_proxy_export_last_success_timestamp_seconds")
    assert last is not None and abs(time.time() - last) < 10
    check_deprecated_aliases(families)


async def test_undeliverable_payloads_expire_and_show(upstream, http, start_proxy, tmp_path):
    config = tmp_path / "expire.toml"
    config.write_text("queue_max_age = 1\n")
    proxy = await start_proxy(upstream.url, *_unreachable_hub(), "--config", str(config))
    await traffic(http, proxy.url)
    families = await wait_metrics(proxy, lambda f: outcomes(f)["expired"] >= 1, timeout=30)
    counts = outcomes(families)
    assert counts["delivered"] == counts["written"] == counts["rejected"] == 0
    assert value(families, "apitally_proxy_export_ok") == 0
    # Never a success: the family is there, without a sample (not a made-up 0).
    assert families["apitally_proxy_export_last_success_timestamp_seconds"].samples == []
    check_deprecated_aliases(families)


async def test_spool_full_drops_are_on_metrics(upstream, http, start_proxy, tmp_path):
    """docs/reliability.md ("Nothing lost"): the spool is bounded by spool_max_bytes, the oldest are
    dropped and counted on /metrics. One interval of 400 named consumers (~200 KB of
    rows), then the next payload: the first goes."""
    config = tmp_path / "spool.toml"
    config.write_text("spool_max_bytes = 100000\n")
    proxy = await start_proxy(upstream.url, *_unreachable_hub(), "--config", str(config))
    for i in range(400):
        consumer = f"consumer-{i:04d}-" + "c" * 100
        query = f"consumer={consumer}&name=Customer+{i}+{'n' * 50}&group=Group+{'g' * 55}"
        assert await get(http, f"{proxy.url}/items/1?{query}") == 200
    families = await wait_metrics(proxy, lambda f: outcomes(f)["spool_full"] >= 1, timeout=40)
    counts = outcomes(families)
    assert counts["delivered"] == counts["written"] == counts["rejected"] == 0
    assert "spool over 100000 bytes" in proxy.log()
    assert value(families, "apitally_proxy_export_spool_bytes") > 0  # what is still waiting
    check_deprecated_aliases(families)


def _unreachable_hub() -> list[str]:
    """A hub URL nobody listens on: every delivery fails and is retried."""
    url = f"http://127.0.0.1:{free_port()}"
    return ["--client-id", CLIENT_ID, "--env", "test", "--hub-url", url, "--sync-interval", "0.3"]


# ---- OTLP mode -----------------------------------------------------------------------------


async def test_otlp_mode_counts_exports_delivered_and_rejected(otlp, upstream, http, start_proxy):
    otlp.script["metrics"] = [400]  # the first metrics export is refused for good
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await traffic(http, proxy.url)
    families = await wait_metrics(
        proxy, lambda f: outcomes(f)["rejected"] == 1 and outcomes(f)["delivered"] >= 2
    )
    check_types(families)
    assert mode_of(families) == "otlp"
    counts = outcomes(families)
    assert counts["written"] == 0
    assert counts["expired"] == counts["spool_full"] == 0
    # Startup announcements are not sync payloads; exports of every signal are.
    assert counts["delivered"] <= len([c for c in otlp.calls if 200 <= c.status < 300])
    assert value(families, "apitally_proxy_export_ok") == 1
    check_deprecated_aliases(families)


# ---- the documentation ---------------------------------------------------------------------


async def test_every_family_on_metrics_is_documented(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", "--request-logging")
    await traffic(http, proxy.url, 3)
    families = await wait_metrics(
        proxy,
        lambda f: (
            outcomes(f)["written"] >= 1
            and value(f, "apitally_proxy_request_log_requests_total", outcome="logged") == 3
        ),
    )
    doc = (ROOT / "docs" / "prometheus.md").read_text()
    documented = set(re.findall(r"^\| `(apitally_proxy_[a-z_]+)`", doc, re.MULTILINE))
    missing = exposed_names(families) - documented
    assert not missing, f"on /metrics but not in docs/prometheus.md: {sorted(missing)}"
    for old in DEPRECATED:
        assert old in doc


async def test_every_cap_overflow_is_on_metrics(upstream, http, start_proxy):
    """Caps other than routes and consumers: counted and shown, never silent."""
    proxy = await start_proxy(upstream.url)
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200
    await proxy.wait_status(lambda st: st["requests_total"] >= 1)
    async with http.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    caps = {
        s.labels["cap"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "apitally_proxy_cap_overflow"
        for s in family.samples
    }
    assert caps == {"validation_errors": 0, "route_overrides": 0, "histogram_series": 0}
    assert await proxy.stop() == 0
