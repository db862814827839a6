"""The Starlette parity app: plain behind apitally-proxy, or with the official client.

Run: uvicorn tests.apps.parity_starlette_app:app   (PARITY_MODE=official for the client)
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.apps.parity_common import (
    CLIENT_ID,
    ENV,
    OFFICIAL,
    OFFICIAL1,
    consumer_for,
    consumer_headers,
    set_consumer_1x,
)


async def list_items(request: Request) -> JSONResponse:
    return JSONResponse([{"name": "a"}, {"name": "b"}])


async def create_item(request: Request) -> JSONResponse:
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return JSONResponse({"detail": "expected a JSON object"}, status_code=400)
    errors = []
    if not isinstance(data.get("name"), str):
        errors.append({"loc": ["body", "name"], "msg": "must be a string", "type": "string_type"})
    if not isinstance(data.get("price"), int | float):
        errors.append({"loc": ["body", "price"], "msg": "must be a number", "type": "missing"})
    if errors:  # FastAPI's shape: the official client and the proxy both read it
        return JSONResponse({"detail": errors}, status_code=422)
    return JSONResponse({"name": data["name"]}, status_code=201)


async def get_item(request: Request) -> JSONResponse:
    item_id = request.path_params["item_id"]
    if item_id > 100:
        raise HTTPException(404, "no such item")
    return JSONResponse({"id": item_id})


async def get_order(request: Request) -> JSONResponse:
    return JSONResponse(dict(request.path_params))


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("boom")


routes = [
    Route("/items", list_items, methods=["GET"]),
    Route("/items", create_item, methods=["POST"]),
    Route("/items/{item_id:int}", get_item, methods=["GET"]),
    Route("/users/{user_id:int}/orders/{order_id:int}", get_order, methods=["GET"]),
    Route("/boom", boom, methods=["GET"]),
]


async def consumer_header(request: Request, call_next):
    """With apitally-proxy: name the consumer in response headers."""
    response = await call_next(request)
    consumer = consumer_for(request.headers.get("authorization"))
    if consumer:
        response.headers.update(consumer_headers(consumer))
    return response


if OFFICIAL:
    from apitally.starlette import ApitallyMiddleware, set_consumer

    async def identify_consumer(request: Request, call_next):
        consumer = consumer_for(request.headers.get("authorization"))
        if consumer:
            set_consumer(request, *consumer)
        return await call_next(request)

    middleware = [
        Middleware(ApitallyMiddleware, client_id=CLIENT_ID, env=ENV),
        Middleware(BaseHTTPMiddleware, dispatch=identify_consumer),
    ]
elif OFFICIAL1:

    async def identify_consumer_1x(request: Request, call_next):
        set_consumer_1x(request.headers.get("authorization"))
        return await call_next(request)

    middleware = [Middleware(BaseHTTPMiddleware, dispatch=identify_consumer_1x)]
else:
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=consumer_header)]

app = Starlette(routes=routes, middleware=middleware)
if OFFICIAL1:
    import apitally.starlette

    apitally.starlette.init(app)
