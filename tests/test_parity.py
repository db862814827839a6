"""Parity: each framework's app metered by apitally-proxy equals what its official client reports.

For each framework the same scripted traffic (tests/support/parity.py: TRAFFIC)
goes (a) through a real proxy process in front of the plain app, which names its
consumer in response headers, and (b) straight at the same app with the official
Apitally client enabled (apitally 0.25.1 for Python, apitally 0.25.8 for Fastify),
each side reporting to its own recording fake hub. The hubs' aggregates are then
compared one by one. Only the by-design differences listed in docs/differences.md
("Differences from the official in-process clients") are normalised away, each
named below for the rows it applies to; everything else must be equal.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.parity import (
    FASTIFY_PARITY_DIR,
    AppSpec,
    ParityResult,
    RequestKey,
    consumers,
    npm_ci,
    python_server,
    request_rows,
    run_parity,
    startup_paths,
    validation_errors,
)

pytestmark = pytest.mark.parity

SIZE_FIELDS = ("response_size_sum", "response_sizes")


@dataclass(frozen=True)
class Difference:
    """A by-design difference from the docs/differences.md table, and the request rows it covers."""

    why: str
    status: int | None = None  # rows with this status (None: any)
    path: str | None = None  # rows with this path (None: any)
    ignore: tuple[str, ...] = ()  # fields not compared on those rows
    no_consumer: bool = False  # the proxy cannot learn the consumer for those rows
    official_only: bool = False  # rows only the official client counts

    def covers(self, key: RequestKey) -> bool:
        return (self.status is None or key[3] == self.status) and (
            self.path is None or key[2] == self.path
        )


# An unhandled exception: the 500 is written by the framework's outermost error
# handler, after (outside) the app's middleware, from a response the in-process
# client never sees.
ASGI_UNHANDLED_500 = Difference(
    "Starlette/FastAPI unhandled exception: the official middleware sees no response "
    "(no size); the 500 is written outside the app's middleware, so no consumer header",
    status=500,
    ignore=SIZE_FIELDS,
    no_consumer=True,
)
FASTIFY_UNMATCHED = Difference(
    "the Fastify plugin counts requests that match no route under path ''; the proxy, like "
    "the Python clients, does not count unmatched requests",
    path="",
    official_only=True,
)


def uvicorn(target: str):
    return python_server(
        "uvicorn", target, "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"
    )


def fastify_argv(port: int) -> list[str]:
    node = shutil.which("node")
    assert node is not None
    return [node, "app.js", str(port)]


SPECS: dict[str, tuple[AppSpec, tuple[Difference, ...]]] = {
    "starlette": (
        AppSpec(
            "starlette",
            uvicorn("tests.apps.parity_starlette_app:app"),
            # Starlette serves no OpenAPI document: the routes are declared, as Starlette
            # spells them.
            routes=(
                "GET /items",
                "POST /items",
                "GET /items/{item_id:int}",
                "GET /users/{user_id:int}/orders/{order_id:int}",
                "GET /boom",
            ),
        ),
        (ASGI_UNHANDLED_500,),
    ),
    "fastapi": (
        AppSpec("fastapi", uvicorn("tests.apps.parity_fastapi_app:app")),
        (ASGI_UNHANDLED_500,),
    ),
    "flask": (
        AppSpec(
            "flask",
            python_server(
                "gunicorn",
                "--bind",
                "127.0.0.1:{port}",
                "--workers",
                "1",
                "tests.apps.parity_flask_app:app",
            ),
            # Flask has no OpenAPI document of its own: the routes are declared, as werkzeug
            # spells them.
            routes=(
                "GET /items",
                "POST /items",
                "GET /items/<int:item_id>",
                "GET /users/<int:user_id>/orders/<int:order_id>",
                "GET /boom",
            ),
        ),
        (),
    ),
    "litestar": (AppSpec("litestar", uvicorn("tests.apps.parity_litestar_app:app")), ()),
    "fastify": (
        AppSpec(
            "fastify",
            fastify_argv,
            cwd=FASTIFY_PARITY_DIR,
            routes=(
                "GET /items",
                "POST /items",
                "GET /items/:itemId",
                "GET /users/:userId/orders/:orderId",
                "GET /boom",
            ),
            prepare=lambda: npm_ci(FASTIFY_PARITY_DIR),
        ),
        (FASTIFY_UNMATCHED,),
    ),
}


@pytest.fixture(scope="module", params=list(SPECS))
def parity(request, tmp_path_factory) -> Iterator[tuple[ParityResult, tuple[Difference, ...]]]:
    spec, differences = SPECS[request.param]
    if spec.framework == "fastify" and (
        shutil.which("node") is None or shutil.which("npm") is None
    ):
        pytest.skip("node and npm are needed for the Fastify parity app")
    yield run_parity(spec, tmp_path_factory.mktemp(f"parity-{spec.framework}")), differences


def normalised(rows: dict[RequestKey, dict[str, Any]], differences, official: bool):
    """Rows with the by-design differences taken out (see Difference)."""
    out: dict[RequestKey, dict[str, Any]] = {}
    for key, row in rows.items():
        row = dict(row)
        for d in differences:
            if not d.covers(key):
                continue
            if d.official_only and official:
                row = None
                break
            if d.no_consumer:
                key = (None, *key[1:])
            for f in d.ignore:
                row.pop(f, None)
        if row is None:
            continue
        if key in out:  # rows merged by dropping the consumer
            merged = out[key]
            for f, v in row.items():
                merged[f] = merged[f] + v if isinstance(v, int) else {**merged[f], **v}
        else:
            out[key] = row
    return out


def test_both_sides_saw_the_same_statuses(parity):
    result, _ = parity
    assert result.proxy.statuses == result.official.statuses


def test_request_counts_per_consumer_method_template_status(parity):
    result, differences = parity
    proxy = normalised(request_rows(result.proxy), differences, official=False)
    official = normalised(request_rows(result.official), differences, official=True)
    assert {k: r["request_count"] for k, r in proxy.items()} == {
        k: r["request_count"] for k, r in official.items()
    }


@pytest.mark.parametrize(
    "field", ["request_size_sum", "response_size_sum", "request_sizes", "response_sizes"]
)
def test_size_sums_and_bins(parity, field):
    result, differences = parity
    proxy = normalised(request_rows(result.proxy), differences, official=False)
    official = normalised(request_rows(result.official), differences, official=True)
    assert {k: r.get(field) for k, r in proxy.items()} == {
        k: r.get(field) for k, r in official.items()
    }


def test_consumers(parity):
    result, _ = parity
    assert consumers(result.proxy) == consumers(result.official)
    assert consumers(result.proxy)  # the script names consumers with a name and group


def test_validation_errors(parity):
    result, _ = parity
    assert validation_errors(result.proxy) == validation_errors(result.official)


def test_startup_paths(parity):
    result, _ = parity
    assert startup_paths(result.proxy) == startup_paths(result.official)


def test_startup_client_tag(parity):
    result, _ = parity
    assert result.proxy.startups[-1]["client"] == result.official.startups[-1]["client"]


def test_server_errors_are_the_official_clients_alone(parity):
    # By design (docs/differences.md): the proxy cannot see exceptions inside the app, so it
    # sends no server_errors rows; the official client reports one per unhandled exception.
    result, _ = parity
    assert all(p["server_errors"] == [] for p in result.proxy.syncs)
    official = [e for p in result.official.syncs for e in p["server_errors"]]
    assert sum(e["error_count"] for e in official) == 2
    assert {e["path"] for e in official} == {"/boom"}


def tally(result: ParityResult, differences: tuple[Difference, ...]) -> dict[str, tuple[int, int]]:
    """(compared, matched) per aggregate: the numbers for the issue's parity table."""
    proxy = normalised(request_rows(result.proxy), differences, official=False)
    official = normalised(request_rows(result.official), differences, official=True)
    out = {}
    keys = proxy.keys() | official.keys()
    fields = ("request_count", "request_size_sum", "response_size_sum", "request_sizes")
    for field in (*fields, "response_sizes"):
        compared = [k for k in keys if field in proxy.get(k, official.get(k, {}))]
        matched = [
            k for k in compared if proxy.get(k, {}).get(field) == official.get(k, {}).get(field)
        ]
        out[field] = (len(compared), len(matched))
    for name, view in (
        ("consumers", consumers),
        ("validation_errors", validation_errors),
    ):
        a, b = view(result.proxy), view(result.official)
        out[name] = (
            len(a.keys() | b.keys()),
            sum(a.get(k) == b.get(k) for k in a.keys() | b.keys()),
        )
    a, b = set(startup_paths(result.proxy)), set(startup_paths(result.official))
    out["startup paths"] = (len(a | b), len(a & b))
    out["client tag"] = (
        1,
        int(result.proxy.startups[-1]["client"] == result.official.startups[-1]["client"]),
    )
    return out
