"""The Prometheus families of `/metrics`, read from the live status at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from apitally_proxy.metering.prometheus import DURATION_BUCKETS, SIZE_BUCKETS, unpack

StatusFn = Callable[[], dict[str, Any]]


class ProxyCollector(Collector):
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
