"""Parity for Apitally 1.x: the proxy's OTLP export equals apitally 1.0.0's on real apps.

Starlette, FastAPI and Litestar under uvicorn and Flask under gunicorn: the same
traffic through the proxy (write token) in front of the plain app and at the app
instrumented with apitally 1.0.0, both exporting to recording OTLP receivers that
decode the protobuf. Compared per (method, route, status, consumer): request counts,
size counts, sums and exponential buckets; consumer updates; startup paths;
validation-error events. Only the by-design differences (docs/differences.md) are taken out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fake_otlp import RequestKey
from tests.support.parity import AppSpec
from tests.support.parity_otlp import (
    PYTHON_1X,
    OtlpSide,
    consumer_updates,
    run_otlp_parity,
    startup_paths,
    validation_errors,
)
from tests.test_parity import SPECS

pytestmark = pytest.mark.parity

SIZE_METRICS = ("http.server.request.body.size", "http.server.response.body.size")


FRAMEWORKS: dict[str, AppSpec] = {
    name: SPECS[name][0] for name in ("starlette", "fastapi", "flask", "litestar")
}


@pytest.fixture(scope="module", params=list(FRAMEWORKS))
def sides(request, tmp_path_factory) -> Iterator[tuple[str, OtlpSide, OtlpSide]]:
    if not PYTHON_1X.exists():
        pytest.fail(f"{PYTHON_1X} is missing: scripts/test creates it (apitally 1.0.0)")
    spec = FRAMEWORKS[request.param]
    # apitally 1.x exports a span (request log) for every request; the proxy when asked.
    proxy, official = run_otlp_parity(
        spec, tmp_path_factory.mktemp(f"otlp-{request.param}"), proxy_args=("--request-logging",)
    )
    yield request.param, proxy, official


def unhandled_500(key: RequestKey) -> bool:
    # docs/differences.md: an unhandled exception's 500 is written outside the app's
    # middleware (no consumer header for the proxy; a different body for the client).
    return key[2] == 500


def comparable(rows: dict[RequestKey, Any]) -> dict[RequestKey, Any]:
    out: dict[RequestKey, Any] = {}
    for key, value in rows.items():
        if unhandled_500(key):
            key = (*key[:3], None)
            if isinstance(value, int) and key in out:
                value += out[key]
        out[key] = value
    return out


def test_both_sides_saw_the_same_statuses(sides):
    _, proxy, official = sides
    assert proxy.statuses == official.statuses


def test_request_counts_per_method_route_status_consumer(sides):
    _, proxy, official = sides
    counts = comparable(proxy.receiver.request_counts())
    assert counts == comparable(official.receiver.request_counts())
    assert any(key[3] for key in counts)  # consumers were counted


@pytest.mark.parametrize("metric", SIZE_METRICS)
def test_size_counts_sums_and_buckets(sides, metric):
    _, proxy, official = sides
    mine = {k: v for k, v in proxy.receiver.buckets(metric).items() if not unhandled_500(k)}
    theirs = {k: v for k, v in official.receiver.buckets(metric).items() if not unhandled_500(k)}
    assert mine == theirs


def test_one_duration_observation_per_request(sides):
    _, proxy, official = sides
    mine = {
        k: v["count"] for k, v in proxy.receiver.buckets("http.server.request.duration").items()
    }
    theirs = {
        k: v["count"] for k, v in official.receiver.buckets("http.server.request.duration").items()
    }
    assert comparable(mine) == comparable(theirs)


def test_consumer_updates(sides):
    _, proxy, official = sides
    assert consumer_updates(proxy.receiver) == consumer_updates(official.receiver)
    assert consumer_updates(proxy.receiver)


def test_startup_paths(sides):
    _, proxy, official = sides
    assert startup_paths(proxy.receiver) == startup_paths(official.receiver)


def test_validation_error_events_where_apitally_1x_emits_them(sides):
    framework, proxy, official = sides
    theirs = validation_errors(official.receiver)
    if framework in ("starlette", "flask"):
        # 1.0.0 reads validation errors for FastAPI and Litestar only.
        assert theirs == {}
        return
    assert theirs
    assert validation_errors(proxy.receiver) == theirs


def span_counts(side: OtlpSide) -> dict[RequestKey, int]:
    """Request-log spans per (method, route, status, consumer); unmatched requests (no
    route, or Litestar's empty one) under route None."""
    out: dict[RequestKey, int] = {}
    for span in side.receiver.spans():
        assert span["kind"] == "SPAN_KIND_SERVER"
        a = span["attrs"]
        key = (
            a["http.request.method"],
            a.get("http.route") or None,
            a["http.response.status_code"],
            a.get("apitally.consumer.identifier"),
        )
        out[key] = out.get(key, 0) + 1
    return out


def test_request_log_spans_per_method_route_status_consumer(sides):
    _, proxy, official = sides
    mine = comparable(span_counts(proxy))
    assert mine == comparable(span_counts(official))
    assert sum(mine.values()) == len(proxy.statuses) - 1  # every request but the OPTIONS


def test_every_export_is_under_4_mib_and_gzip(sides):
    _, proxy, _ = sides
    assert all(c.size < 4 * 1024 * 1024 for c in proxy.receiver.calls)
    assert all(c.headers.get("Content-Encoding") == "gzip" for c in proxy.receiver.calls)
