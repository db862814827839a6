"""Real framework apps (uvicorn, node) as child processes on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from tests.support.proxy_process import free_port

ROOT = Path(__file__).resolve().parents[2]
FASTIFY_DIR = ROOT / "tests" / "apps" / "fastify"


class AppProcess:
    """One app server in a child process; `url` is its base URL once `start()` returned.

    Its output goes to `log_path` (a temp file unless given); `APITALLY_*` variables
    of the test run never reach it unless `env` says so.
    """

    def __init__(
        self,
        argv: list[str],
        port: int,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.argv = argv
        self.port = port
        self.cwd = cwd
        self.env = env or {k: v for k, v in os.environ.items() if not k.startswith("APITALLY_")}
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="app-", suffix=".log")[1])
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0, ready_path: str | None = None) -> AppProcess:
        """Start it and wait until it accepts connections (or answers 200 on ready_path)."""
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=log
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self._ready(ready_path):
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.argv} exited:\n{self.log()}")
            if loop.time() > deadline:
                raise RuntimeError(f"{self.argv} did not get ready in {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self

    async def _ready(self, ready_path: str | None) -> bool:
        try:
            if ready_path is None:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return True
            async with aiohttp.ClientSession() as s, s.get(self.url + ready_path) as r:
                return r.status == 200
        except (OSError, aiohttp.ClientError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, the way orchestrators stop a container (the official clients sync on it)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def uvicorn_app(target: str, port: int | None = None) -> AppProcess:
    """`target` as uvicorn takes it, e.g. tests.apps.fastapi_validation_app:app."""
    port = port or free_port()
    argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    return AppProcess([*argv, "--log-level", "warning"], port)


def fastify_app() -> AppProcess | None:
    """The Fastify test app; installs its locked dependencies first. None without node."""
    node = shutil.which("node")
    if node is None:
        return None
    if not (FASTIFY_DIR / "node_modules" / "fastify").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            return None
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=FASTIFY_DIR,
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, "npm_config_update_notifier": "false"},
        )
    port = free_port()
    return AppProcess([node, "app.js", str(port)], port, cwd=FASTIFY_DIR)
