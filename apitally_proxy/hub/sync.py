"""The sync loop: turns aggregates into payloads on a timer and delivers them in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from apitally_proxy.hub.payloads import sync_payload
from apitally_proxy.hub.transport import Outcome, Transport

log = logging.getLogger("apitally_proxy.hub")

INITIAL_INTERVAL = 10.0
STEADY_INTERVAL = 60.0
INITIAL_PERIOD = 3600.0


class HubSync:
    """Owns the payload queue and the background task that drains it.

    `aggregates` is called once per sync (on the event loop, between requests),
    so it never races the hot path.
    """

    def __init__(
        self,
        transport: Transport,
        instance_uuid: str,
        aggregates: Callable[[], dict[str, Any]],
        startup: Callable[[str], dict[str, Any]],
        interval: float | None = None,
        max_age: float = 3600.0,
        after_sync: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self.transport = transport
        self.instance_uuid = instance_uuid
        self._aggregates = aggregates
        self._startup = startup
        self._interval = interval
        self._max_age = max_age
        # Extra deliveries that ride on each sync (e.g. request-log uploads).
        self._after_sync = after_sync or []
        self._started = time.monotonic()
        self._queue: deque[tuple[float, dict[str, Any]]] = deque()
        self._startup_pending: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._process = psutil.Process()
        self._process.cpu_percent()  # prime the CPU counter
        self.stopped = False  # the hub said 404: nothing more is sent
        self.sent = 0
        self.dropped_rejected = 0
        self.dropped_expired = 0
        self.last_sync: float | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def interval(self) -> float:
        if self._interval is not None:
            return self._interval
        elapsed = time.monotonic() - self._started
        return INITIAL_INTERVAL if elapsed < INITIAL_PERIOD else STEADY_INTERVAL

    def announce(self) -> None:
        """(Re)send startup data at the next sync, e.g. when the route set changed."""
        self._startup_pending = self._startup(self.instance_uuid)

    def start(self) -> None:
        self.announce()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hub-sync")

    async def _run(self) -> None:
        await self.sync_once()
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.sync_once()
            except Exception:
                log.exception("sync failed; will retry at the next interval")

    async def stop(self, final_sync_timeout: float = 10.0) -> None:
        """Cancel the loop, then send the final aggregates (bounded in time)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.sync_once(), final_sync_timeout)
        except TimeoutError:
            log.error(
                "final sync did not finish within %.0f s; %d payload(s) not delivered",
                final_sync_timeout,
                len(self._queue),
            )
        await self.transport.close()

    def _resources(self) -> dict[str, Any] | None:
        try:
            return {
                "cpu_percent": self._process.cpu_percent(),
                "memory_rss": self._process.memory_info().rss,
            }
        except psutil.Error:
            return None

    async def sync_once(self) -> None:
        """Queue the current aggregates and deliver whatever the queue holds."""
        async with self._lock:
            aggregates = self._aggregates()
            if not self.stopped:
                self._queue.append(
                    (time.time(), sync_payload(self.instance_uuid, aggregates, self._resources()))
                )
            await self._deliver()
            self.last_sync = time.time()
            for hook in self._after_sync:
                if self.stopped:
                    break
                try:
                    await hook()
                except Exception:
                    log.exception("after-sync delivery failed; will retry at the next sync")

    async def _deliver(self) -> None:
        if self.stopped:
            return
        if self._startup_pending is not None:
            outcome = await self.transport.send("startup", self._startup_pending)
            if outcome is Outcome.STOP:
                self._stop()
                return
            if outcome is not Outcome.RETRY:
                self._startup_pending = None
        cutoff = time.time() - self._max_age
        while self._queue:
            created, payload = self._queue[0]
            if created < cutoff:
                self._queue.popleft()
                self.dropped_expired += 1
                log.warning("dropped a sync payload older than %.0f s", self._max_age)
                continue
            outcome = await self.transport.send("sync", payload)
            if outcome is Outcome.RETRY:
                return  # keep it (and everything after it) for the next sync
            if outcome is Outcome.STOP:
                self._stop()
                return
            self._queue.popleft()
            if outcome is Outcome.REJECTED:
                self.dropped_rejected += 1
            else:
                self.sent += 1

    def _stop(self) -> None:
        self.stopped = True
        self._queue.clear()
        self._startup_pending = None
