"""Startup and sync payloads, shaped as the official clients send them."""

from __future__ import annotations

import platform
import time
import uuid
from typing import Any

import psutil

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


class HubCodec:
    """An interval's aggregates → the one hub sync payload that carries them."""

    # The payload is only ever encoded as JSON: a checkpoint's rows may come pre-serialized.
    serialized_rows = True

    def __init__(self, instance_uuid: str) -> None:
        self.instance_uuid = instance_uuid
        self._process = psutil.Process()
        self._process.cpu_percent()  # prime the CPU counter
        self._primed = False

    def _resources(self) -> dict[str, Any] | None:
        if not self._primed:
            # Like the official clients: no reading at the first sync, since the CPU
            # counter was primed only moments ago and would report noise.
            self._primed = True
            return None
        try:
            return {
                "cpu_percent": self._process.cpu_percent(),
                "memory_rss": self._process.memory_info().rss,
            }
        except psutil.Error:
            return None

    def interval(
        self,
        aggregates: dict[str, Any],
        message_uuid: str,
        start_ns: int,
        end_ns: int,
        live: bool = True,
    ) -> list[dict[str, Any]]:
        resources = self._resources() if live else None
        return [sync_payload(self.instance_uuid, aggregates, resources, message_uuid)]
