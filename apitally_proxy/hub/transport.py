"""Where payloads go: the Apitally hub over HTTP, or JSON lines on disk (local mode)."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from apitally_proxy.text import dumps_lenient

log = logging.getLogger("apitally_proxy.hub")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # 2xx: done with this payload
    REJECTED = "rejected"  # 422: the hub will never take it; drop it
    RETRY = "retry"  # 5xx, timeout, connection error: keep it queued
    STOP = "stop"  # 404: unknown client id; stop syncing
    SUSPEND = "suspend"  # 402 on /log: request logging paused for Retry-After seconds


class Transport(Protocol):
    last_error: str | None  # for /health: why the last exchange failed
    last_success: float | None  # for /status: when a payload was last taken

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome: ...

    # Optional: `send_encoded(kind, body: bytes) -> Outcome` sends a payload already
    # encoded as JSON (as the spool holds it) as is; the sync then delivers spooled
    # payloads without parsing them. The hub transports have it, OTLP's does not.

    async def close(self) -> None: ...


class HubTransport:
    """POSTs payloads to {hub}/v2/{client_id}/{env}/{kind} with retries and backoff."""

    def __init__(
        self,
        hub_url: str,
        client_id: str,
        env: str,
        timeout: float = 10.0,
        tries: int = 3,
        backoff: float = 0.5,
        user_agent: str = "apitally-proxy",
    ) -> None:
        self.base = f"{hub_url}/v2/{client_id}/{env}"
        self.client_id = client_id
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tries = tries
        self._backoff = backoff
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self.last_error: str | None = None
        self.last_success: float | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers={"User-Agent": self._user_agent},
                trust_env=True,  # the hub may sit behind the operator's egress proxy
            )
        return self._session

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome:
        # Spooled payloads were repaired (and counted) there.
        return await self.send_encoded(kind, dumps_lenient(payload)[0])

    async def send_encoded(self, kind: str, body: bytes) -> Outcome:
        """POST a payload's JSON bytes as they are (retries and backoff as `send`)."""
        url = f"{self.base}/{kind}"
        for attempt in range(self._tries):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            outcome = await self._post_once(url, kind, body)
            if outcome is not Outcome.RETRY:
                return outcome
        return Outcome.RETRY

    async def _post_once(self, url: str, kind: str, body: bytes) -> Outcome:
        try:
            async with self._get_session().post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.last_error = f"{kind}: {type(exc).__name__}: {exc}"
            log.warning("hub %s failed: %s", kind, self.last_error)
            return Outcome.RETRY
        if 200 <= status < 300:
            self.last_error = None
            self.last_success = time.time()
            return Outcome.ACCEPTED
        if status == 404:
            self.last_error = (
                f"hub answered 404 for client id {self.client_id}: the client id is unknown; "
                "check APITALLY_CLIENT_ID"
            )
            log.error("%s (syncing stopped)", self.last_error)
            return Outcome.STOP
        if status == 422:
            self.last_error = f"hub rejected the {kind} payload (422): {text[:2000]}"
            log.warning("%s", self.last_error)
            return Outcome.REJECTED
        self.last_error = f"{kind}: hub answered {status}"
        log.warning("hub %s answered %d: %s", kind, status, text[:500])
        return Outcome.RETRY

    async def send_log(self, file_uuid: str, body: bytes) -> tuple[Outcome, float | None]:
        """POST one gzip request-log file to /log?uuid=; one try (the file waits for the next sync).

        The body goes as is, with no Content-Encoding or Content-Type, as the official
        clients send it. Returns the outcome and, for SUSPEND, the Retry-After seconds.
        """
        try:
            async with self._get_session().post(
                f"{self.base}/log",
                params={"uuid": file_uuid},
                data=body,
                skip_auto_headers=("Content-Type",),
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("hub log upload failed: %s: %s", type(exc).__name__, exc)
            return Outcome.RETRY, None
        if 200 <= status < 300:
            return Outcome.ACCEPTED, None
        if status == 402 and retry_after is not None:
            try:
                return Outcome.SUSPEND, max(0.0, float(retry_after))
            except ValueError:
                pass
        if status == 404:
            return Outcome.STOP, None
        if status == 422:
            log.warning("hub rejected a request log file (422); dropped")
            return Outcome.REJECTED, None
        log.warning("hub log upload answered %d; retrying at the next sync", status)
        return Outcome.RETRY, None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# What the status page keeps of the latest local-mode payloads: a count and a byte
# bound, so a hostile interval's multi-megabyte payload is summarised, never held.
RECENT_PAYLOADS = 20
RECENT_PAYLOAD_BYTES = 32 * 1024


class LocalTransport:
    """Local mode: every payload becomes one JSON line under the state dir; nothing is sent."""

    def __init__(self, directory: Path, name: str, max_bytes: int = 20_000_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.jsonl"
        self._max_bytes = max_bytes
        self.last_error: str | None = None
        self.last_success: float | None = None
        # For the admin status page: each entry already serialized, at most
        # RECENT_PAYLOAD_BYTES (larger payloads are kept as a summary).
        self._recent: deque[bytes] = deque(maxlen=RECENT_PAYLOADS)

    @property
    def recent(self) -> list[orjson.Fragment]:
        """The latest payloads, oldest first, as pre-serialized JSON."""
        return [orjson.Fragment(b) for b in self._recent]

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome:
        body = dumps_lenient(payload)[0]
        rows = {k: len(v) for k, v in payload.items() if isinstance(v, list)}
        return self._write(kind, body, rows)

    async def send_encoded(self, kind: str, body: bytes) -> Outcome:
        """`send` for a payload already encoded (the same line); a large one's row
        counts on the status page are read off its bytes (`sync_row_counts`)."""
        return self._write(kind, body, None)

    def _write(self, kind: str, body: bytes, rows: dict[str, int] | None) -> Outcome:
        # The line is `{"kind", "written_at", "payload"}` as one orjson.dumps would
        # write it, in three writes: the payload (megabytes) is never copied.
        head = _json_head({"kind": kind, "written_at": time.time()})
        size = len(head) + len(body) + 2
        try:
            if self.path.exists() and self.path.stat().st_size + size > self._max_bytes:
                os.replace(self.path, self.path.with_suffix(".jsonl.1"))
            with open(self.path, "ab") as f:
                f.write(head)
                f.write(body)
                f.write(b"}\n")
        except OSError as exc:
            self.last_error = f"writing {self.path} failed: {exc}"
            log.warning("%s", self.last_error)
            return Outcome.RETRY
        self.last_error = None
        self.last_success = time.time()
        head = _json_head({"kind": kind})
        shown_bytes = len(head) + len(body) + 1
        if shown_bytes > RECENT_PAYLOAD_BYTES:
            shown = orjson.dumps(
                {
                    "kind": kind,
                    "truncated": True,
                    "bytes": shown_bytes,
                    "rows": rows if rows is not None else sync_row_counts(body),
                }
            )
        else:
            shown = head + body + b"}"
        self._recent.append(shown)
        return Outcome.ACCEPTED

    async def close(self) -> None:
        return None


def _json_head(record: dict[str, Any]) -> bytes:
    """`orjson.dumps({**record, "payload": X})` up to where X begins (record not empty)."""
    return orjson.dumps(record)[:-1] + b',"payload":'


# A key every row of a sync payload's list has, and no other row of it. In JSON bytes
# `"key":` can only be a key: inside a string every `"` is escaped.
SYNC_ROW_KEYS = {
    "requests": b'"request_count":',
    "validation_errors": b'"loc":',
    "server_errors": b'"traceback":',
    "consumers": b'"identifier":',
}


def sync_row_counts(body: bytes) -> dict[str, int]:
    """The row counts of a sync payload's lists, read off its JSON bytes (no parsing)."""
    return {key: body.count(marker) for key, marker in SYNC_ROW_KEYS.items()}
