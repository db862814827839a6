"""The README demo and its sample API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from apitally_proxy.demo.sample_app import create_app

RESULT = re.compile(r"^RESULT: sent=(\d+) metered=(\d+) unmatched=(\d+) (OK|FAILED)$", re.M)


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY_")}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "apitally_proxy.demo", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
    )


def test_demo_meters_every_request_it_sends(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    result = run_demo("--requests", "60", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr

    match = RESULT.search(result.stdout)
    assert match, result.stdout
    sent, metered, unmatched = (int(g) for g in match.groups()[:3])
    assert sent == 60
    # Requests on no known route are not metered by design; the proxy reports how many.
    assert metered == sent - unmatched
    assert match.group(4) == "OK"

    # The demo's arithmetic, redone from the proxy's own local-mode output.
    lines = [orjson.loads(x) for f in (state_dir / "local").glob("*.jsonl") for x in f.open("rb")]
    assert (
        sum(
            row["request_count"]
            for line in lines
            if line["kind"] == "sync"
            for row in line["payload"]["requests"]
        )
        == metered
    )
    assert str(state_dir / "local") in result.stdout


def test_demo_with_otlp_meters_every_request_from_the_decoded_exports(tmp_path: Path) -> None:
    result = run_demo("--otlp", "--requests", "60", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recording OTLP receiver" in result.stdout
    match = RESULT.search(result.stdout)
    assert match, result.stdout
    sent, metered, unmatched = (int(g) for g in match.groups()[:3])
    assert sent == 60 and metered == sent - unmatched and match.group(4) == "OK"
    assert re.search(r"^\s+mueller\s+Müller & Söhne\s+Partner\s", result.stdout, re.M)
    assert not (tmp_path / "local").exists()  # nothing went to local mode


def test_demo_shows_consumer_names_the_app_percent_encoded(tmp_path: Path) -> None:
    result = run_demo("--requests", "60", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s+mueller\s+Müller & Söhne\s+Partner\s", result.stdout, re.M)


def test_demo_removes_its_temporary_state_dir() -> None:
    result = run_demo("--requests", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"^\s+state dir\s+(\S+)", result.stdout, re.M)
    assert match, result.stdout
    assert not Path(match.group(1)).exists()


# ---- the sample app ----------------------------------------------------------------------


async def sample_app(aiohttp_client: AiohttpClient) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_app())


async def test_sample_app_names_the_consumer_in_response_headers(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await sample_app(aiohttp_client)
    resp = await client.get("/items/1", headers={"Authorization": "Bearer demo-key-acme"})
    assert resp.status == 200
    assert resp.headers["X-Apitally-Consumer"] == "acme"
    assert resp.headers["X-Apitally-Consumer-Name"] == "Acme Corp"
    assert resp.headers["X-Apitally-Consumer-Group"] == "Enterprise"


async def test_sample_app_percent_encodes_non_ascii_consumer_names(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await sample_app(aiohttp_client)
    resp = await client.get("/health", headers={"X-API-Key": "demo-key-mueller"})
    assert resp.headers["X-Apitally-Consumer-Name"] == "M%C3%BCller & S%C3%B6hne"


async def test_sample_app_names_the_consumer_on_error_responses(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await sample_app(aiohttp_client)
    for path in ("/no/such/route", "/fail", "/items/99999"):
        resp = await client.get(path, headers={"X-API-Key": "demo-key-globex"})
        assert resp.status >= 400
        assert resp.headers["X-Apitally-Consumer"] == "globex", path


async def test_sample_app_sets_no_consumer_for_anonymous_or_unknown_keys(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await sample_app(aiohttp_client)
    anonymous = await client.get("/items")
    assert anonymous.status == 200
    unknown = await client.get("/items", headers={"X-API-Key": "not-a-key"})
    assert unknown.status == 401
    for resp in (anonymous, unknown):
        assert "X-Apitally-Consumer" not in resp.headers


async def test_sample_app_answers_a_missing_name_like_fastapi(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await sample_app(aiohttp_client)
    resp = await client.post("/items", json={"price": 3})
    assert resp.status == 422
    assert await resp.json() == {
        "detail": [{"loc": ["body", "name"], "msg": "Field required", "type": "missing"}]
    }


async def test_sample_app_creates_items(aiohttp_client: AiohttpClient) -> None:
    client = await sample_app(aiohttp_client)
    resp = await client.post("/items", json={"name": "Widget"})
    assert resp.status == 201
    created = await resp.json()
    assert (await (await client.get(f"/items/{created['id']}")).json())["name"] == "Widget"


async def test_sample_app_serves_route_templates_in_openapi(aiohttp_client: AiohttpClient) -> None:
    client = await sample_app(aiohttp_client)
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert "/items/{item_id}" in paths
    assert "/users/{user_id}/orders/{order_id}" in paths
