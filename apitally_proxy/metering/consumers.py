"""Consumers as the app names them in its X-Apitally-Consumer* response headers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from apitally_proxy.text import header_text, strip_controls

MAX_IDENTIFIER = 128
MAX_NAME = 64


@dataclass(frozen=True, slots=True)
class Consumer:
    identifier: str
    name: str | None = None
    group: str | None = None


def _clean(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    # Raw non-UTF-8 bytes (a Latin-1 "é" from uvicorn) become their characters.
    value = header_text(value)
    if "%" in value:
        # Non-ASCII values arrive percent-encoded UTF-8; bad sequences become U+FFFD.
        value = unquote(value, encoding="utf-8", errors="replace")
    # Decoded or not, CR/LF/NUL and other controls are no part of an id or a name.
    value = strip_controls(value).strip()[:limit].strip()
    return value or None


def parse_consumer(
    identifier: str | None, name: str | None = None, group: str | None = None
) -> Consumer | None:
    """Build a consumer from raw header values; None when there is no usable identifier."""
    ident = _clean(identifier, MAX_IDENTIFIER)
    if ident is None:
        return None
    return Consumer(ident, _clean(name, MAX_NAME), _clean(group, MAX_NAME))


class ConsumerCache:
    """`parse_consumer` remembered for the raw header values seen lately: most requests
    come from a few consumers, whose values need not be cleaned again each time.

    Bounded in entries and in what it pins: values longer than CACHED_VALUES characters
    in all are parsed every time; past `size` entries it starts afresh.
    """

    CACHED_VALUES = 512

    def __init__(self, size: int = 1024) -> None:
        self._seen: dict[tuple[str | None, str | None, str | None], Consumer | None] = {}
        self._size = size

    def parse(
        self, identifier: str | None, name: str | None = None, group: str | None = None
    ) -> Consumer | None:
        key = (identifier, name, group)
        seen = self._seen
        found = seen.get(key, _UNSEEN)
        if found is not _UNSEEN:
            return found  # type: ignore[return-value]
        consumer = parse_consumer(identifier, name, group)
        if len(identifier or "") + len(name or "") + len(group or "") <= self.CACHED_VALUES:
            if len(seen) >= self._size:
                seen.clear()
            seen[key] = consumer
        return consumer


_UNSEEN = object()


class ConsumerRegistry:
    """Remembers consumers' names and groups; reports new or changed ones once.

    Bounded: past `max_size` the oldest remembered consumers are forgotten (and
    would be re-reported if seen again, which the hub treats as an update).
    """

    def __init__(self, max_size: int = 10_000) -> None:
        self._known: dict[str, tuple[str | None, str | None]] = {}
        self._updated: set[str] = set()
        self._max_size = max_size

    def add_or_update(self, consumer: Consumer) -> None:
        if consumer.name is None and consumer.group is None:
            return
        ident = consumer.identifier
        known = self._known.get(ident)
        if known is None:
            if len(self._known) >= self._max_size:
                oldest = next(iter(self._known))
                del self._known[oldest]
                self._updated.discard(oldest)
            self._known[ident] = (consumer.name, consumer.group)
            self._updated.add(ident)
            return
        name = consumer.name if consumer.name is not None else known[0]
        group = consumer.group if consumer.group is not None else known[1]
        if (name, group) != known:
            self._known[ident] = (name, group)
            self._updated.add(ident)

    def peek_updated_consumers(self) -> list[dict[str, Any]]:
        """New or changed consumers so far, without marking them reported."""
        return list(self.iter_updated_consumers())

    def iter_updated_consumers(self) -> Iterator[dict[str, Any]]:
        """`peek_updated_consumers`, one row at a time (read it to the end before the
        registry changes again)."""
        return self._rows(self._updated)

    def take_updated_consumers(self) -> Iterator[dict[str, Any]]:
        """`get_and_reset_updated_consumers`, one row at a time (marked reported now)."""
        updated, self._updated = self._updated, set()
        return self._rows(updated)

    def _rows(self, idents: set[str]) -> Iterator[dict[str, Any]]:
        known = self._known
        for ident in idents:
            entry = known.get(ident)
            if entry is not None:  # (forgotten since, when not read at once)
                yield {"identifier": ident, "name": entry[0], "group": entry[1]}

    def get_and_reset_updated_consumers(self) -> list[dict[str, Any]]:
        """The `consumers` list of a sync payload: new or changed since the last call."""
        out = self.peek_updated_consumers()
        self._updated = set()
        return out
