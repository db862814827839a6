"""OpenAPI documents → route sets, and discovery against a real upstream socket."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from apitally_proxy.config import parse_upstream
from apitally_proxy.openapi import (
    MAX_DOCUMENT_BYTES,
    DocumentError,
    RouteDiscovery,
    RouteSet,
    build_route_set,
    load_document,
)
from apitally_proxy.routes import MAX_ROUTES, declared_routes

OPENAPI3 = {
    "openapi": "3.1.0",
    "info": {"title": "shop", "version": "1"},
    "paths": {
        "/items/{item_id}": {
            "parameters": [{"name": "item_id", "in": "path", "schema": {"type": "integer"}}],
            "get": {"responses": {}},
            "delete": {"responses": {}},
        },
        "/items/{item_id}/tags/{tag}": {
            "get": {
                "parameters": [
                    {"name": "item_id", "in": "path", "schema": {"type": "integer"}},
                    {"name": "tag", "in": "path", "schema": {"type": "string"}},
                ],
                "responses": {},
            },
            "options": {"responses": {}},
        },
        "/health": {"get": {"responses": {}}, "x-internal": True},
    },
}

SWAGGER2_YAML = b"""
swagger: "2.0"
info: {title: legacy, version: "1"}
basePath: /api/v2
paths:
  /users/{id}:
    get:
      parameters:
        - {name: id, in: path, type: integer, required: true}
      responses: {}
  /users:
    post:
      responses: {}
"""


def compile_doc(doc: dict | bytes, framework: str | None = None, hint: str | None = None):
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return build_route_set(raw, "test", hint, framework, framework is None, [])


def test_openapi3_json_gives_routes_paths_and_the_document_string():
    rs = compile_doc(OPENAPI3, "fastapi")
    assert rs.table.match("GET", "/items/42") == "/items/{item_id}"
    assert rs.table.match("DELETE", "/items/42") == "/items/{item_id}"
    assert rs.table.match("GET", "/items/42/tags/red") == "/items/{item_id}/tags/{tag}"
    assert rs.table.match("GET", "/health") == "/health"
    assert rs.table.match("POST", "/health") is None
    assert json.loads(rs.openapi) == OPENAPI3
    assert {"method": "options", "path": "/items/{item_id}/tags/{tag}"} not in rs.table.paths(
        "fastapi"
    )


def test_swagger2_yaml_with_base_path():
    rs = compile_doc(SWAGGER2_YAML, "flask")
    assert rs.table.match("GET", "/api/v2/users/7") == "/api/v2/users/<int:id>"
    assert rs.table.match("GET", "/api/v2/users/x") is None  # Flask's int converter 404s
    assert rs.table.match("POST", "/api/v2/users") == "/api/v2/users"
    assert json.loads(rs.openapi)["swagger"] == "2.0"  # YAML is sent as JSON


def test_litestar_spelling_comes_from_the_parameter_schemas():
    rs = compile_doc(OPENAPI3, "litestar")
    assert rs.table.match("GET", "/items/42/tags/red") == "/items/{item_id:int}/tags/{tag:str}"
    assert rs.table.match("GET", "/items/abc") is None


def test_a_relative_server_url_prefixes_the_paths():
    doc = {**OPENAPI3, "servers": [{"url": "/api/v1"}]}
    assert compile_doc(doc, "fastapi").table.match("GET", "/api/v1/health") == "/api/v1/health"
    doc = {**OPENAPI3, "servers": [{"url": "https://example.com/x"}]}
    assert compile_doc(doc, "fastapi").table.match("GET", "/health") == "/health"


@pytest.mark.parametrize(
    ("doc", "hint", "framework"),
    [
        ({**OPENAPI3, "components": {"schemas": {"HTTPValidationError": {}}}}, None, "fastapi"),
        ({**OPENAPI3, "info": {"title": "Litestar API", "version": "1"}}, None, "litestar"),
        (OPENAPI3, "fastify", "fastify"),
        (OPENAPI3, None, None),
    ],
)
def test_the_framework_is_detected_from_the_document_and_where_it_was(doc, hint, framework):
    assert compile_doc(doc, hint=hint).framework == framework


def test_declared_routes_win_where_they_overlap_the_document():
    rs = build_route_set(
        orjson.dumps(OPENAPI3),
        "test",
        None,
        "fastapi",
        False,
        declared_routes(["GET /items/{item_id:int}", "GET /extra"]),
    )
    assert rs.table.match("GET", "/items/1") == "/items/{item_id:int}"
    assert rs.table.match("DELETE", "/items/1") == "/items/{item_id}"
    assert rs.table.match("GET", "/extra") == "/extra"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"<html>docs</html>", "not an OpenAPI document"),
        (b'{"openapi": "3.0.0", "paths": ', "not valid JSON"),
        (b"[1, 2]", "not an OpenAPI document"),
        (b'{"detail": "Not Found"}', "not an OpenAPI document"),
        (b'{"openapi": "3.0.0", "paths": []}', "no `paths`"),
        (b"a: [", "neither JSON nor YAML"),
        (b"{" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_documents_are_refused_with_a_reason(raw, reason):
    with pytest.raises(DocumentError, match=reason):
        load_document(raw)


def test_a_huge_document_is_refused_before_parsing():
    with pytest.raises(DocumentError, match="over"):
        load_document(b" " * (MAX_DOCUMENT_BYTES + 1))


def test_yaml_alias_bombs_are_refused():
    lines = ["openapi: 3.0.0", "paths: {}", 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 12):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    # 9**12 nodes once expanded: refused by the expansion budget, which bounds
    # the work by construction (no wall-clock assertion: CI machines are noisy).
    with pytest.raises(DocumentError, match=r"expands to more than \d+ nodes \(alias bomb"):
        load_document("\n".join(lines).encode())


def test_thousands_of_paths_are_cut_with_a_warning():
    doc = {
        "openapi": "3.0.0",
        "paths": {f"/r{i}/{{id}}": {"get": {}, "post": {}} for i in range(20_000)},
    }
    rs = compile_doc(doc, "fastapi")
    assert len(rs.table) == MAX_ROUTES
    assert rs.warnings and "20000 paths" in rs.warnings[0]


def test_junk_entries_in_paths_are_skipped_not_fatal():
    doc = {
        "openapi": "3.0.0",
        "paths": {"/ok": {"get": {}}, "no-slash": {"get": {}}, "/list": [], "/x": {"get": 3}},
    }
    rs = compile_doc(doc, "fastapi")
    assert [r.template for r in rs.table.routes] == ["/ok"]
    assert any("skipped" in w for w in rs.warnings)


# --- Discovery against a real upstream -------------------------------------


SEEN = web.AppKey("seen", list)


def doc_app(routes: dict[str, tuple[int, bytes]]) -> web.Application:
    app = web.Application()
    seen: list[str] = []
    app[SEEN] = seen

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        status, body = routes.get(request.path, (404, b"not found"))
        return web.Response(status=status, body=body)

    app.router.add_get("/{tail:.*}", handler)
    return app


async def serve(app: web.Application, unix: Path | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if unix is not None:
        await web.UnixSite(runner, str(unix)).start()
        return runner, f"unix:{unix}"
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def discover(upstream: str, openapi_url: str | None = None, declared=()) -> list[RouteSet]:
    found: list[RouteSet] = []
    d = RouteDiscovery(
        parse_upstream(upstream), openapi_url, None, True, list(declared), found.append
    )
    try:
        await d.refresh_once()
    finally:
        await d.stop()
    return found


async def test_probing_follows_the_design_order_and_skips_non_documents():
    app = doc_app(
        {
            "/openapi.json": (200, b'{"detail": "a catch-all, not a document"}'),
            "/schema/openapi.json": (200, orjson.dumps(OPENAPI3)),
        }
    )
    runner, url = await serve(app)
    try:
        (rs,) = await discover(url)
    finally:
        await runner.cleanup()
    assert app[SEEN] == ["/openapi.json", "/schema/openapi.json"]
    assert rs.source == "/schema/openapi.json"
    assert rs.framework == "litestar"


async def test_starlette_yaml_schema_over_a_unix_socket(tmp_path):
    yaml_doc = (
        b"openapi: 3.0.0\ninfo: {title: t, version: '1'}\npaths:\n  /users/{id}:\n    get: {}\n"
    )
    app = doc_app({"/schema": (200, yaml_doc)})
    runner, url = await serve(app, unix=tmp_path / "app.sock")
    try:
        (rs,) = await discover(url)
    finally:
        await runner.cleanup()
    assert rs.framework == "starlette"
    assert rs.table.match("GET", "/users/3") == "/users/{id}"


async def test_an_openapi_url_may_be_a_file(tmp_path):
    path = tmp_path / "openapi.json"
    path.write_bytes(orjson.dumps(OPENAPI3))
    (rs,) = await discover("http://127.0.0.1:9", openapi_url=str(path))
    assert rs.table.match("GET", "/health") == "/health"


async def test_no_document_keeps_declared_routes_and_says_so(caplog):
    # Not a problem with routes declared: said once at info level, naming them.
    caplog.set_level(logging.INFO, logger="apitally_proxy.routes")
    app = doc_app({})
    runner, url = await serve(app)
    try:
        found = await discover(url, declared=declared_routes(["GET /items/:id"]))
    finally:
        await runner.cleanup()
    assert found == []  # the declared routes stay as they are
    assert [p for p in app[SEEN]] == [
        "/openapi.json",
        "/schema/openapi.json",
        "/openapi/openapi.json",
        "/documentation/json",
        "/apispec_1.json",
        "/schema",
    ]
    assert "no OpenAPI document found" in caplog.text
    assert "using the declared routes (1)" in caplog.text
    assert "heuristic" not in caplog.text


async def test_an_explicit_openapi_path_on_the_app_is_fetched_from_the_upstream(caplog):
    app = doc_app({"/api/spec": (200, orjson.dumps(OPENAPI3))})
    runner, url = await serve(app)
    try:
        (rs,) = await discover(url, openapi_url="/api/spec")
        assert await discover(url, openapi_url="/api/missing") == []
    finally:
        await runner.cleanup()
    assert rs.table.match("GET", "/health") == "/health"
    assert "no OpenAPI document at /api/missing" in caplog.text


async def test_a_big_document_is_parsed_off_the_event_loop(monkeypatch):
    # Parsing a few MB takes a while: it must run in a worker thread, never on
    # the loop that serves traffic. Checked by thread identity, not by timing.
    import threading

    from apitally_proxy import openapi

    doc = {"openapi": "3.0.0", "paths": {f"/p{i}/{{x}}": {"get": {}} for i in range(4000)}}
    for i in range(4000):
        doc["paths"][f"/p{i}/{{x}}"]["get"]["description"] = "y" * 1000
    parsed_in: list[int] = []
    real_load = openapi.load_document

    def spying_load(raw):
        parsed_in.append(threading.get_ident())
        return real_load(raw)

    monkeypatch.setattr(openapi, "load_document", spying_load)
    app = doc_app({"/openapi.json": (200, orjson.dumps(doc))})
    runner, url = await serve(app)
    try:
        (rs,) = await discover(url)
    finally:
        await runner.cleanup()
    assert len(rs.table) == 4000
    assert parsed_in and threading.get_ident() not in parsed_in
