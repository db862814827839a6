from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_hub import FakeHub
from tests.support.fake_otlp import FakeOtlp
from tests.support.proxy_process import SERVER_UNDER_TEST, ProxyProcess
from tests.support.upstream import Upstream

CLIENT_ID = str(uuid.UUID(int=0x1234))


@pytest.fixture(params=["lean", "aiohttp"])
def both_servers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per client-facing server (`server = lean | aiohttp`): the
    hostile-input and proxying suites must pass on both. Use with
    `pytestmark = pytest.mark.usefixtures("both_servers")`."""
    monkeypatch.setenv(SERVER_UNDER_TEST, request.param)
    return str(request.param)


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    h = await FakeHub().start()
    yield h
    await h.stop()


@pytest.fixture
async def otlp() -> AsyncIterator[FakeOtlp]:
    receiver = await FakeOtlp().start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = await Upstream().start()
    yield u
    await u.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
    ) as s:
        yield s


StartProxy = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Starts real proxy processes; any still running at the end are killed."""
    started: list[ProxyProcess] = []

    async def _start(
        upstream_url: str,
        *args: str,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ProxyProcess:
        p = ProxyProcess(
            upstream_url, state_dir or tmp_path / f"state{len(started)}", *args, env=env
        )
        started.append(p)
        return await p.start()

    yield _start
    for p in started:
        await p.kill()


def hub_cli_args(hub: FakeHub, sync_interval: str) -> list[str]:
    """CLI arguments pointing a proxy at the fake hub."""
    return [
        "--client-id",
        CLIENT_ID,
        "--env",
        "test",
        "--hub-url",
        hub.url,
        "--sync-interval",
        sync_interval,
    ]


@pytest.fixture
def hub_args(hub: FakeHub) -> list[str]:
    """Pointing a proxy at the fake hub with a fast sync."""
    return hub_cli_args(hub, "0.3")


@pytest.fixture
def hub_args_long(hub: FakeHub) -> list[str]:
    """Pointing a proxy at the fake hub with a sync interval no test outlives: only the
    immediate first sync and the shutdown sync deliver anything."""
    return hub_cli_args(hub, "3600")
