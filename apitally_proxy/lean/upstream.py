"""The upstream side of the lean server: `UpstreamPool` with raw heads in and out.

`upstream.UpstreamPool` is already lean (aiohttp's C response parser, its
StreamWriter, a keep-alive pool). The lean server only changes what crosses the
boundary: the request head arrives as bytes built by `headers.request_head` and
is written as is (no multidict, no serializer), and the response comes back
with its raw header lines (`message.raw_headers`) so `headers.response_fields`
can filter them without a multidict either. Pool management (acquire, idle
sweep, stale retry, release), the body upload with its idle timeout and the
bounded interim answers are the pool's own code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientConnectorError, ClientOSError, ServerDisconnectedError
from aiohttp.client_exceptions import ConnectionTimeoutError
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EofStream, StreamReader

from apitally_proxy.lean.headers import RawHeaders
from apitally_proxy.upstream import InvalidResponse, UpstreamPool, _PooledProtocol, _Upload

RawInterimHandler = Callable[[int, str, RawHeaders], Awaitable[None] | None]


class _LeanProtocol(_PooledProtocol):
    """The pool's protocol with a cheaper read timeout and a reused response parser.

    aiohttp re-arms the read timeout on every `data_received` (a TimerHandle created
    and one cancelled per read, several per request). Here a deadline is moved instead,
    and one timer per connection checks it when it fires (re-arming itself for what
    is left): the same timeouts, at the same moments, for a float store per read.

    `resume_reading` acts only when reading was paused.

    `set_response_params` builds a new HttpResponseParser; llhttp parses any number
    of keep-alive responses in a row, so the parser is kept while the parameters
    (only HEAD differs) stay the same.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._deadline: float | None = None
        self.lean_skip_payload: bool | None = None  # the parser's skip_payload, once set

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = None
            return
        self._deadline = deadline = self._loop.time() + timeout
        if self._read_timeout_handle is None:
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)

    def _drop_timeout(self) -> None:
        self._deadline = None  # the timer, if armed, finds nothing to do and stops

    def _check_deadline(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._deadline = None
            self._on_read_timeout()
        else:
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # StreamReader calls this on every read below its low-water mark; only a real
        # pause needs undoing (aiohttp would re-feed the parser an empty chunk each time).
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._read_timeout_handle is not None:
            self._read_timeout_handle.cancel()
            self._read_timeout_handle = None

    def close(self) -> None:
        super().close()
        self._cancel_timer()

    def abort(self) -> None:
        super().abort()
        self._cancel_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_timer()
        self.lean_skip_payload = None


class LeanResponse:
    """The upstream's answer: status, raw header lines, the body as a stream."""

    __slots__ = (
        "_done",
        "_pool",
        "_proto",
        "_upload",
        "chunked",
        "content",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        pool: LeanUpstream,
        proto: _PooledProtocol,
        status: int,
        reason: str,
        raw_headers: RawHeaders,
        chunked: bool,
        content: StreamReader,
        upload: _Upload | None,
    ) -> None:
        self._pool = pool
        self._proto = proto
        self._upload = upload
        self._done = False
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.chunked = chunked
        self.content = content

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly, else closed (see UpstreamResponse)."""
        if self._done:
            return
        self._done = True
        if self._upload is not None:
            self._upload.cancel()
        self._pool._release(self._proto)


class LeanUpstream(UpstreamPool):
    """The keep-alive pool, sending pre-built heads."""

    async def _open(self) -> _PooledProtocol:
        """`UpstreamPool._open` with the lean protocol."""
        loop = asyncio.get_running_loop()
        up = self._upstream
        try:
            async with asyncio.timeout(self._connect_timeout):
                if up.socket_path is not None:
                    _, proto = await loop.create_unix_connection(
                        lambda: _LeanProtocol(loop), up.socket_path
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: _LeanProtocol(loop),
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

    async def send(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None = None,
        chunked: bool = False,
        retry_stale: bool = False,
        on_interim: RawInterimHandler | None = None,
    ) -> LeanResponse:
        """Send one request (`head` complete, framing included); `release()` the answer.

        Same contract as `UpstreamPool.request`: `retry_stale` re-sends a body-less
        idempotent request once on a fresh connection when a pooled one turns out
        closed before any byte came back.
        """
        if self._slots is not None:
            await self._slots.acquire()
        try:
            proto = self._take_idle()
            if proto is not None:
                try:
                    return await self._exchange_raw(proto, method, head, body, chunked, on_interim)
                except BaseException as exc:
                    proto.close()  # never back to the pool after a failure
                    stale = isinstance(exc, (ServerDisconnectedError, ClientOSError))
                    if not (retry_stale and stale):
                        raise
                self.retries += 1
            proto = await self._open()
            try:
                return await self._exchange_raw(proto, method, head, body, chunked, on_interim)
            except BaseException:
                proto.close()
                raise
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    def _prepare(self, proto: _PooledProtocol, skip: bool) -> None:
        """Response parser and timeouts for the next exchange (the parser kept if it fits)."""
        if getattr(proto, "lean_skip_payload", None) is skip and proto._parser is not None:
            return
        proto.set_response_params(
            skip_payload=skip,
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
        if isinstance(proto, _LeanProtocol):
            proto.lean_skip_payload = skip

    def _write_head(
        self,
        proto: _PooledProtocol,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> _Upload | None:
        """Write the head (as is); a body goes up in its own task, owned by the answer."""
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ClientOSError("upstream connection closed")
        if body is None:
            transport.write(head)
            proto.start_timeout()  # the upstream owes us an answer from now on
            return None
        loop = asyncio.get_running_loop()
        writer = StreamWriter(proto, loop)
        if chunked:
            writer.enable_chunking()
        writer._headers_buf = head
        writer._headers_written = False
        writer.send_headers()
        # The body goes up while the answer is awaited (a 413 may come first); the
        # read timeout starts once it is sent: until then the upstream may stay silent.
        return _Upload(loop, proto, writer, body, self._body_timeout)

    async def _exchange_raw(
        self,
        proto: _PooledProtocol,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        on_interim: RawInterimHandler | None,
    ) -> LeanResponse:
        self._prepare(proto, method == "HEAD")
        upload = self._write_head(proto, head, body, chunked)
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
                interim += 1
                if interim > self._max_interim:
                    raise InvalidResponse(
                        f"more than {self._max_interim} interim (1xx) responses "
                        "(max_interim_responses)"
                    )
                proto.start_timeout()
                if on_interim is not None and message.code != 100:
                    sent = on_interim(message.code, message.reason, message.raw_headers)
                    if sent is not None:
                        await sent
        except BaseException:
            if upload is not None:
                upload.cancel()
            raise
        if upload is not None:
            upload.answered()
        return LeanResponse(
            self,
            proto,
            message.code,
            message.reason,
            message.raw_headers,
            bool(message.chunked),
            payload,
            upload,
        )
