"""The on-disk spool: every sync payload is durable before it is sent.

Layout (one directory per instance slot):

    <dir>/<created_ns>-<message_uuid>.json   payloads waiting for the hub, oldest first
    <dir>/checkpoint.json                    the open interval's payloads so far

Each file is written to a temporary name, fsync'd and renamed, so a crash leaves
either the old or the new version, never half a file. A payload file is removed
only after the hub has answered for it. The checkpoint is rewritten about every
second; after a crash it becomes a payload of its own (unless the payload it was
about to become had already been spooled), so a SIGKILL loses at most the last
second of counts.

A hub sync payload is delivered as the bytes the spool holds (`Spool.read`), never
parsed back into objects: under hostile cardinality one is megabytes of rows. The
bytes are trusted when they begin and end as `sync_payload` lays a payload out
(instance uuid, message uuid and timestamp first; resources last); anything else
(a payload of an older layout, a damaged file) is parsed, and dropped if unreadable,
as `Spool.load` does.

All methods block on disk I/O: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from apitally_proxy.fileio import write_atomic
from apitally_proxy.text import dumps_lenient

log = logging.getLogger("apitally_proxy.hub")

CHECKPOINT = "checkpoint.json"


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    path: Path
    created: float  # seconds since the epoch
    message_uuid: str
    size: int


@dataclass(frozen=True, slots=True)
class Encoded:
    """A spooled payload as its JSON bytes (exactly what is sent), with the fields the
    delivery reads."""

    data: bytes
    message_uuid: str | None
    timestamp: float | None


# How `sync_payload`'s JSON begins and ends (orjson, compact, keys in insertion order).
# Inside a JSON string every `"` is escaped, so these cannot match a value's text.
_SYNC_HEAD = re.compile(
    rb'\{"instance_uuid":"[^"\\]*","message_uuid":"([^"\\]*)",'
    rb'"timestamp":(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?),'
)
_SYNC_TAIL = re.compile(
    rb',"resources":(?:null|\{"cpu_percent":[-+.eE0-9]+,"memory_rss":[0-9]+\})\}\Z'
)
_TAIL_BYTES = 128


class Spool:
    """Durable FIFO of sync payloads, bounded in bytes and age."""

    def __init__(self, directory: Path, max_bytes: int = 100_000_000, max_age: float = 3600.0):
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.dropped_full = 0
        self.dropped_expired = 0
        # Values of payloads that could not be encoded as they were (repaired or dropped).
        self.unencodable = 0
        directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes a crash interrupted.
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def entries(self) -> list[SpoolEntry]:
        """Waiting payloads, oldest first."""
        out = []
        for path in self.directory.glob("*-*.json"):
            stem = path.stem
            created_ns, _, message_uuid = stem.partition("-")
            try:
                created = int(created_ns) / 1e9
                size = path.stat().st_size
            except (ValueError, OSError):
                continue
            out.append(SpoolEntry(path, created, message_uuid, size))
        out.sort(key=lambda e: e.path.name)
        return out

    def put(self, payload: dict[str, Any], unencodable: int = 0) -> SpoolEntry:
        """Make a payload durable; enforce the byte bound by dropping the oldest.

        `unencodable`: values already repaired or dropped where the payload's rows were
        pre-serialized (`text.json_rows`), counted and reported with this payload's own.
        """
        data, problems = dumps_lenient(payload)
        problems += unencodable
        if problems:
            self.unencodable += problems
            log.error(
                "payload %s had %d value(s) that could not be encoded as they were; "
                "repaired or dropped them, the rest of the payload is kept",
                payload.get("message_uuid"),
                problems,
            )
        created_ns = time.time_ns()
        path = self.directory / f"{created_ns:020d}-{payload['message_uuid']}.json"
        write_atomic(path, data)
        try:
            self._enforce_bounds()
        except OSError as exc:  # the payload itself is safe on disk; bounds next time
            log.warning("could not enforce the spool's size bound (%s)", exc)
        return SpoolEntry(path, created_ns / 1e9, payload["message_uuid"], len(data))

    def load(self, entry: SpoolEntry) -> dict[str, Any] | None:
        try:
            return orjson.loads(entry.path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("spooled payload %s is unreadable (%s); dropping it", entry.path, exc)
            self.remove(entry)
            return None

    def read(self, entry: SpoolEntry) -> Encoded | None:
        """A spooled payload as its bytes, unparsed when they are laid out as a sync
        payload's (see the module docstring); otherwise as `load` would decode it."""
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            log.error("spooled payload %s is unreadable (%s); dropping it", entry.path, exc)
            self.remove(entry)
            return None
        head = _SYNC_HEAD.match(data)
        if head is not None and _SYNC_TAIL.search(data, max(0, len(data) - _TAIL_BYTES)):
            return Encoded(data, head[1].decode("ascii", "replace"), float(head[2]))
        try:
            payload = orjson.loads(data)
            if not isinstance(payload, dict):
                raise orjson.JSONDecodeError("not a JSON object", "", 0)
        except orjson.JSONDecodeError as exc:
            log.error("spooled payload %s is unreadable (%s); dropping it", entry.path, exc)
            self.remove(entry)
            return None
        timestamp = payload.get("timestamp")
        return Encoded(
            dumps_lenient(payload)[0],  # what sending the loaded payload would have sent
            payload.get("message_uuid"),
            timestamp if isinstance(timestamp, (int, float)) else None,
        )

    def remove(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)

    def drop_expired(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - self.max_age
        dropped = 0
        for entry in self.entries():
            if entry.created >= cutoff:
                break
            self.remove(entry)
            dropped += 1
        if dropped:
            self.dropped_expired += dropped
            log.warning(
                "dropped %d spooled payload(s) older than %.0f s (hub unreachable too long)",
                dropped,
                self.max_age,
            )
        return dropped

    def _enforce_bounds(self) -> None:
        entries = self.entries()
        total = sum(e.size for e in entries)
        dropped = 0
        while total > self.max_bytes and len(entries) > 1:
            oldest = entries.pop(0)
            self.remove(oldest)
            total -= oldest.size
            dropped += 1
        if dropped:
            self.dropped_full += dropped
            log.error(
                "spool over %d bytes: dropped the %d oldest payload(s); metrics were lost "
                "(raise spool_max_bytes or fix hub connectivity)",
                self.max_bytes,
                dropped,
            )

    # The open interval's checkpoint.

    def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Repaired silently here: the payload it becomes counts and reports it.
        write_atomic(self.directory / CHECKPOINT, dumps_lenient(checkpoint)[0])

    def clear_checkpoint(self) -> None:
        (self.directory / CHECKPOINT).unlink(missing_ok=True)

    def recover_checkpoint(self) -> list[dict[str, Any]]:
        """The payloads a crashed process's checkpoint holds that are not spooled yet.

        A checkpoint is `{"message_uuid", "payloads": [...]}`, the interval's own
        payload (named by that uuid) last; once that one is spooled, the interval was
        closed and nothing is recovered. (An older proxy wrote the payload itself.)
        """
        path = self.directory / CHECKPOINT
        try:
            checkpoint = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("checkpoint %s is unreadable (%s); ignoring it", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return []
        payloads = checkpoint.get("payloads", [checkpoint])
        spooled = {e.message_uuid for e in self.entries()}
        if checkpoint.get("message_uuid") in spooled:
            self.clear_checkpoint()
            return []
        return [p for p in payloads if p.get("message_uuid") not in spooled]
