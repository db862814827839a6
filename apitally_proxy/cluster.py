"""With --workers N, worker 0's admin endpoints report every worker.

Each other worker publishes its status as a small JSON file next to its instance
id every couple of seconds; worker 0 adds their counters to its own when the
admin endpoints are read (never on the request path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from apitally_proxy.aio import Background
from apitally_proxy.fileio import write_atomic
from apitally_proxy.metering.prometheus import merge as merge_histograms
from apitally_proxy.metering.recent import merge as merge_recent
from apitally_proxy.status import merge as merge_status

log = logging.getLogger("apitally_proxy")

PUBLISH_EVERY = 2.0
STALE_AFTER = 10.0  # a status file older than this belongs to a worker that is gone


def status_path(directory: Path, slot: int) -> Path:
    return directory / f"slot-{slot}.status.json"


class StatusPublisher:
    """Writes one worker's status file every PUBLISH_EVERY seconds; owned by the worker."""

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]) -> None:
        self._path = path
        self._status = status
        self._background = Background()

    def start(self) -> None:
        self._background.start(self._run(), "status-publisher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            snapshot = orjson.dumps(
                {**self._status(), "published_at": time.time()}, option=orjson.OPT_NON_STR_KEYS
            )
            try:
                await loop.run_in_executor(None, write_atomic, self._path, snapshot, False)
            except OSError as exc:
                log.warning("cannot publish worker status to %s: %s", self._path, exc)
            await asyncio.sleep(PUBLISH_EVERY)

    async def stop(self) -> None:
        await self._background.stop()
        with contextlib.suppress(OSError):
            self._path.unlink()


def merged_status(own: dict[str, Any], directory: Path, workers: int) -> dict[str, Any]:
    """`own` (worker 0's status) plus what the other workers published, field by field
    as `status.WorkerStatus` says; histograms and the dashboard window element-wise."""
    merged = {
        **own,
        "requests_by_status": {str(k): n for k, n in own["requests_by_status"].items()},
        "histograms": {k: list(v) for k, v in own.get("histograms", {}).items()},
    }
    if "recent" in own:  # the dashboard's view; a snapshot of its own, safe to add into
        merged["recent"] = own["recent"]
    seen = [own["worker_slot"]]
    now = time.time()
    for slot in range(workers):
        if slot == own["worker_slot"]:
            continue
        try:
            other = orjson.loads(status_path(directory, slot).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if now - other.get("published_at", 0) > STALE_AFTER:
            continue
        seen.append(slot)
        merge_status(merged, other)
        merge_histograms(merged["histograms"], other.get("histograms", {}))
        if "recent" in merged and "recent" in other:
            merge_recent(merged["recent"], other["recent"])
    merged["workers_reporting"] = sorted(seen)
    return merged
