"""WebSocket upgrades: handshake with the upstream first, then relay messages both ways.

The proxy cannot splice raw bytes under aiohttp's server, so it terminates the
WebSocket on both sides and relays each message (text, binary, ping, pong,
close) unchanged. The client only gets its 101 once the upstream has accepted;
an upstream that refuses the upgrade answers the client with its own status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from apitally_proxy.config import Upstream
from apitally_proxy.lean.headers import connection_names, is_hop_by_hop_name

# Generated afresh for the upstream handshake by aiohttp; never copied from the client.
HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)


class Observed(Protocol):
    status: int
    response_time: float
    got_headers: bool
    request_size: int | None
    response_size: int

    def answered(self, started: float) -> None: ...


def wants_websocket(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """Whether a request head asks for a WebSocket (anything else is forwarded as is)."""
    return (
        method == "GET"
        and headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in headers.get("Connection", "").lower()
    )


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return wants_websocket(request.method, request.headers)


def pass_back_fields(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    """A refused upgrade's header fields as the client gets them: the one hop-by-hop
    rule (with the fields Connection names), X-Apitally-* and Content-Length (aiohttp
    sets it for the body) taken out."""
    named = connection_names(headers.getall("Connection", ()))
    return [
        (name, value)
        for name, value in headers.items()
        if not is_hop_by_hop_name(lname := name.lower(), named)
        and lname != "content-length"
        and not lname.startswith("x-apitally-")
    ]


class UpgradeRefused(Exception):
    """The upstream answered the upgrade with something other than 101."""

    def __init__(self, status: int, reason: str, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__(status)
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


MAX_REFUSAL_BODY = 65536


async def _refusals_pass_back(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: any non-101 answer (redirects included) goes back to the client
    as it is; redirects are never followed, so the upgrade cannot be sent elsewhere."""
    response = await handler(request)
    if response.status != 101:
        body = await response.content.read(MAX_REFUSAL_BODY)
        headers = CIMultiDict(response.headers)
        response.release()
        raise UpgradeRefused(response.status, response.reason or "", headers, body)
    return response


class WebSocketRelay:
    """Owns the client session used for upstream WebSocket handshakes."""

    def __init__(
        self,
        upstream: Upstream,
        connect_timeout: float,
        handshake_timeout: float,
        max_message: int,
    ) -> None:
        self._upstream = upstream
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._max_message = max_message
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector | None = None
            if self._upstream.socket_path is not None:
                connector = aiohttp.UnixConnector(path=self._upstream.socket_path)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                trust_env=False,
                middlewares=(_refusals_pass_back,),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def relay(
        self,
        request: web.BaseRequest,
        target: str,
        headers: CIMultiDict[str],
        exchange: Observed,
        started: float,
    ) -> web.StreamResponse:
        """Connect to the upstream, accept the client, relay until either side closes.

        Connection failures propagate (the caller answers 502/504).
        """
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        ]
        for name in HANDSHAKE_HEADERS:
            headers.popall(name, None)
        url = URL(self._upstream.origin + target, encoded=True)
        try:
            # The whole handshake, not just the connect, is bounded (then a 504).
            async with asyncio.timeout(self._handshake_timeout):
                upstream_ws = await self._get_session().ws_connect(
                    url,
                    headers=headers,
                    protocols=[p for p in protocols if p],
                    autoclose=False,
                    autoping=False,
                    max_msg_size=self._max_message,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                )
        except UpgradeRefused as refused:
            # The upstream answered the upgrade with something else (401, 302…): the
            # client gets that answer, headers and body, minus hop-by-hop headers.
            exchange.status = refused.status
            exchange.answered(started)
            response = web.Response(status=refused.status, reason=refused.reason, body=refused.body)
            response.headers.extend(pass_back_fields(refused.headers))
            return response
        exchange.answered(started)
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
            autoclose=False,
            autoping=False,
            # Each message is held whole while relayed: bounded (1009 past it).
            max_msg_size=self._max_message,
        )
        try:
            await client_ws.prepare(request)
            exchange.status = 101
            exchange.request_size = 0
            up = asyncio.ensure_future(_pump(client_ws, upstream_ws, exchange, upward=True))
            down = asyncio.ensure_future(_pump(upstream_ws, client_ws, exchange, upward=False))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (up, down):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            await upstream_ws.close()
            await client_ws.close()
        return client_ws


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    exchange: Observed,
    upward: bool,
) -> None:
    """Copy messages from src to dst until a close; sizes count payload bytes."""
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT:
            data = msg.data.encode()
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            data = msg.data
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
            continue
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
            continue
        elif msg.type is WSMsgType.CLOSE:
            await dst.close(code=msg.data or 1000, message=(msg.extra or "").encode())
            return
        else:
            # CLOSING, CLOSED, ERROR: gone without a close frame (or over the size
            # limit). Never pass that on as a normal close: 1011 towards the client
            # (the app failed), 1001 towards the app (the client went away).
            code = (
                WSCloseCode.MESSAGE_TOO_BIG
                if _too_big(src)
                else (WSCloseCode.GOING_AWAY if upward else WSCloseCode.INTERNAL_ERROR)
            )
            await dst.close(code=code)
            return
        if upward:
            exchange.request_size = (exchange.request_size or 0) + len(data)
        else:
            exchange.response_size += len(data)


def _too_big(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> bool:
    return ws.close_code == WSCloseCode.MESSAGE_TOO_BIG
