"""The sync loop: aggregates → spooled payloads → the hub, in order, off the hot path.

Two background tasks per worker:
- every ~1 s, the open interval's aggregates are checkpointed to disk, so a
  SIGKILL loses at most that second;
- every sync interval, the interval is closed into a payload, made durable in
  the spool, and everything waiting in the spool is delivered oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import psutil

from apitally_proxy.hub.payloads import sync_payload
from apitally_proxy.hub.spool import Spool
from apitally_proxy.hub.transport import Outcome, Transport

log = logging.getLogger("apitally_proxy.hub")

INITIAL_INTERVAL = 10.0
STEADY_INTERVAL = 60.0
INITIAL_PERIOD = 3600.0
CHECKPOINT_INTERVAL = 1.0
AGGREGATE_KEYS = ("requests", "validation_errors", "server_errors", "consumers")

T = TypeVar("T")


class AggregateSource(Protocol):
    recorded: int  # grows with every request recorded: tells whether anything changed

    def peek(self) -> dict[str, Any]: ...

    def get_and_reset(self) -> dict[str, Any]: ...


class HubSync:
    """Owns the spool, the payload delivery and the two background tasks that drive them.

    The aggregate source is read on the event loop (between requests), so it never
    races the hot path; disk I/O runs in worker threads.
    """

    def __init__(
        self,
        transport: Transport,
        instance_uuid: str,
        source: AggregateSource,
        startup: Callable[[str], dict[str, Any]],
        spool: Spool,
        interval: float | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        after_sync: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self.transport = transport
        self.instance_uuid = instance_uuid
        self.spool = spool
        self._source = source
        self._startup = startup
        self._interval = interval
        self._checkpoint_interval = checkpoint_interval
        # Extra deliveries that ride on each sync (e.g. request-log uploads).
        self._after_sync = after_sync or []
        self._started = time.monotonic()
        self._next_message_uuid = str(uuid.uuid4())
        self._startup_pending: dict[str, Any] | None = None
        # Payloads the spool could not take (disk full): kept in memory instead.
        self._unspooled: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._current_sync: asyncio.Future[None] | None = None
        self._checkpointed_at = -1  # source.recorded at the last checkpoint
        self._state_lock = asyncio.Lock()  # closing an interval vs checkpointing it
        self._deliver_lock = asyncio.Lock()
        self._process = psutil.Process()
        self._process.cpu_percent()  # prime the CPU counter
        self._resources_primed = False
        self.stopped = False  # the hub said 404: nothing more is sent
        self.queued = 0
        self.sent = 0
        self.dropped_rejected = 0
        self.recovered = 0
        self.last_sync: float | None = None

    @property
    def dropped_expired(self) -> int:
        return self.spool.dropped_expired

    @property
    def dropped_full(self) -> int:
        return self.spool.dropped_full

    def interval(self) -> float:
        if self._interval is not None:
            return self._interval
        elapsed = time.monotonic() - self._started
        return INITIAL_INTERVAL if elapsed < INITIAL_PERIOD else STEADY_INTERVAL

    def announce(self) -> None:
        """(Re)send startup data at the next sync, e.g. when the route set changed."""
        self._startup_pending = self._startup(self.instance_uuid)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def start(self) -> None:
        """Recover what a crashed predecessor left, then start the background tasks."""
        checkpoint = await self._io(self.spool.recover_checkpoint)
        if checkpoint is not None:
            await self._io(self._spool_checkpoint, checkpoint)
            self.recovered += 1
            log.warning(
                "recovered the last counts of a process that did not shut down cleanly "
                "(message %s)",
                checkpoint.get("message_uuid"),
            )
        self.queued = len(await self._io(self.spool.entries))
        self.announce()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run_syncs(), name="hub-sync"),
            loop.create_task(self._run_checkpoints(), name="hub-checkpoint"),
        ]

    def _spool_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.spool.put(checkpoint)
        self.spool.clear_checkpoint()

    async def _run_syncs(self) -> None:
        while True:
            try:
                # Shielded: a stop() arriving mid-delivery must not cut between the hub
                # accepting a payload and its removal from the spool (it would be sent
                # twice); stop() waits for this delivery through the delivery lock.
                self._current_sync = asyncio.ensure_future(self.sync_once())
                await asyncio.shield(self._current_sync)
            except Exception:
                log.exception("sync failed; will retry at the next interval")
            await asyncio.sleep(self.interval())

    async def _run_checkpoints(self) -> None:
        pause = self._checkpoint_interval
        while True:
            await asyncio.sleep(pause)
            started = time.perf_counter()
            try:
                await self.checkpoint_once()
            except Exception:
                log.exception("checkpoint failed")
            # Snapshotting runs on the event loop: when hostile cardinality makes it
            # expensive, checkpoint less often so it never takes over 5% of the loop.
            pause = max(self._checkpoint_interval, 20 * (time.perf_counter() - started))

    async def stop(
        self, final_sync_timeout: float = 10.0, hurry: asyncio.Event | None = None
    ) -> None:
        """Cancel the loops, spool the final aggregates, deliver (bounded in time).

        When `hurry` is set (a second signal), delivery is abandoned; the
        spooled payloads go out at the next start.
        """
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        current = self._current_sync
        if current is not None and not current.done():
            # The shielded sync the loop was in: let it finish (its delivery and hooks)
            # before the transport closes, within the same bound.
            await asyncio.wait({current}, timeout=final_sync_timeout)
            if not current.done():
                current.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await current
        await self.close_interval()
        delivery = asyncio.ensure_future(self.deliver())
        waiters: set[asyncio.Future[Any]] = {delivery}
        if hurry is not None:
            waiters.add(asyncio.ensure_future(hurry.wait()))
        done, _ = await asyncio.wait(
            waiters, timeout=final_sync_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in waiters:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fut
        if delivery not in done:
            log.error(
                "final sync not delivered within %.0f s; %d payload(s) stay spooled in %s "
                "for the next start",
                final_sync_timeout,
                self.queued,
                self.spool.directory,
            )
        await self.transport.close()

    def _resources(self) -> dict[str, Any] | None:
        if not self._resources_primed:
            # Like the official clients: no reading at the first sync, since the CPU
            # counter was primed only moments ago and would report noise.
            self._resources_primed = True
            return None
        try:
            return {
                "cpu_percent": self._process.cpu_percent(),
                "memory_rss": self._process.memory_info().rss,
            }
        except psutil.Error:
            return None

    async def checkpoint_once(self) -> None:
        """Write the open interval's aggregates to disk (skipped while empty)."""
        async with self._state_lock:
            recorded = self._source.recorded
            if self.stopped or recorded == self._checkpointed_at:
                return  # nothing new since the last checkpoint (or nothing will be sent)
            aggregates = self._source.peek()
            if not any(aggregates[k] for k in AGGREGATE_KEYS):
                return
            payload = sync_payload(
                self.instance_uuid, aggregates, None, message_uuid=self._next_message_uuid
            )
            await self._io(self.spool.write_checkpoint, payload)
            self._checkpointed_at = recorded

    async def close_interval(self) -> None:
        """Turn the open interval into a durable payload and start a new interval."""
        async with self._state_lock:
            aggregates = self._source.get_and_reset()
            payload = sync_payload(
                self.instance_uuid,
                aggregates,
                self._resources(),
                message_uuid=self._next_message_uuid,
            )
            self._next_message_uuid = str(uuid.uuid4())
            if self.stopped:
                return
            try:
                await self._io(self._spool_payload, payload)
            except OSError as exc:
                log.error("cannot write to the spool (%s); keeping the payload in memory", exc)
                self._unspooled.append(payload)
            self.queued += 1

    def _spool_payload(self, payload: dict[str, Any]) -> None:
        self.spool.put(payload)
        try:
            self.spool.clear_checkpoint()
        except OSError as exc:
            # The payload is durable; a stale checkpoint naming its message_uuid is
            # recognised and dropped at recovery, so this is only worth a warning.
            log.warning("could not remove the checkpoint (%s)", exc)

    async def sync_once(self) -> None:
        """Close the interval, deliver everything waiting, run the after-sync hooks."""
        await self.close_interval()
        await self.deliver()
        self.last_sync = time.time()
        for hook in self._after_sync:
            if self.stopped:
                break
            try:
                await hook()
            except Exception:
                log.exception("after-sync delivery failed; will retry at the next sync")

    async def deliver(self) -> None:
        """Send startup data (until accepted), then spooled payloads, oldest first."""
        async with self._deliver_lock:
            try:
                await self._deliver()
            finally:
                self.queued = len(self._unspooled) + len(await self._io(self.spool.entries))

    async def _deliver(self) -> None:
        if self.stopped:
            return
        pending = self._startup_pending
        if pending is not None:
            outcome = await self.transport.send("startup", pending)
            if outcome is Outcome.STOP:
                self._stop()
                return
            # announce() may have replaced it while this one was in flight: keep that.
            if outcome is not Outcome.RETRY and self._startup_pending is pending:
                self._startup_pending = None
        while self._unspooled:
            if not await self._send_one(self._unspooled[0]):
                return
            self._unspooled.pop(0)
        await self._io(self.spool.drop_expired)
        for entry in await self._io(self.spool.entries):
            payload = await self._io(self.spool.load, entry)
            if payload is None:
                continue
            if not await self._send_one(payload):
                return
            await self._io(self.spool.remove, entry)

    async def _send_one(self, payload: dict[str, Any]) -> bool:
        """True when the payload is done with (accepted or rejected for good)."""
        if time.time() - payload.get("timestamp", time.time()) > self.spool.max_age:
            self.spool.dropped_expired += 1
            log.warning("dropped a sync payload older than %.0f s", self.spool.max_age)
            return True
        outcome = await self.transport.send("sync", payload)
        if outcome is Outcome.RETRY:
            return False  # keep it (and everything after it) for the next sync
        if outcome is Outcome.STOP:
            self._stop()
            return False
        if outcome is Outcome.REJECTED:
            self.dropped_rejected += 1
        else:
            self.sent += 1
        return True

    def _stop(self) -> None:
        # 404: the hub does not know this client id. Spooled payloads stay on disk
        # (bounded by age and size) in case the id is fixed and the proxy restarted.
        self.stopped = True
        self._startup_pending = None
        self._unspooled.clear()
