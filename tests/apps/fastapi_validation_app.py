"""A FastAPI app whose endpoints answer invalid input with pydantic 422s.

Run: uvicorn tests.apps.fastapi_validation_app:app
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel

app = FastAPI(title="validation")


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.middleware("http")
async def consumer_header(request: Request, call_next):
    # How an integrated app names its consumer for the proxy.
    response = await call_next(request)
    customer = request.headers.get("x-customer")
    if customer:
        response.headers["X-Apitally-Consumer"] = customer
    return response


@app.post("/items")
def create_item(item: Item) -> dict[str, str]:
    return {"name": item.name}


@app.get("/search")
def search(limit: int, q: str = "") -> dict[str, int]:
    return {"limit": limit}
