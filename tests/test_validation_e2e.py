"""Validation errors from real framework apps reach the hub as the official clients report them.

Each test drives a real app (FastAPI or Litestar under uvicorn, Fastify under
node) through a real proxy process and compares the hub's `validation_errors`
rows with the rows the official client for that framework builds from the same
responses (apitally 0.25.1 for Python, the apitally npm package for Fastify).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.app_process import AppProcess, fastify_app, uvicorn_app

Row = tuple[Any, str, str, tuple[str, ...], str, str]


def error_counts(hub) -> dict[Row, int]:
    """Accepted validation_errors rows, summed over syncs."""
    totals: dict[Row, int] = {}
    for payload in hub.accepted("sync"):
        for r in payload["validation_errors"]:
            assert all(isinstance(part, str) for part in r["loc"]), r
            key = (r["consumer"], r["method"], r["path"], tuple(r["loc"]), r["msg"], r["type"])
            totals[key] = totals.get(key, 0) + r["error_count"]
    return totals


async def send(http, method: str, url: str, customer: str | None = None, **kw) -> int:
    headers = {"x-customer": customer} if customer else {}
    async with http.request(method, url, headers=headers, **kw) as r:
        body = await r.read()
        assert "x-apitally-consumer" not in r.headers  # stripped by the proxy
        assert body  # the error body reached the client unchanged
        return r.status


@pytest.fixture
async def fastapi_upstream() -> AsyncIterator[AppProcess]:
    app = await uvicorn_app("tests.apps.fastapi_validation_app:app").start()
    yield app
    await app.stop()


@pytest.fixture
async def litestar_upstream() -> AsyncIterator[AppProcess]:
    app = await uvicorn_app("tests.apps.litestar_validation_app:app").start()
    yield app
    await app.stop()


@pytest.fixture
async def fastify_upstream() -> AsyncIterator[AppProcess]:
    app = fastify_app()
    if app is None:
        pytest.skip("node (and npm) are not on PATH: the Fastify app cannot run")
    await app.start()
    yield app
    await app.stop()


FASTAPI_EXPECTED = {
    ("c1", "POST", "/items", ("body", "name"), "Input should be a valid string", "string_type"): 1,
    ("c1", "POST", "/items", ("body", "price"), "Field required", "missing"): 1,
    (
        "c1",
        "POST",
        "/items",
        ("body", "tags", "0"),
        "Input should be a valid string",
        "string_type",
    ): 1,
    (None, "POST", "/items", ("body", "price"), "Field required", "missing"): 2,
    (
        None,
        "GET",
        "/search",
        ("query", "limit"),
        "Input should be a valid integer, unable to parse string as an integer",
        "int_parsing",
    ): 3,
}


async def drive_fastapi(http, url: str) -> None:
    assert await send(http, "POST", url + "/items", "c1", json={"name": 1, "tags": [1, "a"]}) == 422
    for _ in range(2):
        assert await send(http, "POST", url + "/items", json={"name": "x"}) == 422
    for _ in range(3):
        assert await send(http, "GET", url + "/search?limit=abc") == 422
    assert await send(http, "POST", url + "/items", json={"name": "x", "price": 1}) == 200


@pytest.mark.parametrize("framework", ["fastapi", "auto"])
async def test_fastapi_422_details_become_validation_error_rows(
    framework, hub, http, start_proxy, hub_args, fastapi_upstream
):
    proxy = await start_proxy(fastapi_upstream.url, *hub_args, "--framework", framework)
    await drive_fastapi(http, proxy.url)
    assert await proxy.stop() == 0
    assert error_counts(hub) == FASTAPI_EXPECTED


async def test_litestar_400_extra_becomes_validation_error_rows(
    hub, http, start_proxy, hub_args, litestar_upstream
):
    proxy = await start_proxy(litestar_upstream.url, *hub_args, "--framework", "litestar")
    url = proxy.url
    assert await send(http, "POST", url + "/items", "c1", json={"name": 1, "price": 2}) == 400
    assert await send(http, "POST", url + "/items", "c1", json={"name": 1, "price": 2}) == 400
    assert await send(http, "GET", url + "/search?limit=abc") == 400
    assert await send(http, "POST", url + "/items", json={"name": "a", "price": 2}) == 201
    assert await proxy.stop() == 0
    assert error_counts(hub) == {
        ("c1", "POST", "/items", ("body", "name"), "Expected `str`, got `int`", ""): 2,
        (None, "GET", "/search", ("query", "limit"), "Expected `int`, got `str`", ""): 1,
    }


async def test_fastify_ajv_messages_become_validation_error_rows(
    hub, http, start_proxy, hub_args, fastify_upstream
):
    proxy = await start_proxy(fastify_upstream.url, *hub_args, "--framework", "fastify")
    url = proxy.url
    # AJV coerces scalars, so only values that cannot be coerced fail on their own path.
    assert await send(http, "POST", url + "/items", "c1", json={"name": {}, "price": 1}) == 400
    assert (
        await send(
            http, "POST", url + "/items", json={"name": "a", "price": 1, "address": {"city": {}}}
        )
        == 400
    )
    assert await send(http, "GET", url + "/search?limit=abc") == 400
    assert await send(http, "GET", url + "/search?limit=abc") == 400
    # "body must have required property" names no field path: the official plugin skips it.
    assert await send(http, "POST", url + "/items", json={"name": "a"}) == 400
    assert await proxy.stop() == 0
    assert error_counts(hub) == {
        ("c1", "POST", "/items", ("body", "name"), "body/name must be string", ""): 1,
        (
            None,
            "POST",
            "/items",
            ("body", "address", "city"),
            "body/address/city must be string",
            "",
        ): 1,
        (None, "GET", "/search", ("query", "limit"), "querystring/limit must be integer", ""): 2,
    }


async def test_validation_statuses_from_another_framework_are_ignored(
    hub, http, start_proxy, hub_args, fastapi_upstream
):
    # Told the app is Litestar, the proxy reads only 400s: FastAPI's 422s yield nothing.
    proxy = await start_proxy(fastapi_upstream.url, *hub_args, "--framework", "litestar")
    await drive_fastapi(http, proxy.url)
    assert await proxy.stop() == 0
    assert error_counts(hub) == {}
    assert hub.request_counts()[(None, "GET", "/search", 422)] == 3
