#!/usr/bin/env python3
"""The floor: the cheapest honest HTTP/1.1 reverse proxy in CPython + uvloop (issue 12).

    .venv/bin/python bench/bench_floor.py [--duration 5] [--rounds 3] [--connections 50]
                                          [--sizes 100,65536] [--targets LIST]
                                          [--perf S] [--micro N] [--output PATH]
    .venv/bin/python bench/bench_floor.py check     # correctness of the floor variants
    .venv/bin/python bench/bench_floor.py micro [N] # the floor's pieces in-process, best of 5
    .venv/bin/python bench/bench_floor.py serve --variant callback --upstream URL --listen H:P

Issue 12 asks for the proxy's CPU per request to be at most 2.5x nginx's. This
measures how low a Python proxy can go at all, next to nginx and the product in
the same run, so the gap can be split into "what the product does" and "what
CPython + uvloop costs anyway".

Floor variants (`serve --variant`), all uvloop, one upstream keep-alive connection
per client connection (opened at its first request):

  callback          asyncio Protocol callbacks only: no Task, no Future, no coroutine
                    on the hot path. httptools (llhttp) parses both sides; the request
                    head is the request line, the client's header lines minus the
                    hop-by-hop ones, X-Forwarded-For appended, Content-Length when a
                    body came (bodies, chunked or not, are buffered whole: up to 1 MB
                    in this floor); the response head is rebuilt the same way and
                    written with its body in one writev once the body is complete.
  callback-aiohttp  the same, the client side parsed by aiohttp's C HttpRequestParser
                    (the parser the product's lean server uses: it builds a
                    RawRequestMessage with a CIMultiDict and a yarl URL per request).
  callback+meter    `callback` plus, per request, one Exchange (method, path, status,
                    response_time from time.perf_counter, response_size) handed to the
                    real Meter(RouteResolver()).record.
  coroutine         `callback`'s parsers, but one Task per connection that awaits a
                    Future per upstream answer (the lean server's shape, without its
                    streaming, limits and metering): what tasks and futures cost.

Targets: nginx (proxy_pass, keepalive pool), the variants above, and apitally-proxy
(`python -m apitally_proxy`, APITALLY_PROXY_SERVER=lean, local mode, 1 worker), all
in front of one nginx upstream (/small: a 100-byte JSON file, /large: 64 KB).
Pinning, wrk and process handling are bench/run.py's: proxies on one CPU, wrk and the
upstream on the other. Per round, size and target (order rotating each round), wrk
-t1 -cN keep-alive runs; the target's process tree's user and system CPU (psutil)
before and after, divided by the requests wrk completed, give µs/request; voluntary
context switches per request show how many loop wake-ups each request costs. Ratios
to nginx are taken per round, medians reported. Hold /tmp/apitally-bench.lock
(flock) around a measuring run. Results: a Markdown table on stdout (and JSON with
--output PATH).

  --perf S   then, per size, an S-second run each for nginx, callback and
             apitally-proxy under `perf record -e cpu-clock` and `perf stat` on the
             syscall tracepoints: CPU per request by shared object (kernel, libpython,
             uvloop, llhttp, nginx…), top symbols, syscalls per request.
  --micro N  then `micro N` pinned on the proxies' CPU: each piece of the floor's
             request path timed alone, in-process (hot caches: a lower bound).
  check      the floor variants against the nginx upstream and a deliberately odd
             one (bodies to the close, 1xx, truncated, chunked): pipelining, HEAD,
             HTTP/1.0, chunked request bodies, X-Forwarded-For, 400 on a bad head.

Uses httptools (a project dependency: the lean server's parser) and, for --perf, `perf`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_lean  # noqa: E402  (its upstream's files)
import run as bench  # noqa: E402  (bench/run.py: processes, nginx configs, wrk)

HOST = bench.HOST
SIZES = {100: "/small", 65536: "/large"}
VARIANTS = ("callback", "callback-aiohttp", "callback+meter", "coroutine")
TARGETS = ("nginx", "apitally-proxy", *VARIANTS)
MAX_BODY = 1 << 20  # the floor buffers bodies whole; past this it answers 413 / 502

# Hop-by-hop request headers (RFC 9110 §7.6.1) plus those the floor sets itself.
REQUEST_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"x-forwarded-for",
    }
)
NO_BODY = frozenset({204, 304})
CRLF = b"\r\n"
SEP = b": "
BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nbad gateway\n"
)
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nbad request\n"
)
TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
    b"Connection: close\r\n\r\ntoo large\n"
)
NOT_IMPLEMENTED = (
    b"HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n"
    b"Connection: close\r\n\r\nnot implemented\n"
)


# --------------------------------------------------------------------------- the floor


class Floor:
    """What every connection shares: the upstream address, the meter, counters."""

    def __init__(self, host: str, port: int, variant: str) -> None:
        self.host = host
        self.port = port
        self.variant = variant
        self.requests = 0
        self.upstream_connects = 0
        self.meter: Any = None
        if variant == "callback+meter":
            from apitally_proxy.metering import Meter
            from apitally_proxy.proxy import Exchange
            from apitally_proxy.routes import RouteResolver

            self.meter = Meter(RouteResolver())
            self.exchange = Exchange

    def factory(self) -> asyncio.Protocol:
        if self.variant == "callback-aiohttp":
            return AioClient(self)
        if self.variant == "coroutine":
            return CoroClient(self)
        return Client(self)

    def record(self, req: Request, status: int, size: int) -> None:
        """One Exchange to the real meter (callback+meter only)."""
        target = req.target
        q = target.find(b"?")
        ex = self.exchange(req.method.decode(), (target if q < 0 else target[:q]).decode("latin-1"))
        ex.status = status
        ex.response_time = time.perf_counter() - req.started
        ex.got_headers = True
        ex.response_size = size
        self.meter.record(ex)


class Request:
    """One client request, its upstream head already serialized."""

    __slots__ = ("head_only", "keep", "method", "started", "target", "version10", "wire")

    def __init__(
        self, method: bytes, target: bytes, wire: bytes, keep: bool, version10: bool
    ) -> None:
        self.method = method
        self.target = target
        self.wire = wire  # what goes to the upstream: head + body
        self.keep = keep
        self.version10 = version10
        self.head_only = method == b"HEAD"
        self.started = 0.0


def build_request(
    method: bytes, target: bytes, lines: list[bytes], xff: bytes, body: bytes | None
) -> bytes:
    """Request line, the client's end-to-end header lines, X-Forwarded-For, framing."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n", *lines, b"X-Forwarded-For: ", xff, CRLF]
    if body is not None:
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
    else:
        parts.append(CRLF)
    return b"".join(parts)


class ClientSide(asyncio.Protocol):
    """The client connection's half that does not depend on the request parser:
    ordering (one request upstream at a time, the others queued: pipelining works),
    the upstream connection, the answer."""

    floor: Floor
    transport: Any
    peer: bytes

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.up: Upstream | None = None
        self.connecting = False
        self.busy: Request | None = None  # the request the upstream is answering
        self.pending: deque[Request] = deque()
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b"unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        up = self.up
        if up is not None:
            self.up = None
            up.transport.close()

    def dispatch(self, req: Request) -> None:
        """A complete request: upstream now, or queued behind the one in flight."""
        if self.closed:
            return
        req.started = time.perf_counter()
        if self.busy is not None or self.up is None:
            self.pending.append(req)
            if self.up is None and not self.connecting:
                self.connect()
            return
        self.busy = req
        self.up.send(req)

    def connect(self) -> None:
        """Once per client connection (and after the upstream closed one)."""
        self.connecting = True
        self.floor.upstream_connects += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: Upstream(self), self.floor.host, self.floor.port)
        )
        task.add_done_callback(self.connected)

    def connected(self, task: asyncio.Task[Any]) -> None:
        self.connecting = False
        if task.cancelled() or task.exception() is not None:
            self.fail()
            return
        up = task.result()[1]
        if self.closed:
            up.transport.close()
            return
        self.up = up
        self.next()

    def next(self) -> None:
        if not self.pending or self.busy is not None:
            return
        if self.up is None:
            if not self.connecting:
                self.connect()  # the upstream ended the last one (Connection: close)
            return
        req = self.busy = self.pending.popleft()
        self.up.send(req)

    def respond(self, chunks: list[bytes], status: int, size: int) -> None:
        """The upstream's complete answer to `self.busy`: one write, then the next one."""
        req = self.busy
        assert req is not None
        self.busy = None
        self.floor.requests += 1
        if self.closed:
            return
        self.transport.writelines(chunks)
        if self.floor.meter is not None:
            self.floor.record(req, status, size)
        if not req.keep:
            self.closed = True
            self.transport.close()
            return
        if self.pending or self.up is None:
            self.next()

    def fail(self) -> None:
        """The upstream could not answer: 502, and this connection ends."""
        self.busy = None
        self.up = None
        if not self.closed:
            self.closed = True
            self.transport.write(BAD_GATEWAY)
            self.transport.close()

    def refuse(self, answer: bytes) -> None:
        if not self.closed:
            self.closed = True
            self.transport.write(answer)
            self.transport.close()


class Client(ClientSide):
    """httptools on the client side: five parser callbacks per plain GET."""

    def __init__(self, floor: Floor) -> None:
        import httptools

        super().__init__(floor)
        self.parser = httptools.HttpRequestParser(self)
        self.errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
        self.target = b""
        self.lines: list[bytes] = []
        self.xff: bytes | None = None
        self.body: list[bytes] | None = None
        self.body_size = 0
        self.too_large = False

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.errors as exc:
            self.transport.pause_reading()
            if type(exc).__name__ == "HttpParserUpgrade":
                self.refuse(NOT_IMPLEMENTED)
            else:
                self.refuse(TOO_LARGE if self.too_large else BAD_REQUEST)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.target = b""
        self.lines = []
        self.xff = None
        self.body = None

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in REQUEST_DROP:
            if name.lower() == b"x-forwarded-for":
                self.xff = value if self.xff is None else self.xff + b", " + value
            return
        self.lines.append(name + SEP + value + CRLF)

    def on_body(self, body: bytes) -> None:
        if self.body is None:
            self.body = []
            self.body_size = 0
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            self.too_large = True
            raise ValueError("request body too large for the floor")

    def on_message_complete(self) -> None:
        p = self.parser
        method = p.get_method()
        xff = self.peer if self.xff is None else self.xff + b", " + self.peer
        body = b"".join(self.body) if self.body is not None else None
        wire = build_request(method, self.target, self.lines, xff, body)
        self.dispatch(
            Request(method, self.target, wire, p.should_keep_alive(), p.get_http_version() == "1.0")
        )


class AioClient(ClientSide):
    """aiohttp's C request parser on the client side (as the product's lean server)."""

    def __init__(self, floor: Floor) -> None:
        from aiohttp._http_parser import HttpRequestParser
        from aiohttp.base_protocol import BaseProtocol
        from aiohttp.streams import EMPTY_PAYLOAD

        super().__init__(floor)
        loop = asyncio.get_running_loop()
        # The payloads' StreamReaders want an aiohttp protocol to pause; reading is
        # never paused in the floor (bodies are buffered whole).
        self.base = BaseProtocol(loop)
        self.parser: Any = HttpRequestParser(
            self.base, loop, MAX_BODY, auto_decompress=False, payload_exception=ValueError
        )
        self.empty = EMPTY_PAYLOAD
        self.waiting: deque[tuple[Any, Any]] = deque()  # heads whose body is still coming

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.base.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages, upgraded, _tail = self.parser.feed_data(data)
        except Exception:
            self.transport.pause_reading()
            self.refuse(BAD_REQUEST)
            return
        if upgraded:
            self.refuse(NOT_IMPLEMENTED)
            return
        waiting = self.waiting
        if messages:
            waiting.extend(messages)
        while waiting:
            msg, payload = waiting[0]
            if payload is self.empty:
                body = None
            elif payload.is_eof():
                body = payload.read_nowait()
            else:
                return
            waiting.popleft()
            self.forward(msg, body)

    def forward(self, msg: Any, body: bytes | None) -> None:
        lines = []
        xff = None
        for name, value in msg.raw_headers:
            lname = name.lower()
            if lname in REQUEST_DROP:
                if lname == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                continue
            lines.append(name + SEP + value + CRLF)
        xff = self.peer if xff is None else xff + b", " + self.peer
        method = msg.method.encode()
        target = msg.path.encode("utf-8", "surrogateescape")
        wire = build_request(method, target, lines, xff, body)
        self.dispatch(Request(method, target, wire, not msg.should_close, msg.version == (1, 0)))


class CoroClient(Client):
    """httptools as `callback`, answered by one Task per connection that awaits a Future
    per request: the cost of tasks and futures next to plain callbacks."""

    def __init__(self, floor: Floor) -> None:
        super().__init__(floor)
        self.queue: deque[Request] = deque()
        self.wake: asyncio.Future[None] | None = None
        self.answer: asyncio.Future[list[bytes]] | None = None
        self.task: asyncio.Task[None] | None = None

    def dispatch(self, req: Request) -> None:
        if self.closed:
            return
        req.started = time.perf_counter()
        self.queue.append(req)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.serve())
        elif self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.task is not None:
            self.task.cancel()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        floor = self.floor
        while not self.closed:
            if not self.queue:
                self.wake = loop.create_future()
                await self.wake
                continue
            req = self.queue.popleft()
            if self.up is None:
                try:
                    _, self.up = await loop.create_connection(
                        lambda: Upstream(self), floor.host, floor.port
                    )
                    floor.upstream_connects += 1
                except OSError:
                    self.fail()
                    return
            self.busy = req
            self.answer = loop.create_future()
            self.up.send(req)
            chunks = await self.answer
            self.busy = None
            floor.requests += 1
            self.transport.writelines(chunks)
            if not req.keep:
                self.closed = True
                self.transport.close()

    def respond(self, chunks: list[bytes], status: int, size: int) -> None:
        if self.answer is not None:
            self.answer.set_result(chunks)

    def fail(self) -> None:
        super().fail()
        if self.answer is not None and not self.answer.done():
            self.answer.cancel()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, owned by one client connection.

    httptools (llhttp) validates and frames each response, but gets no per-header
    callback: the head is forwarded as the upstream sent it (taken from the bytes
    read, up to its blank line), less its hop-by-hop lines (HOP_LINES).
    The body is collected and handed back whole, with the head, in one write."""

    def __init__(self, client: ClientSide) -> None:
        import httptools

        self.client = client
        self.httptools = httptools
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.req: Request | None = None
        self.want_head = True  # the next bytes start a response head
        self.partial = b""  # a head split over reads, so far
        self.head = b""  # the response head as sent, through its last header line
        self.body: list[bytes] = []
        self.size = 0
        self.in_message = False
        self.head_complete = False
        self.head_answered = False  # a HEAD answer ended with its head
        self.reframe = False  # the body needs a Content-Length: it came chunked or to-close

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, req: Request) -> None:
        self.req = req
        self.want_head = True
        self.transport.write(req.wire)

    def data_received(self, data: bytes) -> None:
        if self.req is None:
            self.drop()  # nothing was asked: not HTTP we can follow
            return
        if self.want_head:
            self.take_head(data)
        try:
            self.parser.feed_data(data)
        except Exception:
            self.drop()
            return
        if self.head_answered:
            # llhttp cannot be told a response answers HEAD: start a fresh parser.
            self.head_answered = False
            self.parser = self.httptools.HttpResponseParser(self)

    def take_head(self, data: bytes) -> None:
        """The raw head of the final response (interim 1xx heads skipped)."""
        buf = self.partial + data if self.partial else data
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                self.partial = buf[start:]
                return
            if buf[start + 9 : start + 10] != b"1" or buf[start + 9 : start + 12] == b"101":
                break
            start = end + 4  # a 100 Continue / 103 Early Hints: not relayed by the floor
        self.head = buf[start : end + 2]
        self.partial = b""
        self.want_head = False

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client.up is self:
            client.up = None
        if self.req is None:
            return
        if (
            self.in_message
            and self.head_complete
            and not self.reframe  # not chunked
            and b"\r\ncontent-length:" not in self.head.lower()
        ):
            # A body with neither Content-Length nor chunked framing: it ends with the
            # connection (RFC 9112 §6.3).
            self.reframe = True
            self.on_message_complete()
            return
        self.req = None
        client.fail()

    def drop(self) -> None:
        client = self.client
        if client.up is self:
            client.up = None
        self.transport.close()
        if self.req is not None:
            self.req = None
            client.fail()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body = []
        self.size = 0
        self.in_message = True
        self.head_complete = False
        self.reframe = False

    def on_chunk_header(self) -> None:
        self.reframe = True  # chunked: sent on with a Content-Length instead

    def on_headers_complete(self) -> None:
        self.head_complete = True
        req = self.req
        if req is not None and req.head_only and self.parser.get_status_code() >= 200:
            self.head_answered = True
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.size += len(body)
        if self.size > MAX_BODY:
            raise ValueError("response body too large for the floor")

    def on_message_complete(self) -> None:
        if not self.in_message:
            return  # the HEAD answer, already handed back at its head
        self.in_message = False
        status = self.parser.get_status_code()
        req = self.req
        if status < 200 or req is None:
            return  # an interim response: not relayed by the floor
        self.req = None
        parts = [HOP_LINES.sub(b"", self.head)]
        if self.reframe and not (req.head_only or status in NO_BODY):
            parts.append(b"Content-Length: %d\r\n" % self.size)  # de-chunked, or to-close
        if not req.keep:
            parts.append(b"Connection: close\r\n")
        elif req.version10:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(CRLF)
        body = self.body
        if len(body) == 1 and self.size < 16384:
            parts.append(body[0])  # a small response: one buffer
            chunks = [b"".join(parts)]
        else:
            chunks = [b"".join(parts), *body]
        if not self.parser.should_keep_alive():
            self.client.up = None
            self.transport.close()
        self.client.respond(chunks, status, self.size)


# Response header lines a proxy must not forward (RFC 9110 §7.6.1): one C pass over
# the head. (Eight bytes.find calls on the lower-cased head cost twice as much, and
# a per-header parser callback more still.)
HOP_LINES = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|transfer-encoding|trailer|upgrade)"
    rb"[ \t]*:[^\r\n]*",
    re.IGNORECASE,
)


def serve(variant: str, upstream: str, listen: str) -> None:
    """Run one floor variant until SIGTERM; print its counters on the way out."""
    import gc

    import uvloop

    up = upstream.removeprefix("http://").rstrip("/")
    up_host, _, up_port = up.rpartition(":")
    host, _, port = listen.rpartition(":")
    floor = Floor(up_host, int(up_port), variant)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(floor.factory, host, int(port), backlog=4096)
        # The product's worker settings after start-up (apitally_proxy/server.py).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        out = {"variant": variant, "requests": floor.requests}
        out["upstream_connects"] = floor.upstream_connects
        if floor.meter is not None:
            out["recorded"] = floor.meter.recorded
        print(json.dumps(out), flush=True)

    uvloop.run(main())


# --------------------------------------------------------------------------- processes


def upstream_conf(workdir: Path, port: int) -> str:
    """bench_lean's upstream (/small 100 B, /large 64 KB files), plus /echo (any method,
    a small answer) and /gzip (the 64 KB file gzipped on the fly: a chunked response),
    and the X-Forwarded-For it saw echoed back in X-Seen-XFF (for `check`)."""
    bench_lean.write_bodies(workdir)
    return (
        bench._nginx_common(workdir)
        + "http {\n"
        + bench._nginx_http_common(workdir)
        + f"""  server {{
    listen {HOST}:{port} backlog=4096;
    default_type application/json;
    add_header X-Seen-XFF $http_x_forwarded_for;
    location /small {{ root {workdir}; try_files /small.json =404; }}
    location /large {{ root {workdir}; try_files /large.json =404; }}
    location /echo {{ return 200 '{{"ok":true}}'; }}
    location /gzip {{
      root {workdir}; try_files /large.json =404;
      gzip on; gzip_types *; gzip_min_length 0;
    }}
  }}
}}
"""
    )


def start_floor(
    ps: bench.ProcessSet, variant: str, workdir: Path, port: int, up_port: int, cpus: Any
) -> subprocess.Popen[Any]:
    argv = [
        str(Path(__file__).resolve()), "serve", "--variant", variant,
        "--upstream", f"http://{HOST}:{up_port}", "--listen", f"{HOST}:{port}",
    ]  # fmt: skip
    return bench.start_serving(ps, variant, argv, workdir, port, cpus)


def start_targets(
    ps: bench.ProcessSet, tmp: Path, targets: list[str], pin: bool
) -> tuple[dict[str, int], dict[str, int], Any]:
    """The upstream, then each target; ({target: port}, {target: pid}, client cpus)."""
    proxy_cpus, client_cpus = bench.pick_cpus(pin)
    up_port, admin_port, *ports = bench.free_ports(2 + len(targets))
    bench.start_nginx(
        ps, "nginx-upstream", tmp / "up", upstream_conf(tmp / "up", up_port), up_port, client_cpus
    )
    port_of = dict(zip(targets, ports, strict=True))
    pids: dict[str, int] = {}
    for target, port in port_of.items():
        if target == "nginx":
            conf = bench.nginx_proxy_conf(tmp / "ngx", port, up_port)
            p = bench.start_nginx(ps, "nginx", tmp / "ngx", conf, port, proxy_cpus)
        elif target == "apitally-proxy":
            p = bench.start_apitally(
                ps, tmp / "ap", port, admin_port, up_port, proxy_cpus, server="lean"
            )
        else:
            p = start_floor(ps, target, tmp / "floor", port, up_port, proxy_cpus)
        pids[target] = p.pid
    return port_of, pids, client_cpus


# --------------------------------------------------------------------------- check


def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes, read until the server closes (or goes quiet)."""
    out = b""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        with contextlib.suppress(TimeoutError):
            s.settimeout(0.5)
            while chunk := s.recv(65536):
                out += chunk
    return out


def check_target(port: int) -> list[str]:
    """Problems seen through one floor variant (empty: all fine)."""
    problems = []
    base = f"http://{HOST}:{port}"
    cases = [
        ("GET /small", "/small/x?q=1", None, {}, 200, 100),
        ("GET /large", "/large/x", None, {}, 200, 65536),
        ("POST body", "/echo", b"a" * 5000, {}, 200, 11),
        ("gzip (chunked upstream)", "/gzip", None, {"Accept-Encoding": "gzip"}, 200, None),
        ("404", "/nope", None, {}, 404, None),
    ]
    for label, path, body, headers, want_status, want_len in cases:
        req_headers = {"X-Forwarded-For": "10.0.0.1", **headers}
        try:
            status, got, data = bench.http_get(base + path, headers=req_headers) if body is None \
                else _post(base + path, body, req_headers)  # fmt: skip
        except OSError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if status != want_status or (want_len is not None and len(data) != want_len):
            problems.append(f"{label}: status {status}, {len(data)} bytes")
        if status == 200 and got.get("X-Seen-XFF") != "10.0.0.1, 127.0.0.1":
            problems.append(f"{label}: upstream saw X-Forwarded-For {got.get('X-Seen-XFF')!r}")
    # Pipelined: two requests in one write, answers in order; then HTTP/1.0 closes.
    two = b"GET /small/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
    out = raw_exchange(port, two + b"HEAD /large HTTP/1.0\r\nHost: x\r\n\r\n")
    if out.count(b"HTTP/1.1 200") != 3 or not out.endswith(b"\r\n\r\n") or b'{"ok"' not in out:
        problems.append(f"pipelined + HEAD/1.0: {out[:200]!r}...")
    # A chunked request body, then keep-alive goes on.
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"5\r\nhello\r\n0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(port, chunked)
    if out.count(b"HTTP/1.1 200") != 2:
        problems.append(f"chunked request body: {out[:200]!r}")
    if not raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    ):
        problems.append("a broken head was not refused with 400")
    return problems


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=3) as r:
        return r.status, dict(r.headers.items()), r.read()


# Answers of a deliberately odd upstream (check only), by request path.
ODD_ANSWERS = {
    b"/eof": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close",
    b"/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n"
    b"\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
}


def odd_upstream() -> tuple[socket.socket, int]:
    """A thread answering each connection's first request from ODD_ANSWERS, then
    closing: bodies to the close, interim heads, truncated bodies, chunked."""
    import threading

    listener = socket.create_server((HOST, 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                data += chunk
            path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b""
            conn.sendall(ODD_ANSWERS.get(path, b"HTTP/1.1 404 Not Found\r\n\r\n"))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def check_odd(port: int) -> list[str]:
    """The floor in front of odd_upstream: what each answer became."""
    want = {
        b"/eof": (b"HTTP/1.1 200", b"Content-Length: 15\r\n", b"until the close"),
        b"/interim": (b"HTTP/1.1 200", b"Content-Length: 2\r\n", b"ok"),
        b"/truncated": (b"HTTP/1.1 502", b"Connection: close\r\n", b"bad gateway\n"),
        b"/chunked": (b"HTTP/1.1 200", b"Content-Length: 5\r\n", b"\r\n\r\nabcde"),
    }
    problems = []
    for path, (start, header, end) in want.items():
        out = raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        hop = b"keep-alive:" in out.lower() or b"transfer-encoding" in out.lower()
        if not (out.startswith(start) and header in out and out.endswith(end)) or hop:
            problems.append(f"{path.decode()}: {out!r}")
    return problems


def run_check() -> int:
    ps = bench.ProcessSet()
    failed = False
    listener, odd_port = odd_upstream()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            ports, _pids, _ = start_targets(ps, tmp, list(VARIANTS), pin=False)
            odd = {}
            for variant in VARIANTS:
                odd[variant] = port = bench.free_ports(1)[0]
                start_floor(ps, variant, tmp / "odd", port, odd_port, None)
            for variant, port in ports.items():
                problems = check_target(port) + check_odd(odd[variant])
                failed |= bool(problems)
                print(f"{variant:<17} {'ok' if not problems else '; '.join(problems)}")
        finally:
            ps.stop_all()
            listener.close()
    return 1 if failed else 0


# --------------------------------------------------------------------------- micro

WRK_REQUEST = b"GET /small/0 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
NGINX_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:05:36 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n"
    b"Last-Modified: Tue, 01 Dec 2026 16:05:35 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b0ef04f-64"\r\nX-Seen-XFF: 127.0.0.1\r\nAccept-Ranges: bytes\r\n\r\n'
    b'{"data":"' + b"x" * 88 + b'"}\n'
)


class _StubClient:
    """Stands in for the client connection when the upstream side is timed alone."""

    up: Any = None

    def respond(self, chunks: list[bytes], status: int, size: int) -> None:
        pass


def _discard(_req: Any) -> None:
    pass


def _per_call(fn: Any, arg: Any, n: int, repeat: int = 5) -> float:
    """µs of CPU per fn(arg), the loop's own cost taken off; the best of `repeat`."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            fn(arg)
        t1 = time.process_time()
        for _ in range(n):
            _discard(arg)
        t2 = time.process_time()
        best = min(best, (t1 - t0) - (t2 - t1))
    return round(best / n * 1e6, 2)


def run_micro(n: int) -> dict[str, float]:
    """The floor's per-request pieces, each alone in-process (no sockets, no loop turn):
    what is left of the measured user time is the event loop and the transports."""
    import uvloop

    out: dict[str, float] = {}

    async def main() -> None:
        floor = Floor(HOST, 1, "callback+meter")
        client = Client(floor)
        client.peer = b"127.0.0.1"
        client.dispatch = _discard  # type: ignore[method-assign,assignment]
        out["request: httptools parse + upstream head + Request"] = _per_call(
            client.data_received, WRK_REQUEST, n
        )
        aio = AioClient(floor)
        aio.peer = b"127.0.0.1"
        aio.dispatch = _discard  # type: ignore[method-assign,assignment]
        out["request: aiohttp C parser + upstream head + Request"] = _per_call(
            aio.data_received, WRK_REQUEST, n
        )
        from aiohttp._http_parser import HttpRequestParser
        from aiohttp.base_protocol import BaseProtocol

        loop = asyncio.get_running_loop()
        bare = HttpRequestParser(BaseProtocol(loop), loop, MAX_BODY, auto_decompress=False)
        out["  of which aiohttp feed_data alone"] = _per_call(bare.feed_data, WRK_REQUEST, n)
        req = Request(b"GET", b"/small/0", b"", True, False)
        up = Upstream(_StubClient())  # type: ignore[arg-type]

        def answer(data: bytes) -> None:
            up.req = req
            up.data_received(data)

        out["response: httptools parse + raw head less hop-by-hop (10 headers)"] = _per_call(
            answer, NGINX_RESPONSE, n
        )
        req.started = time.perf_counter()
        out["meter: Exchange + Meter.record"] = _per_call(
            lambda r: floor.record(r, 200, 100), req, n
        )

        costs = [await _await_cost(n) for _ in range(5)]
        out["task: one await of a Future set by a callback, over a plain callback"] = min(costs)

    uvloop.run(main())
    return out


async def _await_cost(n: int) -> float:
    """µs a Task's `await fut` (fut resolved from a loop callback) costs over the same
    hand-off as a plain loop callback: what the coroutine shape pays, twice a request."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = n

    def ping() -> None:
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(ping)
        else:
            done.set_result(None)

    t0 = time.process_time()
    loop.call_soon(ping)
    await done
    t1 = time.process_time()

    async def worker() -> None:
        for _ in range(n):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, None)
            await fut

    await loop.create_task(worker())
    t2 = time.process_time()
    return round(((t2 - t1) - (t1 - t0)) / n * 1e6, 2)


# --------------------------------------------------------------------------- measuring


def counters(pid: int) -> tuple[float, float, int]:
    """(user s, system s, voluntary context switches) of the process tree."""
    import psutil

    user = system = 0.0
    switches = 0
    for p in bench.proc_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            user += t.user
            system += t.system
            switches += p.num_ctx_switches().voluntary
    return user, system, switches


def measure(
    ps: bench.ProcessSet, pid: int, url: str, args: argparse.Namespace, script: Path, cpus: Any
) -> dict[str, Any]:
    u0, s0, v0 = counters(pid)
    res = bench.run_wrk(ps, url, args.duration, args.connections, script, cpus)
    u1, s1, v1 = counters(pid)
    n = max(res["requests"], 1)
    wall = res["duration_us"] / 1e6 or args.duration
    return {
        "requests": res["requests"],
        "rps": round(res["rps"]),
        "cpu_us_per_req": round((u1 - u0 + s1 - s0) / n * 1e6, 2),
        "user_us_per_req": round((u1 - u0) / n * 1e6, 2),
        "sys_us_per_req": round((s1 - s0) / n * 1e6, 2),
        "wakeups_per_req": round((v1 - v0) / n, 3),
        "cpu_util": round((u1 - u0 + s1 - s0) / wall, 3),
        "p50_ms": res["p50_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "errors": res["errors_total"] + res["non_2xx_3xx"],
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = args.targets.split(",")
    ps = bench.ProcessSet()
    result: dict[str, Any] = {"parameters": parameters(args, targets)}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            ports, pids, client_cpus = start_targets(ps, tmp, targets, not args.no_pin)
            script = tmp / "report.lua"
            script.write_text(bench.WRK_REPORT_LUA)
            for target in targets:  # warm-up: imports, pools, caches
                for size in sizes:
                    url = f"http://{HOST}:{ports[target]}{SIZES[size]}"
                    bench.run_wrk(ps, url, 1, args.connections, script, client_cpus)
            raw = rounds(ps, args, targets, sizes, ports, pids, script, client_cpus)
            result["summary"] = summarize(raw)
            result["raw"] = raw
            if args.perf:
                perf_targets = [t for t in ("nginx", "callback", "apitally-proxy") if t in targets]
                result["perf"] = {
                    str(size): {
                        t: perf_profile(
                            ps, tmp, t, size, ports[t], pids[t], args, script, client_cpus
                        )
                        for t in perf_targets
                    }
                    for size in sizes
                }
            if args.micro:
                result["micro"] = micro_subprocess(ps, args.micro)
        finally:
            ps.stop_all()
    return result


def rounds(
    ps: bench.ProcessSet,
    args: argparse.Namespace,
    targets: list[str],
    sizes: list[int],
    ports: dict[str, int],
    pids: dict[str, int],
    script: Path,
    client_cpus: Any,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Interleaved rounds: per round and size every target once, the order rotating."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(s): {t: [] for t in targets} for s in sizes
    }
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for size in sizes:
            for target in order:
                url = f"http://{HOST}:{ports[target]}{SIZES[size]}/{rnd}"
                res = measure(ps, pids[target], url, args, script, client_cpus)
                raw[str(size)][target].append(res)
                print(
                    f"round {rnd + 1} {size:>6} B {target:<17} "
                    f"{res['cpu_us_per_req']:>7.1f} µs/req (user "
                    f"{res['user_us_per_req']:.1f} sys {res['sys_us_per_req']:.1f})  "
                    f"{res['rps']:>6} req/s  util {res['cpu_util']:.2f}  "
                    f"wakeups/req {res['wakeups_per_req']:.2f}  errors {res['errors']}",
                    flush=True,
                )
    return raw


# Counted per request in the perf run (syscall tracepoints): where the kernel time comes from.
SYSCALLS = (
    "read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg",
    "epoll_wait", "epoll_pwait", "epoll_ctl", "ioctl", "getpid", "futex", "close",
)  # fmt: skip
_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s*$")


def perf_report(data: Path, sort: str, limit: int) -> list[tuple[float, str]]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", sort, "--stdio", "-q"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            rows.append((float(m.group(1)), " ".join(m.group(2).split())))
    return rows[:limit]


def perf_profile(
    ps: bench.ProcessSet,
    tmp: Path,
    target: str,
    size: int,
    port: int,
    pid: int,
    args: argparse.Namespace,
    script: Path,
    client_cpus: Any,
) -> dict[str, Any]:
    """One extra run under `perf record` (cpu-clock samples of the target's
    processes): its CPU per request split by shared object (kernel, libpython,
    uvloop, httptools, nginx…), and its top symbols."""
    data = tmp / f"perf-{target}-{size}.data"
    counts = tmp / f"perf-{target}-{size}.stat"
    procs = ",".join(str(p.pid) for p in bench.proc_tree(pid))
    events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{n}" for n in SYSCALLS)])
    commands = [
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", procs, "-o", str(data)],
        ["perf", "stat", "-x", ",", "-e", events, "-p", procs, "-o", str(counts)],
    ]
    perfs = [
        ps.start(
            "perf",
            cmd,
            cpus=client_cpus,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for cmd in commands
    ]
    time.sleep(0.5)
    try:
        run_args = argparse.Namespace(**{**vars(args), "duration": args.perf})
        res = measure(
            ps, pid, f"http://{HOST}:{port}{SIZES[size]}/perf", run_args, script, client_cpus
        )
    finally:
        for perf in perfs:
            with contextlib.suppress(ProcessLookupError):
                perf.send_signal(signal.SIGINT)
        for perf in perfs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                perf.wait(timeout=30)
            ps.close(perf, "perf")
    cpu = res["cpu_us_per_req"]
    syscalls = {}
    with contextlib.suppress(OSError):
        for line in counts.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit():
                name = fields[2].removeprefix("syscalls:sys_enter_").removeprefix("raw_syscalls:")
                per_req = int(fields[0]) / max(res["requests"], 1)
                if per_req >= 0.005:
                    syscalls["all" if name == "sys_enter" else name] = round(per_req, 3)
    dsos = perf_report(data, "dso", 8)
    syms = perf_report(data, "dso,sym", 15)
    return {
        "cpu_us_per_req": cpu,
        "user_us_per_req": res["user_us_per_req"],
        "sys_us_per_req": res["sys_us_per_req"],
        "rps": res["rps"],
        "syscalls_per_req": syscalls,
        "dso_us_per_req": {name: round(pct / 100 * cpu, 2) for pct, name in dsos},
        "dso_percent": {name: pct for pct, name in dsos},
        "top_symbols_percent": [[pct, name] for pct, name in syms],
    }


def micro_subprocess(ps: bench.ProcessSet, n: int) -> dict[str, float]:
    """`micro` in a child on the proxies' CPU, once the wrk runs are over."""
    proxy_cpus, _ = bench.pick_cpus(True)
    p = ps.start(
        "micro", [sys.executable, str(Path(__file__).resolve()), "micro", str(n), "--json"],
        cpus=proxy_cpus, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        ps.close(p, "micro")
    result: dict[str, float] = json.loads(out)
    return result


def parameters(args: argparse.Namespace, targets: list[str]) -> dict[str, Any]:
    import aiohttp
    import uvloop

    try:
        import httptools

        httptools_version = httptools.__version__
    except ImportError:
        httptools_version = None
    proxy_cpus, client_cpus = bench.pick_cpus(not args.no_pin)
    return {
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "targets": targets,
        "pinning": f"proxies on {proxy_cpus}, wrk+upstream on {client_cpus}",
        "python": sys.version.split()[0],
        "uvloop": uvloop.__version__,
        "aiohttp": aiohttp.__version__,
        "httptools": httptools_version,
        "git": bench.git_rev(),
        "git_dirty": _git_dirty(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 2)


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for size, per_target in raw.items():
        row: dict[str, Any] = {}
        base = per_target.get("nginx", [])
        for target, rounds in per_target.items():
            entry: dict[str, Any] = {
                key: _median(rounds, key)
                for key in ("cpu_us_per_req", "user_us_per_req", "sys_us_per_req")
            }
            entry["cpu_us_per_req_rounds"] = [r["cpu_us_per_req"] for r in rounds]
            entry["rps"] = round(statistics.median(r["rps"] for r in rounds))
            entry["wakeups_per_req"] = _median(rounds, "wakeups_per_req")
            entry["cpu_util"] = _median(rounds, "cpu_util")
            entry["errors"] = sum(r["errors"] for r in rounds)
            if base:
                ratios = [
                    r["cpu_us_per_req"] / b["cpu_us_per_req"]
                    for r, b in zip(rounds, base, strict=True)
                ]
                sys_ratios = [
                    r["sys_us_per_req"] / b["sys_us_per_req"]
                    for r, b in zip(rounds, base, strict=True)
                ]
                entry["x_nginx"] = round(statistics.median(ratios), 2)
                entry["x_nginx_rounds"] = [round(x, 2) for x in ratios]
                entry["sys_x_nginx"] = round(statistics.median(sys_ratios), 2)
            row[target] = entry
        summary[size] = row
    return summary


def _git_dirty() -> list[str]:
    """Files changed in the work tree (the product measured is the work tree's)."""
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "-C", str(ROOT), "status", "--short", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    return []


def print_report(result: dict[str, Any]) -> None:
    p = result["parameters"]
    print(
        f"\nCPU µs/request, median of {p['rounds']} rounds of {p['duration_s']} s, "
        f"wrk -t1 -c{p['connections']} keep-alive ({p['pinning']}); git {p['git']}"
        + (f", work tree changed: {', '.join(p['git_dirty'])}" if p["git_dirty"] else "")
        + "\n"
    )
    print(
        "| response | target | CPU µs/req | ÷ nginx | user µs | sys µs | sys ÷ nginx "
        "| req/s | util | wakeups/req | ÷ nginx per round |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, row in result["summary"].items():
        for target, e in row.items():
            ratio = e.get("x_nginx")
            print(
                f"| {int(size)} B | {target} | {e['cpu_us_per_req']:.1f} | "
                f"{ratio if ratio is not None else '-'} | {e['user_us_per_req']:.1f} | "
                f"{e['sys_us_per_req']:.1f} | {e.get('sys_x_nginx', '-')} | {e['rps']} | "
                f"{e['cpu_util']:.2f} | {e['wakeups_per_req']:.2f} | "
                f"{e.get('x_nginx_rounds', '-')} |"
            )
    for size, target, prof in (
        (size, target, prof)
        for size, per_target in result.get("perf", {}).items()
        for target, prof in per_target.items()
    ):
        print(
            f"\nperf record, {size} B, {target}: {prof['cpu_us_per_req']:.1f} µs/req "
            f"(user {prof['user_us_per_req']:.1f}, sys {prof['sys_us_per_req']:.1f}), "
            f"{prof['rps']} req/s; µs/req by shared object:"
        )
        calls = ", ".join(f"{n} {c}" for n, c in prof["syscalls_per_req"].items())
        print(f"  syscalls per request: {calls}")
        for name, us in prof["dso_us_per_req"].items():
            print(f"  {us:>7.2f}  {prof['dso_percent'][name]:>5.1f} %  {name}")
        print("  top symbols (% of samples):")
        for pct, name in prof["top_symbols_percent"][:10]:
            print(f"  {pct:>5.1f} %  {name}")
    if "micro" in result:
        print("\nthe floor's pieces, in-process, CPU µs per request:")
        for what, us in result["micro"].items():
            print(f"  {us:>7.2f}  {what}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        sp = argparse.ArgumentParser(prog="bench_floor.py serve")
        sp.add_argument("--variant", choices=VARIANTS, default="callback")
        sp.add_argument("--upstream", required=True, help="http://HOST:PORT")
        sp.add_argument("--listen", required=True, help="HOST:PORT")
        sa = sp.parse_args(argv[1:])
        serve(sa.variant, sa.upstream, sa.listen)
        return 0
    if argv[:1] == ["check"]:
        return run_check()
    if argv[:1] == ["micro"]:
        numbers = [a for a in argv[1:] if a.isdigit()]
        out = run_micro(int(numbers[0]) if numbers else 50_000)
        if "--json" in argv:
            print(json.dumps(out))
        else:
            for what, us in out.items():
                print(f"{us:>7.2f} µs  {what}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (default 3)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--sizes", default="100,65536", help="response sizes (100 and/or 65536)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="subset of " + ",".join(TARGETS))
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    ap.add_argument(
        "--perf", type=int, default=0, metavar="S",
        help="then an S-second run per size for nginx, callback, apitally-proxy under perf",
    )  # fmt: skip
    ap.add_argument(
        "--micro", type=int, default=0, metavar="N",
        help="then `micro N` on the proxies' CPU (the floor's pieces, in-process)",
    )  # fmt: skip
    ap.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    problems = bench.check_prereqs()
    import importlib.util

    if importlib.util.find_spec("httptools") is None:
        problems.append(
            "httptools missing: `.venv/bin/pip install httptools` (the floor's parser; "
            "a benchmark-only install, not a project dependency)"
        )
    if args.perf and not shutil.which("perf"):
        problems.append("--perf needs `perf` on PATH (apt-get install linux-perf)")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        result = run_bench(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_report(result)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    sys.exit(main())
