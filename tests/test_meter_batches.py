"""Finished requests are metered in batches (Worker._record): nothing is lost or late
for anyone who reads the meter. An in-process worker in local mode, real sockets."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from apitally_proxy import server as server_module
from apitally_proxy.config import load_settings
from apitally_proxy.server import Worker
from tests.support.proxy_process import free_port
from tests.support.upstream import Upstream


@pytest.fixture
async def worker(tmp_path):
    upstream = await Upstream().start()
    settings = load_settings(
        {
            "upstream": upstream.url,
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(tmp_path),
            "request_logging": True,
            "sync_interval": 3600,  # no sync during the test: only the reads below
        }
    )
    worker = Worker(settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain_and_stop()
        await upstream.stop()


async def _send(worker: Worker, n: int, connections: int = 8) -> None:
    url = f"http://{worker.settings.listen}/items/1"
    async with aiohttp.ClientSession() as session:

        async def one_connection(count: int) -> None:
            for _ in range(count):
                async with session.get(url) as response:
                    assert response.status == 200
                    await response.read()

        await asyncio.gather(*(one_connection(n // connections) for _ in range(connections)))


async def test_every_request_is_metered_before_the_meter_is_read(worker):
    batches: list[int] = []
    meter_pending = worker.meter_pending

    def spy() -> None:
        batches.append(len(worker._unmetered))
        meter_pending()

    worker.meter_pending = spy  # type: ignore[method-assign]
    assert worker.request_log is not None
    logged: list[str | None] = []
    add = worker.request_log.add

    def log_spy(exchange, template, consumer):  # type: ignore[no-untyped-def]
        logged.append(template)
        add(exchange, template, consumer)

    worker.request_log.add = log_spy  # type: ignore[method-assign]
    await _send(worker, 800)
    # The status page meters what is queued first: all 800, at once.
    assert worker.status()["requests_total"] == 800
    assert worker._unmetered == []
    assert max(batches) <= server_module.METER_BATCH_MAX
    assert sum(batches) == 800 and len(batches) > 1  # several batches, none over the cap
    # The request log got them too, with the template the meter chose.
    assert logged == ["/items/{id}"] * 800


async def test_a_lone_request_is_metered_within_the_batch_delay(worker):
    await _send(worker, 1, connections=1)
    assert len(worker._unmetered) == 1 or worker.meter.recorded == 1
    await asyncio.sleep(server_module.METER_BATCH_DELAY * 5)
    assert worker._unmetered == [] and worker.meter.recorded == 1


async def test_a_meter_failure_is_logged_and_the_rest_of_the_batch_still_counts(
    worker, monkeypatch, caplog
):
    record = worker.meter.record
    calls = 0

    def flaky(exchange):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return record(exchange)

    monkeypatch.setattr(worker.meter, "record", flaky)
    await _send(worker, 10, connections=1)
    assert worker.status()["requests_total"] == 9
    assert "metering a request failed" in caplog.text
