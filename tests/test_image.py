"""The image itself: built with buildah and run without Docker (slow; see docs/image.md).

    scripts/test -m slow -k image

scripts/build-image builds the Dockerfile (on a debootstrap'd Debian base when the
registry is out of reach) and scripts/smoke-image runs the result in front of an
upstream on 127.0.0.1 and checks health, proxying, the user, the image's HEALTHCHECK and
SIGTERM. Both honour STORAGE_DRIVER and BUILDAH_ISOLATION as they do from a shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = "apitally-proxy:test"  # not the :local image docker-compose.yml and people use

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed"),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="building and running the image with buildah needs root"
    ),
]


def run(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    print(done.stdout[-5000:], done.stderr[-5000:], sep="\n")  # shown when the test fails
    return done


@pytest.fixture(scope="module")
def built() -> str:
    # A cold build debootstraps the base first: about 2-5 minutes, then seconds.
    done = run(str(ROOT / "scripts/build-image"), "--tag", TAG, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stderr.strip().splitlines()[-1]
    assert re.search(rf"built {re.escape(TAG)} in \d+ s.*; image size [\d.]+ [kMG]?B", summary)
    return summary


@pytest.mark.timeout(1500)
def test_the_image_builds_and_passes_the_smoke_test(built: str) -> None:
    done = run(str(ROOT / "scripts/smoke-image"), "--tag", TAG, "--timeout", "150", timeout=200)
    assert done.returncode == 0, done.stdout[-3000:]
    passed = [line[5:] for line in done.stdout.splitlines() if line.startswith("ok   ")]
    for check in [
        "admin /health answers 200 ok",
        "requests through the proxy reach the upstream",
        "runs as the image's USER 10001:10001, not root",
        "the HEALTHCHECK command succeeds",
        "/health answers 503 while draining",
        "the HEALTHCHECK command fails while draining",
        "the request in flight at SIGTERM completes",
        "the proxy exits 0 within the",
        "the final sync counted every request",
    ]:
        assert any(check in line for line in passed), f"not passed: {check}"
    assert "FAIL" not in done.stdout
