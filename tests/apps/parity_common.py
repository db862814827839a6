"""What the parity apps share: the API keys they know and how each maps to a consumer.

Every parity app (FastAPI, Flask, Litestar here; Fastify in parity_fastify/app.js)
runs in one of two modes, chosen by the environment:

- plain (default): the app names the consumer in `X-Apitally-Consumer*` response
  headers, for apitally-proxy in front of it;
- `PARITY_MODE=official`: the official apitally client (0.25.1) is installed in
  the app, reports to `APITALLY_HUB_BASE_URL` as `APITALLY_CLIENT_ID`/`APITALLY_ENV`,
  and the consumer is set with the client's own `set_consumer`;
- `PARITY_MODE=official1`: apitally 1.0.0 (OpenTelemetry, in its own venv) is
  installed in the app and exports to `APITALLY_OTLP_ENDPOINT` with
  `APITALLY_WRITE_TOKEN`; the consumer is set with `apitally.set_consumer`.
"""

from __future__ import annotations

import os
from urllib.parse import quote

# api key -> (identifier, name, group)
CONSUMERS: dict[str, tuple[str, str | None, str | None]] = {
    "key-acme": ("acme", "Acme Corp", "Enterprise"),
    "key-muller": ("muller", "Müller & Söhne", "Free"),
    "key-solo": ("solo", None, None),
}

OFFICIAL = os.environ.get("PARITY_MODE") == "official"
OFFICIAL1 = os.environ.get("PARITY_MODE") == "official1"
CLIENT_ID = os.environ.get("APITALLY_CLIENT_ID", "")
ENV = os.environ.get("APITALLY_ENV", "dev")


def consumer_for(authorization: str | None) -> tuple[str, str | None, str | None] | None:
    """The consumer behind an `Authorization: Bearer <key>` header, if the key is known."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return CONSUMERS.get(authorization.removeprefix("Bearer "))


def set_consumer_1x(authorization: str | None) -> None:
    """apitally 1.x: name the consumer of the current request, if the key is known."""
    import apitally

    consumer = consumer_for(authorization)
    if consumer:
        identifier, name, group = consumer
        apitally.set_consumer(identifier, name=name, group=group)


def consumer_headers(consumer: tuple[str, str | None, str | None]) -> dict[str, str]:
    """The response headers apitally-proxy reads; non-ASCII values percent-encoded."""
    identifier, name, group = consumer
    headers = {"X-Apitally-Consumer": quote(identifier)}
    if name:
        headers["X-Apitally-Consumer-Name"] = quote(name)
    if group:
        headers["X-Apitally-Consumer-Group"] = quote(group)
    return headers
