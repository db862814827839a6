"""What a worker keeps in memory: the OTLP stack (opentelemetry-proto, protobuf) and PyYAML
are loaded only by the mode and the documents that need them, and the C heap's free
memory goes back to the OS after every sync (glibc's malloc_trim). Real proxy processes,
read through /proc/<pid>/maps and their logs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from apitally_proxy import heap
from apitally_proxy.heap import HeapTrimmer
from tests.support.fake_otlp import otlp_env

# The C extensions the two stacks load: mapped into the process once imported.
PROTOBUF_SO = "/google/_upb/_message"
YAML_SO = "/yaml/_yaml"
TRIM_LINE = "malloc_trim:"

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps"
)
needs_glibc = pytest.mark.skipif(not HeapTrimmer().available, reason="glibc's malloc_trim")


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def wait_log(proxy, text: str, count: int = 1, timeout: float = 10.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proxy.log().count(text) < count:
        if loop.time() > deadline:
            raise AssertionError(f"{text!r} not logged {count} times:\n{proxy.log()}")
        await asyncio.sleep(0.05)
    return proxy.log()


@needs_proc
async def test_a_local_mode_worker_loads_neither_protobuf_nor_yaml(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3")
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200
    await proxy.wait_status(lambda st: st["hub"]["last_sync"] is not None)
    maps = mapped(proxy.pid)
    assert PROTOBUF_SO not in maps
    assert YAML_SO not in maps


@needs_proc
async def test_a_hub_mode_worker_loads_neither_protobuf_nor_yaml(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args)
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200
    await hub.wait_for(lambda: hub.request_counts())
    maps = mapped(proxy.pid)
    assert PROTOBUF_SO not in maps
    assert YAML_SO not in maps


@needs_proc
async def test_an_otlp_mode_worker_loads_protobuf(otlp, upstream, start_proxy):
    """The other side of the two tests above: the check sees protobuf when it is there."""
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", env=otlp_env(otlp))
    await otlp.wait_for(lambda: len(otlp.gauges()) >= 1)
    assert PROTOBUF_SO in mapped(proxy.pid)
    assert await proxy.stop() == 0


@needs_glibc
async def test_the_heap_is_trimmed_after_every_sync(upstream, http, start_proxy):
    proxy = await start_proxy(upstream.url, "--sync-interval", "0.3", "--log-level", "DEBUG")
    async with http.get(proxy.url + "/items/1") as r:
        assert r.status == 200
    log = await wait_log(proxy, TRIM_LINE, count=3)
    assert "malloc_trim: released" in log or "malloc_trim: nothing" in log
    # Once per sync, not per request or per checkpoint: a few in ~1 s, not hundreds.
    assert log.count(TRIM_LINE) < 20
    assert await proxy.stop() == 0


@needs_glibc
async def test_an_otlp_worker_trims_after_every_export_cycle(otlp, upstream, start_proxy):
    proxy = await start_proxy(
        upstream.url, "--sync-interval", "0.3", "--log-level", "DEBUG", env=otlp_env(otlp)
    )
    await wait_log(proxy, TRIM_LINE, count=2)
    assert otlp.gauges()  # the export cycle ran before the trim
    assert await proxy.stop() == 0


def test_the_trimmer_calls_malloc_trim_with_zero_and_counts():
    calls: list[int] = []

    def malloc_trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = HeapTrimmer(malloc_trim)
    assert trimmer.available
    assert trimmer.trim() is True
    assert trimmer.trim() is True
    assert calls == [0, 0]
    assert trimmer.trims == 2
    assert trimmer.last_seconds is not None and trimmer.seconds >= trimmer.last_seconds


def test_without_glibc_the_trimmer_does_nothing(monkeypatch):
    def no_glibc(name: str) -> str:
        raise ValueError(name)  # what os.confstr raises for an unknown name

    monkeypatch.setattr(os, "confstr", no_glibc)
    assert heap._glibc_malloc_trim() is None
    trimmer = HeapTrimmer()
    assert not trimmer.available
    assert trimmer.trim() is False
    assert trimmer.trims == 0
