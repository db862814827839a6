"""Request aggregates for OpenTelemetry export (Apitally 1.x): exponential histograms.

Keyed by (consumer, method, route template, status) like the hub's counters, but
each key holds three base-2 exponential histograms at a fixed scale of 3 (bucket
boundaries 2**(i/8)): duration in seconds, request and response body size in
bytes. The bucket rule is the one apitally 1.0.0 and OpenTelemetry use, so the
same values land in the same buckets: bucket i holds (2**(i/8), 2**((i+1)/8)],
exact powers of two close the bucket below them, zeros are counted apart.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any, overload

from apitally_proxy.aio import Pause
from apitally_proxy.metering.requests import KeyedCounter, RequestKey

SCALE = 3
_SCALE_FACTOR = math.ldexp(1 / math.log(2), SCALE)


def bucket_index(value: float) -> int:
    """The bucket of a positive value at scale 3.

    >>> bucket_index(1.0), bucket_index(1.05), bucket_index(2.0), bucket_index(0.001)
    (-1, 0, 7, -80)
    """
    mantissa, exponent = math.frexp(value)
    if mantissa == 0.5:  # an exact power of two closes the bucket below it
        return ((exponent - 1) << SCALE) - 1
    return math.floor(math.log(value) * _SCALE_FACTOR)


# The three histograms of a key: the request's duration in seconds, the request and
# the response body size in bytes. Their buckets share one dict, keyed
# `index << 2 | kind` (negative indexes too: `key >> 2` floors back to the index).
DURATION, REQUEST_SIZE, RESPONSE_SIZE = 0, 1, 2
_KINDS = ((DURATION, "duration"), (REQUEST_SIZE, "request_size"), (RESPONSE_SIZE, "response_size"))
_KIND_BITS = 2
_KIND_MASK = 3


class _Stat:
    """One histogram's count, sum, min, max and zero count.

    While every value it saw is the same one (`spread` false: under hostile
    cardinality most keys see one request, and many answers have one size), its
    bucket follows from that value and is not in the point's dict; the first other
    value puts the earlier ones there.
    """

    __slots__ = ("count", "max", "min", "spread", "sum", "zeros")

    def __init__(self) -> None:
        self.count = self.zeros = 0
        self.sum = 0.0  # a float, as OTLP has it (sizes stay exact up to 2**53 bytes)
        self.min = math.inf
        self.max = -math.inf
        self.spread = False

    def record(self, value: float, point: _Point, kind: int) -> None:
        self.count += 1
        self.sum += value
        if self.count == 1:
            self.min = self.max = value
            if value == 0:
                self.zeros = 1
            return
        if not self.spread:
            if value == self.min:  # the same value again: its bucket is still implied
                if value == 0:
                    self.zeros += 1
                return
            point.spread(self, kind, self.count - 1)
        if value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value
        if value == 0:
            self.zeros += 1
        else:
            point.add(kind, bucket_index(value), 1)


class _Point:
    """One key's three exponential histograms: a `_Stat` each (sizes only once one is
    known) and their buckets in one dict, made when a first histogram has two values."""

    __slots__ = ("buckets", "duration", "request_size", "response_size")

    def __init__(self) -> None:
        self.duration = _Stat()
        self.request_size: _Stat | None = None
        self.response_size: _Stat | None = None
        self.buckets: dict[int, int] | None = None

    def record(self, duration: float, request_size: int | None, response_size: int | None) -> None:
        self.duration.record(duration, self, DURATION)
        if request_size is not None and request_size >= 0:
            stat = self.request_size
            if stat is None:
                stat = self.request_size = _Stat()
            stat.record(request_size, self, REQUEST_SIZE)
        if response_size is not None and response_size >= 0:
            stat = self.response_size
            if stat is None:
                stat = self.response_size = _Stat()
            stat.record(response_size, self, RESPONSE_SIZE)

    def add(self, kind: int, index: int, n: int) -> None:
        buckets = self.buckets
        if buckets is None:
            buckets = self.buckets = {}
        key = index << _KIND_BITS | kind
        buckets[key] = buckets.get(key, 0) + n

    def spread(self, stat: _Stat, kind: int, n: int) -> None:
        """`stat`'s `n` values so far, all one value, go into the dict as its bucket."""
        stat.spread = True
        if n and stat.min != 0:  # zeros are counted apart
            self.add(kind, bucket_index(stat.min), n)

    def counts(self, stat: _Stat, kind: int) -> dict[int, int]:
        """`stat`'s buckets: index -> count."""
        if not stat.spread:
            n = stat.count - stat.zeros
            return {bucket_index(stat.min): n} if n else {}
        return {
            key >> _KIND_BITS: n
            for key, n in (self.buckets or {}).items()
            if key & _KIND_MASK == kind
        }

    def merge(self, other: _Point) -> None:
        for kind, name in _KINDS:
            theirs: _Stat | None = getattr(other, name)
            if theirs is None:
                continue
            mine: _Stat | None = getattr(self, name)
            if mine is None:
                mine = _Stat()
                setattr(self, name, mine)
            if theirs.count == 0:
                continue
            counts = other.counts(theirs, kind)
            if mine.count and not mine.spread and not theirs.spread and theirs.min == mine.min:
                # One value on both sides, the same one: still one implied bucket.
                mine.count += theirs.count
                mine.sum += theirs.sum
                mine.zeros += theirs.zeros
                continue
            if not mine.spread:
                self.spread(mine, kind, mine.count)
            mine.count += theirs.count
            mine.sum += theirs.sum
            mine.zeros += theirs.zeros
            mine.min = min(mine.min, theirs.min)
            mine.max = max(mine.max, theirs.max)
            for index, n in counts.items():
                self.add(kind, index, n)

    def histogram(self, stat: _Stat | None, kind: int) -> dict[str, Any] | None:
        """One histogram, JSON-able (dense buckets from `offset`); None when empty."""
        if stat is None or not stat.count:
            return None
        offset = 0
        dense: list[int] = []
        if not stat.spread:  # one value: one bucket, unless it is zero
            n = stat.count - stat.zeros
            if n:
                offset = bucket_index(stat.min)
                dense = [n]
        else:
            counts = self.counts(stat, kind)
            if counts:
                offset = min(counts)
                dense = [0] * (max(counts) - offset + 1)
                for index, n in counts.items():
                    dense[index - offset] = n
        return {
            "count": stat.count,
            "sum": stat.sum,
            "min": stat.min,
            "max": stat.max,
            "zero_count": stat.zeros,
            "offset": offset,
            "buckets": dense,
        }


class HistogramCounter(KeyedCounter[_Point]):
    """Per-key histograms (OpenTelemetry export), with `RequestCounter`'s contract."""

    def _new(self) -> _Point:
        return _Point()

    def _merge(self, into: _Point, other: _Point) -> None:
        into.merge(other)

    def _observe(
        self,
        agg: _Point,
        response_time: float,
        request_size: int | None,
        response_size: int | None,
    ) -> None:
        agg.record(response_time if response_time > 0 else 0.0, request_size, response_size)

    def peek_requests(self) -> DeferredRows:
        """The rows so far, leaving the counter as it is (for checkpoints): made on the
        loop by `DeferredRows.build`."""
        return DeferredRows(list(self._aggregates.items()))

    def get_and_reset_requests(self) -> DeferredRows:
        """The rows of the interval, made when read; the counter starts empty again."""
        return DeferredRows(self._take())


def _row(key: RequestKey, p: _Point) -> dict[str, Any]:
    consumer, method, path, status = key
    return {
        "consumer": consumer,
        "method": method,
        "path": path,
        "status_code": status,
        "duration": p.histogram(p.duration, DURATION),
        "request_size": p.histogram(p.request_size, REQUEST_SIZE),
        "response_size": p.histogram(p.response_size, RESPONSE_SIZE),
    }


class DeferredRows(Sequence[dict[str, Any]]):
    """An interval's OTLP rows, built when read instead of all at once on the loop.

    Taken keys (`live` false) belong to nobody else: their rows are built where they
    are read, in the thread that encodes the exports. Live keys (a checkpoint of the
    open interval) change with every request, so `build()` makes their rows on the
    loop first, a chunk at a time, yielding between chunks: tens of thousands of keys
    no longer hold up requests for a fifth of a second.
    """

    CHUNK = 256

    def __init__(self, keys: list[tuple[RequestKey, _Point]] | dict[RequestKey, _Point]) -> None:
        """`keys`: a live counter's (key, point) pairs, or a taken counter's dict (listed
        only when first read, off the loop too)."""
        self._keys = keys
        self._rows: list[dict[str, Any]] | None = None
        self.live = isinstance(keys, list)

    def _items(self) -> list[tuple[RequestKey, _Point]]:
        keys = self._keys
        if isinstance(keys, dict):
            keys = self._keys = list(keys.items())
        return keys

    async def build(
        self, problems: list[int] | None = None, pause: Pause | None = None
    ) -> DeferredRows:
        """Make the rows of live keys on the loop (taken keys: nothing to do here),
        giving it its turn between chunks (`pause`, by default `asyncio.sleep(0)`)."""
        if not self.live:
            return self
        rows: list[dict[str, Any]] = []
        items = self._items()
        for first in range(0, len(items), self.CHUNK):
            rows += [_row(key, p) for key, p in items[first : first + self.CHUNK]]
            await (pause() if pause is not None else asyncio.sleep(0))
        self._rows = rows
        return self

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        rows = self._rows
        if rows is not None:
            return rows[index]
        if self.live:
            raise RuntimeError("rows of live keys are read after build()")
        if isinstance(index, slice):
            return [_row(key, p) for key, p in self._items()[index]]
        return _row(*self._items()[index])
