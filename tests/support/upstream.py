"""A real aiohttp upstream app with the behaviours the proxy tests need."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

CHUNK = 64 * 1024


def _consumer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Sets the X-Apitally-Consumer* headers the way an integrated app would."""
    q = request.query
    if "consumer" in q:
        response.headers["X-Apitally-Consumer"] = q["consumer"]
    if "name" in q:
        response.headers["X-Apitally-Consumer-Name"] = q["name"]
    if "group" in q:
        response.headers["X-Apitally-Consumer-Group"] = q["group"]


async def item(request: web.Request) -> web.Response:
    resp = web.json_response({"id": request.match_info["id"], "ok": True})
    _consumer_headers(request, resp)
    return resp


async def headers(request: web.Request) -> web.Response:
    data = {
        "headers": [[k, v] for k, v in request.headers.items()],
        "path": request.raw_path,
        "method": request.method,
    }
    resp = web.Response(body=orjson.dumps(data), content_type="application/json")
    resp.headers["X-Apitally-Consumer"] = "from-app"
    resp.headers["X-Apitally-Route"] = "/should/not/leak"
    return resp


async def echo(request: web.Request) -> web.StreamResponse:
    """Echoes the request body back, streaming, counting nothing in memory."""
    resp = web.StreamResponse()
    _consumer_headers(request, resp)
    if request.content_length is not None:
        resp.content_length = request.content_length
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def sink(request: web.Request) -> web.Response:
    """Consumes the body without keeping it; answers with the byte count."""
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    resp = web.json_response({"received": total})
    _consumer_headers(request, resp)
    return resp


async def download(request: web.Request) -> web.StreamResponse:
    """n bytes; chunked unless ?length=1 asks for Content-Length."""
    n = int(request.query.get("n", "0"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    _consumer_headers(request, resp)
    if request.query.get("length") == "1":
        resp.content_length = n
    await resp.prepare(request)
    block = b"x" * CHUNK
    # aiohttp would put a HEAD body on the wire; a correct server sends none.
    left = 0 if request.method == "HEAD" else n
    while left > 0:
        part = block if left >= CHUNK else block[:left]
        await resp.write(part)
        left -= len(part)
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    resp = web.json_response({"slow": True})
    _consumer_headers(request, resp)
    return resp


async def slow_body(request: web.Request) -> web.StreamResponse:
    """Headers at once, then a body that trickles for `delay` seconds."""
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    for _ in range(int(float(request.query.get("delay", "2")) * 10)):
        await resp.write(b".")
        await asyncio.sleep(0.1)
    await resp.write_eof()
    return resp


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    resp = web.Response(status=code, text="" if code in (204, 304) else f"status {code}")
    _consumer_headers(request, resp)
    return resp


async def abort_mid_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.content_length = 100_000
    await resp.prepare(request)
    await resp.write(b"y" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def cookies(request: web.Request) -> web.Response:
    resp = web.json_response({"cookie": request.headers.get("Cookie")})
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/")
    return resp


def build_app() -> web.Application:
    app = web.Application(client_max_size=1024**4)
    r = app.router
    r.add_get("/items/{id}", item)
    r.add_route("*", "/headers", headers)
    r.add_route("*", "/echo", echo)
    r.add_post("/sink", sink)
    r.add_put("/sink", sink)
    r.add_get("/download", download)
    r.add_get("/slow", slow)
    r.add_get("/slow-body", slow_body)
    r.add_route("*", "/status/{code}", status)
    r.add_get("/abort", abort_mid_body)
    r.add_get("/cookies", cookies)
    r.add_route("*", "/users/{uid}/orders/{oid}", item_pair)
    r.add_get("/any/{tail:.*}", anything)
    r.add_get("/ws", websocket_echo)
    r.add_get("/ws-denied", websocket_denied)
    r.add_get("/ws-die", websocket_dies)
    return app


async def websocket_echo(request: web.Request) -> web.WebSocketResponse:
    """Echoes messages; says which subprotocol and cookie it saw first."""
    ws = web.WebSocketResponse(protocols=("chat.v1",))
    await ws.prepare(request)
    await ws.send_str(f"hello protocol={ws.ws_protocol} cookie={request.headers.get('Cookie')}")
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            if msg.data == "close":
                await ws.close(code=4001, message=b"bye")
                break
            await ws.send_str("echo:" + msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


async def websocket_dies(request: web.Request) -> web.WebSocketResponse:
    """Says one thing, then the connection vanishes without a close frame."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str("bye")
    await asyncio.sleep(0.1)
    assert request.transport is not None
    request.transport.abort()
    return ws


async def websocket_denied(request: web.Request) -> web.Response:
    return web.Response(status=403, text="no")


async def anything(request: web.Request) -> web.Response:
    """200 for any path below /any/: lets tests create unbounded distinct routes."""
    resp = web.json_response({"path": request.path})
    _consumer_headers(request, resp)
    return resp


async def item_pair(request: web.Request) -> web.Response:
    resp = web.json_response(dict(request.match_info))
    _consumer_headers(request, resp)
    return resp


class Upstream:
    """Runs build_app() on a real socket on 127.0.0.1."""

    def __init__(self, app: web.Application | None = None) -> None:
        self.app = app or build_app()
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> Upstream:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
