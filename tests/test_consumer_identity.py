"""consumer_header: credential → salted hash identifier, salt file, consumer map, the meter."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from multidict import CIMultiDict

from apitally_proxy.checks import load_checked_settings
from apitally_proxy.config import ConfigError, load_settings
from apitally_proxy.metering import Meter
from apitally_proxy.metering.identity import (
    ConsumerIdentity,
    ConsumerMapError,
    build_names,
    credential_of,
    hash_credential,
    load_salt,
    read_consumer_map,
)
from apitally_proxy.proxy import Exchange

SALT = b"0123456789abcdef-test-salt"


def expected_id(credential: str, salt: bytes = SALT) -> str:
    return hmac.new(salt, credential.encode(), hashlib.sha256).hexdigest()[:16]


class Resolver:
    framework = None

    def resolve(
        self, method: str, path: str, learn: bool = True, loose: bool = False
    ) -> str | None:
        return path

    def take_renames(self) -> dict[str, str]:
        return {}


def exchange(headers: dict[str, str], status: int = 200, app_consumer: str | None = None):
    ex = Exchange("GET", "/items")
    ex.status = status
    ex.request_headers = CIMultiDict(headers)
    if app_consumer is not None:
        ex.apitally_headers = {"x-apitally-consumer": app_consumer}
    return ex


def test_identifier_is_the_first_16_hex_of_an_hmac_sha256_with_the_salt():
    assert hash_credential(SALT, "sk_live_1") == expected_id("sk_live_1")
    assert len(hash_credential(SALT, "sk_live_1")) == 16
    assert hash_credential(b"another-salt-0123456", "sk_live_1") != expected_id("sk_live_1")


@pytest.mark.parametrize(
    ("header", "value", "credential"),
    [
        ("authorization", "Bearer tok-123", "tok-123"),
        ("authorization", "bearer   tok-123  ", "tok-123"),
        ("authorization", "Basic dXNlcjpwdw==", "dXNlcjpwdw=="),
        ("authorization", "tok-123", "tok-123"),
        ("proxy-authorization", "ApiKey k", "k"),
        ("x-api-key", "  key with spaces ", "key with spaces"),
        ("x-api-key", "   ", None),
        ("authorization", "Bearer ", None),
        ("authorization", "Bearer", None),
    ],
)
def test_the_credential_is_what_follows_the_authorization_scheme(header, value, credential):
    assert credential_of(header, value) == credential


def test_a_bearer_token_and_the_same_raw_key_give_the_same_identifier():
    auth = ConsumerIdentity("Authorization", SALT)
    key = ConsumerIdentity("X-API-Key", SALT)
    a = auth.identify(CIMultiDict({"authorization": "Bearer sk_1"}))
    b = key.identify(CIMultiDict({"X-Api-Key": "sk_1"}))
    assert a is not None and b is not None
    assert a.identifier == b.identifier == expected_id("sk_1")


def test_no_header_or_an_empty_one_names_no_consumer():
    identity = ConsumerIdentity("X-API-Key", SALT)
    assert identity.identify(CIMultiDict({"Other": "x"})) is None
    assert identity.identify(CIMultiDict({"X-API-Key": ""})) is None


def test_the_cache_is_bounded_and_long_values_are_never_cached():
    identity = ConsumerIdentity("X-API-Key", SALT, cache_size=8)
    for n in range(100):
        consumer = identity.identify({"X-API-Key": f"key-{n}"})
        assert consumer is not None and consumer.identifier == expected_id(f"key-{n}")
    assert len(identity._cache) == 8
    huge = "k" * 5000
    assert identity.identify({"X-API-Key": huge}).identifier == expected_id(huge)
    assert huge not in identity._cache


def test_the_salt_file_is_created_once_with_mode_0600_and_reused(tmp_path: Path):
    salt = load_salt(None, tmp_path / "state")
    path = tmp_path / "state" / "consumer-salt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(salt) == 64 and path.read_bytes() == salt
    assert load_salt(None, tmp_path / "state") == salt
    assert [p.name for p in path.parent.iterdir()] == ["consumer-salt"]  # no temp files left


def test_a_configured_salt_wins_and_no_file_is_written(tmp_path: Path):
    assert load_salt("configured-salt-123456", tmp_path) == b"configured-salt-123456"
    assert not (tmp_path / "consumer-salt").exists()


def _salt_in(state_dir: str) -> bytes:
    return load_salt(None, Path(state_dir))


def test_workers_starting_together_share_one_salt(tmp_path: Path):
    with ProcessPoolExecutor(6) as pool:
        salts = set(pool.map(_salt_in, [str(tmp_path)] * 24))
    assert len(salts) == 1


def test_the_map_names_consumers_by_hashed_id_or_by_raw_key(tmp_path: Path):
    path = tmp_path / "consumers.toml"
    path.write_text(
        f"""
[[consumer]]
key = "sk_live_acme"
name = "Acme Inc"
group = "Gold"

[[consumer]]
id = "{expected_id("sk_live_muller")}"
name = "Müller GmbH"
"""
    )
    identity = ConsumerIdentity("X-API-Key", SALT, build_names(read_consumer_map(path), SALT))
    acme = identity.identify({"X-API-Key": "sk_live_acme"})
    muller = identity.identify({"X-API-Key": "sk_live_muller"})
    other = identity.identify({"X-API-Key": "sk_other"})
    assert (acme.name, acme.group) == ("Acme Inc", "Gold")
    assert (muller.name, muller.group) == ("Müller GmbH", None)
    assert (other.name, other.group) == (None, None)
    assert "sk_live_acme" not in repr(identity._names)  # keys are hashed at load


def test_the_map_may_be_json(tmp_path: Path):
    path = tmp_path / "consumers.json"
    path.write_text(json.dumps({"consumer": [{"key": "k1", "group": "Free"}]}))
    assert build_names(read_consumer_map(path), SALT) == {expected_id("k1"): (None, "Free")}
    path.write_text(json.dumps([{"key": "k1", "name": "N"}]))  # a bare list works too
    assert build_names(read_consumer_map(path), SALT) == {expected_id("k1"): ("N", None)}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[consumer]]\nkey = sk_live_secret\n", "not valid TOML"),
        ('consumer = "x"\n', "needs a list of entries"),
        ('[[consumer]]\nname = "A"\n', "exactly one of `id` (hashed) or `key` (raw)"),
        ('[[consumer]]\nid = "abc"\nkey = "k"\nname = "A"\n', "exactly one"),
        ('[[consumer]]\nid = "ABC"\nname = "A"\n', "is not 16 lowercase hex"),
        ('[[consumer]]\nkey = "k"\n', "needs a name or a group"),
        ('[[consumer]]\nkey = "k"\nname = "A"\ncolor = "red"\n', "unknown fields ['color']"),
        ('[[consumer]]\nkey = "k"\nname = 3\n', "every value must be a string"),
        (f'[[consumer]]\nkey = "k"\nname = "{"n" * 65}"\n', "longer than 64"),
    ],
)
def test_a_bad_map_file_is_refused_without_echoing_keys(tmp_path: Path, text, needle):
    path = tmp_path / "map.toml"
    path.write_text(text)
    with pytest.raises(ConsumerMapError) as err:
        read_consumer_map(path)
    assert needle in str(err.value)
    assert "sk_live_secret" not in str(err.value)
    assert "entry" in str(err.value) or "file" in str(err.value)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"consumer_header": "X API Key"}, "--consumer-header"),
        ({"consumer_header": "X-Apitally-Consumer"}, "reserved"),
        ({"consumer_header": "X-API-Key", "consumer_salt": "tooshort"}, "consumer_salt"),
        ({"consumer_map": "/nonexistent.toml"}, "needs consumer_header"),
        ({"consumer_header": "X-API-Key", "consumer_map": "/nonexistent.toml"}, "does not exist"),
    ],
)
def test_bad_consumer_settings_name_the_setting(values, needle):
    with pytest.raises(ConfigError) as err:
        load_checked_settings({"upstream": "http://127.0.0.1:1", **values})
    assert needle in str(err.value)
    assert "tooshort" not in str(err.value)  # the salt is a secret: never echoed


def test_the_consumer_settings_are_off_by_default(monkeypatch):
    for name in list(os.environ):
        if name.startswith("APITALLY_"):
            monkeypatch.delenv(name)
    s = load_settings({"upstream": "http://127.0.0.1:1"})
    assert (s.consumer_header, s.consumer_salt, s.consumer_map) == (None, None, None)


def test_the_meter_counts_the_hashed_consumer_and_the_app_header_wins():
    identity = ConsumerIdentity("X-API-Key", SALT, {expected_id("k1"): ("One", "G")})
    meter = Meter(Resolver(), identity=identity)
    meter.record(exchange({"X-API-Key": "k1"}))
    meter.record(exchange({"X-API-Key": "k1"}, app_consumer="from-app"))
    meter.record(exchange({"X-API-Key": "bogus"}, status=401))  # refused key: no consumer
    meter.record(exchange({}))
    rows = {
        (r["consumer"], r["status_code"]): r["request_count"]
        for r in meter.get_and_reset()["requests"]
    }
    assert rows == {
        (expected_id("k1"), 200): 1,
        ("from-app", 200): 1,
        (None, 401): 1,
        (None, 200): 1,
    }


def test_the_meter_reports_mapped_names_once():
    identity = ConsumerIdentity("X-API-Key", SALT, {expected_id("k1"): ("One", "G")})
    meter = Meter(Resolver(), identity=identity)
    for _ in range(3):
        meter.record(exchange({"X-API-Key": "k1"}))
    assert meter.get_and_reset()["consumers"] == [
        {"identifier": expected_id("k1"), "name": "One", "group": "G"}
    ]
    meter.record(exchange({"X-API-Key": "k1"}))
    assert meter.get_and_reset()["consumers"] == []


def test_without_consumer_header_request_headers_are_ignored():
    meter = Meter(Resolver())
    meter.record(exchange({"X-API-Key": "k1"}))
    assert [r["consumer"] for r in meter.get_and_reset()["requests"]] == [None]
