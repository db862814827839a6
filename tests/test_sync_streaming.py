"""Hub syncs built and delivered as bytes: the rows are encoded a chunk at a time straight
from the counters (`Meter.get_and_reset(serialized=True)`), spooled, and sent as the
spool holds them (`Spool.read`, `send_encoded`). Every payload must be byte for byte
what the dict-built payload (`get_and_reset()` → `Spool.put` → `Spool.load` → `send`)
was, repairs and their counts included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from apitally_proxy.hub import spool as spool_module
from apitally_proxy.hub.payloads import HubCodec, sync_payload
from apitally_proxy.hub.spool import Spool
from apitally_proxy.hub.sync import HubSync
from apitally_proxy.hub.transport import RECENT_PAYLOAD_BYTES, LocalTransport, Outcome
from apitally_proxy.metering.consumers import Consumer
from apitally_proxy.metering.meter import Meter
from apitally_proxy.routes import RouteResolver
from apitally_proxy.text import UNENCODABLE, dumps_lenient

Fill = Callable[[Meter], None]


def nothing(m: Meter) -> None:
    pass


def plain(m: Meter) -> None:
    r = m.requests
    r.add_request(None, "get", "/items/{id}", 200, 0.0123, 10, 2_500)
    r.add_request(None, "GET", "/items/{id}", 200, 0.0199, None, 999)
    r.add_request("alice", "POST", "/items", 201, 0.0, 0, None)
    r.add_request("bob", "DELETE", "/items/{id}", 404, -1.0)  # negative: bin 0
    r.add_request("bob", "OPTIONS", "/items", 200, 0.1)  # not counted


def many(m: Meter) -> None:  # several 256-row chunks, hostile cardinality
    for i in range(1_300):
        m.requests.add_request(
            f"c{i % 411}", "GET", f"/p/{i % 97}/{i}", 200 + i % 3, i / 7_000, i * 13, 3 * i
        )


def bad_text(m: Meter) -> None:
    r = m.requests
    r.add_request("caf\udce9", "POST", "/x", 201, 0.2)  # Latin-1 é: repaired to "café"
    r.add_request("Jos\udcc3\udca9", "POST", "/x", 201, 0.2)  # UTF-8 é: "José"
    for i in range(600):  # the bad rows in the first chunk, good ones after them
        r.add_request(f"c{i}", "GET", "/ok", 200, 0.01)
    r.add_request(None, "GET", "/lone/\ud800", 200, 0.2)  # no byte: U+FFFD
    r.add_request(None, "GET", '/q"uote\\d/\n\x1b', 200, 0.2)  # escaped, kept as is
    r.add_request(None, "GET", "/big", 200, 0.2, 2**70)  # unencodable even repaired: dropped
    m.validation_errors.add_validation_errors(
        "caf\udce9", "POST", "/x", [(("body", "n\udcff"), "bad \udce9", "value_error")]
    )


def validation(m: Meter) -> None:
    m.requests.add_request("alice", "POST", "/users", 422, 0.004, 120, 300)
    for i in range(300):
        m.validation_errors.add_validation_errors(
            "alice" if i % 2 else None,
            "post",
            "/users",
            [
                (("body", "items", i), "field required", "missing"),
                (("query", "q"), f'bad "{i}" — ünïcode', "string_type"),
            ],
        )


def consumers(m: Meter) -> None:
    for i in range(700):
        c = Consumer(f"id{i}", f"Name {i} ü", "group" if i % 3 else None)
        m.consumers.add_or_update(c)
        m.requests.add_request(c.identifier, "GET", "/me", 200, 0.002)


def overflow(m: Meter) -> None:  # past max_consumers a request counts without its consumer
    for i in range(MAX_CONSUMERS + 15):
        m.requests.add_request(f"k{i}", "GET", "/k", 200, 0.05, 1, 1)


INTERVALS: dict[str, Fill] = {
    "empty": nothing,
    "plain": plain,
    "many rows": many,
    "bad text": bad_text,
    "validation errors": validation,
    "consumers": consumers,
    "consumer overflow": overflow,
}


MAX_CONSUMERS = 1_000


def meter() -> Meter:
    return Meter(RouteResolver(), max_consumers=MAX_CONSUMERS)


def dict_built(fill: Fill, resources: Any, spool: Spool) -> tuple[bytes, bytes]:
    """(spooled bytes, sent bytes) as the sync made them before rows were streamed."""
    m = meter()
    fill(m)
    payload = sync_payload("inst", m.get_and_reset(), resources, "mu")
    payload["timestamp"] = 1764616489.123456
    entry = spool.put(payload)
    loaded = spool.load(entry)
    assert loaded is not None
    return entry.path.read_bytes(), dumps_lenient(loaded)[0]


@pytest.mark.parametrize("resources", [None, {"cpu_percent": 12.5, "memory_rss": 57_000_000}])
@pytest.mark.parametrize("name", list(INTERVALS))
async def test_a_streamed_sync_payload_is_the_dict_built_one_byte_for_byte(
    tmp_path, name, resources
):
    fill = INTERVALS[name]
    old_spool = Spool(tmp_path / "old")
    spooled, sent = dict_built(fill, resources, old_spool)

    m = meter()
    fill(m)
    aggregates = m.get_and_reset(serialized=True)
    problems = [aggregates.pop(UNENCODABLE)]
    # The request rows come unmade: made on the loop, a chunk at a time (as HubSync does).
    aggregates["requests"] = await aggregates["requests"].build(problems)
    unencodable = problems[0]
    payload = sync_payload("inst", aggregates, resources, "mu")
    payload["timestamp"] = 1764616489.123456
    new_spool = Spool(tmp_path / "new")
    entry = new_spool.put(payload, unencodable)
    assert entry.path.read_bytes() == spooled
    assert new_spool.unencodable == old_spool.unencodable
    encoded = new_spool.read(entry)
    assert encoded is not None
    assert encoded.data == sent == spooled
    assert (encoded.message_uuid, encoded.timestamp) == ("mu", 1764616489.123456)
    # Trusted as laid out, not parsed.
    assert spool_module._SYNC_HEAD.match(spooled)
    assert spool_module._SYNC_TAIL.search(spooled)
    # The meter started a new interval in both ways.
    assert m.get_and_reset() == {
        "requests": [],
        "validation_errors": [],
        "server_errors": [],
        "consumers": [],
    }


def test_the_table_covers_repairs_drops_and_chunks(tmp_path):
    spool = Spool(tmp_path)
    spooled, _ = dict_built(bad_text, None, spool)
    # Repaired: 2 consumers, 1 path, a validation error's consumer, loc and msg; dropped:
    # the row whose size sum is past 64 bits.
    assert spool.unencodable == 7
    body = orjson.loads(spooled)
    assert len(body["requests"]) == 604  # 605 rows, the 2**70 one dropped
    assert "/lone/\ufffd" in {r["path"] for r in body["requests"]}
    assert {r["consumer"] for r in body["requests"]} >= {"café", "José"}
    assert body["validation_errors"][0]["msg"] == "bad é"


def test_reading_the_spool_parses_only_what_it_cannot_trust(tmp_path):
    spool = Spool(tmp_path)
    other = {"message_uuid": "m1", "timestamp": 5.0, "requests": [1, 2]}  # older layout
    entry = spool.put(other)
    encoded = spool.read(entry)
    assert encoded is not None
    assert (encoded.data, encoded.message_uuid, encoded.timestamp) == (
        orjson.dumps(other),
        "m1",
        5.0,
    )
    good = sync_payload("i", {"requests": [{"a": 1}]}, None, "m2")
    data = orjson.dumps(good)
    cut = data[: data.index(b"}") + 1]  # torn after a row: a head, a `}`, no payload's tail
    bad = [
        (b"{not json", "unreadable"),
        (b"[1, 2]", "not a JSON object"),
        (cut, "unreadable"),
    ]
    for i, (content, _) in enumerate(bad):
        (tmp_path / f"{i + 10:020d}-bad{i}.json").write_bytes(content)
    for e in spool.entries():
        if e.message_uuid.startswith("bad"):
            assert spool.read(e) is None  # dropped with an error, as `load` does
    assert [e.message_uuid for e in spool.entries()] == ["m1"]


class OldLocalTransport(LocalTransport):
    """LocalTransport.send as it was before payloads were sent as bytes."""

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome:
        record = {"kind": kind, "written_at": time.time(), "payload": payload}
        line = dumps_lenient(record)[0] + b"\n"
        with open(self.path, "ab") as f:
            f.write(line)
        shown = dumps_lenient({"kind": kind, "payload": payload})[0]
        if len(shown) > RECENT_PAYLOAD_BYTES:
            rows = {k: len(v) for k, v in payload.items() if isinstance(v, list)}
            shown = orjson.dumps(
                {"kind": kind, "truncated": True, "bytes": len(shown), "rows": rows}
            )
        self._recent.append(shown)
        return Outcome.ACCEPTED


@pytest.mark.parametrize("name", ["plain", "many rows", "validation errors", "consumers"])
async def test_local_mode_writes_and_shows_what_it_did(tmp_path, monkeypatch, name):
    spool = Spool(tmp_path / "spool")
    m = meter()
    INTERVALS[name](m)
    payload = sync_payload("inst", m.get_and_reset(), None, "mu")
    entry = spool.put(payload)
    monkeypatch.setattr(time, "time", lambda: 1764616489.5)
    old, new = OldLocalTransport(tmp_path, "old"), LocalTransport(tmp_path, "new")
    loaded = spool.load(entry)
    encoded = spool.read(entry)
    assert loaded is not None and encoded is not None
    assert await old.send("sync", loaded) is Outcome.ACCEPTED
    assert await new.send_encoded("sync", encoded.data) is Outcome.ACCEPTED
    assert await old.send("startup", {"paths": [{"a": 1}]}) is Outcome.ACCEPTED
    assert await new.send("startup", {"paths": [{"a": 1}]}) is Outcome.ACCEPTED
    assert new.path.read_bytes() == old.path.read_bytes()
    assert [bytes(f) for f in new._recent] == [bytes(f) for f in old._recent]
    truncated = len(orjson.dumps({"kind": "sync", "payload": loaded})) > RECENT_PAYLOAD_BYTES
    assert truncated == (name != "plain")


class Recorder:
    """A hub transport that takes bytes and answers from a script."""

    def __init__(self) -> None:
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.answers: list[Outcome] = []
        self.bodies: list[bytes] = []

    async def send(self, kind: str, payload: dict[str, Any]) -> Outcome:
        return await self.send_encoded(kind, dumps_lenient(payload)[0])

    async def send_encoded(self, kind: str, body: bytes) -> Outcome:
        if kind == "startup":
            return Outcome.ACCEPTED
        self.bodies.append(body)
        return self.answers.pop(0) if self.answers else Outcome.ACCEPTED

    async def close(self) -> None:
        return None


def hub_sync(tmp_path: Path, transport: Recorder, m: Meter) -> HubSync:
    return HubSync(
        transport,  # type: ignore[arg-type]
        "inst",
        source=m,
        startup=lambda uuid: {"instance_uuid": uuid},
        spool=Spool(tmp_path / "spool"),
        codec=HubCodec("inst"),
    )


async def test_a_sync_sends_the_spooled_bytes_and_keeps_retry_semantics(tmp_path):
    transport, m = Recorder(), meter()
    sync = hub_sync(tmp_path, transport, m)
    bad_text(m)
    await sync.close_interval()
    assert sync.spool.unencodable == 7  # counted by the row encoder, reported by the spool
    (entry,) = sync.spool.entries()
    spooled = entry.path.read_bytes()
    loaded = orjson.loads(spooled)
    assert loaded["instance_uuid"] == "inst" and len(loaded["requests"]) == 604
    assert UNENCODABLE not in loaded

    transport.answers = [Outcome.RETRY]  # kept, and everything after it
    plain(m)
    await sync.close_interval()
    await sync.deliver()
    assert transport.bodies == [spooled] and sync.queued == 2 and sync.sent == 0
    transport.answers = [Outcome.ACCEPTED, Outcome.REJECTED]
    await sync.deliver()
    assert transport.bodies[1] == spooled  # the same bytes again
    assert orjson.loads(transport.bodies[2])["requests"][0]["path"] == "/items/{id}"
    assert (sync.sent, sync.dropped_rejected, sync.queued) == (1, 1, 0)

    plain(m)
    await sync.close_interval()
    transport.answers = [Outcome.STOP]
    await sync.deliver()
    assert sync.stopped and len(sync.spool.entries()) == 1  # stays for a fixed client id


async def test_an_expired_spooled_payload_is_dropped_unsent(tmp_path):
    transport, m = Recorder(), meter()
    sync = hub_sync(tmp_path, transport, m)
    plain(m)
    await sync.close_interval()
    sync.spool.max_age = 3600
    (entry,) = sync.spool.entries()
    payload = orjson.loads(entry.path.read_bytes())
    payload["timestamp"] -= 7200  # e.g. a recovered checkpoint's, spooled just now
    entry.path.write_bytes(orjson.dumps(payload))
    await sync.deliver()
    assert transport.bodies == [] and sync.dropped_expired == 1 and sync.queued == 0


async def test_the_loop_keeps_serving_while_a_big_interval_is_synced(tmp_path):
    transport, m = Recorder(), meter()
    sync = hub_sync(tmp_path, transport, m)
    many(m)
    task = asyncio.ensure_future(sync.sync_once())
    await asyncio.sleep(0)  # the interval is closed in the task's first step
    while not task.done():
        m.requests.add_request(None, "GET", "/during", 200, 0.01)  # the next interval
        await asyncio.sleep(0)
    await task
    (body,) = transport.bodies
    assert len(orjson.loads(body)["requests"]) == 1_300
    assert all(r["path"] == "/during" for r in m.get_and_reset()["requests"])
