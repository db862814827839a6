"""Request logging through a real proxy process: what the hub's /log receives."""

from __future__ import annotations

import asyncio
import base64
import gzip
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream

GIB = 1024**3
BLOCK = b"j" * (256 * 1024)

CONFIG = """
[request_log]
log_request_headers = true
log_request_body = true
log_response_body = true
mask_headers = ["^x-internal-"]
mask_body_fields = ["^pin$"]
mask_query_params = ["^sig$"]
exclude_paths = ["/internal/"]
exclude_user_agents = ["synthetic-monitor"]
"""


async def json_echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/json")


async def upload(request: web.Request) -> web.Response:
    n = len(await request.read())
    return web.Response(text=f"got {n}")


async def big_json(request: web.Request) -> web.StreamResponse:
    """A JSON document of n bytes, sent chunked."""
    n = int(request.query["n"])
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'"')
    left = n - 2
    while left > 0:
        part = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        await resp.write(part)
        left -= len(part)
    await resp.write(b'"')
    await resp.write_eof()
    return resp


async def plain(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def log_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/json", json_echo)
    app.router.add_post("/upload", upload)
    app.router.add_get("/big-json", big_json)
    app.router.add_get("/health", plain)
    app.router.add_get("/internal/stats", plain)
    app.router.add_get("/plain", plain)
    return app


@pytest.fixture
async def log_upstream():
    u = await Upstream(log_app()).start()
    yield u
    await u.stop()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG)
    return path


def logged(hub) -> list[dict]:
    return [line for body in hub.accepted("log") for line in body]


def by_path(lines: list[dict], path: str) -> list[dict]:
    return [x for x in lines if x["request"]["url"].split("?")[0].endswith(path)]


def body_of(part: dict) -> bytes | None:
    return base64.b64decode(part["body"]) if "body" in part else None


async def test_logged_requests_show_masked_secrets_and_bounded_bodies(
    hub, http, start_proxy, hub_args, log_upstream, config_file
):
    proxy = await start_proxy(
        log_upstream.url, *hub_args, "--request-logging", "--config", str(config_file)
    )
    secret_doc = {
        "user": "ann",
        "password": "hunter2",
        "pin": "1234",
        "nested": {"api_token": "t0k", "items": [{"secret": "s", "n": 1}]},
    }
    async with http.post(
        proxy.url + "/json?access_token=K3Y&page=2&sig=abc",
        json=secret_doc,
        headers={
            "Authorization": "Bearer abc",
            "X-Internal-Id": "42",
            "X-Forwarded-Proto": "https",
            "User-Agent": "test-client",
        },
    ) as r:
        assert await r.json() == secret_doc  # the app got and returned the real values
    async with http.post(proxy.url + "/upload", data=b"\x00binary" * 10) as r:
        assert await r.text() == "got 70"
    async with http.post(
        proxy.url + "/json",
        data=b'"' + b"a" * 60_000 + b'"',
        headers={"Content-Type": "application/json"},
    ) as r:
        assert len(await r.read()) == 60_002
    for path in ("/health", "/internal/stats"):
        async with http.get(proxy.url + path) as r:
            assert r.status == 200
    async with http.get(proxy.url + "/plain", headers={"User-Agent": "kube-probe/1.29"}) as r:
        assert r.status == 200
    async with http.get(proxy.url + "/plain", headers={"User-Agent": "Synthetic-Monitor 2"}) as r:
        assert r.status == 200
    async with http.get(proxy.url + "/plain?x=1", headers={"User-Agent": "curl/8"}) as r:
        assert r.status == 200
    assert await proxy.stop() == 0

    log_calls = [c for c in hub.calls if c.kind == "log"]
    assert log_calls
    for call in log_calls:
        assert len(call.query["uuid"]) == 36
        assert "Content-Encoding" not in call.headers
        assert "Content-Type" not in call.headers
    lines = logged(hub)
    assert len(lines) == 4, [x["request"]["url"] for x in lines]

    (secret,) = by_path(lines, "/json")[:1]
    req, resp = secret["request"], secret["response"]
    assert req["method"] == "POST"
    assert req["path"] == "/json"
    assert req["url"].startswith("https://127.0.0.1:")  # X-Forwarded-Proto said https
    # urlencode()d like the official client does it: "*" is percent-encoded.
    stars = "%2A" * 6
    assert req["url"].endswith(f"/json?access_token={stars}&page=2&sig={stars}")
    headers = dict((k.lower(), v) for k, v in req["headers"])
    assert headers["authorization"] == "******"
    assert headers["x-internal-id"] == "******"
    assert headers["user-agent"] == "test-client"
    masked = orjson.loads(body_of(req))
    assert masked == {
        "user": "ann",
        "password": "******",
        "pin": "******",
        "nested": {"api_token": "******", "items": [{"secret": "******", "n": 1}]},
    }
    assert orjson.loads(body_of(resp)) == masked
    assert resp["status_code"] == 200
    assert resp["size"] == req["size"] > 0
    assert 0 <= resp["response_time"] < 5
    assert "hunter2" not in orjson.dumps(lines).decode()

    (binary,) = by_path(lines, "/upload")
    assert "body" not in binary["request"]  # application/octet-stream is not logged
    assert body_of(binary["response"]) == b"got 70"  # text/plain is

    (big,) = [x for x in by_path(lines, "/json") if x["request"]["size"] == 60_002]
    assert body_of(big["request"]) == b"<body too large>"
    assert body_of(big["response"]) == b"<body too large>"

    (plain,) = by_path(lines, "/plain")
    assert plain["request"]["url"].endswith("/plain?x=1")
    assert "body" not in plain["request"]
    assert "consumer" not in plain["request"]  # empty values are omitted


async def test_defaults_log_no_bodies_or_request_headers(
    hub, http, start_proxy, hub_args, log_upstream
):
    proxy = await start_proxy(log_upstream.url, *hub_args, "--request-logging")
    async with http.post(
        proxy.url + "/json?token=t&q=1", json={"a": 1}, headers={"Cookie": "s=1"}
    ) as r:
        await r.read()
    assert await proxy.stop() == 0
    (line,) = logged(hub)
    assert set(line) == {"uuid", "request", "response"}
    assert "headers" not in line["request"]
    assert "body" not in line["request"] and "body" not in line["response"]
    assert line["request"]["url"].endswith("/json?token=" + "%2A" * 6 + "&q=1")
    assert ["Content-Type", "application/json"] in line["response"]["headers"]


async def test_request_logging_off_sends_no_log(hub, http, start_proxy, hub_args, log_upstream):
    proxy = await start_proxy(log_upstream.url, *hub_args)
    async with http.get(proxy.url + "/plain") as r:
        await r.read()
    assert await proxy.stop() == 0
    assert [c for c in hub.calls if c.kind == "log"] == []


async def test_402_suspends_logging_and_drops_buffered_files(
    hub, http, start_proxy, hub_args, log_upstream
):
    hub.script["log"] = [402]
    hub.retry_after = 1
    proxy = await start_proxy(log_upstream.url, *hub_args, "--request-logging")
    async with http.get(proxy.url + "/plain?n=1") as r:
        await r.read()
    await hub.wait_for(lambda: any(c.kind == "log" for c in hub.calls))
    # Suspended: this request is never logged.
    async with http.get(proxy.url + "/plain?n=2") as r:
        await r.read()
    await asyncio.sleep(1.3)
    async with http.get(proxy.url + "/plain?n=3") as r:
        await r.read()
    await hub.wait_for(lambda: len(logged(hub)) >= 1)
    assert await proxy.stop() == 0
    urls = [x["request"]["url"].split("?")[1] for x in logged(hub)]
    assert urls == ["n=3"]


async def test_failed_upload_is_retried_at_the_next_sync(
    hub, http, start_proxy, hub_args, log_upstream
):
    hub.script["log"] = [503]
    proxy = await start_proxy(log_upstream.url, *hub_args, "--request-logging")
    async with http.get(proxy.url + "/plain?n=1") as r:
        await r.read()
    await hub.wait_for(lambda: len(logged(hub)) == 1)
    assert await proxy.stop() == 0
    failed = [c for c in hub.calls if c.kind == "log" and c.status == 503]
    ok = [c for c in hub.calls if c.kind == "log" and c.status == 202]
    assert failed and failed[0].query["uuid"] == ok[0].query["uuid"]


async def test_local_mode_keeps_log_files_under_the_state_dir(
    http, start_proxy, log_upstream, tmp_path
):
    state = tmp_path / "state"
    proxy = await start_proxy(
        log_upstream.url, "--request-logging", "--sync-interval", "0.3", state_dir=state
    )
    async with http.get(proxy.url + "/plain?local=1") as r:
        await r.read()
    assert await proxy.stop() == 0
    files = list((state / "local" / "request-log").rglob("*.ndjson.gz"))
    assert files
    lines = [orjson.loads(x) for f in files for x in gzip.decompress(f.read_bytes()).splitlines()]
    assert [x["request"]["url"].split("?")[1] for x in lines] == ["local=1"]


async def test_invalid_mask_pattern_is_a_config_error_naming_it(
    start_proxy, log_upstream, tmp_path
):
    config = tmp_path / "bad.toml"
    config.write_text('[request_log]\nmask_headers = ["x-ok", "(unclosed"]\n')
    p = ProxyProcess(log_upstream.url, tmp_path / "s", "--request-logging", "--config", str(config))
    with pytest.raises(RuntimeError) as err:
        await p.start()
    assert "mask_headers" in str(err.value) and "(unclosed" in str(err.value)


async def test_1gb_json_response_with_logging_on_keeps_memory_flat(
    hub, http, start_proxy, hub_args, log_upstream, config_file
):
    proxy = await start_proxy(
        log_upstream.url, *hub_args, "--request-logging", "--config", str(config_file)
    )
    async with http.get(proxy.url + "/big-json?n=1000000") as r:
        await r.read()
    baseline = proxy.rss()
    peaks: list[int] = []
    received = 0
    async with http.get(f"{proxy.url}/big-json?n={GIB}") as r:
        async for chunk in r.content.iter_any():
            received += len(chunk)
            if len(peaks) < 10_000 and received % (64 * BLOCK.__len__()) < len(chunk):
                peaks.append(proxy.rss())
    peaks.append(proxy.rss())
    assert received == GIB
    growth = max(peaks) - baseline
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
    assert await proxy.stop() == 0
    big = [x for x in logged(hub) if x["response"].get("size") == GIB]
    assert len(big) == 1
    assert body_of(big[0]["response"]) == b"<body too large>"
