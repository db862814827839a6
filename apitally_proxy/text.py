"""Header values made safe to aggregate, encode as JSON and show.

aiohttp hands header bytes that are not UTF-8 (HTTP's obs-text, e.g. a Latin-1
`é` that uvicorn writes for `"José"`) over as lone surrogates (surrogateescape).
Such a string cannot be encoded as JSON or UTF-8, so it must never reach an
aggregate: one of them used to make a whole interval's payload unencodable.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import orjson

# C0 controls, DEL and C1 controls: never part of an identifier or a name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def header_text(value: str) -> str:
    """A raw header value as real text: UTF-8 if the bytes are UTF-8, else Latin-1.

    >>> header_text("caf\\udce9")   # the byte 0xE9 as aiohttp passes it on
    'café'
    >>> header_text("caf\\udcc3\\udca9")   # UTF-8 bytes of é
    'café'
    """
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # Surrogates that are not escaped bytes (they cannot come off the wire).
        return _SURROGATE.sub("\ufffd", value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # every byte is a character in HTTP's legacy charset


def strip_controls(value: str) -> str:
    """Drop control characters (CR, LF, NUL, ESC…) and stray surrogates."""
    if value.isprintable():
        return value
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", value))


def _repair(value: Any, fixes: list[int]) -> Any:
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            fixes[0] += 1
            return strip_controls(header_text(value))
    if isinstance(value, dict):
        return {_repair(k, fixes): _repair(v, fixes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_repair(v, fixes) for v in value]
    return value


def _encodes(value: Any) -> bool:
    try:
        orjson.dumps(value)
        return True
    except TypeError:  # orjson.JSONEncodeError included
        return False


def dumps_lenient(payload: dict[str, Any]) -> tuple[bytes, int]:
    """JSON bytes of a payload, and how many of its values had to be repaired or dropped.

    Unencodable text is repaired (decoded as `header_text` would); a row that still
    cannot be encoded is dropped from its list alone, so one bad value never costs
    the rest of the payload.
    """
    try:
        return orjson.dumps(payload), 0
    except TypeError:
        pass
    fixes = [0]
    repaired = _repair(payload, fixes)
    if _encodes(repaired):
        return orjson.dumps(repaired), fixes[0]
    kept: dict[str, Any] = {}
    for key, value in repaired.items():
        if isinstance(value, list):
            rows = [row for row in value if _encodes(row)]
            fixes[0] += len(value) - len(rows)
            kept[key] = rows
        elif _encodes(value):
            kept[key] = value
        else:
            fixes[0] += 1
            kept[key] = None
    return orjson.dumps(kept), fixes[0]


# In aggregates whose rows came pre-serialized (`Meter.get_and_reset(serialized=True)`):
# how many values their encoding repaired or dropped. No part of a payload: the sync
# takes it out and hands it to the spool, which counts and reports it.
UNENCODABLE = "unencodable"


def json_rows(
    rows: Iterable[Any], chunk: int = 256, problems: list[int] | None = None
) -> list[Any] | orjson.Fragment:
    """A list of JSON-able rows as one pre-serialized JSON array, encoded `chunk` rows at
    a time (each chunk as `dumps_lenient` would: repaired, or the bad row dropped), so
    the whole list never exists as objects at once. `[]` when there are no rows.

    `problems[0]` (when given) grows by the values repaired or dropped, as
    `dumps_lenient` would have counted them in the whole list.
    """
    parts: list[bytes] = []
    fixes = 0
    for body, n in _chunk_bodies(rows, chunk):
        parts.append(body)
        fixes += n
    if problems is not None:
        problems[0] += fixes
    return _json_array(parts)


async def json_rows_yielding(
    rows: Iterable[Any],
    chunk: int = 256,
    problems: list[int] | None = None,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> list[Any] | orjson.Fragment:
    """`json_rows`, letting the event loop run between chunks (`pause`, by default
    `asyncio.sleep(0)`). `rows` must not iterate a dict that changes meanwhile: take
    a list of its items first."""
    parts: list[bytes] = []
    fixes = 0
    for body, n in _chunk_bodies(rows, chunk):
        parts.append(body)
        fixes += n
        await (pause() if pause is not None else asyncio.sleep(0))
    if problems is not None:
        problems[0] += fixes
    return _json_array(parts)


def _chunk_bodies(rows: Iterable[Any], chunk: int) -> Iterator[tuple[bytes, int]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            yield _rows_body(batch)
            batch = []
    if batch:
        yield _rows_body(batch)


def _json_array(parts: list[bytes]) -> list[Any] | orjson.Fragment:
    if not parts:
        return []
    return orjson.Fragment(b"[" + b",".join(p for p in parts if p) + b"]")


_ROWS_OPEN, _ROWS_CLOSE = b'{"r":[', b"]}"


def _rows_body(batch: list[Any]) -> tuple[bytes, int]:
    """The rows of one chunk, comma-separated, without the brackets; and the values
    repaired or dropped."""
    data, fixes = dumps_lenient({"r": batch})
    return data[len(_ROWS_OPEN) : -len(_ROWS_CLOSE)], fixes
