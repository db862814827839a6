"""A plain Flask app with no OpenAPI document: the proxy must learn its templates from traffic.

Routes the way a new user writes them: words as parameters (`<username>`), ids of
mixed shape, a handler 404 for users that do not exist, and a parameter the handler
rejects with 400.
"""

from __future__ import annotations

from flask import Flask, abort, jsonify

app = Flask(__name__)

USERS = {
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
    "wendy", "xavier", "yolanda", "zoe", "quentin", "ursula",
}  # fmt: skip


@app.get("/users/<username>")
def user(username: str):
    if username not in USERS:
        abort(404)  # a real route, a handler 404: the official client counts it
    return jsonify(name=username)


@app.get("/users/<username>/posts/<int:post_id>")
def post(username: str, post_id: int):
    if username not in USERS:
        abort(404)
    return jsonify(user=username, post=post_id)


@app.get("/orders/<order_id>")
def order(order_id: str):
    return jsonify(order=order_id)


@app.get("/items/<item_id>")
def item(item_id: str):
    if not item_id.isdigit():
        return jsonify(error="item_id must be a number"), 400
    return jsonify(item=int(item_id))


@app.get("/users/me")
def me():
    return jsonify(name="me")
