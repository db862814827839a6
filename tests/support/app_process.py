"""Real framework apps (uvicorn, node) as child processes on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.proxy_process import free_port

ROOT = Path(__file__).resolve().parents[2]
FASTIFY_DIR = ROOT / "tests" / "apps" / "fastify"


class AppProcess:
    """One app server; `url` is its base URL once `start()` returned."""

    def __init__(self, argv: list[str], port: int, cwd: Path = ROOT) -> None:
        self.argv = argv
        self.port = port
        self.cwd = cwd
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> AppProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc.returncode is not None:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise RuntimeError(f"{self.argv} exited: {err.decode(errors='replace')}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return self
            except OSError:
                if loop.time() > deadline:
                    raise RuntimeError(f"{self.argv} did not listen in {timeout} s") from None
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def uvicorn_app(target: str) -> AppProcess:
    """`target` as uvicorn takes it, e.g. tests.apps.fastapi_validation_app:app."""
    port = free_port()
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
