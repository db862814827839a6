"""The upstream side of the lean server: `UpstreamPool` with raw heads in and out.

The pool management (acquire, idle sweep, stale retry, release), the body upload
with its idle timeout and the bounded interim answers are `upstream.UpstreamPool`'s
own code. What the lean side changes is what crosses the connection: the request
head arrives as bytes built by `headers.request_head` and is written as is, and
each connection is a `_RawProtocol` on llhttp (httptools) instead of aiohttp's
ResponseHandler: the answer comes back as its status, raw header lines (for
`headers.response_fields`) and, when it arrived with the head, the whole body as
bytes; no header multidict, no DataQueue, and a StreamReader only for bodies that
are still arriving.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httptools
from aiohttp import (
    ClientConnectionError,
    ClientConnectorError,
    ClientOSError,
    ClientPayloadError,
    ServerDisconnectedError,
    ServerTimeoutError,
)
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ConnectionTimeoutError
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from apitally_proxy.lean.headers import RawHeaders
from apitally_proxy.upstream import InvalidResponse, UpstreamPool, _Upload

RawInterimHandler = Callable[[int, str, RawHeaders], Awaitable[None] | None]

# An answer with a Content-Length up to this is held until its body is whole (the head
# and the body often come in separate reads: uvicorn writes them apart), then handed
# over as bytes; a longer one, or a chunked or close-delimited one, streams.
HOLD_LIMIT = 64 * 1024


class CutShort(ClientConnectionError):
    """The upstream closed the connection inside a held answer's body (502, not retried:
    the upstream saw the request)."""


class _Answer:
    """One upstream response head (final or interim) and its body: `body` once the
    whole body came (most responses: in the read that brought the head), else
    `content`, a StreamReader fed as the rest arrives. `held`: a short body of known
    length is still arriving; the answer is handed over once it is whole."""

    __slots__ = ("body", "content", "held", "parts", "raw_headers", "reason", "status")

    def __init__(self, status: int, reason: str, raw_headers: RawHeaders) -> None:
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.body = b""
        self.parts: list[bytes] = []
        self.content: StreamReader | None = None
        self.held = False


class _RawProtocol(BaseProtocol):
    """One pooled upstream connection, parsed with llhttp (httptools).

    It replaces aiohttp's ResponseHandler, response parser and DataQueue on the lean
    path: a response whose body arrives with its head (most of them) is handed over
    as bytes, with no StreamReader; a longer body streams through one. The rules are
    the pool's: an idle connection that receives anything is closed; a read timeout
    between reads while an answer is owed (one deadline moved per read, one timer per
    connection); EOF before an answer is `ServerDisconnectedError` (a stale pooled
    connection, retried for idempotent requests); EOF inside a body framed by length
    or chunks is `ClientPayloadError` (`CutShort` while the answer is held, see
    HOLD_LIMIT); a close-delimited body ends at EOF.

    Whoever waits for the answer either awaits `wait()`'s future or registers a
    `listener`, a plain callback run whenever that future would be resolved (the lean
    server's direct path: no task, no future).

    httptools cannot be told to skip a HEAD response's body (aiohttp's `skip_payload`):
    after a HEAD answer's head the parser is replaced by a fresh one, and any byte
    that came after that head makes the connection single-use.
    """

    idle = False

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        max_field_size: int,
        max_headers: int,
    ) -> None:
        super().__init__(loop)
        self._read_timeout = read_timeout
        self._max_field = max_field_size
        self._max_headers = max_headers
        self._max_head = max_field_size * (max_headers + 2)
        self._http = self._new_parser()
        self._answers: deque[_Answer] = deque()  # parsed, not yet read
        self._current: _Answer | None = None  # the answer whose body is arriving
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None  # what the next read raises
        self._closing = False  # not to be reused
        self._head_request = False  # the request in flight is a HEAD
        self._skipped = False  # a HEAD answer's head came: replace the parser after the read
        self._in_head = False
        self._fed = 0
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._ends_at_eof = True  # neither Content-Length nor chunked: the body ends at EOF
        self._length = -1  # the answer's Content-Length, when it has one
        self.listener: Callable[[], None] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _new_parser(self) -> httptools.HttpResponseParser:
        parser = httptools.HttpResponseParser(self)
        # aiohttp's tolerance of real servers (its response parser's lax mode): control
        # bytes in field values (but not CR, LF or NUL: refused), a bare LF, spaces
        # after a chunk size.
        parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        return parser

    # What the pool and _Upload use.

    @property
    def should_close(self) -> bool:
        return (
            self._closing
            or self._current is not None
            or bool(self._answers)
            or self._exc is not None
            or self.transport is None
        )

    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def force_close(self) -> None:
        self._closing = True

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self._cancel_timer()

    def expect(self, method: str) -> None:
        """The next answer is to a `method` request (HEAD answers carry no body)."""
        self._head_request = method == "HEAD"

    def start_timeout(self) -> None:
        """The upstream owes an answer (or more of one) from now on."""
        timeout = self._read_timeout
        if not timeout:
            return
        self._deadline = deadline = self._loop.time() + timeout
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def set_exception(self, exc: BaseException) -> None:
        """Fail the exchange: the pending read, or the body being read."""
        self._closing = True
        self._exc = exc
        current = self._current
        if current is not None:
            if current.content is not None:
                current.content.set_exception(exc)
            elif current.held:
                self._drop(current)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif waiter is None and self.listener is not None:
            self.listener()

    def wait(self) -> asyncio.Future[None] | None:
        """None when an answer head is ready to `take`, else a future to await first
        (no coroutine frame per read: the exchange awaits the future itself)."""
        if self._ready():
            return None
        if self._exc is not None:
            raise self._exc
        if self.transport is None:
            raise ServerDisconnectedError()
        self._waiter = waiter = self._loop.create_future()
        return waiter

    def _ready(self) -> bool:
        """An answer is there to take (the first is not a held one still arriving)."""
        answers = self._answers
        return bool(answers) and not answers[0].held

    def whole(self) -> bool:
        """A final answer is next to `take`, with its whole body (no interim answer
        before it, nothing more to stream, no failure)."""
        answers = self._answers
        if not answers:
            return False
        first = answers[0]
        return first.status >= 200 and first.content is None and first is not self._current

    def take(self) -> _Answer:
        """The next answer head (interim or final); after `wait`."""
        self._waiter = None
        return self._answers.popleft()

    # Flow control: a full StreamReader pauses the socket (no parser to pause).

    def pause_reading(self) -> None:
        self._reading_paused = True
        self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self._buffer_paused:
                self._resume_transport_reading()

    # asyncio.Protocol.

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Bytes on an idle keep-alive connection (a 408, a late duplicate) would be
            # read as the answer to the next request sent on it.
            self.close()
            return
        if self._deadline is not None:
            self._deadline = self._loop.time() + self._read_timeout
        in_head = self._in_head
        try:
            self._http.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._closing = True  # a 101: nothing after it is HTTP
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._invalid(str(cause) if isinstance(cause, InvalidResponse) else str(exc))
            return
        except httptools.HttpParserError as exc:
            self._invalid(str(exc))
            return
        if in_head and self._in_head:
            self._fed += len(data)
            if self._fed > self._max_head:
                self._invalid("response head too large")
                return
        if self._skipped:
            self._skipped = False
            self._http = self._new_parser()
        current = self._current
        if current is not None and current.content is None and not current.held:
            # The body goes on past this read: from here it streams.
            content = current.content = StreamReader(self, 2**16, loop=self._loop)
            for part in current.parts:
                content.feed_data(part)
            current.parts = []
        if self._ready():
            self._wake()

    def _wake(self) -> None:
        """Tell whoever waits for the answer (the future, or the listener) that there is
        one to take, or a failure to raise."""
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                if self._ready():
                    waiter.set_result(None)
                elif self._exc is not None:
                    waiter.set_exception(self._exc)
        elif self.listener is not None:
            self.listener()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost ends what is open

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_timer()
        current = self._current
        if current is not None:
            self._current = None
            content = current.content
            if self._ends_at_eof:
                # A close-delimited body (neither Content-Length nor chunked) ends here.
                if content is not None:
                    content.feed_eof()
            elif content is not None:
                content.set_exception(ClientPayloadError("response payload is not completed"))
            elif current.held and self._exc is None:
                self._exc = CutShort("the upstream closed the connection inside a response")
                self._drop(current)
        if self._exc is None:
            self._exc = ServerDisconnectedError()
        self._wake()

    def _drop(self, answer: _Answer) -> None:
        """A held answer that will never be whole: never handed over."""
        answer.held = False
        if answer in self._answers:
            self._answers.remove(answer)

    # httptools callbacks.

    def on_message_begin(self) -> None:
        self._in_head = True
        self._fed = 0
        self._reason = b""
        self._raw = []
        self._ends_at_eof = True
        self._length = -1

    def on_status(self, reason: bytes) -> None:
        reason = self._reason + reason if self._reason else reason
        if len(reason) > self._max_field:
            raise InvalidResponse("response status line too long")
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailer fields of a chunked body: not relayed
        if len(name) > self._max_field or len(value) > self._max_field:
            raise InvalidResponse("response header field too long (max_response_field_size)")
        if value and value[-1] in b" \t":
            value = value.rstrip(b" \t")
        if b"\x00" in value:
            raise InvalidResponse("NUL in a response header field")
        raw = self._raw
        raw.append((name, value))
        if len(raw) > self._max_headers:
            raise InvalidResponse("too many response header fields (max_response_headers)")
        n = len(name)
        if n == 17 and name.lower() == b"transfer-encoding":
            self._ends_at_eof = not value.lower().endswith(b"chunked")
        elif n == 14 and name.lower() == b"content-length":
            self._ends_at_eof = False
            if value.isdigit():
                self._length = int(value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        http = self._http
        status = http.get_status_code()
        answer = _Answer(status, self._reason.decode("utf-8", "surrogateescape"), self._raw)
        self._answers.append(answer)
        if 100 <= status < 200 and status != 101:
            return  # interim: the final answer follows on this connection
        if not http.should_keep_alive():
            self._closing = True
        if self._head_request or status in (101, 204, 304):
            self._deadline = None  # bodiless: complete with its head
            self._skipped = self._head_request
            return
        self._current = answer
        answer.held = 0 <= self._length <= HOLD_LIMIT

    def on_body(self, body: bytes) -> None:
        current = self._current
        if current is None:
            self._closing = True  # bytes after a HEAD answer's head: not reusable
            return
        if current.content is not None:
            current.content.feed_data(body)
        else:
            current.parts.append(body)

    def on_message_complete(self) -> None:
        current = self._current
        if current is None:
            return
        self._current = None
        self._deadline = None  # the answer is complete: nothing more is owed
        content = current.content
        if content is not None:
            content.feed_eof()
        else:
            parts = current.parts
            current.body = parts[0] if len(parts) == 1 else b"".join(parts)
            current.parts = []
            current.held = False

    # The read timeout.

    def _invalid(self, reason: str) -> None:
        self.set_exception(InvalidResponse(reason))
        if self.transport is not None:
            self.transport.close()

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._deadline = None
            self.set_exception(ServerTimeoutError("timeout reading from the upstream"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LeanResponse:
    """The upstream's answer: status, raw header lines, and the body: `body` when it
    came whole with the head (`content` None), else `content` to stream."""

    __slots__ = (
        "_done",
        "_pool",
        "_proto",
        "_upload",
        "body",
        "content",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(
        self, pool: LeanUpstream, proto: _RawProtocol, answer: _Answer, upload: _Upload | None
    ) -> None:
        self._pool = pool
        self._proto = proto
        self._upload = upload
        self._done = False
        self.status = answer.status
        self.reason = answer.reason
        self.raw_headers = answer.raw_headers
        self.body = answer.body
        self.content = answer.content

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly, else closed (see UpstreamResponse)."""
        if self._done:
            return
        self._done = True
        if self._upload is not None:
            self._upload.cancel()
        self._pool._release(cast(Any, self._proto))


class LeanUpstream(UpstreamPool):
    """The keep-alive pool (its acquire, idle sweep, stale retry and release), with
    connections of `_RawProtocol` and pre-built request heads."""

    async def _open(self) -> Any:
        """`UpstreamPool._open` with the lean protocol."""
        loop = asyncio.get_running_loop()
        up = self._upstream

        def protocol() -> _RawProtocol:
            return _RawProtocol(loop, self._read_timeout, self._max_field_size, self._max_headers)

        try:
            async with asyncio.timeout(self._connect_timeout):
                if up.socket_path is not None:
                    _, proto = await loop.create_unix_connection(protocol, up.socket_path)
                else:
                    _, proto = await loop.create_connection(
                        protocol,
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
            proto: Any = self._take_idle()
            if proto is None:
                proto, retry_stale = await self._open(), False
            return await self._on(proto, method, head, body, chunked, retry_stale, on_interim)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    def idle_now(self) -> bool:
        """Whether `send_now` may find an idle connection (no pool limit, one is idle)."""
        return self._slots is None and bool(self._idle)

    def send_now(
        self, method: str, head: bytes, listener: Callable[[], None]
    ) -> _RawProtocol | None:
        """Write a body-less request on an idle pooled connection without waiting, or
        return None (none idle, or a pool limit is set: use `send`). The connection
        calls `listener` when its answer can be taken (`whole()`, then `take`), or when
        the exchange failed; `finish` awaits what the listener could not take."""
        if self._slots is not None:
            return None
        proto: _RawProtocol | None = cast(Any, self._take_idle())
        if proto is None:
            return None
        proto.listener = listener
        self._write_head(proto, method, head, None, False)  # taken connected: cannot raise
        return proto

    def answer_now(self, proto: _RawProtocol) -> LeanResponse:
        """The whole answer to a `send_now` request (after `proto.whole()`)."""
        proto.listener = None
        return LeanResponse(self, proto, proto.take(), None)

    async def finish(
        self,
        proto: _RawProtocol,
        method: str,
        head: bytes,
        retry_stale: bool,
        on_interim: RawInterimHandler | None,
    ) -> LeanResponse:
        """`send` from where `send_now` left off: interim answers, a body to stream, a
        failure (and the stale retry)."""
        proto.listener = None
        return await self._on(proto, method, head, None, False, retry_stale, on_interim, sent=True)

    async def _on(
        self,
        proto: _RawProtocol,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        retry_stale: bool,
        on_interim: RawInterimHandler | None,
        *,
        sent: bool = False,
    ) -> LeanResponse:
        """Send on `proto` (unless `sent`) and await the answer. A failure closes the
        connection; with `retry_stale`, a stale one (closed before any byte came back)
        sends the request once more on a fresh connection."""
        try:
            upload = None if sent else self._write_head(proto, method, head, body, chunked)
            return await self._answer(proto, upload, on_interim)
        except BaseException as exc:
            proto.close()  # never back to the pool after a failure
            stale = isinstance(exc, (ServerDisconnectedError, ClientOSError))
            if not (retry_stale and stale):
                raise
        self.retries += 1
        return await self._on(await self._open(), method, head, body, chunked, False, on_interim)

    def _write_head(
        self,
        proto: _RawProtocol,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> _Upload | None:
        """Write the head (as is); a body goes up in its own task, owned by the answer."""
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ClientOSError("upstream connection closed")
        proto.expect(method)
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
        return _Upload(loop, cast(Any, proto), writer, body, self._body_timeout)

    async def _answer(
        self,
        proto: _RawProtocol,
        upload: _Upload | None,
        on_interim: RawInterimHandler | None,
    ) -> LeanResponse:
        """Await the final answer (bounded interim answers relayed on the way)."""
        interim = 0
        try:
            while True:
                waiter = proto.wait()
                if waiter is not None:
                    await waiter
                answer = proto.take()
                code = answer.status
                if not (100 <= code < 200) or code == 101:
                    break
                interim += 1
                if interim > self._max_interim:
                    raise InvalidResponse(
                        f"more than {self._max_interim} interim (1xx) responses "
                        "(max_interim_responses)"
                    )
                proto.start_timeout()
                if on_interim is not None and code != 100:
                    sent = on_interim(code, answer.reason, answer.raw_headers)
                    if sent is not None:
                        await sent
        except BaseException:
            if upload is not None:
                upload.cancel()
            raise
        if upload is not None:
            upload.answered()
        return LeanResponse(self, proto, answer, upload)
