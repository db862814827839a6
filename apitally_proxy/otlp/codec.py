"""One export cycle's aggregates → the OTLP exports that carry them, ready to spool.

Each export is a payload dict `{"message_uuid", "timestamp", "signal", "data"}`
with `data` the gzip'd protobuf request (base64), so the spool holds exactly
what goes on the wire and a retry sends the same bytes.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import psutil

from apitally_proxy.otlp import encode

VALIDATION_ERROR_EVENT = "apitally.request.validation_error"
CONSUMER_UPDATE_EVENT = "apitally.consumer.update"
STARTUP_EVENT = "apitally.app.startup"
MAX_OPENAPI_BYTES = 4_000_000
# What apitally 1.0.0 maps a validation error's location prefix to.
SOURCE_ALIASES = {
    "body": "body",
    "query": "query",
    "path": "path",
    "header": "header",
    "cookie": "cookie",
    "querystring": "query",
    "params": "path",
    "path_params": "path",
    "headers": "header",
    "cookies": "cookie",
}


def export_payload(signal: str, message_uuid: str, body: bytes) -> dict[str, Any]:
    """A spoolable export: the serialized request, gzip'd as it will be sent."""
    return {
        "message_uuid": message_uuid,
        "timestamp": time.time(),
        "signal": signal,
        "data": base64.b64encode(gzip.compress(body, compresslevel=6)).decode("ascii"),
    }


def export_bytes(payload: Mapping[str, Any]) -> bytes:
    """The gzip'd body of a spooled export."""
    return base64.b64decode(payload["data"])


def split_location(loc: list[Any]) -> tuple[str, str]:
    """A validation error's location as (source, field): ["body", "a", 0] → ("body", "a.0")."""
    if not loc:
        return "", ""
    source = ""
    start = 0
    if isinstance(loc[0], str):
        source = SOURCE_ALIASES.get(loc[0].lower(), "")
        if source:
            start = 1
    field = ".".join(
        str(part)
        for part in loc[start:]
        if isinstance(part, (str, int)) and not isinstance(part, bool)
    )
    return source, field


def validation_error_events(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hub-shaped validation error rows → 1.0.0's event bodies, counts per consumer."""
    events: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        source, field = split_location(row["loc"])
        message = row["msg"] if isinstance(row["msg"], str) else ""
        typ = row["type"] if isinstance(row["type"], str) else ""
        key = (row["method"], row["path"], source, field, message, typ)
        event = events.get(key)
        if event is None:
            event = events[key] = {
                "method": row["method"],
                "path": row["path"],
                "source": source,
                "field": field,
                "message": message,
                "type": typ,
                "counts": [],
            }
        count: dict[str, Any] = {"count": row["error_count"]}
        if row["consumer"] is not None:
            count = {"consumer": row["consumer"], "count": row["error_count"]}
        event["counts"].append(count)
    return list(events.values())


def consumer_update_events(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New or changed consumers → `apitally.consumer.update` bodies (only the fields set)."""
    out = []
    for row in rows:
        body = {"identifier": row["identifier"]}
        for key in ("name", "group"):
            if row.get(key):
                body[key] = row[key]
        out.append(body)
    return out


def startup_body(
    framework: str | None,
    versions: Mapping[str, str],
    paths: list[dict[str, str]],
    openapi: str | None,
) -> str:
    """The `apitally.app.startup` event body: a compact JSON string, OpenAPI ≤ 4 MB."""
    body: dict[str, Any] = {"framework": framework, "versions": dict(versions), "paths": paths}
    if openapi and len(openapi.encode()) <= MAX_OPENAPI_BYTES:
        body["openapi"] = openapi
    return json.dumps(body, separators=(",", ":"))


class OtlpCodec:
    """Builds the exports of one cycle for one worker (its resource attributes)."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        self.resource = dict(resource)
        self._process = psutil.Process()
        self._process.cpu_percent()  # prime: the first reading covers the time since now
        self._cpus = psutil.cpu_count() or 1
        self._created = self._process.create_time()

    def _gauges(self) -> dict[str, tuple[str, float | int]]:
        try:
            return {
                "process.uptime": ("s", time.time() - self._created),
                # A fraction of the machine. Over a short interval (the final export just
                # after the last one) the clock-tick granularity of the CPU times can
                # overshoot 1: reported as 1.
                "process.cpu.utilization": (
                    "1",
                    min(self._process.cpu_percent() / 100 / self._cpus, 1.0),
                ),
                "process.memory.usage": ("By", self._process.memory_info().rss),
            }
        except psutil.Error:  # pragma: no cover - reading our own process
            return {"process.uptime": ("s", time.time() - self._created)}

    def interval(
        self,
        aggregates: Mapping[str, Any],
        message_uuid: str,
        start_ns: int,
        end_ns: int,
        live: bool = True,
    ) -> list[dict[str, Any]]:
        """The exports of one interval; the one named `message_uuid` comes last.

        `live` adds the process gauges (the heartbeat: every cycle, traffic or not);
        checkpoints leave them out.
        """
        bodies: list[tuple[str, bytes]] = []
        if live:
            bodies.append(("metrics", encode.gauges_request(self.resource, self._gauges(), end_ns)))
        rows = aggregates.get("requests") or []
        if rows:
            bodies += [
                ("metrics", b)
                for b in encode.histogram_requests(self.resource, rows, start_ns, end_ns)
            ]
        records = [
            (end_ns, CONSUMER_UPDATE_EVENT, body)
            for body in consumer_update_events(aggregates.get("consumers") or [])
        ]
        records += [
            (end_ns, VALIDATION_ERROR_EVENT, body)
            for body in validation_error_events(aggregates.get("validation_errors") or [])
        ]
        if records:
            bodies.append(("logs", encode.logs_request(self.resource, records, end_ns)))
        last = len(bodies) - 1
        return [
            export_payload(signal, message_uuid if i == last else f"{message_uuid}.{i}", body)
            for i, (signal, body) in enumerate(bodies)
        ]

    def startup(self, message_uuid: str, body: str) -> dict[str, Any]:
        now = time.time_ns()
        data = encode.logs_request(self.resource, [(now, STARTUP_EVENT, body)], now)
        return export_payload("logs", message_uuid, data)


def resource_attributes(
    instance_id: str, env: str, distro_version: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Resource attributes: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, then Apitally's own."""
    environ = os.environ if environ is None else environ
    attributes: dict[str, Any] = {}
    for item in (environ.get("OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = (
        environ.get("OTEL_SERVICE_NAME") or attributes.get("service.name") or "unknown_service"
    )
    attributes.update(
        {
            "service.instance.id": instance_id,
            "deployment.environment.name": env,
            "telemetry.distro.name": "apitally-proxy",
            "telemetry.distro.version": distro_version,
        }
    )
    return attributes
