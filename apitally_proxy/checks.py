"""Domain checks of settings the config module cannot make on its own.

`config` is a leaf: it parses and validates the shape of every setting, and
imports nothing from `routes` or `metering`. Whether a declared route parses as a
template, or the consumer map file reads, is for the modules that own those
grammars; `load_checked_settings` runs both steps, so a mistake still exits 2 at
start-up with one line naming the setting.
"""

from __future__ import annotations

from typing import Any

from apitally_proxy.config import ConfigError, Settings, describe_setting, load_settings
from apitally_proxy.metering.identity import ConsumerMapError, read_consumer_map
from apitally_proxy.routes import parse_declared


def check_settings(settings: Settings) -> Settings:
    """Raise ConfigError naming each setting whose contents cannot be used."""
    where = f"the config file {settings.config}" if settings.config else "the config file"
    problems = []
    for entry in settings.routes:
        try:
            parse_declared(entry)
        except ValueError as exc:
            problems.append(f"{describe_setting('routes', where)}: {exc}")
    if settings.consumer_map is not None:
        try:
            read_consumer_map(settings.consumer_map)  # loaded (and hashed) by the worker
        except ConsumerMapError as exc:
            problems.append(f"{describe_setting('consumer_map', where)}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def load_checked_settings(cli_values: dict[str, Any] | None = None) -> Settings:
    """`config.load_settings` plus the domain checks: what the CLI and tests start from."""
    return check_settings(load_settings(cli_values))
