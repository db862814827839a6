"""The plain Starlette twin of learned_flask_app: no OpenAPI document, words as parameters."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.apps.learned_flask_app import USERS


async def me(request: Request) -> JSONResponse:
    return JSONResponse({"name": "me"})


async def user(request: Request) -> JSONResponse:
    username = request.path_params["username"]
    if username not in USERS:
        return JSONResponse({"detail": "Not Found"}, status_code=404)  # a handler 404
    return JSONResponse({"name": username})


async def post(request: Request) -> JSONResponse:
    if request.path_params["username"] not in USERS:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return JSONResponse({"post": request.path_params["post_id"]})


async def order(request: Request) -> JSONResponse:
    return JSONResponse({"order": request.path_params["order_id"]})


async def item(request: Request) -> JSONResponse:
    item_id = request.path_params["item_id"]
    if not item_id.isdigit():
        return JSONResponse({"error": "item_id must be a number"}, status_code=400)
    return JSONResponse({"item": int(item_id)})


app = Starlette(
    routes=[
        Route("/users/me", me),
        Route("/users/{username}", user),
        Route("/users/{username}/posts/{post_id:int}", post),
        Route("/orders/{order_id}", order),
        Route("/items/{item_id}", item),
    ]
)
