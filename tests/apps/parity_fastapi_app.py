"""The FastAPI parity app: plain behind apitally-proxy, or with the official client.

Run: uvicorn tests.apps.parity_fastapi_app:app   (PARITY_MODE=official for the client)
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from tests.apps.parity_common import (
    CLIENT_ID,
    ENV,
    OFFICIAL,
    OFFICIAL1,
    consumer_for,
    consumer_headers,
    set_consumer_1x,
)

app = FastAPI(title="parity")


class Item(BaseModel):
    name: str
    price: float


@app.get("/items")
def list_items() -> list[dict[str, str]]:
    return [{"name": "a"}, {"name": "b"}]


@app.post("/items", status_code=201)
def create_item(item: Item) -> dict[str, str]:
    return {"name": item.name}


@app.get("/items/{item_id}")
def get_item(item_id: int) -> dict[str, int]:
    if item_id > 100:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id}


@app.get("/users/{user_id}/orders/{order_id}")
def get_order(user_id: int, order_id: int) -> dict[str, int]:
    return {"user": user_id, "order": order_id}


@app.get("/boom")
def boom() -> None:
    raise RuntimeError("boom")


if OFFICIAL:
    from apitally.fastapi import ApitallyMiddleware, set_consumer

    @app.middleware("http")
    async def identify_consumer(request: Request, call_next):
        consumer = consumer_for(request.headers.get("authorization"))
        if consumer:
            set_consumer(request, *consumer)
        return await call_next(request)

    app.add_middleware(ApitallyMiddleware, client_id=CLIENT_ID, env=ENV)
elif OFFICIAL1:
    import apitally.fastapi

    @app.middleware("http")
    async def identify_consumer_1x(request: Request, call_next):
        set_consumer_1x(request.headers.get("authorization"))
        return await call_next(request)

    apitally.fastapi.init(app)
else:
    # With apitally-proxy: name the consumer in response headers.
    @app.middleware("http")
    async def consumer_header(request: Request, call_next):
        response = await call_next(request)
        consumer = consumer_for(request.headers.get("authorization"))
        if consumer:
            response.headers.update(consumer_headers(consumer))
        return response
