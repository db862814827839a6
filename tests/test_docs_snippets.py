"""Every code block in README.md, docs/architecture.md and docs/frameworks/*.md runs as written,
or is checked for real.

The blocks are read from the Markdown files themselves, by language, so editing a
snippet re-runs its check and a new block cannot slip in unchecked: a block of a
language this file has no check for fails `test_every_block_has_a_check`.

- python: the snippet, verbatim, inside a minimal app of its framework (the guide's
  cited file's imports, one route, `app`), served for real (gunicorn for Flask and Django,
  uvicorn otherwise) behind the real proxy; requests that identify a consumer the
  way the snippet reads it must be metered under that consumer, name and group
  (`/dashboard.json`). A guide's snippet must also be the cited tested file's code.
- js: the same with node and Fastify or Express.
- toml: loaded by the proxy's own config loader, then the proxy runs with it in
  front of the framework's parity app: route source "config", every declared route
  answered by the app and counted under its declared template.
- yaml (compose): every APITALLY_* name is one the proxy reads, the proxy's upstream
  names the app service on the port the app listens on, ports/volumes match the
  repo's image, and the environment (with the guide's TOML) loads as the container
  would load it.
- sh: every `apitally-proxy` command line parses with the real CLI parser, runs as
  `apitally-proxy check` and for real against loopback fakes (nothing reaches the
  internet); scripts exist and are executable; `docker compose up` + `curl` + `open`
  run the compose file's services as processes and ask them what the block asks.
- untagged: the data-flow diagram, and the module map whose paths must exist.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import hashlib
import hmac
import itertools
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import yaml

from apitally_proxy.cli import build_parser
from apitally_proxy.config import (
    FRAMEWORKS,
    Settings,
    env_names,
    environment_warnings,
    load_settings,
    parse_upstream,
)
from apitally_proxy.demo.sample_app import API_KEYS as DEMO_API_KEYS
from tests.apps.parity_common import CONSUMERS
from tests.conftest import CLIENT_ID
from tests.support.app_process import AppProcess
from tests.support.fake_hub import FakeHub
from tests.support.fake_otlp import TOKEN, FakeOtlp
from tests.support.parity import npm_ci
from tests.support.proxy_process import ProxyProcess, free_port
from tests.support.upstream import Upstream

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Pages checked as the README is (its blocks moved there): the same languages, the same checks.
README_PAGES = [README, ROOT / "docs" / "architecture.md"]
GUIDES = sorted((ROOT / "docs" / "frameworks").glob("*.md"))
FASTIFY_DIR = ROOT / "tests" / "apps" / "fastify"
FASTIFY_PARITY_DIR = ROOT / "tests" / "apps" / "parity_fastify"

# The languages each kind of file may use; each has a test below that checks its blocks.
CHECKED_LANGUAGES = {
    "README.md": {"", "sh", "python"},
    "guide": {"yaml", "python", "js", "toml"},
}


# ---------------------------------------------------------------- reading the blocks


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    prose: str  # the Markdown between the previous block and this one

    @property
    def kind(self) -> str:
        return "README.md" if self.path in README_PAGES else "guide"

    @property
    def framework(self) -> str | None:
        """The guide's framework (its file name), None for the README."""
        return None if self.path in README_PAGES else self.path.stem

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")


def read_blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    prose: list[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.fullmatch(
            rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[i]
        ):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: unclosed code block"
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", "\n".join(prose)))
        prose = []
        i += 1
    return out


ALL_BLOCKS = [b for path in (*README_PAGES, *GUIDES) for b in read_blocks(path)]


def blocks(lang: str, kind: str | None = None) -> list[Any]:
    return [
        pytest.param(b, id=f"{b.path.name}:{b.line}")
        for b in ALL_BLOCKS
        if b.lang == lang and (kind is None or b.kind == kind)
    ]


def test_every_block_has_a_check():
    assert {p.name for p in GUIDES} >= {f"{f}.md" for f in FRAMEWORKS}
    unchecked = [
        f"{b} ({b.lang or 'untagged'})"
        for b in ALL_BLOCKS
        if b.lang not in CHECKED_LANGUAGES[b.kind]
    ]
    assert not unchecked, f"code blocks no test checks: {unchecked}"
    # The files this test is about have blocks; a rename must not empty it silently.
    assert {b.path for b in ALL_BLOCKS} == {*README_PAGES, *GUIDES}


# ---------------------------------------------------------------- shared helpers


def app_env(**extra: str) -> dict[str, str]:
    """The environment of an app process: no APITALLY_* of the test run, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY_")}
    return {**env, **extra}


async def dashboard(proxy: ProxyProcess, requests: int, timeout: float = 10.0) -> dict[str, Any]:
    """/dashboard.json once it has counted `requests` requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(proxy.admin_url + "/dashboard.json") as r:
                assert r.status == 200
                view = await r.json()
            if sum(e["requests"] for e in view["endpoints"]) >= requests:
                return view
            if loop.time() > deadline:
                raise AssertionError(f"not {requests} requests counted: {view}\n{proxy.log()}")
            await asyncio.sleep(0.05)


async def together(*aws: Awaitable[Any]) -> list[Any]:
    """Await all (each finishes, so cleanup sees every process started); raise the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def consumers_of(view: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    return {c["identifier"]: (c["name"], c["group"]) for c in view["consumers"]}


async def send(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    json_body: Any = None,
) -> aiohttp.ClientResponse:
    async with http.request(method, url, headers=headers or {}, json=json_body) as r:
        await r.read()
        return r


# The consumers the guides' snippets identify (their `consumer_for` is parity_common's):
# requests as `Authorization: Bearer <key>`, and what the proxy must meter for each.
GUIDE_REQUESTS: list[dict[str, str]] = [
    *({"Authorization": f"Bearer {key}"} for key in CONSUMERS),
    {},
    {"Authorization": "Bearer key-nobody"},
]
GUIDE_CONSUMERS = {ident: (name, group) for ident, name, group in CONSUMERS.values()}


# ---------------------------------------------------------------- python snippets


@dataclass
class Harness:
    """A minimal app of one framework around a snippet, and how to serve it.

    `your_app` is the app's own code; its `{app}` line becomes `app_line` unless the
    snippet creates `app` itself.
    """

    imports: str  # what the harness itself needs
    your_app: str
    app_line: str
    provides: set[str]  # names of "your app" the snippet may use without importing them
    serve: Callable[[str, int], list[str]]  # (module, port) -> argv
    requests: list[dict[str, str]] = field(default_factory=lambda: GUIDE_REQUESTS)
    consumers: dict[str, tuple[str | None, str | None]] = field(
        default_factory=lambda: GUIDE_CONSUMERS
    )
    env: dict[str, str] = field(default_factory=dict)  # for the app; `{module}` is its name


def uvicorn(module: str, port: int) -> list[str]:
    host = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return [sys.executable, "-m", "uvicorn", f"{module}:app", *host]


def gunicorn(module: str, port: int) -> list[str]:
    bind = ["--bind", f"127.0.0.1:{port}", "--workers", "1"]
    return [sys.executable, "-m", "gunicorn", *bind, "--log-level", "warning", f"{module}:app"]


HARNESSES: dict[str, Harness] = {
    "flask": Harness(
        "from flask import Flask\n",
        """
{app}

@app.get("/items/<int:item_id>")
def _docs_item(item_id):
    return {"id": item_id}
""",
        "app = Flask(__name__)",
        {"app"},
        gunicorn,
    ),
    "fastapi": Harness(
        "from fastapi import FastAPI\n",
        """
{app}

@app.get("/items/{item_id}")
def _docs_item(item_id: int) -> dict[str, int]:
    return {"id": item_id}
""",
        "app = FastAPI()",
        {"app"},
        uvicorn,
    ),
    "starlette": Harness(
        "from starlette.applications import Starlette\n"
        "from starlette.responses import JSONResponse\n"
        "from starlette.routing import Route\n",
        """
async def _docs_item(request):
    return JSONResponse({"id": request.path_params["item_id"]})

routes = [Route("/items/{item_id:int}", _docs_item)]
{app}
""",
        "app = Starlette(routes=routes)",
        {"routes"},
        uvicorn,
    ),
    # Django reads its settings from the parity app's settings module, which takes the
    # URLconf and the middleware (the snippet's `consumer_header`) from this module.
    "django-ninja": Harness(
        "from django.core.wsgi import get_wsgi_application\n"
        "from django.urls import path\n"
        "from ninja import NinjaAPI\n",
        """
_api = NinjaAPI()

@_api.get("/items/{item_id}")
def _docs_item(request, item_id: int):
    return {"id": item_id}

urlpatterns = [path("", _api.urls)]
{app}
""",
        # Built at the first request: the middleware (the snippet) comes after this line.
        "def app(environ, start_response):\n"
        "    global _wsgi\n"
        "    _wsgi = globals().get('_wsgi') or get_wsgi_application()\n"
        "    return _wsgi(environ, start_response)",
        set(),
        gunicorn,
        env={
            "DJANGO_SETTINGS_MODULE": "tests.apps.parity_django_ninja_settings",
            "DJANGO_NINJA_APP": "{module}",
        },
    ),
    "litestar": Harness(
        "from litestar import Litestar, get\n",
        """
@get("/items/{item_id:int}")
async def _docs_item(item_id: int) -> dict[str, int]:
    return {"id": item_id}

ROUTES = [_docs_item]
{app}
""",
        "app = Litestar(ROUTES)",
        {"ROUTES"},
        uvicorn,
    ),
}

# The README's Flask snippet reads `g.api_key`, set by the app's own authentication:
# here a key table looked up from `X-API-Key`, as apps commonly do.
README_KEYS = {
    "key-muller": ("muller", "Müller & Söhne"),
    "key-acme": ("acme", "Acme Corp"),
    "key-lukasz": ("łukasz", "Łukasz"),  # outside Latin-1: the identifier must be quoted too
}
README_FLASK = Harness(
    "from dataclasses import dataclass\n\nfrom flask import Flask, g, request\n",
    """
{app}

@dataclass
class _ApiKey:
    customer_id: str
    customer_name: str

_KEYS = {k: _ApiKey(*v) for k, v in README_KEYS.items()}

@app.before_request
def _authenticate():
    key = _KEYS.get(request.headers.get("X-API-Key", ""))
    if key:
        g.api_key = key

@app.get("/items/<int:item_id>")
def _docs_item(item_id):
    return {"id": item_id}
""".replace("README_KEYS", repr(README_KEYS)),
    "app = Flask(__name__)",
    # `g` is Flask's request context: the snippet names only its extra import.
    {"app", "g"},
    gunicorn,
    requests=[{"X-API-Key": k} for k in README_KEYS] + [{}, {"X-API-Key": "key-nobody"}],
    consumers={ident: (name, None) for ident, name in README_KEYS.values()},
)


def harness_for(block: Block) -> Harness:
    if block.framework is None:
        assert "In Flask" in block.prose, f"{block}: the README snippet's framework is unknown"
        return README_FLASK
    assert block.framework in HARNESSES, f"{block}: no Python harness for {block.framework}"
    return HARNESSES[block.framework]


def cited_file(block: Block) -> Path | None:
    """The tested file the prose before a snippet says it comes from."""
    m = re.findall(r"from\s+`(tests/apps/[\w./-]+)`", block.prose)
    return ROOT / m[-1] if m else None


def free_names(tree: ast.AST) -> set[str]:
    """Names the code reads without binding them anywhere (approximate: scopes merged)."""
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return used - bound - set(dir(builtins))


def top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    return [
        node
        for node in tree.body
        if isinstance(node, ast.Import)
        or (isinstance(node, ast.ImportFrom) and node.module != "__future__")
    ]


def functions(tree: ast.AST) -> dict[str, str]:
    """Every function definition, by name, as an AST dump without its docstring."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            copy = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "body": body})
            out.setdefault(node.name, ast.dump(copy))
    return out


def snippet_module(block: Block, harness: Harness) -> str:
    """The app module: imports, the minimal app, then the snippet verbatim."""
    tree = ast.parse(block.text)
    provided = set(harness.provides)
    imports = ""
    source = cited_file(block)
    if source is not None:
        source_tree = ast.parse(source.read_text())
        imported = top_level_imports(source_tree)
        imports = "".join(ast.unparse(node) + "\n" for node in imported)
        provided |= {(a.asname or a.name).split(".")[0] for node in imported for a in node.names}
    missing = free_names(tree) - provided
    assert not missing, (
        f"{block}: the snippet uses {sorted(missing)}, which neither it nor the file it "
        "cites imports"
    )
    assigns_app = any(
        isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "app" for t in node.targets)
        for node in tree.body
    )
    return (
        imports
        + harness.imports
        + "\n"
        + harness.your_app.replace("{app}", "" if assigns_app else harness.app_line)
        + "\n# ---- the snippet, verbatim\n"
        + block.text
    )


@pytest.mark.parametrize("block", blocks("python", "guide"))
def test_a_guide_snippet_is_the_tested_files_code(block: Block):
    # (The README's snippet has no file to be copied from: it is run below, as all are.)
    source = cited_file(block)
    assert source is not None, f"{block}: the prose names no tests/apps/ file the snippet is from"
    assert source.is_file(), f"{block}: cites {source}, which does not exist"
    theirs, ours = functions(ast.parse(source.read_text())), functions(ast.parse(block.text))
    assert ours, f"{block}: no function in the snippet"
    for name, dump in ours.items():
        assert theirs.get(name) == dump, (
            f"{block}: `{name}` differs from {source.relative_to(ROOT)} (comments aside)"
        )


@pytest.mark.parametrize("block", blocks("python"))
async def test_a_python_snippet_meters_its_consumers_behind_the_proxy(
    block: Block, start_proxy, http, tmp_path
):
    harness = harness_for(block)
    module = tmp_path / "docs_snippet_app.py"
    module.write_text(snippet_module(block, harness))
    compile(module.read_text(), str(module), "exec")
    port = free_port()
    extra = {name: value.format(module=module.stem) for name, value in harness.env.items()}
    app = AppProcess(
        harness.serve(module.stem, port),
        port,
        env=app_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), **extra),
        log_path=tmp_path / "app.log",
    )
    framework = block.framework or "flask"
    try:
        _, proxy = await together(app.start(), start_proxy(app.url, "--framework", framework))
        for headers in harness.requests:
            r = await send(http, proxy.url + "/items/1", headers)
            assert r.status == 200, f"{block}: {r.status} for {headers}\n{app.log()}"
            assert not [h for h in r.headers if h.lower().startswith("x-apitally")]
        view = await dashboard(proxy, len(harness.requests))
    finally:
        await app.stop()
    assert consumers_of(view) == harness.consumers, f"{block}\n{app.log()}"
    counted = sum(c["requests"] for c in view["consumers"])
    assert counted == len(harness.consumers)  # the anonymous requests have no consumer


# ---------------------------------------------------------------- the JS snippet


def normalised_js(text: str) -> str:
    return " ".join(re.sub(r"//[^\n]*", "", text).split())


@dataclass(frozen=True)
class JsHarness:
    """A minimal node app around a JS snippet: `app` creates it, the snippet goes between
    `before` and `after` (which defines /items/:itemId and listens on argv[2])."""

    directory: Path  # whose node_modules the app uses
    app: str
    before: str
    after: str


EXPRESS_PARITY_DIR = ROOT / "tests" / "apps" / "parity_express"
JS_HARNESSES = {
    "fastify": JsHarness(
        FASTIFY_DIR,
        'const fastify = require("fastify")({ logger: false });\n',
        'fastify.get("/items/:itemId", async (request) => ({ id: request.params.itemId }));\n',
        'fastify.listen({ host: "127.0.0.1", port: Number(process.argv[2]) });\n',
    ),
    # Express middleware runs in order: the snippet's before the route.
    "express": JsHarness(
        EXPRESS_PARITY_DIR,
        'const express = require("express");\nconst app = express();\n',
        "",
        'app.get("/items/:itemId", (req, res) => res.json({ id: req.params.itemId }));\n'
        'app.listen({ host: "127.0.0.1", port: Number(process.argv[2]) });\n',
    ),
}


@pytest.mark.parametrize("block", blocks("js"))
async def test_a_js_snippet_meters_its_consumers_behind_the_proxy(
    block: Block, start_proxy, http, tmp_path
):
    assert block.framework in JS_HARNESSES, f"{block}: no JS harness for {block.framework}"
    js = JS_HARNESSES[block.framework]
    source = cited_file(block)
    assert source is not None and source.is_file(), f"{block}: cites no tests/apps/ file"
    assert normalised_js(block.text) in normalised_js(source.read_text()), (
        f"{block}: not the code of {source.relative_to(ROOT)} (comments aside)"
    )
    npm_ci(js.directory)
    table = {
        key: {k: v for k, v in zip(("identifier", "name", "group"), c, strict=True) if v}
        for key, c in CONSUMERS.items()
    }
    script = tmp_path / "app.js"
    script.write_text(
        '"use strict";\n' + js.app + f"const CONSUMERS = {json.dumps(table, ensure_ascii=False)};\n"
        "function consumerFor(request) {\n"
        '  const auth = request.headers.authorization || "";\n'
        '  return auth.startsWith("Bearer ") ? CONSUMERS[auth.slice(7)] : undefined;\n'
        "}\n" + js.before + "// ---- the snippet, verbatim\n" + block.text + js.after
    )
    port = free_port()
    node_path = str(js.directory / "node_modules")
    app = AppProcess(
        ["node", str(script), str(port)],
        port,
        cwd=tmp_path,
        env=app_env(NODE_PATH=node_path),
        log_path=tmp_path / "app.log",
    )
    try:
        _, proxy = await together(app.start(), start_proxy(app.url, "--framework", block.framework))
        for headers in GUIDE_REQUESTS:
            r = await send(http, proxy.url + "/items/1", headers)
            assert r.status == 200, f"{block}: {r.status}\n{app.log()}"
            assert not [h for h in r.headers if h.lower().startswith("x-apitally")]
        view = await dashboard(proxy, len(GUIDE_REQUESTS))
    finally:
        await app.stop()
    assert consumers_of(view) == GUIDE_CONSUMERS, app.log()


# ---------------------------------------------------------------- TOML: declared routes


def parity_app(framework: str) -> AppProcess:
    """The framework's parity app (the routes the guides declare), plain mode."""
    port = free_port()
    node_dirs = {"fastify": FASTIFY_PARITY_DIR, "express": EXPRESS_PARITY_DIR}
    if framework in node_dirs:
        npm_ci(node_dirs[framework])
        return AppProcess(["node", "app.js", str(port)], port, cwd=node_dirs[framework])
    serve = gunicorn if framework == "flask" else uvicorn
    return AppProcess(serve(f"tests.apps.parity_{framework}_app", port), port, env=app_env())


def app_routes(framework: str) -> set[tuple[str, str]]:
    """(METHOD, path as the framework spells it) of every route the parity app defines."""
    if framework in ("fastify", "express"):
        directory = FASTIFY_PARITY_DIR if framework == "fastify" else EXPRESS_PARITY_DIR
        source = (directory / "app.js").read_text()
        call = "fastify" if framework == "fastify" else "app"
        found = re.findall(rf'{call}\.(get|post|put|patch|delete)\(\s*"([^"]+)"', source)
        return {(method.upper(), path) for method, path in found}
    if framework == "flask":
        from tests.apps.parity_flask_app import app as flask_app

        return {
            (method, rule.rule)
            for rule in flask_app.url_map.iter_rules()
            if rule.endpoint != "static"
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
        }
    if framework == "starlette":
        from tests.apps.parity_starlette_app import app as starlette_app

        return {
            (method, route.path)
            for route in starlette_app.routes
            for method in (getattr(route, "methods", None) or set()) - {"HEAD"}
        }
    raise AssertionError(f"no route table for {framework}")


def sample_path(template: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}|:\w+", "7", template)


@pytest.mark.parametrize("block", blocks("toml"))
async def test_a_toml_block_declares_routes_the_app_has(
    block: Block, start_proxy, http, tmp_path, monkeypatch
):
    config = tmp_path / "apitally-proxy.toml"
    config.write_text(block.text)
    declared = tomllib.loads(block.text)["routes"]
    for name in [n for n in os.environ if n.startswith("APITALLY_")]:
        monkeypatch.delenv(name)
    settings = load_settings({"upstream": "http://127.0.0.1:8000", "config": str(config)})
    assert settings.routes == declared
    assert settings.framework == block.framework
    pairs = {tuple(route.split(" ", 1)) for route in declared}
    missing = pairs - app_routes(block.framework or "")
    assert not missing, f"{block}: not spelled as the app's routes: {sorted(missing)}"

    app = parity_app(block.framework or "")
    try:
        _, proxy = await together(app.start(), start_proxy(app.url, "--config", str(config)))
        status = await proxy.status()
        routes = status["routes"]
        assert (routes["source"], routes["count"]) == ("config", len(declared)), routes
        assert routes["framework"] == block.framework
        for route in declared:
            method, template = route.split(" ", 1)
            body = {"name": "pen", "price": 1.5} if method == "POST" else None
            r = await send(http, proxy.url + sample_path(template), method=method, json_body=body)
            assert r.status < 400, f"{block}: {route} answered {r.status}: not a route of the app"
        view = await dashboard(proxy, len(declared))
    finally:
        await app.stop()
    assert {(e["method"].upper(), e["route"]) for e in view["endpoints"]} == pairs


# ---------------------------------------------------------------- YAML: compose blocks


def dockerfile_env() -> dict[str, str]:
    """The APITALLY_* defaults the repo's image sets (ENV lines of the Dockerfile)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                name, _, value = word.partition("=")
                out[name] = value
    return {k: v for k, v in out.items() if k.startswith("APITALLY_")}


def repo_compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: Any, environ: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution."""

    def one(m: re.Match[str]) -> str:
        return environ.get(m.group(1)) or (m.group(3) or "")

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, str(value))


def app_listens(service: dict[str, Any], raw: str) -> tuple[str, int]:
    """(host, port) the app service's command listens on."""
    command = [str(c) for c in service.get("command", [])]
    flags = dict(itertools.pairwise(command))
    if "uvicorn" in command:
        return flags.get("--host", "127.0.0.1"), int(flags.get("--port", "8000"))
    if "gunicorn" in command:
        host, _, port = (flags.get("--bind") or flags.get("-b") or "127.0.0.1:8000").rpartition(":")
        return host, int(port)
    if command[:1] == ["node"]:
        # Fastify's listen() is in the app's code; the block says it on the command line.
        m = re.search(r'command:.*listen\(\{ host: "([^"]+)", port: (\d+) \}\)', raw)
        assert m, "a node app's command line must say where it listens"
        return m.group(1), int(m.group(2))
    raise AssertionError(f"cannot tell where {command} listens")


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(value))
    assert m, f"not a compose duration: {value}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


SAMPLE_ENV = {"APITALLY_WRITE_TOKEN": TOKEN, "APITALLY_CLIENT_ID": CLIENT_ID}


def container_settings(
    environment: dict[str, str], config_text: str | None, tmp_path: Path, monkeypatch
) -> Settings:
    """The settings the proxy container would load: the image's ENV, then the service's."""
    for name in [n for n in os.environ if n.startswith(("APITALLY_", "OTEL_"))]:
        monkeypatch.delenv(name)
    env = {**dockerfile_env(), **environment}
    if "APITALLY_PROXY_CONFIG" in env:
        assert config_text is not None, "APITALLY_PROXY_CONFIG set, but the guide has no TOML"
        path = tmp_path / "apitally-proxy.toml"
        path.write_text(config_text)
        env["APITALLY_PROXY_CONFIG"] = str(path)
    env["APITALLY_PROXY_STATE_DIR"] = str(tmp_path / "state")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert environment_warnings(env) == []
    return load_settings({})


@pytest.mark.parametrize("block", blocks("yaml"))
def test_a_compose_block_runs_the_repos_proxy_in_front_of_the_app(
    block: Block, tmp_path, monkeypatch
):
    known = env_names()
    named = set(re.findall(r"\b(?:APITALLY|OTEL)_[A-Z0-9_]+", block.text))
    assert named <= set(known), f"{block}: not read by the proxy: {sorted(named - set(known))}"

    doc = yaml.safe_load(block.text)
    services = doc["services"]
    [proxy_name] = [
        n for n, s in services.items() if "APITALLY_PROXY_UPSTREAM" in s.get("environment", {})
    ]
    proxy = services[proxy_name]
    environment = {k: str(v) for k, v in proxy["environment"].items()}

    # The image: the repo's (the tag its docker-compose.yml builds from the Dockerfile).
    ours = repo_compose()["services"]["proxy"]
    assert proxy.get("build") or proxy.get("image") == ours["image"], proxy
    assert ours["build"] == "." and (ROOT / "Dockerfile").is_file()

    # The upstream: the app service, on the host and port the app listens on.
    upstream = parse_upstream(environment["APITALLY_PROXY_UPSTREAM"])
    assert upstream.host in services and upstream.host != proxy_name, upstream
    host, port = app_listens(services[upstream.host], block.text)
    assert host == "0.0.0.0", f"{block}: the app listens on {host}, unreachable from the proxy"
    assert port == upstream.port, f"{block}: the app listens on {port}, the proxy asks {upstream}"
    assert upstream.host in proxy.get("depends_on", [])

    # Ports and volumes: the proxy's listen port, the image's state dir.
    image_env = {**dockerfile_env(), **environment}
    listen = image_env.get("APITALLY_PROXY_LISTEN") or Settings.model_fields["listen"].default
    for mapping in proxy["ports"]:
        assert int(str(mapping).rsplit(":", 1)[1]) == int(listen.rsplit(":", 1)[1]), mapping
    mounts = {}
    for volume in proxy.get("volumes", []):
        src, dst = str(volume).split(":")[:2]
        mounts[dst] = src
        if not src.startswith((".", "/")):
            assert src in (doc.get("volumes") or {}), f"{block}: volume {src} is not declared"
    assert image_env["APITALLY_PROXY_STATE_DIR"] in mounts, f"{block}: the state dir is not kept"
    if "APITALLY_PROXY_CONFIG" in environment:
        assert environment["APITALLY_PROXY_CONFIG"] in mounts, (
            f"{block}: APITALLY_PROXY_CONFIG names a file the container does not have"
        )
    grace = Settings.model_fields["shutdown_grace"].default
    assert seconds(proxy["stop_grace_period"]) > grace  # drain + final sync, then SIGKILL

    # The environment as the container loads it, with the guide's TOML as its config file.
    assert environment["APITALLY_PROXY_FRAMEWORK"] == block.framework
    config = [b.text for b in ALL_BLOCKS if b.path == block.path and b.lang == "toml"]
    config_text = config[0] if config else None
    env = {k: interpolate(v, SAMPLE_ENV) for k, v in environment.items()}
    settings = container_settings(env, config_text, tmp_path, monkeypatch)
    assert settings.export_mode == "otlp" and settings.export_problem is None
    assert settings.framework == block.framework
    assert settings.upstream_target == upstream
    if config_text is not None:
        assert settings.routes == tomllib.loads(config_text)["routes"]
    # The commented-out alternative credential: with both, the write token wins (a warning).
    alternatives = dict(re.findall(r"#\s*(APITALLY_\w+): (\S+)", block.text))
    assert alternatives, f"{block}: no alternative credential shown"
    both = {**env, **{k: interpolate(v, SAMPLE_ENV) for k, v in alternatives.items()}}
    settings = container_settings(both, config_text, tmp_path, monkeypatch)
    assert settings.export_mode == "otlp" and settings.export_warnings
    only = {k: v for k, v in both.items() if k != "APITALLY_WRITE_TOKEN"}
    assert container_settings(only, config_text, tmp_path, monkeypatch).export_mode == "hub"


# ---------------------------------------------------------------- sh blocks


@dataclass
class Command:
    env: dict[str, str]
    argv: list[str]


PLACEHOLDERS = {"apt_...": TOKEN}  # a made-up token of the real form


def substitute(word: str) -> str:
    word = PLACEHOLDERS.get(word, word)
    for name in re.findall(r"\$\{?(\w+)\}?", word):
        assert name in SAMPLE_ENV, f"no sample value for ${name}"
        word = re.sub(rf"\$\{{?{name}\}}?", SAMPLE_ENV[name], word)
    assert "..." not in word, f"a placeholder with no sample value: {word}"
    return word


def sh_commands(text: str) -> list[Command]:
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.match(r"[A-Za-z_]\w*=", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if words:
            out.append(Command(env, words))
    return out


@dataclass
class Sh:
    """What the commands of one block share: fakes, the test's fixtures, started services."""

    block: Block
    start_proxy: Callable[..., Awaitable[ProxyProcess]]
    http: aiohttp.ClientSession
    tmp_path: Path
    upstream: Upstream
    published: dict[int, str] = field(default_factory=dict)  # host port -> base URL
    apps: list[AppProcess] = field(default_factory=list)
    proxies: list[ProxyProcess] = field(default_factory=list)

    def url(self, url: str) -> str:
        """A URL of the block (localhost:<published port>) as the local service's URL."""
        parts = urlsplit(url)
        assert parts.hostname in ("localhost", "127.0.0.1"), url
        assert parts.port in self.published, f"{url}: port {parts.port} is not published"
        return self.published[parts.port] + urlunsplit(("", "", parts.path, parts.query, ""))


def flag_of(setting: str) -> str | None:
    extra: Any = Settings.model_fields[setting].json_schema_extra or {}
    return extra.get("flag")


def without_flag(argv: list[str], flag: str | None) -> list[str]:
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = True
        elif not (flag and word.startswith(flag + "=")):
            out.append(word)
    return out


@dataclass(frozen=True)
class Invocation:
    """One `apitally-proxy` command line of a block, made local: what to run and expect."""

    args: list[str]  # the block's flags, without --upstream and --listen
    env: dict[str, str]
    upstream: str  # the block's upstream, pointed at the local one
    check_only: bool
    mode: str  # otlp, hub or local: what the credential in the block selects
    api_env: str
    client_id: str
    consumer_header: str | None


def invocation(cmd: Command, sh: Sh, alternative: dict[str, str]) -> Invocation:
    """Parse the flags with the real parser; substitute samples and local addresses."""
    args = cmd.argv[1:]
    check = args[:1] == ["check"]
    if check:
        args = args[1:]
    parser = build_parser()
    try:
        parsed = vars(parser.parse_args(args))
    except SystemExit:
        raise AssertionError(f"{sh.block}: apitally-proxy rejects {args}") from None
    assert parsed["upstream"], f"{sh.block}: {cmd.argv} gives no upstream"
    if check:
        assert "`apitally-proxy check [flags]`" in (parser.description or "")
    for name, value in alternative.items():  # "# or APITALLY_...=..." instead of the flag
        args = without_flag(args, flag_of(env_names()[name]))
        parsed[env_names()[name]] = value
    env = {k: substitute(v) for k, v in {**cmd.env, **alternative}.items()}
    args = [substitute(a) for a in args]
    parse_upstream(parsed["upstream"])
    upstream = urlsplit(parsed["upstream"])
    local_upstream = urlunsplit(("http", f"127.0.0.1:{sh.upstream.port}", upstream.path, "", ""))
    client_id = substitute(parsed["client_id"] or env.get("APITALLY_CLIENT_ID") or "")
    mode = "otlp" if env.get("APITALLY_WRITE_TOKEN") else "hub" if client_id else "local"
    return Invocation(
        args=without_flag(without_flag(args, "--upstream"), "--listen"),
        env=env,
        upstream=local_upstream,
        check_only=check,
        mode=mode,
        api_env=substitute(parsed["env"] or env.get("APITALLY_ENV", "dev")),
        client_id=client_id,
        consumer_header=parsed.get("consumer_header") or env.get("APITALLY_PROXY_CONSUMER_HEADER"),
    )


async def fakes() -> tuple[FakeHub, FakeOtlp, dict[str, str]]:
    """A recording hub and OTLP receiver on loopback, and the environment pointing at them."""
    hub, otlp = await FakeHub().start(), await FakeOtlp().start()
    return hub, otlp, {"APITALLY_OTLP_ENDPOINT": otlp.url, "APITALLY_HUB_BASE_URL": hub.url}


async def run_check(run: Invocation, sh: Sh) -> None:
    """`apitally-proxy check` with the block's flags and environment: ready, as the block says."""
    hub, otlp, to_fakes = await fakes()
    try:
        state = sh.tmp_path / f"check-{free_port()}"
        local = [
            *("--upstream", run.upstream),
            *("--listen", f"127.0.0.1:{free_port()}"),
            *("--admin-listen", f"127.0.0.1:{free_port()}"),
            *("--state-dir", str(state)),
        ]
        executable = Path(sys.executable).with_name("apitally-proxy")  # what `pip install .` made
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("APITALLY_")}
        proc = await asyncio.create_subprocess_exec(
            str(executable),
            "check",
            *local,
            *run.args,
            env={**base_env, **to_fakes, **run.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
        assert proc.returncode == 0, f"{sh.block}: {run}: check says\n{out}"
        assert f"upstream {run.upstream} reachable" in out, out
        if run.mode == "otlp":
            assert f"Apitally 1.x: OpenTelemetry export to {otlp.url} with a write token" in out
        elif run.mode == "hub":
            assert f"Apitally 0.x: hub protocol to {hub.url}, client id {run.client_id}" in out
        else:
            assert "local mode" in out, out
        if run.mode != "local":
            assert f"env {run.api_env}" in out, out
        assert otlp.calls == [] and hub.calls == [], "check contacted Apitally"
    finally:
        await hub.stop()
        await otlp.stop()


async def run_for_real(run: Invocation, sh: Sh) -> None:
    """The proxy itself with the block's flags and environment, Apitally replaced by fakes:
    one request through it arrives where the credential says, with the consumer the
    consumer header names."""
    hub, otlp, to_fakes = await fakes()
    try:
        proxy = await sh.start_proxy(run.upstream, *run.args, env={**to_fakes, **run.env})
        key = "sk-docs-key-1"
        headers = {}
        if run.consumer_header:
            bearer = run.consumer_header.lower() == "authorization"
            headers[run.consumer_header] = f"Bearer {key}" if bearer else key
        r = await send(sh.http, proxy.url + "/items/1", headers)
        assert r.status == 200
        view = await dashboard(proxy, 1)
        if run.consumer_header:
            salt = (proxy.state_dir / "consumer-salt").read_bytes().strip()
            expected = hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:16]
            assert consumers_of(view) == {expected: (None, None)}, f"{sh.block}: {run}"
        assert await proxy.stop() == 0, proxy.log()
        if run.mode == "otlp":
            [call, *_] = [c for c in otlp.calls if c.signal == "metrics"]
            assert call.headers["Authorization"] == f"Bearer {TOKEN}"
            assert call.headers["Apitally-Env"] == run.api_env
            assert sum(otlp.request_counts().values()) == 1
        elif run.mode == "hub":
            assert {(c.client_id, c.env) for c in hub.calls} == {(run.client_id, run.api_env)}
            assert sum(hub.request_counts().values()) == 1
        else:
            assert hub.calls == [] and otlp.calls == []
            assert (proxy.state_dir / "local" / "worker-0.jsonl").is_file()
    finally:
        await hub.stop()
        await otlp.stop()


async def run_apitally_proxy(cmd: Command, sh: Sh, alternative: dict[str, str]) -> None:
    """Run it as `check`, and for real unless it is a check (both at once)."""
    run = invocation(cmd, sh, alternative)
    await together(run_check(run, sh), *([] if run.check_only else [run_for_real(run, sh)]))


async def run_docker_compose(cmd: Command, sh: Sh) -> None:
    """`docker compose up`: the repo's compose services, as processes on loopback."""
    assert cmd.argv[1:3] == ["compose", "up"] and set(cmd.argv[3:]) <= {"--build", "-d"}
    doc = repo_compose()
    for service in doc["services"].values():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    services = doc["services"]
    proxy_spec = services["proxy"]
    environment = {k: interpolate(v, {}) for k, v in proxy_spec["environment"].items()}
    assert set(environment) <= set(env_names())
    upstream = parse_upstream(environment.pop("APITALLY_PROXY_UPSTREAM"))
    app_spec = services[upstream.host]
    argv = [*app_spec["entrypoint"], *app_spec["command"]]
    assert argv[:3] == ["python", "-m", "apitally_proxy.demo.sample_app"], argv
    flags = dict(itertools.pairwise(argv))
    assert (flags["--host"], int(flags["--port"])) == ("0.0.0.0", upstream.port)
    port = free_port()
    app = AppProcess(
        [sys.executable, *argv[1:3], "--host", "127.0.0.1", "--port", str(port)],
        port,
        env=app_env(),
    )
    sh.apps.append(app)
    await app.start(ready_path="/health")
    proxy = await sh.start_proxy(app.url, env={k: v for k, v in environment.items() if v})
    sh.proxies.append(proxy)
    image = dockerfile_env()
    listen_port = int(image["APITALLY_PROXY_LISTEN"].rsplit(":", 1)[1])
    admin_port = int(image["APITALLY_PROXY_ADMIN_LISTEN"].rsplit(":", 1)[1])
    for mapping in proxy_spec["ports"]:
        *_, host_port, container_port = str(mapping).split(":")
        target = {listen_port: proxy.url, admin_port: proxy.admin_url}[int(container_port)]
        sh.published[int(host_port)] = target


async def run_curl(cmd: Command, sh: Sh) -> None:
    headers, urls, words = {}, [], iter(cmd.argv[1:])
    for word in words:
        if word in ("-H", "--header"):
            name, _, value = next(words).partition(":")
            headers[name.strip()] = value.strip()
        else:
            assert not word.startswith("-"), f"{sh.block}: curl option {word} not handled"
            urls.append(word)
    [url] = urls
    r = await send(sh.http, sh.url(url), headers)
    assert r.status == 200, f"{sh.block}: {cmd.argv}: {r.status}"
    # The sample app knows the key: the proxy meters its consumer.
    scheme, _, key = headers.get("Authorization", "").partition(" ")
    if scheme == "Bearer":
        [proxy] = sh.proxies
        view = await dashboard(proxy, 1)
        consumer = DEMO_API_KEYS[key]
        assert consumers_of(view) == {consumer.identifier: (consumer.name, consumer.group)}


async def run_open(cmd: Command, sh: Sh) -> None:
    [url] = cmd.argv[1:]
    async with sh.http.get(sh.url(url)) as r:
        assert r.status == 200 and r.content_type == "text/html", f"{sh.block}: {url}"
        assert "apitally-proxy" in await r.text()


def check_script(cmd: Command, sh: Sh) -> None:
    path = ROOT / cmd.argv[0]
    assert path.is_file() and os.access(path, os.X_OK), f"{sh.block}: {path} is not executable"
    assert path.read_text().startswith("#!"), path


def check_pip(cmd: Command, sh: Sh) -> None:
    assert cmd.argv == ["pip", "install", "."], cmd.argv
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["apitally-proxy"] == "apitally_proxy.cli:main"
    assert Path(sys.executable).with_name("apitally-proxy").is_file()


@pytest.mark.parametrize("block", blocks("sh", "README.md"))
async def test_an_sh_block_runs(block: Block, start_proxy, http, tmp_path, upstream):
    known = env_names()
    named = set(re.findall(r"\b(?:APITALLY|OTEL)_[A-Z0-9_]+", block.text))
    assert named <= set(known), f"{block}: not read by the proxy: {sorted(named - set(known))}"
    sh = Sh(block, start_proxy, http, tmp_path, upstream)
    commands = sh_commands(block.text)
    assert commands, f"{block}: no command"
    # "# or APITALLY_X=value": the same command with that variable instead of its flag.
    alternatives = re.findall(r"#\s*or\s+((?:APITALLY|OTEL)_\w+)=(\S+)", block.text)
    independent = []  # the apitally-proxy command lines, run together at the end
    try:
        for cmd in commands:
            name = cmd.argv[0]
            if name == "apitally-proxy":
                independent.append(run_apitally_proxy(cmd, sh, {}))
                for setting, value in alternatives:
                    independent.append(run_apitally_proxy(cmd, sh, {setting: value}))
            elif name.startswith("scripts/"):
                check_script(cmd, sh)
            elif name == "pip":
                check_pip(cmd, sh)
            elif name == "docker":
                await run_docker_compose(cmd, sh)
            elif name == "curl":
                await run_curl(cmd, sh)
            elif name == "open":
                await run_open(cmd, sh)
            else:
                raise AssertionError(f"{block}: no check for the command {name!r}")
        await together(*independent)
    finally:
        for pending in independent:
            pending.close()  # not awaited when an earlier command failed
        for app in sh.apps:
            await app.stop()


# ---------------------------------------------------------------- untagged blocks


@pytest.mark.parametrize("block", blocks("", "README.md"))
def test_an_untagged_block_is_a_diagram_or_a_true_module_map(block: Block):
    lines = block.text.splitlines()
    if any("──>" in line for line in lines):
        return  # the data-flow picture: nothing to run
    assert lines[0].endswith("/"), f"{block}: neither a diagram nor a module map"
    top: Path | None = None
    listed = 0
    for line in lines:
        m = re.match(r"^( {0,2})([\w.-]+(?:/[\w.-]+)*/?)(?:\s{2,}|$)", line)
        if not m:
            assert line.startswith(" " * 10), f"{block}: cannot read {line!r}"
            continue  # a description's second line
        path = ROOT / m.group(2) if not m.group(1) else (top or ROOT) / m.group(2)
        if not m.group(1):
            top = path
        assert path.exists(), f"{block}: {path.relative_to(ROOT)} does not exist"
        assert path.is_dir() == m.group(2).endswith("/"), path
        listed += 1
    assert listed > 5
