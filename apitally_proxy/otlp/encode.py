"""OTLP protobuf messages from the proxy's aggregates, shaped as apitally 1.0.0 sends them.

Pure functions: JSON-able rows in (see `metering.histograms`), serialized
`Export*ServiceRequest` bytes out. Encoding happens once per export cycle, off
the hot path; the messages come from the well-kept `opentelemetry-proto`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_DELTA,
    ScopeMetrics,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status

from apitally_proxy.metering.histograms import SCALE

SCOPE_NAME = "apitally"
# Data-point keys per export request: each request stays far below the 4 MiB wire limit.
COMBINATIONS_PER_REQUEST = 1_000
HISTOGRAM_METRICS = (
    ("duration", "http.server.request.duration", "s"),
    ("request_size", "http.server.request.body.size", "By"),
    ("response_size", "http.server.response.body.size", "By"),
)
_SPAN_FLAGS = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK


def set_value(target: AnyValue, value: Any) -> None:
    """An OTLP AnyValue from a str, bool, int, float, bytes, list, dict or None."""
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):  # before int: bool is an int
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, (list, tuple)):
        target.array_value.SetInParent()
        for item in value:
            set_value(target.array_value.values.add(), item)
    elif isinstance(value, dict):
        target.kvlist_value.SetInParent()
        add_attributes(target.kvlist_value.values, value)
    elif value is None:
        target.SetInParent()


def add_attributes(target: Any, attributes: Mapping[str, Any]) -> None:
    """Append `attributes` to a repeated KeyValue field."""
    for key, value in attributes.items():
        if type(value) is str:  # the common case, without the type dispatch
            target.add(key=key).value.string_value = value
            continue
        kv: KeyValue = target.add(key=key)
        set_value(kv.value, value)


def _scope_metrics(
    request: ExportMetricsServiceRequest, resource: Mapping[str, Any]
) -> ScopeMetrics:
    resource_metrics = request.resource_metrics.add()
    add_attributes(resource_metrics.resource.attributes, resource)
    scope = resource_metrics.scope_metrics.add()
    scope.scope.name = SCOPE_NAME
    return scope


def point_attributes(row: Mapping[str, Any]) -> dict[str, Any]:
    """The server's aggregation key for one row: method, route, status, consumer."""
    attributes: dict[str, Any] = {
        "http.request.method": row["method"],
        "http.route": row["path"],
        "http.response.status_code": int(row["status_code"]),
    }
    if row.get("consumer"):
        attributes["apitally.consumer.identifier"] = row["consumer"]
    return attributes


def gauges_request(
    resource: Mapping[str, Any], gauges: Mapping[str, tuple[str, float | int]], at_ns: int
) -> bytes:
    """The process gauges, in an export request of their own (sent every cycle: the heartbeat)."""
    request = ExportMetricsServiceRequest()
    scope = _scope_metrics(request, resource)
    for name, (unit, value) in gauges.items():
        point = scope.metrics.add(name=name, unit=unit).gauge.data_points.add(time_unix_nano=at_ns)
        if isinstance(value, int):
            point.as_int = value
        else:
            point.as_double = value
    return request.SerializeToString()


def histogram_requests(
    resource: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], start_ns: int, end_ns: int
) -> list[bytes]:
    """Delta exponential histograms for the rows, `COMBINATIONS_PER_REQUEST` keys a request."""
    out = []
    for first in range(0, len(rows), COMBINATIONS_PER_REQUEST):
        request = ExportMetricsServiceRequest()
        scope = _scope_metrics(request, resource)
        chunk = rows[first : first + COMBINATIONS_PER_REQUEST]
        for field, name, unit in HISTOGRAM_METRICS:
            metric = None
            for row in chunk:
                hist = row.get(field)
                if not hist:
                    continue
                if metric is None:
                    metric = scope.metrics.add(name=name, unit=unit)
                    metric.exponential_histogram.aggregation_temporality = (
                        AGGREGATION_TEMPORALITY_DELTA
                    )
                point = metric.exponential_histogram.data_points.add(
                    start_time_unix_nano=start_ns,
                    time_unix_nano=end_ns,
                    count=hist["count"],
                    sum=float(hist["sum"]),
                    scale=SCALE,
                    zero_count=hist["zero_count"],
                    min=float(hist["min"]),
                    max=float(hist["max"]),
                )
                add_attributes(point.attributes, point_attributes(row))
                if hist["buckets"]:
                    point.positive.offset = hist["offset"]
                    point.positive.bucket_counts.extend(hist["buckets"])
        out.append(request.SerializeToString())
    return out


def logs_request(
    resource: Mapping[str, Any], records: Iterable[tuple[int, str, Any]], observed_ns: int
) -> bytes:
    """Events on the logs signal: (time_ns, event_name, body) each, no trace context."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    add_attributes(resource_logs.resource.attributes, resource)
    scope = resource_logs.scope_logs.add()
    scope.scope.name = SCOPE_NAME
    for time_ns, event_name, body in records:
        record = scope.log_records.add(
            time_unix_nano=time_ns, observed_time_unix_nano=observed_ns, event_name=event_name
        )
        set_value(record.body, body)
    return request.SerializeToString()


def traces_request(resource: Mapping[str, Any], spans: Iterable[Mapping[str, Any]]) -> bytes:
    """SERVER spans (request logs): each a dict with trace_id/span_id (hex), name,
    start_ns/end_ns, attributes and an `error` flag (5xx)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    add_attributes(resource_spans.resource.attributes, resource)
    scope = resource_spans.scope_spans.add()
    scope.scope.name = SCOPE_NAME
    for span in spans:
        encoded = scope.spans.add(
            trace_id=bytes.fromhex(span["trace_id"]),
            span_id=bytes.fromhex(span["span_id"]),
            flags=_SPAN_FLAGS,
            name=span["name"],
            kind=Span.SPAN_KIND_SERVER,
            start_time_unix_nano=span["start_ns"],
            end_time_unix_nano=span["end_ns"],
        )
        add_attributes(encoded.attributes, span["attributes"])
        if span.get("error"):
            encoded.status.code = Status.STATUS_CODE_ERROR
    return request.SerializeToString()
