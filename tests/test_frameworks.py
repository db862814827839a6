"""The framework registry (apitally_proxy/frameworks.py): one record per framework.

The modules that act on per-framework facts read them from the registry; these
tests hold the registry together (every name it hands out means something to the
modules that read it) and pin the translation of the `framework` setting.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

import tests.support.parity as parity_support
from apitally_proxy import frameworks
from apitally_proxy.config import FRAMEWORKS, load_settings
from apitally_proxy.metering.validation import PARSERS, extract_validation_errors, readers
from apitally_proxy.openapi import PROBE_PATHS, detect_framework
from apitally_proxy.routes import (
    MatchRules,
    RouteTable,
    declared_routes,
    parse_template,
    paths_method,
    spell,
)
from tests.support.app_process import AppProcess
from tests.support.parity import (
    ROOT,
    AppSpec,
    ParityResult,
    Step,
    consumers,
    npm_ci,
    python_server,
    request_rows,
    run_parity,
    startup_paths,
    validation_errors,
)
from tests.support.proxy_process import free_port
from tests.test_parity import SIZE_FIELDS, Difference, normalised


def test_every_record_is_filed_under_its_name_and_the_settings_offer_them_all():
    assert all(name == f.name for name, f in frameworks.FRAMEWORKS.items())
    assert FRAMEWORKS == frameworks.NAMES
    assert set(frameworks.SETTING_VALUES) == {"auto", "none", *frameworks.NAMES}


@pytest.mark.parametrize("framework", list(frameworks.FRAMEWORKS.values()), ids=str)
def test_a_record_names_only_what_the_modules_know(framework: frameworks.Framework):
    assert framework.client_tag.split(":")[0] in ("python", "js")
    if framework.validation is not None:
        assert framework.validation.parser in PARSERS
        assert framework.validation.statuses <= frameworks.VALIDATION_STATUSES
    for probe in framework.probes:
        assert probe.path.startswith("/")
    assert load_settings({"upstream": "http://a:1", "framework": framework.name}).framework == (
        framework.name
    )


def test_the_settings_words_auto_and_none_are_read_in_one_place():
    assert frameworks.from_setting("auto") == frameworks.Choice(None, guess=True)
    assert frameworks.from_setting("none") == frameworks.Choice(None, guess=False)
    fastify = frameworks.from_setting("fastify")
    assert (fastify.framework, fastify.guess, fastify.name) == (
        frameworks.FRAMEWORKS["fastify"],
        False,
        "fastify",
    )
    with pytest.raises(ValueError, match="unknown framework 'rails'"):
        frameworks.from_setting("rails")
    # Unknown is None everywhere inside: lookups of None (or of a settings word) find nothing.
    assert frameworks.get(None) is None and frameworks.get("auto") is None
    assert MatchRules.for_framework(None) == frameworks.UNKNOWN_RULES


def test_validation_readers_unknown_guesses_every_shape_none_reads_nothing():
    assert readers("auto") == readers(None) == frameworks.EVERY_VALIDATION
    assert readers("none") == readers(None, guess=False) == ()
    assert readers("flask") == ()  # the official Flask client extracts no validation errors
    assert readers("fastapi") == readers("starlette")  # one Starlette middleware
    # Registry order, each shape once.
    assert len(set(frameworks.EVERY_VALIDATION)) == len(frameworks.EVERY_VALIDATION)


def test_the_probe_order_is_the_one_design_md_gives():
    assert PROBE_PATHS == (
        ("/openapi.json", None),
        ("/schema/openapi.json", "litestar"),
        ("/openapi/openapi.json", "flask"),
        ("/documentation/json", "fastify"),
        ("/apispec_1.json", "flask"),
        ("/schema", "starlette"),
    )
    # A framework that is set explicitly keeps the same order unless it has unranked probes.
    assert frameworks.probe_paths("litestar") == PROBE_PATHS


@pytest.mark.parametrize(
    ("doc", "hint", "expected"),
    [
        ({"components": {"schemas": {"HTTPValidationError": {}}}}, None, "fastapi"),
        ({"info": {"title": "Litestar API"}}, "flask", "litestar"),
        ({"info": {"title": ["not", "a", "string"]}}, "flask", "flask"),
        ({"components": ["not", "an", "object"]}, None, None),
    ],
)
def test_detection_reads_the_document_before_the_location(doc, hint, expected):
    assert detect_framework(doc, hint) == expected


@pytest.mark.parametrize(
    ("framework", "spelled", "method"),
    [
        ("starlette", "/f/{rest:path}/{id}/{n}", "get"),
        ("fastapi", "/f/{rest:path}/{id}/{n}", "get"),
        ("flask", "/f/<path:rest>/<int:id>/<n>", "GET"),
        ("litestar", "/f/{rest:path}/{id:int}/{n:str}", "GET"),
        ("fastify", "/f/:rest/:id/:n", "GET"),
        (None, "/f/{rest}/{id}/{n}", "GET"),
    ],
)
def test_each_framework_spells_templates_and_paths_its_way(framework, spelled, method):
    segments = parse_template("/f/{rest:path}/{id:int}/{n}")
    assert spell(segments, framework) == spelled
    assert paths_method("GET", framework) == method


def test_litestar_templates_lose_their_types_for_apitally_1x():
    litestar = frameworks.FRAMEWORKS["litestar"]
    segments = parse_template("/items/{id:int}")
    assert spell(segments, litestar.template_spelling()) == "/items/{id:int}"
    assert spell(segments, litestar.template_spelling(otlp=True)) == "/items/{id}"


# ---------------------------------------------------------------- new frameworks, for real
#
# Each framework added to the registry runs the parity traffic (tests/support/parity.py)
# and traffic of its own through a real proxy in front of its real app, and the same
# traffic at the app with its official Apitally client installed, each reporting to a
# fake hub; then what both hubs received is compared as tests/test_parity.py does, and
# the facts read from the official client's source are asserted outright.


@dataclass(frozen=True)
class HeadDifference(Difference):
    """A by-design difference on HEAD rows only."""

    def covers(self, key) -> bool:
        return key[1] == "HEAD" and super().covers(key)


@dataclass(frozen=True)
class NewFramework:
    spec: AppSpec
    extra: tuple[Step, ...]  # traffic of its own, after the shared TRAFFIC
    differences: tuple[Difference, ...]
    client_tag: str
    paths: list[tuple[str, str]]  # the startup paths, as the official client sends them
    counted: dict[tuple[str, str, int], int]  # (method, template, status) -> requests
    validation_locs: set[tuple[str, ...]]


EXPRESS_PARITY_DIR = ROOT / "tests" / "apps" / "parity_express"


def _gunicorn(target: str):
    return python_server("gunicorn", "--bind", "127.0.0.1:{port}", "--workers", "1", target)


NEW: dict[str, NewFramework] = {
    "django-ninja": NewFramework(
        # Templates and startup paths come from the app's own OpenAPI document (/openapi.json,
        # the API mounted at the root), spelled `{name}` as Django Ninja writes them.
        AppSpec("django-ninja", _gunicorn("tests.apps.parity_django_ninja_app:app")),
        extra=(
            Step("HEAD", "/items", "key-acme"),  # Ninja: 405, counted under the route
            Step("DELETE", "/items/1", "key-muller"),  # 405, counted under the route
            Step("GET", "/items/abc", "key-solo"),  # 422 for the path parameter
            Step("GET", "/items/", "key-acme"),  # no trailing-slash route: not counted
            Step("GET", "/ITEMS", "key-acme"),  # Django is case-sensitive: not counted
        ),
        differences=(
            HeadDifference(
                "HEAD: the official client counts the body Django built (`Method not "
                "allowed`, 18 bytes), which a HEAD response does not send; the proxy counts "
                "the bytes forwarded",
                status=405,
                path="/items",
                ignore=SIZE_FIELDS,
            ),
        ),
        client_tag="python:django",
        paths=sorted(
            [
                ("get", "/items"),
                ("post", "/items"),
                ("get", "/items/{item_id}"),
                ("get", "/users/{user_id}/orders/{order_id}"),
                ("get", "/boom"),
            ]
        ),
        counted={
            ("GET", "/items", 200): 3,
            ("GET", "/items/{item_id}", 200): 4,
            ("GET", "/items/{item_id}", 404): 1,
            ("GET", "/items/{item_id}", 422): 1,
            ("GET", "/users/{user_id}/orders/{order_id}", 200): 2,
            ("POST", "/items", 201): 2,
            ("POST", "/items", 422): 3,
            ("GET", "/boom", 500): 2,
            ("HEAD", "/items", 405): 1,
            ("DELETE", "/items/{item_id}", 405): 1,
        },
        validation_locs={
            ("body", "payload", "name"),
            ("body", "payload", "price"),
            ("path", "item_id"),
        },
    ),
    "express": NewFramework(
        # Express serves no OpenAPI document: the routes are declared, as Express spells them.
        AppSpec(
            "express",
            lambda port: [shutil.which("node") or "node", "app.js", str(port)],
            cwd=EXPRESS_PARITY_DIR,
            routes=(
                "GET /items",
                "POST /items",
                "GET /items/:itemId",
                "GET /users/:userId/orders/:orderId",
                "GET /boom",
            ),
            prepare=lambda: npm_ci(EXPRESS_PARITY_DIR),
        ),
        extra=(
            Step("GET", "/ITEMS", "key-acme"),  # Express routes are case-insensitive
            Step("GET", "/items/", "key-muller"),  # and ignore a trailing slash
            Step("HEAD", "/items", "key-solo"),  # HEAD runs the GET route
            Step("GET", "/items/a%2Fb", "key-acme"),  # one segment, decoded after matching
        ),
        differences=(
            HeadDifference(
                "HEAD: the official middleware counts the Content-Length of the body a GET "
                "would send; the proxy counts the bytes forwarded (none)",
                path="/items",
                ignore=SIZE_FIELDS,
            ),
        ),
        client_tag="js:express",
        paths=sorted(
            [
                ("GET", "/items"),
                ("POST", "/items"),
                ("GET", "/items/:itemId"),
                ("GET", "/users/:userId/orders/:orderId"),
                ("GET", "/boom"),
            ]
        ),
        counted={
            ("GET", "/items", 200): 5,
            ("HEAD", "/items", 200): 1,
            ("GET", "/items/:itemId", 200): 5,
            ("GET", "/items/:itemId", 404): 1,
            ("GET", "/users/:userId/orders/:orderId", 200): 2,
            ("POST", "/items", 201): 2,
            ("POST", "/items", 400): 3,
            ("GET", "/boom", 500): 2,
        },
        validation_locs={("body", "name"), ("body", "price")},
    ),
}


@pytest.fixture(scope="module", params=list(NEW))
def new_framework(request, tmp_path_factory) -> Iterator[tuple[NewFramework, ParityResult]]:
    case = NEW[request.param]
    if case.spec.framework == "express" and not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed for the Express parity app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parity_support, "TRAFFIC", (*parity_support.TRAFFIC, *case.extra))
        result = run_parity(case.spec, tmp_path_factory.mktemp(f"new-{request.param}"))
    yield case, result


def _rows(result_side, case: NewFramework, official: bool):
    return normalised(request_rows(result_side), case.differences, official=official)


@pytest.mark.parity
def test_new_framework_requests_counted_under_its_templates(new_framework):
    case, result = new_framework
    assert result.proxy.statuses == result.official.statuses
    proxy = _rows(result.proxy, case, official=False)
    official = _rows(result.official, case, official=True)
    assert {k: r["request_count"] for k, r in proxy.items()} == {
        k: r["request_count"] for k, r in official.items()
    }
    by_route: dict[tuple[str, str, int], int] = {}
    for (_, method, path, status), row in proxy.items():
        by_route[(method, path, status)] = (
            by_route.get((method, path, status), 0) + row["request_count"]
        )
    assert by_route == case.counted


@pytest.mark.parity
@pytest.mark.parametrize(
    "field", ["request_size_sum", "response_size_sum", "request_sizes", "response_sizes"]
)
def test_new_framework_sizes(new_framework, field):
    case, result = new_framework
    proxy = _rows(result.proxy, case, official=False)
    official = _rows(result.official, case, official=True)
    assert {k: r.get(field) for k, r in proxy.items()} == {
        k: r.get(field) for k, r in official.items()
    }


@pytest.mark.parity
def test_new_framework_consumers_and_validation_errors(new_framework):
    case, result = new_framework
    assert consumers(result.proxy) == consumers(result.official)
    assert consumers(result.proxy)
    errors = validation_errors(result.proxy)
    assert errors == validation_errors(result.official)
    assert {key[3] for key in errors} == case.validation_locs


@pytest.mark.parity
def test_new_framework_startup_paths_and_client_tag(new_framework):
    case, result = new_framework
    assert startup_paths(result.proxy) == startup_paths(result.official) == case.paths
    assert result.proxy.startups[-1]["client"] == case.client_tag
    assert result.official.startups[-1]["client"] == case.client_tag


# ---------------------------------------------------------------- their facts, one by one


def test_django_ninja_counts_a_method_the_route_lacks_under_the_route():
    # Django resolves the URL first; the Ninja view answers 405, and the official
    # middleware counts it (resolver_match is set). HEAD is such a method too.
    t = RouteTable(declared_routes(["GET /items", "POST /items"]), rules_of("django-ninja"))
    assert t.match("DELETE", "/items") == "/items"
    assert t.match("HEAD", "/items") == "/items"
    assert t.match("GET", "/items/") is None  # no APPEND_SLASH route: Django's 404
    assert t.match("GET", "/ITEMS") is None
    # The other frameworks keep to the route's methods.
    assert (
        RouteTable(declared_routes(["GET /items"]), rules_of("fastapi")).match("DELETE", "/items")
        is None
    )


def test_express_matches_case_insensitively_and_ignores_a_trailing_slash():
    t = RouteTable(
        declared_routes(["GET /items", "GET /Files/:name", "GET /docs/:id.json"]),
        rules_of("express"),
    )
    assert t.match("GET", "/ITEMS/") == "/items"
    assert t.match("GET", "/files/A%2FB") == "/Files/:name"  # decoded per segment
    assert t.match("GET", "/DOCS/7.JSON") == "/docs/:id.json"
    assert t.match("HEAD", "/items") == "/items"
    assert t.match("DELETE", "/items") is None  # Express's 404: not counted


def rules_of(name: str) -> MatchRules:
    return MatchRules.for_framework(name)


JSON = "application/json; charset=utf-8"


def test_express_error_bodies_in_the_three_shapes_the_npm_client_reads():
    validator = {
        "errors": [
            {
                "type": "field",
                "value": {},
                "msg": "Invalid value",
                "path": "name",
                "location": "body",
            },
            {"type": "field", "msg": "Too long", "path": "items[0].sku", "location": "body"},
            {"type": "alternative", "msg": "No match", "path": "", "location": "body"},  # no path
            {"type": "field", "msg": {"not": "a string"}, "path": "x", "location": "query"},
        ]
    }
    assert extract_validation_errors("express", 400, JSON, None, orjson.dumps(validator)) == [
        (("body", "name"), "Invalid value", "field"),
        (("body", "items[0]", "sku"), "Too long", "field"),
    ]
    celebrate = {
        "validation": {
            "body": {
                "source": "body",
                "keys": ["name", "price"],
                "message": '"name" is required. "price" must be a number',
            }
        }
    }
    assert extract_validation_errors("express", 422, JSON, None, orjson.dumps(celebrate)) == [
        (("body", "name"), '"name" is required', ""),
        (("body", "price"), '"price" must be a number', ""),
    ]
    nest = {"statusCode": 400, "message": ["name must be a string"], "error": "Bad Request"}
    assert extract_validation_errors("express", 400, JSON, None, orjson.dumps(nest)) == [
        ((), "name must be a string", "")
    ]
    # Another status, or no JSON: nothing read.
    assert extract_validation_errors("express", 409, JSON, None, orjson.dumps(nest)) == []


def test_django_ninja_errors_are_pydantics_with_no_size_limit_of_the_client():
    detail = [{"type": "missing", "loc": ["body", "payload", "price"], "msg": "Field required"}]
    body = orjson.dumps({"detail": detail, "padding": "x" * 60_000})  # over Starlette's 50 000
    assert extract_validation_errors("django-ninja", 422, JSON, None, body) == [
        (("body", "payload", "price"), "Field required", "missing")
    ]
    assert extract_validation_errors("fastapi", 422, JSON, None, body) == []
    assert extract_validation_errors("django-ninja", 400, JSON, None, body) == []


@pytest.mark.parametrize(
    ("framework", "spelled", "method"),
    [
        ("django-ninja", "/f/{rest}/{id}/{n}", "get"),
        ("express", "/f/:rest/:id/:n", "GET"),
    ],
)
def test_the_new_frameworks_spell_templates_and_paths_their_way(framework, spelled, method):
    test_each_framework_spells_templates_and_paths_its_way(framework, spelled, method)


def test_a_django_ninja_document_gives_itself_away_by_its_default_title():
    assert detect_framework({"info": {"title": "NinjaAPI", "version": "1.0.0"}}, None) == (
        "django-ninja"
    )
    # Set explicitly, its own location (the tutorial's `api/` mount) is probed first.
    assert frameworks.probe_paths("django-ninja")[:2] == (
        ("/api/openapi.json", "django-ninja"),
        ("/openapi.json", None),
    )


async def ninja_app(root: str) -> AppProcess:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APITALLY_", "PARITY_"))}
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    app = AppProcess(
        [*argv, "tests.apps.parity_django_ninja_app:app"],
        port,
        env={**env, "DJANGO_NINJA_ROOT": root},
    )
    return await app.start(ready_path=f"/{root}openapi.json")


@pytest.mark.parametrize(
    ("root", "setting"),
    [("api/", "django-ninja"), ("", "auto")],
    ids=["api-mount-framework-set", "root-mount-auto"],
)
async def test_the_proxy_finds_a_django_ninja_document_and_meters_under_its_templates(
    root, setting, hub, hub_args, http, start_proxy
):
    app = await ninja_app(root)
    try:
        proxy = await start_proxy(app.url, *hub_args, "--framework", setting)
        routes = await proxy.wait_status(lambda s: s["routes"]["source"] is not None)
        routes = routes["routes"]
        assert (routes["source"], routes["framework"]) == (f"/{root}openapi.json", "django-ninja")
        prefix = "/" + root.rstrip("/") if root else ""
        for method, path, body in [
            ("GET", "/items/7", None),
            ("GET", "/items/8", None),
            ("POST", "/items", {"name": "pen"}),
            ("DELETE", "/items/7", None),
        ]:
            async with http.request(method, proxy.url + prefix + path, json=body) as r:
                await r.read()
        assert await proxy.stop() == 0
    finally:
        await app.stop()
    assert hub.request_counts() == {
        (None, "GET", f"{prefix}/items/{{item_id}}", 200): 2,
        (None, "POST", f"{prefix}/items", 422): 1,
        (None, "DELETE", f"{prefix}/items/{{item_id}}", 405): 1,
    }
    [startup, *_] = hub.accepted("startup")
    assert startup["client"] == "python:django"
    assert {"method": "get", "path": f"{prefix}/items/{{item_id}}"} in startup["paths"]
    [error] = [e for p in hub.accepted("sync") for e in p["validation_errors"]]
    assert (error["path"], error["loc"]) == (f"{prefix}/items", ["body", "payload", "price"])
