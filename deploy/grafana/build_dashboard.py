"""Writes apitally-proxy.json, the Grafana dashboard for the proxy's /metrics.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

The JSON is what users import; this script is the source. tests/test_grafana_dashboard.py
checks the JSON is up to date and that every metric it queries is on a real /metrics.
Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("apitally-proxy.json")

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'job=~"$job", instance=~"$instance"'
ROUTE_SEL = f'{SEL}, route=~"$route"'
RATE = "$__rate_interval"
DURATION = "apitally_proxy_request_duration_seconds"
SIZE = "apitally_proxy_response_size_bytes"


def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": True}


class Board:
    """Lays panels out left to right on Grafana's 24-column grid, numbering them."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = self._row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self._x:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": self._place(24, 1),
                "id": len(self.panels) + 1,
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self._x, self._y, self._row_h = 0, self._y + 1, 0

    def add(
        self,
        kind: str,
        title: str,
        description: str,
        targets: list[dict[str, Any]],
        *,
        unit: str = "short",
        w: int = 12,
        h: int = 8,
        options: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
        overrides: list[dict[str, Any]] | None = None,
    ) -> None:
        for i, t in enumerate(targets):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(
            {
                "datasource": DS,
                "description": description,
                "fieldConfig": {
                    "defaults": {"unit": unit, **(defaults or {})},
                    "overrides": overrides or [],
                },
                "gridPos": self._place(w, h),
                "id": len(self.panels) + 1,
                "options": options or {},
                "targets": targets,
                "title": title,
                "type": kind,
            }
        )

    def timeseries(self, title: str, description: str, *targets: dict[str, Any], **kw: Any):
        stacked = kw.pop("stacked", False)
        defaults = {
            "custom": {
                "drawStyle": "line",
                "fillOpacity": 20 if stacked else 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"group": "A", "mode": "normal" if stacked else "none"},
            },
            "min": 0,
            **kw.pop("defaults", {}),
        }
        options = {
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        self.add(
            "timeseries",
            title,
            description,
            list(targets),
            options=options,
            **kw,
            defaults=defaults,
        )

    def stat(self, title: str, description: str, *targets: dict[str, Any], **kw: Any):
        options = {
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": kw.pop("text_mode", "auto"),
        }
        self.add(
            "stat",
            title,
            description,
            list(targets),
            options=options,
            w=kw.pop("w", 4),
            h=kw.pop("h", 4),
            **kw,
        )


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": color, "value": v} for v, color in steps],
        }
    }


def color(name: str, fixed: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": "color", "value": {"fixedColor": fixed, "mode": "fixed"}}],
    }


def right_axis(ref_id: str, unit: str) -> dict[str, Any]:
    """The series of query `ref_id` on a right-hand axis in `unit`."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref_id},
        "properties": [
            {"id": "unit", "value": unit},
            {"id": "custom.axisPlacement", "value": "right"},
        ],
    }


def quantile(q: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{ROUTE_SEL}}}[{RATE}])))"


def share(status_class: str) -> str:
    """The share of requests answered `status_class`xx (0, not no data, when none were)."""
    part = f'apitally_proxy_requests_total{{{SEL}, status=~"{status_class}.."}}'
    return (
        f"(sum(rate({part}[{RATE}])) or vector(0)) "
        f"/ sum(rate(apitally_proxy_requests_total{{{SEL}}}[{RATE}]))"
    )


def build() -> dict[str, Any]:
    b = Board()
    requests = f"sum(rate(apitally_proxy_requests_total{{{SEL}}}[{RATE}]))"

    b.row("Traffic")
    b.stat(
        "Requests / s",
        "All requests proxied.",
        target(requests, "requests/s"),
        unit="reqps",
        defaults=thresholds((None, "blue")),
    )
    b.stat(
        "5xx share",
        "Share of requests answered 5xx (by the app or by the proxy: 502, 503, 504).",
        target(
            share("5"),
            "5xx",
        ),
        unit="percentunit",
        defaults=thresholds((None, "green"), (0.01, "orange"), (0.05, "red")),
    )
    b.stat(
        "p95 latency",
        "95th percentile response time of metered requests.",
        target(quantile(0.95, DURATION), "p95"),
        unit="s",
        defaults=thresholds((None, "green"), (0.5, "orange"), (2, "red")),
    )
    b.stat(
        "In flight",
        "Requests being proxied now.",
        target(f"sum(apitally_proxy_in_flight{{{SEL}}})", "in flight"),
        defaults=thresholds((None, "blue")),
    )
    b.stat(
        "Export mode",
        "Where payloads go: otlp (Apitally 1.x), hub (0.x), collector or "
        "local (nothing leaves the machine).",
        target(f"max by (mode) (apitally_proxy_export_mode{{{SEL}}})", "{{mode}}"),
        text_mode="name",
        defaults=thresholds((None, "blue")),
    )
    b.stat(
        "Exporter",
        "Whether the last exchange with the destination succeeded, on every instance.",
        target(f"min(apitally_proxy_export_ok{{{SEL}}})", "ok"),
        defaults={
            **thresholds((None, "red"), (1, "green")),
            "mappings": [
                {
                    "options": {"0": {"text": "failing"}, "1": {"text": "OK"}},
                    "type": "value",
                }
            ],
        },
    )
    b.timeseries(
        "Requests by status class",
        "Requests per second by the first digit of the status code.",
        target(
            "sum by (class) (label_replace(rate(apitally_proxy_requests_total{"
            f'{SEL}}}[{RATE}]), "class", "${{1}}xx", "status", "([0-9]).*"))',
            "{{class}}",
        ),
        unit="reqps",
        stacked=True,
        overrides=[
            color("2xx", "green"),
            color("3xx", "blue"),
            color("4xx", "orange"),
            color("5xx", "red"),
        ],
    )
    b.timeseries(
        "Error rate",
        "Share of requests answered 5xx and 4xx.",
        target(
            share("5"),
            "5xx",
        ),
        target(
            share("4"),
            "4xx",
        ),
        unit="percentunit",
        overrides=[color("5xx", "red"), color("4xx", "orange")],
    )
    b.timeseries(
        "Requests by route (top 10)",
        "Metered requests per second per route template ($route filters).",
        target(
            f"topk(10, sum by (method, route) (rate({DURATION}_count{{{ROUTE_SEL}}}[{RATE}])))",
            "{{method}} {{route}}",
        ),
        unit="reqps",
    )
    b.timeseries(
        "In-flight requests",
        "Requests being proxied, per instance.",
        target(f"sum by (instance) (apitally_proxy_in_flight{{{SEL}}})", "{{instance}}"),
    )

    b.row("Latency and size")
    b.timeseries(
        "Latency p50 / p95 / p99",
        "Response time (to the response head) of metered requests on the selected routes.",
        target(quantile(0.5, DURATION), "p50"),
        target(quantile(0.95, DURATION), "p95"),
        target(quantile(0.99, DURATION), "p99"),
        unit="s",
        w=24,
    )
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        b.timeseries(
            f"{name} latency by route",
            f"{name} response time per route template (buckets 5 ms to 10 s).",
            target(quantile(q, DURATION, "le, method, route"), "{{method}} {{route}}"),
            unit="s",
            w=8,
        )
    b.timeseries(
        "Response size p95 by route",
        "95th percentile response body size per route template (buckets 100 B to 10 MB).",
        target(quantile(0.95, SIZE, "le, method, route"), "{{method}} {{route}}"),
        unit="bytes",
    )
    b.timeseries(
        "Response bytes / s by route",
        "Response body bytes per second per route template.",
        target(
            f"sum by (method, route) (rate({SIZE}_sum{{{ROUTE_SEL}}}[{RATE}]))",
            "{{method}} {{route}}",
        ),
        unit="Bps",
    )

    b.row("Upstream, refusals, consumers")
    b.timeseries(
        "Upstream errors by kind",
        "Failures talking to the app (refused, reset, timeout, bad response…), and "
        "requests retried once on a stale pooled connection.",
        target(
            f"sum by (kind) (rate(apitally_proxy_upstream_errors_total{{{SEL}}}[{RATE}]))",
            "{{kind}}",
        ),
        target(f"sum(rate(apitally_proxy_upstream_retries_total{{{SEL}}}[{RATE}]))", "retried"),
        unit="reqps",
        w=8,
    )
    b.timeseries(
        "Refused and unmatched requests",
        "Refused: answered by the proxy itself (malformed or smuggling-prone heads, CONNECT). "
        "Unmatched: no known route, not metered. Route overflow: past the template cap.",
        target(f"sum(rate(apitally_proxy_refused_requests_total{{{SEL}}}[{RATE}]))", "refused"),
        target(f"sum(rate(apitally_proxy_unmatched_requests_total{{{SEL}}}[{RATE}]))", "unmatched"),
        target(
            f"sum(rate(apitally_proxy_route_overflow_total{{{SEL}}}[{RATE}]))", "route overflow"
        ),
        unit="reqps",
        w=8,
    )
    b.timeseries(
        "Consumers: overflow and unconfirmed",
        "Overflow: the consumer was past max_consumers. Unconfirmed: consumer_header "
        "requests counted without a consumer (the app refused or never accepted the key).",
        target(f"sum(rate(apitally_proxy_consumer_overflow_total{{{SEL}}}[{RATE}]))", "overflow"),
        target(
            f"sum(rate(apitally_proxy_consumer_unconfirmed_total{{{SEL}}}[{RATE}]))",
            "unconfirmed",
        ),
        unit="reqps",
        w=8,
    )

    b.row("Export to Apitally")
    b.stat(
        "Last success",
        "Seconds since the destination last accepted a payload (local mode: last written), "
        "on the instance that waited longest. No data until the first success.",
        target(
            f"max(time() - apitally_proxy_export_last_success_timestamp_seconds{{{SEL}}})",
            "age",
        ),
        unit="s",
        defaults=thresholds((None, "green"), (180, "orange"), (600, "red")),
    )
    b.stat(
        "Queued payloads",
        "Payloads waiting for delivery, all instances.",
        target(f"sum(apitally_proxy_export_queue_payloads{{{SEL}}})", "queued"),
        defaults=thresholds((None, "green"), (3, "orange"), (20, "red")),
    )
    b.stat(
        "Payloads lost",
        "Payloads dropped in the time range: rejected, expired or pushed out of a full spool.",
        target(
            "sum(increase(apitally_proxy_export_payloads_total{"
            f'{SEL}, outcome=~"rejected|expired|spool_full"}}[$__range]))',
            "lost",
        ),
        defaults=thresholds((None, "green"), (1, "red")),
    )
    b.stat(
        "Crash recoveries",
        "Processes in the time range that started after an unclean stop and sent its "
        "checkpointed counts (loss window: about the last second).",
        target(
            f"sum(max_over_time(apitally_proxy_crash_recoveries_total{{{SEL}}}[$__range]))",
            "recoveries",
        ),
        defaults=thresholds((None, "green"), (1, "orange")),
    )
    b.stat(
        "Unencodable values",
        "Payload values that could not be encoded as they were, in the time range (repaired "
        "or dropped alone; the rest of each payload was kept).",
        target(
            f"sum(increase(apitally_proxy_unencodable_values_total{{{SEL}}}[$__range]))", "values"
        ),
        defaults=thresholds((None, "green"), (1, "orange")),
    )
    b.stat(
        "Instances exporting",
        "Instances whose last exchange with the destination succeeded, of all instances.",
        target(f"sum(apitally_proxy_export_ok{{{SEL}}})", "ok"),
        target(f"count(apitally_proxy_export_ok{{{SEL}}})", "instances"),
        text_mode="value_and_name",
        defaults=thresholds((None, "blue")),
    )
    b.timeseries(
        "Payload outcomes",
        "Sync payloads (hub) or exports (OTLP) per minute by what became of them.",
        target(
            f"60 * sum by (outcome) (rate(apitally_proxy_export_payloads_total{{{SEL}}}[{RATE}]))",
            "{{outcome}}",
        ),
        unit="opm",
        stacked=True,
        w=8,
        overrides=[
            color("delivered", "green"),
            color("written", "blue"),
            color("rejected", "red"),
            color("expired", "orange"),
            color("spool_full", "purple"),
        ],
    )
    b.timeseries(
        "Export queue",
        "Payloads waiting for delivery per instance, and the spool's bytes on the right "
        "(the oldest are dropped past spool_max_bytes).",
        target(
            f"sum by (instance) (apitally_proxy_export_queue_payloads{{{SEL}}})",
            "queued {{instance}}",
        ),
        target(
            f"sum by (instance) (apitally_proxy_export_spool_bytes{{{SEL}}})",
            "spool {{instance}}",
        ),
        w=8,
        overrides=[right_axis("B", "bytes")],
    )
    b.timeseries(
        "Exporter health by instance",
        "1 when the last exchange succeeded; seconds since the last success on the right.",
        target(f"apitally_proxy_export_ok{{{SEL}}}", "ok {{instance}}"),
        target(
            f"time() - apitally_proxy_export_last_success_timestamp_seconds{{{SEL}}}",
            "age {{instance}}",
        ),
        w=8,
        overrides=[right_axis("B", "s")],
    )

    b.row("Request log (with request logging on)")
    b.timeseries(
        "Logged requests",
        "Requests written to the request log, and requests dropped because its buffer was full.",
        target(
            f"sum by (outcome) (rate(apitally_proxy_request_log_requests_total{{{SEL}}}[{RATE}]))",
            "{{outcome}}",
        ),
        unit="reqps",
        overrides=[color("dropped", "red")],
    )
    b.timeseries(
        "Request log files",
        "Files waiting for upload, requests buffered, and pauses (402 quota, disk trouble).",
        target(f"sum(apitally_proxy_request_log_waiting_files{{{SEL}}})", "waiting files"),
        target(f"sum(apitally_proxy_request_log_buffered_requests{{{SEL}}})", "buffered"),
        target(
            f"sum by (reason) (apitally_proxy_request_log_paused{{{SEL}}})", "paused: {{reason}}"
        ),
        target(
            f"sum by (outcome) (increase(apitally_proxy_request_log_files_total{{{SEL}}}[{RATE}]))",
            "files {{outcome}}",
        ),
    )

    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "apitally-proxy: traffic, latency and size per route template, "
        "upstream errors, and the export to Apitally. Built from the proxy's /metrics "
        "(docs/prometheus.md).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": b.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["apitally", "apitally-proxy"],
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Prometheus",
                    "multi": False,
                    "name": "DS_PROMETHEUS",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "type": "datasource",
                },
                variable("job", "label_values(apitally_proxy_export_mode, job)"),
                variable(
                    "instance", 'label_values(apitally_proxy_export_mode{job=~"$job"}, instance)'
                ),
                variable("route", f"label_values({DURATION}_count{{{SEL}}}, route)"),
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "apitally-proxy",
        "uid": "apitally-proxy",
        "version": 1,
        "weekStart": "",
    }


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "allValue": ".*",
        "current": {},
        "datasource": DS,
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": name,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
