"""Templates learned from traffic when the app has no route list (no OpenAPI, none declared)."""

from __future__ import annotations

import sys

import orjson
import pytest

from apitally_proxy.learning import (
    MAX_CHILDREN,
    MIN_LEAF_SIBLINGS,
    MIN_SIBLINGS,
    TemplateLearner,
    load_positions,
    save_positions,
)
from apitally_proxy.metering import Meter
from apitally_proxy.routes import RouteResolver, template_segments
from tests.support.app_process import AppProcess
from tests.support.proxy_process import free_port

NAMES = [f"name{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
WORDS = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
    "wendy", "xavier", "yolanda",
]  # fmt: skip


@pytest.mark.parametrize(
    "path",
    [
        "/users/u-1",
        "/customers/cus_9s8d7f",
        "/orders/ord-2024-0001",
        "/sessions/aB3dE5fG7hJ9kL1mN",
        "/accounts/jane@example.com",
        "/people/john.doe",
        "/releases/1.2.3",
        "/skus/sku_12ab",
        "/u/u42",
    ],
)
def test_ids_of_mixed_shape_are_parameters_at_once(path):
    assert template_segments(path).endswith("/{id}")


@pytest.mark.parametrize(
    "path", ["/api/v1/health", "/oauth2/token", "/openapi.json", "/docs/index.html", "/x/2fa"]
)
def test_words_versions_and_file_names_stay_literal(path):
    assert template_segments(path) == path


def test_many_words_continuing_alike_become_a_parameter():
    r = RouteResolver()
    for name in WORDS[: MIN_SIBLINGS - 1]:
        assert r.resolve("GET", f"/users/{name}/posts/1") == f"/users/{name}/posts/{{id}}"
    assert r.resolve("GET", f"/users/{WORDS[MIN_SIBLINGS]}/posts/1") == "/users/{id}/posts/{id2}"
    # From now on, new values, leaves too, are that parameter; kept words stay literal.
    assert r.resolve("GET", "/users/zed/posts/7") == "/users/{id}/posts/{id2}"
    assert r.resolve("GET", "/users/zed") == "/users/{id}"
    assert r.resolve("GET", "/users/me/posts/1") == "/users/me/posts/{id}"
    renames = r.take_renames()
    assert renames["/users/alice/posts/{id}"] == "/users/{id}/posts/{id2}"
    assert {p["path"] for p in r.paths()} == {
        "/users/{id}/posts/{id2}",
        "/users/{id}",
        "/users/me/posts/{id}",
    }


def test_leaves_need_more_siblings_and_the_first_segment_is_never_learned():
    r = RouteResolver()
    for name in WORDS[: MIN_LEAF_SIBLINGS - 1]:
        assert r.resolve("GET", f"/users/{name}") == f"/users/{name}"
    assert r.resolve("GET", "/users/someone") == "/users/{id}"  # the 20th: learned now
    assert r.resolve("GET", "/users/another") == "/users/{id}"
    # An API with many top-level collections keeps them all.
    for name in NAMES[:100]:
        assert r.resolve("GET", f"/{name}") == f"/{name}"


def test_collections_with_different_continuations_stay_literal():
    r = RouteResolver()
    for i, name in enumerate(WORDS):
        # /api/alice/x0, /api/bob/x1 …: no shared continuation
        assert r.resolve("GET", f"/api/{name}/x{i}y") == f"/api/{name}/x{i}y"


def test_404s_never_teach_and_validation_errors_count_under_what_is_known():
    r = RouteResolver()
    for name in WORDS[:MIN_LEAF_SIBLINGS]:
        r.resolve("GET", f"/users/{name}")
    # A user that does not exist: the handler's 404 counts under the route.
    assert r.resolve("GET", "/users/nobody", learn=False) == "/users/{id}"
    # A scanner's 404s teach nothing and count nowhere.
    for name in NAMES[:300]:
        assert r.resolve("GET", f"/admin/{name}", learn=False) is None
    assert r.learner.learned_positions() == ["/users/{id}"]
    # A parameter the app rejected (400/422) counts under the route it was sent to.
    assert r.resolve("GET", "/items/42") == "/items/{id}"
    assert r.resolve("GET", "/items/abc", loose=True) == "/items/{id}"
    assert r.resolve("GET", "/items/abc", learn=False) is None  # a 404 there: not counted
    # A validation error on a path nothing known fits still names an endpoint.
    assert r.resolve("POST", "/orders", loose=True) == "/orders"


def test_a_flood_of_distinct_paths_stays_bounded():
    r = RouteResolver(max_templates_per_method=1000)
    for i in range(5000):
        r.resolve("GET", f"/files/{NAMES[i % len(NAMES)]}x{i}q/meta")
    assert r.learner._nodes < 2 * MAX_CHILDREN + 100
    assert len(r.paths()) <= 1000


def test_the_open_interval_is_merged_under_learned_templates_before_a_sync():
    r = RouteResolver()
    meter = Meter(r)

    class Seen:
        method = "GET"
        status = 200
        response_time = 0.01
        request_size = None
        response_size = 10
        apitally_headers = None
        log = False
        request_headers = None
        response_body = None
        response_headers = None

        def __init__(self, path: str) -> None:
            self.path = path

    for name in WORDS[: MIN_LEAF_SIBLINGS + 2]:
        template, consumer = meter.record(Seen(f"/users/{name}"))
        assert consumer is None
    assert template == "/users/{id}"  # what the meter derived is returned, not written back
    rows = meter.get_and_reset()["requests"]
    assert [(row["path"], row["request_count"]) for row in rows] == [
        ("/users/{id}", MIN_LEAF_SIBLINGS + 2)
    ]


def test_learned_positions_survive_a_restart(tmp_path):
    r = RouteResolver()
    for name in WORDS[:MIN_SIBLINGS]:
        r.resolve("GET", f"/teams/{name}/members/1")
    positions = r.learner.learned_positions()
    assert positions == ["/teams/{id}"]
    path = tmp_path / "learned-routes.json"
    save_positions(path, positions)
    save_positions(path, ["/other/{id}"])  # another worker's: added, not replacing
    fresh = RouteResolver()
    fresh.learner.restore(load_positions(path))
    assert fresh.resolve("GET", "/teams/newcomer/members/3") == "/teams/{id}/members/{id2}"
    path.write_text("{not json")
    assert load_positions(path) == []


def test_a_rejected_value_counts_under_its_typed_route():
    from apitally_proxy.routes import MatchRules, RouteTable, declared_routes

    r = RouteResolver()
    table = RouteTable(declared_routes(["GET /items/{item_id:int}"]), MatchRules())
    r.use_table(table, "starlette")
    assert r.resolve("GET", "/items/abc") is None
    assert r.resolve("GET", "/items/abc", loose=True) == "/items/{item_id:int}"
    assert r.resolve("GET", "/other/abc", loose=True) is None


def test_learner_apply_renumbers_parameters():
    learner = TemplateLearner(min_siblings=2, min_leaf_siblings=2)
    learner.teach("/a/x/b/{id}")
    assert learner.teach("/a/y/b/{id}")
    assert learner.apply("/a/z/b/{id}") == "/a/{id}/b/{id2}"


# ---------------------------------------------------------------- a real Flask app


def learned_app(kind: str) -> AppProcess:
    port = free_port()
    if kind == "flask":
        argv = ["-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
        argv.append("tests.apps.learned_flask_app:app")
    else:
        argv = ["-m", "uvicorn", "tests.apps.learned_starlette_app:app"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return AppProcess([sys.executable, *argv], port)


@pytest.mark.parametrize("kind", ["flask", "starlette"])
async def test_a_plain_app_gets_the_official_clients_templates(
    kind, hub, http, start_proxy, hub_args
):
    """Flask under gunicorn, Starlette under uvicorn; neither serves an OpenAPI document."""
    app = learned_app(kind)
    await app.start()
    try:
        proxy = await start_proxy(app.url, *hub_args)
        sent = 0

        async def get(path: str) -> int:
            nonlocal sent
            async with http.get(proxy.url + path) as r:
                await r.read()
                sent += 1
                return r.status

        # Real users first: enough distinct names teach the `<username>` position.
        for user in WORDS:
            assert await get(f"/users/{user}") == 200
            assert await get(f"/users/{user}/posts/1") == 200
        statuses = []
        for i in range(200):
            user = WORDS[i % len(WORDS)] if i % 5 else f"ghost{chr(97 + i % 26)}x"
            statuses.append(await get(f"/users/{user}"))
            if i % 4 == 0:
                statuses.append(await get(f"/users/{user}/posts/{i}"))
        assert statuses.count(404) == 40 + 10  # users that do not exist: handler 404s
        assert await get("/orders/ord-2024-0001") == 200
        assert await get("/items/42") == 200
        assert await get("/items/abc") == 400
        assert await get("/users/me") == 200
        assert await get("/wp-login.php") == 404  # a scanner: not counted
        expected = {
            "/users/{id}": len(WORDS) + 200,
            "/users/{id}/posts/{id2}": len(WORDS) + 50,
            "/orders/{id}": 1,
            "/items/{id}": 2,
            "/users/me": 1,
        }

        def by_path() -> dict[str, int]:
            totals: dict[str, int] = {}
            for (_, _, path, _), n in hub.request_counts().items():
                totals[path] = totals.get(path, 0) + n
            return totals

        try:
            await hub.wait_for(lambda: by_path() == expected, timeout=20)
        except AssertionError:
            raise AssertionError(f"counted {by_path()}, expected {expected}") from None
        # The dashboard's endpoint list: what the startup payload announced last.
        startups = hub.accepted("startup")
        last = {(p["method"].upper(), p["path"]) for p in startups[-1]["paths"]}
        assert {("GET", "/users/{id}"), ("GET", "/users/{id}/posts/{id2}")} <= last
        assert await proxy.stop() == 0
        saved = orjson.loads((proxy.state_dir / "learned-routes.json").read_bytes())
        assert "/users/{id}" in saved["positions"]
    finally:
        await app.stop()
