"""The admin server: health, Prometheus metrics and a status page."""

from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from apitally_proxy.metering.prometheus import DURATION_BUCKETS, SIZE_BUCKETS, unpack

StatusFn = Callable[[], dict[str, Any]]


class _ProxyCollector(Collector):
    """Reads the proxy's plain counters at scrape time, so the hot path only adds ints."""

    def __init__(self, status: StatusFn) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        s = self._status()
        by_status = CounterMetricFamily(
            "apitally_proxy_requests", "Requests proxied, by status", labels=["status"]
        )
        for code, n in sorted(s["requests_by_status"].items()):
            by_status.add_metric([str(code)], n)
        yield by_status
        errors = CounterMetricFamily(
            "apitally_proxy_upstream_errors", "Upstream failures, by kind", labels=["kind"]
        )
        for kind, n in sorted(s["upstream_errors"].items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily(
            "apitally_proxy_upstream_retries",
            "Requests retried on a stale pooled connection",
            value=s["upstream_retries"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_refused_requests",
            "Requests answered by the proxy itself (bad target, oversize head, CONNECT)",
            value=s["refused"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_unmatched_requests",
            "Requests matching no known route (not metered)",
            value=s["unmatched"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_route_overflow",
            "Requests counted in the overflow route bucket",
            value=s["route_overflow"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_consumer_overflow",
            "Requests whose consumer exceeded the cap",
            value=s["consumer_overflow"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_consumer_unconfirmed",
            "consumer_header requests counted without a consumer: the app refused the key "
            "(401, 403) or never accepted it",
            value=s["consumer_unconfirmed"],
        )
        yield from _histograms(s.get("histograms", {}))
        yield GaugeMetricFamily(
            "apitally_proxy_in_flight", "Requests being proxied now", value=s["in_flight"]
        )
        hub = s["hub"]
        # The apitally_proxy_hub_* families speak of whichever destination is in use.
        mode = GaugeMetricFamily(
            "apitally_proxy_export_mode",
            "1 for where payloads go: otlp (Apitally 1.x), hub (0.x), collector or local",
            labels=["mode"],
        )
        mode.add_metric([hub["mode"]], 1)
        yield mode
        yield GaugeMetricFamily(
            "apitally_proxy_hub_queue",
            "Payloads (hub syncs or OTLP exports) waiting for delivery",
            value=hub["queued"],
        )
        yield CounterMetricFamily(
            "apitally_proxy_hub_payloads_sent",
            "Payloads accepted by the destination (or written, in local mode)",
            value=hub["sent"],
        )
        dropped = CounterMetricFamily(
            "apitally_proxy_hub_payloads_dropped", "Payloads dropped", labels=["reason"]
        )
        dropped.add_metric(["rejected"], hub["dropped_rejected"])
        dropped.add_metric(["expired"], hub["dropped_expired"])
        dropped.add_metric(["spool_full"], hub["dropped_spool_full"])
        yield dropped
        yield CounterMetricFamily(
            "apitally_proxy_unencodable_values",
            "Payload values that could not be encoded as they were (repaired or dropped; "
            "the rest of each payload was kept)",
            value=hub["unencodable"],
        )
        yield GaugeMetricFamily(
            "apitally_proxy_hub_ok", "1 when the last hub exchange succeeded", value=int(hub["ok"])
        )


def _histograms(snapshot: dict[str, list[Any]]) -> Iterator[Any]:
    labels = ["method", "route", "status"]
    duration = HistogramMetricFamily(
        "apitally_proxy_request_duration_seconds",
        "Response time (to the response head) of metered requests, per route template",
        labels=labels,
    )
    size = HistogramMetricFamily(
        "apitally_proxy_response_size_bytes",
        "Response body bytes of metered requests, per route template",
        labels=labels,
    )
    for key, values in sorted(snapshot.items()):
        names, d_counts, d_sum, s_counts, s_sum = unpack(key, values)
        duration.add_metric(names, _cumulative(DURATION_BUCKETS, d_counts), d_sum)
        size.add_metric(names, _cumulative(SIZE_BUCKETS, s_counts), s_sum)
    yield duration
    yield size


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    out, total = [], 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else str(bound), total))
    return out


def render_status_page(s: dict[str, Any]) -> str:
    """The HTML status page for one status snapshot (every value escaped)."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in s.items()
        if k not in ("recent_payloads", "histograms")  # on /metrics and /status.json
    )
    recent = "".join(
        f"<pre>{html.escape(orjson.dumps(p).decode(errors='replace'))}</pre>"
        for p in reversed(s.get("recent_payloads", []))
    )
    return (
        "<!doctype html><title>apitally-proxy status</title>"
        f"<h1>apitally-proxy</h1><p>{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
        f"<table>{rows}</table><h2>Recent payloads</h2>{recent or '<p>none yet</p>'}"
    )


# Probes need no credential (orchestrators call them); everything else may want one.
OPEN_PATHS = frozenset({"/health", "/healthz"})


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this server: an IP literal, localhost, or an allowed name.

    A DNS-rebinding page reaches the admin port under the attacker's own name
    (`evil.example:9099`); IP literals and `localhost` are what local tools, probes
    and scrapers use.
    """
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _guard(allowed_hosts: frozenset[str], token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if not host_allowed(request.headers.get("Host"), allowed_hosts):
            return web.Response(
                status=421,
                text="unknown Host for the admin server; add it to admin_allowed_hosts\n",
            )
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.Response(
                    status=401,
                    text="admin_token required: Authorization: Bearer <token>\n",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return guard


def build_admin_app(
    status: StatusFn,
    ready: Callable[[], bool],
    allowed_hosts: frozenset[str] = frozenset(),
    token: str | None = None,
) -> web.Application:
    """The admin application; `status` returns the live state as a dict.

    Requests must name an acceptable Host (see `host_allowed`); with `token`, every
    endpoint but the health probes wants `Authorization: Bearer <token>`.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ProxyCollector(status))

    async def health(request: web.Request) -> web.Response:
        s = status()
        is_ready = ready()
        body = {
            "status": "ok" if is_ready else "draining",
            "ready": is_ready,
            "mode": s["hub"]["mode"],
            "hub_ok": s["hub"]["ok"],
            "hub_problem": s["hub"]["problem"],
            # Counted, never fatal: the rest of each payload was kept.
            "unencodable_values": s["hub"]["unencodable"],
        }
        return web.Response(
            body=orjson.dumps(body),
            status=200 if is_ready else 503,
            content_type="application/json",
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # The status is read on the event loop (a snapshot of plain values); serializing
    # and rendering it runs in a thread, so a big page never stalls proxying.
    async def status_json(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(
            orjson.dumps, status(), option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2
        )
        return web.Response(body=body, content_type="application/json")

    async def status_page(request: web.Request) -> web.Response:
        page = await asyncio.to_thread(render_status_page, status())
        return web.Response(text=page, content_type="text/html")

    app = web.Application(middlewares=[_guard(frozenset(h.lower() for h in allowed_hosts), token)])
    app.router.add_get("/health", health)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/", status_page)
    return app
