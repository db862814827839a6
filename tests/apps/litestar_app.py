"""A Litestar app with the route shapes the route-template tests need.

Run: uvicorn tests.apps.litestar_app:app
"""

from __future__ import annotations

from litestar import Litestar, get, post
from litestar.params import FromPath


@get("/items")
async def list_items() -> list[int]:
    return [1, 2]


@post("/items")
async def create_item() -> dict[str, bool]:
    return {"created": True}


@get("/items/{item_id:int}")
async def get_item(item_id: FromPath[int]) -> dict[str, int]:
    return {"id": item_id}


@get("/users/{user_id:int}/orders/{order_id:int}")
async def get_order(user_id: FromPath[int], order_id: FromPath[int]) -> dict[str, int]:
    return {"user": user_id, "order": order_id}


@get("/tags/{tag:str}")
async def get_tag(tag: FromPath[str]) -> dict[str, str]:
    return {"tag": tag}


app = Litestar([list_items, create_item, get_item, get_order, get_tag])
