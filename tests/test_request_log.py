"""Request-log lines, files and failure modes, without a proxy."""

from __future__ import annotations

import base64
import errno
import gzip
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from apitally_proxy.config import ConfigError, RequestLogSettings, load_settings
from apitally_proxy.hub import request_log as rl
from apitally_proxy.hub.request_log import BODY_TOO_LARGE, Item, Masker, RequestLog
from apitally_proxy.hub.transport import Outcome
from apitally_proxy.proxy import BodyCapture


def item(body: bytes | None = None, ctype: str = "application/json", url: str = "http://h/x"):
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": ctype}))
    return Item(1.5, "POST", "/x", url, headers, 3, None, body, 200, 0.01, headers, 3, None, None)


def request_of(line: bytes) -> dict:
    return orjson.loads(line)["request"]


def test_deeply_nested_json_is_masked_without_recursion():
    shallow = b'{"a":[' * 100 + b'{"password":"p"}' + b"]}" * 100
    out = request_of(Masker(RequestLogSettings()).line(item(shallow)))
    assert b'"password":"******"' in base64.b64decode(out["body"])


def test_json_too_deep_to_mask_is_not_logged_when_it_may_hold_secrets():
    deep = b'{"a":[' * 400 + b'{"password":"p"}' + b"]}" * 400
    out = request_of(Masker(RequestLogSettings()).line(item(deep)))
    assert base64.b64decode(out["body"]) == b"<masked>"


def test_non_utf8_json_is_masked_unless_harmless():
    risky = b'{"password": "\xff\xfe"}'
    harmless = b'{"name": "\xff\xfe"}'
    masker = Masker(RequestLogSettings())
    assert base64.b64decode(request_of(masker.line(item(risky)))["body"]) == b"<masked>"
    assert base64.b64decode(request_of(masker.line(item(harmless)))["body"]) == harmless


def test_body_too_large_marker_is_logged():
    out = request_of(Masker(RequestLogSettings()).line(item(BODY_TOO_LARGE)))
    assert base64.b64decode(out["body"]) == b"<body too large>"


def test_capture_stops_copying_past_the_limit():
    cap = BodyCapture(10)
    cap.feed(b"12345")
    cap.feed(b"678901")
    assert cap.overflow and cap.data == b""
    assert BodyCapture(10, known_size=11).overflow


def test_query_params_can_be_left_out():
    cfg = RequestLogSettings(log_query_params=False)
    assert request_of(Masker(cfg).line(item(url="http://h/x?a=1")))["url"] == "http://h/x"


def test_user_patterns_add_to_the_builtin_masks():
    cfg = RequestLogSettings(mask_query_params=["^sig$"])
    url = request_of(Masker(cfg).line(item(url="http://h/x?sig=1&password=2&ok=3")))["url"]
    assert url == "http://h/x?sig=%2A%2A%2A%2A%2A%2A&password=%2A%2A%2A%2A%2A%2A&ok=3"


def test_invalid_pattern_is_a_config_error_naming_it(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('upstream = "http://127.0.0.1:1"\n[request_log]\nexclude_paths = ["[a-"]\n')
    with pytest.raises(ConfigError, match=r"exclude_paths pattern '\[a-'"):
        load_settings({"config": str(cfg)})


def exchange(path: str = "/x") -> SimpleNamespace:
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "text/plain"}))
    return SimpleNamespace(
        started_at=1.0,
        method="GET",
        request_url="http://h" + path,
        request_headers=headers,
        request_size=None,
        request_body=None,
        status=200,
        response_time=0.001,
        response_headers=headers,
        response_size=2,
        response_body=None,
        client_address="127.0.0.1",
    )


async def test_disk_full_pauses_logging_and_drops_the_batch(tmp_path: Path, monkeypatch):
    log = RequestLog(RequestLogSettings(), tmp_path / "logs")
    await log.start()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rl, "_LogFile", full)
    log.add(exchange(), "/x", "c")
    await log.flush()
    assert log.paused_until is not None and not log.accepting
    assert "No space left" in (log.last_error or "")
    log.add(exchange(), "/x", "c")  # refused while paused
    assert log.status().buffered == 0
    monkeypatch.undo()
    log.paused_until = 0.0  # the pause is over
    log.add(exchange(), "/x", "c")
    await log.deliver()
    await log.close()
    (f,) = (tmp_path / "logs").glob("*.ndjson.gz")
    assert len(gzip.decompress(f.read_bytes()).splitlines()) == 1


async def test_waiting_files_are_capped(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(rl, "MAX_FILES", 3)
    log = RequestLog(RequestLogSettings(), tmp_path)
    await log.start()
    for _ in range(5):
        log.add(exchange(), "/x", "c")
        await log.deliver()  # local mode: rotates, keeps the files
    await log.close()
    assert len(list(tmp_path.glob("*.ndjson.gz"))) == 3
    assert log.files_dropped == 2


async def test_402_drops_files_and_suspends(tmp_path: Path):
    sent: list[str] = []

    async def send(file_uuid: str, body: bytes):
        sent.append(file_uuid)
        return Outcome.SUSPEND, 60.0

    log = RequestLog(RequestLogSettings(), tmp_path, send=send)
    await log.start()
    log.add(exchange(), "/x", "c")
    await log.deliver()
    assert len(sent) == 1
    assert not log.accepting and not log.wants("GET", "/x", None)
    assert list(tmp_path.glob("*.ndjson.gz*")) == []
    await log.close()


def test_health_paths_and_probes_are_not_logged(tmp_path: Path):
    log = RequestLog(RequestLogSettings(exclude_paths=["^/private"]), tmp_path)
    for path in (
        "/health",
        "/healthz",
        "/api/ping",
        "/favicon.ico",
        "/.well-known/x",
        "/private/a",
    ):
        assert not log.wants("GET", path, None), path
    assert not log.wants("GET", "/x", "kube-probe/1.29")
    assert not log.wants("OPTIONS", "/x", None)
    assert log.wants("GET", "/healthy-food?x=/health", "curl")
