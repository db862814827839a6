"""A recording fake of the Apitally hub, speaking the hub protocol over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from apitally_proxy.otlp.receiver import wait_until

PATH = re.compile(r"^/v2/(?P<client_id>[^/]+)/(?P<env>[^/]+)/(?P<kind>startup|sync|log)$")


@dataclass
class HubCall:
    kind: str
    client_id: str
    env: str
    status: int
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """Records every call; `responses` scripts the status codes (default 202).

    `script` maps a kind to a list of statuses consumed in order (then `default`);
    `delay` makes every answer slow.
    """

    def __init__(self) -> None:
        self.calls: list[HubCall] = []
        self.script: dict[str, list[int]] = {}
        self.default_status = 202
        self.delay = 0.0
        self.retry_after: int | None = None  # sent with scripted 402s (log suspension)
        self.changed = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeHub:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        # A scripted delay leaves handlers sleeping after the proxy is gone: stopping
        # does not wait for them (aiohttp's default would be 60 s per test).
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        m = PATH.match(request.path)
        if not m:
            return web.Response(status=404)
        raw = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" or raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        kind = m["kind"]
        body: Any
        if kind == "log":
            body = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            body = orjson.loads(raw)
        scripted = self.script.get(kind)
        status = scripted.pop(0) if scripted else self.default_status
        if self.delay:
            await asyncio.sleep(self.delay)
            if request.transport is None or request.transport.is_closing():
                status = 0  # the client gave up waiting: it never saw an answer
        self.calls.append(
            HubCall(
                kind,
                m["client_id"],
                m["env"],
                status,
                dict(request.headers),
                body,
                dict(request.query),
            )
        )
        self.changed.set()
        if status == 422:
            return web.json_response({"detail": [{"msg": "rejected by fake hub"}]}, status=422)
        if status == 402 and self.retry_after is not None:
            return web.Response(status=402, headers={"Retry-After": str(self.retry_after)})
        return web.Response(status=status)

    # Views for assertions.

    def accepted(self, kind: str) -> list[Any]:
        return [c.body for c in self.calls if c.kind == kind and 200 <= c.status < 300]

    def request_counts(self) -> dict[tuple[Any, str, str, int], int]:
        """Accepted request counts per (consumer, method, path, status), summed over syncs."""
        totals: dict[tuple[Any, str, str, int], int] = {}
        for payload in self.accepted("sync"):
            for r in payload["requests"]:
                key = (r["consumer"], r["method"], r["path"], r["status_code"])
                totals[key] = totals.get(key, 0) + r["request_count"]
        return totals

    def request_rows(self) -> list[dict[str, Any]]:
        return [r for p in self.accepted("sync") for r in p["requests"]]

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        try:
            await wait_until(self.changed, predicate, timeout, "fake hub")
        except TimeoutError:
            raise AssertionError(
                f"fake hub: condition not met in {timeout} s: {self.calls!r}"
            ) from None
