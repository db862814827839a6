"""The Django Ninja parity app: plain behind apitally-proxy, or with the official client.

Run: gunicorn tests.apps.parity_django_ninja_app:app   (PARITY_MODE=official for the client)

The URLconf, the API and the middleware; the settings are
tests/apps/parity_django_ninja_settings.py. The API is mounted at the root, or
under `DJANGO_NINJA_ROOT` (e.g. `api/`, Django Ninja's tutorial mount, where its
document is `/api/openapi.json`).
"""

from __future__ import annotations

import os

# Settings from their own module (before anything reads them), unless the server sets one.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.parity_django_ninja_settings")

from django.core.wsgi import get_wsgi_application
from django.urls import path
from ninja import NinjaAPI, Schema
from ninja.errors import HttpError

from tests.apps.parity_common import consumer_for, consumer_headers

ROOT = os.environ.get("DJANGO_NINJA_ROOT", "")

api = NinjaAPI()


class ItemIn(Schema):
    name: str
    price: float


@api.get("/items")
def list_items(request):
    return [{"name": "a"}, {"name": "b"}]


@api.post("/items", response={201: dict})
def create_item(request, payload: ItemIn):
    return 201, {"name": payload.name}


@api.get("/items/{item_id}")
def get_item(request, item_id: int):
    if item_id > 100:
        raise HttpError(404, "no such item")
    return {"id": item_id}


@api.get("/users/{user_id}/orders/{order_id}")
def get_order(request, user_id: int, order_id: int):
    return {"user": user_id, "order": order_id}


@api.get("/boom")
def boom(request):
    raise RuntimeError("boom")


def consumer_header(get_response):
    """With apitally-proxy: name the consumer in response headers (error responses included)."""

    def middleware(request):
        response = get_response(request)
        consumer = consumer_for(request.headers.get("Authorization"))  # (id, name, group)
        if consumer:
            for name, value in consumer_headers(consumer).items():
                response[name] = value
        return response

    return middleware


def apitally_consumer(get_response):
    """With the official client: `request.apitally_consumer`, read after the view."""
    from apitally.django import ApitallyConsumer

    def middleware(request):
        consumer = consumer_for(request.headers.get("Authorization"))
        if consumer:
            identifier, name, group = consumer
            request.apitally_consumer = ApitallyConsumer(identifier, name=name, group=group)
        return get_response(request)

    return middleware


urlpatterns = [path(ROOT, api.urls)]
app = get_wsgi_application()
