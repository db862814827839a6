"""A Litestar app whose endpoints answer invalid input with 400 validation errors.

Run: uvicorn tests.apps.litestar_validation_app:app
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Litestar, get, post
from litestar.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Item:
    name: str
    price: float


@post("/items")
async def create_item(data: Item) -> dict[str, str]:
    return {"name": data.name}


@get("/search")
async def search(limit: int) -> dict[str, int]:
    return {"limit": limit}


def consumer_header(app: ASGIApp) -> ASGIApp:
    """How an integrated app names its consumer for the proxy (error responses included)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        customer = dict(scope.get("headers", [])).get(b"x-customer")

        async def send_with_consumer(message: Message) -> None:
            if customer and message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-apitally-consumer", customer),
                ]
            await send(message)

        await app(scope, receive, send_with_consumer)

    return middleware


app = Litestar([create_item, search], middleware=[consumer_header])
