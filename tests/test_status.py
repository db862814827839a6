"""Typed status: every field merges across workers by its declared rule."""

from __future__ import annotations

import dataclasses

from apitally_proxy.status import (
    ExportStatus,
    RequestLogStatus,
    RoutesStatus,
    WorkerStatus,
    merge,
    to_dict,
)


def worker(slot: int, **hub) -> WorkerStatus:
    return WorkerStatus(
        version="1",
        upstream="http://app",
        listen="127.0.0.1:8080",
        worker_slot=slot,
        instance_uuid=f"uuid-{slot}",
        uptime_s=10.0 + slot,
        routes=RoutesStatus(source="config", count=3, framework="flask", fetches=1),
        hub=ExportStatus(
            mode="otlp", endpoint="https://x", spool_dir=f"/s{slot}", local_file=None, **hub
        ),
        request_log=RequestLogStatus(directory=f"/l{slot}", logged=5, last_error=None),
        requests_total=100,
        requests_by_status={200: 90, 500: 10},
        upstream_errors={"connect": 1},
    )


def test_counters_add_timestamps_take_the_latest_and_health_needs_everyone():
    a = to_dict(worker(0, sent=3, queued=1, last_success=100.0))
    b = to_dict(worker(1, sent=4, ok=False, problem="timeout", last_success=250.0))
    merge(a, b)
    assert a["requests_total"] == 200
    assert a["requests_by_status"] == {"200": 180, "500": 20}
    assert a["upstream_errors"] == {"connect": 2}
    assert a["hub"]["sent"] == 7 and a["hub"]["queued"] == 1
    assert a["hub"]["ok"] is False and a["hub"]["problem"] == "timeout"
    assert a["hub"]["last_success"] == 250.0
    assert a["hub"]["spool_dir"] == "/s0"  # identity: worker 0's own
    assert a["request_log"]["logged"] == 10
    assert a["routes"]["fetches"] == 2 and a["routes"]["count"] == 3
    assert a["instance_uuid"] == "uuid-0"


def test_every_field_says_how_it_merges():
    """Fields without a default are a worker's identity (worker 0's stands); every other
    field must name its rule or be a nested part, so none merges by accident."""
    for cls in (WorkerStatus, ExportStatus, RoutesStatus, RequestLogStatus):
        for f in dataclasses.fields(cls):
            identity = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if not identity:
                assert "merge" in f.metadata or "nested" in f.metadata, (cls.__name__, f.name)


def test_to_dict_is_shallow_and_nested_parts_become_dicts():
    status = worker(0)
    status.histograms = {"GET 200 /x": [1, 2, 3]}
    plain = to_dict(status)
    assert plain["histograms"] is status.histograms  # not copied
    assert plain["hub"]["mode"] == "otlp" and isinstance(plain["routes"], dict)


def test_every_counter_and_gauge_of_the_status_is_on_metrics():
    """/metrics iterates the status fields (exposition.SCALARS) or names the ones its
    labelled families read; a new numeric field must be one or the other."""
    from apitally_proxy.exposition import EXPORT_SCALARS, FAMILY_FIELDS, SCALARS
    from apitally_proxy.status import LATEST, SUM, SUM_MAP

    def numeric(cls):
        return {
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata.get("merge") in (SUM, SUM_MAP, LATEST) or f.type in ("bool", "int")
        }

    parts = {
        "worker": (WorkerStatus, {f for f, *_ in SCALARS}),
        "export": (ExportStatus, {f for f, *_ in EXPORT_SCALARS}),
        "request_log": (RequestLogStatus, set()),
    }
    # Shown elsewhere or not a metric: identities, timestamps of pauses, what /status shows.
    not_metrics = {
        "worker": {"uptime_s", "worker_slot"},
        "export": {"stopped", "last_sync"},
        "request_log": {"suspended_until", "paused_until"},
    }
    for part, (cls, plain) in parts.items():
        missing = numeric(cls) - plain - FAMILY_FIELDS[part] - not_metrics[part]
        assert not missing, f"{cls.__name__} fields not on /metrics: {sorted(missing)}"
