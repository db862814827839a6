"""The lean server prototype (apitally_proxy/lean, issue 12): its header policy as
tables, then the server for real on 127.0.0.1 in front of a real aiohttp upstream."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict

from apitally_proxy.config import parse_upstream
from apitally_proxy.lean import headers as h
from apitally_proxy.lean.parser import HeadRefused, RequestParser
from apitally_proxy.lean.server import LeanConfig, LeanServer
from apitally_proxy.proxy import BodyCapture, Exchange
from apitally_proxy.websocket import pass_back_fields
from tests.support.upstream import Upstream

# --------------------------------------------------------------------------- the policy


def lines(head: bytes) -> list[bytes]:
    """A head's field lines (start line and the final CRLF left out)."""
    return head.split(b"\r\n")[1:-2]


REQUEST_CASES = {
    "plain fields pass as sent, Host kept, X-Forwarded-* appended": (
        [(b"Host", b"api"), (b"Accept", b"*/*")],
        {},
        [
            b"Host: api",
            b"Accept: */*",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "hop-by-hop dropped, and what Connection names": (
        [
            (b"Host", b"api"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"s"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Proxy-Anything", b"x"),
            (b"X-Kept", b"k"),
        ],
        {},
        [
            b"Host: api",
            b"X-Kept: k",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "Connection cannot make Host or Content-Length hop-by-hop": (
        [(b"Host", b"api"), (b"Connection", b"Host, Content-Length"), (b"Content-Length", b"3")],
        {},
        [
            b"Host: api",
            b"Content-Length: 3",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "X-Apitally-* never from a client, whatever its spelling": (
        [(b"Host", b"api"), (b"X-Apitally-Consumer", b"evil"), (b"x-apitally-route", b"/r")],
        {},
        [
            b"Host: api",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "untrusted peer: its forwarding claims are replaced or dropped": (
        [
            (b"Host", b"api"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil"),
            (b"X-Forwarded-Prefix", b"/p"),
            (b"Forwarded", b"for=1.2.3.4"),
            (b"X-Real-IP", b"1.2.3.4"),
        ],
        {},
        [
            b"Host: api",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "trusted peer: the chain is extended, its claims kept": (
        [
            (b"Host", b"api"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-For", b"5.6.7.8"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"public.example"),
            (b"X-Real-IP", b"1.2.3.4"),
        ],
        {"trusted": True},
        [
            b"Host: api",
            b"X-Real-IP: 1.2.3.4",
            b"X-Forwarded-For: 1.2.3.4, 5.6.7.8, 10.1.1.1",
            b"X-Forwarded-Proto: https",
            b"X-Forwarded-Host: public.example",
        ],
    ),
    "absolute-form: the target's authority is the Host": (
        [(b"Host", b"other"), (b"Accept", b"*/*")],
        {"authority": b"api.example:8080"},
        [
            b"Host: api.example:8080",
            b"Accept: */*",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api.example:8080",
        ],
    ),
    "HTTP/1.0 without Host: the upstream's host is sent, no X-Forwarded-Host": (
        [],
        {"default_host": b"127.0.0.1:9000"},
        [b"Host: 127.0.0.1:9000", b"X-Forwarded-For: 10.1.1.1", b"X-Forwarded-Proto: http"],
    ),
    "a chunked body is re-framed, Expect answered here, never forwarded": (
        [(b"Host", b"api"), (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue")],
        {"chunked": True},
        [
            b"Host: api",
            b"Transfer-Encoding: chunked",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
    "bytes that are not UTF-8 pass as they came": (
        [(b"Host", b"api"), (b"Cookie", b"sid=\xff\xfe")],
        {},
        [
            b"Host: api",
            b"Cookie: sid=\xff\xfe",
            b"X-Forwarded-For: 10.1.1.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: api",
        ],
    ),
}


@pytest.mark.parametrize("name", list(REQUEST_CASES))
def test_request_head_policy(name):
    raw, kwargs, expected = REQUEST_CASES[name]
    head = h.request_head("GET", b"/x?y=1", raw, peer="10.1.1.1", **kwargs)
    assert head.startswith(b"GET /x?y=1 HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n")
    assert lines(head) == expected


RESPONSE_CASES = {
    "plain fields pass, duplicates and order kept": (
        [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        [b"Content-Type: text/plain", b"Set-Cookie: a=1", b"Set-Cookie: b=2"],
        None,
        (False, False),
    ),
    "hop-by-hop dropped, and what Connection names": (
        [
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Upgrade", b"h2"),
            (b"Content-Length", b"2"),
            (b"Date", b"Tue, 01 Dec 2026 10:00:00 GMT"),
        ],
        [b"Content-Length: 2", b"Date: Tue, 01 Dec 2026 10:00:00 GMT"],
        None,
        (True, True),
    ),
    "X-Apitally-* taken out for the meter, names lower-cased, values decoded": (
        [
            (b"X-Apitally-Consumer", b"caf\xc3\xa9"),
            (b"x-apitally-route", b"/items/{id}"),
            (b"Server", b"app"),
        ],
        [b"Server: app"],
        {"x-apitally-consumer": "café", "x-apitally-route": "/items/{id}"},
        (False, False),
    ),
    "Connection cannot take Content-Length or Content-Type": (
        [(b"Connection", b"Content-Length, Content-Type"), (b"Content-Length", b"0")],
        [b"Content-Length: 0"],
        None,
        (True, False),
    ),
    "obs-text in values passes byte for byte": (
        [(b"X-Name", b"caf\xe9")],
        [b"X-Name: caf\xe9"],
        None,
        (False, False),
    ),
}


@pytest.mark.parametrize("name", list(RESPONSE_CASES))
def test_response_fields_policy(name):
    raw, expected, apitally, (has_length, has_date) = RESPONSE_CASES[name]
    fields = h.response_fields(raw)
    assert b"".join(fields.lines).split(b"\r\n")[:-1] == expected
    assert fields.apitally == apitally
    assert (fields.has_length, fields.has_date) == (has_length, has_date)


INTERIM_CASES = {
    "103 keeps its Link, loses hop-by-hop and X-Apitally-*": (
        [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"x"), (b"X-Apitally-Route", b"r")],
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    ),
    "nothing left": ([(b"Keep-Alive", b"1")], b"HTTP/1.1 103 Early Hints\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(INTERIM_CASES))
def test_interim_head_policy(name):
    raw, expected = INTERIM_CASES[name]
    assert h.interim_head(103, "Early Hints", raw) == expected


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (b"close", {b"close"}),
        (b" Keep-Alive , X-A,,x-b ", {b"keep-alive", b"x-a", b"x-b"}),
        (b"Host, Content-Length, Transfer-Encoding, Content-Type", set()),
    ],
)
def test_connection_tokens(value, tokens):
    assert h.connection_tokens([(b"Connection", value), (b"X", b"y")]) == tokens


def test_field_kinds_are_remembered_per_spelling_within_a_bound():
    for i in range(3 * h._KINDS_MAX):
        h.kind_of(b"X-Random-%d" % i)
    assert len(h._kinds) <= h._KINDS_MAX
    assert h.kind_of(b"CONNECTION") == h.CONNECTION
    assert h.kind_of(b"x-APITALLY-consumer") == h.APITALLY
    assert h.kind_of(b"Proxy-Foo") == h.HOP


class _NoProtocol:
    """What a request body's StreamReader needs of a protocol, for parser tables."""

    _reading_paused = False
    connected = True

    def pause_reading(self):
        self._reading_paused = True

    def resume_reading(self, resume_parser=True):
        self._reading_paused = False


def _parse(data, chunks=None, **limits):
    loop = asyncio.new_event_loop()
    try:
        parser = RequestParser(
            _NoProtocol(),
            loop,
            2**16,
            max_line_size=limits.get("max_line_size", 8190),
            max_field_size=limits.get("max_field_size", 8190),
            max_headers=limits.get("max_headers", 128),
            max_header_bytes=limits.get("max_header_bytes", 65536),
        )
        messages = []
        for piece in chunks or [data]:
            got, upgraded, tail = parser.feed_data(piece)
            messages.extend(got)
        return messages, upgraded, tail
    finally:
        loop.close()


PARSER_REFUSALS = {
    "request line over max_line_size": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    "header field name over max_field_size": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-" + b"a" * 9000 + b": v\r\n\r\n",
        431,
    ),
    "header value over max_field_size": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
        431,
    ),
    "more than max_headers fields": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: v\r\n" * 130 + b"\r\n",
        431,
    ),
    "duplicate Host": (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
    "duplicate Content-Type": (
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n",
        400,
    ),
    "missing Host in HTTP/1.1": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "raw non-ASCII target": ("GET /é HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    "control byte in target": (b"GET /a\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "CL and TE": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "garbage": (b"GARBAGE\r\n\r\n", 400),
    "absolute-form target that is no URL": (b"GET http://[x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(PARSER_REFUSALS))
def test_the_request_parser_refuses_with_the_right_status(name):
    data, status = PARSER_REFUSALS[name]
    with pytest.raises(HeadRefused) as refused:
        _parse(data)
    assert refused.value.status == status


def test_a_head_that_never_ends_is_refused_within_its_budget():
    # One endless header value, fed a read at a time: refused once the reads spent
    # on one unfinished head pass max_line_size + max_header_bytes, not buffered on.
    reads = [b"GET / HTTP/1.1\r\nHost: x\r\nX-A: "] + [b"a" * 4096] * 40
    with pytest.raises(HeadRefused) as refused:
        _parse(b"", reads, max_field_size=10**9, max_header_bytes=65536)
    assert refused.value.status == 431


def test_the_request_parser_keeps_what_the_server_reads():
    data = (
        b"POST /items?x=1 HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nX-Trailing: v \t\r\n\r\nhello"
        b"GET http://api.example:8443/a?b HTTP/1.0\r\n\r\n"
    )
    # Split mid-line, mid-body and mid-head: the same heads come out.
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        (first, body), (second, none) = _parse(b"", chunks)[0]
        assert (first.method, first.target, first.version) == ("POST", b"/items?x=1", (1, 1))
        assert first.raw_headers[-1] == (b"X-Trailing", b"v")
        assert (first.host, first.content_length, first.expect) == (b"app", b"5", b"100-continue")
        assert first.headers["x-trailing"] == "v" and not first.should_close
        assert body.is_eof() and body.read_nowait(-1) == b"hello"
        assert (second.authority, second.path_qs, second.version) == (
            "api.example:8443",
            "/a?b",
            (1, 0),
        )
        assert second.should_close and none is EMPTY_PAYLOAD


def test_an_upgrade_head_hands_over_the_bytes_after_it():
    data = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME"
    messages, upgraded, tail = _parse(data)
    assert upgraded and tail == b"FRAME" and messages[0][0].upgrade
    raw = messages[0][0].raw_message()
    assert raw.headers["Upgrade"] == "websocket" and raw.url.path == "/ws"


# --------------------------------------------------------------------------- harness


@dataclass
class Lean:
    server: LeanServer
    port: int
    records: list[Exchange]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def recorded(self, n: int, timeout: float = 5.0) -> list[Exchange]:
        deadline = time.monotonic() + timeout
        while len(self.records) < n:
            assert time.monotonic() < deadline, f"{len(self.records)} of {n} requests recorded"
            await asyncio.sleep(0.01)
        return self.records


StartLean = Callable[..., Awaitable[Lean]]


@pytest.fixture
async def lean(upstream: Upstream) -> AsyncIterator[StartLean]:
    started: list[Lean] = []

    async def start(upstream_url: str | None = None, **overrides: object) -> Lean:
        records: list[Exchange] = []
        config = LeanConfig(upstream=parse_upstream(upstream_url or upstream.url), **overrides)  # type: ignore[arg-type]
        server = LeanServer(config, records.append)
        port = await server.start("127.0.0.1", 0)
        started.append(Lean(server, port, records))
        return started[-1]

    yield start
    for one in started:
        await one.server.close()


@pytest.fixture
async def spied() -> AsyncIterator[tuple[Upstream, list[str]]]:
    """An upstream that notes every request that reached it."""
    seen: list[str] = []
    app = Upstream().app

    @web.middleware
    async def spy(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(request.raw_path)
        return await handler(request)

    app.middlewares.append(spy)
    up = await Upstream(app).start()
    yield up, seen
    await up.stop()


async def raw_server(handler) -> tuple[asyncio.Server, int]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length response from a keep-alive stream: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --------------------------------------------------------------------------- requests


async def test_get_and_post_are_forwarded_and_metered_once(lean, http):
    proxy = await lean()
    async with http.get(proxy.url + "/items/7?consumer=alice") as r:
        assert r.status == 200
        assert await r.json() == {"id": "7", "ok": True}
        assert "X-Apitally-Consumer" not in r.headers
        assert "Date" in r.headers
    async with http.post(proxy.url + "/echo", data=b"hello world") as r:
        assert r.status == 200
        assert await r.read() == b"hello world"
    get, post = await proxy.recorded(2)
    assert (get.method, get.path, get.status, get.request_size) == ("GET", "/items/7", 200, None)
    assert get.response_size == len(b'{"id": "7", "ok": true}')
    assert get.apitally_headers == {"x-apitally-consumer": "alice"}
    assert 0 < get.response_time < 1
    assert (post.method, post.path, post.status) == ("POST", "/echo", 200)
    assert (post.request_size, post.response_size) == (11, 11)


async def test_chunked_both_ways(lean):
    proxy = await lean()
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    response = await exchange(
        proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n" + body,
    )
    head, _, payload = response.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert b"Transfer-Encoding: chunked" in head  # the upstream's chunked answer, re-chunked
    assert payload.endswith(b"0\r\n\r\n")
    chunks = payload.split(b"\r\n")
    assert b"".join(chunks[1::2]) == b"hello world"
    (record,) = await proxy.recorded(1)
    assert (record.request_size, record.response_size) == (11, 11)


async def test_http10_client_gets_a_close_delimited_body_for_a_chunked_answer(lean):
    proxy = await lean()
    response = await exchange(proxy.port, b"GET /download?n=1000 HTTP/1.0\r\n\r\n")
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert payload == b"x" * 1000


async def test_head_and_bodiless_statuses(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"HEAD /download?n=10&length=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    writer.write(
        b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\nGET /items/2 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 204
    head, body = await read_response(reader)  # nothing in between: the 204 had no body
    assert status_of(head) == 200 and b'"2"' in body
    writer.close()


async def test_large_bodies_stream_both_ways_with_flat_memory(lean, http):
    proxy = await lean()
    size = 64 * 1024 * 1024
    block = b"u" * 65536
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)

        async def upload() -> None:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()

        sender = asyncio.create_task(upload())
        head = await reader.readuntil(b"\r\n\r\n")
        received = 0
        while received < size:
            received += len(await reader.read(1 << 20))
        await sender
        writer.close()
        assert status_of(head) == 200 and received == size
        async with http.get(proxy.url + f"/download?n={size}") as r:  # chunked from the app
            downloaded = 0
            async for chunk in r.content.iter_any():
                downloaded += len(chunk)
        assert downloaded == size
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 128 MB went through this process (client, lean server and upstream all in it).
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    upload_record, download_record = await proxy.recorded(2)
    assert upload_record.request_size == upload_record.response_size == size
    assert download_record.response_size == size


async def test_pipelined_requests_are_answered_in_order(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"".join(b"GET /items/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(1, 6))
        + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast"
    )
    bodies = [(await read_response(reader))[1] for _ in range(7)]
    writer.close()
    assert b'"slow"' in bodies[0]
    assert [b'"%d"' % i in bodies[i] for i in range(1, 6)] == [True] * 5
    assert bodies[6] == b"last"
    records = await proxy.recorded(7)
    assert [r.path for r in records] == ["/slow"] + [f"/items/{i}" for i in range(1, 6)] + ["/echo"]


async def test_many_pipelined_heads_pause_reading_and_all_get_answers(lean):
    proxy = await lean(max_pipelined=4)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"".join(b"GET /items/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200)))
    bodies = [(await read_response(reader))[1] for _ in range(200)]
    writer.close()
    assert all(b'"%d"' % i in body for i, body in enumerate(bodies))


async def test_keep_alive_reuses_one_client_connection(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for i in range(3):
        writer.write(b"GET /items/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        head, _body = await read_response(reader)
        assert status_of(head) == 200 and b"Connection: close" not in head
    assert len(proxy.server.connections) == 1
    writer.write(b"GET /items/9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _ = await read_response(reader)
    assert b"Connection: close" in head
    assert await reader.read() == b""  # and the server closed it
    writer.close()


async def test_expect_100_continue(lean, spied):
    upstream, _ = spied
    proxy = await lean(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    head, body = await read_response(reader)
    writer.close()
    assert status_of(head) == 200
    assert b"Expect" not in body and b"expect" not in body


async def test_interim_answers_are_relayed_before_the_final_one(lean):
    async def hints(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nX-Apitally-Route: r\r\n"
            b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    server, port = await raw_server(hints)
    try:
        proxy = await lean(f"http://127.0.0.1:{port}")
        data = await exchange(
            proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        assert b"HTTP/1.1 200 OK" in data and data.endswith(b"ok")
    finally:
        server.close()


# --------------------------------------------------------------------------- header policy, live


async def test_x_apitally_stripped_both_ways_hop_by_hop_filtered_xff_set(lean, http):
    proxy = await lean()
    async with http.get(
        proxy.url + "/headers",
        headers={
            "X-Apitally-Consumer": "evil",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "s",
            "Keep-Alive": "timeout=1",
            "Proxy-Authorization": "Basic eA==",
            "X-Forwarded-For": "1.2.3.4",
            "X-Real-IP": "1.2.3.4",
        },
    ) as r:
        seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        assert not any(k.lower().startswith("x-apitally-") for k in r.headers)
    for name in ("x-apitally-consumer", "x-secret", "keep-alive", "proxy-authorization"):
        assert name not in seen
    assert "x-real-ip" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"  # an untrusted peer's chain is replaced
    assert seen["x-forwarded-proto"] == "http"
    (record,) = await proxy.recorded(1)
    assert record.apitally_headers == {
        "x-apitally-consumer": "from-app",
        "x-apitally-route": "/should/not/leak",
    }


async def test_x_forwarded_for_is_appended_for_trusted_peers(lean, http):
    proxy = await lean(trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    async with http.get(
        proxy.url + "/headers",
        headers={"X-Forwarded-For": "1.2.3.4", "X-Forwarded-Proto": "https"},
    ) as r:
        seen = {k.lower(): v for k, v in (await r.json())["headers"]}
    assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"


async def test_hop_by_hop_response_fields_are_filtered(lean):
    async def hoppy(reader, writer):  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
            b"X-Hop: 1\r\nProxy-Authenticate: Basic\r\nX-Apitally-Consumer: bob\r\n"
            b"Set-Cookie: a=\xff\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    server, port = await raw_server(hoppy)
    try:
        proxy = await lean(f"http://127.0.0.1:{port}")
        data = await exchange(
            proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        head = data.split(b"\r\n\r\n")[0]
        for name in (b"Keep-Alive", b"X-Hop", b"Proxy-Authenticate", b"X-Apitally"):
            assert name not in head
        assert b"Set-Cookie: a=\xff\r\n" in head  # obs-text byte for byte
        assert data.endswith(b"\r\n\r\nok")
        (record,) = await proxy.recorded(1)
        assert record.apitally_headers == {"x-apitally-consumer": "bob"}
    finally:
        server.close()


async def test_absolute_form_goes_to_the_configured_upstream_with_its_authority(lean):
    proxy = await lean()
    data = await exchange(
        proxy.port,
        b"GET http://10.0.0.1:8080/headers HTTP/1.1\r\nHost: evil\r\nConnection: close\r\n\r\n",
    )
    assert status_of(data) == 200
    assert b'["Host","10.0.0.1:8080"]' in data and b'"path":"/headers"' in data
    data = await exchange(
        proxy.port, b"GET //evil.example/headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(data) == 404 and b"aiohttp" in data  # our upstream's own 404
    (_, evil) = await proxy.recorded(2)
    assert evil.path == "//evil.example/headers"


# --------------------------------------------------------------------------- hostile input

REFUSED = {
    "Content-Length and Transfer-Encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two Content-Lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "conflicting Content-Lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "raw non-ASCII in the path": ("GET /items/é HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    "invalid Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        400,
    ),
    "bad chunk size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        400,
    ),
    "chunk size overflow": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"FFFFFFFFFFFFFFFFFF\r\nhello\r\n",
        400,
    ),
    "transfer coding other than chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "unknown transfer coding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space before colon": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n", 400),
    "NUL in a value": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "duplicate Host": (b"GET /headers HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no Host in HTTP/1.1": (b"GET /headers HTTP/1.1\r\n\r\n", 400),
    "header field over 8 KB": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
    ),
    "too many header fields": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        431,
    ),
    "header fields over 64 KB in total": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
        + b"\r\n",
        431,
    ),
    "request line over 8 KB": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "HTTP/2.0 request line": (b"GET /headers HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/0.9 request line": (b"GET /headers HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    "HTTP/1.2 request line": (b"GET /headers HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "malformed request line": (b"GARBAGE\r\n\r\n", 400),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "asterisk-form": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "WebSocket upgrade without a relay (fallback) configured": (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        501,
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_hostile_request_is_refused_never_forwarded_never_metered(name, lean, spied):
    upstream, seen = spied
    proxy = await lean(upstream.url)
    data, status = REFUSED[name]
    response = await exchange(proxy.port, data)
    assert status_of(response) == status, response[:300]
    assert response.startswith(b"HTTP/1.1 ")  # also for HTTP/2.0 and 0.9 request lines
    assert b"Connection: close" in response.split(b"\r\n\r\n")[0] or status == 400
    # Still serving, and only the good request reached the app.
    ok = await exchange(
        proxy.port, b"GET /items/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(ok) == 200
    assert seen == ["/items/1"]
    records = await proxy.recorded(1)
    assert [r.path for r in records] == ["/items/1"]
    assert proxy.server.refused == 1


async def test_smuggled_request_after_a_refused_one_is_never_forwarded(lean, spied):
    upstream, seen = spied
    proxy = await lean(upstream.url)
    response = await exchange(
        proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\nGET /items/666 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert status_of(response) == 400 and response.count(b"HTTP/1.1 ") == 1
    assert seen == []


async def test_a_bad_chunk_inside_a_forwarded_body_answers_400_and_closes(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the head and the first chunk are on their way up
    writer.write(b"zz\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_of(data) == 400 and data.count(b"HTTP/1.1 ") == 1
    (record,) = await proxy.recorded(1)
    assert record.status == 400


async def test_good_requests_read_together_with_a_bad_one_are_answered_first(lean, spied):
    # The parser hands out each request as it completes: those before the bad one in
    # the same read are forwarded and answered in order, then the 400, then the close.
    upstream, seen = spied
    proxy = await lean(upstream.url)
    data = await exchange(
        proxy.port,
        b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /items/2 HTTP/1.1\r\nHost: x\r\n\r\nBAD\r\n\r\n",
    )
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [status_of(b"HTTP/1.1 " + a) for a in answers] == [200, 200, 400]
    assert seen == ["/items/1", "/items/2"]
    assert [r.status for r in await proxy.recorded(2)] == [200, 200]


def test_the_parser_hands_over_what_it_completed_before_a_refusal():
    with pytest.raises(HeadRefused) as refused:
        _parse(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert [head.target for head, _ in refused.value.messages] == [b"/a"]
    assert refused.value.status == 400


async def test_a_bad_request_after_answered_ones_is_refused_in_turn(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow?delay=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # parsed and in flight: then the bad one arrives
    writer.write(b"BAD\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 2
    assert data.rstrip().endswith(b"Bad Request")


async def test_slowloris_head_is_cut_after_client_keepalive(lean, spied):
    upstream, seen = spied
    proxy = await lean(upstream.url, client_keepalive=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    closed = False
    for byte in b"GET /items/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True
            break
        if time.monotonic() - started > 6:
            break
    writer.close()
    assert closed, "a trickling head kept its connection"
    assert time.monotonic() - started < 3.5  # client_keepalive + the 1 s sweep
    assert seen == [] and proxy.records == []


async def test_idle_keep_alive_connection_is_closed(lean):
    proxy = await lean(client_keepalive=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(), 4) == b""
    writer.close()


# --------------------------------------------------------------------------- faults


async def test_client_leaving_before_the_answer_is_metered_499(lean):
    proxy = await lean()
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow?delay=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    (record,) = await proxy.recorded(1)
    assert record.status == 499 and record.path == "/slow"
    assert proxy.server.in_flight == 0


async def test_client_leaving_mid_response_is_metered_499(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow-body?delay=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 200
    await reader.read(1)
    writer.transport.abort()
    (record,) = await proxy.recorded(1)
    assert record.status == 499 and record.got_headers
    await asyncio.sleep(0.1)
    assert proxy.server.in_flight == 0 and not proxy.server.connections


async def test_upstream_dying_mid_response_cuts_the_client_connection(lean):
    proxy = await lean()
    data = await exchange(proxy.port, b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 100000" in head
    assert 0 < len(body) < 100_000  # truncated, never a silently short body
    (record,) = await proxy.recorded(1)
    assert record.status == 200 and record.upstream_error == "body_aborted"
    assert proxy.server.upstream_errors == {"body_aborted": 1}


async def test_upstream_refusing_is_502_and_hanging_is_504(lean, http, upstream):
    server, port = await raw_server(lambda r, w: w.close())
    server.close()
    await server.wait_closed()  # nothing listens on that port any more
    refused = await lean(f"http://127.0.0.1:{port}")
    async with http.get(refused.url + "/x") as r:
        assert r.status == 502
    slow = await lean(upstream_timeout=0.3)
    async with http.get(slow.url + "/slow?delay=2") as r:
        assert r.status == 504
    assert [x.status for x in await refused.recorded(1)] == [502]
    assert [x.status for x in await slow.recorded(1)] == [504]
    assert refused.server.upstream_errors == {"connect": 1}
    assert slow.server.upstream_errors == {"timeout": 1}


async def test_a_client_that_stops_reading_does_not_hold_memory(lean):
    proxy = await lean(client_body_timeout=1.0)
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.transport.set_write_buffer_limits(0)
    writer.write(b"GET /download?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (512 * 1024 * 1024))
    await writer.drain()
    (conn,) = proxy.server.connections
    await asyncio.sleep(0.5)  # the socket buffers fill; the relay must wait, not buffer
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 1024 * 1024
    (record,) = await proxy.recorded(1, timeout=6)  # cut after client_body_timeout
    assert record.status == 499
    writer.close()


# --------------------------------------------------------------------------- drain


async def test_drain_lets_in_flight_requests_finish_then_refuses_new_ones(lean, http):
    proxy = await lean()
    slow = asyncio.create_task(http.get(proxy.url + "/slow?delay=0.5"))
    await asyncio.sleep(0.1)
    cut = await proxy.server.drain(5.0)
    response = await slow
    assert response.status == 200 and response.headers["Connection"] == "close"
    response.release()
    assert cut == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(proxy.url + "/items/1"):
            pass
    assert [r.status for r in await proxy.recorded(1)] == [200]


async def test_drain_deadline_cuts_what_is_left_as_503(lean):
    proxy = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow?delay=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    assert await proxy.server.drain(0.3) == 1
    assert time.monotonic() - started < 2
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    assert status_of(data) == 503
    (record,) = await proxy.recorded(1)
    assert record.status == 503 and proxy.server.cut_by_shutdown == 1


# --------------------------------------------------------------------------- captures


class _RecordingCapture:
    """The capture policy's interface (capture.Captures), recording what it was given."""

    logging = True

    def __init__(self) -> None:
        self.heads: list[tuple[str, str, str, str | None, str | None]] = []
        self.responses: list[tuple[int, list[tuple[str, str]]]] = []

    def on_head(self, exchange, method, headers, remote, origin, path_qs, content_length):  # type: ignore[no-untyped-def]
        self.heads.append((method, origin, path_qs, remote, content_length))

    def may_capture(self, exchange: Exchange, status: int) -> bool:
        return status == 422

    def response_capture(self, exchange, status, headers):  # type: ignore[no-untyped-def]
        self.responses.append((status, list(headers.items())))
        return BodyCapture(1024)


async def test_captures_see_each_request_head_and_copy_wanted_response_bodies(upstream):
    capture = _RecordingCapture()
    records: list[Exchange] = []
    config = LeanConfig(upstream=parse_upstream(upstream.url))
    server = LeanServer(config, records.append, capture)  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        close = b"Connection: close\r\n\r\n"
        await exchange(port, b"GET /items/1?x=2 HTTP/1.1\r\nHost: api.example\r\n" + close)
        # Absolute-form: the target's authority is the host the request log names.
        await exchange(port, b"GET http://10.0.0.1:8080/items/2 HTTP/1.1\r\nHost: evil\r\n" + close)
        await exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + close[:-2] + b"\r\nhello",
        )
        data = await exchange(port, b"GET /status/422 HTTP/1.1\r\nHost: x\r\n" + close)
    finally:
        await server.close()
    assert status_of(data) == 422
    assert capture.heads == [
        ("GET", "http://api.example", "/items/1?x=2", "127.0.0.1", None),
        ("GET", "http://10.0.0.1:8080", "/items/2", "127.0.0.1", None),
        ("POST", "http://x", "/echo", "127.0.0.1", "5"),
        ("GET", "http://x", "/status/422", "127.0.0.1", None),
    ]
    # Only the 422 asked for a copy: its headers as the client got them, its body whole.
    [(status, headers)] = capture.responses
    names = {name.lower() for name, _ in headers}
    assert status == 422 and "content-type" in names and "connection" not in names
    copied = records[-1].response_body
    assert copied is not None and bytes(copied.data) == b"status 422"
    assert all(r.response_body is None for r in records[:-1])


# --------------------------------------------------------------------------- one hop-by-hop rule

HOP_FIELDS = [*(name.title() for name in sorted(h.HOP_BY_HOP_NAMES)), "Proxy-Anything"]


@pytest.mark.parametrize("field", HOP_FIELDS)
def test_one_hop_by_hop_rule_for_requests_responses_interim_answers_and_pass_back(field):
    """Every path that copies header fields drops the same ones: the lean server's request
    head, response fields and interim answers, the aiohttp server's rule, and a refused
    WebSocket upgrade's pass-back."""
    name = field.encode()
    raw = ((b"Host", b"x"), (name, b"v"), (b"X-Kept", b"1"))
    head = h.request_head("GET", b"/", raw, peer="127.0.0.1")
    assert b"\r\n" + name + b":" not in head and b"X-Kept: 1" in head
    lines = h.response_fields(raw).lines
    assert name not in lines and b"X-Kept" in lines
    interim = h.interim_head(103, "Early Hints", raw)
    assert b"\r\n" + name + b":" not in interim and b"X-Kept: 1" in interim
    assert h.is_hop_by_hop_name(field.lower())  # the aiohttp server's test, as proxy.py calls it
    kept = pass_back_fields(CIMultiDict([(field, "v"), ("X-Kept", "1")]))
    assert kept == [("X-Kept", "1")]


def test_fields_named_by_connection_are_dropped_by_every_path_but_never_the_framing():
    raw = (
        (b"Host", b"x"),
        (b"Connection", b"X-Named, Content-Length"),
        (b"X-Named", b"v"),
        (b"Content-Length", b"0"),
    )
    head = h.request_head("POST", b"/", raw, peer="127.0.0.1")
    assert b"X-Named" not in head and b"Content-Length: 0" in head
    lines = h.response_fields(raw).lines
    assert b"X-Named" not in lines and b"Content-Length" in lines
    passed = pass_back_fields(
        CIMultiDict([("Connection", "X-Named"), ("X-Named", "v"), ("WWW-Authenticate", "Basic")])
    )
    assert passed == [("WWW-Authenticate", "Basic")]


async def test_the_upstream_transport_is_passed_in(upstream):
    """The pool is a seam (as Transport is for Go's ReverseProxy): the server uses the one
    it is given, whatever its config says."""
    from apitally_proxy.lean.upstream import LeanUpstream

    pool = LeanUpstream(
        parse_upstream(upstream.url), connect_timeout=5.0, read_timeout=5.0, keepalive=1.0
    )
    records: list[Exchange] = []
    unreachable = LeanConfig(upstream=parse_upstream("http://127.0.0.1:9"))
    server = LeanServer(unreachable, records.append, pool=pool)
    port = await server.start("127.0.0.1", 0)
    try:
        data = await exchange(
            port, b"GET /items/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    finally:
        await server.close()
    assert status_of(data) == 200
    assert [r.status for r in records] == [200]


# --------------------------------------------------------------------------- upstream protocol


class Scripted:
    """A raw upstream answering each request head with the next scripted bytes; notes
    which connection every request came on (reuse is part of what is tested)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers  # None: close the connection instead of answering
        self.seen: list[tuple[int, bytes]] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append((conn, head.split(b"\r\n", 1)[0]))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self.server, port = await raw_server(self.handle)
        return f"http://127.0.0.1:{port}"


async def _get_all(port: int, paths: list[str], method: str = "GET") -> list[tuple[bytes, bytes]]:
    """One keep-alive client connection, one request after the other; (head, body) each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for path in paths:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if method == "HEAD":
                out.append((await reader.readuntil(b"\r\n\r\n"), b""))
            else:
                out.append(await read_response(reader))
    finally:
        writer.close()
    return out


async def test_a_head_answer_skips_its_declared_body_and_the_connection_is_reused(lean):
    up = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnext!",
        ]
    )
    proxy = await lean(await up.start())
    heads = await _get_all(proxy.port, ["/a", "/b"], method="HEAD")
    assert all(status_of(h) == 200 for h, _ in heads)
    assert b"Content-Length: 1234" in heads[0][0]
    ((_, body),) = await _get_all(proxy.port, ["/c"])
    assert body == b"next!"
    assert [conn for conn, _ in up.seen] == [1, 1, 1]  # one upstream connection for all


async def test_bytes_after_a_head_answer_make_the_connection_single_use(lean):
    up = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",  # a HEAD answer with a body
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
    )
    proxy = await lean(await up.start())
    await _get_all(proxy.port, ["/a"], method="HEAD")
    ((_, body),) = await _get_all(proxy.port, ["/b"])
    assert body == b"ok"  # not "abc": the second request went on a new connection
    assert [conn for conn, _ in up.seen] == [1, 2]


async def test_bodies_split_across_reads_and_close_delimited_bodies_arrive_whole(lean):
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/eof" in head:  # neither Content-Length nor chunked: ends at EOF
                    writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b" the end")
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"world")
                await writer.drain()
        writer.close()

    _, port = await raw_server(slow)
    proxy = await lean(f"http://127.0.0.1:{port}")
    ((_, body),) = await _get_all(proxy.port, ["/split"])
    assert body == b"helloworld"
    data = await exchange(proxy.port, b"GET /eof HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"".join(payload.split(b"\r\n")[1::2]) == b"until the end"
    records = await proxy.recorded(2)
    assert [r.response_size for r in records] == [10, 13]


async def test_an_interim_answer_and_the_final_one_in_one_read(lean):
    up = Scripted(
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ]
    )
    proxy = await lean(await up.start())
    data = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    assert b"HTTP/1.1 200 OK" in data and data.endswith(b"ok")


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 502),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 250 + b"\r\n", 502),
        (b"NOT HTTP AT ALL\r\n\r\n", 502),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 502),
        (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", 502),
        (None, 502),  # closed before any answer (a fresh connection: not retried)
    ],
    ids=["field too long", "too many fields", "not HTTP", "two lengths", "NUL", "closed"],
)
async def test_a_broken_upstream_answer_is_a_502_and_the_connection_is_dropped(
    lean, answer, status
):
    up = Scripted([answer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    proxy = await lean(await up.start())
    data = await exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(data) == status
    ((_, body),) = await _get_all(proxy.port, ["/y"])  # and the next request is fine
    assert body == b"ok"
    assert [conn for conn, _ in up.seen] == [1, 2]


async def test_a_stale_pooled_connection_is_retried_once_for_a_get(lean):
    up = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            None,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
        ]
    )
    proxy = await lean(await up.start())
    first = await _get_all(proxy.port, ["/a"])
    second = await _get_all(proxy.port, ["/b"])
    assert [body for _, body in first + second] == [b"a", b"b"]
    assert [conn for conn, _ in up.seen] == [1, 1, 2]
    assert proxy.server.retries == 1


async def test_an_upstream_speaking_on_an_idle_connection_is_not_reused(lean):
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # unasked
        await reader.read()
        writer.close()

    _, port = await raw_server(chatty)
    proxy = await lean(f"http://127.0.0.1:{port}")
    ((_, first),) = await _get_all(proxy.port, ["/a"])
    await asyncio.sleep(0.2)
    ((_, second),) = await _get_all(proxy.port, ["/b"])
    assert (first, second) == (b"a", b"a")  # the 408 was never taken as an answer


# --------------------------------------------------------------------------- the direct path
# A body-less request with an idle pooled upstream connection at hand is sent from the
# client's read and answered from the upstream's read, with no task; anything else
# (interim answers, a body to stream, failures, the stale retry) is handed to a task.


@pytest.fixture
def direct_count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many requests took the direct path, and how many were handed to a task."""
    from apitally_proxy.lean import upstream as lean_upstream

    counts = {"direct": 0, "handed_over": 0}
    send_now = lean_upstream.LeanUpstream.send_now
    finish = lean_upstream.LeanUpstream.finish

    def counting_send_now(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        proto = send_now(self, *args, **kwargs)
        counts["direct"] += proto is not None
        return proto

    async def counting_finish(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["handed_over"] += 1
        return await finish(self, *args, **kwargs)

    monkeypatch.setattr(lean_upstream.LeanUpstream, "send_now", counting_send_now)
    monkeypatch.setattr(lean_upstream.LeanUpstream, "finish", counting_finish)
    return counts


async def _warm_then_slow(proxy: Lean, delay: float, wait: float) -> tuple[Any, Any]:
    """A keep-alive client connection: one quick request (the upstream connection is
    then pooled and idle), then one the upstream takes `delay` s to answer, sent on the
    direct path and in flight after `wait` s. Returns (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /slow?delay=%g HTTP/1.1\r\nHost: x\r\n\r\n" % delay)
    await writer.drain()
    await asyncio.sleep(wait)
    return reader, writer


async def test_a_warm_pool_answers_from_the_upstream_read(lean, direct_count):
    proxy = await lean()
    answers = await _get_all(proxy.port, [f"/items/{i}" for i in range(5)] + ["/status/201"])
    assert [status_of(head) for head, _ in answers] == [200] * 5 + [201]
    assert answers[3][1] == b'{"id": "3", "ok": true}'
    # The first opened the upstream connection (a task); the others went direct.
    assert direct_count == {"direct": 5, "handed_over": 0}
    records = await proxy.recorded(6)
    assert [(r.path, r.status) for r in records][-2:] == [("/items/4", 200), ("/status/201", 201)]
    assert all(r.got_headers and r.response_time > 0 for r in records)
    assert proxy.server.in_flight == 0


async def test_pipelined_requests_on_a_warm_pool_keep_their_order(lean, direct_count):
    proxy = await lean()
    await _get_all(proxy.port, ["/items/0"])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"".join(b"GET /items/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(1, 9)))
    bodies = [(await read_response(reader))[1] for _ in range(8)]
    writer.close()
    assert bodies == [b'{"id": "%d", "ok": true}' % i for i in range(1, 9)]
    assert direct_count["direct"] == 8


async def test_a_short_answer_split_across_reads_is_held_until_whole(lean, direct_count):
    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
                await writer.drain()
                for part in (b"hel", b"lowo", b"rld"):
                    await asyncio.sleep(0.02)
                    writer.write(part)
                    await writer.drain()
        writer.close()

    _, port = await raw_server(split)
    proxy = await lean(f"http://127.0.0.1:{port}")
    answers = await _get_all(proxy.port, ["/a", "/b", "/c"])
    assert [body for _, body in answers] == [b"helloworld"] * 3
    assert direct_count == {"direct": 2, "handed_over": 0}  # never streamed
    assert [r.response_size for r in await proxy.recorded(3)] == [10] * 3


async def test_what_a_warm_pool_cannot_answer_at_once_is_handed_to_a_task(lean, direct_count):
    up = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ]
    )
    proxy = await lean(await up.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[1] == b"ok"
        writer.write(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        assert (await read_response(reader))[1] == b"final"
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[1] == b"z" * 100_000
        writer.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert await reader.readuntil(b"0\r\n\r\n") == b"3\r\nabc\r\n0\r\n\r\n"
    finally:
        writer.close()
    # The interim answer and the 100 KB body went to a task; the chunked answer came
    # whole in one read and was answered at once.
    assert direct_count == {"direct": 3, "handed_over": 2}
    assert [r.response_size for r in await proxy.recorded(4)] == [2, 5, 100_000, 3]
    assert [conn for conn, _ in up.seen] == [1, 1, 1, 1]


async def test_a_short_answer_broken_off_is_a_502_never_a_short_body(lean, direct_count):
    connections = 0

    async def cutting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/cut" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly part")
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    _, port = await raw_server(cutting)
    proxy = await lean(f"http://127.0.0.1:{port}")
    answers = await _get_all(proxy.port, ["/a", "/cut"])
    assert status_of(answers[1][0]) == 502
    ((_, body),) = await _get_all(proxy.port, ["/b"])
    assert body == b"ok"
    records = await proxy.recorded(3)
    assert [(r.status, r.upstream_error) for r in records] == [
        (200, None),
        (502, "reset"),
        (200, None),
    ]
    assert proxy.server.retries == 0  # the upstream saw it: never sent twice
    assert connections == 2 and direct_count["direct"] == 1


async def test_a_warm_request_times_out_as_504(lean, direct_count):
    proxy = await lean(upstream_timeout=0.3)
    answers = await _get_all(proxy.port, ["/items/1", "/slow?delay=2", "/items/2"])
    assert [status_of(head) for head, _ in answers] == [200, 504, 200]
    assert [r.status for r in await proxy.recorded(3)] == [200, 504, 200]
    assert proxy.server.upstream_errors == {"timeout": 1}
    assert direct_count["handed_over"] == 1


async def test_a_client_leaving_a_direct_request_is_499_and_frees_the_upstream(
    lean, upstream, direct_count
):
    proxy = await lean()
    _, writer = await _warm_then_slow(proxy, 1, 0.2)
    assert direct_count["direct"] == 1 and proxy.server.in_flight == 1
    writer.transport.abort()
    records = await proxy.recorded(2)
    assert [(r.path, r.status) for r in records] == [("/items/1", 200), ("/slow", 499)]
    assert proxy.server.in_flight == 0
    assert not proxy.server.pool._idle  # its upstream connection, still owed an answer, closed
    ((head, _),) = await _get_all(proxy.port, ["/items/2"])
    assert status_of(head) == 200


async def test_the_drain_deadline_cuts_a_direct_request_as_503(lean, direct_count):
    proxy = await lean()
    reader, writer = await _warm_then_slow(proxy, 5, 0.1)
    assert direct_count["direct"] == 1
    assert await proxy.server.drain(0.3) == 1
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    assert status_of(data) == 503 and b"Connection: close" in data
    records = await proxy.recorded(2)
    assert [r.status for r in records] == [200, 503] and proxy.server.cut_by_shutdown == 1
    assert proxy.server.in_flight == 0


async def test_a_drain_closes_the_connection_after_a_direct_answer(lean, http, direct_count):
    proxy = await lean()
    reader, writer = await _warm_then_slow(proxy, 0.3, 0.1)
    assert await proxy.server.drain(5.0) == 0
    head, _ = await read_response(reader)
    assert status_of(head) == 200 and b"Connection: close" in head
    assert await reader.read() == b""  # and closed after it
    writer.close()
    assert direct_count["direct"] == 1


async def test_a_direct_request_handed_over_is_recorded_once_if_the_client_leaves_first(
    lean, direct_count
):
    # The hand-over creates a task; a client that leaves before that task's first step
    # (a task cancelled then runs none of its code) must still be recorded, once.
    proxy = await lean()
    _, writer = await _warm_then_slow(proxy, 1, 0.1)
    (conn,) = proxy.server.connections
    direct = conn._direct
    assert direct is not None and direct_count["direct"] == 1
    conn._upstream_ready()  # no answer yet: handed to a task, not started
    assert conn._task is not None and conn._direct is direct
    conn.connection_lost(None)  # the client is gone before the task ran
    await asyncio.sleep(0.1)
    records = await proxy.recorded(2)
    await asyncio.sleep(0.2)
    assert [(r.path, r.status) for r in proxy.records] == [("/items/1", 200), ("/slow", 499)]
    assert proxy.server.in_flight == 0
    assert not direct.proto.is_connected()  # still owed an answer: closed, never pooled
    assert records[1].response_time > 0
    writer.close()


class _BrokenCapture(_RecordingCapture):
    def may_capture(self, exchange: Exchange, status: int) -> bool:
        if status == 500:
            raise RuntimeError("a broken capture policy")
        return False


async def test_a_failure_relaying_an_answer_ends_that_connection_only(upstream, caplog):
    records: list[Exchange] = []
    config = LeanConfig(upstream=parse_upstream(upstream.url))
    server = LeanServer(config, records.append, _BrokenCapture())  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(reader)  # the upstream connection is now pooled: direct next
        writer.write(b"GET /status/500 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not left hanging
        writer.close()
        ((head, _),) = await _get_all(port, ["/items/2"])  # the worker goes on
        assert status_of(head) == 200
        # The same on the task path (a request with a body), with one more pipelined.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        post = b"POST /status/500 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        writer.write(post * 2)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.close()
    assert [(r.path, r.status) for r in records] == [
        ("/items/1", 200),
        ("/status/500", 500),
        ("/items/2", 200),
        ("/status/500", 500),
    ]
    assert records[-1].method == "POST" and server.in_flight == 0
    assert "relaying the answer to GET /status/500 failed" in caplog.text
    assert "answering a request from 127.0.0.1 failed" in caplog.text
