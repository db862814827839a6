"""Runs the real apitally-proxy as a child process, the way users run it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

SERVER_UNDER_TEST = "APITALLY_PROXY_TEST_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyProcess:
    def __init__(
        self, upstream: str, state_dir: Path, *args: str, env: dict[str, str] | None = None
    ):
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.state_dir = state_dir
        self.args = [
            "--upstream",
            upstream,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            "--state-dir",
            str(state_dir),
            *args,
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("APITALLY_",))}
        # The client-facing server under test (the `both_servers` fixture sets it).
        server = os.environ.get(SERVER_UNDER_TEST)
        if server:
            self.env["APITALLY_PROXY_SERVER"] = server
        self.env.update(env or {})
        self.log_path = state_dir / "proxy.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 15.0) -> ProxyProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "apitally_proxy",
                *self.args,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    async with s.get(self.admin_url + "/health") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if loop.time() > deadline:
                    raise RuntimeError(f"proxy did not become healthy:\n{self.log()}")
                await asyncio.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the proxy and wait for it to exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"proxy did not exit within {timeout} s:\n{self.log()}") from None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def status(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(self.admin_url + "/status.json") as r:
            return await r.json()

    async def wait_status(self, predicate, timeout: float = 10.0) -> dict:
        """The admin status once `predicate(status)` holds. Counters move after the client
        has its answer (a request is recorded when its handler ends): never read them once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            st = await self.status()
            if predicate(st):
                return st
            if loop.time() > deadline:
                raise AssertionError(f"proxy status: condition not met in {timeout} s: {st!r}")
            await asyncio.sleep(0.05)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss
