"""Route templates as the app spells them: real FastAPI and Litestar apps under uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.support.app_process import AppProcess, uvicorn_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fastapi_app() -> AsyncIterator[AppProcess]:
    app = await uvicorn_app("tests.apps.fastapi_app:app").start(ready_path="/openapi.json")
    yield app
    await app.stop()


@pytest.fixture
async def litestar_app() -> AsyncIterator[AppProcess]:
    app = await uvicorn_app("tests.apps.litestar_app:app").start(ready_path="/schema/openapi.json")
    yield app
    await app.stop()


async def wait_for_routes(proxy, source: str | None = None, timeout: float = 10.0) -> dict:
    """Until the proxy's route set comes from `source` (any, when None)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        routes = (await proxy.status())["routes"]
        if routes["source"] is not None and (source is None or routes["source"] == source):
            return routes
        if loop.time() > deadline:
            raise AssertionError(f"routes not learned: {routes}\n{proxy.log()}")
        await asyncio.sleep(0.05)


async def get(http, url: str, method: str = "GET") -> int:
    async with http.request(method, url) as r:
        await r.read()
        return r.status


async def test_fastapi_traffic_is_counted_under_the_apps_own_templates(
    hub, http, start_proxy, hub_args, fastapi_app
):
    proxy = await start_proxy(fastapi_app.url, *hub_args)
    routes = await wait_for_routes(proxy, "/openapi.json")
    assert routes["framework"] == "fastapi"
    for path in ("/items/42", "/items/43", "/users/7/orders/9", "/items/special", "/items"):
        assert await get(http, proxy.url + path) == 200
    assert await get(http, proxy.url + "/items", "POST") == 200
    assert await get(http, proxy.url + "/items/abc") == 422  # the route matched; the app said no
    assert await get(http, proxy.url + "/not/declared/1") == 404
    assert await get(http, proxy.url + "/items/42", "DELETE") == 405
    status = await proxy.status()
    assert status["unmatched"] == 2
    assert await proxy.stop() == 0

    assert hub.request_counts() == {
        (None, "GET", "/items/{item_id}", 200): 2,
        (None, "GET", "/items/{item_id}", 422): 1,
        (None, "GET", "/users/{user_id}/orders/{order_id}", 200): 1,
        (None, "GET", "/items/special", 200): 1,
        (None, "GET", "/items", 200): 1,
        (None, "POST", "/items", 200): 1,
    }


async def test_fastapi_startup_announces_the_apps_paths_and_openapi(
    hub, start_proxy, hub_args, fastapi_app
):
    from tests.apps.fastapi_app import app

    proxy = await start_proxy(fastapi_app.url, *hub_args)
    await wait_for_routes(proxy, "/openapi.json")
    await hub.wait_for(lambda: any(s.get("openapi") for s in hub.accepted("startup")))
    assert await proxy.stop() == 0
    startup = [s for s in hub.accepted("startup") if s.get("openapi")][-1]
    expected = [
        {"method": method, "path": route.path}
        for route in app.routes
        if getattr(route, "include_in_schema", False)
        for method in sorted(m.lower() for m in route.methods)
    ]
    assert sorted(startup["paths"], key=str) == sorted(expected, key=str)
    assert orjson.loads(startup["openapi"]) == app.openapi()
    assert startup["client"] == "python:starlette"


async def test_x_apitally_route_from_the_app_wins_and_never_reaches_the_client(
    hub, http, start_proxy, hub_args, fastapi_app
):
    proxy = await start_proxy(fastapi_app.url, *hub_args)
    await wait_for_routes(proxy, "/openapi.json")
    async with http.get(proxy.url + "/override/x") as r:
        await r.read()
        assert "X-Apitally-Route" not in r.headers
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/override/{anything}/custom", 200): 1}


async def test_litestar_templates_carry_litestar_types(
    hub, http, start_proxy, hub_args, litestar_app
):
    from tests.apps.litestar_app import app

    proxy = await start_proxy(litestar_app.url, *hub_args)
    routes = await wait_for_routes(proxy, "/schema/openapi.json")
    assert routes["framework"] == "litestar"
    for path in ("/items/42", "/items/43", "/users/7/orders/9", "/tags/red", "/items/"):
        assert await get(http, proxy.url + path) == 200
    assert await get(http, proxy.url + "/nowhere") == 404
    assert await proxy.stop() == 0

    assert hub.request_counts() == {
        (None, "GET", "/items/{item_id:int}", 200): 2,
        (None, "GET", "/users/{user_id:int}/orders/{order_id:int}", 200): 1,
        (None, "GET", "/tags/{tag:str}", 200): 1,
        (None, "GET", "/items", 200): 1,
    }
    startup = [s for s in hub.accepted("startup") if s.get("openapi")][-1]
    expected = [
        {"method": method, "path": route.path}
        for route in app.routes
        if not route.path.startswith("/schema")
        for method in sorted(route.methods - {"OPTIONS", "HEAD"})
    ]
    assert sorted(startup["paths"], key=str) == sorted(expected, key=str)
    assert startup["client"] == "python:litestar"


async def test_declared_routes_work_for_an_app_without_openapi(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    config = tmp_path / "proxy.toml"
    config.write_text(
        'framework = "flask"\nroutes = ["GET /items/<int:id>", "/users/<uid>/orders/<oid>"]\n'
    )
    proxy = await start_proxy(upstream.url, *hub_args, "--config", str(config))
    for path in ("/items/1", "/items/2", "/users/7/orders/9", "/items/abc", "/download"):
        await get(http, proxy.url + path)
    assert await get(http, proxy.url + "/users/7/orders/9", "POST") == 200
    status = await proxy.status()
    assert status["unmatched"] == 2  # /items/abc (not an int) and /download (not declared)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {
        (None, "GET", "/items/<int:id>", 200): 2,
        (None, "GET", "/users/<uid>/orders/<oid>", 200): 1,
        (None, "POST", "/users/<uid>/orders/<oid>", 200): 1,
    }
    startup = hub.accepted("startup")[-1]
    assert startup["paths"] == [{"method": "GET", "path": "/items/<int:id>"}]
    assert startup["client"] == "python:flask"
    assert "openapi" not in startup


async def test_an_app_restarted_with_other_routes_is_re_read_and_re_announced(
    hub, http, start_proxy, hub_args, fastapi_app
):
    proxy = await start_proxy(fastapi_app.url, *hub_args)
    await wait_for_routes(proxy, "/openapi.json")
    await fastapi_app.stop()
    assert await get(http, proxy.url + "/items/1") == 502  # the proxy notices the app is gone
    replacement = await uvicorn_app("tests.apps.litestar_app:app", fastapi_app.port).start(
        ready_path="/schema/openapi.json"
    )
    try:
        await wait_for_routes(proxy, "/schema/openapi.json")
        await hub.wait_for(
            lambda: any(s["client"] == "python:litestar" for s in hub.accepted("startup"))
        )
        assert await get(http, proxy.url + "/items/5") == 200
        assert await proxy.stop() == 0
    finally:
        await replacement.stop()
    startups = hub.accepted("startup")
    assert startups[0]["client"] == "python:starlette"
    assert {"method": "GET", "path": "/items/{item_id:int}"} in startups[-1]["paths"]
    assert hub.request_counts() == {
        (None, "GET", "/items/{item_id}", 502): 1,  # while the app was away
        (None, "GET", "/items/{item_id:int}", 200): 1,
    }


async def test_declared_routes_stop_the_openapi_probing_and_the_log_says_so(
    upstream, start_proxy, tmp_path
):
    cfg = tmp_path / "routes.toml"
    cfg.write_text('routes = ["GET /items/{id}"]\n')
    proxy = await start_proxy(upstream.url, "--config", str(cfg))
    await asyncio.sleep(4)  # the quick retries (1, 2 s…) would have probed 3 more rounds
    status = await proxy.status()
    assert status["routes"]["fetches"] <= 6  # one round over the six probe paths
    assert status["routes"]["problem"] is None
    assert "using the declared routes (1)" in proxy.log()
    assert "using heuristic templates" not in proxy.log()


async def test_environment_typos_are_warned_about_with_the_right_name(upstream, start_proxy):
    proxy = await start_proxy(
        upstream.url, env={"APITALLY_PROXY_CLIENT_ID": "x", "APITALLY_PROXY_FRAMWORK": "flask"}
    )
    log = proxy.log()
    assert "APITALLY_PROXY_CLIENT_ID is not a setting of apitally-proxy; did you mean " in log
    assert "did you mean APITALLY_PROXY_FRAMEWORK?" in log
