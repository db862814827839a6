"""A small sample API to put behind the proxy.

An ordinary aiohttp app with FastAPI-style JSON errors. The one Apitally-specific
piece is `identify_consumer`: a middleware that names the caller in
`X-Apitally-Consumer*` response headers. That header is the whole integration;
the proxy measures, meters and ships everything else.

    python -m apitally_proxy.demo.sample_app --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("sample_app")


@dataclass(frozen=True, slots=True)
class ApiConsumer:
    identifier: str
    name: str
    group: str


# Stands in for the app's real user / API-key table.
API_KEYS: dict[str, ApiConsumer] = {
    "demo-key-acme": ApiConsumer("acme", "Acme Corp", "Enterprise"),
    "demo-key-globex": ApiConsumer("globex", "Globex", "Startup"),
    "demo-key-initech": ApiConsumer("initech", "Initech", "Startup"),
    "demo-key-mueller": ApiConsumer("mueller", "Müller & Söhne", "Partner"),
}

CONSUMER = web.RequestKey("consumer", ApiConsumer)
ITEMS = web.AppKey("items", dict[int, dict[str, Any]])
SEEDED_ITEMS = 1000


def error(status: int, detail: Any) -> web.Response:
    """An error body shaped like FastAPI's: {"detail": ...}."""
    return web.json_response({"detail": detail}, status=status)


def validation_error(loc: list[str], msg: str, type_: str) -> web.Response:
    return error(422, [{"loc": loc, "msg": msg, "type": type_}])


def api_key(request: web.Request) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def header_value(value: str) -> str:
    """Percent-encode what a header cannot carry (non-ASCII, '%'); the proxy decodes it."""
    return quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


@web.middleware
async def identify_consumer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the caller and tell the proxy who it was.

    This is the Apitally integration: put the consumer's identifier (and,
    optionally, a display name and group) in X-Apitally-Consumer* response
    headers. The proxy counts the request under that consumer and strips the
    headers, so clients never see them. It is the outermost middleware, so
    error responses carry the consumer too.
    """
    key = api_key(request)
    consumer = API_KEYS.get(key) if key else None
    if key is not None and consumer is None:
        return error(401, "Invalid API key")
    if consumer is not None:
        request[CONSUMER] = consumer
    response = await handler(request)
    if consumer is not None:
        response.headers["X-Apitally-Consumer"] = header_value(consumer.identifier)
        response.headers["X-Apitally-Consumer-Name"] = header_value(consumer.name)
        response.headers["X-Apitally-Consumer-Group"] = header_value(consumer.group)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors and unhandled exceptions into JSON error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error(500, "Internal Server Error")


def _int_param(request: web.Request, name: str) -> int | web.Response:
    """A path parameter as an int, or FastAPI's 422 for it."""
    try:
        return int(request.match_info[name])
    except ValueError:
        return validation_error(
            ["path", name],
            "Input should be a valid integer, unable to parse string as an integer",
            "int_parsing",
        )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def list_items(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= SEEDED_ITEMS:
        return validation_error(
            ["query", "limit"], f"Input should be between 1 and {SEEDED_ITEMS}", "less_than_equal"
        )
    items = request.app[ITEMS]
    return web.json_response([items[i] for i in sorted(items)[: int(raw)]])


async def get_item(request: web.Request) -> web.Response:
    item_id = _int_param(request, "item_id")
    if isinstance(item_id, web.Response):
        return item_id
    item = request.app[ITEMS].get(item_id)
    if item is None:
        return error(404, "Item not found")
    return web.json_response(item)


async def create_item(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return validation_error(["body"], "JSON decode error", "json_invalid")
    if not isinstance(body, dict):
        return validation_error(["body"], "Input should be a valid dictionary", "dict_type")
    if "name" not in body:
        return validation_error(["body", "name"], "Field required", "missing")
    if not isinstance(body["name"], str):
        return validation_error(["body", "name"], "Input should be a valid string", "string_type")
    items = request.app[ITEMS]
    item_id = max(items, default=0) + 1
    items[item_id] = {
        "id": item_id,
        "name": body["name"],
        "description": str(body.get("description", "")),
        "price": body.get("price"),
    }
    return web.json_response(items[item_id], status=201)


async def get_order(request: web.Request) -> web.Response:
    user_id = _int_param(request, "user_id")
    if isinstance(user_id, web.Response):
        return user_id
    order_id = _int_param(request, "order_id")
    if isinstance(order_id, web.Response):
        return order_id
    return web.json_response(
        {"id": order_id, "user_id": user_id, "item_ids": [order_id % 7 + 1, order_id % 11 + 1]}
    )


async def get_report(request: web.Request) -> web.Response:
    """A slow endpoint (20-80 ms), so the response-time histogram has more than one bin."""
    report_id = _int_param(request, "report_id")
    if isinstance(report_id, web.Response):
        return report_id
    await asyncio.sleep(0.02 + (report_id % 5) * 0.015)
    return web.json_response({"id": report_id, "status": "ready"})


async def fail(request: web.Request) -> web.Response:
    """Always fails, so the demo shows how server errors are metered."""
    raise RuntimeError("simulated failure")


async def openapi(request: web.Request) -> web.Response:
    """An OpenAPI document listing the routes, as FastAPI would serve it."""
    paths: dict[str, dict[str, Any]] = {}
    for route in request.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or path == "/openapi.json":
            continue
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "integer"}}
            for p in re.findall(r"{(\w+)}", path)
        ]
        operation: dict[str, Any] = {"operationId": getattr(route.handler, "__name__", "")}
        if params:
            operation["parameters"] = params
        paths.setdefault(path, {})[route.method.lower()] = operation
    return web.json_response(
        {"openapi": "3.1.0", "info": {"title": "Sample API", "version": "1.0.0"}, "paths": paths}
    )


def create_app() -> web.Application:
    app = web.Application(middlewares=[identify_consumer, json_errors])
    app[ITEMS] = {
        i: {
            "id": i,
            "name": f"Item {i}",
            "description": f"Sample item number {i}, seeded at start-up for the demo.",
            "price": round(1.5 * i, 2),
        }
        for i in range(1, SEEDED_ITEMS + 1)
    }
    app.router.add_get("/health", health)
    app.router.add_get("/items", list_items)
    app.router.add_post("/items", create_item)
    app.router.add_get("/items/{item_id}", get_item)
    app.router.add_get("/users/{user_id}/orders/{order_id}", get_order)
    app.router.add_get("/reports/{report_id}", get_report)
    app.router.add_get("/fail", fail)
    app.router.add_get("/openapi.json", openapi)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish."""
    runner = web.AppRunner(create_app(), shutdown_timeout=5.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        for address in runner.addresses:
            log.info("sample app listening on http://%s:%d", *address[:2])
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A sample API to run behind apitally-proxy.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
