"""Header values the app sends that are not clean text: raw Latin-1 (obs-text), control
characters. None may cost another request its count; each is counted as real text."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import aiohttp
import orjson
import pytest

from apitally_proxy.hub.spool import Spool
from apitally_proxy.metering.consumers import parse_consumer
from apitally_proxy.text import dumps_lenient, header_text, strip_controls


class RawHeaderApp:
    """An upstream that writes the consumer header bytes it is told to (`?c=<hex>`),
    as an app under uvicorn does for a Latin-1 `str` header value."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawHeaderApp:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ")[1].decode()
                query = parse_qs(target.partition("?")[2])
                lines = [b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Type: text/plain"]
                for key, name in (("c", b"Consumer"), ("n", b"Consumer-Name")):
                    if key in query:
                        lines.append(b"X-Apitally-" + name + b": " + bytes.fromhex(query[key][0]))
                writer.write(b"\r\n".join(lines) + b"\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def raw_app():
    app = await RawHeaderApp().start()
    yield app
    await app.stop()


async def test_a_latin1_consumer_header_costs_no_other_request_its_count(
    hub, http, start_proxy, raw_app, tmp_path
):
    cfg = tmp_path / "routes.toml"
    cfg.write_text('routes = ["GET /items"]\n')
    proxy = await start_proxy(
        f"http://127.0.0.1:{raw_app.port}",
        "--client-id",
        "00000000-0000-0000-0000-000000001234",
        "--env",
        "test",
        "--hub-url",
        hub.url,
        "--sync-interval",
        "3600",
        "--config",
        str(cfg),
    )
    plan = {
        "alice": b"alice".hex(),
        "café": "caf\xe9".encode("latin-1").hex(),  # raw Latin-1, not UTF-8
        "josé": "josé".encode().hex(),  # raw UTF-8
        "bob": b"b\x1bob".hex(),  # a control character inside
    }
    name = "José".encode("latin-1").hex()
    for _ in range(5):
        for hexed in plan.values():
            async with http.get(f"{proxy.url}/items?c={hexed}&n={name}") as r:
                assert r.status == 200
                await r.read()
    # Past one checkpoint, then a clean stop: everything reaches the hub.
    await asyncio.sleep(1.3)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(c, "GET", "/items", 200): 5 for c in plan}
    consumers = {c["identifier"]: c["name"] for p in hub.accepted("sync") for c in p["consumers"]}
    assert consumers == dict.fromkeys(plan, "José")


def test_an_unencodable_value_is_repaired_or_dropped_alone_and_counted(tmp_path):
    # What reaches the spool is normally clean already; a value that is not is repaired
    # (or its row dropped), counted, and every other row kept.
    spool = Spool(tmp_path / "spool")
    payload = {
        "message_uuid": "m1",
        "requests": [
            {"consumer": "caf\udce9", "request_count": 3},
            {"consumer": "alice", "request_count": 4},
        ],
        "consumers": [{"identifier": "x", "name": object()}],
    }
    entry = spool.put(payload)
    stored = orjson.loads(entry.path.read_bytes())
    assert stored["requests"] == [
        {"consumer": "café", "request_count": 3},
        {"consumer": "alice", "request_count": 4},
    ]
    assert stored["consumers"] == []
    assert spool.unencodable == 2


async def test_unencodable_values_show_on_health_and_metrics(upstream, start_proxy):
    proxy = await start_proxy(upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/health") as r:
            assert (await r.json())["unencodable_values"] == 0
        async with s.get(proxy.admin_url + "/metrics") as r:
            assert "apitally_proxy_unencodable_values_total 0.0" in await r.text()


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("plain", "plain"),
        ("caf\udce9", "café"),  # Latin-1 byte 0xE9
        ("caf\udcc3\udca9", "café"),  # UTF-8 bytes of é
        ("\ud800x", "\ufffdx"),  # a surrogate that is no escaped byte
    ],
)
def test_header_text_decodes_utf8_else_latin1(raw, text):
    assert header_text(raw) == text


def test_control_characters_never_reach_an_identifier():
    assert strip_controls("a\r\nb\x00c\x1b\x7f\x85d") == "abcd"
    consumer = parse_consumer("id%0D%0Ax\x00", "Jos\udce9", "g\r\n")
    assert consumer is not None
    assert (consumer.identifier, consumer.name, consumer.group) == ("idx", "José", "g")


def test_dumps_lenient_keeps_clean_payloads_byte_for_byte():
    payload = {"requests": [{"consumer": "ünï", "n": 1}]}
    assert dumps_lenient(payload) == (orjson.dumps(payload), 0)


async def test_obs_text_header_bytes_pass_both_ways_byte_for_byte(start_proxy):
    """`Cookie: sid=\\xff; admin=0` must reach the app as sent, and a raw Latin-1
    response header the client as sent: a proxy deletes no bytes."""
    seen: list[bytes] = []

    async def app(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Name: Jos\xe9\r\n"
            b"Set-Cookie: t=\xff\xfe\r\nConnection: close\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            b"GET /x HTTP/1.1\r\nHost: h\r\nCookie: sid=\xff; admin=0\r\n"
            b"X-Utf8: caf\xc3\xa9\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        response = await reader.read()
        writer.close()
    finally:
        server.close()
    (head,) = [h for h in seen if h.startswith(b"GET /x ")]  # not the OpenAPI probes
    assert b"\r\nCookie: sid=\xff; admin=0\r\n" in head
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in head
    assert b"\r\nX-Name: Jos\xe9\r\n" in response
    assert b"\r\nSet-Cookie: t=\xff\xfe\r\n" in response
    assert response.endswith(b"ok")


def test_a_head_with_a_line_break_inside_a_value_is_refused():
    from multidict import CIMultiDict

    from apitally_proxy.upstream import encode_head

    assert encode_head("GET / HTTP/1.1", CIMultiDict({"A": "caf\udce9"})) == (
        b"GET / HTTP/1.1\r\nA: caf\xe9\r\n\r\n"
    )
    with pytest.raises(ValueError, match="control character"):
        encode_head("GET / HTTP/1.1", CIMultiDict({"A": "x\r\nInjected: 1"}))
