"""The admin server shows consumer ids and paths: only to whom it is meant for."""

from __future__ import annotations

import asyncio

import pytest

from apitally_proxy.admin import host_allowed
from tests.support.proxy_process import ProxyProcess


async def admin_get(port: int, path: str, host: str, token: str | None = None) -> int:
    """A raw request, so the Host header is exactly what a rebinding page would send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    return int(response.split(b" ", 2)[1])


async def test_a_foreign_host_name_is_refused_dns_rebinding(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    port = proxy.admin_port
    assert await admin_get(port, "/status.json", f"127.0.0.1:{port}") == 200
    assert await admin_get(port, "/status.json", f"localhost:{port}") == 200
    assert await admin_get(port, "/status.json", f"evil.example:{port}") == 421
    assert await admin_get(port, "/metrics", "evil.example") == 421


async def test_allowed_host_names_are_configurable(upstream, start_proxy):
    proxy = await start_proxy(
        upstream.url, env={"APITALLY_PROXY_ADMIN_ALLOWED_HOSTS": "proxy.internal, Ops.Example"}
    )
    port = proxy.admin_port
    assert await admin_get(port, "/status.json", f"proxy.internal:{port}") == 200
    assert await admin_get(port, "/status.json", "ops.example") == 200
    assert await admin_get(port, "/status.json", "other.internal") == 421


async def test_the_admin_token_guards_everything_but_the_health_probes(upstream, start_proxy):
    proxy = await start_proxy(upstream.url, env={"APITALLY_PROXY_ADMIN_TOKEN": "t0ken-s3cret"})
    port = proxy.admin_port
    host = f"127.0.0.1:{port}"
    for path in ("/status.json", "/status", "/metrics"):
        assert await admin_get(port, path, host) == 401
        assert await admin_get(port, path, host, "wrong") == 401
        assert await admin_get(port, path, host, "t0ken-s3cret") == 200
    assert await admin_get(port, "/health", host) == 200
    assert "t0ken-s3cret" not in proxy.log()


async def test_a_non_loopback_admin_address_without_a_token_is_warned_about(
    upstream, start_proxy, tmp_path
):
    exposed = ProxyProcess(upstream.url, tmp_path / "exposed")
    exposed.args[exposed.args.index("--admin-listen") + 1] = f"0.0.0.0:{exposed.admin_port}"
    try:
        await exposed.start()
        assert "not a loopback address" in exposed.log()
        assert "admin_token" in exposed.log()
    finally:
        await exposed.kill()
    quiet = await start_proxy(upstream.url)
    assert "not a loopback address" not in quiet.log()


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:9099", True),
        ("[::1]:9099", True),
        ("10.1.2.3:9099", True),  # a pod IP: probes and scrapers
        ("localhost", True),
        ("evil.example:9099", False),
        ("", False),
        (None, False),
    ],
)
def test_host_allowed(host, ok):
    assert host_allowed(host, frozenset()) is ok


async def test_liveness_stays_up_while_draining_and_readiness_says_why(upstream, start_proxy):
    import os
    import signal

    import aiohttp

    proxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        slow = asyncio.ensure_future(s.get(proxy.url + "/slow?delay=3"))
        await asyncio.sleep(0.3)
        os.kill(proxy.pid, signal.SIGTERM)  # drains while /slow runs
        await asyncio.sleep(0.5)
        async with s.get(proxy.admin_url + "/health") as r:
            assert r.status == 503  # readiness: take no new traffic
            assert (await r.json())["status"] == "draining"
        async with s.get(proxy.admin_url + "/healthz") as r:
            assert r.status == 200  # liveness: do not restart a draining proxy
            body = await r.json()
            assert body["status"] == "draining" and body["ready"] is False
        async with await slow as r:
            assert r.status == 200
    assert await proxy.stop() == 0
