"""One worker process, wired together in one place: start-up, serving, drain, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import platform
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from apitally_proxy import __version__, frameworks
from apitally_proxy.admin import build_admin_app
from apitally_proxy.aio import Background, wait_or_hurry
from apitally_proxy.capture import Captures
from apitally_proxy.cluster import StatusPublisher, merged_status, status_path
from apitally_proxy.config import (
    OTLP_INTERVAL,
    ConfigError,
    Settings,
    parse_headers,
)
from apitally_proxy.heap import HeapTrimmer
from apitally_proxy.hub.instance import acquire_instance
from apitally_proxy.hub.payloads import HubCodec, startup_payload
from apitally_proxy.hub.request_log import RequestLog
from apitally_proxy.hub.spool import Spool
from apitally_proxy.hub.sync import HubSync
from apitally_proxy.hub.transport import HubTransport, LocalTransport, Transport
from apitally_proxy.lean.server import LeanConfig, LeanServer
from apitally_proxy.learning import load_positions, save_positions
from apitally_proxy.metering import Meter
from apitally_proxy.metering.histograms import HistogramCounter
from apitally_proxy.metering.identity import (
    ConsumerIdentity,
    ConsumerMapError,
    build_names,
    load_salt,
    read_consumer_map,
)
from apitally_proxy.openapi import RouteDiscovery, RouteSet
from apitally_proxy.proxy import Exchange, ReverseProxy
from apitally_proxy.routes import MatchRules, RouteResolver, RouteTable, declared_routes
from apitally_proxy.status import ExportStatus, RoutesStatus, WorkerStatus, to_dict

if TYPE_CHECKING:
    # Imported where used, in OTLP mode only: they pull in opentelemetry-proto and
    # protobuf (a few MB of RSS per worker) that hub and local mode never touch.
    from apitally_proxy.otlp.codec import OtlpCodec

log = logging.getLogger("apitally_proxy")

SECOND_SIGNAL_AFTER = 1.0  # seconds after the first before another signal means "hurry"
MAX_FINAL_DELIVERY = 10.0  # seconds of shutdown_grace kept for the final delivery, at most
EXIT_MARGIN = 0.5  # seconds before the end of shutdown_grace the process is out
# Finished requests are metered in batches: the ones that finished within this delay,
# at most METER_BATCH_MAX at a time (see Worker._record).
METER_BATCH_DELAY = 0.01
METER_BATCH_MAX = 256
GC_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)


class Worker:
    """Composes proxy, meter, hub sync and admin for one process slot."""

    def __init__(self, settings: Settings, slot: int = 0) -> None:
        self.settings = settings
        self.slot = slot
        self.identity = _make_identity(settings)
        self.mode = settings.export_mode
        self.otlp = self.mode in ("otlp", "collector")
        self.lease = acquire_instance(settings.state_dir, settings.instance_key, settings.env, slot)
        self.routes = RouteResolver(
            settings.max_templates_per_method, base_path=settings.upstream_target.base_path
        )
        # Parameter positions learned from traffic by earlier runs (no route source).
        self._learned_path = settings.state_dir / "learned-routes.json"
        self.routes.learner.restore(load_positions(self._learned_path))
        self._openapi: str | None = None
        choice = frameworks.from_setting(settings.framework)
        framework = choice.name
        declared = declared_routes(settings.routes)
        if declared:  # in force from the first request; a document found later adds to them
            self.routes.use_table(
                RouteTable(declared, MatchRules.for_framework(framework)), framework
            )
        self.discovery = RouteDiscovery(
            settings.upstream_target,
            settings.openapi_url,
            framework,
            choice.guess,
            declared,
            self._routes_changed,
            refresh=settings.openapi_refresh,
            upstream_trouble=lambda: sum(self.upstream_errors().values()),
            typed_litestar=not self.otlp,
        )
        self.meter = Meter(
            self.routes,
            max_consumers=settings.max_consumers,
            framework=settings.framework,
            identity=self.identity,
            # OpenTelemetry export wants exponential histograms; the hub wants its bins.
            requests=HistogramCounter(settings.max_consumers) if self.otlp else None,
        )
        self.codec: OtlpCodec | HubCodec
        if self.otlp:
            from apitally_proxy.otlp.codec import OtlpCodec, resource_attributes

            self.codec = OtlpCodec(resource_attributes(self.lease.uuid, settings.env, __version__))
        else:
            self.codec = HubCodec(self.lease.uuid)
        self.transport = self._make_transport()
        self.spool = Spool(
            self.lease.path.with_name(f"slot-{self.lease.slot}.spool"),
            max_bytes=settings.spool_max_bytes,
            max_age=settings.queue_max_age,
        )
        self.request_log = self._make_request_log()
        self._unmetered: list[Exchange] = []  # finished, waiting for the next meter batch
        self._meter_timer: asyncio.TimerHandle | None = None
        captures = Captures(
            settings.framework, self.request_log, keep_request_headers=self.identity is not None
        )
        # The aiohttp-based proxy: every request with `server = aiohttp`; with the lean
        # server (the default), only WebSocket upgrades, which it hands over.
        self.proxy = ReverseProxy(settings, self._record, captures)
        self.lean: LeanServer | None = None
        if settings.server == "lean":
            self.lean = LeanServer(
                LeanConfig.from_settings(settings),
                self._record,
                captures,
                fallback=self.proxy.handle,
            )
        self.heap = HeapTrimmer()
        log_hooks: list[Callable[[], Awaitable[None]]] = (
            [self.request_log.deliver] if self.request_log is not None else []
        )
        self.sync = HubSync(
            self.transport,
            self.lease.uuid,
            source=self.meter,
            startup=self._startup_payload,
            spool=self.spool,
            codec=self.codec,
            interval=settings.sync_interval,
            default_interval=OTLP_INTERVAL if self.otlp else None,
            # OTLP: spans are spooled before each export cycle and go out with it; hub:
            # request-log files are uploaded after each sync, as the official clients do.
            before_sync=[
                self._save_learned_routes,
                self._meter_pending,  # requests finishing later count in the next interval
                *(log_hooks if self.otlp else []),
            ],
            # Last: the interval's payloads are built, spooled and freed by now.
            after_sync=[*(log_hooks if not self.otlp else []), self._trim_heap],
        )
        self.ready = False
        self.draining = False
        self.started_at = time.time()
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._publisher: StatusPublisher | None = None
        self._background = Background()

    def _make_transport(self) -> Transport:
        s = self.settings
        problem = s.export_problem
        if problem:
            # A bad Apitally setting never stops traffic: say so loudly and keep proxying.
            log.error("Apitally disabled, running in local mode: %s", problem)
        for warning in s.export_warnings:
            log.warning("%s", warning)
        if self.mode == "hub":
            assert s.client_id is not None
            return HubTransport(s.hub_url, s.client_id, s.env, timeout=s.hub_timeout)
        if self.mode == "otlp":
            from apitally_proxy.otlp.transport import OtlpTransport

            assert s.write_token is not None
            return OtlpTransport(
                s.otlp_endpoint,
                {"Authorization": f"Bearer {s.write_token}", "Apitally-Env": s.env},
                "APITALLY_WRITE_TOKEN / `write_token`",
                timeout=s.hub_timeout,
            )
        if self.mode == "collector":
            from apitally_proxy.otlp.transport import OtlpTransport

            assert s.collector_endpoint is not None
            return OtlpTransport(
                s.collector_endpoint,
                parse_headers(s.collector_headers),
                "OTEL_EXPORTER_OTLP_HEADERS / `collector_headers`",
                timeout=s.hub_timeout,
            )
        return LocalTransport(s.state_dir / "local", f"worker-{self.lease.slot}")

    def _make_request_log(self) -> RequestLog | None:
        s = self.settings
        if not s.request_logging:
            return None
        name = f"worker-{self.lease.slot}"
        # The consumer header carries a credential: masked whatever its name.
        masks = [f"^{re.escape(s.consumer_header)}$"] if s.consumer_header else []
        if not isinstance(self.codec, HubCodec):
            from apitally_proxy.otlp.spans import SpanBuilder, SpanExports

            spans = SpanExports(
                SpanBuilder(s.request_log, masks), self.codec.resource, self.spool.put
            )
            return RequestLog(
                s.request_log,
                self.lease.path.with_name(f"slot-{self.lease.slot}.request-log"),
                mask_headers=masks,
                spans=spans,
            )
        if isinstance(self.transport, HubTransport):
            return RequestLog(
                s.request_log,
                # Next to the instance: another client id or env on the same state dir
                # must never upload (or clean up) these files.
                self.lease.path.with_name(f"slot-{self.lease.slot}.request-log"),
                self.transport.send_log,
                mask_headers=masks,
            )
        # Local mode: the files stay under the state dir, next to the local payloads.
        return RequestLog(
            s.request_log, s.state_dir / "local" / "request-log" / name, mask_headers=masks
        )

    def _record(self, exchange: Exchange) -> None:
        """The one call per finished request, after its response went out: queued, and
        metered (then maybe logged) with the others that finish within METER_BATCH_DELAY.
        One pass over the meter's code and tables per batch instead of one per request
        between two requests' network code: measured in the product, metering took
        ~10.6 µs per request one at a time, against ~3 µs in a warm loop."""
        pending = self._unmetered
        pending.append(exchange)
        if len(pending) == 1:
            self._meter_timer = asyncio.get_running_loop().call_later(
                METER_BATCH_DELAY, self.meter_pending
            )
        elif len(pending) >= METER_BATCH_MAX:
            self.meter_pending()

    def meter_pending(self) -> None:
        """Meter every queued request now (readers of the meter call this first)."""
        if self._meter_timer is not None:
            self._meter_timer.cancel()
            self._meter_timer = None
        pending = self._unmetered
        if not pending:
            return
        self._unmetered = []
        record = self.meter.record
        request_log = self.request_log
        for exchange in pending:
            try:
                template, consumer = record(exchange)
                if exchange.log and request_log is not None:
                    request_log.add(exchange, template, consumer)
            except Exception:  # metering must never break proxying
                log.exception("metering a request failed")

    async def _meter_pending(self) -> None:
        self.meter_pending()

    def _startup_payload(self, instance_uuid: str) -> dict[str, Any]:
        s = self.settings
        if not isinstance(self.codec, HubCodec):
            from apitally_proxy.otlp.codec import startup_body

            known = frameworks.get(self.routes.framework)
            known = known or frameworks.from_setting(s.framework).framework
            framework = known.otlp_name if known is not None else None
            versions = {"python": platform.python_version(), "apitally-proxy": __version__}
            if s.app_version:
                versions["app"] = s.app_version
            # 1.x spells methods upper-case (the 0.x hub payload lower-case).
            paths = [
                {"method": p["method"].upper(), "path": p["path"]} for p in self.routes.paths()
            ]
            body = startup_body(framework, versions, paths, self._openapi)
            return self.codec.startup(str(uuid.uuid4()), body)
        known = frameworks.get(self.routes.framework)
        client_tag = known.client_tag if known is not None else s.client_tag
        return startup_payload(
            instance_uuid, self.routes.paths(), client_tag, s.app_version, self._openapi
        )

    async def _trim_heap(self) -> None:
        """After a sync: give back what building its payloads left in the C heap. On the
        loop thread, once per sync interval: about 0.25 ms (docs/performance.md)."""
        self.heap.trim()

    async def _save_learned_routes(self) -> None:
        """Before a sync: keep newly learned positions, and tell Apitally the new paths."""
        if not self.routes.learned_changed:
            return
        self.routes.learned_changed = False
        positions = self.routes.learner.learned_positions()
        try:
            await asyncio.to_thread(save_positions, self._learned_path, positions)
        except OSError as exc:
            log.warning("cannot save learned routes to %s (%s)", self._learned_path, exc)
        if self.routes.table is None:
            log.info("route parameters learned from traffic: %s", ", ".join(positions))
            self.sync.announce()

    def _routes_changed(self, route_set: RouteSet) -> None:
        """A new route set was compiled: use it, and re-announce if what the hub knows changed."""
        changed = self.routes.use_table(route_set.table, route_set.framework)
        if route_set.openapi != self._openapi:
            self._openapi = route_set.openapi
            changed = True
        if changed:
            self.sync.announce()

    def _endpoint(self) -> str | None:
        s = self.settings
        return {"hub": s.hub_url, "otlp": s.otlp_endpoint, "collector": s.collector_endpoint}.get(
            self.mode
        )

    def upstream_errors(self) -> dict[str, int]:
        """Failures to reach the upstream, by kind, over both servers."""
        errors = dict(self.proxy.upstream_errors)
        if self.lean is not None:
            for kind, n in self.lean.upstream_errors.items():
                errors[kind] = errors.get(kind, 0) + n
        return errors

    def _front_counts(self) -> tuple[int, int, int]:
        """(in flight, upstream retries, refused) over both servers."""
        proxy, lean = self.proxy, self.lean
        if lean is None:
            return proxy.in_flight, proxy.retries, proxy.refused
        return (
            proxy.in_flight + lean.in_flight,
            proxy.retries + lean.retries,
            proxy.refused + lean.refused,
        )

    def status(self) -> dict[str, Any]:
        """Live state for the admin endpoints (`status.WorkerStatus` as plain dicts)."""
        s = self.settings
        problem = s.export_problem or self.transport.last_error
        heuristics = self.routes.table is None
        in_flight, retries, refused = self._front_counts()
        self.meter_pending()
        return to_dict(
            WorkerStatus(
                version=__version__,
                upstream=str(s.upstream_target),
                listen=s.listen,
                worker_slot=self.lease.slot,
                instance_uuid=self.lease.uuid,
                uptime_s=round(time.time() - self.started_at, 1),
                requests_total=self.meter.recorded,
                requests_by_status=dict(self.meter.status_counts),
                unmatched=self.meter.unmatched,
                route_overflow=self.routes.overflow,
                routes=RoutesStatus(
                    source=self.discovery.source,
                    count=None if heuristics else len(self.routes.table or ()),
                    framework=self.routes.framework,
                    problem=self.discovery.last_error,
                    fetches=self.discovery.fetches,
                    learned_positions=self.routes.learner.learned,
                    templates_seen=self.routes.templates_seen if heuristics else None,
                ),
                consumer_overflow=self.meter.requests.consumer_overflow,
                validation_error_overflow=self.meter.validation_errors.overflow,
                route_override_overflow=self.meter.route_overrides.overflow,
                histogram_overflow=self.meter.histograms.overflow,
                histograms=self.meter.histograms.snapshot(),
                consumer_unconfirmed=self.identity.unconfirmed if self.identity else 0,
                in_flight=in_flight,
                upstream_errors=self.upstream_errors(),
                upstream_retries=retries,
                refused=refused,
                hub=ExportStatus(
                    mode=self.mode,
                    endpoint=self._endpoint(),
                    ok=problem is None and not self.sync.stopped,
                    problem=problem,
                    stopped=self.sync.stopped,
                    queued=self.sync.queued,
                    sent=self.sync.sent,
                    dropped_rejected=self.sync.dropped_rejected,
                    dropped_expired=self.sync.dropped_expired,
                    dropped_spool_full=self.sync.dropped_full,
                    unencodable=self.spool.unencodable,
                    spool_bytes=self.sync.spool_bytes,
                    recovered_after_crash=self.sync.recovered,
                    spool_dir=str(self.spool.directory),
                    last_sync=self.sync.last_sync,
                    last_success=self.transport.last_success,
                    local_file=str(getattr(self.transport, "path", "")) or None,
                ),
                recent_payloads=list(getattr(self.transport, "recent", [])),
                request_log=self.request_log.status() if self.request_log is not None else None,
            )
        )

    def dashboard_status(self) -> dict[str, Any]:
        """`status()` plus the last minutes of traffic (for the dashboard; not on /metrics)."""
        return {**self.status(), "recent": self.meter.recent.snapshot()}

    async def start(self, reuse_port: bool = False) -> None:
        """Start every part; if one fails, those already started stop again, in reverse."""
        async with contextlib.AsyncExitStack() as started:
            await self._start_proxy_server(started, reuse_port)
            self._start_publisher(started)
            await self._start_admin(started)
            if self.request_log is not None:
                await self.request_log.start()
                started.push_async_callback(self.request_log.close)
            # Traffic already flows; give the first route discovery a moment so the first
            # startup message carries the app's paths instead of a quick re-announce.
            self.discovery.start()
            started.push_async_callback(self.discovery.stop)
            await self.discovery.first_round(timeout=2.0)
            await self.sync.start()
            # The dashboard's window moves on by this timer: no clock read per request.
            self._background.start(self._advance_recent(), "recent-window")
            started.pop_all()  # all up: from here on, drain_and_stop stops them in order
        self.ready = True
        s = self.settings
        mode = {"hub": f"hub {s.hub_url}", "otlp": f"OTLP {s.otlp_endpoint}"}.get(self.mode) or (
            f"OTLP collector {s.collector_endpoint}"
            if self.mode == "collector"
            else f"local mode ({self.transport.path})"  # type: ignore[attr-defined]
        )
        log.info(
            "worker %d proxying %s -> %s (%s server), instance %s, %s",
            self.lease.slot,
            s.listen_address,
            s.upstream_target,
            s.server,
            self.lease.uuid,
            mode,
        )

    async def _advance_recent(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.meter_pending()  # the requests of the second that ends count in it
            self.meter.recent.advance()

    async def _start_proxy_server(
        self, started: contextlib.AsyncExitStack, reuse_port: bool
    ) -> None:
        s = self.settings
        addr = s.listen_address
        started.push_async_callback(self.proxy.close)
        if self.lean is not None:
            started.push_async_callback(self.lean.close)
            try:
                await self.lean.start(addr.host or None, addr.port, reuse_port=reuse_port)
            except OSError as exc:
                raise _listen_error(addr, exc) from None
            return
        server = _ProxyServer(
            self.proxy.handle,
            self.proxy.count_parser_refusal,
            handler_cancellation=True,  # a client that leaves cancels its handler (499)
            access_log=None,
            keepalive_timeout=s.client_keepalive,
            max_line_size=s.max_line_size,
            max_field_size=s.max_field_size,
            max_headers=s.max_headers,
        )
        runner = web.ServerRunner(
            # drain_and_stop cuts what outlives its deadline; aiohttp's own timeout (which
            # waits twice over) only backs that up.
            server,
            handle_signals=False,
            shutdown_timeout=s.shutdown_grace,
        )
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(
                runner, addr.host or None, addr.port, reuse_port=reuse_port, backlog=2048
            ).start()
        except OSError as exc:
            raise _listen_error(addr, exc) from None
        self._runner = runner

    def _start_publisher(self, started: contextlib.AsyncExitStack) -> None:
        s = self.settings
        if s.workers > 1 and self.slot > 0:
            # Worker 0 serves the admin endpoints for everyone from these files.
            status_dir = self.lease.path.parent
            self._publisher = StatusPublisher(
                status_path(status_dir, self.slot), self.dashboard_status
            )
            self._publisher.start()
            started.push_async_callback(self._publisher.stop)

    async def _start_admin(self, started: contextlib.AsyncExitStack) -> None:
        s = self.settings
        admin = s.admin_address
        if admin is None or self.slot != 0:
            return
        _warn_if_exposed(admin.host, s.admin_token is not None)
        status_dir = self.lease.path.parent
        status, dashboard = self.status, self.dashboard_status
        if s.workers > 1:

            def status() -> dict[str, Any]:
                return merged_status(self.status(), status_dir, s.workers)

            def dashboard() -> dict[str, Any]:
                return merged_status(self.dashboard_status(), status_dir, s.workers)

        runner = web.AppRunner(
            build_admin_app(
                status,
                lambda: self.ready,
                frozenset(s.admin_allowed_hosts),
                s.admin_token,
                dashboard,
                lambda: self.draining,
            ),
            access_log=None,
        )
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, admin.host or None, admin.port).start()
        except OSError as exc:
            # Another process would answer this proxy's health checks: refuse to run.
            raise ConfigError(
                f"cannot listen on admin address {admin} ({exc.strerror or exc}); set "
                "--admin-listen / APITALLY_PROXY_ADMIN_LISTEN to a free address, or `off`"
            ) from None
        self._admin_runner = runner

    async def drain_and_stop(self, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded), final sync.

        Not a plain reverse of `start`: the listener goes first (no new requests), the
        final sync only after the last request was counted, and the admin server last
        (probes keep answering). Setting `hurry` (a second signal) cuts the grace period
        short; the final payload is still spooled, and its delivery is abandoned.
        """
        self.ready = False
        self.draining = True
        loop = asyncio.get_running_loop()
        # One deadline for the whole drain: in-flight requests get the grace period but
        # its last part, which is kept for the final delivery; the exit comes before it.
        grace = self.settings.shutdown_grace
        deadline = loop.time() + grace - EXIT_MARGIN * min(1.0, grace)
        delivery = min(MAX_FINAL_DELIVERY, grace / 3)
        drained: asyncio.Future[None] | None = None
        if self.lean is not None:
            # Closes the listener and the idle connections, then waits for the rest.
            drained = asyncio.ensure_future(self.lean.stop_accepting())
        elif self._runner is not None:
            drained = asyncio.ensure_future(self._runner.cleanup())
        if drained is not None and not await wait_or_hurry(
            drained, deadline - delivery - loop.time(), hurry
        ):
            # WebSocket sessions run in the aiohttp proxy's handlers (on lean connections
            # too): it is told first that this is the drain's cut, not a client leaving.
            cut = self.proxy.cut_in_flight()
            if self.lean is not None:
                cut = self.lean.cut_in_flight()
            log.warning(
                "%d request(s) still running at the end of shutdown_grace (%.0f s): cut by "
                "shutdown, counted as 503",
                cut,
                grace,
            )
            await wait_or_hurry(drained, (deadline - loop.time()) / 2)
        if self.lean is not None and drained is not None and not drained.done():
            drained.cancel()  # only a wait: what is left is aborted by close() below
        await self._background.stop()
        await self.discovery.stop()
        if self.lean is not None:
            await self.lean.close()
        await self.proxy.close()
        self.meter_pending()  # every request counted before the final sync
        if self.request_log is not None:
            # Last upload attempt; what does not go out now is sent after the next start.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.request_log.deliver(), max(0.0, deadline - loop.time()) / 2
                )
        await self.sync.stop(final_sync_timeout=max(0.0, deadline - loop.time()), hurry=hurry)
        if self.request_log is not None:
            await self.request_log.close()
        if self._publisher is not None:
            await self._publisher.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self.lease.release()
        log.info("worker %d stopped", self.lease.slot)


class _RefusalCountingHandler(RequestHandler):
    """aiohttp's connection handler; requests its parser refused (a malformed head,
    smuggling-prone framing, oversize lines) are answered by it, and counted here."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        on_refusal = getattr(self._manager, "on_refusal", None)
        if on_refusal is not None:
            on_refusal(status)
        return super().handle_error(request, status, exc, message)


class _ProxyServer(web.Server):
    """aiohttp's low-level server with refusal counting (see `_RefusalCountingHandler`)."""

    def __init__(self, handler: Any, on_refusal: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.on_refusal = on_refusal

    def __call__(self) -> RequestHandler:
        return _RefusalCountingHandler(self, loop=self._loop, **self._kwargs)


def _listen_error(addr: Any, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot listen on {addr} ({exc.strerror or exc}); "
        "set --listen / APITALLY_PROXY_LISTEN to a free local address"
    )


def _warn_if_exposed(host: str, has_token: bool) -> None:
    """The admin server shows consumer ids and paths: say so when others can reach it."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return
    if has_token:
        log.info("admin server on %s (not loopback): admin_token required", host or "*")
        return
    log.warning(
        "the admin server listens on %s, not a loopback address: /metrics and /status "
        "(consumer ids, paths) are open to whoever reaches it; set admin_token / "
        "APITALLY_PROXY_ADMIN_TOKEN or bind --admin-listen to 127.0.0.1",
        host or "every interface",
    )


def _make_identity(settings: Settings) -> ConsumerIdentity | None:
    """The consumer_header identity, or None when the feature is off."""
    header = settings.consumer_header
    if header is None:
        return None
    try:
        salt = load_salt(settings.consumer_salt, settings.state_dir)
    except OSError as exc:
        raise ConfigError(
            f"cannot keep the consumer salt under {settings.state_dir} ({exc}); make the "
            "state dir writable or set APITALLY_PROXY_CONSUMER_SALT / `consumer_salt`"
        ) from None
    names: dict[str, tuple[str | None, str | None]] = {}
    if settings.consumer_map is not None:
        try:
            names = build_names(read_consumer_map(settings.consumer_map), salt)
        except ConsumerMapError as exc:
            raise ConfigError(f"APITALLY_PROXY_CONSUMER_MAP / `consumer_map`: {exc}") from None
    log.info(
        "consumers identified by the %s request header (salted hash; salt from %s), "
        "%d named in the consumer map",
        header,
        "consumer_salt" if settings.consumer_salt else settings.state_dir / "consumer-salt",
        len(names),
    )
    return ConsumerIdentity(header, salt, names)


async def serve(settings: Settings, slot: int = 0, reuse_port: bool = False) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    first_signal_at = 0.0

    def on_signal(signum: int) -> None:
        nonlocal first_signal_at
        now = time.monotonic()
        if not stop.is_set():
            log.info("%s received: draining", signal.Signals(signum).name)
            first_signal_at = now
            stop.set()
        elif now - first_signal_at >= SECOND_SIGNAL_AFTER:
            log.warning("second signal: skipping the grace period")
            hurry.set()
        # A second signal within moments is the same stop arriving twice (a process
        # group signalled as a whole, the supervisor forwarding it): not a hurry.

    try:
        worker = Worker(settings, slot)
    except OSError as exc:
        raise ConfigError(
            f"state dir {settings.state_dir} is not usable ({exc.strerror or exc}); set "
            "--state-dir / APITALLY_PROXY_STATE_DIR to a writable directory"
        ) from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await worker.start(reuse_port=reuse_port)
    except BaseException:
        worker.lease.release()
        raise
    # Start-up objects live for the whole process: keep the cyclic GC off them, and
    # collect less often (each request allocates many short-lived objects, almost
    # none in cycles), which measurably cuts CPU per request.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    await stop.wait()
    await worker.drain_and_stop(hurry)
    return 0
