"""Nothing lost: payloads are durable before sending; a SIGKILL loses at most ~1 s."""

from __future__ import annotations

import asyncio
import signal

import orjson

from apitally_proxy.hub.spool import Spool
from tests.conftest import hub_cli_args


async def send(http, url: str, n: int, path: str = "/items/1") -> None:
    for _ in range(n):
        async with http.get(url + path) as r:
            assert r.status == 200
            await r.read()


async def test_sigkill_loses_nothing_older_than_the_checkpoint(
    hub, upstream, http, start_proxy, tmp_path
):
    state = tmp_path / "state"
    proxy = await start_proxy(upstream.url, *hub_cli_args(hub, "3600"), state_dir=state)
    await hub.wait_for(lambda: hub.accepted("sync"))  # the first (empty) sync
    await send(http, proxy.url, 25)
    await asyncio.sleep(1.6)  # > checkpoint interval
    await proxy.stop(signal.SIGKILL)
    assert hub.request_counts() == {}  # nothing was synced before the kill
    first_instance = hub.accepted("startup")[0]["instance_uuid"]

    again = await start_proxy(upstream.url, *hub_cli_args(hub, "3600"), state_dir=state)
    await hub.wait_for(lambda: sum(hub.request_counts().values()) == 25)
    assert await again.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 25}
    recovered = [p for p in hub.accepted("sync") if p["requests"]]
    assert {p["instance_uuid"] for p in recovered} == {first_instance}
    assert "recovered the last counts" in again.log()


async def test_hub_outage_plus_sigkill_plus_restart_counts_exactly(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    state = tmp_path / "state"
    hub.default_status = 503
    proxy = await start_proxy(upstream.url, *hub_args, state_dir=state)
    await send(http, proxy.url, 30)
    await asyncio.sleep(0.8)  # several failed syncs: payloads pile up in the spool
    await send(http, proxy.url, 12, "/users/1/orders/2")
    await asyncio.sleep(1.5)
    await proxy.stop(signal.SIGKILL)
    failed_uuids = {c.body["message_uuid"] for c in hub.calls if c.kind == "sync"}
    assert hub.request_counts() == {}

    hub.default_status = 202
    again = await start_proxy(upstream.url, *hub_args, state_dir=state)
    await send(http, again.url, 5)
    assert await again.stop() == 0
    assert hub.request_counts() == {
        (None, "GET", "/items/{id}", 200): 35,
        (None, "GET", "/users/{id}/orders/{id2}", 200): 12,
    }
    # Payloads that failed before the crash went out with their original message_uuid.
    accepted_uuids = {p["message_uuid"] for p in hub.accepted("sync")}
    assert failed_uuids & accepted_uuids
    assert len(hub.accepted("sync")) == len(accepted_uuids)  # no duplicates


async def test_payloads_wait_in_the_spool_across_a_clean_restart(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    state = tmp_path / "state"
    hub.default_status = 503
    proxy = await start_proxy(upstream.url, *hub_args, state_dir=state)
    await send(http, proxy.url, 8)
    assert await proxy.stop() == 0  # final sync fails too: stays spooled
    assert hub.request_counts() == {}
    hub.default_status = 202
    again = await start_proxy(upstream.url, *hub_args, state_dir=state)
    assert await again.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 8}


async def test_second_signal_exits_at_once_after_spooling(
    hub, upstream, http, start_proxy, tmp_path
):
    state = tmp_path / "state"
    proxy = await start_proxy(upstream.url, *hub_cli_args(hub, "3600"), state_dir=state)
    await hub.wait_for(lambda: hub.accepted("sync"))
    await send(http, proxy.url, 4)
    hub.delay = 30  # the final sync would hang
    in_flight = asyncio.ensure_future(http.get(proxy.url + "/slow?delay=20"))
    await asyncio.sleep(0.2)
    proxy.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.2)  # a repeat within 1 s is the same stop, not a hurry
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await proxy.stop(signal.SIGTERM, timeout=10) == 0
    assert loop.time() - t0 < 5
    in_flight.cancel()
    hub.delay = 0
    again = await start_proxy(upstream.url, *hub_cli_args(hub, "3600"), state_dir=state)
    assert await again.stop() == 0
    assert hub.request_counts()[(None, "GET", "/items/{id}", 200)] == 4


def test_spool_is_bounded_in_bytes_dropping_the_oldest(tmp_path):
    spool = Spool(tmp_path, max_bytes=100_000, max_age=3600)
    for i in range(30):
        spool.put({"message_uuid": f"m{i:02d}", "timestamp": 0, "pad": "x" * 10_000})
    entries = spool.entries()
    assert sum(e.size for e in entries) <= 100_000
    assert entries[-1].message_uuid == "m29"
    assert spool.dropped_full == 30 - len(entries)


def test_spool_drops_payloads_past_the_max_age(tmp_path):
    spool = Spool(tmp_path, max_bytes=10**9, max_age=60)
    spool.put({"message_uuid": "old"})
    spool.put({"message_uuid": "new"})
    import time

    assert spool.drop_expired(now=time.time() + 3600) == 2
    assert spool.entries() == []


def test_checkpoint_already_spooled_is_not_recovered_twice(tmp_path):
    spool = Spool(tmp_path)
    spool.write_checkpoint({"message_uuid": "m1", "requests": []})
    spool.put({"message_uuid": "m1", "requests": []})  # crash before the checkpoint was cleared
    assert spool.recover_checkpoint() == []
    spool.write_checkpoint({"message_uuid": "m2", "requests": []})  # as an older proxy wrote it
    assert [p["message_uuid"] for p in spool.recover_checkpoint()] == ["m2"]


def test_a_checkpoint_of_several_exports_recovers_those_not_spooled(tmp_path):
    spool = Spool(tmp_path)
    parts = [{"message_uuid": "m3.0"}, {"message_uuid": "m3.1"}, {"message_uuid": "m3"}]
    spool.write_checkpoint({"message_uuid": "m3", "payloads": parts})
    spool.put(parts[0])  # a crash while the closed interval was being spooled
    assert [p["message_uuid"] for p in spool.recover_checkpoint()] == ["m3.1", "m3"]
    spool.put(parts[2])  # the interval's own export is spooled last: all of it is
    assert spool.recover_checkpoint() == []


def test_torn_or_garbage_spool_files_are_survived(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / ".00000000000000000001-x.json.tmp").write_bytes(b"half")
    (tmp_path / "00000000000000000002-y.json").write_bytes(b"{not json")
    (tmp_path / "checkpoint.json").write_bytes(b"\x00\x01")
    spool = Spool(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    (entry,) = spool.entries()
    assert spool.load(entry) is None  # unreadable: dropped with an error
    assert spool.entries() == []
    assert spool.recover_checkpoint() == []


def test_spooled_files_are_plain_json_payloads(tmp_path):
    spool = Spool(tmp_path)
    entry = spool.put({"message_uuid": "abc", "requests": [1]})
    assert orjson.loads(entry.path.read_bytes()) == {"message_uuid": "abc", "requests": [1]}


async def test_hanging_hub_slows_no_request_and_loses_nothing(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    import time

    cfg = tmp_path / "p.toml"
    cfg.write_text("hub_timeout = 0.3\n")
    hub.delay = 5  # every hub call hangs past the proxy's hub timeout
    proxy = await start_proxy(upstream.url, *hub_args, "--config", str(cfg))
    worst = 0.0
    for i in range(60):
        t0 = time.monotonic()
        async with http.get(f"{proxy.url}/items/{i}") as r:
            assert r.status == 200
        worst = max(worst, time.monotonic() - t0)
        await asyncio.sleep(0.02)
    assert worst < 0.5, f"a request took {worst:.2f} s while the hub hung"
    st = await proxy.status()
    assert st["hub"]["ok"] is False and st["hub"]["queued"] >= 1
    hub.delay = 0
    await hub.wait_for(lambda: sum(hub.request_counts().values()) >= 60, timeout=20)
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 60}


def checkpoint_file(state) -> tuple[int, int] | None:
    """(inode, mtime_ns) of the worker's checkpoint: each write renames a new file in."""
    found = list(state.rglob("checkpoint.json"))
    if not found:
        return None
    st = found[0].stat()
    return st.st_ino, st.st_mtime_ns


async def test_no_checkpoint_is_written_while_nothing_changed(
    hub, upstream, http, start_proxy, tmp_path
):
    state = tmp_path / "state"
    proxy = await start_proxy(upstream.url, *hub_cli_args(hub, "3600"), state_dir=state)
    await hub.wait_for(lambda: hub.accepted("sync"))  # the first (empty) sync
    await asyncio.sleep(1.6)
    assert checkpoint_file(state) is None  # an empty interval is not checkpointed
    await send(http, proxy.url, 3)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (first := checkpoint_file(state)) is None:
        assert loop.time() < deadline, "no checkpoint after the requests"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # a write in flight when the file appeared
    first = checkpoint_file(state)
    await asyncio.sleep(2.5)  # > two checkpoint intervals, no traffic
    assert checkpoint_file(state) == first
    await send(http, proxy.url, 1)
    deadline = loop.time() + 5
    while checkpoint_file(state) == first:
        assert loop.time() < deadline, "a new request was not checkpointed"
        await asyncio.sleep(0.1)
    # What a crash would recover is the whole open interval, rows as a sync sends them.
    checkpoint = orjson.loads(next(state.rglob("checkpoint.json")).read_bytes())
    (payload,) = checkpoint["payloads"]
    (row,) = payload["requests"]
    assert row["path"] == "/items/{id}" and row["request_count"] == 4
    assert row["response_times"] and all(isinstance(k, str) for k in row["response_times"])
    assert await proxy.stop() == 0
    assert hub.request_counts() == {(None, "GET", "/items/{id}", 200): 4}
