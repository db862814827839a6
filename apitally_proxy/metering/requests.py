"""Request aggregates keyed by (consumer, method, path template, status code)."""

from __future__ import annotations

import math
from typing import Any, Generic, TypeVar

import orjson

from apitally_proxy.aio import Pause
from apitally_proxy.text import json_rows_yielding

RequestKey = tuple[str | None, str, str, int]
A = TypeVar("A")


# The three histograms of an aggregate share one dict: key = bin << 2 | kind. Under hostile
# cardinality most keys see one request, and three dicts per key were most of its size.
RESPONSE_TIME, REQUEST_SIZE, RESPONSE_SIZE = 0, 1, 2
_KIND_BITS = 2
_KIND_MASK = 3


class _Aggregate:
    __slots__ = ("bins", "count", "request_size_sum", "response_size_sum")

    def __init__(self) -> None:
        self.count = 0
        self.request_size_sum = 0
        self.response_size_sum = 0
        # (bin << 2 | kind) -> count: response times in 10 ms bins, sizes in 1 KB bins.
        self.bins: dict[int, int] = {}


class KeyedCounter(Generic[A]):
    """Aggregates keyed by (consumer, method, path template, status code), with the
    consumer cap both protocols share: distinct consumers per interval are capped so
    hostile identifiers cannot grow memory; past the cap a request is counted without
    a consumer and the overflow is counted. Subclasses say what one key aggregates.
    """

    def __init__(self, max_consumers: int = 10_000) -> None:
        self._aggregates: dict[RequestKey, A] = {}
        self._consumers: set[str] = set()
        self._max_consumers = max_consumers
        self.consumer_overflow = 0

    def _new(self) -> A:
        raise NotImplementedError

    def _observe(
        self, agg: A, response_time: float, request_size: int | None, response_size: int | None
    ) -> None:
        raise NotImplementedError

    def add_request(
        self,
        consumer: str | None,
        method: str,
        path: str,
        status_code: int,
        response_time: float,
        request_size: int | None = None,
        response_size: int | None = None,
    ) -> None:
        """Record one request; response_time in seconds, sizes in bytes (None = unknown)."""
        method = method.upper()
        if method == "OPTIONS":
            return
        if consumer is not None and consumer not in self._consumers:
            if len(self._consumers) >= self._max_consumers:
                self.consumer_overflow += 1
                consumer = None
            else:
                self._consumers.add(consumer)
        key = (consumer, method, path, status_code)
        agg = self._aggregates.get(key)
        if agg is None:
            agg = self._aggregates[key] = self._new()
        self._observe(agg, response_time, request_size, response_size)

    def _merge(self, into: A, other: A) -> None:
        raise NotImplementedError

    def rename_paths(self, renames: dict[str, str]) -> None:
        """Re-key the open interval by renamed templates, merging keys that meet."""
        merged: dict[RequestKey, A] = {}
        for (consumer, method, path, status), agg in self._aggregates.items():
            key = (consumer, method, renames.get(path, path), status)
            have = merged.get(key)
            if have is None:
                merged[key] = agg
            else:
                self._merge(have, agg)
        self._aggregates = merged

    def __len__(self) -> int:
        return len(self._aggregates)

    def _take(self) -> dict[RequestKey, A]:
        """The interval's aggregates; the counter starts empty again."""
        aggregates, self._aggregates = self._aggregates, {}
        self._consumers = set()
        return aggregates


class RequestCounter(KeyedCounter[_Aggregate]):
    """Counts requests exactly as the official Apitally 0.x clients do (hub protocol).

    Response times go into 10 ms bins (milliseconds rounded down to 10),
    sizes into 1 KB bins (bytes // 1000); sums keep the raw bytes.
    """

    def _new(self) -> _Aggregate:
        return _Aggregate()

    def _observe(
        self,
        agg: _Aggregate,
        response_time: float,
        request_size: int | None,
        response_size: int | None,
    ) -> None:
        agg.count += 1
        bins = agg.bins
        # Same arithmetic as the official clients, so float edge cases land in the same bin.
        rt_bin = math.floor(response_time / 0.01) * 10 if response_time > 0 else 0
        key = rt_bin << _KIND_BITS  # | RESPONSE_TIME (0)
        bins[key] = bins.get(key, 0) + 1
        if request_size is not None and request_size >= 0:
            agg.request_size_sum += request_size
            key = (request_size // 1000) << _KIND_BITS | REQUEST_SIZE
            bins[key] = bins.get(key, 0) + 1
        if response_size is not None and response_size >= 0:
            agg.response_size_sum += response_size
            key = (response_size // 1000) << _KIND_BITS | RESPONSE_SIZE
            bins[key] = bins.get(key, 0) + 1

    def _merge(self, into: _Aggregate, other: _Aggregate) -> None:
        into.count += other.count
        into.request_size_sum += other.request_size_sum
        into.response_size_sum += other.response_size_sum
        mine = into.bins
        for k, n in other.bins.items():
            mine[k] = mine.get(k, 0) + n

    def peek_requests(self) -> list[dict[str, Any]]:
        """The `requests` rows so far, leaving the counter as it is (for checkpoints)."""
        return self._rows(self._aggregates)

    def get_and_reset_requests(self) -> list[dict[str, Any]]:
        """The `requests` list of a sync payload; the counter starts empty again."""
        return self._rows(self._take())

    def live_requests(self) -> LiveRows:
        """The rows so far, for a checkpoint: encoded when `LiveRows.build` is awaited."""
        return LiveRows(list(self._aggregates.items()))

    def take_live(self) -> LiveRows:
        """The interval's rows, for a sync payload: encoded when `LiveRows.build` is
        awaited; the counter starts empty again now."""
        return LiveRows(list(self._take().items()))

    @staticmethod
    def _rows(aggregates: dict[RequestKey, _Aggregate]) -> list[dict[str, Any]]:
        return [row(key, agg) for key, agg in aggregates.items()]


def row(key: RequestKey, agg: _Aggregate) -> dict[str, Any]:
    """One `requests` row of a hub sync payload, as the official clients shape it."""
    consumer, method, path, status = key
    hists: tuple[dict[str, int], dict[str, int], dict[str, int]] = ({}, {}, {})
    for k, n in agg.bins.items():
        hists[k & _KIND_MASK][str(k >> _KIND_BITS)] = n
    return {
        "consumer": consumer,
        "method": method,
        "path": path,
        "status_code": status,
        "request_count": agg.count,
        "request_size_sum": agg.request_size_sum,
        "response_size_sum": agg.response_size_sum,
        "response_times": hists[RESPONSE_TIME],
        "request_sizes": hists[REQUEST_SIZE],
        "response_sizes": hists[RESPONSE_SIZE],
    }


class LiveRows:
    """An interval's `requests` rows (a checkpoint's or a sync's), as one pre-serialized
    JSON array made by `build()` on the loop, a chunk at a time, letting requests
    through between chunks: tens of thousands of keys no longer stop the loop for
    50-150 ms. The keys are listed when taken; each row reads its aggregate as it is
    then (an open interval's go on counting meanwhile)."""

    def __init__(self, items: list[tuple[RequestKey, _Aggregate]]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    async def build(
        self, problems: list[int] | None = None, pause: Pause | None = None
    ) -> list[Any] | orjson.Fragment:
        """The rows' JSON; `problems[0]` grows by the values repaired or dropped."""
        return await json_rows_yielding(
            (row(key, agg) for key, agg in self._items), problems=problems, pause=pause
        )
