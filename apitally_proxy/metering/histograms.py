"""Request aggregates for OpenTelemetry export (Apitally 1.x): exponential histograms.

Keyed by (consumer, method, route template, status) like the hub's counters, but
each key holds three base-2 exponential histograms at a fixed scale of 3 (bucket
boundaries 2**(i/8)): duration in seconds, request and response body size in
bytes. The bucket rule is the one apitally 1.0.0 and OpenTelemetry use, so the
same values land in the same buckets: bucket i holds (2**(i/8), 2**((i+1)/8)],
exact powers of two close the bucket below them, zeros are counted apart.
"""

from __future__ import annotations

import math
from typing import Any

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


class Histogram:
    """One exponential histogram: count, sum, min, max, zero count and sparse buckets."""

    __slots__ = ("buckets", "count", "max", "min", "sum", "zero_count")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.zero_count = 0
        self.buckets: dict[int, int] = {}

    def record(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value == 0:
            self.zero_count += 1
        else:
            index = bucket_index(value)
            self.buckets[index] = self.buckets.get(index, 0) + 1

    def merge(self, other: Histogram) -> None:
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.zero_count += other.zero_count
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n

    def to_dict(self) -> dict[str, Any] | None:
        """JSON-able form (dense buckets from `offset`), or None when nothing was recorded."""
        if not self.count:
            return None
        out: dict[str, Any] = {
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "zero_count": self.zero_count,
            "offset": 0,
            "buckets": [],
        }
        if self.buckets:
            offset = min(self.buckets)
            dense = [0] * (max(self.buckets) - offset + 1)
            for index, n in self.buckets.items():
                dense[index - offset] = n
            out["offset"] = offset
            out["buckets"] = dense
        return out


class _Point:
    __slots__ = ("duration", "request_size", "response_size")

    def __init__(self) -> None:
        self.duration = Histogram()
        self.request_size = Histogram()
        self.response_size = Histogram()


class HistogramCounter(KeyedCounter[_Point]):
    """Per-key histograms (OpenTelemetry export), with `RequestCounter`'s contract."""

    def _new(self) -> _Point:
        return _Point()

    def _merge(self, into: _Point, other: _Point) -> None:
        into.duration.merge(other.duration)
        into.request_size.merge(other.request_size)
        into.response_size.merge(other.response_size)

    def _observe(
        self,
        agg: _Point,
        response_time: float,
        request_size: int | None,
        response_size: int | None,
    ) -> None:
        agg.duration.record(response_time if response_time > 0 else 0.0)
        if request_size is not None and request_size >= 0:
            agg.request_size.record(request_size)
        if response_size is not None and response_size >= 0:
            agg.response_size.record(response_size)

    def peek_requests(self) -> list[dict[str, Any]]:
        """The rows so far, leaving the counter as it is (for checkpoints)."""
        return self._rows(self._aggregates)

    def get_and_reset_requests(self) -> list[dict[str, Any]]:
        """The rows of the interval; the counter starts empty again."""
        return self._rows(self._take())

    @staticmethod
    def _rows(points: dict[RequestKey, _Point]) -> list[dict[str, Any]]:
        return [
            {
                "consumer": consumer,
                "method": method,
                "path": path,
                "status_code": status,
                "duration": p.duration.to_dict(),
                "request_size": p.request_size.to_dict(),
                "response_size": p.response_size.to_dict(),
            }
            for (consumer, method, path, status), p in points.items()
        ]
