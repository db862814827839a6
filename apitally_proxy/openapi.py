"""The app's OpenAPI document → its route set, and the task that keeps it fresh.

Parsing is pure (`load_document`, `extract_routes`, `build_route_set`) and runs
in a thread, so a huge document never stalls the event loop. `RouteDiscovery`
owns the background task: it fetches the document with its own session (never
through the proxy, so probing is never counted as traffic), at start, every
`refresh` seconds, and soon after the upstream went away and came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from apitally_proxy import frameworks
from apitally_proxy.aio import Background
from apitally_proxy.config import Upstream
from apitally_proxy.frameworks import OPENAPI_SPELLING, MatchRules
from apitally_proxy.routes import (
    MAX_ROUTES,
    METHODS,
    Param,
    Route,
    RouteTable,
    parse_template,
    spell,
)

log = logging.getLogger("apitally_proxy.routes")

# DESIGN.md's probe order, with the framework each location points to (frameworks.py).
PROBE_PATHS: tuple[tuple[str, str | None], ...] = frameworks.probe_paths()
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
# YAML is parsed in pure Python: keep it smaller, and refuse alias bombs.
MAX_YAML_BYTES = 2 * 1024 * 1024
MAX_YAML_ALIASES = 1000
# YAML aliases share objects; expanded (as JSON would write them) a few nested
# aliases can mean billions of nodes. Count the expansion, up to this budget.
MAX_EXPANDED_NODES = 2_000_000
# The official clients send at most this much of the document as `openapi`.
MAX_OPENAPI_STRING = 4_000_000
FETCH_TIMEOUT = 5.0
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
MAX_PROBE_BACKOFF = 3600.0  # seconds between probes once another route source is in force

_PATH_METHODS = {m.lower() for m in METHODS}


class DocumentError(ValueError):
    """The document cannot be used; the message says why."""


@dataclass(frozen=True)
class RouteSet:
    """A compiled route set and what the startup payload says about it."""

    table: RouteTable
    framework: str | None
    openapi: str | None  # the document as a JSON string, when there was one
    source: str
    warnings: list[str] = field(default_factory=list)


def _load_yaml(raw: bytes) -> Any:
    """Parse YAML with a SafeLoader that refuses too many aliases (billion-laughs).

    PyYAML is imported here, not at module level: most upstreams serve JSON (or
    nothing), and a worker that never parses YAML need not carry it.
    """
    import yaml

    class BoundedYamlLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise DocumentError(f"YAML document uses more than {MAX_YAML_ALIASES} aliases")
            return super().compose_node(parent, index)

    try:
        return yaml.load(raw, Loader=BoundedYamlLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise DocumentError(f"neither JSON nor YAML: {str(exc).splitlines()[0]}") from None


def load_document(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """Parse JSON or YAML; returns (document, the JSON text to send as `openapi` or None)."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"document is {len(raw)} bytes, over {MAX_DOCUMENT_BYTES}")
    text = raw.lstrip()
    doc: Any
    json_text: str | None = None
    if text[:1] in (b"{", b"["):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DocumentError(f"not valid JSON: {exc}") from None
        json_text = raw.decode("utf-8", errors="replace")
    else:
        if len(raw) > MAX_YAML_BYTES:
            raise DocumentError(f"YAML document is {len(raw)} bytes, over {MAX_YAML_BYTES}")
        doc = _load_yaml(raw)
        _check_expansion(doc)
    if not isinstance(doc, dict):
        raise DocumentError("not an OpenAPI document (top level is not an object)")
    if not (isinstance(doc.get("openapi"), str) or str(doc.get("swagger", "")).startswith("2")):
        raise DocumentError("not an OpenAPI document (no `openapi` or `swagger: 2.0` field)")
    if not isinstance(doc.get("paths"), dict):
        raise DocumentError("OpenAPI document has no `paths` object")
    if json_text is not None and len(json_text) > MAX_OPENAPI_STRING:
        json_text = None
    return doc, json_text


def _check_expansion(doc: Any) -> None:
    """Refuse YAML whose aliases expand past MAX_EXPANDED_NODES (bounded work)."""
    budget = MAX_EXPANDED_NODES
    stack = [doc]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise DocumentError(
                f"YAML document expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _prefix(doc: dict[str, Any]) -> str:
    """Swagger 2.0 `basePath`, or a relative OpenAPI 3 server URL (FastAPI's root_path)."""
    if "swagger" in doc:
        base = doc.get("basePath")
    else:
        servers = doc.get("servers")
        base = servers[0].get("url") if isinstance(servers, list) and servers else None
        if isinstance(servers, list) and servers and not isinstance(servers[0], dict):
            base = None
    if not isinstance(base, str) or not base.startswith("/"):
        return ""
    return base.rstrip("/")


def _param_kinds(params: Any, kinds: dict[str, str | None]) -> None:
    if not isinstance(params, list):
        return
    for p in params[:100]:
        if not isinstance(p, dict) or p.get("in") != "path" or not isinstance(p.get("name"), str):
            continue
        schema: dict[str, Any] = p["schema"] if isinstance(p.get("schema"), dict) else p
        typ, fmt = schema.get("type"), schema.get("format")
        if isinstance(typ, list):  # OpenAPI 3.1 type arrays
            typ = next((t for t in typ if t != "null"), None)
        kind: str | None = None
        if typ == "integer":
            kind = "int"
        elif typ == "number":
            kind = "float"
        elif typ == "string":
            kind = {"uuid": "uuid", "date": "date", "date-time": "datetime", "time": "time"}.get(
                fmt if isinstance(fmt, str) else "", "str"
            )
        kinds[p["name"]] = kind


def detect_framework(doc: dict[str, Any], hint: str | None) -> str | None:
    """Which framework served the document, from how it looks and where it was found."""
    components = doc.get("components") if isinstance(doc, dict) else None
    schemas = components.get("schemas") if isinstance(components, dict) else None
    info: dict[str, Any] = doc["info"] if isinstance(doc.get("info"), dict) else {}
    return frameworks.detect(schemas, info.get("title")) or hint


def extract_routes(
    doc: dict[str, Any],
    framework: str | None,
    warnings: list[str],
    typed_litestar: bool = True,
) -> list[Route]:
    """The document's operations as routes, spelled as `framework` writes templates.

    Templates are spelled as the official 0.x client reports them; OTLP export passes
    `typed_litestar=False` for apitally 1.x's spelling where it differs
    (`Framework.spelling_1x`: Litestar's `path_format`, `/items/{id}` not `/items/{id:int}`).
    """
    known = frameworks.get(framework)
    spelling = known.template_spelling(otlp=not typed_litestar) if known else OPENAPI_SPELLING
    prefix = _prefix(doc)
    # Routers that check parameter types while routing (Flask, Litestar: a mismatch is a
    # 404); the others (FastAPI, Fastify) route first and validate after.
    typed = known is not None and known.typed_routing
    routes: list[Route] = []
    paths = doc["paths"]
    if len(paths) > MAX_ROUTES:
        warnings.append(f"document has {len(paths)} paths; using the first {MAX_ROUTES}")
    bad = 0
    for raw_path, item in list(paths.items())[:MAX_ROUTES]:
        if not isinstance(raw_path, str) or not isinstance(item, dict):
            bad += 1
            continue
        try:
            segments = parse_template(prefix + raw_path)
        except ValueError:
            bad += 1
            continue
        shared: dict[str, str | None] = {}
        _param_kinds(item.get("parameters"), shared)
        for method, op in item.items():
            if method not in _PATH_METHODS or not isinstance(op, dict):
                continue
            kinds = dict(shared)
            _param_kinds(op.get("parameters"), kinds)
            segs = tuple(
                Param(s.name, s.kind or kinds.get(s.name)) if isinstance(s, Param) else s
                for s in segments
            )
            reported = spell(segs, spelling)
            if not typed:
                segs = tuple(
                    Param(s.name, "path" if s.kind == "path" else None)
                    if isinstance(s, Param)
                    else s
                    for s in segs
                )
            routes.append(Route(method.upper(), reported, segs))
            if len(routes) >= MAX_ROUTES:
                warnings.append(f"document has more than {MAX_ROUTES} operations; rest ignored")
                return routes
    if bad:
        warnings.append(f"{bad} path entries were not usable and were skipped")
    return routes


def build_route_set(
    raw: bytes | None,
    source: str,
    hint: str | None,
    framework: str | None,
    detect: bool,
    declared: list[Route],
    typed_litestar: bool = True,
) -> RouteSet:
    """Parse, extract and compile (pure; run it in a thread). Raises DocumentError."""
    warnings: list[str] = []
    routes: list[Route] = []
    openapi: str | None = None
    if raw is not None:
        doc, openapi = load_document(raw)
        if framework is None and detect:
            framework = detect_framework(doc, hint)
        routes = extract_routes(doc, framework, warnings, typed_litestar)
        if openapi is None:
            with contextlib.suppress(TypeError, ValueError):
                openapi = json.dumps(doc)
            if openapi is not None and len(openapi) > MAX_OPENAPI_STRING:
                warnings.append("document too large to send as `openapi`; routes still used")
                openapi = None
    # Declared routes first: where they overlap the document, their spelling wins.
    table = RouteTable([*declared, *routes], MatchRules.for_framework(framework))
    return RouteSet(table, framework, openapi, source, warnings)


class RouteDiscovery:
    """Owns the background task that finds and refreshes the app's route set.

    `on_change(route_set)` is called on the event loop whenever a document with
    different content was compiled. Failures only log: proxying never waits on this.
    """

    def __init__(
        self,
        upstream: Upstream,
        openapi_url: str | None,
        framework: str | None,
        detect: bool,
        declared: list[Route],
        on_change: Callable[[RouteSet], None],
        refresh: float = 300.0,
        upstream_trouble: Callable[[], int] | None = None,
        typed_litestar: bool = True,
    ) -> None:
        self._upstream = upstream
        self._openapi_url = openapi_url
        self._framework = framework
        self._detect = detect
        self._declared = declared
        self._typed_litestar = typed_litestar
        self._on_change = on_change
        self._refresh = refresh
        self._trouble = upstream_trouble or (lambda: 0)
        self._session: aiohttp.ClientSession | None = None  # to the upstream (TCP or unix)
        self._web_session: aiohttp.ClientSession | None = None  # for an absolute openapi_url
        self._background = Background()
        self._first_round = asyncio.Event()
        self._digest: bytes | None = None
        self._bad_digest: bytes | None = None
        self._found_at: str | None = None  # the probe location that worked last
        self._last_problem: str | None = None
        # Where the route set in use came from; declared routes are in force from the start.
        self.source: str | None = "config" if declared else None
        self.last_error: str | None = None
        self.fetches = 0

    def start(self) -> None:
        self._background.start(self._run(), "route-discovery")

    async def first_round(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the first discovery attempt to finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_round.wait(), timeout)

    async def stop(self) -> None:
        await self._background.stop()
        for session in (self._session, self._web_session):
            if session is not None:
                await session.close()
        self._session = self._web_session = None

    async def _run(self) -> None:
        attempt = 0
        # With declared routes in force and no --openapi-url, a missing document is the
        # normal case: look again at the steady pace, backing off, never in quick retries.
        settled = bool(self._declared) and self._openapi_url is None
        while True:
            try:
                fetched = await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let discovery die: the proxy must not care
                log.exception("route discovery failed; will retry")
                fetched = False
            self._first_round.set()
            if fetched:
                attempt = 0
                await self._wait_steady()
            elif settled:
                await asyncio.sleep(min(self._refresh * 2**attempt, MAX_PROBE_BACKOFF))
                attempt += 1
            else:
                # Quick retries while the app starts (or restarts), then the steady pace.
                delay = RETRY_DELAYS[attempt] if attempt < len(RETRY_DELAYS) else self._refresh
                await asyncio.sleep(min(delay, self._refresh))
                attempt += 1

    async def _wait_steady(self) -> None:
        """Sleep `refresh` seconds, or until the upstream had trouble (a restart, a deploy)."""
        trouble = self._trouble()
        deadline = time.monotonic() + self._refresh
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, self._refresh))
            if self._trouble() != trouble:
                log.info("upstream errors seen; re-reading the app's routes once it is back")
                return

    @property
    def has_document(self) -> bool:
        return self.source is not None and self.source != "config"

    async def refresh_once(self) -> bool:
        """One fetch-and-compile round; True when a usable document was fetched."""
        raw, where, hint = await self._fetch()
        if raw is None:
            return False
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return True
        if digest == self._bad_digest:
            return False
        return await self._compile(raw, where, hint)

    async def _compile(self, raw: bytes | None, where: str, hint: str | None) -> bool:
        try:
            route_set = await asyncio.to_thread(
                build_route_set,
                raw,
                where,
                hint,
                self._framework,
                self._detect,
                self._declared,
                self._typed_litestar,
            )
        except DocumentError as exc:
            self._warn(f"OpenAPI document at {where} ignored: {exc}")
            self._bad_digest = hashlib.sha256(raw).digest() if raw is not None else None
            return False
        if raw is not None:
            self._digest = hashlib.sha256(raw).digest()
        for warning in route_set.warnings:
            log.warning("OpenAPI document at %s: %s", where, warning)
        self.source = where
        self.last_error = None
        log.info(
            "route templates from %s: %d routes, framework %s",
            where,
            len(route_set.table),
            route_set.framework or "unknown",
        )
        self._on_change(route_set)
        return raw is not None

    def _note(self, message: str) -> None:
        """Not a problem: another route source is in force. Said once, at info level."""
        self.last_error = None
        if message != self._last_problem:
            log.info("%s", message)
            self._last_problem = message

    def _warn(self, problem: str) -> None:
        self.last_error = problem
        if problem != self._last_problem:  # once per distinct problem, not every retry
            log.warning("%s; proxying is unaffected", problem)
            self._last_problem = problem

    async def _fetch(self) -> tuple[bytes | None, str, str | None]:
        """The document's bytes, where they came from, and the framework that location hints."""
        url = self._openapi_url
        if url is not None:
            if url.startswith(("http://", "https://")):
                raw = await self._get_absolute(url)
            elif url.startswith("/") and not os.path.exists(url):
                raw = await self._get_upstream(url)
            else:
                return await self._read_file(url), url, None
            if raw is None and not self.has_document:
                self._warn(
                    f"no OpenAPI document at {url} (--openapi-url / APITALLY_PROXY_OPENAPI_URL)"
                )
            return raw, url, None
        probes = frameworks.probe_paths(self._framework)
        order = list(probes)
        if self._found_at is not None:  # try the last good location first
            order.sort(key=lambda p: p[0] != self._found_at)
        for path, hint in order:
            raw = await self._get_upstream(path)
            if raw is not None and _looks_like_document(raw):
                self._found_at = path
                return raw, path, hint
        if not self.has_document:
            where = ", ".join(p for p, _ in probes)
            if self._declared:
                self._note(
                    f"no OpenAPI document found at {where}; using the declared routes "
                    f"({len(self._declared)}), looking again in {self._refresh:.0f} s or later"
                )
            else:
                self._warn(
                    f"no OpenAPI document found at {where} (set --openapi-url / "
                    "APITALLY_PROXY_OPENAPI_URL, or declare `routes` in the config file); "
                    "using heuristic templates"
                )
        return None, "", None

    async def _read_file(self, path: str) -> bytes | None:
        path = path.removeprefix("file://")

        def read() -> bytes:
            with open(Path(path), "rb") as f:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
            return data

        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            self._warn(f"cannot read OpenAPI file {path} ({exc.strerror or exc})")
            return None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            up = self._upstream
            connector: aiohttp.BaseConnector
            if up.socket_path is not None:
                connector = aiohttp.UnixConnector(path=up.socket_path, force_close=True)
            else:
                connector = aiohttp.TCPConnector(force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _get_upstream(self, path: str) -> bytes | None:
        up = self._upstream
        return await self._get(self._get_session(), up.origin + up.base_path + path)

    async def _get_absolute(self, url: str) -> bytes | None:
        if self._web_session is None:
            self._web_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return await self._get(self._web_session, url)

    async def _get(self, session: aiohttp.ClientSession, url: str) -> bytes | None:
        self.fetches += 1
        try:
            async with session.get(
                url, allow_redirects=False, headers={"Accept": "application/json, */*"}
            ) as r:
                if r.status != 200:
                    return None
                if (r.content_length or 0) > MAX_DOCUMENT_BYTES:
                    self._warn(f"OpenAPI document at {url} is over {MAX_DOCUMENT_BYTES} bytes")
                    return None
                data = bytearray()
                async for chunk in r.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > MAX_DOCUMENT_BYTES:
                        self._warn(f"OpenAPI document at {url} is over {MAX_DOCUMENT_BYTES} bytes")
                        return None
                return bytes(data)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


def _looks_like_document(raw: bytes) -> bool:
    """Cheap sniff before a full parse: an HTML page or a JSON error is not a document."""
    if raw.lstrip()[:1] == b"<":
        return False
    return (b"openapi" in raw or b"swagger" in raw) and b"paths" in raw
