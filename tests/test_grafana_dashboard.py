"""deploy/grafana/apitally-proxy.json: well-formed, up to date with its builder, and
querying only metrics a real proxy exposes, so the dashboard cannot drift from /metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_otlp import get
from tests.test_prometheus_names import outcomes, series_names, value, wait_metrics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "apitally-proxy.json"

# PromQL words that are neither metrics nor followed by "(" once grouping is removed.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
IDENT = re.compile(r"(?<![\w$:.])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals: label values, regexes
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "", e)  # ranges and subqueries ($__rate_interval…)
    e = GROUPING.sub("", e)  # by (le, route) and friends: label names
    e = re.sub(r"\$\w+", "", e)  # any Grafana variable left over
    e = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", "", e)  # numbers (1e3 is no name)
    names = set()
    for m in IDENT.finditer(e):
        word = m.group()
        if word.lower() in KEYWORDS or re.match(r"\s*\(", e[m.end() :]):
            continue  # a keyword, or a function / aggregation call
        names.add(word)
    return names


def test_metric_names_parses_promql_as_intended():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{job=~"$job", x="y"}'
        "[$__rate_interval]))) / ignoring(x) group_left (y) b_total offset 5m or vector(0) "
        '+ sum(c) without (le) + 1e3 * time() - label_replace(d, "k", "${1}xx", "s", "(.)")'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def label_values_metric(query: str) -> str:
    m = re.fullmatch(
        r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^{}]*\})?\s*,\s*\w+\)", query
    )
    assert m, query
    return m.group(1)


def test_the_json_is_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), (
        "deploy/grafana/apitally-proxy.json is stale: run python deploy/grafana/build_dashboard.py"
    )


def test_the_dashboard_is_well_formed():
    d = load()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for p in panels(d):
        if p["type"] == "row":
            continue  # layout only: no queries of its own
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert t["expr"].strip(), p["title"]
            # Every query honours the job and instance selection.
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], t["expr"]
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
    for expr in exprs(d):
        assert expr.count("(") == expr.count(")"), expr
        assert metric_names(expr), f"no metric in {expr!r}"
        # Deprecated aliases go away in a release; the dashboard must not lean on them.
        assert "apitally_proxy_hub_" not in expr, expr


async def test_every_metric_the_dashboard_queries_is_on_a_real_metrics(upstream, http, start_proxy):
    # Local mode with request logging, traffic on several routes and statuses, one sync:
    # every family the dashboard reads then has its samples.
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", "--request-logging")
    for path in ("/items/1", "/items/2", "/status/201", "/status/503", "/users/1/orders/2"):
        await get(http, proxy.url + path)
    families = await wait_metrics(
        proxy,
        lambda f: (
            outcomes(f)["written"] >= 1
            and value(f, "apitally_proxy_export_last_success_timestamp_seconds") is not None
            and value(f, "apitally_proxy_request_log_requests_total", outcome="logged") == 5
        ),
    )
    available = series_names(families)
    d = load()
    wanted = {name for expr in exprs(d) for name in metric_names(expr)}
    wanted |= {label_values_metric(q) for q in variable_queries(d)}
    missing = wanted - available
    assert not missing, f"the dashboard queries metrics /metrics does not have: {sorted(missing)}"
    # The dashboard covers what an operator needs: traffic, latency, export health.
    for name in (
        "apitally_proxy_requests_total",
        "apitally_proxy_request_duration_seconds_bucket",
        "apitally_proxy_response_size_bytes_bucket",
        "apitally_proxy_in_flight",
        "apitally_proxy_upstream_errors_total",
        "apitally_proxy_refused_requests_total",
        "apitally_proxy_unmatched_requests_total",
        "apitally_proxy_consumer_overflow_total",
        "apitally_proxy_consumer_unconfirmed_total",
        "apitally_proxy_export_ok",
        "apitally_proxy_export_queue_payloads",
        "apitally_proxy_export_spool_bytes",
        "apitally_proxy_export_payloads_total",
        "apitally_proxy_export_last_success_timestamp_seconds",
        "apitally_proxy_export_mode",
    ):
        assert name in wanted, name


GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
    "$route": ".*",
}


def test_every_expression_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana variables substituted)."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (scripts/test installs Debian's prometheus)")
    rules = []
    for i, expr in enumerate(exprs(load())):
        for var, sub in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, sub)
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
