"""Reverse-proxy behaviour over real sockets: headers, bodies, errors, timing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support.upstream import Upstream

# Every case runs on both client-facing servers (lean, the default, and aiohttp).
pytestmark = pytest.mark.usefixtures("both_servers")


async def get_json(http, url, **kw):
    async with http.get(url, **kw) as r:
        return r.status, r.headers, await r.json()


async def test_request_headers_pass_through_without_hop_by_hop_or_apitally(
    upstream, http, start_proxy
):
    proxy = await start_proxy(upstream.url)
    status, _, body = await get_json(
        http,
        proxy.url + "/headers",
        headers={
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "named by Connection",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Apitally-Consumer": "spoofed",
            "X-Apitally-Route": "/spoofed",
        },
    )
    assert status == 200
    sent = {k.lower(): v for k, v in body["headers"]}
    assert sent["x-custom"] == "kept"
    for name in (
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-apitally-consumer",
        "x-apitally-route",
    ):
        assert name not in sent, name


async def test_proxy_adds_no_request_headers_the_client_did_not_send(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /headers HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    (length_line,) = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
    length = int(length_line.split(b":")[1])
    body = orjson.loads(await reader.readexactly(length))
    writer.close()
    names = sorted(k.lower() for k, _ in body["headers"])
    assert names == ["host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"]
    assert dict((k.lower(), v) for k, v in body["headers"])["host"] == "example.test"


async def test_forwarded_headers_are_set_and_untrusted_values_replaced(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    _, _, body = await get_json(
        http,
        proxy.url + "/headers",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil",
        },
    )
    sent = {k.lower(): v for k, v in body["headers"]}
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"


async def test_trusted_proxy_values_are_kept_and_peer_appended(
    upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text('trusted_proxies = ["127.0.0.0/8"]\n')
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    _, _, body = await get_json(
        http,
        proxy.url + "/headers",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com",
        },
    )
    sent = {k.lower(): v for k, v in body["headers"]}
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-host"] == "api.example.com"


async def test_response_apitally_headers_never_reach_the_client(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with http.get(proxy.url + "/items/1?consumer=c&name=n&group=g") as r:
        assert r.status == 200
        assert not [k for k in r.headers if k.lower().startswith("x-apitally")]
    async with http.get(proxy.url + "/headers") as r:
        assert not [k for k in r.headers if k.lower().startswith("x-apitally")]


async def test_repeated_response_headers_are_preserved(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with http.get(proxy.url + "/cookies") as r:
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_upstream_cookies_are_never_replayed_to_later_requests(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as fresh:
        for _ in range(2):
            async with fresh.get(proxy.url + "/cookies") as r:
                assert (await r.json())["cookie"] is None


async def test_path_and_query_are_forwarded_byte_for_byte(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    raw = "/headers?q=a%20b&x=%2F&y=caf%C3%A9&z"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"GET {raw} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == raw


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_request_and_response_bodies_stream_both_ways(upstream, http, start_proxy, length):
    proxy = await start_proxy(upstream.url)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    data = payload if length else gen()
    async with http.post(proxy.url + "/echo", data=data) as r:
        assert r.status == 200
        assert await r.read() == payload
        if length:
            assert r.headers["Content-Length"] == str(len(payload))
        else:
            assert r.headers.get("Transfer-Encoding") == "chunked"


async def test_compressed_responses_are_not_decompressed(http, start_proxy):
    import gzip

    app = web.Application()
    blob = gzip.compress(b'{"a": 1}' * 100)

    async def gz(request):
        return web.Response(
            body=blob, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app.router.add_get("/gz", gz)
    up = await Upstream(app).start()
    try:
        proxy = await start_proxy(up.url)
        async with http.get(proxy.url + "/gz", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert await r.read() == blob
    finally:
        await up.stop()


async def test_redirects_are_passed_back_not_followed(http, start_proxy):
    app = web.Application()

    async def redirect(request):
        raise web.HTTPFound("/elsewhere")

    app.router.add_get("/r", redirect)
    up = await Upstream(app).start()
    try:
        proxy = await start_proxy(up.url)
        async with http.get(proxy.url + "/r", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/elsewhere"
    finally:
        await up.stop()


async def test_head_and_204_responses_have_no_body(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with http.head(proxy.url + "/download?n=5000&length=1") as r:
        assert r.status == 200
        assert r.headers.get("Content-Length") == "5000"
        assert await r.read() == b""
    async with http.get(proxy.url + "/status/204") as r:
        assert r.status == 204
        assert await r.read() == b""


async def test_upstream_refusing_connections_gives_502(http, start_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound but not listening: connections are refused
        proxy = await start_proxy(f"http://127.0.0.1:{dead}")
        async with http.get(proxy.url + "/items/1") as r:
            assert r.status == 502
            assert "refused" in await r.text()
    st = await proxy.wait_status(lambda st: st["requests_total"] == 1)
    assert st["upstream_errors"] == {"connect": 1}


async def test_upstream_too_slow_gives_504(upstream, http, start_proxy, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 0.5\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with http.get(proxy.url + "/slow?delay=3") as r:
        assert r.status == 504
    assert loop.time() - t0 < 2.5


async def test_upstream_closing_before_headers_gives_502(http, start_proxy):
    async def slam(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(proxy.url + "/x") as r:
            assert r.status == 502
    finally:
        server.close()


async def test_upstream_sending_garbage_gives_502(http, start_proxy):
    async def garbage(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(proxy.url + "/x") as r:
            assert r.status == 502
            assert "invalid response" in await r.text()
    finally:
        server.close()


async def test_upstream_dying_mid_body_cuts_the_client_connection(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(proxy.url + "/abort") as r:
            assert r.status == 200
            await r.read()
    # The proxy keeps serving.
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200


async def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(http, start_proxy):
    """An upstream that closes idle keep-alive connections early must not cause 502s."""
    served = 0

    async def one_shot_keepalive(reader, writer):
        # Answers one request advertising keep-alive, then closes the connection
        # silently once the next request arrives on it: the race a pool must survive.
        nonlocal served
        try:
            await reader.readuntil(b"\r\n\r\n")
            served += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
            )
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()

    server = await asyncio.start_server(one_shot_keepalive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        for _ in range(5):
            async with http.get(proxy.url + "/x") as r:
                assert r.status == 200
                assert await r.read() == b"ok"
        st = await proxy.wait_status(lambda st: st["requests_total"] == 5)
        assert st["upstream_retries"] >= 1
        assert st["requests_by_status"] == {"200": 5}
    finally:
        server.close()


async def test_stale_connection_is_not_retried_for_posts(http, start_proxy):
    attempts = 0

    async def one_shot(reader, writer):
        nonlocal attempts
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                attempts += 1
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            attempts += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()

    server = await asyncio.start_server(one_shot, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(proxy.url + "/warm") as r:
            assert r.status == 200
        async with http.post(proxy.url + "/x", data=b"payload") as r:
            assert r.status == 502
        assert attempts == 1
    finally:
        server.close()


async def test_unix_socket_upstream(tmp_path, http, start_proxy):
    sock = str(tmp_path / "app.sock")
    runner = web.AppRunner(Upstream().app)
    await runner.setup()
    await web.UnixSite(runner, sock).start()
    try:
        proxy = await start_proxy(f"unix:{sock}")
        async with http.get(proxy.url + "/items/5") as r:
            assert r.status == 200
            assert (await r.json())["id"] == "5"
    finally:
        await runner.cleanup()


async def test_connect_is_refused(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    assert line.split()[1] in (b"400", b"405")


async def test_absolute_form_requests_only_reach_the_configured_upstream(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET http://169.254.169.254/headers HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split()[1])
    if status == 200:  # answered by our upstream, never by the named host
        body = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["path"] in ("/headers", "http://169.254.169.254/headers")
        assert dict(body["headers"])["X-Forwarded-For"] == "127.0.0.1"
    else:
        assert status == 400


async def test_sigterm_lets_in_flight_requests_finish(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    task = asyncio.ensure_future(http.get(proxy.url + "/slow?delay=1"))
    await asyncio.sleep(0.3)
    stop = asyncio.ensure_future(proxy.stop(signal.SIGTERM))
    r = await task
    assert r.status == 200
    assert (await r.json()) == {"slow": True}
    assert await stop == 0


async def test_many_concurrent_requests(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)

    async def one(i):
        async with http.get(f"{proxy.url}/items/{i}") as r:
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(300)))
    assert statuses == [200] * 300


async def raw_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_answering_before_reading_the_body_is_relayed(http, start_proxy):
    """An upstream may refuse an upload (413, 401) without reading it: no hang, no 502."""

    async def early(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.transport.abort()

    server, port = await raw_server(early)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")

        async def upload():
            for _ in range(400):
                yield b"u" * 65536

        async with http.post(proxy.url + "/upload", data=upload()) as r:
            assert r.status == 413
            assert await r.read() == b"big"
        async with http.get(proxy.url + "/again") as r:  # a fresh connection is used
            assert r.status == 413
    finally:
        server.close()


async def test_interim_1xx_responses_are_relayed_before_the_final_answer(http, start_proxy):
    async def hints(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    server, port = await raw_server(hints)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(proxy.url + "/x") as r:  # clients that ignore 1xx still work
            assert r.status == 200
            assert await r.read() == b"ok"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        assert b"HTTP/1.1 200 OK" in data and data.endswith(b"ok")
    finally:
        server.close()


async def test_connection_close_from_the_upstream_is_honoured(http, start_proxy):
    connections = 0

    async def closing(reader, writer):
        nonlocal connections
        head = await reader.readuntil(b"\r\n\r\n")
        connections += head.startswith(b"GET /x ")  # not the proxy's OpenAPI probes
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server, port = await raw_server(closing)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        for _ in range(3):
            async with http.get(proxy.url + "/x") as r:
                assert r.status == 200
        assert connections == 3
        assert (await proxy.status())["upstream_retries"] == 0
    finally:
        server.close()


async def test_idle_upstream_connections_are_reused_then_closed_after_the_keepalive(
    http, start_proxy, tmp_path
):
    opened, closed = 0, 0

    async def keepalive(reader, writer):
        nonlocal opened, closed
        served = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /x ") and not served:  # not an OpenAPI probe
                    served = True
                    opened += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            closed += served

    server, port = await raw_server(keepalive)
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_keepalive = 0.3\n")
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}", "--config", str(cfg))
        for _ in range(5):
            async with http.get(proxy.url + "/x") as r:
                assert r.status == 200
        assert opened == 1  # one pooled connection served all five
        await asyncio.sleep(1.2)
        assert closed == 1  # the proxy closed it once idle for longer than the keep-alive
    finally:
        server.close()


async def test_pool_size_limit_queues_requests_instead_of_failing(
    upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_pool_size = 2\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))

    async def one():
        async with http.get(proxy.url + "/slow?delay=0.2") as r:
            return r.status

    assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6


async def test_expect_100_continue_uploads_pass(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 100")
    assert await reader.readline() == b"\r\n"
    writer.write(b"hello")
    await writer.drain()
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    assert b'"received": 5' in response


async def test_http10_client_without_host_gets_a_host_upstream(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /headers HTTP/1.0\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.0 200")
    body = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    sent = {k.lower(): v for k, v in body["headers"]}
    assert sent["host"] == f"127.0.0.1:{upstream.port}"


async def test_304_with_validators_passes_without_a_body(http, start_proxy):
    app = web.Application()

    async def cached(request):
        return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})

    app.router.add_get("/c", cached)
    up = await Upstream(app).start()
    try:
        proxy = await start_proxy(up.url)
        async with http.get(proxy.url + "/c", headers={"If-None-Match": '"v1"'}) as r:
            assert r.status == 304
            assert r.headers["ETag"] == '"v1"'
            assert await r.read() == b""
        async with http.get(proxy.url + "/c") as r:  # the connection is still usable
            assert r.status == 304
    finally:
        await up.stop()


async def test_untrusted_address_claims_are_dropped(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    _, _, body = await get_json(
        http,
        proxy.url + "/headers",
        headers={
            "Forwarded": "for=6.6.6.6;proto=https",
            "X-Real-IP": "6.6.6.6",
            "X-Forwarded-Prefix": "/evil",
        },
    )
    sent = {k.lower() for k, _ in body["headers"]}
    assert not sent & {"forwarded", "x-real-ip", "x-forwarded-prefix"}


async def test_trusted_hops_keep_their_other_forwarding_headers(
    upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text('trusted_proxies = ["127.0.0.1"]\n')
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    _, _, body = await get_json(
        http,
        proxy.url + "/headers",
        headers={
            "X-Forwarded-Prefix": "/api",
            "Forwarded": "for=203.0.113.9",
            "X-Real-IP": "203.0.113.9",
        },
    )
    sent = {k.lower(): v for k, v in body["headers"]}
    assert sent["x-forwarded-prefix"] == "/api"
    assert sent["forwarded"] == "for=203.0.113.9"
    assert sent["x-real-ip"] == "203.0.113.9"


async def test_body_delimited_by_connection_close_is_relayed(http, start_proxy):
    async def http10(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until eof")
        await writer.drain()
        writer.close()

    server, port = await raw_server(http10)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        async with http.get(proxy.url + "/x") as r:
            assert r.status == 200
            assert await r.read() == b"hello until eof"
    finally:
        server.close()


async def test_bytes_on_an_idle_pooled_connection_never_answer_the_next_request(
    http, start_proxy, tmp_path
):
    """An upstream that writes on an idle keep-alive connection (a 408, a late
    duplicate) must not have that read as the answer to the next request."""

    async def stray(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                body = b"answer to " + path
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                if path == b"/then-stray":
                    writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 5\r\n\r\nstale")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()

    server, port = await raw_server(stray)
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_keepalive = 5\n")
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}", "--config", str(cfg))
        for path in ("/then-stray", "/a", "/b", "/c"):
            async with http.get(proxy.url + path) as r:
                assert r.status == 200, path
                assert await r.read() == b"answer to " + path.encode()
            await asyncio.sleep(0.05)
    finally:
        server.close()


async def test_uploads_slower_than_the_upstream_timeout_are_not_cut(
    upstream, http, start_proxy, tmp_path
):
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 0.5\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))

    async def trickle():
        for _ in range(6):
            yield b"t" * 1000
            await asyncio.sleep(0.25)  # 1.5 s in all, three times the upstream timeout

    async with http.post(proxy.url + "/sink", data=trickle()) as r:
        assert r.status == 200
        assert (await r.json())["received"] == 6000


async def test_an_interim_1xx_does_not_disable_the_upstream_timeout(http, start_proxy, tmp_path):
    async def hints_then_silence(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    server, port = await raw_server(hints_then_silence)
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 0.5\n")
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}", "--config", str(cfg))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with http.get(proxy.url + "/x") as r:
            assert r.status == 504
        assert loop.time() - t0 < 3
    finally:
        server.close()


async def test_early_answer_to_a_large_upload_reaches_the_client_cleanly(http, start_proxy):
    async def refuse(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
        )
        await writer.drain()
        # Lingering close, as real servers do: closing with unread data would send a
        # reset that can destroy the answer in flight.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                while await reader.read(65536):
                    pass
        writer.close()

    server, port = await raw_server(refuse)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        for _ in range(3):
            async with http.post(proxy.url + "/upload", data=b"x" * 5_000_000) as r:
                assert r.status == 413
                assert await r.read() == b"big"
        assert "another coroutine is already waiting" not in proxy.log()
    finally:
        server.close()


@pytest.mark.parametrize("broken", [False, True], ids=["stalled", "bad-chunk-framing"])
async def test_stalled_or_broken_client_body_is_the_clients_error_not_an_upstream_timeout(
    broken, upstream, start_proxy, tmp_path, both_servers
):
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 30\nclient_body_timeout = 1\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await writer.drain()
    if broken:
        await asyncio.sleep(0.3)
        writer.write(b"zz\r\n")  # not a chunk size: aiohttp stops feeding the body stream
        await writer.drain()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if not broken:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408")
        assert loop.time() - t0 < 3
    elif both_servers == "lean":
        # The lean server sees the broken framing itself: a 400 at once.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 400")
    else:
        # aiohttp holds the broken connection itself; what matters is that the proxy
        # ends the exchange within the body timeout and blames the client.
        await asyncio.sleep(2.5)
    writer.close()
    st = await proxy.wait_status(lambda st: st["requests_total"] == 1)
    blamed = "400" if broken and both_servers == "lean" else "408"
    assert st["requests_by_status"] == {blamed: 1}
    assert "timeout" not in st["upstream_errors"]
    assert st["in_flight"] == 0


async def test_large_upstream_response_headers_pass(http, start_proxy):
    async def big_headers(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        csp = b"default-src 'self' " + b"x" * 9000
        links = b"".join(b"Link: </r%d.css>; rel=preload\r\n" % i for i in range(130))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Security-Policy: "
            + csp
            + b"\r\n"
            + links
            + b"Content-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    server, port = await raw_server(big_headers)
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        roomy = aiohttp.ClientSession(max_field_size=32768, max_headers=500)  # client limits
        async with roomy, roomy.get(proxy.url + "/x") as r:
            assert r.status == 200
            assert len(r.headers.getall("Link")) == 130
            assert await r.read() == b"ok"
    finally:
        server.close()
