"""OTLP/HTTP delivery: spooled exports POSTed to {endpoint}/v1/{signal}, answers mapped once.

| answer | outcome |
| --- | --- |
| 2xx | ACCEPTED |
| 401 (403 too, from a generic collector) | STOP: exporting stops, the error names the setting |
| 402 | REJECTED: quota exhausted, that export is dropped (traces, or anything) |
| 408, 429, 5xx, network errors, timeouts | RETRY with backoff, then kept for the next cycle |
| other 4xx (400, 404, 413, 415…) | REJECTED: dropped, warned once per status |

`Apitally-Export-Interval: N` on any answer sets the export interval (5 to 60 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from apitally_proxy.hub.transport import Outcome
from apitally_proxy.otlp.codec import export_bytes

log = logging.getLogger("apitally_proxy.otlp")

EXPORT_INTERVAL_HEADER = "Apitally-Export-Interval"
MIN_EXPORT_INTERVAL = 5.0
MAX_EXPORT_INTERVAL = 60.0
MAX_EXPORT_BYTES = 4 * 1024 * 1024
RETRYABLE = frozenset({408, 429})


class OtlpTransport:
    """Sends gzip'd OTLP protobuf exports; one instance per worker."""

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str],
        credential_hint: str,
        timeout: float = 10.0,
        tries: int = 3,
        backoff: float = 0.5,
        user_agent: str = "apitally-proxy",
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._headers = {
            **headers,
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "User-Agent": user_agent,
        }
        # Which setting a 401 blames (never the secret itself).
        self._credential_hint = credential_hint
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tries = tries
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._warned: set[int] = set()
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.server_interval: float | None = None  # from Apitally-Export-Interval
        self.sent_bytes: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers=self._headers,
                trust_env=True,  # the endpoint may sit behind the operator's egress proxy
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome:
        signal = payload["signal"]
        body = export_bytes(payload)
        if len(body) > MAX_EXPORT_BYTES:
            # Built in slices far below this; never send what the server must refuse.
            return self._reject(signal, f"{signal} export of {len(body)} bytes is over 4 MiB", 413)
        for attempt in range(self._tries):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            outcome = await self._post_once(signal, body)
            if outcome is not Outcome.RETRY:
                return outcome
        return Outcome.RETRY

    async def _post_once(self, signal: str, body: bytes) -> Outcome:
        url = f"{self.endpoint}/v1/{signal}"
        try:
            async with self._get_session().post(url, data=body) as resp:
                status = resp.status
                text = await resp.text(errors="replace")
                self._apply_interval(resp.headers.get(EXPORT_INTERVAL_HEADER))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.last_error = f"{signal}: {type(exc).__name__}: {exc}"
            log.warning("OTLP export to %s failed: %s", url, self.last_error)
            return Outcome.RETRY
        if 200 <= status < 300:
            self.last_error = None
            self.last_success = time.time()
            self.sent_bytes[signal] = self.sent_bytes.get(signal, 0) + len(body)
            return Outcome.ACCEPTED
        if status in (401, 403):
            self.last_error = (
                f"{url} answered {status}: the credential was refused; "
                f"check {self._credential_hint}"
            )
            log.error("%s (exporting stopped)", self.last_error)
            return Outcome.STOP
        if status in RETRYABLE or status >= 500:
            self.last_error = f"{signal}: {url} answered {status}"
            log.warning("OTLP export answered %d, will retry: %s", status, text[:300])
            return Outcome.RETRY
        if status == 402:
            return self._reject(signal, f"{signal} export dropped: quota exhausted (402)", 402)
        return self._reject(signal, f"{signal} export rejected with {status}: {text[:300]}", status)

    def _reject(self, signal: str, reason: str, status: int) -> Outcome:
        self.dropped[signal] = self.dropped.get(signal, 0) + 1
        if status not in self._warned:
            self._warned.add(status)
            log.warning("%s; dropping it", reason)
        return Outcome.REJECTED

    def _apply_interval(self, value: str | None) -> None:
        if not value:
            return
        try:
            seconds = float(int(value))
        except ValueError:
            return
        self.server_interval = min(max(seconds, MIN_EXPORT_INTERVAL), MAX_EXPORT_INTERVAL)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
