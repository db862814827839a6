"""Startup and sync payloads, shaped as the official clients send them."""

from __future__ import annotations

import platform
import time
import uuid
from typing import Any

from apitally_proxy import __version__

# The official FastAPI integration is the Starlette middleware, which reports
# "python:starlette"; the hub knows the tags the official clients send.
OFFICIAL_CLIENT_TAGS = {"python:fastapi": "python:starlette"}


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
        "client": OFFICIAL_CLIENT_TAGS.get(client_tag, client_tag)
        if client_tag
        else "python:apitally-proxy",
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
