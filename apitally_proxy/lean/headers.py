"""The proxy's header policy as pure functions over raw header lines.

The parser hands over a message's header fields as they arrived: a sequence of
`(name, value)` byte pairs, names in the client's spelling, values with the
surrounding whitespace trimmed. Everything here works on those bytes directly,
so a head is filtered and re-joined in one pass without decoding a field into a
multidict and encoding it again. It is the same policy as `proxy.py`:

- hop-by-hop fields (RFC 9110 §7.6.1) never cross: `Connection` and every field
  it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`,
  `Upgrade`; `Connection` cannot make `Host`, `Content-Length`, `Content-Type`
  or `Transfer-Encoding` hop-by-hop (they describe the message, not the hop);
- a client never poses as a consumer or a route: `X-Apitally-*` is dropped from
  requests; from responses it is taken out and handed to the meter;
- `X-Forwarded-For/-Proto/-Host` are set by the proxy (a trusted hop's values
  are extended, anyone else's replaced); other address claims (`Forwarded`,
  `X-Real-IP`…) pass only from trusted hops;
- the request body is re-framed by the proxy: `Expect` is answered here, never
  forwarded; an absolute-form target's authority becomes the forwarded `Host`.

Field values are never decoded: bytes that are not UTF-8 (obs-text) pass as they
came. The parser already refused CR, LF and NUL inside fields, so joining the
lines cannot inject one.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from email.utils import formatdate

RawHeaders = Sequence[tuple[bytes, bytes]]

# Fields that describe one connection, not the message (RFC 9110 §7.6.1), and every
# Proxy-* field: the one hop-by-hop rule, for requests, responses, interim answers and
# a refused WebSocket upgrade's pass-back, on both servers (`is_hop_by_hop_name` is
# the str form proxy.py and websocket.py use; the fields Connection names join it).
HOP_BY_HOP_NAMES = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
HOP_BY_HOP = frozenset(name.encode("ascii") for name in HOP_BY_HOP_NAMES)
# Fields a Connection header cannot make hop-by-hop.
NEVER_HOP_BY_HOP_NAMES = frozenset({"host", "content-length", "content-type", "transfer-encoding"})
NEVER_HOP_BY_HOP = frozenset(name.encode("ascii") for name in NEVER_HOP_BY_HOP_NAMES)
# Set by the proxy on every request, from the peer (or a trusted hop's values).
FORWARDED_REWRITTEN = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Other ways a client claims an address, scheme or prefix: kept only from trusted hops.
CLIENT_ADDRESS_CLAIMS = frozenset({b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip"})
APITALLY_PREFIX = b"x-apitally-"
PROXY_PREFIX = b"proxy-"

CRLF = b"\r\n"
SEP = b": "
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def connection_tokens(raw: RawHeaders) -> frozenset[bytes]:
    """Lower-cased field names listed in Connection: hop-by-hop for this message too."""
    tokens: set[bytes] = set()
    for name, value in raw:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(_tokens(value))
    return frozenset(tokens - NEVER_HOP_BY_HOP)


def _tokens(value: bytes) -> set[bytes]:
    return {t for t in (part.strip().lower() for part in value.split(b",")) if t}


class _NamesMore(Exception):
    """A Connection header names fields beyond the standard hop-by-hop ones."""


def _names_more(value: bytes) -> bool:
    """Whether a Connection value names fields that are not hop-by-hop anyway."""
    known = _NAMES_MORE.get(value)
    if known is None:
        known = bool(_tokens(value) - HOP_BY_HOP - NEVER_HOP_BY_HOP)
    return known


# The Connection values nearly every message carries, answered without a split.
_NAMES_MORE = {
    value: False
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def is_hop_by_hop_name(lname: str, extra: Collection[str] = ()) -> bool:
    """`is_hop_by_hop` for a lower-cased str name (aiohttp's multidicts)."""
    return lname in HOP_BY_HOP_NAMES or lname.startswith("proxy-") or lname in extra


def connection_names(values: Iterable[str]) -> set[str]:
    """Lower-cased field names that Connection values list (str form of
    `connection_tokens`): hop-by-hop for this message too."""
    names = {t.strip().lower() for value in values for t in value.split(",")}
    names.discard("")
    return names - NEVER_HOP_BY_HOP_NAMES


def is_hop_by_hop(lname: bytes, extra: frozenset[bytes] = frozenset()) -> bool:
    """Whether a lower-cased field name is hop-by-hop (`extra`: the Connection tokens)."""
    return lname in HOP_BY_HOP or lname.startswith(PROXY_PREFIX) or lname in extra


# What a field is, by name: classified once per spelling (a dict lookup per field on the
# hot path instead of lower() and a handful of set and prefix tests).
KEEP = 0  # an end-to-end field: forwarded as is
HOP = 1  # hop-by-hop (Proxy-* included) or Expect: never forwarded
CONNECTION = 2  # hop-by-hop, and may name more hop-by-hop fields
APITALLY = 3  # X-Apitally-*: never from clients, taken out of responses for the meter
FORWARDED = 4  # X-Forwarded-For/-Proto/-Host: set by the proxy
CLAIM = 5  # Forwarded, X-Real-IP…, other X-Forwarded-*: kept from trusted hops only
HOST = 6
LENGTH = 7
DATE = 8
EXPECT = 9
_KEPT = frozenset({KEEP, LENGTH, DATE})  # forwarded in requests without a second look
_KINDS_MAX = 1024  # distinct spellings remembered (emptied when full: bounded memory)
_kinds: dict[bytes, int] = {}


def classify(lname: bytes) -> int:
    """The kind of a lower-cased field name."""
    if lname == b"connection":
        return CONNECTION
    if lname == b"expect":
        return EXPECT
    if lname in HOP_BY_HOP or lname.startswith(PROXY_PREFIX):
        return HOP
    if lname.startswith(APITALLY_PREFIX):
        return APITALLY
    if lname in FORWARDED_REWRITTEN:
        return FORWARDED
    if lname in CLIENT_ADDRESS_CLAIMS or lname.startswith(b"x-forwarded-"):
        return CLAIM
    return {b"host": HOST, b"content-length": LENGTH, b"date": DATE}.get(lname, KEEP)


def kind_of(name: bytes) -> int:
    kind = _kinds.get(name)
    if kind is None:
        kind = classify(name.lower())
        if len(_kinds) >= _KINDS_MAX:
            _kinds.clear()
        _kinds[name] = kind
    return kind


def _trusted_claims(raw: RawHeaders) -> tuple[list[bytes], bytes | None, bytes | None]:
    """A trusted hop's X-Forwarded-For chain and first X-Forwarded-Proto/-Host values."""
    chain: list[bytes] = []
    proto: bytes | None = None
    host: bytes | None = None
    for name, value in raw:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            chain.append(value)
        elif lname == b"x-forwarded-proto":
            proto = proto or value
        elif lname == b"x-forwarded-host":
            host = host or value
    return chain, proto, host


def request_head(
    method: str,
    target: bytes,
    raw: RawHeaders,
    *,
    peer: str,
    scheme: str = "http",
    trusted: bool = False,
    authority: bytes | None = None,
    chunked: bool = False,
    default_host: bytes = b"localhost",
) -> bytes:
    """The request head for the upstream, as bytes, in one pass over the client's lines.

    `target` is the origin-form target the upstream gets (base path already in front);
    `authority` is an absolute-form target's host[:port], which replaces Host;
    `chunked` re-frames the body (the client's Transfer-Encoding is hop-by-hop);
    `default_host` is sent when the client sent no Host (HTTP/1.0).
    """
    out = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    try:
        host = _request_fields(out, raw, trusted, authority, None)
    except _NamesMore:
        # A Connection header names more fields: the rare second pass, dropping them too.
        out = out[:4]
        host = _request_fields(out, raw, trusted, authority, connection_tokens(raw))
    if host is None:
        host = authority
        out += (b"Host: ", authority or default_host, CRLF)
    if chunked:
        out.append(CHUNKED)
    chain, fwd_proto, fwd_host = _trusted_claims(raw) if trusted else ([], None, None)
    chain.append(peer.encode("ascii"))
    out += (b"X-Forwarded-For: ", b", ".join(chain), CRLF)
    out += (b"X-Forwarded-Proto: ", fwd_proto or scheme.encode("ascii"), CRLF)
    fwd_host = fwd_host or host
    if fwd_host:
        out += (b"X-Forwarded-Host: ", fwd_host, CRLF)
    out.append(CRLF)
    return b"".join(out)


def _request_fields(
    out: list[bytes],
    raw: RawHeaders,
    trusted: bool,
    authority: bytes | None,
    extra: frozenset[bytes] | None,
) -> bytes | None:
    """Append the forwarded fields to `out`; returns the Host sent (None: none). Raises
    _NamesMore when a Connection header names more fields and `extra` was not given."""
    kinds = _kinds
    host: bytes | None = None
    for name, value in raw:
        kind = kinds.get(name)
        if kind is None:
            kind = kind_of(name)
        if kind in _KEPT:
            # Content-Length: the parser refused duplicates and bad values, so the one
            # left is the body's real length (a chunked body cannot carry one).
            if extra and name.lower() in extra:
                continue
        elif kind == HOST:
            if authority is not None:
                value = authority
            host = value
        elif kind == CLAIM:
            if not trusted or (extra and name.lower() in extra):
                continue
        elif kind == CONNECTION:
            if extra is None and _names_more(value):
                raise _NamesMore
            continue
        else:
            continue  # hop-by-hop, Expect, X-Apitally-*, X-Forwarded-For/-Proto/-Host
        out += (name, SEP, value, CRLF)
    return host


class ResponseFields:
    """A response's header lines as the client should get them, and what was taken out."""

    __slots__ = ("apitally", "has_date", "has_length", "lines")

    def __init__(
        self,
        lines: list[bytes],
        apitally: dict[str, str] | None,
        has_length: bool,
        has_date: bool,
    ) -> None:
        self.lines = lines  # name, ": ", value, CRLF, … ready for b"".join
        self.apitally = apitally  # lower-cased X-Apitally-* names → values (str)
        self.has_length = has_length  # the upstream framed the body with Content-Length
        self.has_date = has_date


def response_fields(raw: RawHeaders) -> ResponseFields:
    """Filter an upstream response head: hop-by-hop dropped, X-Apitally-* taken out.

    X-Apitally-* values are decoded as aiohttp decodes header values (UTF-8, bytes
    that are not kept as surrogate escapes), which is what the meter expects.
    """
    try:
        return _response_fields(raw, None)
    except _NamesMore:  # a Connection header names more fields: drop those too
        return _response_fields(raw, connection_tokens(raw))


def _response_fields(raw: RawHeaders, extra: frozenset[bytes] | None) -> ResponseFields:
    kinds = _kinds
    lines: list[bytes] = []
    apitally: dict[str, str] | None = None
    has_length = has_date = False
    for name, value in raw:
        kind = kinds.get(name)
        if kind is None:
            kind = kind_of(name)
        if kind == APITALLY:
            if apitally is None:
                apitally = {}
            apitally[name.lower().decode("ascii", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
            continue
        if kind == HOP:
            continue
        if kind == CONNECTION:
            if extra is None and _names_more(value):
                raise _NamesMore
            continue
        if extra and name.lower() in extra:
            continue
        if kind == LENGTH:
            has_length = True
        elif kind == DATE:
            has_date = True
        lines += (name, SEP, value, CRLF)
    return ResponseFields(lines, apitally, has_length, has_date)


def interim_head(status: int, reason: str, raw: RawHeaders) -> bytes:
    """An interim answer (103 Early Hints…) for the client: hop-by-hop and X-Apitally-* out."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("utf-8", "surrogateescape"))]
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname.startswith(PROXY_PREFIX):
            continue
        if lname.startswith(APITALLY_PREFIX):
            continue
        out += (name, SEP, value, CRLF)
    out.append(CRLF)
    return b"".join(out)


def header_bytes(raw: RawHeaders) -> int:
    """Total bytes of the fields' names and values (the 431 limit's measure)."""
    return sum(len(name) + len(value) for name, value in raw)


def find(raw: RawHeaders, lname: bytes) -> bytes | None:
    """The first value of a field (`lname` lower-cased), or None."""
    n = len(lname)
    for name, value in raw:
        if len(name) == n and name.lower() == lname:
            return value
    return None


def status_line(version: tuple[int, int], status: int, reason: str) -> bytes:
    return b"HTTP/%d.%d %d %s\r\n" % (
        version[0],
        version[1],
        status,
        reason.encode("utf-8", "surrogateescape"),
    )


class _DateLine:
    """`Date: …\\r\\n` for the current second, formatted once per second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = 0
        self.line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + CRLF
            self.second = now
        return self.line


# RFC 9110 §6.6.1: a proxy adds Date to a response that has none.
date_line = _DateLine()
