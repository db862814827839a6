"""Typed status: what each part of a worker reports, and how workers' reports add up.

Each field says how `--workers N` combines it (`merge` in its metadata): counters
add up, timestamps take the latest, health holds only if every worker's does.
`/status.json`, `/metrics`, the dashboard and the multi-worker merge all read the
same fields, so a counter added here shows everywhere or nowhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUM = "sum"  # numbers add up
SUM_MAP = "sum_map"  # {key: number} add up per key
LATEST = "latest"  # the largest (a timestamp), None when no worker has one
ALL = "all"  # true only if true for every worker
ANY = "any"  # true if true for any worker
FIRST = "first"  # worker 0's, else the first worker that has one
OWN = "own"  # worker 0's alone (identity, addresses)


def counter() -> Any:
    return field(default=0, metadata={"merge": SUM})


def latest() -> Any:
    return field(default=None, metadata={"merge": LATEST})


def first() -> Any:
    return field(default=None, metadata={"merge": FIRST})


@dataclass(slots=True)
class ExportStatus:
    """Where payloads go and how that goes: the sync loop, the spool, the transport."""

    mode: str
    endpoint: str | None
    spool_dir: str
    local_file: str | None
    ok: bool = field(default=True, metadata={"merge": ALL})
    stopped: bool = field(default=False, metadata={"merge": ANY})
    problem: str | None = first()
    queued: int = counter()
    sent: int = counter()
    dropped_rejected: int = counter()
    dropped_expired: int = counter()
    dropped_spool_full: int = counter()
    unencodable: int = counter()
    spool_bytes: int = counter()
    recovered_after_crash: int = counter()
    last_sync: float | None = latest()
    last_success: float | None = latest()


@dataclass(slots=True)
class RoutesStatus:
    """The route source in force and what the heuristics learned."""

    source: str | None
    count: int | None
    framework: str | None
    problem: str | None = first()
    fetches: int = counter()
    learned_positions: int = field(default=0, metadata={"merge": OWN})
    templates_seen: int | None = field(default=None, metadata={"merge": OWN})


@dataclass(slots=True)
class RequestLogStatus:
    directory: str
    buffered: int = counter()
    logged: int = counter()
    dropped: int = counter()
    waiting_files: int = counter()
    files_sent: int = counter()
    files_dropped: int = counter()
    suspended_until: float | None = latest()
    paused_until: float | None = latest()
    last_error: str | None = first()


@dataclass(slots=True)
class WorkerStatus:
    """One worker's live state; `to_dict` gives the `/status.json` shape."""

    version: str
    upstream: str
    listen: str
    worker_slot: int
    instance_uuid: str
    uptime_s: float
    routes: RoutesStatus = field(metadata={"nested": RoutesStatus})
    hub: ExportStatus = field(metadata={"nested": ExportStatus})
    request_log: RequestLogStatus | None = field(
        default=None, metadata={"nested": RequestLogStatus}
    )
    requests_total: int = counter()
    requests_by_status: dict[int, int] = field(default_factory=dict, metadata={"merge": SUM_MAP})
    unmatched: int = counter()
    route_overflow: int = counter()
    consumer_overflow: int = counter()
    # Other caps' overflows: counted in the overflow bucket, never dropped silently.
    validation_error_overflow: int = counter()
    route_override_overflow: int = counter()
    histogram_overflow: int = counter()
    consumer_unconfirmed: int = counter()
    in_flight: int = counter()
    upstream_errors: dict[str, int] = field(default_factory=dict, metadata={"merge": SUM_MAP})
    upstream_retries: int = counter()
    refused: int = counter()
    # Merged by their own rules (cluster.py): Prometheus histograms, the dashboard window.
    histograms: dict[str, list[Any]] = field(default_factory=dict, metadata={"merge": OWN})
    recent_payloads: list[Any] = field(default_factory=list, metadata={"merge": OWN})


def to_dict(status: Any) -> dict[str, Any]:
    """A status dataclass as plain dicts (shallow: big snapshots are not copied)."""
    return {
        f.name: to_dict(value) if dataclasses.is_dataclass(value) else value
        for f in dataclasses.fields(status)
        for value in (getattr(status, f.name),)
    }


def merge(into: dict[str, Any], other: dict[str, Any], cls: type = WorkerStatus) -> None:
    """Add another worker's `to_dict` form to `into` (worker 0's, a copy), field by field."""
    for f in dataclasses.fields(cls):
        name = f.name
        if name not in other:
            continue
        theirs = other[name]
        nested = f.metadata.get("nested")
        if nested is not None:
            if into.get(name) is None:
                into[name] = dict(theirs) if isinstance(theirs, dict) else theirs
            elif isinstance(theirs, dict):
                into[name] = dict(into[name])
                merge(into[name], theirs, nested)
            continue
        rule = f.metadata.get("merge", OWN)
        mine = into.get(name)
        if rule == SUM:
            into[name] = (mine or 0) + (theirs or 0)
        elif rule == SUM_MAP:
            combined = {str(k): v for k, v in (mine or {}).items()}
            for key, n in (theirs or {}).items():
                combined[str(key)] = combined.get(str(key), 0) + n
            into[name] = combined
        elif rule == LATEST:
            into[name] = max((v for v in (mine, theirs) if v is not None), default=None)
        elif rule == ALL:
            into[name] = bool(mine) and bool(theirs)
        elif rule == ANY:
            into[name] = bool(mine) or bool(theirs)
        elif rule == FIRST and mine is None:
            into[name] = theirs
