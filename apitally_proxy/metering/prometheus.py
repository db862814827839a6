"""Lifetime latency and size histograms per (method, route template, status), for `/metrics`.

Fixed Prometheus-style buckets, cumulative at scrape time. Label sets are bounded:
templates are already capped per method, and past `max_series` new combinations
are counted under the route `/{other}`, so a scrape stays small whatever the traffic.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
OTHER_ROUTE = "/{other}"


class _Series:
    __slots__ = ("duration", "duration_sum", "size", "size_sum")

    def __init__(self) -> None:
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.size = [0] * (len(SIZE_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.size_sum = 0


class RouteHistograms:
    """Response time and response size per (method, template, status), never reset."""

    def __init__(self, max_series: int = 2000) -> None:
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._max = max_series
        self.overflow = 0

    def observe(self, method: str, template: str, status: int, seconds: float, size: int) -> None:
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self._max:
                self.overflow += 1
                key = (method, OTHER_ROUTE, status)
                series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series()
        series.duration[bisect_left(DURATION_BUCKETS, seconds)] += 1
        series.duration_sum += seconds
        series.size[bisect_left(SIZE_BUCKETS, size)] += 1
        series.size_sum += size

    def snapshot(self) -> dict[str, list[Any]]:
        """`"METHOD STATUS route"` -> [duration counts…, duration sum, size counts…, size sum]:
        plain lists, so other workers' snapshots can be summed element by element."""
        return {
            f"{method} {status} {template}": [
                *s.duration,
                s.duration_sum,
                *s.size,
                s.size_sum,
            ]
            for (method, template, status), s in self._series.items()
        }


def unpack(key: str, values: list[Any]) -> tuple[list[str], list[int], float, list[int], int]:
    """A snapshot entry as (labels, duration counts, duration sum, size counts, size sum)."""
    method, status, template = key.split(" ", 2)
    n = len(DURATION_BUCKETS) + 1
    m = len(SIZE_BUCKETS) + 1
    return (
        [method, template, status],
        values[:n],
        values[n],
        values[n + 1 : n + 1 + m],
        values[n + 1 + m],
    )


def merge(into: dict[str, list[Any]], other: dict[str, list[Any]]) -> None:
    """Add another worker's snapshot to `into`, element by element."""
    for key, values in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = list(values)
        else:
            into[key] = [a + b for a, b in zip(mine, values, strict=True)]
