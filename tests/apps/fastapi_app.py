"""A FastAPI app with the route shapes the route-template tests need.

Run: uvicorn tests.apps.fastapi_app:app
"""

from __future__ import annotations

from fastapi import FastAPI, Response

app = FastAPI(title="shop")


@app.get("/items")
def list_items() -> list[int]:
    return [1, 2]


@app.post("/items")
def create_item() -> dict[str, bool]:
    return {"created": True}


@app.get("/items/special")
def special_item() -> dict[str, str]:
    return {"id": "special"}


@app.get("/items/{item_id}")
def get_item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


@app.get("/users/{user_id}/orders/{order_id}")
def get_order(user_id: int, order_id: int) -> dict[str, int]:
    return {"user": user_id, "order": order_id}


@app.get("/files/{name}")
def get_file(name: str) -> dict[str, str]:
    return {"name": name}


@app.get("/override/{anything}")
def override(anything: str, response: Response) -> dict[str, str]:
    # The app names the route itself; the proxy must count it under this header.
    response.headers["X-Apitally-Route"] = "/override/{anything}/custom"
    return {"anything": anything}
