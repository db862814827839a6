"""The lean server's request parser: llhttp through httptools, with the proxy's limits.

httptools hands over the request line and each header field as bytes, once, and
builds nothing per message; this module adds what aiohttp's request parser did on
top of llhttp and the proxy relies on:

- limits: `max_line_size` (414), `max_field_size` and `max_headers` (431), and a
  byte budget for a head still arriving, so a head that never ends cannot grow;
- refusals llhttp leaves to its caller: a duplicate singleton field (Host,
  Content-Length…), a missing Host in HTTP/1.1, raw non-ASCII in the target,
  an absolute-form target that is not a URL;
- the request body as a StreamReader (flow control through the protocol), only
  for requests that have one.

A complete head is a `RequestHead`: the fields the server reads on every request
are plain attributes; the header multidict and the yarl URL are built only when
asked for (consumer header, request log, WebSocket). llhttp itself is strict:
CL+TE, duplicate Content-Length, obs-fold, NUL and other control bytes, bare LF,
bad chunk sizes and transfer codings other than a final chunked are its refusals.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import HttpVersion
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from apitally_proxy.lean.headers import RawHeaders

# RFC 9110 fields that may appear once (as aiohttp's strict request parser has them).
SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
# The fields the server reads itself; kept apart as they pass, no lookup later.
_HOST, _LENGTH, _CODING, _EXPECT = b"host", b"content-length", b"transfer-encoding", b"expect"
_NOTED = SINGLETONS | {_EXPECT}
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_METHODS: dict[bytes, str] = {}


class HeadRefused(Exception):
    """A request head the proxy refuses before anything is forwarded. `messages` are
    the requests completed in the same read before the bad one: they are answered
    first, in order."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.messages: list[Message] = []


class RequestHead:
    """One parsed request head. `target` is the raw request target; `path` the same,
    decoded as aiohttp does (UTF-8, surrogateescape); `authority` and `path_qs` are
    set for an absolute-form target only."""

    __slots__ = (
        "_headers",
        "authority",
        "chunked",
        "content_length",
        "expect",
        "host",
        "method",
        "path",
        "path_qs",
        "raw_headers",
        "should_close",
        "target",
        "transfer_encoding",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: tuple[int, int],
        raw_headers: RawHeaders,
        noted: dict[bytes, bytes],
        should_close: bool,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.decode("utf-8", "surrogateescape")
        self.version = version
        self.raw_headers = raw_headers
        self.should_close = should_close
        self.upgrade = upgrade
        self.host = noted.get(_HOST)
        self.content_length = noted.get(_LENGTH)
        coding = noted.get(_CODING)
        self.transfer_encoding = coding
        self.chunked = coding is not None  # llhttp refused any other final coding
        self.expect = noted.get(_EXPECT)
        self.authority: str | None = None
        self.path_qs: str | None = None
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def has_body(self) -> bool:
        length = self.content_length
        return self.chunked or (length is not None and int(length) > 0)

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The header fields as aiohttp's request has them (built on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                    for n, v in self.raw_headers
                )
            )
        return headers

    @property
    def url(self) -> URL:
        return URL(self.path, encoded=True)

    def raw_message(self) -> RawRequestMessage:
        """The head as aiohttp's RawRequestMessage (a WebSocket upgrade's web.BaseRequest)."""
        return RawRequestMessage(
            self.method,
            self.path,
            HttpVersion(*self.version),
            self.headers,
            tuple(self.raw_headers),
            self.should_close,
            None,
            self.upgrade,
            self.chunked,
            self.url,
        )


Message = tuple[RequestHead, StreamReader]


class RequestParser:
    """Feeds llhttp; `feed_data` returns (complete heads with their bodies, upgraded,
    the bytes after an upgrade head), as aiohttp's parser does, and raises
    `HeadRefused` for a stream it cannot take."""

    __slots__ = (
        "_fed",
        "_in_head",
        "_loop",
        "_max_field",
        "_max_head",
        "_max_headers",
        "_max_line",
        "_messages",
        "_noted",
        "_parser",
        "_payload",
        "_protocol",
        "_raw",
        "_read_limit",
        "_url",
    )

    def __init__(
        self,
        protocol: Any,
        loop: asyncio.AbstractEventLoop,
        read_limit: int,
        *,
        max_line_size: int,
        max_field_size: int,
        max_headers: int,
        max_header_bytes: int,
    ) -> None:
        self._protocol = protocol
        self._loop = loop
        self._read_limit = read_limit
        self._max_line = max_line_size
        self._max_field = max_field_size
        self._max_headers = max_headers
        # What a head may take while still arriving, counted over whole reads.
        self._max_head = max_line_size + max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        # Unsupported versions (HTTP/1.2…) are answered 505, not refused as garbage.
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self._messages: list[Message] = []
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._noted: dict[bytes, bytes] = {}
        self._payload: StreamReader | None = None
        self._in_head = False
        self._fed = 0

    def pause_reading(self) -> None:
        """A full request body paused the transport (BaseProtocol asks its parser too):
        llhttp finishes the read it has, at most one read past the limit."""

    def feed_data(self, data: bytes) -> tuple[list[Message], bool, bytes]:
        in_head = self._in_head
        upgraded = False
        tail = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            upgraded = True
            tail = data[up.args[0] :]
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            refused = cause if isinstance(cause, HeadRefused) else HeadRefused(400, str(exc))
            refused.messages, self._messages = self._messages, []
            raise refused from None
        if in_head and self._in_head:
            # The whole read went into one unfinished head.
            self._fed += len(data)
            if self._fed > self._max_head:
                refused = HeadRefused(431, "request head too large")
                refused.messages, self._messages = self._messages, []
                raise refused
        messages = self._messages
        if messages:
            self._messages = []
        return messages, upgraded, tail

    # httptools callbacks.

    def on_message_begin(self) -> None:
        self._in_head = True
        self._fed = 0
        self._url = b""
        self._raw = []
        self._noted = {}

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        if len(url) > self._max_line:
            raise HeadRefused(414, "request line too long")
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer fields: not forwarded
        if len(name) > self._max_field or len(value) > self._max_field:
            raise HeadRefused(431, "header field too long")
        if value and value[-1] in b" \t":
            value = value.rstrip(b" \t")  # llhttp strips the OWS before a value only
        raw = self._raw
        raw.append((name, value))
        if len(raw) > self._max_headers:
            raise HeadRefused(431, "too many header fields")
        lower = name.lower()
        if lower in _NOTED:
            noted = self._noted
            if lower in noted and lower in SINGLETONS:
                raise HeadRefused(400, f"duplicate {name.decode('latin-1')} header field")
            noted[lower] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        target = self._url
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            major, _, minor = parser.get_http_version().partition(".")
            version = (int(major), int(minor))
        noted = self._noted
        if version == (1, 1) and _HOST not in noted:
            raise HeadRefused(400, "missing Host header field")
        if not target.isascii():
            raise HeadRefused(400, "raw non-ASCII byte in the request target")
        method_name = parser.get_method()
        method = _METHODS.get(method_name)
        if method is None:
            method = _METHODS[method_name] = method_name.decode("ascii")
        head = RequestHead(
            method,
            target,
            version,
            self._raw,
            noted,
            not parser.should_keep_alive(),
            parser.should_upgrade() and method != "CONNECT",
        )
        if target[:1] != b"/" and b"://" in target:
            _absolute(head)
        payload: StreamReader = EMPTY_PAYLOAD
        if head.has_body:
            payload = self._payload = StreamReader(
                self._protocol, self._read_limit, loop=self._loop
            )
        self._messages.append((head, payload))

    def on_body(self, body: bytes) -> None:
        payload = self._payload
        if payload is not None:
            payload.feed_data(body)

    def on_message_complete(self) -> None:
        payload = self._payload
        if payload is not None:
            self._payload = None
            payload.feed_eof()


def _absolute(head: RequestHead) -> None:
    """An absolute-form target (`GET http://host/path`): its authority and path."""
    try:
        url = head.url
        authority = url.raw_authority
    except ValueError as exc:
        raise HeadRefused(400, f"invalid request target: {exc}") from None
    if authority:
        head.authority = authority
        head.path_qs = url.raw_path_qs


__all__ = ["HeadRefused", "Message", "RequestHead", "RequestParser"]
