"""The settings model: every knob of the proxy, validated in one place.

Precedence is CLI > environment > TOML config file > defaults. Each field names
its environment variable and CLI flag, so error messages can tell the user
exactly which setting to fix.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from apitally_proxy import frameworks

DEFAULT_HUB_URL = "https://hub.apitally.io"
DEFAULT_OTLP_ENDPOINT = "https://otlp.apitally.io"
WRITE_TOKEN_PATTERN = re.compile(r"^apt_[a-zA-Z0-9]{24}$")
OTLP_INTERVAL = 15.0  # seconds between exports, as apitally 1.0.0 (until the server says)
ENV_PATTERN = re.compile(r"^[\w-]{1,32}$")
MIN_SALT_LENGTH = 16  # characters of a consumer_salt
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}$")


def check_header_name(name: str) -> str:
    """The header name, stripped; ValueError saying why it cannot be used."""
    name = name.strip()
    if not HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not an HTTP header name (e.g. X-API-Key or Authorization)")
    if name.lower().startswith("x-apitally-"):
        raise ValueError(
            f"{name!r} is reserved: the proxy strips X-Apitally-* request headers; "
            "name the header that carries the client's key (e.g. X-API-Key)"
        )
    return name


HUB_URL_PATTERN = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")
# The names --framework takes besides auto and none, and their client tags (frameworks.py).
FRAMEWORKS = frameworks.NAMES
CLIENT_TAGS = {name: f.client_tag for name, f in frameworks.FRAMEWORKS.items()}


class ConfigError(Exception):
    """A setting the proxy cannot run with; the message names the setting and the fix."""


def _setting(default: Any = ..., *, env: str | None = None, flag: str | None = None, **kw: Any):
    extra: dict[str, Any] = {"env": env, "flag": flag}
    return Field(default, json_schema_extra=extra, **kw)


def setting_names(field: FieldInfo) -> tuple[str | None, str | None]:
    """A setting's (environment variable, CLI flag), each None when it has none."""
    extra = field.json_schema_extra
    if not isinstance(extra, dict):
        return None, None
    env, flag = extra.get("env"), extra.get("flag")
    return (env if isinstance(env, str) else None, flag if isinstance(flag, str) else None)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests go: a TCP base URL or a unix socket path."""

    scheme: str  # "http", "https" or "unix"
    host: str
    port: int
    base_path: str  # prefix added in front of every request path, "" for none
    socket_path: str | None = None

    @property
    def origin(self) -> str:
        if self.socket_path is not None:
            # aiohttp needs a URL with a host even when the socket decides where it goes.
            return "http://localhost"
        return f"{self.scheme}://{HostPort(self.host, self.port)}"

    def __str__(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else self.origin + self.base_path


def parse_host_port(value: str) -> HostPort:
    """Parse `host:port`, `[v6]:port` or `:port` (all interfaces)."""
    value = value.strip()
    m = re.fullmatch(r"\[(?P<h6>[0-9a-fA-F:.]+)\]:(?P<p6>\d+)|(?P<h>[^:\[\]]*):(?P<p>\d+)", value)
    if not m:
        raise ValueError(f"{value!r} is not host:port (e.g. 0.0.0.0:8080 or [::1]:8080)")
    host = m.group("h6") or m.group("h") or "0.0.0.0"
    port = int(m.group("p6") or m.group("p"))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return HostPort(host, port)


def parse_upstream(value: str) -> Upstream:
    """Parse `http://host:port[/prefix]`, `https://…` or `unix:/path.sock`."""
    value = value.strip()
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/app.sock")
        return Upstream("unix", "localhost", 0, "", socket_path=path)
    m = re.fullmatch(r"(?P<scheme>https?)://(?P<hostport>[^/?#]+)(?P<path>/[^?#]*)?", value)
    if not m:
        raise ValueError(
            f"{value!r} is not an upstream URL; use http://host:port or unix:/path/to/app.sock"
        )
    scheme = m.group("scheme")
    hostport = m.group("hostport")
    if "@" in hostport:
        raise ValueError("credentials in the upstream URL are not supported")
    default_port = 443 if scheme == "https" else 80
    if re.fullmatch(r"\[[0-9a-fA-F:.]+\]|[^:\[\]]+", hostport):
        hp = parse_host_port(f"{hostport}:{default_port}")
    else:
        hp = parse_host_port(hostport)
    if hp.port == 0:
        raise ValueError("upstream port must not be 0")
    if hp.host in ("", "0.0.0.0", "::"):
        raise ValueError(f"{hp.host or 'an empty host'} is not an address to connect to")
    return Upstream(scheme, hp.host, hp.port, (m.group("path") or "").rstrip("/"))


class _EnvVarSource(PydanticBaseSettingsSource):
    """Reads each field from the environment variable it names (no shared prefix)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: dict[str, str]):
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        env, _ = setting_names(field)
        return (self._environ.get(env) if env else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None and value != "":
                values[name] = value
        return values


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML config file named by --config or APITALLY_PROXY_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        try:
            with open(self._path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(
                f"config file {self._path} does not exist "
                "(set --config / APITALLY_PROXY_CONFIG to an existing TOML file)"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {self._path} is not valid TOML: {exc}") from None
        # Allow the settings at the top level or under a [proxy] table.
        if isinstance(data.get("proxy"), dict):
            data = {**{k: v for k, v in data.items() if k != "proxy"}, **data["proxy"]}
        return {k.replace("-", "_"): v for k, v in data.items()}


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "apitally-proxy"


class RequestLogSettings(BaseModel):
    """The `[request_log]` table: what a logged request shows (when request_logging is on).

    Patterns are case-insensitive regular expressions searched anywhere in the
    name (or path, or user agent); they add to the built-in lists.
    """

    model_config = ConfigDict(extra="forbid")

    log_query_params: bool = True
    log_request_headers: bool = False
    log_request_body: bool = False
    log_response_headers: bool = True
    log_response_body: bool = False
    mask_query_params: list[str] = []
    mask_headers: list[str] = []
    mask_body_fields: list[str] = []
    exclude_paths: list[str] = []
    exclude_user_agents: list[str] = []
    max_buffered_requests: int = Field(1000, ge=1)
    # Share of requests logged (OTLP: spans exported); metrics always count every request.
    sample_rate: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator(
        "mask_query_params",
        "mask_headers",
        "mask_body_fields",
        "exclude_paths",
        "exclude_user_agents",
    )
    @classmethod
    def _check_patterns(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"[request_log] {info.field_name} pattern {pattern!r} is not a valid "
                    f"regular expression ({exc}); fix or remove it"
                ) from None
        return v


class Settings(BaseSettings):
    """Everything the proxy can be told. Field docs double as --help text."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    upstream: str = _setting(
        env="APITALLY_PROXY_UPSTREAM",
        flag="--upstream",
        description="upstream base URL: http://host:port or unix:/path.sock",
    )
    listen: str = _setting(
        "0.0.0.0:8080", env="APITALLY_PROXY_LISTEN", flag="--listen", description="listen address"
    )
    client_id: str | None = _setting(
        None,
        env="APITALLY_CLIENT_ID",
        flag="--client-id",
        description="Apitally client id (0.x hub protocol); none means local mode",
    )
    write_token: str | None = _setting(
        None,
        env="APITALLY_WRITE_TOKEN",
        description="Apitally write token (1.x, OpenTelemetry export); a secret, so env or "
        "config file only; wins over a client id",
    )
    otlp_endpoint: str = _setting(
        DEFAULT_OTLP_ENDPOINT,
        env="APITALLY_OTLP_ENDPOINT",
        description="base URL of Apitally's OTLP endpoint (signals go to /v1/<signal>)",
    )
    collector_endpoint: str | None = _setting(
        None,
        env="OTEL_EXPORTER_OTLP_ENDPOINT",
        description="base URL of any OTLP/HTTP collector, used when no Apitally credential "
        "is set (Grafana, Honeycomb, an OpenTelemetry Collector…)",
    )
    collector_headers: str | None = _setting(
        None,
        env="OTEL_EXPORTER_OTLP_HEADERS",
        description="headers for the collector, `key=value,key2=value2` (values URL-encoded); "
        "env or config file only, they usually carry a key",
    )
    env: str = _setting("dev", env="APITALLY_ENV", flag="--env", description="Apitally env")
    hub_url: str = _setting(
        DEFAULT_HUB_URL, env="APITALLY_HUB_BASE_URL", flag="--hub-url", description="hub base URL"
    )
    sync_interval: float | None = _setting(
        None,
        env="APITALLY_PROXY_SYNC_INTERVAL",
        flag="--sync-interval",
        description="seconds between syncs (default: 10 s the first hour, then 60 s)",
        gt=0,
    )
    workers: int = _setting(
        1, env="APITALLY_PROXY_WORKERS", flag="--workers", description="worker processes", ge=1
    )
    server: Literal["lean", "aiohttp"] = _setting(
        "lean",
        env="APITALLY_PROXY_SERVER",
        flag="--server",
        description="client-facing HTTP server: lean (an asyncio protocol on llhttp) or "
        "aiohttp (aiohttp's web.Server, the previous one, kept for one release)",
    )
    config: str | None = _setting(
        None, env="APITALLY_PROXY_CONFIG", flag="--config", description="TOML config file"
    )
    admin_listen: str | None = _setting(
        "127.0.0.1:9099",
        env="APITALLY_PROXY_ADMIN_LISTEN",
        flag="--admin-listen",
        description="admin address (health, metrics, status); 'off' disables it",
    )
    admin_token: str | None = _setting(
        None,
        env="APITALLY_PROXY_ADMIN_TOKEN",
        description="bearer token the admin endpoints (all but /health) require; env or "
        "config file only. Set it when the admin address is not loopback",
    )
    admin_allowed_hosts: list[str] = _setting(
        [],
        env="APITALLY_PROXY_ADMIN_ALLOWED_HOSTS",
        description="host names the admin server answers to besides IP literals and "
        "localhost (DNS-rebinding guard), comma-separated",
    )
    state_dir: Path = _setting(
        default_state_dir(),
        env="APITALLY_PROXY_STATE_DIR",
        flag="--state-dir",
        description="state directory (instance ids, spool, local-mode output)",
    )
    framework: Literal[*frameworks.SETTING_VALUES] = _setting(  # type: ignore[valid-type]
        frameworks.AUTO,
        env="APITALLY_PROXY_FRAMEWORK",
        flag="--framework",
        description="app framework: "
        + ", ".join(FRAMEWORKS)
        + f", {frameworks.AUTO} or {frameworks.NONE}",
    )
    openapi_url: str | None = _setting(
        None,
        env="APITALLY_PROXY_OPENAPI_URL",
        flag="--openapi-url",
        description="OpenAPI document URL or file",
    )
    request_logging: bool = _setting(
        False,
        env="APITALLY_PROXY_REQUEST_LOGGING",
        flag="--request-logging",
        description="request logging on/off",
    )
    request_log: RequestLogSettings = _setting(
        RequestLogSettings(),
        description="request log details ([request_log] table in the config file)",
    )
    app_version: str | None = _setting(
        None,
        env="APITALLY_PROXY_APP_VERSION",
        flag="--app-version",
        description="app version reported in startup data",
    )
    consumer_header: str | None = _setting(
        None,
        env="APITALLY_PROXY_CONSUMER_HEADER",
        flag="--consumer-header",
        description="request header identifying the consumer (e.g. X-API-Key or "
        "Authorization), counted as a salted hash when the app sets no X-Apitally-Consumer",
    )
    consumer_salt: str | None = _setting(
        None,
        env="APITALLY_PROXY_CONSUMER_SALT",
        description="secret salt for consumer_header hashes (default: a random salt kept "
        "in the state dir); the same salt gives the same identifiers everywhere",
    )
    consumer_map: str | None = _setting(
        None,
        env="APITALLY_PROXY_CONSUMER_MAP",
        description="TOML or JSON file giving consumer_header consumers a name and group",
    )

    # Config-file (and env) only: tuning with sensible defaults.
    upstream_connect_timeout: float = _setting(
        5.0, env="APITALLY_PROXY_UPSTREAM_CONNECT_TIMEOUT", gt=0
    )
    upstream_timeout: float = _setting(
        60.0,
        env="APITALLY_PROXY_UPSTREAM_TIMEOUT",
        gt=0,
        description="seconds to wait for upstream headers or the next body chunk (504 after)",
    )
    upstream_keepalive: float = _setting(
        1.0,
        env="APITALLY_PROXY_UPSTREAM_KEEPALIVE",
        gt=0,
        description="idle seconds a pooled upstream connection is kept (below gunicorn's 2 s)",
    )
    upstream_pool_size: int = _setting(
        0, env="APITALLY_PROXY_UPSTREAM_POOL_SIZE", ge=0, description="0 means unlimited"
    )
    client_keepalive: float = _setting(75.0, env="APITALLY_PROXY_CLIENT_KEEPALIVE", gt=0)
    client_body_timeout: float = _setting(
        60.0,
        env="APITALLY_PROXY_CLIENT_BODY_TIMEOUT",
        gt=0,
        description="seconds a client may pause while sending a request body (408 after)",
    )
    shutdown_grace: float = _setting(
        15.0,
        env="APITALLY_PROXY_SHUTDOWN_GRACE",
        ge=0,
        description="seconds from SIGTERM to exit: drain in-flight requests, then deliver",
    )
    trusted_proxies: list[str] = _setting(
        [],
        env="APITALLY_PROXY_TRUSTED_PROXIES",
        description="peers (IPs/CIDRs) whose X-Forwarded-* headers are kept",
    )
    max_line_size: int = _setting(8190, ge=256)
    max_field_size: int = _setting(8190, ge=256)
    max_headers: int = _setting(128, ge=8)
    max_websocket_message: int = _setting(
        16 * 1024 * 1024,
        ge=1024,
        description="largest WebSocket message relayed, in bytes (closed with 1009 past it)",
    )
    max_header_bytes: int = _setting(
        65536, ge=1024, description="total bytes of request header fields before 431"
    )
    max_response_field_size: int = _setting(
        16384,
        ge=1024,
        description="longest upstream status line or header field, in bytes (502 past it)",
    )
    max_response_headers: int = _setting(
        200, ge=8, description="most header fields in an upstream response head (502 past it)"
    )
    max_interim_responses: int = _setting(
        10, ge=0, description="most interim 1xx answers before the final one (502 past it)"
    )
    max_templates_per_method: int = _setting(
        1000, ge=1, description="distinct heuristic path templates per method before overflow"
    )
    routes: list[str] = _setting(
        [],
        description='declared routes, e.g. "GET /items/{id}", "/items/<int:id>", "POST /a/:id"',
    )
    openapi_refresh: float = _setting(
        300.0,
        env="APITALLY_PROXY_OPENAPI_REFRESH",
        gt=0,
        description="seconds between re-reads of the app's OpenAPI document",
    )
    max_consumers: int = _setting(10_000, ge=1)
    hub_timeout: float = _setting(10.0, gt=0)
    queue_max_age: float = _setting(
        3600.0, gt=0, description="seconds an undelivered sync payload is kept"
    )
    spool_max_bytes: int = _setting(
        100_000_000, ge=100_000, description="bytes of undelivered payloads kept on disk"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = dict(os.environ)
        cli_values = getattr(init_settings, "init_kwargs", {})
        path = cli_values.get("config") or environ.get("APITALLY_PROXY_CONFIG")
        return (
            init_settings,
            _EnvVarSource(settings_cls, environ),
            _TomlFileSource(settings_cls, path),
        )

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, v: str) -> str:
        parse_upstream(v)
        return v

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("admin_listen")
    @classmethod
    def _check_admin_listen(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() in ("", "off", "none", "false", "0"):
            return None
        parse_host_port(v)
        return v

    @field_validator("hub_url")
    @classmethod
    def _check_hub_url(cls, v: str) -> str:
        # Never an error here: a bad hub URL is an Apitally setting, and those must not
        # stop traffic (see hub_problem).
        return v.strip().rstrip("/")

    @field_validator("trusted_proxies", "admin_allowed_hosts", mode="before")
    @classmethod
    def _split_comma_list(cls, v: Any) -> Any:
        """Lists given in the environment are comma-separated."""
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted(cls, v: list[str]) -> list[str]:
        for item in v:
            ipaddress.ip_network(item, strict=False)
        return v

    @field_validator(
        "client_id",
        "write_token",
        "admin_token",
        "collector_endpoint",
        "collector_headers",
        "app_version",
        "openapi_url",
        "consumer_header",
        "consumer_salt",
        "consumer_map",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("consumer_header")
    @classmethod
    def _check_consumer_header(cls, v: str | None) -> str | None:
        return check_header_name(v) if v is not None else None

    @field_validator("consumer_salt")
    @classmethod
    def _check_consumer_salt(cls, v: str | None) -> str | None:
        if v is not None and len(v) < MIN_SALT_LENGTH:
            # Never echo the value: it is a secret.
            raise ValueError(
                f"is shorter than {MIN_SALT_LENGTH} characters; use a long random string "
                "(e.g. `openssl rand -hex 32`), the same for every replica"
            )
        return v

    @field_validator("consumer_map")
    @classmethod
    def _check_consumer_map(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        if "consumer_header" in info.data and info.data["consumer_header"] is None:
            raise ValueError(
                "needs consumer_header (the request header whose consumers it names); "
                "set --consumer-header / APITALLY_PROXY_CONSUMER_HEADER or remove it"
            )
        return v  # its contents: checks.check_settings (loaded and hashed by the worker)

    # Derived views, so the rest of the code never re-parses strings.

    @property
    def upstream_target(self) -> Upstream:
        return parse_upstream(self.upstream)

    @property
    def listen_address(self) -> HostPort:
        return parse_host_port(self.listen)

    @property
    def admin_address(self) -> HostPort | None:
        return parse_host_port(self.admin_listen) if self.admin_listen else None

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]

    @property
    def hub_problem(self) -> str | None:
        """Why the hub cannot be used with these settings, or None when it can (or is off)."""
        if self.client_id is None:
            return None
        try:
            uuid.UUID(self.client_id)
        except ValueError:
            return (
                f"client id {self.client_id!r} is not a UUID: set APITALLY_CLIENT_ID / "
                "--client-id to the client id shown in the Apitally dashboard"
            )
        if not ENV_PATTERN.match(self.env):
            return (
                f"env {self.env!r} is invalid: APITALLY_ENV / --env must be 1-32 letters, "
                "digits, '_' or '-'"
            )
        if not HUB_URL_PATTERN.match(self.hub_url):
            return (
                f"hub URL {self.hub_url!r} is not an http(s) URL: fix APITALLY_HUB_BASE_URL / "
                f"--hub-url (default {DEFAULT_HUB_URL})"
            )
        return None

    @property
    def hub_enabled(self) -> bool:
        return self.export_mode == "hub"

    @property
    def export_mode(self) -> Literal["otlp", "hub", "collector", "local"]:
        """Where the data goes: chosen by the credential (a write token wins), else a
        collector endpoint, else nowhere (local mode). A bad setting means local mode."""
        if self.write_token is not None:
            return "otlp" if self.export_problem is None else "local"
        if self.client_id is not None:
            return "hub" if self.export_problem is None else "local"
        if self.collector_endpoint is not None:
            return "collector" if self.export_problem is None else "local"
        return "local"

    @property
    def export_problem(self) -> str | None:
        """Why the chosen destination cannot be used, or None (a bad Apitally or collector
        setting never stops traffic: the proxy runs in local mode and says why)."""
        if self.write_token is not None:
            if not WRITE_TOKEN_PATTERN.match(self.write_token):
                # Never echo a secret, not even part of it.
                return (
                    f"the write token ({len(self.write_token)} characters) is not of the form "
                    "apt_ + 24 letters or digits: set APITALLY_WRITE_TOKEN / `write_token` to the "
                    "token shown in the Apitally dashboard"
                )
            return self._env_problem() or _url_problem(
                self.otlp_endpoint, "APITALLY_OTLP_ENDPOINT / `otlp_endpoint`"
            )
        if self.client_id is not None:
            return self.hub_problem
        if self.collector_endpoint is not None:
            return _url_problem(
                self.collector_endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT / `collector_endpoint`"
            ) or _headers_problem(self.collector_headers)
        return None

    def _env_problem(self) -> str | None:
        if ENV_PATTERN.match(self.env):
            return None
        return (
            f"env {self.env!r} is invalid: APITALLY_ENV / --env must be 1-32 letters, "
            "digits, '_' or '-'"
        )

    @property
    def export_warnings(self) -> list[str]:
        """Settings that are set but ignored, worth a warning at start-up."""
        out = []
        if self.write_token is not None and self.client_id is not None:
            out.append(
                f"both a write token and client id {self.client_id} are set: the write token "
                "wins (OpenTelemetry export, Apitally 1.x); the client id is ignored"
            )
        if self.collector_endpoint is not None and self.export_mode in ("otlp", "hub"):
            out.append(
                "OTEL_EXPORTER_OTLP_ENDPOINT is ignored: the Apitally credential decides where "
                "data goes (one destination per proxy)"
            )
        return out

    @property
    def client_tag(self) -> str | None:
        return CLIENT_TAGS.get(self.framework)

    @property
    def instance_key(self) -> str | None:
        """What instance ids are kept per (with the env): the credential, hashed."""
        if self.write_token is not None:
            return "otlp-" + hashlib.sha256(self.write_token.encode()).hexdigest()[:16]
        if self.client_id is None and self.collector_endpoint is not None:
            return "collector-" + hashlib.sha256(self.collector_endpoint.encode()).hexdigest()[:16]
        return self.client_id


def parse_headers(value: str | None) -> dict[str, str]:
    """`key=value,key2=value2` (values URL-encoded), as OTEL_EXPORTER_OTLP_HEADERS is spelled."""
    headers: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"header entry {key.strip()[:40]!r} has no `=value`")
        headers[key.strip()] = unquote(val.strip())
    return headers


def _headers_problem(value: str | None) -> str | None:
    try:
        parse_headers(value)
    except ValueError as exc:
        return (
            f"OTEL_EXPORTER_OTLP_HEADERS / `collector_headers`: {exc} (use key=value,key2=value2)"
        )
    return None


def _url_problem(url: str, setting: str) -> str | None:
    if HUB_URL_PATTERN.match(url.strip()):
        return None
    return f"{url!r} is not an http(s) URL: fix {setting}"


def _config_file(cli_values: dict[str, Any]) -> str:
    path = cli_values.get("config") or os.environ.get("APITALLY_PROXY_CONFIG")
    return f"the config file {path}" if path else "the config file"


def describe_setting(field_name: str, config_file: str = "the config file") -> str:
    field = Settings.model_fields.get(field_name)
    env, flag = setting_names(field) if field else (None, None)
    names = [f"`{field_name}` in {config_file}"]
    if flag:
        names.insert(0, flag)
    if env:
        names.insert(1 if len(names) > 1 else 0, env)
    return " / ".join(names)


# Environment variables read outside the settings model.
OTHER_ENV_NAMES = frozenset({"APITALLY_PROXY_LOG_LEVEL"})


def env_names() -> dict[str, str]:
    """Every environment variable the proxy reads -> the setting it feeds."""
    names = {n: n for n in OTHER_ENV_NAMES}
    for field_name, field in Settings.model_fields.items():
        env, _ = setting_names(field)
        if env:
            names[env] = field_name
    return names


def environment_warnings(environ: dict[str, str] | None = None) -> list[str]:
    """Set `APITALLY_*` variables the proxy does not read, each with the name it probably
    meant (`APITALLY_PROXY_CLIENT_ID` → `APITALLY_CLIENT_ID`): a typo must not silently
    leave the proxy in local mode."""
    environ = dict(os.environ) if environ is None else environ
    known = env_names()
    out = []
    for name in sorted(environ):
        if not name.startswith("APITALLY_") or name in known:
            continue
        # `APITALLY_PROXY_CLIENT_ID` and friends: the prefix added to a client's variable.
        stripped = "APITALLY_" + name.removeprefix("APITALLY_PROXY_")
        guess = stripped if stripped in known else None
        if guess is None:
            # Compared after the shared prefix, which would make every name look close.
            prefix = "APITALLY_PROXY_" if name.startswith("APITALLY_PROXY_") else "APITALLY_"
            tails = {k[len(prefix) :]: k for k in known if k.startswith(prefix)}
            close = difflib.get_close_matches(name[len(prefix) :], tails, n=1, cutoff=0.75)
            guess = tails[close[0]] if close else None
        hint = f"; did you mean {guess}?" if guess else ""
        out.append(f"environment variable {name} is not a setting of apitally-proxy{hint}")
    return out


def load_settings(cli_values: dict[str, Any] | None = None) -> Settings:
    """Build the settings from CLI values, the environment and the config file.

    Raises ConfigError with a one-line message naming the setting and the fix.
    """
    values = {k: v for k, v in (cli_values or {}).items() if v is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            field_name = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "is required"
            elif err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc, Settings.model_fields, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
                problems.append(f"unknown setting {loc!r} in {_config_file(values)}{hint}")
                continue
            where = describe_setting(field_name, _config_file(values)) if field_name else loc
            problems.append(f"{where}: {msg}")
        raise ConfigError("; ".join(problems)) from None
