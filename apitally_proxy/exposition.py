"""The Prometheus families of `/metrics`, read from the live status at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from apitally_proxy.metering.prometheus import DURATION_BUCKETS, SIZE_BUCKETS, unpack

StatusFn = Callable[[], dict[str, Any]]


# Status fields shown as one plain family each: (field, family, counter?, help). The
# other fields feed the labelled families below (FAMILY_FIELDS); tests/test_status.py holds
# both against the status dataclasses, so a counter added there cannot miss /metrics.
Scalar = tuple[str, str, bool, str]
SCALARS: tuple[Scalar, ...] = (
    (
        "upstream_retries",
        "apitally_proxy_upstream_retries",
        True,
        "Requests retried on a stale pooled connection",
    ),
    (
        "refused",
        "apitally_proxy_refused_requests",
        True,
        "Requests answered by the proxy itself (bad target, oversize head, CONNECT)",
    ),
    (
        "unmatched",
        "apitally_proxy_unmatched_requests",
        True,
        "Requests matching no known route (not metered)",
    ),
    (
        "route_overflow",
        "apitally_proxy_route_overflow",
        True,
        "Requests counted in the overflow route bucket",
    ),
    (
        "consumer_overflow",
        "apitally_proxy_consumer_overflow",
        True,
        "Requests whose consumer exceeded the cap",
    ),
    (
        "consumer_unconfirmed",
        "apitally_proxy_consumer_unconfirmed",
        True,
        "consumer_header requests counted without a consumer: the app refused the key "
        "(401, 403) or never accepted it",
    ),
    ("in_flight", "apitally_proxy_in_flight", False, "Requests being proxied now"),
)
EXPORT_SCALARS: tuple[Scalar, ...] = (
    (
        "unencodable",
        "apitally_proxy_unencodable_values",
        True,
        "Payload values that could not be encoded as they were (repaired or dropped; "
        "the rest of each payload was kept)",
    ),
    (
        "recovered_after_crash",
        "apitally_proxy_crash_recoveries",
        True,
        "Checkpoints of a predecessor that did not shut down cleanly, found at start-up "
        "and queued as payloads of their own",
    ),
)
# Fields read by the labelled and special families (per status part).
FAMILY_FIELDS = {
    "worker": frozenset(
        {
            "requests_by_status",
            "upstream_errors",
            "validation_error_overflow",
            "route_override_overflow",
            "histogram_overflow",
            "requests_total",  # the sum of apitally_proxy_requests_total{status}
        }
    ),
    "export": frozenset(
        {
            "sent",
            "dropped_rejected",
            "dropped_expired",
            "dropped_spool_full",
            "ok",
            "queued",
            "spool_bytes",
            "last_success",
        }
    ),
    "request_log": frozenset(
        {"logged", "dropped", "files_sent", "files_dropped", "buffered", "waiting_files"}
    ),
}


def _labelled(name: str, help_text: str, label: str, samples: Any) -> CounterMetricFamily:
    """A counter family with one label, from (label value, count) pairs."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, n in samples:
        family.add_metric([str(value)], n)
    return family


def _scalars(values: dict[str, Any], scalars: tuple[Scalar, ...]) -> Iterator[Any]:
    for field, name, counter, help_text in scalars:
        value = values.get(field) or 0
        if counter:
            yield CounterMetricFamily(name, help_text, value=value)
        else:
            yield GaugeMetricFamily(name, help_text, value=value)


class ProxyCollector(Collector):
    """Reads the proxy's plain counters at scrape time, so the hot path only adds ints."""

    def __init__(self, status: StatusFn) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        s = self._status()
        yield _labelled(
            "apitally_proxy_requests",
            "Requests proxied, by status",
            "status",
            sorted(s["requests_by_status"].items()),
        )
        yield _labelled(
            "apitally_proxy_upstream_errors",
            "Upstream failures, by kind",
            "kind",
            sorted(s["upstream_errors"].items()),
        )
        yield from _scalars(s, SCALARS)
        yield _labelled(
            "apitally_proxy_cap_overflow",
            "Requests or values counted in an overflow bucket because a cap was reached: "
            "validation errors per interval, X-Apitally-Route values per method, "
            "/metrics histogram series",
            "cap",
            (
                ("validation_errors", s.get("validation_error_overflow", 0)),
                ("route_overrides", s.get("route_override_overflow", 0)),
                ("histogram_series", s.get("histogram_overflow", 0)),
            ),
        )
        yield from _histograms(s.get("histograms", {}))
        hub = s["hub"]
        mode = GaugeMetricFamily(
            "apitally_proxy_export_mode",
            "1 for where payloads go: otlp (Apitally 1.x), hub (0.x), collector or local",
            labels=["mode"],
        )
        mode.add_metric([hub["mode"]], 1)
        yield mode
        yield from _export(hub)
        yield from _scalars(hub, EXPORT_SCALARS)
        yield from _deprecated_hub(hub)
        if s.get("request_log") is not None:
            yield from _request_log(s["request_log"])


# What became of each sync payload or OTLP export, whatever the destination. `sent`
# in the status is what the transport took: the destination's 2xx, or, in local mode,
# the line written to the file.
OUTCOMES = ("delivered", "written", "rejected", "expired", "spool_full")


def _outcomes(hub: dict[str, Any]) -> dict[str, int]:
    local = hub["mode"] == "local"
    return {
        "delivered": 0 if local else hub["sent"],
        "written": hub["sent"] if local else 0,
        "rejected": hub["dropped_rejected"],
        "expired": hub["dropped_expired"],
        "spool_full": hub["dropped_spool_full"],
    }


def _export(hub: dict[str, Any]) -> Iterator[Any]:
    counts = _outcomes(hub)
    yield _labelled(
        "apitally_proxy_export_payloads",
        "Sync payloads (hub) or exports (OTLP) by what became of them: delivered (accepted "
        "by the hub, the OTLP endpoint or the collector), written (local mode's file), "
        "rejected (refused for good, dropped), expired (older than queue_max_age), "
        "spool_full (oldest dropped past spool_max_bytes)",
        "outcome",
        ((outcome, counts[outcome]) for outcome in OUTCOMES),
    )
    yield GaugeMetricFamily(
        "apitally_proxy_export_queue_payloads",
        "Payloads spooled (or held in memory) waiting for delivery",
        value=hub["queued"],
    )
    yield GaugeMetricFamily(
        "apitally_proxy_export_ok",
        "1 when the last exchange with the destination (or the local file) succeeded",
        value=int(hub["ok"]),
    )
    yield GaugeMetricFamily(
        "apitally_proxy_export_spool_bytes",
        "Bytes of payloads waiting in the spool (bounded by spool_max_bytes)",
        value=hub.get("spool_bytes", 0),
    )
    last = GaugeMetricFamily(
        "apitally_proxy_export_last_success_timestamp_seconds",
        "Unix time the destination last accepted a payload (local mode: last written); "
        "no sample until the first success",
    )
    if hub.get("last_success") is not None:
        last.add_metric([], hub["last_success"])
    yield last


def _deprecated_hub(hub: dict[str, Any]) -> Iterator[Any]:
    """The names before the export_* families, kept for one release (same values)."""
    yield GaugeMetricFamily(
        "apitally_proxy_hub_queue",
        "Deprecated: use apitally_proxy_export_queue_payloads. Payloads waiting for delivery",
        value=hub["queued"],
    )
    yield CounterMetricFamily(
        "apitally_proxy_hub_payloads_sent",
        'Deprecated: use apitally_proxy_export_payloads_total{outcome=~"delivered|written"}. '
        "Payloads accepted by the destination (or written, in local mode)",
        value=hub["sent"],
    )
    yield _labelled(
        "apitally_proxy_hub_payloads_dropped",
        'Deprecated: use apitally_proxy_export_payloads_total{outcome=~"rejected|expired|'
        'spool_full"}. Payloads dropped',
        "reason",
        (
            ("rejected", hub["dropped_rejected"]),
            ("expired", hub["dropped_expired"]),
            ("spool_full", hub["dropped_spool_full"]),
        ),
    )
    yield GaugeMetricFamily(
        "apitally_proxy_hub_ok",
        "Deprecated: use apitally_proxy_export_ok. 1 when the last exchange succeeded",
        value=int(hub["ok"]),
    )


def _request_log(rl: dict[str, Any]) -> Iterator[Any]:
    """Only with request logging on (the families are absent otherwise)."""
    yield _labelled(
        "apitally_proxy_request_log_requests",
        "Requests handed to the request log: logged (written to a log file or span), "
        "dropped (buffer full: max_buffered_requests or 16 MB of bodies)",
        "outcome",
        (("logged", rl["logged"]), ("dropped", rl["dropped"])),
    )
    yield _labelled(
        "apitally_proxy_request_log_files",
        "Request log files done with: delivered (uploaded to the hub), dropped (rejected, "
        "unreadable, discarded on the hub's 402, or past the 50 kept; local mode: the "
        "oldest deleted)",
        "outcome",
        (("delivered", rl["files_sent"]), ("dropped", rl["files_dropped"])),
    )
    yield GaugeMetricFamily(
        "apitally_proxy_request_log_buffered_requests",
        "Requests buffered in memory for the request log writer",
        value=rl["buffered"],
    )
    yield GaugeMetricFamily(
        "apitally_proxy_request_log_waiting_files",
        "Request log files waiting for upload (local mode: kept on disk)",
        value=rl["waiting_files"],
    )
    now = time.time()
    paused = GaugeMetricFamily(
        "apitally_proxy_request_log_paused",
        "1 while request logging is off for a while: quota (the hub's 402 with "
        "Retry-After) or write_error (disk trouble, 60 s)",
        labels=["reason"],
    )
    for reason, key in (("quota", "suspended_until"), ("write_error", "paused_until")):
        until = rl.get(key)
        paused.add_metric([reason], int(until is not None and until > now))
    yield paused


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
