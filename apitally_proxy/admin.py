"""The admin server: health, Prometheus metrics, the dashboard and its JSON."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from apitally_proxy.dashboard import CONTENT_SECURITY_POLICY, build_view, render_main, render_page
from apitally_proxy.exposition import ProxyCollector, StatusFn

# Probes need no credential (orchestrators call them); everything else may want one.
OPEN_PATHS = frozenset({"/health", "/healthz"})


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this server: an IP literal, localhost, or an allowed name.

    A DNS-rebinding page reaches the admin port under the attacker's own name
    (`evil.example:9099`); IP literals and `localhost` are what local tools, probes
    and scrapers use.
    """
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _guard(allowed_hosts: frozenset[str], token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if not host_allowed(request.headers.get("Host"), allowed_hosts):
            return web.Response(
                status=421,
                text="unknown Host for the admin server; add it to admin_allowed_hosts\n",
            )
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.Response(
                    status=401,
                    text="admin_token required: Authorization: Bearer <token>\n",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return guard


def build_admin_app(
    status: StatusFn,
    ready: Callable[[], bool],
    allowed_hosts: frozenset[str] = frozenset(),
    token: str | None = None,
    dashboard: StatusFn | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> web.Application:
    """The admin application; `status` returns the live state as a dict, `dashboard`
    the same with the last minutes of traffic (`recent`) for the dashboard.

    Requests must name an acceptable Host (see `host_allowed`); with `token`, every
    endpoint but the health probes wants `Authorization: Bearer <token>`.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProxyCollector(status))

    def health_body(is_ready: bool) -> dict[str, Any]:
        s = status()
        return {
            "status": "ok" if is_ready else "draining" if draining() else "starting",
            "ready": is_ready,
            "mode": s["hub"]["mode"],
            "hub_ok": s["hub"]["ok"],
            "hub_problem": s["hub"]["problem"],
            # Counted, never fatal: the rest of each payload was kept.
            "unencodable_values": s["hub"]["unencodable"],
        }

    # Readiness: 503 while starting and while draining (take no new traffic).
    async def health(request: web.Request) -> web.Response:
        is_ready = ready()
        return web.Response(
            body=orjson.dumps(health_body(is_ready)),
            status=200 if is_ready else 503,
            content_type="application/json",
        )

    # Liveness: 200 whenever the event loop answers, draining included (restarting a
    # draining proxy would cut its final delivery).
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(health_body(ready())), content_type="application/json"
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # The status is read on the event loop (a snapshot of plain values); serializing
    # and rendering it runs in a thread, so a big page never stalls proxying.
    async def status_json(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(
            orjson.dumps, status(), option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2
        )
        return web.Response(body=body, content_type="application/json")

    dashboard_status = dashboard or status

    async def dashboard_json(request: web.Request) -> web.Response:
        snapshot = dashboard_status()
        body = await asyncio.to_thread(
            lambda: orjson.dumps(build_view(snapshot), option=orjson.OPT_INDENT_2)
        )
        return web.Response(body=body, content_type="application/json")

    async def status_page(request: web.Request) -> web.Response:
        snapshot = dashboard_status()
        render = render_main if request.query.get("part") == "main" else render_page
        page = await asyncio.to_thread(lambda: render(build_view(snapshot)))
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    app = web.Application(middlewares=[_guard(frozenset(h.lower() for h in allowed_hosts), token)])
    app.router.add_get("/health", health)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/dashboard.json", dashboard_json)
    app.router.add_get("/", status_page)
    return app
