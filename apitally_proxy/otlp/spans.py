"""Request logs for Apitally 1.x: one SERVER span per logged request, redacted as 1.0.0 does.

The request log's buffer and writer thread stay as they are (hub mode writes
NDJSON files from the same items); in OTLP mode the writer thread hands its
items to `SpanExports`, which turns them into spans, encodes ExportTraceService
requests of bounded size and puts them in the durable spool, where the export
loop picks them up with the metrics.

Redaction (replacement `[REDACTED]`, case-insensitive patterns searched in the
name; the `[request_log]` patterns add to these): query parameter values,
header values (as one `["[REDACTED]"]`), string values of JSON body fields at
any depth. Bodies are kept for the allow-listed content types only, up to
50,000 bytes; larger ones become the bytes `[BODY_TOO_LARGE]`.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import orjson

from apitally_proxy.config import RequestLogSettings
from apitally_proxy.hub.request_log import BODY_TOO_LARGE, Item, Matcher
from apitally_proxy.otlp import encode
from apitally_proxy.otlp.codec import export_payload

log = logging.getLogger("apitally_proxy.otlp")
_random = random.Random()

REDACTED = "[REDACTED]"
SPAN_BODY_TOO_LARGE = b"[BODY_TOO_LARGE]"
QUERY_PATTERNS = (r"auth", r"api[-_]?key", r"secret", r"token", r"password", r"pwd")
HEADER_PATTERNS = (r"auth", r"api[-_]?key", r"secret", r"token", r"cookie")
BODY_FIELD_PATTERNS = (
    r"password",
    r"pwd",
    r"token",
    r"secret",
    r"auth",
    r"card[-_ ]?number",
    r"ccv",
    r"cvv",
    r"cvc",
    r"ssn",
)
BODY_CONTENT_TYPES = (
    "application/json",
    "application/problem+json",
    "application/vnd.api+json",
    "application/ld+json",
    "application/x-ndjson",
    "text/markdown",
    "text/plain",
)
URL_HEADERS = frozenset({"location", "content-location"})
MAX_CACHED_NAMES = 2048
# Serialized span bytes per export request: far below the 4 MiB wire limit even
# before gzip (two 50 KB bodies make a span about 100 KB).
MAX_REQUEST_BYTES = 2_000_000


def is_span_body_type(content_type: str | None) -> bool:
    return content_type is not None and content_type.strip().lower().startswith(BODY_CONTENT_TYPES)


class SpanBuilder:
    """Turns one buffered request-log item into a span dict (see `encode.traces_request`)."""

    def __init__(self, config: RequestLogSettings, mask_headers: Iterable[str] = ()) -> None:
        self.config = config
        self._query = Matcher([*QUERY_PATTERNS, *config.mask_query_params])
        self._header = Matcher([*HEADER_PATTERNS, *config.mask_headers, *mask_headers])
        self._field = Matcher([*BODY_FIELD_PATTERNS, *config.mask_body_fields])
        # (prefix, header name) -> (attribute key, redacted?, a URL header?)
        self._names: dict[tuple[str, str], tuple[str, bool, bool]] = {}

    def span(self, item: Item) -> dict[str, Any]:
        cfg = self.config
        method, template, status = item.method, item.template, item.status
        req_headers, resp_headers = item.request_headers, item.response_headers
        parts = urlsplit(item.url)
        start_ns = int(item.started_at * 1e9)
        attrs: dict[str, Any] = {
            "url.scheme": parts.scheme or "http",
            "server.address": parts.netloc,
        }
        if parts.port is not None:
            attrs["server.port"] = parts.port
        attrs["network.protocol.version"] = "1.1"
        attrs["url.path"] = parts.path or "/"
        if parts.query and cfg.log_query_params:
            attrs["url.query"] = self.redact_query(parts.query)
        attrs["http.request.method"] = method
        if req_headers is not None and "User-Agent" in req_headers:
            attrs["user_agent.original"] = req_headers["User-Agent"]
        if item.consumer:
            attrs["apitally.consumer.identifier"] = item.consumer
        attrs["http.response.status_code"] = status
        if template:
            attrs["http.route"] = template
        if item.client_address:
            attrs["client.address"] = item.client_address
        if item.request_size is not None:
            attrs["http.request.body.size"] = item.request_size
        if item.response_size is not None:
            attrs["http.response.body.size"] = item.response_size
        if cfg.log_request_headers and req_headers is not None:
            attrs.update(self.headers("http.request.header.", req_headers.items()))
        if cfg.log_response_headers and resp_headers is not None:
            attrs.update(self.headers("http.response.header.", resp_headers.items()))
        for key, body, headers in (
            ("apitally.request.body", item.request_body, req_headers),
            ("apitally.response.body", item.response_body, resp_headers),
        ):
            value = self.body(body, headers)
            if value is not None:
                attrs[key] = value
        span = {
            # Random, not secret (as the OpenTelemetry SDK makes them); never all zero.
            "trace_id": f"{_random.getrandbits(128) | 1:032x}",
            "span_id": f"{_random.getrandbits(64) | 1:016x}",
            "name": f"{method} {template}" if template else method,
            "start_ns": start_ns,
            "end_ns": start_ns + int(item.response_time * 1e9),
            "attributes": attrs,
        }
        if status >= 500:
            attrs["error.type"] = str(status)
            span["error"] = True
        return span

    def redact_query(self, query: str) -> str:
        """`a=1&api_key=s` → `a=1&api_key=[REDACTED]` (only matching names' values)."""
        out = []
        for pair in query.split("&"):
            name, eq, _ = pair.partition("=")
            out.append(f"{name}={REDACTED}" if eq and self._query(unquote_plus(name)) else pair)
        return "&".join(out)

    def headers(self, prefix: str, pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """Header attributes: lower-cased names, one array element per occurrence."""
        out: dict[str, list[str]] = {}
        names = self._names
        for name, value in pairs:
            known = names.get((prefix, name))
            if known is None:
                lname = name.lower()
                redact = self._header(lname) or self._header(lname.replace("_", "-"))
                known = (prefix + lname, redact, lname in URL_HEADERS)
                if len(names) < MAX_CACHED_NAMES:
                    names[(prefix, name)] = known
            key, redact, is_url = known
            if redact:
                out[key] = [REDACTED]
                continue
            if is_url and "?" in value:
                base, _, query = value.partition("?")
                value = f"{base}?{self.redact_query(query)}"
            values = out.get(key)
            if values is None:
                out[key] = [value]
            else:
                values.append(value)
        return out

    def body(self, body: Any, headers: Mapping[str, str] | None) -> str | bytes | None:
        if body is None:
            return None
        if body is BODY_TOO_LARGE:
            return SPAN_BODY_TOO_LARGE
        if headers is None or not is_span_body_type(headers.get("Content-Type")):
            return None
        data = bytes(body)
        if not data:
            return None
        encoding = (headers.get("Content-Encoding") or "").strip().lower()
        if encoding not in ("", "identity"):
            return REDACTED  # the copy is of the encoded bytes: nothing to read safely
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data
        # Compact, non-ASCII as is: what json.dumps(separators=(",", ":"),
        # ensure_ascii=False) gives, as apitally 1.0.0 writes it.
        return orjson.dumps(self._redact(doc)).decode()

    def _redact(self, doc: Any) -> Any:
        if isinstance(doc, dict):
            return {
                k: REDACTED if isinstance(v, str) and self._field(k) else self._redact(v)
                for k, v in doc.items()
            }
        if isinstance(doc, list):
            return [self._redact(v) for v in doc]
        return doc


class SpanExports:
    """Writer-thread sink: items → spans → traces exports → `put` (the spool)."""

    def __init__(
        self,
        builder: SpanBuilder,
        resource: Mapping[str, Any],
        put: Callable[[dict[str, Any]], Any],
    ) -> None:
        self._builder = builder
        self._resource = dict(resource)
        self._put = put
        self.spans = 0

    def __call__(self, items: Iterable[Item]) -> int:
        """Spool the items' spans; returns how many were built."""
        batch: list[dict[str, Any]] = []
        size = 0
        built = 0
        for item in items:
            try:
                span = self._builder.span(item)
            except Exception:  # one odd request must not lose the batch
                log.exception("building a request-log span failed")
                continue
            built += 1
            batch.append(span)
            size += _estimate(span)
            if size >= MAX_REQUEST_BYTES:
                self._flush(batch)
                batch, size = [], 0
        if batch:
            self._flush(batch)
        self.spans += built
        return built

    def _flush(self, spans: list[dict[str, Any]]) -> None:
        body = encode.traces_request(self._resource, spans)
        self._put(export_payload("traces", secrets.token_hex(16), body))


def _estimate(span: Mapping[str, Any]) -> int:
    size = 100
    for key, value in span["attributes"].items():
        size += len(key) + (
            sum(len(v) for v in value) if isinstance(value, list) else len(str(value))
        )
    return size
