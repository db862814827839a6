"""Command line: parse flags, build settings, run one worker or supervise several."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from apitally_proxy import __version__
from apitally_proxy.checks import load_checked_settings
from apitally_proxy.config import (
    ConfigError,
    Settings,
    environment_warnings,
    setting_names,
)

log = logging.getLogger("apitally_proxy")

_BOOL_FIELDS = {"request_logging"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apitally-proxy",
        description="Sidecar reverse proxy that meters API traffic for Apitally. "
        "`apitally-proxy check [flags]` says what would happen with these settings "
        "(upstream, routes, credential, state dir, addresses) and exits non-zero on what "
        "would break traffic.",
        epilog="Every flag has an environment variable (shown in brackets); CLI beats env beats "
        "the --config TOML file beats defaults.",
    )
    for name, field in Settings.model_fields.items():
        env, flag = setting_names(field)
        if not flag:
            continue
        help_text = f"{field.description or name} [{env}]"
        if name in _BOOL_FIELDS:
            parser.add_argument(
                flag,
                dest=name,
                nargs="?",
                const="true",
                default=None,
                metavar="on|off",
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    parser.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("APITALLY_PROXY_LOG_LEVEL", "INFO"))
    parser.add_argument("--version", action="version", version=f"apitally-proxy {__version__}")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _run_worker(settings: Settings, slot: int, reuse_port: bool) -> int:
    from apitally_proxy.server import serve

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        runner = asyncio.run
    try:
        return runner(serve(settings, slot=slot, reuse_port=reuse_port))
    except ConfigError as exc:
        print(f"apitally-proxy: error: {exc}", file=sys.stderr)
        return 2


def _supervise(argv: list[str], settings: Settings) -> int:
    """Run `workers` child processes sharing the port (SO_REUSEPORT); forward signals."""
    n = settings.workers
    procs: dict[int, subprocess.Popen[bytes]] = {}

    spawned_at: dict[int, float] = {}
    stopping = False

    def spawn(slot: int) -> None:
        cmd = [sys.executable, "-m", "apitally_proxy", *argv, "--worker-slot", str(slot)]
        # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards
        # it once (the worker would read two signals as "skip the grace period").
        procs[slot] = subprocess.Popen(cmd, start_new_session=True)
        spawned_at[slot] = time.monotonic()
        if stopping:  # a signal arrived while we were spawning: pass it on
            procs[slot].send_signal(signal.SIGTERM)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(n):
        spawn(slot)
    exit_code = 0
    while procs:
        time.sleep(0.2)
        for slot, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            del procs[slot]
            # A negative code is a worker killed by a signal: a failure too.
            failed = code if code > 0 else (1 if code < 0 else 0)
            if stopping or code == 0:
                # Exit 0 is a worker told to stop (signalled directly, e.g. by a
                # group-wide kill): not a crash, nothing to restart.
                exit_code = max(exit_code, failed)
            elif code == 2 or time.monotonic() - spawned_at[slot] < 2:
                # A worker that cannot start is a config problem: stop everything.
                log.error("worker %d exited with %d at start-up; stopping", slot, code)
                forward(signal.SIGTERM, None)
                exit_code = max(exit_code, failed or 1)
            else:
                log.error("worker %d exited with %d; restarting it in 1 s", slot, code)
                time.sleep(1.0)  # no tight crash loop
                spawn(slot)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = bool(argv) and argv[0] == "check"  # `apitally-proxy check [flags]`: the preflight
    if check:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    cli_values = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    try:
        settings = load_checked_settings(cli_values)
    except ConfigError as exc:
        print(f"apitally-proxy: error: {exc}", file=sys.stderr)
        return 2
    if check:
        from apitally_proxy.preflight import report

        return report(settings)
    if args.worker_slot is None:  # once, not again in every worker
        for warning in environment_warnings():
            log.warning("%s", warning)
    if args.worker_slot is not None:
        return _run_worker(settings, args.worker_slot, reuse_port=True)
    if settings.workers > 1:
        return _supervise(argv, settings)
    return _run_worker(settings, 0, reuse_port=False)


if __name__ == "__main__":
    raise SystemExit(main())
