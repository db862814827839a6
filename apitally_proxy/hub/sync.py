"""The sync loop: aggregates → spooled payloads → the hub or an OTLP endpoint, in order,
off the hot path.

Two background tasks per worker:
- every ~1 s, the open interval's aggregates are checkpointed to disk, so a
  SIGKILL loses at most that second;
- every sync interval, the interval is closed into its payloads (a `Codec` says
  which: one hub sync payload, or OTLP exports), made durable in the spool, and
  everything waiting in the spool is delivered oldest first.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from apitally_proxy.aio import Background, Pause, cancel_and_wait, wait_or_hurry
from apitally_proxy.hub.spool import Encoded, Spool
from apitally_proxy.hub.transport import Outcome, Transport
from apitally_proxy.text import UNENCODABLE

log = logging.getLogger("apitally_proxy.hub")

INITIAL_INTERVAL = 10.0
STEADY_INTERVAL = 60.0
INITIAL_PERIOD = 3600.0
CHECKPOINT_INTERVAL = 1.0
AGGREGATE_KEYS = ("requests", "validation_errors", "server_errors", "consumers")

T = TypeVar("T")


class AggregateSource(Protocol):
    recorded: int  # grows with every request recorded: tells whether anything changed

    def peek(self, serialized: bool = False) -> dict[str, Any]: ...

    # serialized: the rows pre-serialized, and how many of their values had to be
    # repaired or dropped under the key `text.UNENCODABLE` (no part of the payload).
    def get_and_reset(self, serialized: bool = False) -> dict[str, Any]: ...


class Codec(Protocol):
    # Optional (default False): the codec only encodes an interval's rows as JSON, so
    # checkpoints and syncs may hand them over pre-serialized
    # (`AggregateSource.peek(serialized=True)`, `get_and_reset(serialized=True)`).
    # serialized_rows: bool

    def interval(
        self,
        aggregates: dict[str, Any],
        message_uuid: str,
        start_ns: int,
        end_ns: int,
        live: bool = True,
    ) -> list[dict[str, Any]]:
        """The payloads of one interval, the one named `message_uuid` last; `live` is
        False for checkpoints (no process readings)."""
        ...


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
        codec: Codec,
        interval: float | None = None,
        default_interval: float | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        before_sync: list[Callable[[], Awaitable[None]]] | None = None,
        after_sync: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self.transport = transport
        self.instance_uuid = instance_uuid
        self.spool = spool
        self._source = source
        self._startup = startup
        self._codec = codec
        self._serialized_rows = bool(getattr(codec, "serialized_rows", False))
        # Spooled payloads go out as the bytes the spool holds, never parsed back into
        # objects, where the transport takes bytes (the hub's and local mode's).
        self._send_encoded: Callable[[str, bytes], Awaitable[Outcome]] | None = getattr(
            transport, "send_encoded", None
        )
        self._interval = interval
        self._default_interval = default_interval
        self._interval_start_ns = time.time_ns()
        self._checkpoint_interval = checkpoint_interval
        # Extra work that rides on each sync: spooling spans before it (OTLP), uploading
        # request-log files after it (hub).
        self._before_sync = before_sync or []
        self._after_sync = after_sync or []
        self._started = time.monotonic()
        self._next_message_uuid = str(uuid.uuid4())
        self._startup_pending: dict[str, Any] | None = None
        # Payloads the spool could not take (disk full): kept in memory instead.
        self._unspooled: list[dict[str, Any]] = []
        self._background = Background()
        self._current_sync: asyncio.Future[None] | None = None
        self._checkpointed_at = -1  # source.recorded at the last checkpoint
        self._state_lock = asyncio.Lock()  # closing an interval vs checkpointing it
        self._deliver_lock = asyncio.Lock()
        self.stopped = False  # the hub said 404: nothing more is sent
        self.queued = 0
        self.spool_bytes = 0  # counted with `queued`, off the event loop
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
        # The server's say (Apitally-Export-Interval) wins, then the setting, then defaults.
        server = getattr(self.transport, "server_interval", None)
        if server is not None:
            return server
        if self._interval is not None:
            return self._interval
        if self._default_interval is not None:
            return self._default_interval
        elapsed = time.monotonic() - self._started
        return INITIAL_INTERVAL if elapsed < INITIAL_PERIOD else STEADY_INTERVAL

    def announce(self) -> None:
        """(Re)send startup data at the next sync, e.g. when the route set changed."""
        self._startup_pending = self._startup(self.instance_uuid)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def start(self) -> None:
        """Recover what a crashed predecessor left, then start the background tasks."""
        recovered = await self._io(self.spool.recover_checkpoint)
        if recovered:
            await self._io(self._spool_checkpoint, recovered)
            self.recovered += 1
            log.warning(
                "recovered the last counts of a process that did not shut down cleanly "
                "(message %s)",
                recovered[-1].get("message_uuid"),
            )
        await self._count_waiting()
        self.announce()
        self._background.start(self._run_syncs(), "hub-sync")
        self._background.start(self._run_checkpoints(), "hub-checkpoint")

    def _spool_checkpoint(self, payloads: list[dict[str, Any]]) -> None:
        for payload in payloads:
            self.spool.put(payload)
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
            away = Pause()
            try:
                await self.checkpoint_once(away)
            except Exception:
                log.exception("checkpoint failed")
            # Snapshotting runs on the event loop: when hostile cardinality makes it
            # expensive, checkpoint less often so it never takes over 5% of the loop.
            # Its cost leaves out the requests served while it let the loop through.
            cost = time.perf_counter() - started - away.away
            pause = max(self._checkpoint_interval, 20 * cost)

    async def stop(
        self, final_sync_timeout: float = 10.0, hurry: asyncio.Event | None = None
    ) -> None:
        """Cancel the loops, spool the final aggregates, deliver (bounded in time).

        When `hurry` is set (a second signal), delivery is abandoned; the
        spooled payloads go out at the next start.
        """
        await self._background.stop()
        # One deadline for both: the sync the loop was in, then the final delivery.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + final_sync_timeout
        # The shielded sync the loop was in: let it finish (its delivery and hooks)
        # before the transport closes, within the same bound.
        current = self._current_sync
        if current is not None and not await wait_or_hurry(current, final_sync_timeout, hurry):
            await cancel_and_wait(current)
        await self.close_interval()
        delivery = asyncio.ensure_future(self.deliver())
        delivered = await wait_or_hurry(delivery, deadline - loop.time(), hurry)
        if not delivered:
            await cancel_and_wait(delivery)
            log.error(
                "final sync not delivered within %.0f s; %d payload(s) stay spooled in %s "
                "for the next start",
                final_sync_timeout,
                self.queued,
                self.spool.directory,
            )
        await self.transport.close()

    async def checkpoint_once(self, pause: Pause | None = None) -> None:
        """Write the open interval's aggregates to disk (skipped while empty); `pause`
        gives the loop its turn while the rows are made, and counts the time away."""
        async with self._state_lock:
            recorded = self._source.recorded
            if self.stopped or recorded == self._checkpointed_at:
                return  # nothing new since the last checkpoint (or nothing will be sent)
            # Pre-serialized rows where the codec allows: no dict per row, rebuilt each second.
            aggregates = self._source.peek(serialized=self._serialized_rows)
            if not any(aggregates[k] for k in AGGREGATE_KEYS):
                return
            await _build(aggregates, pause=pause)
            mu = self._next_message_uuid
            payloads = await self._io(
                self._codec.interval, aggregates, mu, self._interval_start_ns, time.time_ns(), False
            )
            checkpoint = {"message_uuid": mu, "payloads": payloads}
            await self._io(self.spool.write_checkpoint, checkpoint)
            self._checkpointed_at = recorded

    async def close_interval(self) -> None:
        """Turn the open interval into durable payloads and start a new interval."""
        async with self._state_lock:
            # Pre-serialized rows where the codec allows (the hub's): built row by row
            # straight from the counters, with no dict per row of the interval.
            aggregates = self._source.get_and_reset(serialized=self._serialized_rows)
            problems = [aggregates.pop(UNENCODABLE, 0)]
            start_ns, end_ns = self._interval_start_ns, time.time_ns()
            self._interval_start_ns = end_ns
            mu = self._next_message_uuid
            self._next_message_uuid = str(uuid.uuid4())
            if self.stopped:
                return
            await _build(aggregates, problems)  # requests go on into the next interval
            unencodable = problems[0]
            payloads = await self._io(self._codec.interval, aggregates, mu, start_ns, end_ns)
            del aggregates  # the rows live on in the payloads only until they are spooled
            unspooled = await self._io(self._spool_payloads, payloads, unencodable)
            self._unspooled.extend(unspooled)
            self.queued += len(payloads)

    def _spool_payloads(
        self, payloads: list[dict[str, Any]], unencodable: int = 0
    ) -> list[dict[str, Any]]:
        """Spool in order (the interval's own payload last, so a checkpoint can tell what
        is missing); returns what the spool could not take (disk full), kept in memory.
        `unencodable`: values the rows' encoding repaired or dropped, counted with the
        interval's own payload."""
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            try:
                self.spool.put(payload, unencodable if i == last else 0)
            except OSError as exc:
                log.error("cannot write to the spool (%s); keeping the payload in memory", exc)
                return payloads[i:]
        try:
            self.spool.clear_checkpoint()
        except OSError as exc:
            # The payloads are durable; a stale checkpoint naming the interval's
            # message_uuid is recognised and dropped at recovery: only worth a warning.
            log.warning("could not remove the checkpoint (%s)", exc)
        return []

    async def sync_once(self) -> None:
        """Run the before-sync hooks, close the interval, deliver everything waiting, run
        the after-sync hooks."""
        await self._run_hooks(self._before_sync)
        await self.close_interval()
        await self.deliver()
        self.last_sync = time.time()
        await self._run_hooks(self._after_sync)

    async def _run_hooks(self, hooks: list[Callable[[], Awaitable[None]]]) -> None:
        for hook in hooks:
            if self.stopped:
                break
            try:
                await hook()
            except Exception:
                log.exception("a delivery riding on the sync failed; will retry at the next sync")

    async def deliver(self) -> None:
        """Send startup data (until accepted), then spooled payloads, oldest first."""
        async with self._deliver_lock:
            try:
                await self._deliver()
            finally:
                await self._count_waiting()

    async def _count_waiting(self) -> None:
        """`queued` and `spool_bytes` from one listing of the spool, in a thread."""
        entries = await self._io(self.spool.entries)
        self.queued = len(self._unspooled) + len(entries)
        self.spool_bytes = sum(e.size for e in entries)

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
            if self._send_encoded is not None:
                encoded = await self._io(self.spool.read, entry)
                if encoded is None:
                    continue
                done = await self._send_spooled(encoded)
                del encoded
            else:
                payload = await self._io(self.spool.load, entry)
                if payload is None:
                    continue
                done = await self._send_one(payload)
            if not done:
                return
            await self._io(self.spool.remove, entry)

    async def _send_one(self, payload: dict[str, Any]) -> bool:
        """True when the payload is done with (accepted or rejected for good)."""
        if self._expired(payload.get("timestamp")):
            return True
        return self._done(await self.transport.send("sync", payload))

    async def _send_spooled(self, payload: Encoded) -> bool:
        """`_send_one` for a payload as the spool holds it (sent as these bytes)."""
        assert self._send_encoded is not None
        if self._expired(payload.timestamp):
            return True
        return self._done(await self._send_encoded("sync", payload.data))

    def _expired(self, timestamp: float | None) -> bool:
        if timestamp is None or time.time() - timestamp <= self.spool.max_age:
            return False
        self.spool.dropped_expired += 1
        log.warning("dropped a sync payload older than %.0f s", self.spool.max_age)
        return True

    def _done(self, outcome: Outcome) -> bool:
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


async def _build(
    aggregates: dict[str, Any], problems: list[int] | None = None, pause: Pause | None = None
) -> None:
    """Values that come unmade (an interval's request rows, `Meter.peek`) are made here,
    on the loop, a chunk at a time with requests let through in between."""
    for key, value in aggregates.items():
        build = getattr(value, "build", None)
        if build is not None:
            aggregates[key] = await build(problems, pause)
