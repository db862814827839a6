"""A recording OTLP/HTTP receiver on loopback: decodes the gzip'd protobuf as a collector does.

For the demo (`python -m apitally_proxy.demo --otlp`) and the tests: it keeps every
export it was sent, decoded, and answers as scripted (200 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MESSAGES: dict[str, Any] = {
    "metrics": ExportMetricsServiceRequest,
    "logs": ExportLogsServiceRequest,
    "traces": ExportTraceServiceRequest,
}

RequestKey = tuple[str, str, int, Any]  # (method, route, status, consumer)


@dataclass
class OtlpCall:
    signal: str
    status: int
    headers: dict[str, str]
    size: int  # bytes on the wire
    message: Any  # the decoded Export*ServiceRequest
    at: float


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class RecordingReceiver:
    """Records every export; `script` gives statuses per signal in order (then `default_status`)."""

    def __init__(self) -> None:
        self.calls: list[OtlpCall] = []
        self.script: dict[str, list[int]] = {}
        self.default_status = 200
        self.delay = 0.0
        self.interval_header: str | None = None
        self.changed = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> RecordingReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        # Stopping never waits for handlers a scripted `delay` keeps sleeping.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        signal = request.path.rsplit("/", 1)[-1]
        if not request.path.endswith(f"/v1/{signal}") or signal not in MESSAGES:
            return web.Response(status=404)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        # aiohttp inflates gzip request bodies itself; the wire size is the Content-Length.
        raw = await request.read()
        body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        size = int(request.headers.get("Content-Length", len(raw)))
        message = MESSAGES[signal]()
        message.ParseFromString(body)
        scripted = self.script.get(signal)
        status = scripted.pop(0) if scripted else self.default_status
        if self.delay:
            await asyncio.sleep(self.delay)
            if request.transport is None or request.transport.is_closing():
                status = 0  # the client gave up waiting: it never saw an answer
        loop = asyncio.get_running_loop()
        self.calls.append(
            OtlpCall(signal, status, dict(request.headers), size, message, loop.time())
        )
        self.changed.set()
        headers = {}
        if self.interval_header is not None:
            headers["Apitally-Export-Interval"] = self.interval_header
        return web.Response(status=status, headers=headers)

    # Views for assertions: only what the receiver accepted (2xx).

    def accepted(self, signal: str) -> list[Any]:
        return [c.message for c in self.calls if c.signal == signal and 200 <= c.status < 300]

    def histogram_points(self, name: str = "http.server.request.duration") -> list[tuple]:
        """(attributes, point) for every data point of one histogram metric."""
        out = []
        for message in self.accepted("metrics"):
            for rm in message.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name:
                            for p in metric.exponential_histogram.data_points:
                                out.append((attributes(p.attributes), p))
        return out

    def request_counts(self) -> dict[RequestKey, int]:
        """Requests per (method, route, status, consumer), summed over exports."""
        totals: dict[RequestKey, int] = {}
        for attrs, point in self.histogram_points():
            key = (
                attrs["http.request.method"],
                attrs["http.route"],
                attrs["http.response.status_code"],
                attrs.get("apitally.consumer.identifier"),
            )
            totals[key] = totals.get(key, 0) + point.count
        return totals

    def buckets(self, name: str) -> dict[RequestKey, dict[str, Any]]:
        """Summed exponential buckets per key: {index: count}, zero count, count, sum."""
        out: dict[RequestKey, dict[str, Any]] = {}
        for attrs, p in self.histogram_points(name):
            key = (
                attrs["http.request.method"],
                attrs["http.route"],
                attrs["http.response.status_code"],
                attrs.get("apitally.consumer.identifier"),
            )
            agg = out.setdefault(key, {"count": 0, "sum": 0.0, "zero": 0, "buckets": {}})
            agg["count"] += p.count
            agg["sum"] += p.sum
            agg["zero"] += p.zero_count
            assert p.scale == 3
            for i, n in enumerate(p.positive.bucket_counts):
                if n:
                    index = p.positive.offset + i
                    agg["buckets"][index] = agg["buckets"].get(index, 0) + n
        return out

    def gauges(self) -> list[dict[str, Any]]:
        """Each gauge export's {name: value}."""
        out = []
        for message in self.accepted("metrics"):
            for rm in message.resource_metrics:
                for sm in rm.scope_metrics:
                    values = {}
                    for metric in sm.metrics:
                        if metric.WhichOneof("data") == "gauge":
                            p = metric.gauge.data_points[0]
                            values[metric.name] = getattr(p, p.WhichOneof("value"))
                    if values:
                        out.append(values)
        return out

    def events(self, event_name: str) -> list[Any]:
        """Bodies of the log records with this event name (JSON strings decoded)."""
        out = []
        for message in self.accepted("logs"):
            for rl in message.resource_logs:
                for sl in rl.scope_logs:
                    for record in sl.log_records:
                        if record.event_name == event_name:
                            body = _value(record.body)
                            out.append(json.loads(body) if isinstance(body, str) else body)
        return out

    def spans(self) -> list[dict[str, Any]]:
        out = []
        for message in self.accepted("traces"):
            for rs in message.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        d = MessageToDict(span)
                        d["attrs"] = attributes(span.attributes)
                        out.append(d)
        return out

    def resources(self, signal: str = "metrics") -> list[dict[str, Any]]:
        out = []
        for message in self.accepted(signal):
            groups = getattr(message, f"resource_{'spans' if signal == 'traces' else signal}")
            out += [attributes(g.resource.attributes) for g in groups]
        return out

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        await wait_until(self.changed, predicate, timeout, "OTLP receiver")


async def wait_until(changed: asyncio.Event, predicate: Any, timeout: float, who: str) -> None:
    """Until `predicate()` holds, re-checked whenever `changed` is set (or every 0.2 s);
    TimeoutError naming `who` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"{who}: condition not met in {timeout} s")
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(remaining, 0.2))
