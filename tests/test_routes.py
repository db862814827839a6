"""Heuristic route templates and their cardinality cap."""

import pytest

from apitally_proxy.routes import (
    OVERFLOW_TEMPLATE,
    MatchRules,
    Param,
    RouteOverrides,
    RouteResolver,
    RouteTable,
    declared_routes,
    parse_declared,
    parse_template,
    spell,
    template_segments,
)


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/items/42", "/items/{id}"),
        ("/items/42/", "/items/{id}/"),
        ("/users/7/orders/9", "/users/{id}/orders/{id2}"),
        ("/docs/3f2504e0-4f89-11d3-9a0c-0305e82c3301", "/docs/{id}"),
        ("/blobs/5f2b1c9e8d7a6b5c4d3e2f1a", "/blobs/{id}"),
        ("/objects/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/objects/{id}"),
        ("/tokens/aB3dE5fG7hJ9kL1mN3pQ5rS7", "/tokens/{id}"),
        ("/search/caf%C3%A9", "/search/{id}"),
        ("/items", "/items"),
        ("/api/v1/health", "/api/v1/health"),
        ("/", "/"),
        ("/users/me/profile", "/users/me/profile"),
        ("/files/report-2024", "/files/report-2024"),
    ],
)
def test_id_like_segments_become_parameters(path, template):
    assert template_segments(path) == template


def test_very_long_and_deep_paths_are_bounded():
    assert len(template_segments("/a" * 5000)) <= 2048 + 10
    assert template_segments("/x" * 100).count("/") <= 33


def test_templates_per_method_are_capped_and_overflow_is_counted():
    r = RouteResolver(max_templates_per_method=3, cache_size=100)
    got = [r.resolve("GET", f"/random-{name}") for name in ("a", "b", "c", "d", "e")]
    assert got[:3] == ["/random-a", "/random-b", "/random-c"]
    assert got[3:] == [OVERFLOW_TEMPLATE, OVERFLOW_TEMPLATE]
    assert r.overflow == 2
    # Known templates keep resolving, and other methods have their own budget.
    assert r.resolve("GET", "/random-a") == "/random-a"
    assert r.resolve("POST", "/random-z") == "/random-z"


def test_hostile_cardinality_keeps_memory_bounded():
    r = RouteResolver(max_templates_per_method=100, cache_size=1000)
    for i in range(50_000):
        r.resolve("GET", f"/p{i}x")
    assert len(r._cache) <= 1000
    assert sum(len(s) for s in r._templates.values()) <= 100
    assert r.overflow == 50_000 - 100


# --- Known route sets: the compiled matcher ---------------------------------


def table(*entries: str, framework: str | None = "starlette") -> RouteTable:
    return RouteTable(declared_routes(entries), MatchRules.for_framework(framework))


def test_a_known_route_set_resolves_to_the_apps_templates():
    t = table("GET /items/{item_id}", "GET /users/{user_id}/orders/{order_id}")
    assert t.match("GET", "/items/42") == "/items/{item_id}"
    assert t.match("GET", "/items/43") == "/items/{item_id}"
    assert t.match("GET", "/users/7/orders/9") == "/users/{user_id}/orders/{order_id}"


def test_paths_matching_no_route_are_none():
    t = table("GET /items/{item_id}")
    assert t.match("GET", "/items") is None
    assert t.match("GET", "/items/1/extra") is None
    assert t.match("GET", "/other/1") is None
    assert t.match("GET", "/items/") is None  # an empty segment is no parameter


def test_a_method_the_route_does_not_have_is_none():
    t = table("GET /items/{item_id}", "DELETE /items/special")
    assert t.match("POST", "/items/1") is None
    # The literal route has no GET: the parameter route still serves it.
    assert t.match("GET", "/items/special") == "/items/{item_id}"


def test_literal_segments_beat_parameters_whatever_the_declaration_order():
    t = table("GET /users/{user_id}", "GET /users/me", "GET /users/{user_id}/posts")
    assert t.match("GET", "/users/me") == "/users/me"
    assert t.match("GET", "/users/you") == "/users/{user_id}"
    # Backtracking: the literal branch has no /posts, the parameter branch does.
    assert t.match("GET", "/users/me/posts") == "/users/{user_id}/posts"


@pytest.mark.parametrize(
    ("entry", "path", "template"),
    [
        ("GET /items/{id}", "/items/1", "/items/{id}"),
        ("GET /items/{id:int}", "/items/1", "/items/{id:int}"),
        ("GET /items/<int:id>", "/items/1", "/items/<int:id>"),
        ("GET /items/<id>", "/items/x", "/items/<id>"),
        ("GET /items/<string(length=2):code>", "/items/de", "/items/<string(length=2):code>"),
        ("GET /items/:id", "/items/1", "/items/:id"),
        ("GET /files/{p:path}", "/files/a/b/c.txt", "/files/{p:path}"),
        ("GET /files/<path:p>", "/files/a/b", "/files/<path:p>"),
        ("GET /static/*", "/static/css/site.css", "/static/*"),
        ("GET /reports/{name}.json", "/reports/q3.json", "/reports/{name}.json"),
        ("GET /flights/:from-:to", "/flights/ber-lis", "/flights/:from-:to"),
        ("GET /v1/models/{model}:predict", "/v1/models/m1:predict", "/v1/models/{model}:predict"),
    ],
)
def test_every_frameworks_spelling_matches_and_is_reported_as_written(entry, path, template):
    assert table(entry).match("GET", path) == template


def test_typed_parameters_only_match_their_type():
    t = table("GET /items/<int:id>", "GET /items/<slug>", framework="flask")
    assert t.match("GET", "/items/42") == "/items/<int:id>"
    assert t.match("GET", "/items/abc") == "/items/<slug>"
    u = table("GET /u/{id:uuid}")
    assert u.match("GET", "/u/3f2504e0-4f89-11d3-9a0c-0305e82c3301") == "/u/{id:uuid}"
    assert u.match("GET", "/u/42") is None


def test_trailing_slash_is_strict_except_for_litestar():
    strict = table("GET /items", "GET /dir/", framework="fastapi")
    assert strict.match("GET", "/items/") is None  # Starlette redirects; the redirect is unmatched
    assert strict.match("GET", "/dir") is None
    assert strict.match("GET", "/dir/") == "/dir/"
    lenient = table("GET /items", framework="litestar")
    assert lenient.match("GET", "/items/") == "/items"


def test_percent_encoding_is_decoded_as_the_frameworks_do():
    py = table("GET /café", "GET /files/{name}", framework="starlette")
    assert py.match("GET", "/caf%C3%A9") == "/café"
    assert py.match("GET", "/files/a%20b") == "/files/{name}"
    # Starlette decodes the whole path first: an encoded slash splits the segment.
    assert py.match("GET", "/files/a%2Fb") is None
    # Fastify splits first and decodes each segment: the slash stays inside.
    js = table("GET /files/:name", framework="fastify")
    assert js.match("GET", "/files/a%2Fb") == "/files/:name"


def test_head_is_served_by_get_routes_where_the_framework_does_so():
    assert table("GET /x", framework="starlette").match("HEAD", "/x") == "/x"
    assert table("GET /x", framework="flask").match("HEAD", "/x") == "/x"
    assert table("GET /x", framework="fastapi").match("HEAD", "/x") is None


def test_routes_without_a_method_match_any_method_but_are_not_listed():
    t = table("/any/{id}", "POST /listed")
    assert t.match("PATCH", "/any/1") == "/any/{id}"
    assert t.paths("flask") == [{"method": "POST", "path": "/listed"}]


def test_startup_paths_use_the_frameworks_method_case():
    t = table("GET /a", "POST /a", "HEAD /a")
    assert t.paths("fastapi") == [{"method": "get", "path": "/a"}, {"method": "post", "path": "/a"}]
    assert t.paths("litestar") == [
        {"method": "GET", "path": "/a"},
        {"method": "POST", "path": "/a"},
    ]


@pytest.mark.parametrize(
    ("framework", "spelled"),
    [
        ("litestar", "/items/{item_id:int}/tags/{tag:str}"),
        ("flask", "/items/<int:item_id>/tags/<tag>"),
        ("fastify", "/items/:item_id/tags/:tag"),
        ("fastapi", "/items/{item_id}/tags/{tag}"),
        (None, "/items/{item_id}/tags/{tag}"),
    ],
)
def test_templates_are_spelled_per_framework(framework, spelled):
    segments = [*parse_template("/items/{item_id}/tags/{tag}")]
    segments[1] = Param("item_id", "int")
    segments[3] = Param("tag", "str")
    assert spell(segments, framework) == spelled


@pytest.mark.parametrize(
    "entry",
    ["items/{id}", "FETCH /items", "GET", "GET /" + "a/" * 40, "GET /x/:id([)"],
)
def test_bad_declared_routes_are_refused_with_a_reason(entry):
    with pytest.raises(ValueError):
        parse_declared(entry)


def test_a_known_route_set_replaces_heuristics_and_unmatched_is_none():
    r = RouteResolver()
    assert r.resolve("GET", "/items/42") == "/items/{id}"
    assert r.use_table(table("GET /items/{item_id}")) is True
    assert r.resolve("GET", "/items/42") == "/items/{item_id}"
    assert r.resolve("GET", "/nope/1") is None
    assert r.paths() == [{"method": "GET", "path": "/items/{item_id}"}]
    assert r.use_table(table("GET /items/{item_id}")) is False  # same paths: no re-announce


def test_the_upstream_base_path_is_part_of_what_the_app_routes():
    r = RouteResolver(base_path="/api")
    r.use_table(table("GET /api/items/{id}"))
    assert r.resolve("GET", "/items/1") == "/api/items/{id}"


def test_route_overrides_are_vetted_and_capped():
    o = RouteOverrides(max_per_method=2)
    assert o.accept("GET", " /a/{x} ") == "/a/{x}"
    assert o.accept("GET", "not-a-path") is None
    assert o.accept("GET", "/b") == "/b"
    assert o.accept("GET", "/c") == OVERFLOW_TEMPLATE
    assert o.accept("GET", "/a/{x}") == "/a/{x}"
    assert o.overflow == 1


def test_heuristics_do_not_learn_templates_from_404s():
    from apitally_proxy.routes import RouteResolver

    r = RouteResolver(max_templates_per_method=3)
    for i in range(100):  # a scanner's 404s
        assert r.resolve("GET", f"/wp-admin{i}.php", learn=False) is None
    assert r.resolve("GET", "/users/1/orders/2") == "/users/{id}/orders/{id2}"
    assert r.resolve("GET", "/users/9/orders/9", learn=False) == "/users/{id}/orders/{id2}"
    assert r.overflow == 0


def test_long_paths_are_not_cached():
    from apitally_proxy.routes import MAX_CACHED_PATH, RouteResolver

    r = RouteResolver(max_templates_per_method=10_000)
    for i in range(100):
        r.resolve("GET", "/" + "a" * (MAX_CACHED_PATH + 10) + str(i))
    assert r._cache == {}


def test_each_shaped_path_is_taught_once_up_to_max_taught(monkeypatch):
    """The taught hashes (a flat table that grows) behave as a set capped at MAX_TAUGHT."""
    import random

    from apitally_proxy import routes

    r = RouteResolver(max_templates_per_method=10)
    taught: list[str] = []
    monkeypatch.setattr(r.learner, "teach", lambda shaped: taught.append(shaped) or False)
    rng = random.Random(7)
    expected: list[str] = []
    seen: set[int] = set()
    words = ["".join(rng.choice("abcdefghij") for _ in range(8)) for _ in range(90_000)]
    for i in range(90_000):
        path = "/" + words[i] if i % 3 else "/" + words[rng.randrange(500)]
        learn = i % 11 != 0
        r.resolve("GET", path, learn=learn)
        key = hash(template_segments(path))
        if learn and len(seen) < routes.MAX_TAUGHT and key not in seen:
            seen.add(key)
            expected.append(template_segments(path))
    assert taught == expected
    assert r.taught == len(seen) == routes.MAX_TAUGHT
    assert len(r._taught) <= 1 << 17  # 1 MB, where a set of 50k ints took 3.8 MB
    assert {k for k in r._taught if k != -1} == seen
