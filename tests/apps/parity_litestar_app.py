"""The Litestar parity app: plain behind apitally-proxy, or with the official client.

Run: uvicorn tests.apps.parity_litestar_app:app   (PARITY_MODE=official for the client)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, get, post
from litestar.exceptions import NotFoundException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from tests.apps.parity_common import (
    CLIENT_ID,
    ENV,
    OFFICIAL,
    OFFICIAL1,
    consumer_for,
    consumer_headers,
    set_consumer_1x,
)


@dataclass
class Item:
    name: str
    price: float


@get("/items")
async def list_items() -> list[dict[str, str]]:
    return [{"name": "a"}, {"name": "b"}]


@post("/items")
async def create_item(data: Item) -> dict[str, str]:
    return {"name": data.name}


@get("/items/{item_id:int}")
async def get_item(item_id: int) -> dict[str, int]:
    if item_id > 100:
        raise NotFoundException("no such item")
    return {"id": item_id}


@get("/users/{user_id:int}/orders/{order_id:int}")
async def get_order(user_id: int, order_id: int) -> dict[str, int]:
    return {"user": user_id, "order": order_id}


@get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


def consumer_header(app: ASGIApp) -> ASGIApp:
    """With apitally-proxy: name the consumer in response headers (error responses included)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        authorization = dict(scope.get("headers", [])).get(b"authorization", b"")
        consumer = consumer_for(authorization.decode("latin-1"))

        async def send_with_consumer(message: Message) -> None:
            if consumer and message["type"] == "http.response.start":
                extra = [(k.encode(), v.encode()) for k, v in consumer_headers(consumer).items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await app(scope, receive, send_with_consumer)

    return middleware


ROUTES = [list_items, create_item, get_item, get_order, boom]
options: dict[str, Any] = {}
if OFFICIAL:
    from apitally.litestar import ApitallyPlugin, set_consumer

    def set_apitally_consumer(request: Request) -> None:
        consumer = consumer_for(request.headers.get("authorization"))
        if consumer:
            set_consumer(request, *consumer)

    options = {
        "plugins": [ApitallyPlugin(client_id=CLIENT_ID, env=ENV)],
        "before_request": set_apitally_consumer,
    }
elif OFFICIAL1:
    import apitally.litestar

    def set_apitally_consumer_1x(request: Request) -> None:
        set_consumer_1x(request.headers.get("authorization"))

    options = {
        "plugins": [apitally.litestar.ApitallyPlugin()],
        "before_request": set_apitally_consumer_1x,
    }
else:
    options = {"middleware": [consumer_header]}

app = Litestar(ROUTES, **options)
