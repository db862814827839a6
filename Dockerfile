# apitally-proxy: a sidecar reverse proxy that meters API traffic for Apitally.
#
#   docker build -t apitally-proxy .
#   docker run -e APITALLY_PROXY_UPSTREAM=http://app:8000 -p 8080:8080 apitally-proxy
#
# Without Docker: scripts/build-image (buildah) and scripts/smoke-image; see docs/image.md.
#
# Single stage on purpose: the package is pure Python and every dependency ships a
# manylinux wheel, so there is nothing to compile and no build toolchain to leave behind.

# Any Debian-based image with python3 (3.11+) and its venv module will do, e.g. the
# debootstrap'd bookworm scripts/build-image makes when no registry can be reached.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The proxy lives in its own virtualenv, first on PATH (the entrypoint and the health
# check's `python` come from it): the same on python:3.11-slim and on Debian's python3,
# whose system Python is "externally managed" (PEP 668) and has no pip.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/apitally-proxy/bin:$PATH

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 apitally \
 && useradd --system --uid 10001 --gid apitally --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin apitally

WORKDIR /src
# README.md* so the build still works before a README exists (pyproject names it).
COPY pyproject.toml README.md* ./
COPY apitally_proxy ./apitally_proxy
# Behind a proxy that intercepts TLS, pip needs its CA bundle, for this step only:
# mount it and name it in PIP_CERT (scripts/build-image does, with buildah's --volume).
# Nothing is copied into the image, and an ARG is not in its environment.
# The venv's own pip and setuptools are not needed at run time (23 MB): removed.
ARG PIP_CERT
RUN python3 -m venv /opt/apitally-proxy \
 && /opt/apitally-proxy/bin/pip install --no-cache-dir . \
 && /opt/apitally-proxy/bin/pip uninstall --yes --quiet pip setuptools \
 && rm -rf /src

# Instance ids, the undelivered-payload spool and local-mode output live here; a volume
# keeps them across container restarts (no metric lost, same instance ids).
RUN mkdir -p /var/lib/apitally-proxy \
 && chown apitally:apitally /var/lib/apitally-proxy
VOLUME /var/lib/apitally-proxy

# APITALLY_PROXY_UPSTREAM has no default: set it (e.g. http://app:8000) when running.
# Without APITALLY_WRITE_TOKEN (1.x) or APITALLY_CLIENT_ID (0.x) the proxy runs in local
# mode and sends nothing anywhere.
ENV APITALLY_PROXY_STATE_DIR=/var/lib/apitally-proxy \
    APITALLY_PROXY_LISTEN=0.0.0.0:8080 \
    APITALLY_PROXY_ADMIN_LISTEN=0.0.0.0:9099

WORKDIR /var/lib/apitally-proxy
USER 10001:10001

# 8080: traffic (point the load balancer here). 9099: health, metrics, status page;
# publish it only on a private network.
EXPOSE 8080 9099

# No curl in slim images: ask the admin /health with the stdlib. It answers 503 while
# draining, which urlopen raises on. The port follows APITALLY_PROXY_ADMIN_LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('APITALLY_PROXY_ADMIN_LISTEN', '').rpartition(':')[2] or '9099'; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)"]

# SIGTERM: stop accepting, finish in-flight requests, send the final sync, exit 0.
# Give it time: docker stop -t 30 / stop_grace_period: 30s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["apitally-proxy"]
