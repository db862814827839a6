"""WebSocket upgrades pass through: handshake with the upstream, then messages both ways."""

from __future__ import annotations

import aiohttp


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
    st = await proxy.status()
    assert st["requests_by_status"].get("101") == 1
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
    st = await proxy.status()
    assert st["in_flight"] == 0
