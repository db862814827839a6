"""The Flask parity app: plain behind apitally-proxy, or with the official client.

Run: gunicorn tests.apps.parity_flask_app:app   (PARITY_MODE=official for the client)
"""

from __future__ import annotations

from flask import Flask, abort, g, request

from tests.apps.parity_common import (
    CLIENT_ID,
    ENV,
    OFFICIAL,
    OFFICIAL1,
    consumer_for,
    consumer_headers,
    set_consumer_1x,
)

app = Flask(__name__)


@app.get("/items")
def list_items():
    return [{"name": "a"}, {"name": "b"}]


@app.post("/items")
def create_item():
    data = request.get_json(silent=True)
    errors = []
    if not isinstance(data, dict):
        return {"errors": [{"field": "", "message": "expected a JSON object"}]}, 400
    if not isinstance(data.get("name"), str):
        errors.append({"field": "name", "message": "must be a string"})
    if not isinstance(data.get("price"), int | float):
        errors.append({"field": "price", "message": "must be a number"})
    if errors:
        return {"errors": errors}, 400
    return {"name": data["name"]}, 201


@app.get("/items/<int:item_id>")
def get_item(item_id: int):
    if item_id > 100:
        abort(404)
    return {"id": item_id}


@app.get("/users/<int:user_id>/orders/<int:order_id>")
def get_order(user_id: int, order_id: int):
    return {"user": user_id, "order": order_id}


@app.get("/boom")
def boom():
    raise RuntimeError("boom")


@app.before_request
def identify_consumer():
    g.consumer = consumer_for(request.headers.get("Authorization"))


if OFFICIAL:
    from apitally.flask import ApitallyMiddleware, set_consumer

    @app.before_request
    def set_apitally_consumer():
        if g.consumer:
            set_consumer(*g.consumer)

    app.wsgi_app = ApitallyMiddleware(app, client_id=CLIENT_ID, env=ENV)
elif OFFICIAL1:
    import apitally.flask

    @app.before_request
    def set_apitally_consumer_1x():
        set_consumer_1x(request.headers.get("Authorization"))

    apitally.flask.init(app)
else:
    # With apitally-proxy: name the consumer in response headers (error responses included).
    @app.after_request
    def consumer_header(response):
        if g.get("consumer"):
            response.headers.update(consumer_headers(g.consumer))
        return response
