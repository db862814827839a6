"""Hostile clients and broken upstreams: a clear status, the proxy keeps serving,
each request counted exactly once (or, if it never reached the app, not at all)."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from tests.support.upstream import Upstream

# Every case runs on both client-facing servers (lean, the default, and aiohttp).
pytestmark = pytest.mark.usefixtures("both_servers")


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        # Until the peer closes (bad requests, Connection: close) or the first reply is in.
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
                if b"Connection: close" not in data and b"\r\n\r\n" in data:
                    break
        return data
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


BAD_REQUESTS = {
    "malformed request line": (b"GARBAGE\r\n\r\n", {400}),
    "Content-Length and Transfer-Encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    "conflicting Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400},
    ),
    "invalid Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        {400},
    ),
    "negative Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        {400},
    ),
    "unknown transfer coding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
        {400, 501},
    ),
    "transfer coding other than chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        {501},
    ),
    "header line over 8 KB": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        {400, 431},
    ),
    "too many header fields": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        {400, 431},
    ),
    "header fields over 64 KB in total": (
        b"GET /headers HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(10))
        + b"\r\n",
        {431},
    ),
    "NUL in a header value": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", {400}),
    "obsolete line folding": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", {400}),
    "space before colon": (b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n", {400}),
    "duplicate Host": (b"GET /headers HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    "raw non-ASCII in the path": ("GET /items/é HTTP/1.1\r\nHost: x\r\n\r\n".encode(), {400}),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}),
    "asterisk-form target": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", {400, 405}),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_hostile_request_is_refused_and_never_forwarded(name, hub, start_proxy, hub_args):
    forwarded = []
    app = Upstream().app

    @aiohttp.web.middleware
    async def spy(request, handler):
        forwarded.append(request.raw_path)
        return await handler(request)

    app.middlewares.append(spy)
    upstream = await Upstream(app).start()
    try:
        proxy = await start_proxy(upstream.url, *hub_args)
        data, expected = BAD_REQUESTS[name]
        response = await raw_exchange(proxy.port, data)
        assert status_of(response) in expected, response[:200]
        # The proxy keeps serving.
        assert (
            status_of(await raw_exchange(proxy.port, b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"))
            == 200
        )
        assert await proxy.stop() == 0
    finally:
        await upstream.stop()
    probes = {
        "/openapi.json",
        "/schema/openapi.json",
        "/openapi/openapi.json",
        "/documentation/json",
        "/apispec_1.json",
        "/schema",
    }
    assert [p for p in forwarded if p not in probes] == ["/items/1"]
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 1}


async def test_percent_encoding_garbage_in_paths_is_forwarded_verbatim(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    response = await raw_exchange(
        proxy.port,
        b"GET /headers?x=%zz%ff&y=%C3%28 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status_of(response) == 200
    assert b'"path":"/headers?x=%zz%ff&y=%C3%28"' in response
    response = await raw_exchange(proxy.port, b"GET /items/%zz%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) in (200, 400, 404)
    assert (
        status_of(await raw_exchange(proxy.port, b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"))
        == 200
    )


async def test_slowloris_connection_is_closed_without_reaching_the_upstream(
    upstream, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text("client_keepalive = 1.0\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closed = False
    for byte in b"GET /items/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        try:
            if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        if loop.time() - t0 > 8:
            break
    writer.close()
    assert closed, "the proxy kept a trickling connection open"
    assert loop.time() - t0 < 5
    st = await proxy.status()
    assert st["requests_total"] == 0


async def test_absolute_form_and_foreign_host_never_leave_the_upstream(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    for target, host in [
        (b"http://10.0.0.1:8080/headers", b"10.0.0.1"),
        (b"/headers", b"internal.example"),
        (b"//evil.example/headers", b"x"),
    ]:
        response = await raw_exchange(
            proxy.port,
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
        )
        # Answered by our upstream (200 with its echo, or its own 404): nothing else exists here.
        assert status_of(response) in (200, 404)
        assert b"aiohttp" in response  # the upstream's Server header


async def test_many_idle_connections_keep_memory_bounded(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    before = proxy.rss()
    conns = []
    for _ in range(10_000):
        conns.append(await asyncio.open_connection("127.0.0.1", proxy.port))
    await asyncio.sleep(0.5)
    during = proxy.rss()
    # Still serving while holding them.
    assert (
        status_of(await raw_exchange(proxy.port, b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"))
        == 200
    )
    for _, w in conns:
        w.close()
    growth = during - before
    print(f"RSS {before / 1e6:.1f} MB -> {during / 1e6:.1f} MB with 10,000 idle connections")
    assert growth < 10_000 * 8 * 1024, f"{growth / 1e6:.1f} MB for 10,000 idle connections"


class FaultyUpstream:
    """A raw HTTP server that misbehaves in the way the path asks for."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> FaultyUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self._writers:  # a real restart also drops kept-alive connections
            w.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                if path == b"/reset-before-headers":
                    writer.transport.abort()
                    return
                if path == b"/reset-mid-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
                    await writer.drain()
                    writer.transport.abort()
                    return
                if path in (b"/reset-mid-chunked", b"/hang-mid-chunked"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"a\r\n" + b"x" * 10 + b"\r\n")
                    await writer.drain()
                    if path == b"/hang-mid-chunked":
                        await asyncio.sleep(30)
                    writer.transport.abort()
                    return
                if path == b"/garbage":
                    writer.write(b"\x00\x01\x02 not http\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                if path == b"/hang":
                    await asyncio.sleep(30)
                    return
                if path == b"/hang-mid-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
                    await writer.drain()
                    await asyncio.sleep(30)
                    return
                if path == b"/close-after":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.transport.abort()


async def test_each_upstream_fault_gives_its_status_and_is_counted_once(
    hub, http, start_proxy, hub_args, tmp_path, both_servers
):
    faulty = await FaultyUpstream().start()
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 0.5\n")
    proxy = await start_proxy(f"http://127.0.0.1:{faulty.port}", *hub_args, "--config", str(cfg))
    expect = {
        "/reset-before-headers": 502,
        "/garbage": 502,
        "/hang": 504,
        "/close-after": 200,
        "/ok": 200,
    }
    # The lean server holds a short answer of known length until its body is whole, so
    # a body the upstream breaks off is still a clear error; the aiohttp server has
    # sent the status line by then, and can only cut the body short (as it does on
    # both servers for a chunked one).
    cut = ["/reset-mid-chunked", "/hang-mid-chunked"]
    if both_servers == "lean":
        expect |= {"/reset-mid-body": 502, "/hang-mid-body": 504}
    else:
        cut += ["/reset-mid-body", "/hang-mid-body"]
    try:
        for path, status in expect.items():
            async with http.get(proxy.url + path) as r:
                assert r.status == status, path
                await r.read()
        for path in cut:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(proxy.url + path) as r:
                    assert r.status == 200
                    await r.read()
        async with http.get(proxy.url + "/ok") as r:
            assert r.status == 200
        assert await proxy.stop() == 0
    finally:
        await faulty.stop()
    counts = {path: n for (_, _, path, _), n in hub.request_counts().items() if path != "/ok"}
    assert sum(hub.request_counts().values()) == len(expect) + len(cut) + 1
    assert counts == {path: 1 for path in [*expect, *cut] if path != "/ok"}
    statuses = {(path, status) for (_, _, path, status) in hub.request_counts()}
    assert ("/hang", 504) in statuses and ("/garbage", 502) in statuses
    for path in cut:
        assert (path, 200) in statuses  # the status line the client got
    if both_servers == "lean":
        assert ("/reset-mid-body", 502) in statuses and ("/hang-mid-body", 504) in statuses


async def test_upstream_restart_gives_502_then_recovers(hub, http, start_proxy, hub_args):
    faulty = await FaultyUpstream().start()
    port = faulty.port
    proxy = await start_proxy(f"http://127.0.0.1:{port}", *hub_args)
    async with http.get(proxy.url + "/ok") as r:
        assert r.status == 200
    await faulty.stop()
    async with http.get(proxy.url + "/ok") as r:
        assert r.status == 502
    faulty = await FaultyUpstream().start(port)
    try:
        for _ in range(3):
            async with http.get(proxy.url + "/ok") as r:
                assert r.status == 200
        assert await proxy.stop(signal.SIGTERM) == 0
    finally:
        await faulty.stop()
    assert hub.request_counts() == {(None, "GET", "/ok", 200): 4, (None, "GET", "/ok", 502): 1}


class HugeHeadUpstream:
    """Answers `/huge-head` with a head of many large header fields, `/endless-1xx` with
    103 Early Hints until the client goes away, anything else with 200."""

    async def start(self) -> HugeHeadUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            if path == b"/huge-head":
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(2000):  # 2000 x 30 KB: a 60 MB head
                    writer.write(b"X-Junk-%d: %s\r\n" % (i, b"j" * 30_000))
                    await writer.drain()
                writer.write(b"Content-Length: 2\r\n\r\nok")
            elif path == b"/endless-1xx":
                for _ in range(10_000):
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_huge_response_heads_and_endless_1xx_trains_are_bounded(
    hub, http, start_proxy, hub_args_long
):
    up = await HugeHeadUpstream().start()
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{up.port}", *hub_args_long)
        before = proxy.rss()
        statuses = await asyncio.gather(
            *(get_status(http, proxy.url + "/huge-head") for _ in range(3))
        )
        grown = proxy.rss() - before
        assert statuses == [502, 502, 502]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await get_status(http, proxy.url + "/endless-1xx") == 502
        assert loop.time() - started < 5  # after max_interim_responses, not forever
        assert await get_status(http, proxy.url + "/ok") == 200
        print(f"RSS +{grown / 1e6:.1f} MB for three 60 MB response heads")
        assert grown < 30 * 1024 * 1024
        assert await proxy.stop() == 0
    finally:
        await up.stop()
    assert hub.request_counts()[(None, "GET", "/huge-head", 502)] == 3


async def get_status(http, url: str) -> int:
    async with http.get(url) as r:
        await r.read()
        return r.status


async def test_connection_cannot_make_host_hop_by_hop(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    response = await raw_exchange(
        proxy.port,
        b"GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: Host, close\r\n\r\n",
    )
    body = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    assert dict(body["headers"])["Host"] == "app.example"


async def test_an_absolute_form_targets_authority_wins_over_host(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    response = await raw_exchange(
        proxy.port,
        b"GET http://api.example:8443/headers?x=1 HTTP/1.1\r\nHost: other.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status_of(response) == 200  # still the configured upstream
    body = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    headers = dict(body["headers"])
    assert headers["Host"] == "api.example:8443"
    assert headers["X-Forwarded-Host"] == "api.example:8443"
    assert body["path"] == "/headers?x=1"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2"])
async def test_unsupported_http_versions_get_505_in_http_1_1(upstream, start_proxy, version):
    proxy = await start_proxy(upstream.url)
    response = await raw_exchange(proxy.port, b"GET /items/1 " + version + b"\r\nHost: x\r\n\r\n")
    # 505 from the proxy, or 400 from the parser for versions it cannot read: never an
    # answer that claims the version the client asked for.
    line = response.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 505 ") or line.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    st = await proxy.wait_status(lambda st: st["refused"] >= 1)
    assert st["requests_total"] == 0  # never forwarded, never metered


async def test_parser_level_refusals_are_counted_on_metrics(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    for request in (b"GARBAGE\r\n\r\n", b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"):
        assert status_of(await raw_exchange(proxy.port, request)) == 400
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        assert "apitally_proxy_refused_requests_total 2.0" in await r.text()


async def test_the_proxy_adds_no_server_or_content_type_the_app_did_not_send(start_proxy):
    async def bare(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbare")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bare, "127.0.0.1", 0)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        response = await raw_exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        head = response.split(b"\r\n\r\n", 1)[0].lower()
        assert response.endswith(b"bare")
        assert b"\r\ncontent-type:" not in head and b"\r\nserver:" not in head
        assert b"\r\ndate:" in head  # a proxy adds Date when missing (RFC 9110 §6.6.1)
        refused = await raw_exchange(proxy.port, b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert b"\r\nserver:" not in refused.split(b"\r\n\r\n", 1)[0].lower()
    finally:
        server.close()
