"""Startup and sync payloads, shaped as the official clients send them."""

from __future__ import annotations

import platform
import time
import uuid
from typing import Any

from apitally_proxy import __version__


def startup_payload(
    instance_uuid: str,
    paths: list[dict[str, str]],
    client_tag: str | None,
    app_version: str | None,
    openapi: str | None = None,
) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "apitally-proxy": __version__}
    if app_version:
        versions["app"] = app_version
    payload: dict[str, Any] = {
        "instance_uuid": instance_uuid,
        "message_uuid": str(uuid.uuid4()),
        "paths": paths,
        "versions": versions,
        "client": client_tag or "python:apitally-proxy",
    }
    if openapi is not None:
        payload["openapi"] = openapi
    return payload


def sync_payload(
    instance_uuid: str,
    aggregates: dict[str, Any],
    resources: dict[str, Any] | None,
    message_uuid: str | None = None,
) -> dict[str, Any]:
    return {
        "instance_uuid": instance_uuid,
        "message_uuid": message_uuid or str(uuid.uuid4()),
        "timestamp": time.time(),
        **aggregates,
        "resources": resources,
    }
