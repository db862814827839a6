"""The recording OTLP receiver for the tests, and how a proxy or an app is pointed at it."""

from __future__ import annotations

from apitally_proxy.otlp.receiver import RecordingReceiver, RequestKey

FakeOtlp = RecordingReceiver
__all__ = ["TOKEN", "FakeOtlp", "RequestKey", "get", "otlp_env"]

TOKEN = "apt_" + "a1B2c3D4e5F6g7H8i9J0k1L2"  # the form of a real write token, but made up


def otlp_env(receiver: RecordingReceiver, **extra: str) -> dict[str, str]:
    """Environment pointing a proxy (or an app with apitally 1.x) at the receiver."""
    return {
        "APITALLY_WRITE_TOKEN": TOKEN,
        "APITALLY_OTLP_ENDPOINT": receiver.url,
        "APITALLY_ENV": "test",
        **extra,
    }


async def get(http, url: str) -> int:
    async with http.get(url) as r:
        await r.read()
        return r.status
