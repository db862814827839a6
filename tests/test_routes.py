"""Heuristic route templates and their cardinality cap."""

import pytest

from apitally_proxy.routes import OVERFLOW_TEMPLATE, RouteResolver, template_segments


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
