"""Django settings of the Django Ninja parity app (its DJANGO_SETTINGS_MODULE).

The URLconf and the middleware live in the app module, `DJANGO_NINJA_APP`: the
parity app by default, a guide snippet's app in tests/test_docs_snippets.py.
"""

from __future__ import annotations

import os

from tests.apps.parity_common import CLIENT_ID, ENV, OFFICIAL

APP = os.environ.get("DJANGO_NINJA_APP", "tests.apps.parity_django_ninja_app")

DEBUG = False
SECRET_KEY = "parity-only"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = APP
INSTALLED_APPS: list[str] = []
USE_TZ = True
# The official middleware outermost, then the app's own consumer lookup; plain mode has
# only the middleware that names the consumer in response headers.
MIDDLEWARE = (
    ["apitally.django.ApitallyMiddleware", f"{APP}.apitally_consumer"]
    if OFFICIAL
    else [f"{APP}.consumer_header"]
)
APITALLY_MIDDLEWARE = {"client_id": CLIENT_ID, "env": ENV}
