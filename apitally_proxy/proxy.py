"""The reverse proxy: one request's trip, top to bottom.

copy the request headers (minus hop-by-hop) → stream the body to the upstream →
wait for the response headers (time to first byte) → copy them back (minus
hop-by-hop and X-Apitally-*) → stream the body to the client → hand one
`Exchange` to whoever records it. Nothing here knows about Apitally beyond
stripping its headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from apitally_proxy.config import Settings, Upstream

# Hop-by-hop headers: the one rule both servers share (WebSocket upgrades are relayed by
# websocket.py, not forwarded).
from apitally_proxy.lean.headers import connection_names, is_hop_by_hop_name
from apitally_proxy.upstream import UpstreamPool, UpstreamResponse, buffer_head, error_status
from apitally_proxy.websocket import WebSocketRelay, is_websocket_upgrade

log = logging.getLogger("apitally_proxy.proxy")

# The proxy answers `Expect: 100-continue` itself and re-frames the body, so these
# are recomputed rather than copied.
REQUEST_RECOMPUTED = frozenset({"expect", "content-length"})
# Set by the proxy on every request, from the peer (or a trusted hop's values).
FORWARDED_REWRITTEN = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# Other ways a client claims an address, scheme or prefix: kept only from trusted hops.
CLIENT_ADDRESS_CLAIMS = frozenset({"forwarded", "x-real-ip", "x-client-ip", "true-client-ip"})
APITALLY_PREFIX = "x-apitally-"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
STATUS_CLIENT_CLOSED = 499
SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})
STATUS_CUT_BY_SHUTDOWN = 503  # still running when the drain's deadline came


class BodyCapture:
    """A bounded copy of a body as it streams past; never holds more than `limit` bytes.

    Once the body outgrows the limit the copy is dropped and `overflow` is set:
    a prefix is of no use to a JSON parser or a request log.
    """

    __slots__ = ("data", "limit", "overflow")

    def __init__(self, limit: int, known_size: int | None = None) -> None:
        self.data = bytearray()
        self.limit = limit
        # A declared length over the limit: do not copy a single byte.
        self.overflow = known_size is not None and known_size > limit

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if len(self.data) + len(chunk) > self.limit:
            self.overflow = True
            self.data = bytearray()
            return
        self.data += chunk


class _ProxyHead:
    """How the proxy writes a response head, for relayed and for its own responses.

    - Nothing is added that the app did not send: aiohttp's `Server` header and its
      default `Content-Type: application/octet-stream` are taken out again (`Date`
      stays: RFC 9110 §6.6.1 asks a proxy to add it when missing).
    - A head whose values carry obs-text is written byte for byte (`buffer_head`).
    - A request in an HTTP version the proxy does not speak is answered in HTTP/1.1.
    """

    obs_text = False
    # Relayed responses: whether the upstream sent these (the proxy's own send neither).
    had_content_type = True
    had_server = False
    http_version: tuple[int, int] | None = None

    async def _write_headers(self) -> None:
        headers = self._headers  # type: ignore[attr-defined]
        if not self.had_server:
            headers.pop("Server", None)
        if not self.had_content_type:
            headers.pop("Content-Type", None)
        if not self.obs_text and self.http_version is None:
            await super()._write_headers()  # type: ignore[misc]
            return
        request = self._req  # type: ignore[attr-defined]
        writer = self._payload_writer  # type: ignore[attr-defined]
        assert request is not None and writer is not None
        major, minor = self.http_version or request.version
        status_line = f"HTTP/{major}.{minor} {self._status} {self._reason}"  # type: ignore[attr-defined]
        buffer_head(writer, status_line, headers)
        if self._send_headers_immediately:  # type: ignore[attr-defined]
            writer.send_headers()


class _Response(_ProxyHead, web.StreamResponse):
    """A relayed response."""


class _Own(_ProxyHead, web.Response):
    """A response the proxy writes itself (refusals, 502/504)."""


class Exchange:
    """What the proxy observed about one request, handed to the recorder."""

    __slots__ = (
        "apitally_headers",
        "client_address",
        "got_headers",
        "log",
        "method",
        "path",
        "refused",
        "request_body",
        "request_headers",
        "request_size",
        "request_url",
        "response_body",
        "response_headers",
        "response_size",
        "response_time",
        "started_at",
        "status",
        "upstream_error",
    )

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.status = 0
        self.response_time = 0.0
        self.got_headers = False
        self.request_size: int | None = None
        self.response_size = 0
        # The app's X-Apitally-* response headers (lower-cased names), stripped from the response.
        self.apitally_headers: dict[str, str] | None = None
        self.upstream_error: str | None = None
        # Answered by the proxy itself (bad target, oversize head…): the app never saw it.
        self.refused = False
        # Filled only when the capture policy asks for them (validation errors, request log).
        self.log = False
        self.started_at = 0.0  # wall clock, for the request log
        self.request_url = ""
        self.client_address: str | None = None
        self.request_headers: CIMultiDictProxy[str] | None = None
        self.request_body: BodyCapture | None = None
        self.response_headers: CIMultiDict[str] | None = None
        self.response_body: BodyCapture | None = None

    # The response time is set here only: time to the upstream's response head, or to
    # the end of an exchange that never got one (a failure, a refusal, a cut).

    def answered(self, started: float) -> None:
        """The upstream's response head arrived (`started`: perf_counter at the start)."""
        self.response_time = time.perf_counter() - started
        self.got_headers = True

    def ended(self, started: float) -> None:
        """The exchange is over: without a response head, its time runs to here."""
        if not self.got_headers:
            self.response_time = time.perf_counter() - started


Recorder = Callable[[Exchange], None]


class CapturePolicy(Protocol):
    """Decides which requests and responses get a bounded copy of their body."""

    def on_request(self, request: web.BaseRequest, exchange: Exchange) -> None:
        """May set exchange.log, the request fields and a request BodyCapture."""

    def response_capture(
        self, exchange: Exchange, status: int, headers: CIMultiDict[str]
    ) -> BodyCapture | None:
        """A capture for this response's body, or None to copy nothing."""


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in Connection: also hop-by-hop for this message (never Host,
    Content-Length, Content-Type or Transfer-Encoding: they describe the message)."""
    return connection_names(headers.getall("Connection", ()))


class TrustedPeers:
    """Whether a peer address is in `trusted_proxies` (its X-Forwarded-* are kept); the
    answer per address is cached, in a bounded dict."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __call__(self, peer: str | None) -> bool:
        if not self._networks or not peer:
            return False
        known = self._cache.get(peer)
        if known is None:
            try:
                addr = ipaddress.ip_address(peer)
                known = any(addr in net for net in self._networks)
            except ValueError:
                known = False
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[peer] = known
        return known


class ReverseProxy:
    """An aiohttp low-level request handler that forwards everything to one upstream."""

    def __init__(
        self, settings: Settings, recorder: Recorder, capture: CapturePolicy | None = None
    ) -> None:
        self._upstream: Upstream = settings.upstream_target
        self._base_path = self._upstream.base_path
        self._recorder = recorder
        self._capture = capture
        self._trusted = TrustedPeers(settings.trusted_networks)
        self._max_header_bytes = settings.max_header_bytes
        # Below this many fields the parser's per-field limit already bounds the total.
        self._header_sum_threshold = settings.max_header_bytes // (2 * settings.max_field_size)
        self._websockets = WebSocketRelay(
            self._upstream,
            connect_timeout=settings.upstream_connect_timeout,
            handshake_timeout=settings.upstream_timeout,
            max_message=settings.max_websocket_message,
        )
        self._pool = UpstreamPool(
            self._upstream,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_timeout,
            keepalive=settings.upstream_keepalive,
            limit=settings.upstream_pool_size,
            body_timeout=settings.client_body_timeout,
            max_field_size=settings.max_response_field_size,
            max_headers=settings.max_response_headers,
            max_interim=settings.max_interim_responses,
        )
        self.in_flight = 0
        self.upstream_errors: dict[str, int] = {}
        self.refused = 0
        # Handler tasks in flight, so a drain can cut them at its deadline.
        self._tasks: set[asyncio.Task[object]] = set()
        self._cutting = False
        self.cut_by_shutdown = 0

    def count_parser_refusal(self, status: int) -> None:
        """A request aiohttp's parser refused before it reached `handle` (never forwarded)."""
        if status < 500:
            self.refused += 1

    def cut_in_flight(self) -> int:
        """Cancel every request still running (the drain's deadline); returns how many."""
        self._cutting = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    @property
    def retries(self) -> int:
        """Requests re-sent after a stale pooled connection."""
        return self._pool.retries

    async def close(self) -> None:
        await self._pool.close()
        await self._websockets.close()

    def _upstream_headers(self, request: web.BaseRequest) -> tuple[CIMultiDict[str], bool]:
        """The request headers as the upstream should see them, and whether a value
        carries bytes that are not UTF-8 (obs-text, forwarded byte for byte)."""
        incoming = request.headers
        extra = _connection_tokens(incoming) if "Connection" in incoming else set()
        peer = request.remote or ""
        trusted = self._trusted(peer)
        headers: CIMultiDict[str] = CIMultiDict()
        obs_text = False
        for name, value in incoming.items():
            lname = name.lower()
            if (
                is_hop_by_hop_name(lname, extra)
                or lname in REQUEST_RECOMPUTED
                # A client must never pose as a consumer or a route.
                or lname.startswith(APITALLY_PREFIX)
                # Client-address claims count only from a trusted hop (For/Proto/Host
                # are rewritten below either way).
                or (lname in FORWARDED_REWRITTEN)
                or (
                    not trusted
                    and (lname in CLIENT_ADDRESS_CLAIMS or lname.startswith("x-forwarded-"))
                )
            ):
                continue
            if not value.isascii():
                obs_text = True
            headers.add(name, value)
        length = request.content_length
        if length is not None:
            headers["Content-Length"] = str(length)
        target = request._message.url
        if target.absolute and target.raw_authority:
            # Absolute-form (`GET http://api.example/x`): the target's authority is the
            # request's host, whatever Host says (RFC 9112 §3.2.2); the request still
            # goes to the configured upstream only.
            headers["Host"] = target.raw_authority

        if trusted:
            # Keep what the trusted hop said, add ourselves to the chain.
            chain = ", ".join(incoming.getall("X-Forwarded-For", ()))
            headers["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
            headers["X-Forwarded-Proto"] = incoming.get("X-Forwarded-Proto", request.scheme)
            host = incoming.get("X-Forwarded-Host", headers.get("Host"))
        else:
            headers["X-Forwarded-For"] = peer
            headers["X-Forwarded-Proto"] = request.scheme
            host = headers.get("Host")
        if host:
            headers["X-Forwarded-Host"] = host
        return headers, obs_text

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Forward one request; always records exactly one Exchange."""
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        started = time.perf_counter()
        raw = request.rel_url
        exchange = Exchange(request.method, raw.raw_path)
        if self._capture is not None:
            self._capture.on_request(request, exchange)
        self.in_flight += 1
        task = request.task  # the handler task aiohttp runs this request in
        self._tasks.add(task)
        try:
            return await self._forward(request, exchange, started)
        except asyncio.CancelledError:
            if self._cutting:
                # The drain's deadline: the proxy cut it, not the client.
                self.cut_by_shutdown += 1
                if not exchange.got_headers:
                    exchange.status = STATUS_CUT_BY_SHUTDOWN
            elif exchange.status != 101:
                # aiohttp cancels the handler when the client goes away: a 499, unless it
                # was a WebSocket session (101), which a client leaving simply ends.
                exchange.status = STATUS_CLIENT_CLOSED
            raise
        finally:
            self.in_flight -= 1
            self._tasks.discard(task)
            exchange.ended(started)  # failed before the upstream answered: time to here
            if exchange.refused:
                self.refused += 1  # never reached the app: not metered
            else:
                try:
                    self._recorder(exchange)
                except Exception:  # metering must never break proxying
                    log.exception("recording a request failed")

    def _refuse(self, request: web.BaseRequest) -> web.Response | None:
        """Requests the proxy answers itself instead of forwarding (aiohttp's parser
        already refused malformed heads, smuggling-prone framing and oversize lines)."""
        if request.version not in SUPPORTED_VERSIONS:
            refusal = _Own(status=505, text="HTTP version not supported: use HTTP/1.1\n")
            refusal.http_version = (1, 1)
            refusal.force_close()
            return refusal
        if request.method == "CONNECT":
            return _Own(status=405, text="CONNECT is not supported by this proxy\n")
        if not request.rel_url.raw_path.startswith("/"):
            # Asterisk-form (`OPTIONS *`) and other targets an origin server never needs.
            return _Own(status=400, text="request target must start with /\n")
        raw = request.raw_headers
        if (
            len(raw) > self._header_sum_threshold
            and sum(len(k) + len(v) for k, v in raw) > self._max_header_bytes
        ):
            return _Own(status=431, text="request header fields too large\n")
        te = request.headers.get("Transfer-Encoding")
        if te is not None and te.strip().lower() != "chunked":
            # Only chunked framing is understood; anything else cannot be re-framed
            # faithfully for the upstream (RFC 9112 §6.1: 501).
            return _Own(status=501, text="unsupported Transfer-Encoding\n")
        return None

    async def _forward(
        self, request: web.BaseRequest, exchange: Exchange, started: float
    ) -> web.StreamResponse:
        method = request.method
        refusal = self._refuse(request)
        if refusal is not None:
            exchange.status = refusal.status
            exchange.refused = True
            return refusal
        target = self._base_path + request.rel_url.raw_path_qs
        headers, obs_text = self._upstream_headers(request)
        if is_websocket_upgrade(request):
            try:
                return await self._websockets.relay(request, target, headers, exchange, started)
            except Exception as exc:
                return self._error_response(exchange, exc)
        has_body = request.body_exists

        try:
            upstream = await self._send(
                request, method, target, headers, has_body, exchange, obs_text
            )
        except Exception as exc:
            return self._error_response(exchange, exc)
        exchange.answered(started)
        try:
            return await self._relay(request, upstream, exchange)
        finally:
            upstream.release()

    async def _send(
        self,
        request: web.BaseRequest,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        has_body: bool,
        exchange: Exchange,
        obs_text: bool = False,
    ) -> UpstreamResponse:
        chunked = has_body and request.content_length is None
        if chunked:
            headers["Transfer-Encoding"] = "chunked"  # re-framed: the client's TE was hop-by-hop
        if "Host" not in headers:
            headers["Host"] = self._pool.default_host  # HTTP/1.0 clients may send none
        body = self._stream_body(request, exchange) if has_body else None
        if request.content_length == 0:
            exchange.request_size = 0  # a declared empty body has a size, as in the clients
        # Only a request that can be re-sent without losing or repeating anything the
        # client sent may be retried on a fresh connection.
        retry_stale = not has_body and method in IDEMPOTENT_METHODS
        on_interim = None
        if request.version >= (1, 1) and request.writer is not None:
            writer = request.writer

            async def on_interim(status: int, reason: str, headers: CIMultiDictProxy[str]) -> None:
                # Interim answers (103 Early Hints…) go to the client as they come,
                # before the final head; HTTP/1.0 clients cannot take them.
                lines = [f"HTTP/1.1 {status} {reason}\r\n"]
                lines += [
                    f"{name}: {value}\r\n"
                    for name, value in headers.items()
                    if not is_hop_by_hop_name(name.lower())
                    and not name.lower().startswith(APITALLY_PREFIX)
                ]
                await writer.write(("".join(lines) + "\r\n").encode("utf-8", "surrogateescape"))

        return await self._pool.request(
            method, target, headers, body, chunked, retry_stale, on_interim, obs_text
        )

    async def _stream_body(
        self, request: web.BaseRequest, exchange: Exchange
    ) -> AsyncIterator[bytes]:
        exchange.request_size = 0
        capture = exchange.request_body
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
            and request.writer is not None
        ):
            # The client waits for this before sending the body; the upstream never sees
            # the Expect header (the body is already on its way when it would answer).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async for chunk in request.content.iter_any():
            exchange.request_size += len(chunk)
            if capture is not None:
                capture.feed(chunk)
            yield chunk

    async def _relay(
        self, request: web.BaseRequest, upstream: UpstreamResponse, exchange: Exchange
    ) -> web.StreamResponse:
        """Copy the upstream response to the client, streaming the body."""
        response = _Response(status=upstream.status, reason=upstream.reason)
        response.had_content_type = "Content-Type" in upstream.headers
        response.had_server = "Server" in upstream.headers
        if "Content-Length" in upstream.headers:
            # A sized body follows at once: send the head with its first chunk (one
            # write instead of two). Streams of unknown length (SSE, long polls) keep
            # aiohttp's default and get their head immediately.
            response._send_headers_immediately = False
        extra = _connection_tokens(upstream.headers) if "Connection" in upstream.headers else set()
        out = response.headers
        for name, value in upstream.headers.items():
            lname = name.lower()
            if lname.startswith(APITALLY_PREFIX):
                if exchange.apitally_headers is None:
                    exchange.apitally_headers = {}
                exchange.apitally_headers[lname] = value
                continue
            if is_hop_by_hop_name(lname, extra):
                continue
            if not value.isascii():
                response.obs_text = True
            out.add(name, value)
        exchange.status = upstream.status
        capture = None
        if self._capture is not None:
            capture = self._capture.response_capture(exchange, upstream.status, out)
            exchange.response_body = capture
        try:
            await response.prepare(request)
            if capture is None:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    exchange.response_size += len(chunk)
            else:
                # A bounded copy of chunks already flowing; the body is never held back.
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    exchange.response_size += len(chunk)
                    capture.feed(chunk)
            await response.write_eof()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError) or request.transport is None:
                # Writing to the client failed: the client left.
                exchange.status = STATUS_CLIENT_CLOSED
                return response
            # The upstream broke off mid-body; the status line is already out, so the
            # only honest signal left is to cut the client connection short.
            kind = "timeout" if isinstance(exc, TimeoutError) else "aborted"
            self._count_error(f"body_{kind}")
            exchange.upstream_error = f"body_{kind}"
            log.warning("upstream %s mid-response for %s %s", kind, exchange.method, exchange.path)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionResetError:
            exchange.status = STATUS_CLIENT_CLOSED
        return response

    def _count_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def _error_response(self, exchange: Exchange, exc: Exception) -> web.Response:
        """Map a failure to reach the upstream to 502/504, as nginx would."""
        status, kind, reason = error_status(exc)
        if kind == "client_body":
            # The client's own body broke or stalled: its fault, not the upstream's.
            exchange.status = status
            log.info("%s %s -> %d: %s", exchange.method, exchange.path, status, reason)
            return _Own(status=status, text=f"{status} {reason}\n")
        if kind == "internal":
            log.exception("unexpected error forwarding %s %s", exchange.method, exchange.path)
        self._count_error(kind)
        exchange.status = status
        exchange.upstream_error = kind
        log.warning(
            "%s %s -> %d: %s (%s: %s)",
            exchange.method,
            exchange.path,
            status,
            reason,
            type(exc).__name__,
            exc,
        )
        return _Own(status=status, text=f"{status} {reason}\n")
