"""A lean client-facing HTTP/1.1 server: an asyncio protocol on llhttp (httptools).

One `_Connection` per client socket. `data_received` feeds `lean.parser`'s
`RequestParser` (llhttp in strict mode through httptools, plus the limits and
refusals aiohttp's request parser adds: CL+TE, duplicate Content-Length or Host,
a missing Host, obs-fold, NUL, bad chunk sizes and oversize lines are refused),
and queues complete heads.
One task per busy connection answers them in order (pipelining), each as:

    refuse? → raw request head (headers.request_head) → LeanUpstream.send
    → response head (headers.response_fields) + first body chunk in one write
    → the rest of the body streamed, with backpressure both ways → one Exchange
      to the recorder

No web.Request, no web.StreamResponse, no header multidict built by the proxy,
no per-request closures on the common path. Flow control: the transport's write
buffer pauses the relay (`pause_writing`), request bodies pause the socket when
their StreamReader is full, pipelined heads pause it past `max_pipelined`.
Timeouts are one sweep a second over all connections (idle keep-alive and
unfinished heads, i.e. slowloris; clients that stop reading).

WebSocket upgrades are the one exception: the upgrade request becomes a
`web.BaseRequest` over this connection and goes to the aiohttp-based relay
(`ReverseProxy.handle`, `websocket.py`), which terminates the WebSocket on both
sides with its limits and close codes. Body captures (validation errors, the
request log) go through the same `Captures` policy as on the aiohttp server.
See docs/lean-server.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict

from apitally_proxy.config import Settings, Upstream
from apitally_proxy.lean.headers import (
    CHUNKED,
    CRLF,
    RawHeaders,
    date_line,
    header_bytes,
    interim_head,
    request_head,
    response_fields,
    status_line,
)
from apitally_proxy.lean.parser import HeadRefused, RequestHead, RequestParser
from apitally_proxy.lean.upstream import LeanResponse, LeanUpstream, _RawProtocol
from apitally_proxy.proxy import (
    IDEMPOTENT_METHODS,
    STATUS_CLIENT_CLOSED,
    STATUS_CUT_BY_SHUTDOWN,
    SUPPORTED_VERSIONS,
    Exchange,
    TrustedPeers,
)
from apitally_proxy.upstream import ClientBodyError, error_status
from apitally_proxy.websocket import wants_websocket

if TYPE_CHECKING:
    from apitally_proxy.capture import Captures

log = logging.getLogger("apitally_proxy.lean")

Recorder = Callable[[Exchange], None]
# Where a WebSocket upgrade goes: ReverseProxy.handle, on a web.BaseRequest.
Fallback = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

NO_BODY_STATUSES = frozenset({204, 304})
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
LINGER = 2.0  # seconds an unread request body is read and dropped before the close
SMALL_WRITE = 16 * 1024  # below this, head and first chunk are joined; above, writelines
REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class LeanConfig:
    """The limits and timeouts the lean server needs (the same names as Settings)."""

    upstream: Upstream
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 128
    max_header_bytes: int = 65536
    client_keepalive: float = 75.0  # idle keep-alive, and the most an unfinished head may take
    client_body_timeout: float = 60.0  # a pause in a request body (408), or a client not reading
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    upstream_keepalive: float = 1.0
    upstream_pool_size: int = 0
    max_response_field_size: int = 16384
    max_response_headers: int = 200
    max_interim_responses: int = 10
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    keep_request_headers: bool = False  # consumer_header: the meter reads request headers
    write_buffer_high: int = 64 * 1024  # the relay waits while more than this is unsent
    read_limit: int = 64 * 1024  # request body bytes buffered before the socket pauses (2x)
    max_pipelined: int = 16  # complete heads queued on one connection before it pauses

    @classmethod
    def from_settings(cls, s: Settings) -> LeanConfig:
        return cls(
            upstream=s.upstream_target,
            max_line_size=s.max_line_size,
            max_field_size=s.max_field_size,
            max_headers=s.max_headers,
            max_header_bytes=s.max_header_bytes,
            client_keepalive=s.client_keepalive,
            client_body_timeout=s.client_body_timeout,
            upstream_connect_timeout=s.upstream_connect_timeout,
            upstream_timeout=s.upstream_timeout,
            upstream_keepalive=s.upstream_keepalive,
            upstream_pool_size=s.upstream_pool_size,
            max_response_field_size=s.max_response_field_size,
            max_response_headers=s.max_response_headers,
            max_interim_responses=s.max_interim_responses,
            trusted_networks=tuple(s.trusted_networks),
            keep_request_headers=s.consumer_header is not None,
        )


def own_response(
    status: int, text: str, *, close: bool, version: tuple[int, int] = (1, 1)
) -> bytes:
    """A response the proxy writes itself (refusals, 502/504): plain text, nothing else."""
    body = text.encode()
    return b"".join(
        (
            status_line(version, status, REASONS.get(status, "Error")),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            date_line(),
            CLOSE if close else (KEEP_ALIVE if version == (1, 0) else b""),
            CRLF,
            body,
        )
    )


class _ClientGone(ConnectionError):
    """The client's connection closed while a response was being written."""


class _Direct:
    """A body-less request forwarded straight from `data_received` on an idle pooled
    connection, to be answered from that connection's callback (no task, no future)
    when its whole answer comes; anything else (interim answers, a body to stream, a
    failure or the stale retry) hands it to a task (`_run`)."""

    __slots__ = ("exchange", "head", "keep", "msg", "proto", "started")

    def __init__(
        self,
        msg: RequestHead,
        exchange: Exchange,
        started: float,
        keep: bool,
        head: bytes,
        proto: _RawProtocol,
    ) -> None:
        self.msg = msg
        self.exchange = exchange
        self.started = started
        self.keep = keep
        self.head = head
        self.proto = proto


class LeanServer:
    """Listens, owns the connections and the upstream pool; counts what it refused."""

    def __init__(
        self,
        config: LeanConfig,
        recorder: Recorder,
        capture: Captures | None = None,
        fallback: Fallback | None = None,
        pool: LeanUpstream | None = None,
    ) -> None:
        """`pool` is the upstream transport (the keep-alive pool); by default one is built
        from `config`. The server closes it with itself."""
        self.config = config
        self.recorder = recorder
        self.capture = capture
        # Request logging on: every request head goes past the capture policy.
        self.logging = capture is not None and capture.logging
        self.fallback = fallback
        up = config.upstream
        self.base_path = up.base_path.encode("ascii")
        self.pool = (
            pool
            if pool is not None
            else LeanUpstream(
                up,
                connect_timeout=config.upstream_connect_timeout,
                read_timeout=config.upstream_timeout,
                keepalive=config.upstream_keepalive,
                limit=config.upstream_pool_size,
                body_timeout=config.client_body_timeout,
                max_field_size=config.max_response_field_size,
                max_headers=config.max_response_headers,
                max_interim=config.max_interim_responses,
            )
        )
        self.default_host = self.pool.default_host.encode("ascii")
        self._header_sum_threshold = config.max_header_bytes // (2 * config.max_field_size)
        self.trusted = TrustedPeers(config.trusted_networks)  # X-Forwarded-* kept from these
        self.connections: set[_Connection] = set()
        self.in_flight = 0
        self.refused = 0  # answered by the proxy itself, never forwarded, not metered
        self.upstream_errors: dict[str, int] = {}
        self.cut_by_shutdown = 0
        self.draining = False
        self.cutting = False
        self._listener: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None

    # Listening.

    @property
    def retries(self) -> int:
        """Requests re-sent after a stale pooled connection."""
        return self.pool.retries

    async def start(
        self, host: str | None = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
    ) -> int:
        """Listen on host:port (host None: every interface); returns the port."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self, loop),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=2048,
        )
        self._sweeper = loop.call_later(1.0, self._sweep)
        sockets = self._listener.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._sweeper = loop.call_later(1.0, self._sweep)

    def count_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    # Drain and shutdown.

    async def stop_accepting(self) -> None:
        """Stop listening and close idle connections, then wait (unbounded: the caller
        sets the deadline) until every connection has closed. Requests in flight
        finish, and their connections close after them (`Connection: close`)."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close_if_idle()
        if not self.connections:
            self._all_closed.set()
        await self._all_closed.wait()

    async def drain(self, timeout: float) -> int:
        """`stop_accepting` for up to `timeout` seconds, then cut what is left (metered
        as 503) and close. Returns how many requests were cut."""
        drained = asyncio.ensure_future(self.stop_accepting())
        cut = 0
        try:
            await asyncio.wait_for(asyncio.shield(drained), max(0.0, timeout))
        except TimeoutError:
            cut = self.cut_in_flight()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained, 1.0)
        await self.close()
        return cut

    def cut_in_flight(self) -> int:
        """Cancel every request still running (the drain's deadline); returns how many."""
        self.cutting = True
        cut = 0
        for conn in list(self.connections):
            if conn.cut():
                cut += 1
        return cut

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await self._listener.wait_closed()
            self._listener = None
        for conn in list(self.connections):
            conn.abort()
        await self.pool.close()


class _Connection(BaseProtocol):
    """One client connection: parse, queue, answer in order."""

    __slots__ = (
        "_closing",
        "_direct",
        "_idle_since",
        "_lingering",
        "_pipeline_paused",
        "_queue",
        "_stalled_since",
        "_task",
        "_upgrade_head",
        "_ws_parser",
        "_ws_tail",
        "peer",
        "peername",
        "server",
        "sockname",
    )
    # What web.BaseRequest reads from its protocol (a WebSocket upgrade; see _upgrade).
    ssl_context = None

    def __init__(self, server: LeanServer, loop: asyncio.AbstractEventLoop) -> None:
        cfg = server.config
        super().__init__(loop)
        self._parser: Any = RequestParser(
            self,
            loop,
            cfg.read_limit,
            max_line_size=cfg.max_line_size,
            max_field_size=cfg.max_field_size,
            max_headers=cfg.max_headers,
            max_header_bytes=cfg.max_header_bytes,
        )
        self.server = server
        self.peer = ""
        # Complete heads waiting their turn (pipelining); a refusal is queued as an int.
        self._queue: deque[tuple[RequestHead, StreamReader] | int] = deque()
        self._task: asyncio.Task[None] | None = None
        self._direct: _Direct | None = None  # the request in flight without a task
        self._closing = False  # nothing more is read or parsed
        self._pipeline_paused = False
        self._lingering = False  # answered before its body was read: see _linger
        self._idle_since = loop.time()
        self._stalled_since = 0.0  # when the client stopped reading our writes
        # After a WebSocket upgrade head: the bytes that follow it, then the frame reader.
        self._ws_tail = b""
        self._ws_parser: Any = None
        # The request whose head the parser switched protocols after.
        self._upgrade_head: RequestHead | None = None
        self.peername: Any = None
        self.sockname: Any = None

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tr = self.transport
        assert tr is not None
        tr.set_write_buffer_limits(high=self.server.config.write_buffer_high)
        peername = self.peername = tr.get_extra_info("peername")
        self.sockname = tr.get_extra_info("sockname")
        self.peer = peername[0] if isinstance(peername, tuple) else ""
        self.server.connections.add(self)
        if self.server.draining:
            self.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._closing = True
        self.server.forget(self)
        if self._ws_parser is not None:
            self._ws_parser.feed_eof()
        gone = ConnectionResetError("client connection lost")
        for item in self._queue:
            if not isinstance(item, int) and item[1] is not EMPTY_PAYLOAD:
                item[1].set_exception(gone)
        if self._direct is not None:
            # Sent without a task, or handed to one that has not started yet (a task
            # cancelled before its first step runs none of its code).
            self._abandon(self._direct)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: its request is a 499

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._upgraded:
            self._upgraded_data(data)
            return
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HeadRefused as exc:
            # The requests completed before the bad one are answered first, in turn.
            self._queue.extend(exc.messages)
            self._refuse_stream(exc.status, exc)
            return
        if upgraded:
            # A WebSocket upgrade: whatever follows its head is not HTTP any more.
            self._upgraded = True
            self._upgrade_head = messages[-1][0] if messages else None
            self._upgraded_data(tail)
        if not messages:
            return
        queue = self._queue
        queue.extend(messages)
        if len(queue) >= self.server.config.max_pipelined and not self._pipeline_paused:
            self._pipeline_paused = True
            self._pause_reading_for_buffer()
        if self._task is None and self._direct is None:
            self._next()

    def _upgraded_data(self, data: bytes) -> None:
        ws = self._ws_parser
        if ws is not None:
            # After a protocol error (a message over max_websocket_message…) the reader
            # takes nothing more; the relay sends the close frame and ends the session.
            ws.feed_data(data)
            return
        # Frames sent before the upstream accepted: held (bounded) until it did.
        self._ws_tail += data
        if len(self._ws_tail) > self.server.config.read_limit and not self._buffer_paused:
            self._pause_reading_for_buffer()

    # What WebSocketResponse needs of a server protocol (aiohttp's RequestHandler API).

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        self._ws_parser = parser
        tail, self._ws_tail = self._ws_tail, b""
        if tail:
            self._upgraded_data(tail)
        if self._buffer_paused:
            self._resume_reading_for_buffer()

    def keep_alive(self, val: bool) -> None:
        """An upgraded connection never carries another request anyway."""

    def eof_received(self) -> bool:
        # A client that closes its side has left, as nginx and aiohttp see it: the
        # transport closes, connection_lost cancels what is running (499).
        self._closing = True
        return False

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stalled_since = self._loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled_since = 0.0

    def resume_reading(self, resume_parser: bool = True) -> None:
        # StreamReader calls this on every read below its low-water mark: only a real
        # pause needs undoing (and re-feeding the parser what it held back).
        if self._reading_paused:
            super().resume_reading(resume_parser)

    # Timeouts, closing, cutting.

    def check_timeouts(self, now: float) -> None:
        cfg = self.server.config
        if self._task is None and not self._queue:
            # Idle keep-alive, or a head still arriving: bounded by client_keepalive.
            if now - self._idle_since > cfg.client_keepalive:
                self.abort()
        elif self._stalled_since and now - self._stalled_since > cfg.client_body_timeout:
            self.abort()  # the client stopped reading what we send

    def close_if_idle(self) -> None:
        if self._task is None and not self._queue:
            self.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def cut(self) -> bool:
        if self._direct is not None:
            self._abandon(self._direct)
            if self._task is not None:
                self._task.cancel()  # handed over, not started: it has nothing left to do
            self.close()
            return True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            return True
        return False

    def _refuse_stream(self, status: int, exc: BaseException) -> None:
        """The parser refused the byte stream: answer in turn, read nothing more, close."""
        self._closing = True
        log.info("refused a request from %s: %d %s", self.peer, status, exc)
        queue = self._queue
        last = queue[-1] if queue else None
        if isinstance(last, tuple) and last[1] is not EMPTY_PAYLOAD and not last[1].is_eof():
            # The broken framing is inside the last request's body (a bad chunk size…).
            if len(queue) == 1 and self._task is not None:
                # Being forwarded right now: its upload fails, it is answered 400 and
                # metered (the app saw its head), and the connection closes after.
                last[1].set_exception(ClientBodyError(f"malformed request body: {exc}"))
                return
            queue[-1] = status  # still queued: never forwarded, answered 400 in its turn
        else:
            queue.append(status)
        self.server.refused += 1
        if self._task is None and self._direct is None:
            self._task = self._loop.create_task(self._run())

    # Answering, in order.

    def _next(self) -> None:
        """Answer the request at the head of the queue: forwarded from here when nothing
        needs waiting for, else by a task."""
        if not self._forward_now():
            self._task = self._loop.create_task(self._run())

    def _advance(self, keep: bool) -> bool:
        """The request at the head of the queue is answered: whether the connection
        carries on (else it is closed, or lingers)."""
        queue = self._queue
        queue.popleft()
        if self._pipeline_paused and len(queue) < self.server.config.max_pipelined // 2:
            self._pipeline_paused = False
            self._resume_reading_for_buffer()
        if not keep or self.server.draining or (self._upgraded and not queue):
            self._closing = True
            if self._lingering:
                self._linger()
            else:
                self.close()
            return False
        return True

    async def _run(self, direct: _Direct | None = None) -> None:
        """Answer the queue in order; `direct`: the head's request is already sent."""
        queue = self._queue
        try:
            if direct is not None:
                if self._direct is not direct:
                    return  # abandoned before this task started
                self._direct = None
                keep = await self._forwarded(
                    direct.msg, EMPTY_PAYLOAD, direct.exchange, direct.started, direct.keep, direct
                )
                if not self._advance(keep):
                    return
            while queue and self.transport is not None:
                item = queue[0]
                if isinstance(item, int):
                    text = f"{REASONS.get(item, 'refused')}\n"
                    with contextlib.suppress(ConnectionError):
                        self._write(own_response(item, text, close=True))
                    self.close()
                    return
                try:
                    keep = await self._handle(item[0], item[1])
                except ConnectionError:  # the client left while its refusal was written
                    keep = False
                if not self._advance(keep):
                    return
        except Exception:
            # A bug, here or in the capture policy (the request is recorded all the same):
            # this connection ends rather than hang with its request still queued.
            log.exception("answering a request from %s failed", self.peer)
            self.abort()
        finally:
            self._task = None
            self._idle_since = self._loop.time()
            if self._closing and not self._lingering and self.transport is not None:
                self.close()

    def _linger(self) -> None:
        """Close after answering a request whose body was not read to its end (an early
        413…). Closing a socket with unread bytes makes the kernel reset it, which can
        destroy the answer before the client read it; so the rest is read and dropped
        (`_closing`), for up to LINGER seconds or until the client closes, as aiohttp's
        and nginx's lingering close do."""
        if self.transport is None:
            return
        if self._reading_paused or self._buffer_paused:
            self._reading_paused = self._buffer_paused = False
            self._resume_transport_reading()
        self._loop.call_later(LINGER, self.close)

    def _write(self, data: bytes) -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            raise _ClientGone()
        tr.write(data)

    def _refusal(self, msg: RequestHead) -> tuple[int, str, bool] | None:
        """(status, text, close) for requests the proxy answers itself, else None."""
        if msg.version not in SUPPORTED_VERSIONS:
            return 505, "HTTP version not supported: use HTTP/1.1\n", True
        method = msg.method
        if method == "CONNECT":
            return 405, "CONNECT is not supported by this proxy\n", True
        if msg.target[:1] != b"/" and msg.authority is None:
            return 400, "request target must start with /\n", True
        raw = msg.raw_headers
        server = self.server
        if (
            len(raw) > server._header_sum_threshold
            and header_bytes(raw) > server.config.max_header_bytes
        ):
            return 431, "request header fields too large\n", True
        te = msg.transfer_encoding
        if te is not None and te.strip().lower() != b"chunked":
            return 501, "unsupported Transfer-Encoding\n", True
        return None

    def _new_exchange(self, msg: RequestHead, has_body: bool) -> Exchange:
        path = msg.path_qs if msg.path_qs is not None else msg.path
        q = path.find("?")
        exchange = Exchange(msg.method, path if q < 0 else path[:q])
        if self.server.config.keep_request_headers:
            exchange.request_headers = msg.headers
        if not has_body and msg.content_length == b"0":
            exchange.request_size = 0  # a declared empty body has a size
        if self.server.logging:
            self._log_head(msg, path, exchange)
        return exchange

    def _forward_now(self) -> bool:
        """Send the request at the head of the queue from here, if it has no body, needs
        no answer from the proxy itself and an idle upstream connection is at hand;
        its answer comes to `_upstream_ready`."""
        item = self._queue[0]
        if isinstance(item, int):
            return False
        msg, payload = item
        server = self.server
        if (
            payload is not EMPTY_PAYLOAD
            or msg is self._upgrade_head
            or server.draining
            or not server.pool.idle_now()
            or self._refusal(msg) is not None
        ):
            return False
        started = time.perf_counter()
        head = self._request_head(msg)
        proto = server.pool.send_now(msg.method, head, self._upstream_ready)
        if proto is None:
            return False
        exchange = self._new_exchange(msg, False)
        server.in_flight += 1
        self._direct = _Direct(msg, exchange, started, not msg.should_close, head, proto)
        return True

    def _upstream_ready(self) -> None:
        """The upstream connection of the request in flight has its answer, or failed."""
        direct = self._direct
        if direct is None:
            return
        proto = direct.proto
        if not proto.whole():
            # An interim answer, a body to stream, a failure: a task takes over.
            proto.listener = None
            self._task = self._loop.create_task(self._run(direct))
            return
        self._direct = None
        upstream = self.server.pool.answer_now(proto)
        exchange = direct.exchange
        exchange.answered(direct.started)
        try:
            keep = self._write_answer(direct.msg, upstream, exchange, direct.keep)[0]
        except ConnectionError:
            exchange.status = STATUS_CLIENT_CLOSED
            keep = False
        except Exception:
            # A bug, here or in the capture policy: this connection ends (its head may be
            # half written), the request is still recorded, the worker goes on.
            log.exception("relaying the answer to %s %s failed", exchange.method, exchange.path)
            self.abort()
            keep = False
        finally:
            upstream.release()
            self._recorded(exchange, direct.started)
        if self._advance(keep):
            self._idle_since = self._loop.time()
            if self._queue:
                self._next()

    def _abandon(self, direct: _Direct) -> None:
        """The request in flight without a task ends unanswered: the client left (499),
        or the drain's deadline cut it (503)."""
        self._direct = None
        direct.proto.listener = None
        direct.proto.close()  # its answer is still owed: never reused
        self._cancelled(direct.exchange)
        self._recorded(direct.exchange, direct.started)

    def _recorded(self, exchange: Exchange, started: float) -> None:
        """The exchange is over: counted out of flight, timed, metered."""
        server = self.server
        server.in_flight -= 1
        exchange.ended(started)
        try:
            server.recorder(exchange)
        except Exception:  # metering must never break proxying
            log.exception("recording a request failed")

    async def _handle(self, msg: RequestHead, payload: StreamReader) -> bool:
        """Answer one request; records exactly one Exchange unless refused. Returns
        whether the connection may carry another request."""
        started = time.perf_counter()
        server = self.server
        keep = not msg.should_close
        has_body = payload is not EMPTY_PAYLOAD
        refusal = self._refusal(msg)
        if refusal is not None:
            status, text, close = refusal
            server.refused += 1
            keep = keep and not close and (not has_body or payload.is_eof())
            self._write(own_response(status, text, close=not keep, version=(1, 1)))
            return keep
        if msg is self._upgrade_head:
            # The head the parser switched protocols after: nothing follows it as HTTP.
            if wants_websocket(msg.method, msg.headers):
                if server.fallback is None:
                    server.refused += 1
                    self._write(own_response(501, "WebSocket is not relayed here\n", close=True))
                else:
                    await self._upgrade(msg, payload)
                return False
            keep = False  # forwarded as a plain request; the bytes after it are not HTTP
        exchange = self._new_exchange(msg, has_body)
        server.in_flight += 1
        return await self._forwarded(msg, payload, exchange, started, keep)

    async def _forwarded(
        self,
        msg: RequestHead,
        payload: StreamReader,
        exchange: Exchange,
        started: float,
        keep: bool,
        direct: _Direct | None = None,
    ) -> bool:
        """Forward one request (`direct`: it is already on its way) and record its
        Exchange. Returns whether the connection may carry another request."""
        has_body = payload is not EMPTY_PAYLOAD
        try:
            keep = await self._forward(msg, payload, has_body, exchange, started, keep, direct)
        except asyncio.CancelledError:
            self._cancelled(exchange)
            raise
        except ConnectionError:  # _ClientGone, or a write that failed on a closed socket
            exchange.status = STATUS_CLIENT_CLOSED
            keep = False
        finally:
            self._recorded(exchange, started)
        if has_body and not payload.is_eof():
            # Answered before the whole body came: the rest cannot be parsed.
            keep = False
            self._lingering = True
        return keep

    def _cancelled(self, exchange: Exchange) -> None:
        """The request's task was cancelled: cut by the drain (503), or the client left."""
        self._closing = True  # either way, this connection carries nothing more
        server = self.server
        if not server.cutting:
            exchange.status = STATUS_CLIENT_CLOSED
            return
        server.cut_by_shutdown += 1
        if not exchange.got_headers:
            exchange.status = STATUS_CUT_BY_SHUTDOWN
            with contextlib.suppress(Exception):
                self._write(own_response(503, "cut by shutdown\n", close=True, version=(1, 1)))

    def _request_head(self, msg: RequestHead) -> bytes:
        """The head sent upstream: hop-by-hop and X-Apitally-* dropped, X-Forwarded-* set."""
        server = self.server
        authority: bytes | None = None
        target = msg.target
        if msg.path_qs is not None:  # absolute-form: origin-form upstream, its Host
            assert msg.authority is not None
            authority = msg.authority.encode("utf-8", "surrogateescape")
            target = msg.path_qs.encode("utf-8", "surrogateescape")
        if server.base_path:
            target = server.base_path + target
        peer = self.peer
        return request_head(
            msg.method,
            target,
            msg.raw_headers,
            peer=peer,
            trusted=server.trusted(peer),
            authority=authority,
            chunked=msg.chunked,
            default_host=server.default_host,
        )

    async def _forward(
        self,
        msg: RequestHead,
        payload: StreamReader,
        has_body: bool,
        exchange: Exchange,
        started: float,
        keep: bool,
        direct: _Direct | None,
    ) -> bool:
        pool = self.server.pool
        method = msg.method
        retry_stale = not has_body and method in IDEMPOTENT_METHODS
        on_interim = self._interim if msg.version >= (1, 1) else None
        try:
            if direct is not None:
                upstream = await pool.finish(
                    direct.proto, method, direct.head, retry_stale, on_interim
                )
            else:
                body = self._body(payload, exchange, msg) if has_body else None
                upstream = await pool.send(
                    method,
                    self._request_head(msg),
                    body,
                    msg.chunked,
                    retry_stale=retry_stale,
                    on_interim=on_interim,
                )
        except Exception as exc:
            return self._failed(exc, exchange, keep, msg.version)
        exchange.answered(started)
        if has_body and not payload.is_eof():
            keep = False  # answered early (a 413…): the client is told the connection ends
        try:
            return await self._relay(msg, upstream, exchange, keep)
        finally:
            upstream.release()

    def _log_head(self, msg: RequestHead, path_qs: str, exchange: Exchange) -> None:
        """The request log's side of the capture policy (request logging is on)."""
        headers = msg.headers
        host = headers.get("Host") or self.server.pool.default_host
        if msg.path_qs is not None:  # absolute-form: the target's authority is the host
            host = msg.authority or host
        capture = self.server.capture
        assert capture is not None
        capture.on_head(
            exchange,
            msg.method,
            headers,
            self.peer or None,
            f"http://{host}",
            path_qs,
            headers.get("Content-Length"),
        )

    async def _upgrade(self, msg: RequestHead, payload: StreamReader) -> None:
        """A WebSocket upgrade, relayed by ReverseProxy.handle (websocket.py) on a
        web.BaseRequest over this connection; it records the Exchange itself."""
        server = self.server
        assert server.fallback is not None
        loop = self._loop
        task = asyncio.current_task()
        assert task is not None
        request = web.BaseRequest(
            msg.raw_message(), payload, cast(Any, self), StreamWriter(self, loop), task, loop
        )
        response = await server.fallback(request)
        if not response.prepared:  # the upstream refused the upgrade, or was unreachable
            await response.prepare(request)
            await response.write_eof()

    def _interim(self, status: int, reason: str, raw: RawHeaders) -> None:
        self._write(interim_head(status, reason, raw))

    async def _body(
        self, payload: StreamReader, exchange: Exchange, msg: RequestHead
    ) -> AsyncIterator[bytes]:
        exchange.request_size = 0
        capture = exchange.request_body
        if msg.version >= (1, 1):
            expect = msg.expect
            if expect is not None and expect.lower() == b"100-continue":
                # The client waits for this before it sends the body; the upstream
                # never sees Expect (the body is on its way before it could answer).
                self._write(CONTINUE)
        while True:
            chunk = await payload.readany()
            if not chunk:
                return
            exchange.request_size += len(chunk)
            if capture is not None:
                capture.feed(chunk)
            yield chunk

    def _failed(
        self, exc: BaseException, exchange: Exchange, keep: bool, version: tuple[int, int]
    ) -> bool:
        if isinstance(exc, ConnectionError) and not isinstance(exc, aiohttp.ClientError):
            raise exc  # the client left while an interim answer was written: a 499
        status, kind, reason = error_status(exc)
        server = self.server
        exchange.status = status
        if kind == "client_body":
            log.info("%s %s -> %d: %s", exchange.method, exchange.path, status, reason)
            keep = False
        else:
            server.count_error(kind)
            exchange.upstream_error = kind
            if kind == "internal":
                log.error(
                    "unexpected error forwarding %s %s",
                    exchange.method,
                    exchange.path,
                    exc_info=exc,
                )
            else:
                log.warning(
                    "%s %s -> %d: %s (%s: %s)",
                    exchange.method,
                    exchange.path,
                    status,
                    reason,
                    type(exc).__name__,
                    exc,
                )
        with contextlib.suppress(_ClientGone):
            self._write(own_response(status, f"{status} {reason}\n", close=not keep))
        return keep

    def _response_head(
        self, msg: RequestHead, upstream: LeanResponse, exchange: Exchange, keep: bool
    ) -> tuple[bytes, bool, bool, bool]:
        """(head, bodiless, chunked_out, keep) for relaying this upstream answer."""
        status = upstream.status
        exchange.status = status
        fields = response_fields(upstream.raw_headers)
        exchange.apitally_headers = fields.apitally
        capture = self.server.capture
        if capture is not None and capture.may_capture(exchange, status):
            lines = fields.lines
            headers: CIMultiDict[str] = CIMultiDict(
                (lines[i].decode("latin-1"), lines[i + 2].decode("utf-8", "surrogateescape"))
                for i in range(0, len(lines), 4)
            )
            exchange.response_body = capture.response_capture(exchange, status, headers)
        version: tuple[int, int] = msg.version
        bodiless = msg.method == "HEAD" or status in NO_BODY_STATUSES or status < 200
        chunked_out = False
        parts = fields.lines
        if not fields.has_date:
            parts.append(date_line())
        if not bodiless and not fields.has_length:
            # A chunked or close-delimited upstream body: chunked to HTTP/1.1 clients,
            # close-delimited to HTTP/1.0 ones.
            if version >= (1, 1):
                chunked_out = True
                parts.append(CHUNKED)
            else:
                keep = False
        if self.server.draining:
            keep = False
        if not keep:
            parts.append(CLOSE)
        elif version == (1, 0):
            parts.append(KEEP_ALIVE)
        parts.append(CRLF)
        head = status_line(version, status, upstream.reason) + b"".join(parts)
        return head, bodiless, chunked_out, keep

    def _write_answer(
        self, msg: RequestHead, upstream: LeanResponse, exchange: Exchange, keep: bool
    ) -> tuple[bool, bool, bool]:
        """The response head and the body that is here, in one write. Returns (keep,
        chunked_out, more): `more`, the rest of the body is to stream from `content`."""
        head, bodiless, chunked_out, keep = self._response_head(msg, upstream, exchange, keep)
        if bodiless:
            self._write(head)
            return keep, False, False
        content = upstream.content
        if content is None:  # the whole body came with the head
            first = upstream.body
            done = True
        else:
            first = content.read_nowait(-1)
            done = content.at_eof()
        exchange.response_size = len(first)
        capture = exchange.response_body
        if capture is not None:
            capture.feed(first)
        if chunked_out and first:
            first = b"%x\r\n%b\r\n" % (len(first), first)
        if done and chunked_out:
            first += LAST_CHUNK
        tr = self.transport
        if tr is None or tr.is_closing():
            raise _ClientGone()
        # Head and first chunk in one write (writelines: one writev, no copy).
        if len(first) < SMALL_WRITE:
            tr.write(head + first)
        else:
            tr.writelines((head, first))
        return keep, chunked_out, not done

    async def _relay(
        self, msg: RequestHead, upstream: LeanResponse, exchange: Exchange, keep: bool
    ) -> bool:
        """The response head and first chunk in one write, then the body as it comes."""
        try:
            keep, chunked_out, more = self._write_answer(msg, upstream, exchange, keep)
            if more:
                assert upstream.content is not None
                await self._stream(upstream.content, exchange, chunked_out)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectionResetError) or self.transport is None:
                raise _ClientGone() from exc  # writing to the client failed: the client left
            # The upstream broke off mid-body; the status line is out, so the only honest
            # signal left is to cut the client connection short.
            kind = "timeout" if isinstance(exc, TimeoutError) else "aborted"
            self.server.count_error(f"body_{kind}")
            exchange.upstream_error = f"body_{kind}"
            log.warning("upstream %s mid-response for %s %s", kind, exchange.method, exchange.path)
            self.abort()
            return False
        return keep

    async def _stream(self, content: StreamReader, exchange: Exchange, chunked: bool) -> None:
        """The rest of a body, chunk by chunk as it arrives, waiting while the client lags."""
        if self._paused:
            await self._drain_helper()
        size = exchange.response_size
        capture = exchange.response_body
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            n = len(chunk)
            size += n
            exchange.response_size = size
            if capture is not None:
                capture.feed(chunk)
            tr = self.transport
            if tr is None or tr.is_closing():
                raise _ClientGone()
            if chunked:
                tr.writelines((b"%x\r\n" % n, chunk, CRLF))
            else:
                tr.write(chunk)
            if self._paused:
                await self._drain_helper()
        if chunked:
            self._write(LAST_CHUNK)


__all__ = ["LeanConfig", "LeanServer", "own_response"]
