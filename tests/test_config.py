"""Settings: precedence, validation and the one-line errors users see."""

import subprocess
import sys

import pytest

from apitally_proxy.config import ConfigError, load_settings, parse_upstream


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("APITALLY_"):
            monkeypatch.delenv(k)


def test_cli_beats_env_beats_config_file_beats_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        'upstream = "http://file:1"\nenv = "file"\nlisten = "127.0.0.1:7000"\nworkers = 3\n'
    )
    monkeypatch.setenv("APITALLY_PROXY_CONFIG", str(cfg))
    monkeypatch.setenv("APITALLY_ENV", "fromenv")
    monkeypatch.setenv("APITALLY_PROXY_LISTEN", "127.0.0.1:7001")
    s = load_settings({"listen": "127.0.0.1:7002"})
    assert s.upstream == "http://file:1"  # config file
    assert s.env == "fromenv"  # env beats file
    assert s.listen == "127.0.0.1:7002"  # CLI beats env
    assert s.workers == 3
    assert s.admin_listen == "127.0.0.1:9099"  # default


def test_defaults_match_the_design():
    s = load_settings({"upstream": "http://127.0.0.1:8000"})
    assert s.listen == "0.0.0.0:8080"
    assert s.env == "dev"
    assert s.hub_url == "https://hub.apitally.io"
    assert s.sync_interval is None
    assert s.workers == 1
    assert s.request_logging is False
    assert s.client_id is None and not s.hub_enabled


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:8000", ("http", "127.0.0.1", 8000, "")),
        ("http://app:8000/api/", ("http", "app", 8000, "/api")),
        ("http://[::1]:9000", ("http", "::1", 9000, "")),
        ("https://app", ("https", "app", 443, "")),
    ],
)
def test_upstream_urls(value, expected):
    u = parse_upstream(value)
    assert (u.scheme, u.host, u.port, u.base_path) == expected


def test_unix_socket_upstream():
    u = parse_upstream("unix:/run/app.sock")
    assert u.socket_path == "/run/app.sock"


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://x",
        "localhost",
        "http://",
        "http://0.0.0.0:80",
        "http://h:99999",
        "unix:",
        "http://user:pw@h:1",
    ],
)
def test_bad_upstream_names_the_setting(bad):
    with pytest.raises(ConfigError, match="APITALLY_PROXY_UPSTREAM"):
        load_settings({"upstream": bad})


def test_bad_listen_names_the_setting():
    with pytest.raises(ConfigError, match="--listen / APITALLY_PROXY_LISTEN"):
        load_settings({"upstream": "http://a:1", "listen": "nope"})


def test_unknown_config_file_key_is_an_error(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('upstream = "http://a:1"\nupstreem = "typo"\n')
    with pytest.raises(ConfigError, match="unknown setting 'upstreem'"):
        load_settings({"config": str(cfg)})


def test_missing_or_broken_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({"config": str(tmp_path / "nope.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("upstream = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"config": str(bad)})


@pytest.mark.parametrize(
    ("client_id", "env", "problem"),
    [
        ("not-a-uuid", "dev", "is not a UUID"),
        ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", "bad env!", "env 'bad env!' is invalid"),
        ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", "x" * 33, "is invalid"),
    ],
)
def test_bad_apitally_settings_do_not_fail_validation_but_disable_the_hub(client_id, env, problem):
    s = load_settings({"upstream": "http://a:1", "client_id": client_id, "env": env})
    assert s.hub_problem is not None and problem in s.hub_problem
    assert not s.hub_enabled


def test_request_logging_accepts_on_off(monkeypatch):
    monkeypatch.setenv("APITALLY_PROXY_REQUEST_LOGGING", "on")
    assert load_settings({"upstream": "http://a:1"}).request_logging is True
    assert (
        load_settings({"upstream": "http://a:1", "request_logging": "off"}).request_logging is False
    )


def test_trusted_proxies_from_env_are_comma_separated(monkeypatch):
    monkeypatch.setenv("APITALLY_PROXY_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    s = load_settings({"upstream": "http://a:1"})
    assert s.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]


def test_example_config_file_is_valid():
    from pathlib import Path

    example = Path(__file__).parent.parent / "config" / "apitally-proxy.example.toml"
    s = load_settings({"config": str(example)})
    assert s.upstream


def run_cli_expecting_exit_2(args: list[str], home) -> str:
    """Run the real CLI; assert exit 2 with a one-line reason on stderr and return it."""
    proc = subprocess.run(
        [sys.executable, "-m", "apitally_proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--upstream / APITALLY_PROXY_UPSTREAM"),
        (["--upstream", "ftp://x"], "is not an upstream URL"),
        (["--upstream", "http://127.0.0.1:1", "--listen", "1.2.3.4.5:x"], "is not host:port"),
        (["--upstream", "http://127.0.0.1:1", "--workers", "0"], "--workers"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(args, needle, tmp_path):
    assert needle in run_cli_expecting_exit_2([*args, "--state-dir", str(tmp_path)], tmp_path)


def test_listen_address_in_use_exits_non_zero_at_once(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = run_cli_expecting_exit_2(
            [
                "--upstream",
                "http://127.0.0.1:1",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                "off",
                "--state-dir",
                str(tmp_path),
            ],
            tmp_path,
        )
    assert "cannot listen on 127.0.0.1:" in line


def test_bad_hub_url_disables_the_hub_but_never_fails_validation():
    s = load_settings(
        {
            "upstream": "http://a:1",
            "client_id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "hub_url": "hub.apitally.io",
        }
    )
    assert not s.hub_enabled
    assert "APITALLY_HUB_BASE_URL" in s.hub_problem


def test_unusable_state_dir_exits_2_naming_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = run_cli_expecting_exit_2(
        [
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--state-dir",
            str(blocker / "state"),
        ],
        tmp_path,
    )
    assert "--state-dir / APITALLY_PROXY_STATE_DIR" in line


def test_a_config_file_typo_names_the_file_and_the_closest_key(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('upstream = "http://a:1"\nframwork = "flask"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings({"config": str(cfg)})
    assert str(exc.value) == (
        f"unknown setting 'framwork' in the config file {cfg}; did you mean 'framework'?"
    )


def test_a_bad_value_in_the_config_file_names_the_file(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('upstream = "http://a:1"\nworkers = 0\n')
    with pytest.raises(ConfigError, match=f"`workers` in the config file {cfg}"):
        load_settings({"config": str(cfg)})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "APITALLY_PROXY_CLIENT_ID",
            "environment variable APITALLY_PROXY_CLIENT_ID is not a setting of apitally-proxy; "
            "did you mean APITALLY_CLIENT_ID?",
        ),
        (
            "APITALLY_PROXY_FRAMWORK",
            "environment variable APITALLY_PROXY_FRAMWORK is not a setting of apitally-proxy; "
            "did you mean APITALLY_PROXY_FRAMEWORK?",
        ),
        (
            "APITALLY_PROXY_WRITE_TOKEN",
            "environment variable APITALLY_PROXY_WRITE_TOKEN is not a setting of "
            "apitally-proxy; did you mean APITALLY_WRITE_TOKEN?",
        ),
        (
            "APITALLY_SOMETHING",
            "environment variable APITALLY_SOMETHING is not a setting of apitally-proxy",
        ),
    ],
)
def test_unknown_environment_variables_get_a_warning_with_the_right_name(name, message):
    from apitally_proxy.config import environment_warnings

    assert environment_warnings({name: "x", "APITALLY_PROXY_UPSTREAM": "http://a:1"}) == [message]


def test_a_busy_admin_port_exits_2_unless_the_admin_server_is_off(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        args = ["--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"]
        line = run_cli_expecting_exit_2(
            [*args, "--admin-listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path)], tmp_path
        )
    assert line.startswith(
        f"apitally-proxy: error: cannot listen on admin address 127.0.0.1:{port}"
    )
    assert "--admin-listen / APITALLY_PROXY_ADMIN_LISTEN" in line and "`off`" in line


def test_a_bad_declared_route_names_the_setting_and_the_file(tmp_path):
    from apitally_proxy.checks import load_checked_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text('upstream = "http://127.0.0.1:1"\nroutes = ["GET /ok", "FETCH /items"]\n')
    with pytest.raises(ConfigError) as err:
        load_checked_settings({"config": str(cfg)})
    assert str(err.value) == (
        f"`routes` in the config file {cfg}: route 'FETCH /items': 'FETCH' is not an HTTP method"
    )


def test_config_is_a_leaf():
    """config parses settings; the grammars of routes and consumer maps live elsewhere
    (apitally_proxy/checks.py runs them), so config imports neither."""
    import ast
    from pathlib import Path

    import apitally_proxy.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    ours = {m for m in imported if m.startswith("apitally_proxy")}
    assert ours <= {"apitally_proxy"}, ours  # `from apitally_proxy import frameworks` only


@pytest.mark.parametrize("value", ["lean", "aiohttp"])
def test_server_setting_takes_lean_or_aiohttp(monkeypatch, value):
    monkeypatch.setenv("APITALLY_PROXY_SERVER", value)
    assert load_settings({"upstream": "http://a:1"}).server == value


def test_server_setting_defaults_to_lean_and_refuses_anything_else(monkeypatch):
    assert load_settings({"upstream": "http://a:1"}).server == "lean"
    monkeypatch.setenv("APITALLY_PROXY_SERVER", "nginx")
    with pytest.raises(ConfigError, match="server"):
        load_settings({"upstream": "http://a:1"})
