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
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import (
    ClientConnectionError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponseError,
    ServerDisconnectedError,
)
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


class ClientBodyError(ClientError):
    """The client's request body broke off, stalled or was malformed while being forwarded."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status  # 400 malformed or cut short, 408 stalled


# Response heads come from our own app, not the internet: generous, but bounded (the
# settings max_response_field_size, max_response_headers, max_interim_responses).
MAX_RESPONSE_LINE = 16384
MAX_RESPONSE_HEADERS = 200
MAX_INTERIM_RESPONSES = 10


class _PooledProtocol(ResponseHandler):
    """A ResponseHandler that is closed if the upstream sends anything while it is idle.

    Bytes on an idle keep-alive connection (a 408, a late duplicate) would
    otherwise be read as the answer to the next request sent on it.
    """

    idle = False

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.force_close()
            if self.transport is not None:
                self.transport.close()
            return
        super().data_received(data)


InterimHandler = Callable[[int, str, CIMultiDictProxy[str]], Awaitable[None]]
_HEAD_INJECTION = re.compile(r"[\r\n\x00]")


def encode_head(start_line: str, headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> bytes:
    """A message head as bytes, header values byte for byte as they were received.

    aiohttp hands bytes that are not UTF-8 (obs-text, e.g. `\\xff` in a cookie) over
    as surrogate escapes, and its C serializer silently drops them; a proxy must
    forward them. CR, LF or NUL inside a name or value is refused (header injection).
    """
    parts = [start_line, "\r\n"]
    for name, value in headers.items():
        if _HEAD_INJECTION.search(name) or _HEAD_INJECTION.search(value):
            raise ValueError(f"control character in header {name!r}: refused")
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def buffer_head(writer: StreamWriter, start_line: str, headers: CIMultiDict[str]) -> None:
    """`StreamWriter.write_headers` with `encode_head`: for heads carrying obs-text only
    (aiohttp's C serializer is faster for the rest)."""
    writer._headers_buf = encode_head(start_line, headers)
    writer._headers_written = False


class UpstreamResponse:
    """The upstream's answer: status line and headers now, the body as a stream."""

    __slots__ = ("_done", "_pool", "_proto", "_upload", "content", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        proto: _PooledProtocol,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        upload: _Upload | None = None,
    ) -> None:
        self._pool = pool
        self._proto = proto
        self._upload = upload
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
        if self._upload is not None:
            # An upload still running after the answer was relayed stops here, so the
            # server alone drains (or drops) the rest of the client's body.
            self._upload.cancel()
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
        body_timeout: float = 60.0,
        max_field_size: int = MAX_RESPONSE_LINE,
        max_headers: int = MAX_RESPONSE_HEADERS,
        max_interim: int = MAX_INTERIM_RESPONSES,
    ) -> None:
        self._upstream = upstream
        self._body_timeout = body_timeout
        self._max_field_size = max_field_size
        self._max_headers = max_headers
        self._max_interim = max_interim
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._idle: deque[tuple[_PooledProtocol, float]] = deque()
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self._ssl = ssl.create_default_context() if upstream.scheme == "https" else None
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.retries = 0  # requests re-sent after a stale pooled connection
        # The Host header for clients that sent none (HTTP/1.0).
        self.default_host = (
            "localhost" if upstream.socket_path else str(upstream.origin).split("://", 1)[1]
        )

    # Connections.

    async def _open(self) -> _PooledProtocol:
        loop = asyncio.get_running_loop()
        up = self._upstream
        try:
            async with asyncio.timeout(self._connect_timeout):
                if up.socket_path is not None:
                    _, proto = await loop.create_unix_connection(
                        lambda: _PooledProtocol(loop), up.socket_path
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: _PooledProtocol(loop),
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
        return proto

    def _take_idle(self) -> _PooledProtocol | None:
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()  # most recently used first: warmest
            if proto.is_connected() and not proto.should_close and now - since < self._keepalive:
                proto.idle = False
                return proto
            proto.close()
        return None

    def _release(self, proto: _PooledProtocol) -> None:
        if self._slots is not None:
            self._slots.release()
        if self._closed or proto.should_close or not proto.is_connected():
            proto.close()
            return
        proto.idle = True
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
        on_interim: InterimHandler | None = None,
        obs_text: bool = False,
    ) -> UpstreamResponse:
        """Send one request; the caller must `release()` the response after its body.

        `on_interim` gets each interim 1xx answer (103 Early Hints…) as it arrives.
        `obs_text`: some header value holds bytes that are not UTF-8 (see `encode_head`).

        With `retry_stale` (only for idempotent requests without a body), a pooled
        connection that turns out to be closed by the upstream before any response
        came back is replaced by a fresh one, once.
        """
        if self._slots is not None:
            await self._slots.acquire()

        async def exchange_on(proto: _PooledProtocol) -> UpstreamResponse:
            try:
                return await self._exchange(
                    proto, method, target, headers, body, chunked, on_interim, obs_text
                )
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
        proto: _PooledProtocol,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        on_interim: InterimHandler | None = None,
        obs_text: bool = False,
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        proto.set_response_params(
            skip_payload=method == "HEAD",
            # A body with neither Content-Length nor chunked framing ends when the
            # upstream closes the connection (RFC 9112 §6.3).
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=self._read_timeout,
            timeout_ceil_threshold=self._read_timeout + 1,  # exact timeouts, no rounding up
            max_line_size=self._max_field_size,
            max_field_size=self._max_field_size,
            max_headers=self._max_headers,
        )
        writer = StreamWriter(proto, loop)
        if chunked:
            writer.enable_chunking()
        if obs_text:
            buffer_head(writer, f"{method} {target} HTTP/1.1", headers)
        else:
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
        upload: _Upload | None = None
        if body is None:
            await writer.write_eof()
            proto.start_timeout()  # the upstream owes us an answer from now on
        else:
            writer.send_headers()
            # The body goes up while the response is awaited: an upstream may answer
            # (413, 401…) before reading all of it. The read timeout starts once the
            # body is sent: until then the upstream may rightly stay silent.
            upload = _Upload(loop, proto, writer, body, self._body_timeout)
        interim = 0
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
                # Interim 1xx (e.g. 103 Early Hints): the final answer follows, and the
                # parser dropped the read timeout for this one; re-arm it, a bounded
                # number of times (an endless train would hold the request forever).
                interim += 1
                if interim > self._max_interim:
                    raise InvalidResponse(
                        f"more than {self._max_interim} interim (1xx) responses "
                        "(max_interim_responses)"
                    )
                proto.start_timeout()
                if on_interim is not None and message.code != 100:
                    await on_interim(message.code, message.reason, message.headers)
        except BaseException:
            if upload is not None:
                upload.cancel()
            raise
        if upload is not None:
            upload.answered()
        return UpstreamResponse(
            self, proto, message.code, message.reason, message.headers, payload, upload
        )


class _Upload:
    """The request body going up in its own task, owned by the exchange's response."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        proto: _PooledProtocol,
        writer: StreamWriter,
        body: AsyncIterator[bytes],
        idle_timeout: float,
    ) -> None:
        self._proto = proto
        self._idle_timeout = idle_timeout
        self._answered = False
        self.task = loop.create_task(self._run(writer, body))

    async def _run(self, writer: StreamWriter, body: AsyncIterator[bytes]) -> None:
        chunks = body.__aiter__()
        try:
            while True:
                try:
                    # A client that stops sending (or whose framing broke: aiohttp then
                    # just stops feeding the stream) must not hold the exchange forever.
                    async with asyncio.timeout(self._idle_timeout):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    self._fail(
                        ClientBodyError(
                            f"no request body data for {self._idle_timeout:g} s", status=408
                        )
                    )
                    return
                await writer.write(chunk)
            await writer.write_eof()
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            self._fail(ClientOSError(*exc.args))  # the upstream went away mid-upload
            return
        except Exception as exc:
            self._fail(ClientBodyError(f"request body: {type(exc).__name__}: {exc}"))
            return
        if not self._answered:
            self._proto.start_timeout()

    def _fail(self, exc: Exception) -> None:
        self._proto.force_close()
        if not self._answered:
            # Wake the reader at once: the upstream will never answer a half body.
            self._proto.set_exception(exc)

    def answered(self) -> None:
        """The response head arrived; an unfinished upload makes the connection single-use."""
        self._answered = True
        if not self.task.done():
            self._proto.force_close()

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()
            self.task.add_done_callback(_consume_result)


def _consume_result(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(BaseException):
        task.result()


__all__ = ["ClientBodyError", "InvalidResponse", "UpstreamPool", "UpstreamResponse"]


def error_status(exc: BaseException) -> tuple[int, str, str]:
    """(status, kind, reason) for a failure to forward a request, as nginx would answer
    it: the client's own body (its status), 504 for a timeout, 502 for the rest. Both
    client-facing servers answer and count by it."""
    if isinstance(exc, ClientBodyError):
        return exc.status, "client_body", str(exc)
    if isinstance(exc, TimeoutError):
        return 504, "timeout", "the upstream did not answer in time"
    if isinstance(exc, ClientConnectorError):
        return 502, "connect", "the upstream refused the connection"
    if isinstance(exc, (InvalidResponse, ClientResponseError)):
        return 502, "protocol", "the upstream sent an invalid response"
    if isinstance(exc, (ClientConnectionError, OSError)):
        return 502, "reset", "the upstream closed the connection"
    return 502, "internal", "the proxy failed to forward the request"
