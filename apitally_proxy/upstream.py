"""A lean HTTP/1.1 client for the one upstream: a keep-alive pool and nothing else.

aiohttp's ClientSession does a lot per request that a reverse proxy never needs
(URL handling, cookie jars, redirects, auth, tracing, auto headers): about half
of the proxy's CPU went there. This module keeps aiohttp's C-accelerated parts —
the response parser (`ResponseHandler`) and the request writer (`StreamWriter`) —
and drops the rest:

    acquire a pooled connection (or open one) → write the request head (and body)
    → read the response head → hand out the body stream → on EOF, back to the pool.

Errors are aiohttp's own client exceptions, so callers map them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import ClientConnectorError, ClientError, ClientOSError, ServerDisconnectedError
from aiohttp.client_exceptions import ConnectionTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EofStream, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from apitally_proxy.config import Upstream


class InvalidResponse(ClientError):
    """The upstream answered with something that is not HTTP/1.x."""


class UpstreamResponse:
    """The upstream's answer: status line and headers now, the body as a stream."""

    __slots__ = ("_done", "_pool", "_proto", "content", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        proto: ResponseHandler,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._proto = proto
        self._done = False
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    def release(self) -> None:
        """Return the connection to the pool if the exchange ended cleanly, else close it."""
        if self._done:
            return
        self._done = True
        self._pool._release(self._proto)


class UpstreamPool:
    """Keep-alive connections to one upstream (TCP, TLS or unix socket)."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float,
        limit: int = 0,
    ) -> None:
        self._upstream = upstream
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._idle: deque[tuple[ResponseHandler, float]] = deque()
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self._ssl = ssl.create_default_context() if upstream.scheme == "https" else None
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0  # connections opened over the pool's life
        self.retries = 0  # requests re-sent after a stale pooled connection
        # The Host header for clients that sent none (HTTP/1.0).
        self.default_host = (
            "localhost" if upstream.socket_path else str(upstream.origin).split("://", 1)[1]
        )

    # Connections.

    async def _open(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        up = self._upstream
        try:
            async with asyncio.timeout(self._connect_timeout):
                if up.socket_path is not None:
                    _, proto = await loop.create_unix_connection(
                        lambda: ResponseHandler(loop), up.socket_path
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: ResponseHandler(loop),
                        up.host,
                        up.port,
                        ssl=self._ssl,
                        server_hostname=up.host if self._ssl else None,
                    )
        except TimeoutError as exc:
            raise ConnectionTimeoutError(f"connecting to {up} timed out") from exc
        except OSError as exc:
            key = ConnectionKey(up.host, up.port, bool(self._ssl), True, None, None, None)
            raise ClientConnectorError(key, exc) from exc
        self.opened += 1
        return proto

    def _take_idle(self) -> ResponseHandler | None:
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()  # most recently used first: warmest
            if proto.is_connected() and now - since < self._keepalive:
                return proto
            proto.close()
        return None

    def _release(self, proto: ResponseHandler) -> None:
        if self._slots is not None:
            self._slots.release()
        if self._closed or proto.should_close or not proto.is_connected():
            proto.close()
            return
        self._idle.append((proto, time.monotonic()))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive (oldest are on the left)."""
        self._sweeper = None
        cutoff = time.monotonic() - self._keepalive
        while self._idle and (self._idle[0][1] <= cutoff or not self._idle[0][0].is_connected()):
            self._idle.popleft()[0].close()
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.pop()[0].close()

    # One exchange.

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None = None,
        chunked: bool = False,
        retry_stale: bool = False,
    ) -> UpstreamResponse:
        """Send one request; the caller must `release()` the response after its body.

        With `retry_stale` (only for idempotent requests without a body), a pooled
        connection that turns out to be closed by the upstream before any response
        came back is replaced by a fresh one, once.
        """
        if self._slots is not None:
            await self._slots.acquire()

        async def exchange_on(proto: ResponseHandler) -> UpstreamResponse:
            try:
                return await self._exchange(proto, method, target, headers, body, chunked)
            except BaseException:
                proto.close()  # never back to the pool after a failure
                raise

        try:
            pooled = self._take_idle()
            if pooled is not None:
                try:
                    return await exchange_on(pooled)
                except (ServerDisconnectedError, ClientOSError):
                    if not retry_stale:
                        raise
                self.retries += 1
            return await exchange_on(await self._open())
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    async def _exchange(
        self,
        proto: ResponseHandler,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        proto.set_response_params(
            skip_payload=method == "HEAD",
            auto_decompress=False,
            read_timeout=self._read_timeout,
            timeout_ceil_threshold=self._read_timeout + 1,  # exact timeouts, no rounding up
        )
        writer = StreamWriter(proto, loop)
        if chunked:
            writer.enable_chunking()
        await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
        uploading: asyncio.Task[None] | None = None
        if body is None:
            await writer.write_eof()
        else:
            writer.send_headers()
            # The body goes up while the response is awaited: an upstream may answer
            # (413, 401…) before reading all of it.
            uploading = loop.create_task(_upload(writer, body))
        proto.start_timeout()
        try:
            while True:
                try:
                    message, payload = await proto.read()
                except EofStream:
                    raise ServerDisconnectedError() from None
                except HttpProcessingError as exc:
                    raise InvalidResponse(exc.message) from exc
                if not (100 <= message.code < 200) or message.code == 101:
                    break
                # Interim 1xx (e.g. 103 Early Hints): the final answer follows.
        except BaseException:
            if uploading is not None:
                uploading.cancel()
            raise
        if uploading is not None:
            if uploading.done():
                uploading.result()  # the client's body failed: surface it
            else:
                # Answered before the body was fully sent: finish the upload in the
                # background, but never reuse this connection.
                proto.force_close()
                uploading.add_done_callback(_consume_result)
        return UpstreamResponse(self, proto, message.code, message.reason, message.headers, payload)


async def _upload(writer: StreamWriter, body: AsyncIterator[bytes]) -> None:
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except OSError as exc:
        raise ClientOSError(*exc.args) from exc


def _consume_result(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(BaseException):
        task.result()


__all__ = ["InvalidResponse", "UpstreamPool", "UpstreamResponse"]
