"""WebSocket upgrades pass through: handshake with the upstream, then messages both ways."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

# On both client-facing servers (lean, the default, and aiohttp).
pytestmark = pytest.mark.usefixtures("both_servers")


async def test_websocket_messages_are_relayed_both_ways(upstream, http, start_proxy, hub, hub_args):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.ws_connect(
        proxy.url + "/ws", protocols=("chat.v1",), headers={"Cookie": "s=1"}
    ) as ws:
        assert ws.protocol == "chat.v1"
        assert await ws.receive_str() == "hello protocol=chat.v1 cookie=s=1"
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert await ws.receive_bytes() == b"\x03\x02\x01"
        await ws.send_str("close")
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
    async with http.get(proxy.url + "/items/1") as r:  # plain requests still flow
        assert r.status == 200
    await proxy.wait_status(lambda st: st["requests_by_status"].get("101") == 1)
    assert await proxy.stop() == 0
    # Like the official clients, WebSocket sessions are not metered as API requests.
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 1}


async def test_upstream_refusing_the_upgrade_answers_with_its_status(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    try:
        async with http.ws_connect(proxy.url + "/ws-denied"):
            raise AssertionError("the upgrade should have been refused")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 403


async def test_client_closing_the_websocket_ends_the_upstream_side(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    for _ in range(3):
        async with http.ws_connect(proxy.url + "/ws") as ws:
            await ws.receive_str()
            await ws.send_str("x")
            assert await ws.receive_str() == "echo:x"
    # The relay ends its upstream side after the client's close completes: wait for it.
    st = await proxy.wait_status(lambda st: st["in_flight"] == 0)
    assert st["requests_by_status"].get("101") == 3


async def test_websocket_upgrade_redirects_are_passed_back_not_followed(http, start_proxy):
    from aiohttp import web

    from tests.support.upstream import Upstream

    followed = []
    app = web.Application()

    async def moved(request):
        raise web.HTTPFound("/elsewhere", headers={"X-Why": "moved"})

    async def elsewhere(request):
        followed.append(request.path)
        return web.Response(text="should never be reached")

    app.router.add_get("/ws", moved)
    app.router.add_get("/elsewhere", elsewhere)
    up = await Upstream(app).start()
    try:
        proxy = await start_proxy(up.url)
        async with http.get(
            proxy.url + "/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            allow_redirects=False,
        ) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/elsewhere"
            assert r.headers["X-Why"] == "moved"
        assert followed == []
    finally:
        await up.stop()


async def test_websocket_handshake_is_bounded_by_the_upstream_timeout(http, start_proxy, tmp_path):
    import asyncio

    async def silent(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(10)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "p.toml"
    cfg.write_text("upstream_timeout = 0.5\n")
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}", "--config", str(cfg))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with http.ws_connect(proxy.url + "/ws"):
                raise AssertionError("no handshake should complete")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 504
        assert loop.time() - t0 < 3
    finally:
        server.close()


async def test_oversize_websocket_messages_close_the_session(upstream, http, start_proxy, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text("max_websocket_message = 65536\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.receive_str()
        await ws.send_bytes(b"x" * 200_000)
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert proxy.rss() < 200 * 1024 * 1024


async def test_upstream_vanishing_is_not_passed_on_as_a_normal_close(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with http.ws_connect(proxy.url + "/ws-die") as ws:
        assert await ws.receive_str() == "bye"
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR


async def test_an_open_websocket_session_does_not_hold_up_the_drain(
    upstream, http, start_proxy, tmp_path
):
    """A session still open at SIGTERM is cut at the drain's deadline: the proxy is out
    within shutdown_grace, and the client sees its WebSocket end."""
    cfg = tmp_path / "p.toml"
    cfg.write_text("shutdown_grace = 2\n")
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    async with http.ws_connect(proxy.url + "/ws") as ws:
        assert (await ws.receive_str()).startswith("hello")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await proxy.stop(signal.SIGTERM) == 0
        took = loop.time() - started
        assert took < 2.0, f"the drain took {took:.1f} s with shutdown_grace = 2"
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
    assert "cut by shutdown" in proxy.log()
