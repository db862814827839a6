"""consumer_header through a real proxy process: hashed consumers at the hub, secrets nowhere."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

SECRET = "sk_live_9f8e7d6c5b4a-TOPSECRET"
OTHER = "sk_live_other-TOPSECRET-2"
LOG_CONFIG = """
[request_log]
log_request_headers = true
"""


def consumer_id(state_dir: Path, credential: str) -> str:
    salt = (state_dir / "consumer-salt").read_bytes().strip()
    return hmac.new(salt, credential.encode(), hashlib.sha256).hexdigest()[:16]


def everything_on_disk(state_dir: Path) -> bytes:
    """Every file under the state dir (the proxy log included), gzip files decompressed."""
    out = []
    for path in sorted(state_dir.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return b"\n".join(out)


def everything_sent(hub) -> bytes:
    return b"\n".join(
        orjson.dumps([c.body, c.headers, c.query], option=orjson.OPT_NON_STR_KEYS)
        for c in hub.calls
    )


async def get(http, url: str, headers: dict[str, str] | None = None) -> int:
    async with http.get(url, headers=headers or {}) as r:
        await r.read()
        return r.status


async def test_the_header_consumer_is_counted_hashed_and_the_key_reaches_no_hub_log_or_disk(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    config = tmp_path / "proxy.toml"
    config.write_text(LOG_CONFIG)
    proxy = await start_proxy(
        upstream.url,
        *hub_args,
        "--consumer-header",
        "X-Customer-Key",  # matched by no built-in mask pattern
        "--request-logging",
        "--config",
        str(config),
        "--log-level",
        "DEBUG",
    )
    for _ in range(3):
        assert await get(http, proxy.url + "/items/1?q=1", {"X-Customer-Key": SECRET}) == 200
    assert await get(http, proxy.url + "/items/2", {"X-Customer-Key": OTHER}) == 200
    assert await get(http, proxy.url + "/items/3") == 200
    assert await proxy.stop() == 0

    state = proxy.state_dir
    secret_id, other_id = consumer_id(state, SECRET), consumer_id(state, OTHER)
    assert hub.request_counts() == {
        (secret_id, "GET", "/items/{id}", 200): 3,
        (other_id, "GET", "/items/{id}", 200): 1,
        (None, "GET", "/items/{id}", 200): 1,
    }
    lines = [line for body in hub.accepted("log") for line in body]
    assert (
        sorted(x["request"].get("consumer") for x in lines if "q=1" in x["request"]["url"])
        == [secret_id] * 3
    )
    keys = [v for x in lines for k, v in x["request"]["headers"] if k == "X-Customer-Key"]
    assert keys == ["******"] * 4  # masked though no built-in pattern matches its name
    for where in (everything_sent(hub), proxy.log().encode(), everything_on_disk(state)):
        assert b"TOPSECRET" not in where
    assert secret_id.encode() in everything_sent(hub)


async def test_a_bearer_token_keeps_its_identifier_across_restarts(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    state = tmp_path / "state"
    auth = {"Authorization": f"Bearer {SECRET}"}
    for _ in range(2):
        proxy = await start_proxy(
            upstream.url, *hub_args, "--consumer-header", "Authorization", state_dir=state
        )
        assert await get(http, proxy.url + "/items/1", auth) == 200
        assert await proxy.stop() == 0
    expected = consumer_id(state, SECRET)  # the token after "Bearer ", salted
    assert hub.request_counts() == {(expected, "GET", "/items/{id}", 200): 2}
    instances = {p["instance_uuid"] for p in hub.accepted("sync")}
    assert len(instances) == 1  # the same instance, restarted
    assert b"TOPSECRET" not in everything_on_disk(state) + everything_sent(hub)


async def test_a_configured_salt_gives_the_same_identifier_on_every_replica(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    salt = "shared-salt-for-all-replicas-0001"
    for n in range(2):
        proxy = await start_proxy(
            upstream.url,
            *hub_args,
            "--consumer-header",
            "X-API-Key",
            state_dir=tmp_path / f"replica{n}",
            env={"APITALLY_PROXY_CONSUMER_SALT": salt},
        )
        assert await get(http, proxy.url + "/items/1", {"X-API-Key": SECRET}) == 200
        assert await proxy.stop() == 0
        assert not (proxy.state_dir / "consumer-salt").exists()
        assert salt not in proxy.log()
    expected = hmac.new(salt.encode(), SECRET.encode(), hashlib.sha256).hexdigest()[:16]
    assert hub.request_counts() == {(expected, "GET", "/items/{id}", 200): 2}


async def test_the_apps_consumer_header_wins_and_refused_keys_name_no_consumer(
    hub, upstream, http, start_proxy, hub_args
):
    proxy = await start_proxy(upstream.url, *hub_args, "--consumer-header", "X-API-Key")
    key = {"X-API-Key": SECRET}
    assert await get(http, proxy.url + "/items/1?consumer=alice", key) == 200
    assert await get(http, proxy.url + "/status/401", key) == 401
    assert await get(http, proxy.url + "/status/403", key) == 403
    assert await proxy.stop() == 0
    assert hub.request_counts() == {
        ("alice", "GET", "/items/{id}", 200): 1,
        (None, "GET", "/status/{id}", 401): 1,
        (None, "GET", "/status/{id}", 403): 1,
    }


async def test_the_consumer_map_adds_names_and_groups(
    hub, upstream, http, start_proxy, hub_args, tmp_path
):
    state = tmp_path / "state"
    # Ids in the map are what the dashboard shows; this one comes from a first run.
    proxy = await start_proxy(
        upstream.url, *hub_args, "--consumer-header", "X-API-Key", state_dir=state
    )
    assert await proxy.stop() == 0
    other_id = consumer_id(state, OTHER)
    consumers = tmp_path / "consumers.toml"
    consumers.write_text(
        f"""
[[consumer]]
key = "{SECRET}"
name = "Acme Inc"
group = "Gold"

[[consumer]]
id = "{other_id}"
name = "Müller GmbH"
"""
    )
    hub.calls.clear()
    proxy = await start_proxy(
        upstream.url,
        *hub_args,
        "--consumer-header",
        "X-API-Key",
        state_dir=state,
        env={"APITALLY_PROXY_CONSUMER_MAP": str(consumers)},
    )
    for key in (SECRET, SECRET, OTHER):
        assert await get(http, proxy.url + "/items/1", {"X-API-Key": key}) == 200
    assert await proxy.stop() == 0
    reported = [c for p in hub.accepted("sync") for c in p["consumers"]]
    assert sorted(reported, key=lambda c: c["name"]) == [
        {"identifier": consumer_id(state, SECRET), "name": "Acme Inc", "group": "Gold"},
        {"identifier": other_id, "name": "Müller GmbH", "group": None},
    ]
    assert b"TOPSECRET" not in everything_sent(hub) + everything_on_disk(state)


@pytest.mark.parametrize(
    ("args", "env", "map_text", "needle"),
    [
        (["--consumer-header", "X API Key"], {}, None, "--consumer-header"),
        (["--consumer-header", "X-Apitally-Consumer"], {}, None, "is reserved"),
        (
            ["--consumer-header", "X-API-Key"],
            {"APITALLY_PROXY_CONSUMER_SALT": "TOPSECRET"},
            None,
            "APITALLY_PROXY_CONSUMER_SALT",
        ),
        (
            [],
            {"APITALLY_PROXY_CONSUMER_MAP": "{map}"},
            '[[consumer]]\nkey="k"\nname="n"\n',
            "needs",
        ),
        (
            ["--consumer-header", "X-API-Key"],
            {"APITALLY_PROXY_CONSUMER_MAP": "/nope.toml"},
            None,
            "does not exist",
        ),
        (
            ["--consumer-header", "X-API-Key"],
            {"APITALLY_PROXY_CONSUMER_MAP": "{map}"},
            '[[consumer]]\nkey = TOPSECRET\nname = "n"\n',
            "not valid TOML",
        ),
        (
            ["--consumer-header", "X-API-Key"],
            {"APITALLY_PROXY_CONSUMER_MAP": "{map}"},
            '[[consumer]]\nkey = "TOPSECRET"\n',
            "entry 1 needs a name or a group",
        ),
    ],
)
def test_bad_consumer_settings_exit_2_with_one_line_naming_them(
    args, env, map_text, needle, tmp_path
):
    map_path = tmp_path / "consumers.toml"
    if map_text is not None:
        map_path.write_text(map_text)
    env = {k: v.replace("{map}", str(map_path)) for k, v in env.items()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apitally_proxy",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "consumer" in lines[0]
    assert "TOPSECRET" not in proc.stderr


async def test_refused_and_unconfirmed_keys_never_take_the_real_customers_consumer_slot(
    hub, upstream, http, start_proxy, hub_args_long, tmp_path
):
    """A scanner's random keys on a path the app refuses (403), or answers 404 for, must not
    fill `max_consumers`: only keys the app once accepted (a status below 400) count."""
    config = tmp_path / "proxy.toml"
    config.write_text("max_consumers = 20\n")
    proxy = await start_proxy(
        upstream.url, *hub_args_long, "--consumer-header", "X-API-Key", "--config", str(config)
    )
    assert await get(http, proxy.url + "/status/200", {"X-API-Key": SECRET}) == 200
    for i in range(300):
        assert await get(http, proxy.url + "/status/403", {"X-API-Key": f"random-{i}"}) == 403
        assert await get(http, proxy.url + "/status/404", {"X-API-Key": f"guess-{i}"}) == 404
    # The real customer's key, accepted before: its 404s are still its own.
    assert await get(http, proxy.url + "/status/404", {"X-API-Key": SECRET}) == 404
    assert await get(http, proxy.url + "/status/201", {"X-API-Key": SECRET}) == 201
    status = await proxy.wait_status(lambda st: st["requests_total"] == 603)
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        metrics = await r.text()
    assert await proxy.stop() == 0
    me = consumer_id(proxy.state_dir, SECRET)
    assert hub.request_counts() == {
        (me, "GET", "/status/{id}", 200): 1,
        (me, "GET", "/status/{id}", 404): 1,
        (me, "GET", "/status/{id}", 201): 1,
        (None, "GET", "/status/{id}", 403): 300,
        (None, "GET", "/status/{id}", 404): 300,
    }
    assert status["consumer_overflow"] == 0
    assert status["consumer_unconfirmed"] == 600
    assert "apitally_proxy_consumer_unconfirmed_total 600.0" in metrics
