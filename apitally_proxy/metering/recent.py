"""The last minutes of traffic in ten-second slots, for the admin dashboard.

Slots are numbered by wall-clock time (`int(time.time()) // SLOT_SECONDS`), so the
slots of several workers line up and add element by element. Everything is
bounded: `KEEP_SLOTS` slots, and per slot at most `MAX_KEYS` endpoints, consumers
and validation errors (past that, counted under one overflow key). The hot path
only increments ints in lists: it reads no clock, the worker calls `advance` every
second to move on to the next slot.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

SLOT_SECONDS = 10
KEEP_SLOTS = 60  # ten minutes
MAX_KEYS = 100  # endpoints, consumers and validation errors per slot
MAX_NAMES = 1000
OTHER_ENDPOINT = "* /{other}"
OTHER_CONSUMER = "(other consumers)"

# Response-time buckets for percentiles: 0.5 ms to about 60 s, each bound 40 % above
# the last, so an interpolated estimate is within about 20 % of the true value.
LATENCY_BOUNDS: tuple[float, ...] = tuple(0.0005 * 1.4**i for i in range(36))

# An endpoint's list: counts, then the latency buckets (the last is "over the top").
REQUESTS, CLIENT_ERRORS, SERVER_ERRORS, DURATION_SUM, SIZE_SUM = range(5)
BUCKETS_AT = 5
ENDPOINT_FIELDS = BUCKETS_AT + len(LATENCY_BOUNDS) + 1
CONSUMER_FIELDS = 4  # requests, 4xx, 5xx, duration sum


class _Slot:
    __slots__ = ("consumers", "endpoints", "number", "unmatched", "validation")

    def __init__(self, number: int) -> None:
        self.number = number
        self.endpoints: dict[str, list[float]] = {}
        self.consumers: dict[str, list[float]] = {}
        self.validation: dict[str, int] = {}
        self.unmatched = 0


def _row(table: dict[str, list[float]], key: str, width: int, overflow_key: str) -> list[float]:
    row = table.get(key)
    if row is None:
        if len(table) >= MAX_KEYS:
            key = overflow_key
            row = table.get(key)
        if row is None:
            row = table[key] = [0] * width
    return row


class RecentWindow:
    """Per-slot counters of the last KEEP_SLOTS slots; one `observe` per metered request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._current: _Slot | None = None
        # The latest name and group each consumer identifier was given.
        self.names: dict[str, tuple[str | None, str | None]] = {}

    def advance(self) -> None:
        """Move to the slot of the clock's current time (a timer calls this each second)."""
        self._current = self._slot()

    def _slot(self) -> _Slot:
        number = int(self._clock()) // SLOT_SECONDS
        slot = self._current
        if slot is None or slot.number != number:
            slot = self._slots.get(number)
            if slot is None:
                slot = self._slots[number] = _Slot(number)
                for old in [n for n in self._slots if n <= number - KEEP_SLOTS]:
                    del self._slots[old]
            self._current = slot
        return slot

    def observe(
        self,
        method: str,
        template: str,
        status: int,
        consumer: str | None,
        seconds: float,
        size: int,
    ) -> None:
        slot = self._current or self._slot()
        key = method + " " + template
        row = slot.endpoints.get(key)
        if row is None:
            row = _row(slot.endpoints, key, ENDPOINT_FIELDS, OTHER_ENDPOINT)
        row[REQUESTS] += 1
        row[DURATION_SUM] += seconds
        row[SIZE_SUM] += size
        row[BUCKETS_AT + bisect_left(LATENCY_BOUNDS, seconds)] += 1
        errors = 0 if status < 400 else CLIENT_ERRORS if status < 500 else SERVER_ERRORS
        if errors:
            row[errors] += 1
        if consumer is not None:
            crow = slot.consumers.get(consumer)
            if crow is None:
                crow = _row(slot.consumers, consumer, CONSUMER_FIELDS, OTHER_CONSUMER)
            crow[REQUESTS] += 1
            crow[DURATION_SUM] += seconds
            if errors:
                crow[errors] += 1

    def observe_unmatched(self) -> None:
        (self._current or self._slot()).unmatched += 1

    def observe_validation_errors(
        self, method: str, template: str, errors: Iterable[tuple[Any, str, str]]
    ) -> None:
        table = (self._current or self._slot()).validation
        for loc, msg, typ in errors:
            where = ".".join(str(part) for part in loc) if isinstance(loc, list | tuple) else loc
            key = "\t".join((method, template, str(where), msg, typ))
            if key not in table and len(table) >= MAX_KEYS:
                continue
            table[key] = table.get(key, 0) + 1

    def name_consumer(self, identifier: str, name: str | None, group: str | None) -> None:
        if identifier in self.names or len(self.names) < MAX_NAMES:
            self.names[identifier] = (name, group)

    def snapshot(self) -> dict[str, Any]:
        """Plain lists and dicts (JSON-ready; another worker's adds with `merge`)."""
        self.advance()  # drops slots that have aged out
        return {
            "slot_seconds": SLOT_SECONDS,
            "slots": {
                str(n): {
                    "endpoints": {k: list(v) for k, v in s.endpoints.items()},
                    "consumers": {k: list(v) for k, v in s.consumers.items()},
                    "validation": dict(s.validation),
                    "unmatched": s.unmatched,
                }
                for n, s in self._slots.items()
            },
            "names": {k: list(v) for k, v in self.names.items()},
        }


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add another worker's snapshot to `into` (both from `RecentWindow.snapshot`)."""
    slots = into.setdefault("slots", {})
    for number, theirs in other.get("slots", {}).items():
        ours = slots.get(number)
        if ours is None:
            slots[number] = theirs
            continue
        for table in ("endpoints", "consumers"):
            mine = ours[table]
            for key, values in theirs.get(table, {}).items():
                row = mine.get(key)
                if row is None:
                    mine[key] = list(values)
                else:
                    for i, v in enumerate(values):
                        row[i] += v
        for key, n in theirs.get("validation", {}).items():
            ours["validation"][key] = ours["validation"].get(key, 0) + n
        ours["unmatched"] += theirs.get("unmatched", 0)
    into.setdefault("names", {}).update(other.get("names", {}))


def quantile(buckets: list[float], q: float) -> float | None:
    """The q-quantile (seconds) of latency bucket counts, interpolated inside its bucket."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            low = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
            high = LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1]
            return low + (high - low) * ((rank - seen) / n)
        seen += n
    return LATENCY_BOUNDS[-1]
