"""Stable instance UUIDs: one per worker slot, kept across restarts under the state dir."""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from pathlib import Path

MAX_SLOTS = 64


class InstanceLease:
    """Holds an flock on one slot file for the life of the process."""

    def __init__(self, uuid_: str, slot: int, fd: int, path: Path) -> None:
        self.uuid = uuid_
        self.slot = slot
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def _slot_dir(state_dir: Path, client_id: str | None, env: str) -> Path:
    key = hashlib.sha256(f"{client_id or 'local'}:{env}".encode()).hexdigest()[:12]
    return state_dir / "instances" / key


def acquire_instance(state_dir: Path, client_id: str | None, env: str, slot: int) -> InstanceLease:
    """Lease the first free slot at or after `slot` and return its UUID.

    The same slot gets the same UUID after a restart; two live processes never
    share one (a second proxy on the same state dir moves to the next slot).
    """
    directory = _slot_dir(state_dir, client_id, env)
    directory.mkdir(parents=True, exist_ok=True)
    for candidate in [*range(slot, MAX_SLOTS), *range(slot)]:
        path = directory / f"slot-{candidate}.uuid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        raw = os.read(fd, 64).decode("ascii", "replace").strip()
        try:
            value = str(uuid.UUID(raw))
        except ValueError:
            value = str(uuid.uuid4())
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, value.encode())
            os.fsync(fd)
        return InstanceLease(value, candidate, fd, path)
    raise RuntimeError(f"all {MAX_SLOTS} instance slots under {directory} are in use")
