"""Turns what the proxy observed into the hub's aggregates: the one call on the hot path."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from apitally_proxy import frameworks
from apitally_proxy.metering.consumers import Consumer, ConsumerCache, ConsumerRegistry
from apitally_proxy.metering.histograms import HistogramCounter
from apitally_proxy.metering.identity import ConsumerIdentity
from apitally_proxy.metering.prometheus import RouteHistograms
from apitally_proxy.metering.recent import RecentWindow
from apitally_proxy.metering.requests import RequestCounter
from apitally_proxy.metering.validation import (
    VALIDATION_STATUSES,
    ValidationErrorCounter,
    extract_validation_errors,
)
from apitally_proxy.routes import RouteOverrides
from apitally_proxy.text import UNENCODABLE, json_rows

log = logging.getLogger("apitally_proxy.metering")

# Statuses that suggest the path is no route of the app: heuristics don't learn from them.
# Validation errors first look for the known route whose parameter was rejected.
NO_ROUTE_STATUSES = frozenset({404, 405})
HEADER_CONSUMER = "x-apitally-consumer"
HEADER_CONSUMER_NAME = "x-apitally-consumer-name"
HEADER_CONSUMER_GROUP = "x-apitally-consumer-group"
HEADER_ROUTE = "x-apitally-route"


class Observed(Protocol):
    """The fields of one proxied request that metering reads (see proxy.Exchange)."""

    method: str
    path: str
    status: int
    response_time: float
    request_size: int | None
    response_size: int
    apitally_headers: dict[str, str] | None
    log: bool  # the request is to be logged (its consumer is wanted even when not counted)
    # Set only when something reads them (consumer_header, the request log).
    request_headers: Any
    # A bounded copy of the response body (error responses only) and its headers.
    response_body: Any
    response_headers: Any


# What metering derived for one request, for later readers (the request log): the route
# template it was counted under (None: not counted) and the consumer identifier.
Metered = tuple[str | None, str | None]
NOT_METERED: Metered = (None, None)


class TemplateResolver(Protocol):
    def resolve(
        self, method: str, path: str, learn: bool = True, loose: bool = False
    ) -> str | None: ...

    def take_renames(self) -> dict[str, str]: ...


class Meter:
    """Owns the aggregates for one worker; `record` is pure and synchronous."""

    def __init__(
        self,
        resolver: TemplateResolver,
        max_consumers: int = 10_000,
        framework: str = frameworks.AUTO,
        identity: ConsumerIdentity | None = None,
        requests: RequestCounter | HistogramCounter | None = None,
    ) -> None:
        self.resolver = resolver
        self.identity = identity
        self.framework = framework  # the settings value (a name, auto or none)
        self._choice = frameworks.from_setting(framework)
        # The hub's bins by default; exponential histograms for OpenTelemetry export.
        self.requests = requests if requests is not None else RequestCounter(max_consumers)
        self._max_consumers = max_consumers
        self._overflow_reported = 0
        self.consumers = ConsumerRegistry(max_size=max_consumers)
        self._parse_consumer = ConsumerCache().parse
        self.route_overrides = RouteOverrides()
        self.validation_errors = ValidationErrorCounter(max_keys=max_consumers)
        self.histograms = RouteHistograms()  # lifetime, for Prometheus
        self.recent = RecentWindow()  # the last minutes, for the dashboard
        # Lifetime figures for the admin endpoint (never reset).
        self.recorded = 0
        self.unmatched = 0
        self.status_counts: dict[int, int] = {}

    def record(self, ex: Observed) -> Metered:
        """Count one request under (consumer, method, template, status); returns the
        template and consumer it was counted under (the observation is only read)."""
        self.recorded += 1
        self.status_counts[ex.status] = self.status_counts.get(ex.status, 0) + 1
        if ex.method == "OPTIONS" or ex.status == 101:
            return NOT_METERED  # not counted by the official clients (101: a WebSocket)
        headers = ex.apitally_headers
        route = headers.get(HEADER_ROUTE) if headers is not None else None
        # The app naming the route itself (X-Apitally-Route) wins over any route source.
        template = (route is not None and self.route_overrides.accept(ex.method, route)) or (
            self.resolver.resolve(
                ex.method,
                ex.path,
                ex.status not in NO_ROUTE_STATUSES,
                ex.status in VALIDATION_STATUSES,
            )
        )
        if template is None:
            self.unmatched += 1
            self.recent.observe_unmatched()
            if headers is not None and ex.log:
                # Not counted, but its request log names the consumer the app gave.
                unmatched = self._parse_consumer(headers.get(HEADER_CONSUMER))
                return None, unmatched.identifier if unmatched is not None else None
            return NOT_METERED
        consumer = self._consumer(ex, headers)
        consumer_id = None
        if consumer is not None:
            consumer_id = consumer.identifier
            self.consumers.add_or_update(consumer)
            if consumer.name is not None or consumer.group is not None:
                self.recent.name_consumer(consumer_id, consumer.name, consumer.group)
        self.requests.add_request(
            consumer_id,
            ex.method,
            template,
            ex.status,
            ex.response_time,
            ex.request_size,
            ex.response_size,
        )
        self.histograms.observe(ex.method, template, ex.status, ex.response_time, ex.response_size)
        self.recent.observe(
            ex.method, template, ex.status, consumer_id, ex.response_time, ex.response_size
        )
        body = ex.response_body
        if body is not None and ex.status in VALIDATION_STATUSES and not body.overflow:
            self._validation_errors(ex, body.data, template, consumer_id)
        return template, consumer_id

    def _consumer(self, ex: Observed, headers: dict[str, str] | None) -> Consumer | None:
        """The app's own X-Apitally-Consumer wins. A key names a consumer only once the
        app accepted it: random keys must not crowd real consumers out of the cap."""
        if headers is not None:
            consumer = self._parse_consumer(
                headers.get(HEADER_CONSUMER),
                headers.get(HEADER_CONSUMER_NAME),
                headers.get(HEADER_CONSUMER_GROUP),
            )
            if consumer is not None:
                return consumer
        if self.identity is not None and ex.request_headers is not None:
            found = self.identity.identify(ex.request_headers)
            if found is not None and self.identity.vouched(found.identifier, ex.status):
                return found
        return None

    def _validation_errors(
        self, ex: Observed, body: bytes, template: str, consumer_id: str | None
    ) -> None:
        rh = ex.response_headers
        choice = self._choice
        framework = choice.framework
        if framework is None and choice.guess:
            # The route discovery may have recognised the app by now.
            framework = frameworks.get(getattr(self.resolver, "framework", None))
        errors = extract_validation_errors(
            framework,
            ex.status,
            rh.get("Content-Type") if rh is not None else None,
            rh.get("Content-Encoding") if rh is not None else None,
            body,
            choice.guess,
        )
        if errors:
            self.validation_errors.add_validation_errors(consumer_id, ex.method, template, errors)
            self.recent.observe_validation_errors(ex.method, template, errors)

    def peek(self, serialized: bool = False) -> dict[str, Any]:
        """The aggregates of the open interval, leaving them in place (for checkpoints).

        `serialized` (the hub's checkpoints, read only as JSON): the request and
        validation-error rows come as pre-serialized JSON arrays (`orjson.Fragment`,
        or `[]` when empty), encoded a chunk at a time straight from the counters,
        instead of a dict per row. Under hostile cardinality a checkpoint has as many
        rows as the interval has keys, rebuilt every second: as dicts they doubled the
        interval's memory at each checkpoint, and left the arenas they were made in
        fragmented.

        The request rows, as many as the interval has keys, come unmade: a value with
        an async `build()` that makes them on the loop a chunk at a time, yielding
        between chunks (`LiveRows` as JSON for the hub, `DeferredRows` for OTLP),
        returning what goes in their place.
        """
        requests = self.requests
        if serialized and isinstance(requests, RequestCounter):
            return {
                "requests": requests.live_requests(),  # encoded by its build()
                "validation_errors": json_rows(self.validation_errors.iter_validation_errors()),
                "server_errors": [],
                "consumers": json_rows(self.consumers.iter_updated_consumers()),
            }
        return {
            # OTLP: rows built on the loop a chunk at a time (`DeferredRows.build`).
            "requests": requests.peek_requests(),
            "validation_errors": self.validation_errors.peek_validation_errors(),
            "server_errors": [],
            "consumers": self.consumers.peek_updated_consumers(),
        }

    def get_and_reset(self, serialized: bool = False) -> dict[str, Any]:
        """The aggregate part of a sync payload; the meter starts a new interval.

        `serialized` (the hub's syncs, read only as JSON): the rows come as
        pre-serialized JSON arrays, as `peek(serialized=True)` makes them (the request
        rows unmade, a `LiveRows` whose `build(problems)` makes them on the loop a
        chunk at a time), and the key `UNENCODABLE` says how many values in the others
        had to be repaired or dropped (for the spool to count and report; it is no
        part of the payload). A sync built a dict per row of the interval, then the
        spool encoded them: under hostile cardinality with 10 s syncs, tens of
        thousands of dicts at once. OTLP: the request rows are a `DeferredRows`, made
        where the exports are encoded.
        """
        renames = self.resolver.take_renames()
        if renames:  # positions learned during the interval: its early keys join them
            self.requests.rename_paths(renames)
            self.validation_errors.rename_paths(renames)
        overflow = self.requests.consumer_overflow
        if overflow > self._overflow_reported:
            log.warning(
                "max_consumers (%d) reached: %d request(s) this interval were counted without "
                "their consumer; raise max_consumers if these are real consumers",
                self._max_consumers,
                overflow - self._overflow_reported,
            )
            self._overflow_reported = overflow
        requests = self.requests
        if serialized and isinstance(requests, RequestCounter):
            problems = [0]
            return {
                # Encoded by its build(), which counts its own problems.
                "requests": requests.take_live(),
                "validation_errors": json_rows(
                    self.validation_errors.take_validation_errors(), problems=problems
                ),
                "server_errors": [],
                "consumers": json_rows(self.consumers.take_updated_consumers(), problems=problems),
                UNENCODABLE: problems[0],
            }
        return {
            # OTLP: rows built where the exports are encoded, off the loop.
            "requests": requests.get_and_reset_requests(),
            "validation_errors": self.validation_errors.get_and_reset_validation_errors(),
            "server_errors": [],
            "consumers": self.consumers.get_and_reset_updated_consumers(),
        }
