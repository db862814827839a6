"""`apitally-proxy check`: what will happen when the proxy starts, in plain words, like `nginx -t`.

Each check prints one line: `ok`, `warn` (works, but probably not as meant) or
`FAIL` (would break traffic or start-up). The exit status is 0 without failures,
1 with any, 2 when the settings themselves are invalid (as the proxy would exit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from apitally_proxy import frameworks
from apitally_proxy.config import (
    HostPort,
    Settings,
    environment_warnings,
)
from apitally_proxy.openapi import RouteDiscovery, RouteSet
from apitally_proxy.routes import declared_routes

Level = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str

    def __str__(self) -> str:
        return f"  {self.level:<4}  {self.what}"


async def _upstream(settings: Settings) -> Finding:
    up = settings.upstream_target
    started = time.perf_counter()
    try:
        if up.socket_path is not None:
            opening = asyncio.open_unix_connection(up.socket_path)
        else:
            opening = asyncio.open_connection(up.host, up.port)
        _, writer = await asyncio.wait_for(opening, settings.upstream_connect_timeout)
        writer.close()
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Finding(
            "FAIL",
            f"upstream {up} is not reachable ({reason}): requests would get 502; start the app "
            "or fix --upstream / APITALLY_PROXY_UPSTREAM",
        )
    ms = (time.perf_counter() - started) * 1000
    return Finding("ok", f"upstream {up} reachable (connected in {ms:.1f} ms)")


async def _routes(settings: Settings) -> list[Finding]:
    declared = declared_routes(settings.routes)
    found: list[RouteSet] = []
    choice = frameworks.from_setting(settings.framework)
    framework = choice.name
    discovery = RouteDiscovery(
        settings.upstream_target,
        settings.openapi_url,
        framework,
        choice.guess,
        declared,
        found.append,
        refresh=settings.openapi_refresh,
    )
    try:
        await discovery.refresh_once()
    finally:
        await discovery.stop()
    out = []
    if found and discovery.has_document:
        route_set = found[-1]
        out.append(
            Finding(
                "ok",
                f"route templates from the OpenAPI document at {discovery.source}: "
                f"{len(route_set.table)} routes"
                + (f" (with {len(declared)} declared)" if declared else ""),
            )
        )
        framework = route_set.framework or framework
    elif declared:
        out.append(Finding("ok", f"route templates: {len(declared)} declared routes"))
    else:
        why = (discovery.last_error or "no OpenAPI document found").removesuffix(
            "; using heuristic templates"
        )
        out.append(Finding("warn", f"no route source: {why}; id-like path segments become {{id}}"))
    if framework is None:
        out.append(
            Finding(
                "warn",
                "framework not known (set --framework / APITALLY_PROXY_FRAMEWORK): templates "
                "are spelled as in OpenAPI, validation errors read in every known shape",
            )
        )
    else:
        out.append(Finding("ok", f"framework {framework}"))
    return out


def _credential(settings: Settings) -> list[Finding]:
    mode = settings.export_mode
    problem = settings.export_problem
    out = []
    if problem is not None:
        out.append(Finding("warn", f"local mode: {problem} (traffic is proxied all the same)"))
    elif mode == "otlp":
        out.append(
            Finding(
                "ok",
                f"Apitally 1.x: OpenTelemetry export to {settings.otlp_endpoint} with a write "
                f"token, env {settings.env}",
            )
        )
    elif mode == "hub":
        out.append(
            Finding(
                "ok",
                f"Apitally 0.x: hub protocol to {settings.hub_url}, client id "
                f"{settings.client_id}, env {settings.env}",
            )
        )
    elif mode == "collector":
        out.append(Finding("ok", f"OTLP export to the collector {settings.collector_endpoint}"))
    else:
        out.append(
            Finding(
                "warn",
                "local mode: no APITALLY_WRITE_TOKEN or APITALLY_CLIENT_ID, nothing leaves "
                "the machine",
            )
        )
    out += [Finding("warn", w) for w in settings.export_warnings]
    return out


def _state_dir(settings: Settings) -> Finding:
    directory = settings.state_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".check-"):
            pass
    except OSError as exc:
        return Finding(
            "FAIL",
            f"state dir {directory} is not writable ({exc.strerror or exc}): the proxy would "
            "exit 2; set --state-dir / APITALLY_PROXY_STATE_DIR",
        )
    return Finding("ok", f"state dir {directory} writable (spool, instance ids)")


def _address_free(address: HostPort, what: str, setting: str) -> Finding:
    if address.port == 0:
        return Finding("ok", f"{what} {address}: any free port")
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            reason = "in use" if busy else (exc.strerror or str(exc))
            return Finding(
                "FAIL", f"{what} {address} is {reason}: the proxy would exit 2; set {setting}"
            )
    return Finding("ok", f"{what} {address} free")


async def run_checks(settings: Settings) -> list[Finding]:
    """Every finding, in the order a person reads them."""
    findings = [Finding("warn", w) for w in environment_warnings()]
    findings.append(await _upstream(settings))
    findings += await _routes(settings)
    findings += _credential(settings)
    findings.append(_state_dir(settings))
    findings.append(
        _address_free(settings.listen_address, "listen address", "--listen / APITALLY_PROXY_LISTEN")
    )
    admin = settings.admin_address
    if admin is None:
        findings.append(Finding("ok", "admin server off"))
    else:
        findings.append(
            _address_free(
                admin, "admin address", "--admin-listen / APITALLY_PROXY_ADMIN_LISTEN (or `off`)"
            )
        )
    return findings


def report(settings: Settings) -> int:
    """Print the findings; the exit status (0 fine, 1 something would break)."""
    # The findings say it all; the discovery's own warnings would say it twice.
    logging.getLogger("apitally_proxy.routes").setLevel(logging.ERROR)
    findings = asyncio.run(run_checks(settings))
    source = settings.config or os.environ.get("APITALLY_PROXY_CONFIG")
    print("apitally-proxy check" + (f" ({source})" if source else ""))
    for finding in findings:
        print(finding)
    failures = sum(f.level == "FAIL" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    if failures:
        print(f"result: {failures} problem(s) would break traffic, {warnings} warning(s)")
        return 1
    print(f"result: ready to proxy ({warnings} warning(s))")
    return 0
