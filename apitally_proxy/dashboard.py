"""The admin dashboard: a plain view of the live status, as JSON and as one HTML page.

`build_view` turns a status snapshot (with its `recent` window) into the values a
person reads: per-endpoint and per-consumer tables over the last minutes, a
traffic series, and health in plain words. `render_page` writes that view as a
self-contained page (no external assets: the proxy may run air-gapped) whose
small script re-fetches the main part every few seconds. Every value that came
from the app or a client is escaped here, in one place (`_e`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from typing import Any

from apitally_proxy.metering.recent import (
    BUCKETS_AT,
    CLIENT_ERRORS,
    DURATION_SUM,
    LATENCY_BOUNDS,
    REQUESTS,
    SERVER_ERRORS,
    SIZE_SUM,
    quantile,
)

TABLE_SECONDS = 300  # the tables cover the last five minutes
MAX_TABLE_ROWS = 50
REFRESH_SECONDS = 3

# ---------------------------------------------------------------- the view (JSON)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "never"
    return f"{_duration(now - then)} ago"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def _add(into: list[float], row: list[float]) -> None:
    for i, v in enumerate(row):
        into[i] += v


def _totals(slots: list[dict[str, Any]], table: str) -> dict[str, list[float]]:
    """One slot table (`endpoints`, `consumers`) summed over the slots, key by key."""
    totals: dict[str, list[float]] = {}
    for slot in slots:
        for key, row in slot[table].items():
            if key in totals:
                _add(totals[key], row)
            else:
                totals[key] = list(row)
    return totals


def _endpoint_rows(slots: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, row in _totals(slots, "endpoints").items():
        method, _, route = key.partition(" ")
        n = row[REQUESTS]
        buckets = row[BUCKETS_AT:]
        errors = row[CLIENT_ERRORS] + row[SERVER_ERRORS]
        out.append(
            {
                "method": method,
                "route": route,
                "requests": int(n),
                "per_minute": round(n * 60 / seconds, 1) if seconds else None,
                "client_errors": int(row[CLIENT_ERRORS]),
                "server_errors": int(row[SERVER_ERRORS]),
                "error_rate": round(errors / n, 4) if n else 0.0,
                "p50_ms": _ms(quantile(buckets, 0.50)),
                "p95_ms": _ms(quantile(buckets, 0.95)),
                "p99_ms": _ms(quantile(buckets, 0.99)),
                "mean_ms": _ms(row[DURATION_SUM] / n) if n else None,
                "mean_response_bytes": round(row[SIZE_SUM] / n) if n else None,
            }
        )
    out.sort(key=lambda r: (-r["requests"], r["route"], r["method"]))
    return out


def _consumer_rows(
    slots: list[dict[str, Any]], names: dict[str, list[str | None]]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for identifier, row in _totals(slots, "consumers").items():
        n = row[REQUESTS]
        name, group = (names.get(identifier) or [None, None])[:2]
        out.append(
            {
                "identifier": identifier,
                "name": name,
                "group": group,
                "requests": int(n),
                "client_errors": int(row[CLIENT_ERRORS]),
                "server_errors": int(row[SERVER_ERRORS]),
                "error_rate": round((row[CLIENT_ERRORS] + row[SERVER_ERRORS]) / n, 4) if n else 0,
                "mean_ms": _ms(row[DURATION_SUM] / n) if n else None,
            }
        )
    out.sort(key=lambda r: (-r["requests"], r["identifier"]))
    return out


def _series(
    by_number: dict[int, dict[str, Any]], first: int, last: int, width: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for number in range(first, last + 1):
        slot = by_number.get(number)
        buckets = [0.0] * (len(LATENCY_BOUNDS) + 1)
        n = client = server = 0.0
        if slot is not None:
            for row in slot["endpoints"].values():
                n += row[REQUESTS]
                client += row[CLIENT_ERRORS]
                server += row[SERVER_ERRORS]
                _add(buckets, row[BUCKETS_AT:])
        out.append(
            {
                "t": number * width,
                "requests": int(n),
                "client_errors": int(client),
                "server_errors": int(server),
                "unmatched": slot["unmatched"] if slot is not None else 0,
                "p50_ms": _ms(quantile(buckets, 0.50)),
                "p95_ms": _ms(quantile(buckets, 0.95)),
            }
        )
    return out


def _validation_rows(slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for slot in slots:
        for key, n in slot["validation"].items():
            counts[key] = counts.get(key, 0) + n
    out: list[dict[str, Any]] = []
    for key, n in counts.items():
        method, route, location, message, kind = (key.split("\t") + [""] * 5)[:5]
        out.append(
            {
                "method": method,
                "route": route,
                "location": location,
                "message": message,
                "type": kind,
                "count": n,
            }
        )
    out.sort(key=lambda r: (-r["count"], r["route"]))
    return out


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _route_source(routes: dict[str, Any]) -> str:
    source, count, framework = routes.get("source"), routes.get("count"), routes.get("framework")
    if source == "config":
        text = f"{_plural(count or 0, 'route')} declared in the config file"
    elif source:
        text = f"{_plural(count or 0, 'route')} from the OpenAPI document at {source}"
    else:
        seen, learned = routes.get("templates_seen") or 0, routes.get("learned_positions") or 0
        text = (
            f"no route list: {_plural(seen, 'template')} inferred from traffic (ids become "
            f"{{id}}; {_plural(learned, 'position')} learned from distinct values)"
        )
    if framework:
        text += f"; framework {framework}"
    return text


def _health(s: dict[str, Any], now: float) -> list[dict[str, str]]:
    hub = s["hub"]
    lines: list[dict[str, str]] = []

    def say(what: str, level: str, text: str) -> None:
        lines.append({"what": what, "level": level, "text": text})

    errors = s.get("upstream_errors") or {}
    failures = sum(errors.values())
    if failures:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(errors.items()))
        say(
            "Upstream",
            "warn",
            f"{s['upstream']}: {failures} failed exchanges since start ({kinds})",
        )
    else:
        say("Upstream", "ok", f"{s['upstream']}: no failed exchanges since start")
    say("In flight", "ok", f"{s.get('in_flight', 0)} requests being proxied now")

    queued, spooled = hub.get("queued", 0), _bytes(hub.get("spool_bytes", 0))
    mode = hub.get("mode")
    if mode == "local":
        written = f"written to {hub['local_file']}" if hub.get("local_file") else "kept here"
        say(
            "Export",
            "ok",
            f"local mode: nothing is sent to Apitally; {hub.get('sent', 0)} payloads {written}",
        )
    else:
        where = {"otlp": "Apitally (OpenTelemetry)", "hub": "Apitally hub"}.get(
            mode or "", "the collector"
        )
        target = f"{where} at {hub.get('endpoint')}"
        if hub.get("stopped"):
            say("Export", "error", f"stopped sending to {target}: {hub.get('problem')}")
        elif not hub.get("ok"):
            say(
                "Export",
                "error",
                f"not delivering to {target}: {hub.get('problem')}; {queued} payloads queued "
                f"({spooled} on disk), kept and retried",
            )
        else:
            say(
                "Export",
                "ok",
                f"delivering to {target}; last success {_ago(hub.get('last_success'), now)}; "
                f"{queued} payloads queued ({spooled} on disk)",
            )
    dropped = {
        "rejected": hub.get("dropped_rejected", 0),
        "expired": hub.get("dropped_expired", 0),
        "spool full": hub.get("dropped_spool_full", 0),
    }
    if any(dropped.values()):
        parts = ", ".join(f"{k} {n}" for k, n in dropped.items() if n)
        say("Dropped payloads", "warn", f"{sum(dropped.values())} since start ({parts})")
    if hub.get("unencodable"):
        say(
            "Unencodable values",
            "warn",
            f"{hub['unencodable']} values repaired or dropped; the rest was kept",
        )
    routes = s.get("routes") or {}
    problem = routes.get("problem")
    text = _route_source(routes) + (f". {problem}" if problem else "")
    say("Routes", "warn" if problem else "ok", text)
    if s.get("consumer_overflow"):
        say(
            "Consumers",
            "warn",
            f"{s['consumer_overflow']} requests counted without their consumer "
            "(max_consumers reached)",
        )
    if s.get("consumer_unconfirmed"):
        say(
            "Consumers",
            "ok",
            f"{s['consumer_unconfirmed']} keys the app refused or never accepted were not "
            "counted as consumers",
        )
    log = s.get("request_log")
    if log is not None:
        level = "warn" if log.get("last_error") or log.get("dropped") else "ok"
        text = f"request logging on: {log.get('logged', 0)} logged, {log.get('dropped', 0)} dropped"
        if log.get("last_error"):
            text += f"; last error: {log['last_error']}"
        say("Request log", level, text)
    return lines


def build_view(s: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The dashboard's values for one status snapshot (the JSON API returns this)."""
    now = time.time() if now is None else now
    recent = s.get("recent") or {}
    width = int(recent.get("slot_seconds", 10))
    by_number = {int(k): v for k, v in (recent.get("slots") or {}).items()}
    current = int(now) // width
    first = current - max(1, 600 // width) + 1
    table_first = current - TABLE_SECONDS // width + 1
    table_slots = [v for k, v in by_number.items() if table_first <= k <= current]
    # The tables cover at most TABLE_SECONDS, less just after a start.
    covered = min(TABLE_SECONDS, max(float(width), s.get("uptime_s", TABLE_SECONDS)))
    endpoints = _endpoint_rows(table_slots, covered)
    total = sum(r["requests"] for r in endpoints)
    errors = sum(r["client_errors"] + r["server_errors"] for r in endpoints)
    return {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
        "proxy": {
            "version": s.get("version"),
            "upstream": s.get("upstream"),
            "listen": s.get("listen"),
            "uptime": _duration(s.get("uptime_s", 0)),
            "mode": s["hub"].get("mode"),
            "workers_reporting": s.get("workers_reporting", [s.get("worker_slot", 0)]),
            "requests_since_start": s.get("requests_total", 0),
        },
        "health": _health(s, now),
        "table_seconds": round(covered),
        "totals": {
            "requests": total,
            "per_minute": round(total * 60 / covered, 1),
            "error_rate": round(errors / total, 4) if total else 0.0,
            "unmatched": sum(v["unmatched"] for v in table_slots),
        },
        "endpoints": endpoints,
        "consumers": _consumer_rows(table_slots, recent.get("names") or {}),
        "series": _series(by_number, first, current, width),
        "slot_seconds": width,
        "validation_errors": _validation_rows(table_slots),
    }


# ---------------------------------------------------------------- the page (HTML)


def _e(value: Any) -> str:
    """Escape for HTML text and attribute values (the one place values enter markup)."""
    return html.escape("-" if value is None else str(value), quote=True)


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f} %"


def _num(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}{suffix}"
    return f"{value:,.0f}{suffix}"


def _table(caption: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<section><h2>{_e(caption)}</h2><p class="empty">{_e(empty)}</p></section>'
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return (
        f"<section><h2>{_e(caption)}</h2><table><thead><tr>{ths}</tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


def _td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _error_cls(rate: float) -> str:
    return "num bad" if rate >= 0.05 else "num warn" if rate > 0 else "num"


def _chart(series: list[dict[str, Any]], slot_seconds: int) -> str:
    """Requests per slot as bars (errors in red), p95 response time as a line."""
    w, h, pad = 720, 170, 28
    n = max(1, len(series))
    top = max([p["requests"] for p in series] + [1])
    slowest = max([p["p95_ms"] or 0 for p in series] + [1.0])
    step = (w - 2 * pad) / n
    parts = []
    points = []
    for i, p in enumerate(series):
        x = pad + i * step
        bar = (h - 2 * pad) * p["requests"] / top
        err = (h - 2 * pad) * (p["client_errors"] + p["server_errors"]) / top
        label = (
            f"{time.strftime('%H:%M:%S', time.localtime(p['t']))}: {p['requests']} requests, "
            f"{p['client_errors'] + p['server_errors']} errors, p95 {_num(p['p95_ms'], ' ms')}"
        )
        parts.append(
            f'<g><title>{_e(label)}</title><rect class="bar" x="{x:.1f}" y="{h - pad - bar:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{bar:.1f}"/>'
            f'<rect class="err" x="{x:.1f}" y="{h - pad - err:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{err:.1f}"/></g>'
        )
        if p["p95_ms"] is not None:
            y = h - pad - (h - 2 * pad) * p["p95_ms"] / slowest
            points.append(f"{x + step / 2:.1f},{y:.1f}")
            parts.append(f'<circle class="p95" cx="{x + step / 2:.1f}" cy="{y:.1f}" r="2"/>')
    line = f'<polyline class="p95" points="{" ".join(points)}"/>' if len(points) > 1 else ""
    minutes = len(series) * slot_seconds / 60
    return (
        f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="requests and p95 response time, last {minutes:.0f} minutes">'
        f'<line class="axis" x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}"/>'
        f"{''.join(parts)}{line}"
        f'<text x="{pad}" y="{pad - 10}">{_e(top)} req / {slot_seconds} s</text>'
        f'<text class="p95t" x="{w - pad}" y="{pad - 10}" text-anchor="end">'
        f"p95 up to {_e(_num(slowest, ' ms'))}</text>"
        f'<text x="{pad}" y="{h - 8}">-{minutes:.0f} min</text>'
        f'<text x="{w - pad}" y="{h - 8}" text-anchor="end">now</text></svg>'
    )


def render_main(view: dict[str, Any]) -> str:
    """The refreshing part of the page."""
    proxy, totals = view["proxy"], view["totals"]
    health = "".join(
        f'<li class="{_e(item["level"])}"><b>{_e(item["what"])}</b> {_e(item["text"])}</li>'
        for item in view["health"]
    )
    minutes = view["table_seconds"] / 60
    cards = "".join(
        f'<div class="card"><span>{_e(label)}</span><b>{_e(value)}</b></div>'
        for label, value in (
            ("Mode", proxy["mode"]),
            ("Requests / min", _num(totals["per_minute"])),
            ("Error rate", _pct(totals["error_rate"])),
            ("Unmatched", _num(totals["unmatched"])),
            ("Since start", _num(proxy["requests_since_start"])),
            ("Uptime", proxy["uptime"]),
        )
    )
    endpoints = [
        [
            _td(r["method"], "method"),
            _td(r["route"], "route"),
            _td(_num(r["requests"]), "num"),
            _td(_pct(r["error_rate"]), _error_cls(r["error_rate"])),
            _td(_num(r["p50_ms"]), "num"),
            _td(_num(r["p95_ms"]), "num"),
            _td(_num(r["p99_ms"]), "num"),
            _td(_bytes(r["mean_response_bytes"] or 0), "num"),
        ]
        for r in view["endpoints"][:MAX_TABLE_ROWS]
    ]
    consumers = [
        [
            _td(r["identifier"], "route"),
            _td(r["name"]),
            _td(r["group"]),
            _td(_num(r["requests"]), "num"),
            _td(_pct(r["error_rate"]), _error_cls(r["error_rate"])),
            _td(_num(r["mean_ms"]), "num"),
        ]
        for r in view["consumers"][:MAX_TABLE_ROWS]
    ]
    validation = [
        [
            _td(r["method"], "method"),
            _td(r["route"], "route"),
            _td(r["location"]),
            _td(r["message"]),
            _td(r["type"]),
            _td(_num(r["count"]), "num"),
        ]
        for r in view["validation_errors"][:MAX_TABLE_ROWS]
    ]
    span = f"last {minutes:.0f} min" if minutes >= 1 else f"last {view['table_seconds']} s"
    return (
        f'<p class="meta">apitally-proxy {_e(proxy["version"])} · upstream '
        f"{_e(proxy['upstream'])} · workers {_e(', '.join(map(str, proxy['workers_reporting'])))}"
        f' · updated <time id="updated">{_e(view["generated_at"])}</time></p>'
        f'<ul class="health">{health}</ul><div class="cards">{cards}</div>'
        f"<section><h2>Traffic, last {len(view['series']) * view['slot_seconds'] // 60} min</h2>"
        f"{_chart(view['series'], view['slot_seconds'])}"
        '<p class="legend"><i class="k-bar"></i>requests <i class="k-err"></i>errors (4xx, 5xx) '
        '<i class="k-p95"></i>p95 response time</p></section>'
        + _table(
            f"Endpoints, {span}",
            ["Method", "Route", "Requests", "Errors", "p50 ms", "p95 ms", "p99 ms", "Avg size"],
            endpoints,
            "No metered requests in this window.",
        )
        + _table(
            f"Consumers, {span}",
            ["Consumer", "Name", "Group", "Requests", "Errors", "Avg ms"],
            consumers,
            "No consumer identified in this window (set X-Apitally-Consumer in the app, "
            "or consumer_header).",
        )
        + _table(
            f"Validation errors, {span}",
            ["Method", "Route", "Location", "Message", "Type", "Count"],
            validation,
            "No validation errors in this window.",
        )
    )


_STYLE = """
:root{--fg:#1d2330;--muted:#5d6677;--line:#e3e6ec;--ok:#1b7f4b;--warn:#a35d00;--bad:#b3261e;
--bar:#4f6bed;--err:#d64545;--p95:#f0a000}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,sans-serif;color:var(--fg);margin:0;
background:#f6f7f9}header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;
gap:16px;align-items:baseline}header h1{font-size:18px;margin:0}header a{color:#c9d3ff}
main{padding:16px 24px;max-width:1200px}.meta{color:var(--muted);margin:0 0 12px}
.health{list-style:none;padding:0;margin:0 0 16px;display:grid;gap:4px}
.health li{background:#fff;border-left:4px solid var(--ok);padding:6px 10px}
.health li.warn{border-color:var(--warn)}.health li.error{border-color:var(--bad);
background:#fff4f3}.health b{display:inline-block;min-width:130px}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:16px}.card{background:#fff;
padding:8px 14px;border:1px solid var(--line);min-width:120px}.card span{display:block;
color:var(--muted);font-size:12px}.card b{font-size:18px}section{background:#fff;
border:1px solid var(--line);padding:10px 14px;margin-bottom:16px;overflow-x:auto}
h2{font-size:15px;margin:0 0 8px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-weight:600;color:var(--muted);font-size:12px}td.num{text-align:right;
font-variant-numeric:tabular-nums}td.route{font-family:ui-monospace,monospace;
white-space:normal;word-break:break-all}td.method{font-weight:600}td.warn{color:var(--warn)}
td.bad{color:var(--bad);font-weight:600}.empty{color:var(--muted)}
.chart{width:100%;height:auto;max-height:220px}.chart .bar{fill:var(--bar)}
.chart .err{fill:var(--err)}.chart .p95{fill:none;stroke:var(--p95);stroke-width:2}
.chart circle.p95{fill:var(--p95)}.chart text{font-size:11px;fill:var(--muted)}
.chart .axis{stroke:var(--line)}.legend{color:var(--muted);font-size:12px;margin:4px 0 0}
.legend i{display:inline-block;
width:10px;height:10px;margin:0 4px 0 12px}.k-bar{background:var(--bar)}
.k-err{background:var(--err)}.k-p95{background:var(--p95)}#state{color:#c9d3ff;font-size:12px}
"""

_SCRIPT = f"""
(() => {{
  const main = document.querySelector("main");
  const state = document.getElementById("state");
  async function refresh() {{
    if (document.hidden) return;
    try {{
      const r = await fetch("status?part=main", {{cache: "no-store"}});
      if (!r.ok) throw new Error("HTTP " + r.status);
      main.innerHTML = await r.text();
      state.textContent = "live";
    }} catch (e) {{
      state.textContent = "refresh failed: " + e.message;
    }}
  }}
  state.textContent = "live";
  setInterval(refresh, {REFRESH_SECONDS * 1000});
}})();
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
# Only this page's own script runs; nothing is loaded from anywhere.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def render_page(view: dict[str, Any]) -> str:
    """The whole page: the main part plus style, header and the refresh script."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>apitally-proxy</title>"
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS * 5}"></noscript>'
        f"<style>{_STYLE}</style></head><body>"
        '<header><h1>apitally-proxy</h1><span id="state">static</span>'
        '<a href="dashboard.json">JSON</a><a href="status.json">raw status</a>'
        '<a href="metrics">metrics</a></header>'
        f"<main>{render_main(view)}</main><script>{_SCRIPT}</script></body></html>"
    )
