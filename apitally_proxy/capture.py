"""Which bodies the proxy copies while they stream: error responses and logged requests.

Called from the proxy's hot path, so every decision is a header lookup or a
cached regex answer; the copies themselves are bounded BodyCaptures fed with
chunks that are flowing anyway.
"""

from __future__ import annotations

import time

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from apitally_proxy import frameworks
from apitally_proxy.frameworks import VALIDATION_STATUSES
from apitally_proxy.hub.request_log import MAX_BODY_SIZE, RequestLog, is_body_content_type
from apitally_proxy.metering.validation import MAX_ERROR_BODY, readers, wants_error_body
from apitally_proxy.proxy import BodyCapture, Exchange


def _content_length(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


class Captures:
    """The proxy's CapturePolicy: validation-error bodies and request-log fields."""

    def __init__(
        self,
        framework: str,
        request_log: RequestLog | None = None,
        keep_request_headers: bool = False,
    ) -> None:
        # A settings value. Flask's official client extracts no validation errors, and
        # `none` reads none.
        choice = frameworks.from_setting(framework)
        self._framework = choice.framework
        self._guess = choice.guess
        self._validation = bool(readers(self._framework, self._guess))
        self._log = request_log
        # consumer_header: the meter reads the request headers (a reference, not a copy).
        self._keep_headers = keep_request_headers

    @property
    def logging(self) -> bool:
        """Whether request logging is on (every request head goes past `on_head`)."""
        return self._log is not None

    def on_request(self, request: web.BaseRequest, exchange: Exchange) -> None:
        """The aiohttp server's entry point (the lean server calls `on_head`)."""
        if self._keep_headers:
            exchange.request_headers = request.headers
        if self._log is not None:
            self.on_head(
                exchange,
                request.method,
                request.headers,
                request.remote,
                f"{request.scheme}://{request.host}",
                request.rel_url.raw_path_qs,
                request.headers.get("Content-Length"),
            )

    def on_head(
        self,
        exchange: Exchange,
        method: str,
        headers: CIMultiDictProxy[str],
        remote: str | None,
        origin: str,
        path_qs: str,
        content_length: str | None,
    ) -> None:
        """Whether this request is logged, and its fields and body capture if it is."""
        rl = self._log
        if rl is None or not rl.wants(method, exchange.path, headers.get("User-Agent")):
            return
        exchange.log = True
        exchange.started_at = time.time()
        exchange.request_headers = headers
        exchange.client_address = remote
        exchange.request_url = origin + path_qs
        if rl.config.log_request_body and is_body_content_type(headers.get("Content-Type")):
            exchange.request_body = BodyCapture(MAX_BODY_SIZE, _content_length(content_length))

    def may_capture(self, exchange: Exchange, status: int) -> bool:
        """A cheap first look: False means `response_capture` would return None."""
        return exchange.log or (self._validation and status in VALIDATION_STATUSES)

    def response_capture(
        self, exchange: Exchange, status: int, headers: CIMultiDict[str]
    ) -> BodyCapture | None:
        limit = 0
        ctype = headers.get("Content-Type")
        if self._validation and wants_error_body(self._framework, status, ctype, self._guess):
            limit = MAX_ERROR_BODY
        if exchange.log:
            exchange.response_headers = headers
            rl = self._log
            if rl is not None and rl.config.log_response_body and is_body_content_type(ctype):
                limit = max(limit, MAX_BODY_SIZE)
        elif limit:
            exchange.response_headers = headers
        if not limit:
            return None
        return BodyCapture(limit, _content_length(headers.get("Content-Length")))
