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
# One /health probe while waiting for start-up (a hung probe must not outlast the wait).
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PortTaken(Exception):
    """The proxy could not bind a port free_port() had found free a moment before."""


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
        """Start the proxy and wait until /health answers 200. A port taken between
        `free_port()` and the proxy's bind (by another test's outgoing connection, say)
        is a race of the harness, not a result: new ports, up to three tries."""
        for _ in range(2):
            try:
                return await self._start_once(timeout)
            except _PortTaken:
                self._repick_ports()
        return await self._start_once(timeout)

    def _repick_ports(self) -> None:
        for flag in ("--listen", "--admin-listen"):
            i = self.args.index(flag) + 1
            host = self.args[i].rsplit(":", 1)[0]
            port = free_port()
            self.args[i] = f"{host}:{port}"
            if flag == "--listen":
                self.port = port
            else:
                self.admin_port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    async def _start_once(self, timeout: float) -> ProxyProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        logged_before = len(self.log())
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
                    said = self.log()[logged_before:]
                    if self.proc.returncode == 2 and "address already in use" in said:
                        raise _PortTaken(said)
                    raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    async with s.get(self.admin_url + "/health", timeout=PROBE_TIMEOUT) as r:
                        if r.status == 200:
                            return self
                except (aiohttp.ClientError, TimeoutError):
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
