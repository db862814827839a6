"""Request logging: one NDJSON line per request, in gzip files delivered at each sync.

The hot path only appends a tuple of references to a bounded in-memory buffer
(`add`). Everything that costs — masking, JSON, gzip, disk — runs on one
dedicated writer thread, fed once a second and before each upload. Files rotate
at about 1 MB compressed; at most `MAX_FILES` wait for delivery (the oldest are
deleted first). The hub answering 402 with Retry-After suspends logging for
that long and drops everything buffered. A full disk pauses logging (with a
warning); proxying never notices.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gzip
import logging
import os
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

import orjson

from apitally_proxy.aio import Background
from apitally_proxy.config import RequestLogSettings
from apitally_proxy.hub.transport import Outcome
from apitally_proxy.status import RequestLogStatus
from apitally_proxy.text import dumps_lenient

log = logging.getLogger("apitally_proxy.request_log")

MAX_BODY_SIZE = 50_000  # bytes, uncompressed; larger bodies are logged as BODY_TOO_LARGE
MAX_FILE_SIZE = 1_000_000  # bytes, compressed: rotation size
MAX_FILES = 50  # waiting files; the oldest are deleted first
MAX_UPLOADS_PER_SYNC = 10
MAX_BUFFERED_BODY_BYTES = 16 * 1024 * 1024  # bodies held in memory between flushes
FLUSH_INTERVAL = 1.0
DISK_FULL_PAUSE = 60.0
BODY_TOO_LARGE = b"<body too large>"
BODY_MASKED = b"<masked>"
MASKED = "******"
BODY_CONTENT_TYPES = (
    "application/json",
    "application/problem+json",
    "application/vnd.api+json",
    "text/plain",
)

# The official clients' built-in lists; patterns from the config file add to them.
EXCLUDE_PATHS = (
    r"/_?healthz?$",
    r"/_?health[\-_]?checks?$",
    r"/_?heart[\-_]?beats?$",
    r"/ping$",
    r"/ready$",
    r"/live$",
    r"/favicon(?:-[\w-]+)?\.(ico|png|svg)$",
    r"/apple-touch-icon(?:-[\w-]+)?\.png$",
    r"/robots\.txt$",
    r"/sitemap\.xml$",
    r"/manifest\.json$",
    r"/site\.webmanifest$",
    r"/service-worker\.js$",
    r"/sw\.js$",
    r"/\.well-known/",
)
EXCLUDE_USER_AGENTS = (
    r"health[\-_ ]?check",
    r"microsoft-azure-application-lb",
    r"googlehc",
    r"kube-probe",
)
MASK_QUERY_PARAMS = (r"auth", r"api-?key", r"secret", r"token", r"password", r"pwd")
MASK_HEADERS = (r"auth", r"api-?key", r"secret", r"token", r"cookie")
MASK_BODY_FIELDS = (
    r"password",
    r"pwd",
    r"token",
    r"secret",
    r"auth",
    r"card[\-_ ]number",
    r"ccv",
    r"ssn",
)
_FORWARDED_PROTO = frozenset(
    {"x-forwarded-proto", "x-forwarded-protocol", "x-forwarded-scheme", "x-url-scheme", "x-scheme"}
)
_JSON_WORD = re.compile(r"\bjson\b")


class Item(NamedTuple):
    """One finished request as the log keeps it: references only, taken on the hot path."""

    started_at: float  # wall clock
    method: str
    template: str | None
    url: str
    request_headers: Any  # CIMultiDictProxy, or None when not captured
    request_size: int | None
    consumer: str | None
    request_body: Any  # bytes, BODY_TOO_LARGE or None
    status: int
    response_time: float
    response_headers: Any
    response_size: int | None
    response_body: Any
    client_address: str | None


SendLog = Callable[[str, bytes], Awaitable[tuple[Outcome, float | None]]]
# OTLP mode: the writer thread hands items to this instead of writing files (returns how
# many it logged).
SpanSink = Callable[[Iterable[Item]], int]


def is_body_content_type(content_type: str | None) -> bool:
    """Bodies are logged only for these content types (as the official clients do)."""
    return content_type is not None and content_type.lower().startswith(BODY_CONTENT_TYPES)


class Matcher:
    """A case-insensitive search over several patterns, remembering recent answers."""

    def __init__(self, patterns: Iterable[str], cache_size: int = 1000) -> None:
        self._re = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        self._cache: dict[str, bool] = {}
        self._cache_size = cache_size

    def search(self, text: str) -> bool:
        """Whether any pattern occurs anywhere in `text` (uncached)."""
        return self._re.search(text) is not None

    def __call__(self, value: str) -> bool:
        hit = self._cache.get(value)
        if hit is None:
            hit = self._re.search(value) is not None
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[value] = hit
        return hit


class Masker:
    """Turns a buffered item into its log line: masks, omits empty values, serializes.

    Pure and thread-safe enough for one writer thread (the caches are per instance).
    """

    def __init__(self, config: RequestLogSettings, mask_headers: Iterable[str] = ()) -> None:
        self.config = config
        self.mask_query = Matcher([*config.mask_query_params, *MASK_QUERY_PARAMS])
        self.mask_header = Matcher([*config.mask_headers, *mask_headers, *MASK_HEADERS])
        self.mask_field = Matcher([*config.mask_body_fields, *MASK_BODY_FIELDS])

    def line(self, item: Item) -> bytes:
        req_headers, resp_headers = item.request_headers, item.response_headers
        cfg = self.config
        req_pairs = list(req_headers.items()) if req_headers is not None else []
        resp_pairs = list(resp_headers.items()) if resp_headers is not None else []
        url = self._url(item.url, req_pairs)
        request = {
            "timestamp": item.started_at,
            "method": item.method,
            "path": item.template,
            "url": url,
            "headers": self._headers(req_pairs) if cfg.log_request_headers else None,
            "size": item.request_size,
            "consumer": item.consumer,
            "body": self._body(item.request_body, req_pairs),
        }
        response = {
            "status_code": item.status,
            "response_time": item.response_time,
            "headers": self._headers(resp_pairs) if cfg.log_response_headers else None,
            "size": item.response_size,
            "body": self._body(item.response_body, resp_pairs),
        }
        line = {
            "uuid": str(uuid.uuid4()),
            "request": _skip_empty(request),
            "response": _skip_empty(response),
        }
        return dumps_lenient(line)[0]  # raw non-UTF-8 header bytes must not lose the line

    def _url(self, url: str, headers: list[tuple[str, str]]) -> str:
        if url.startswith("http://") and _is_https(headers):
            url = "https://" + url[len("http://") :]
        base, sep, query = url.partition("?")
        if not sep:
            return url
        if not self.config.log_query_params:
            return base
        pairs = parse_qsl(query)
        masked = urlencode([(k, MASKED if self.mask_query(k) else v) for k, v in pairs])
        return f"{base}?{masked}" if masked else base

    def _headers(self, pairs: list[tuple[str, str]]) -> list[list[str]]:
        return [[k, MASKED if self.mask_header(k) else v] for k, v in pairs]

    def _body(self, body: Any, headers: list[tuple[str, str]]) -> str | None:
        if body is None:
            return None
        if body is BODY_TOO_LARGE:
            return base64.b64encode(BODY_TOO_LARGE).decode()
        data = bytes(body)
        ctype = next((v.lower() for k, v in headers if k.lower() == "content-type"), None)
        if ctype is None or _JSON_WORD.search(ctype):
            try:
                data = orjson.dumps(self._mask_fields(orjson.loads(data)))
            except (orjson.JSONDecodeError, orjson.JSONEncodeError):
                # Not JSON we can mask (broken, non-UTF-8, too deep): keep it only when
                # nothing in it looks like a field that would have been masked.
                if ctype is not None and self.mask_field.search(data.decode(errors="replace")):
                    data = BODY_MASKED
        return base64.b64encode(data).decode()

    def _mask_fields(self, doc: Any) -> Any:
        """Mask string values of matching keys, at any depth (iterative: no recursion limit)."""
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(v, str):
                        if self.mask_field(k):
                            node[k] = MASKED
                    elif isinstance(v, (dict, list)):
                        stack.append(v)
            elif isinstance(node, list):
                stack.extend(v for v in node if isinstance(v, (dict, list)))
        return doc


def _is_https(headers: list[tuple[str, str]]) -> bool:
    for k, v in headers:
        name = k.lower()
        if name in _FORWARDED_PROTO:
            if v.split(",")[0].strip().lower() == "https":
                return True
        elif name == "forwarded":
            if "proto=https" in v.split(",")[0].lower():
                return True
        elif name in ("front-end-https", "x-forwarded-ssl") and v.lower() == "on":
            return True
    return False


def _skip_empty(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in data.items()
        if v is not None and not (isinstance(v, (list, dict, str, bytes)) and len(v) == 0)
    }


class _LogFile:
    """One gzip file being written: `<uuid>.ndjson.gz.part` until rotated."""

    def __init__(self, directory: Path) -> None:
        self.uuid = str(uuid.uuid4())
        self.path = directory / f"{self.uuid}.ndjson.gz.part"
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6)

    @property
    def compressed_size(self) -> int:
        return self._raw.tell()

    def write(self, data: bytes) -> None:
        self._gz.write(data)

    def close(self) -> Path:
        """Finish the gzip stream; the file gets its final name."""
        self._gz.close()
        self._raw.close()
        final = self.path.with_name(f"{self.uuid}.ndjson.gz")
        os.replace(self.path, final)
        return final

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._gz.close()
        with contextlib.suppress(Exception):
            self._raw.close()
        self.path.unlink(missing_ok=True)


class RequestLog:
    """Owns the request-log buffer, the writer thread, the files and their delivery.

    `send` posts one file to the hub; None (local mode) keeps the files under
    `directory` instead, the newest MAX_FILES of them. `mask_headers` are patterns
    always masked on top of the configured and built-in ones (the consumer header).
    """

    def __init__(
        self,
        config: RequestLogSettings,
        directory: Path,
        send: SendLog | None = None,
        max_buffered: int | None = None,
        mask_headers: Iterable[str] = (),
        spans: SpanSink | None = None,
    ) -> None:
        self.config = config
        self.directory = directory
        self._send = send
        self._spans = spans
        self._sample_rate = config.sample_rate
        self._masker = Masker(config, mask_headers)
        self._exclude_path = Matcher([*config.exclude_paths, *EXCLUDE_PATHS])
        self._exclude_agent = Matcher([*config.exclude_user_agents, *EXCLUDE_USER_AGENTS])
        self._buffer: deque[Item] = deque()
        self._max_buffered = max_buffered or config.max_buffered_requests
        self._buffered_bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-log")
        self._file: _LogFile | None = None
        self._files: deque[Path] = deque()  # rotated, waiting for delivery (oldest first)
        self._background = Background()
        self._deliver_lock = asyncio.Lock()
        self.suspended_until: float | None = None  # 402 from the hub
        self.paused_until: float | None = None  # disk trouble
        self.logged = 0
        self.dropped = 0  # buffer full
        self.files_sent = 0
        self.files_dropped = 0
        self.last_error: str | None = None

    # Hot path (event loop): cheap checks and one append.

    @property
    def accepting(self) -> bool:
        now = None
        if self.suspended_until is not None:
            now = time.time()
            if now < self.suspended_until:
                return False
            self.suspended_until = None
            log.info("request logging resumed after the hub's Retry-After")
        if self.paused_until is not None:
            if (now or time.time()) < self.paused_until:
                return False
            self.paused_until = None
        return True

    def wants(self, method: str, path: str, user_agent: str | None) -> bool:
        """Whether this request is to be logged at all (decided before it is forwarded)."""
        if method == "OPTIONS" or not self.accepting:
            return False
        if self._sample_rate < 1.0 and random.random() >= self._sample_rate:
            return False  # sampled out of the log; metering counts it all the same
        if self._exclude_path(path.partition("?")[0]):
            return False
        return not (user_agent is not None and self._exclude_agent(user_agent))

    def add(self, ex: Any, template: str | None, consumer: str | None) -> None:
        """Buffer one finished exchange with the template and consumer metering counted
        it under (references only; the writer thread does the rest)."""
        if not self.accepting:
            return
        if len(self._buffer) >= self._max_buffered:
            self.dropped += 1
            return
        req_body = _captured(ex.request_body)
        resp_body = _captured(ex.response_body)
        size = (len(req_body) if req_body is not None else 0) + (
            len(resp_body) if resp_body is not None else 0
        )
        if self._buffered_bytes + size > MAX_BUFFERED_BODY_BYTES:
            self.dropped += 1
            return
        self._buffered_bytes += size
        self._buffer.append(
            Item(
                ex.started_at,
                ex.method,
                template,
                ex.request_url,
                ex.request_headers,
                ex.request_size,
                consumer,
                req_body,
                ex.status,
                ex.response_time,
                ex.response_headers,
                ex.response_size,
                resp_body,
                ex.client_address,
            )
        )

    # Background work (event loop side).

    async def start(self) -> None:
        """Adopt files a previous run left, then flush the buffer every second."""
        await self._io(self._adopt)
        self._background.start(self._run(), "request-log")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                log.exception("writing request logs failed")

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def flush(self) -> None:
        """Hand the buffered items to the writer thread."""
        if not self._buffer:
            return
        items, self._buffer = self._buffer, deque()
        self._buffered_bytes = 0
        await self._io(self._write, items)

    async def deliver(self) -> None:
        """After-sync hook: close the current file and deliver up to MAX_UPLOADS_PER_SYNC files."""
        # The sync loop's hook and the shutdown's last attempt can overlap; without
        # the lock both would upload the same file.
        async with self._deliver_lock:
            await self._deliver()

    async def _deliver(self) -> None:
        await self.flush()
        if self._spans is not None:
            return  # spans went to the spool: the export loop delivers them
        await self._io(self._rotate)
        if self._send is None:
            return
        for _ in range(MAX_UPLOADS_PER_SYNC):
            if not self._files or self.suspended_until is not None:
                return
            path = self._files[0]
            try:
                body = await self._io(path.read_bytes)
            except OSError as exc:
                log.warning("request log file %s unreadable (%s); dropped", path, exc)
                self._forget(path)
                self.files_dropped += 1
                continue
            file_uuid = path.name.split(".", 1)[0]
            outcome, retry_after = await self._send(file_uuid, body)
            if outcome is Outcome.SUSPEND:
                await self._suspend(retry_after or 0.0)
                return
            if outcome is Outcome.RETRY:
                return  # this file and the rest go out at the next sync
            if outcome is Outcome.STOP:
                return  # the sync loop stops too; files stay on disk
            self._forget(path)
            await self._io(_unlink, path)
            if outcome is Outcome.ACCEPTED:
                self.files_sent += 1
            else:
                self.files_dropped += 1

    async def _suspend(self, seconds: float) -> None:
        self.suspended_until = time.time() + seconds
        log.warning(
            "the hub answered 402 to a request log upload: request logging suspended for %.0f s "
            "and buffered logs dropped",
            seconds,
        )
        self._buffer.clear()
        self._buffered_bytes = 0
        await self._io(self._drop_all)

    async def close(self) -> None:
        """Stop the flush task; write what is buffered and close the current file."""
        await self._background.stop()
        try:
            await self.flush()
            await self._io(self._rotate)
        finally:
            self._executor.shutdown(wait=True)

    def status(self) -> RequestLogStatus:
        return RequestLogStatus(
            directory=str(self.directory),
            buffered=len(self._buffer),
            logged=self.logged,
            dropped=self.dropped,
            waiting_files=len(self._files),
            files_sent=self.files_sent,
            files_dropped=self.files_dropped,
            suspended_until=self.suspended_until,
            paused_until=self.paused_until,
            last_error=self.last_error,
        )

    # Writer thread only.

    def _adopt(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for part in self.directory.glob("*.ndjson.gz.part"):
            part.unlink(missing_ok=True)  # cut off mid-write by a crash: not a valid gzip
        done = sorted(self.directory.glob("*.ndjson.gz"), key=_mtime)
        self._files.extend(done)
        self._prune()

    def _write(self, items: Iterable[Item]) -> None:
        if self._spans is not None:
            try:
                self.logged += self._spans(items)
            except OSError as exc:  # the spool's disk
                self._disk_trouble(exc)
            return
        try:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._file = _LogFile(self.directory)
            f = self._file
            for item in items:
                try:
                    line = self._masker.line(item)
                except Exception:  # one odd request must not lose the batch
                    log.exception("building a request log line failed")
                    continue
                f.write(line + b"\n")
                self.logged += 1
            if f.compressed_size > MAX_FILE_SIZE:
                self._rotate()
        except OSError as exc:
            self._disk_trouble(exc)

    def _disk_trouble(self, exc: OSError) -> None:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        self.last_error = f"writing request logs to {self.directory} failed: {exc}"
        log.warning(
            "%s; request logging paused for %.0f s%s (proxying continues)",
            self.last_error,
            DISK_FULL_PAUSE,
            " (disk full)" if full else "",
        )
        self.paused_until = time.time() + DISK_FULL_PAUSE
        if self._file is not None:
            self._file.discard()
            self._file = None

    def _forget(self, path: Path) -> None:
        # By identity, not position: the writer thread may have rotated or pruned
        # the queue while this file was being uploaded.
        with contextlib.suppress(ValueError):
            self._files.remove(path)

    def _rotate(self) -> None:
        f = self._file
        if f is None:
            return
        self._file = None
        try:
            self._files.append(f.close())
        except OSError as exc:
            f.discard()
            self._disk_trouble(exc)
            return
        self._prune()

    def _prune(self) -> None:
        while len(self._files) > MAX_FILES:
            _unlink(self._files.popleft())
            self.files_dropped += 1

    def _drop_all(self) -> None:
        if self._file is not None:
            self._file.discard()
            self._file = None
        while self._files:
            _unlink(self._files.popleft())
            self.files_dropped += 1


def _captured(capture: Any) -> Any:
    """The logged form of a BodyCapture: None, BODY_TOO_LARGE, or the bytes copied."""
    if capture is None:
        return None
    if capture.overflow or len(capture.data) > MAX_BODY_SIZE:
        return BODY_TOO_LARGE
    return capture.data


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
