"""Validation errors read from the app's own error responses, as the official clients read them.

The proxy sees only the response, so it reads what each framework puts in its
validation error body (the official clients do the same from inside the app).
Which statuses, body limits and shape each framework has is in its registry
entry (frameworks.py: `Framework.validation`); the shapes are read here:

- Starlette / FastAPI (pydantic): 422, `{"detail": [{"loc", "msg", "type"}, ...]}`.
- Litestar: 400, `{"detail": "...validation...", "extra": [{"key", "message", "source"}]}`,
  only for bodies under 4096 bytes.
- Fastify: 400 or 422, `{"code": "FST_ERR_VALIDATION" | absent, "message": "<AJV errors>"}`;
  each `body/x …`, `querystring/x …` part of the message is one error.
- Django Ninja: 422, the same pydantic `detail` list as FastAPI (no body limit).
- Express: 400 or 422, express-validator `{"errors": [{"location", "path", "msg", "type"}]}`,
  celebrate `{"validation": {"body": {"source", "keys", "message"}}}` or NestJS
  `{"message": ["..."]}`.

Everything here is pure and synchronous; a malformed body yields no errors.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from apitally_proxy import frameworks
from apitally_proxy.frameworks import VALIDATION_STATUSES, Framework, Validation

# The proxy copies at most this much of an error response while it streams on.
MAX_ERROR_BODY = 64 * 1024

Loc = tuple[str, ...]
ErrorItem = tuple[Loc, Any, Any]  # (loc, msg, type)
ErrorKey = tuple[str | None, str, str, Loc, Any, Any]

# What the official Fastify plugin matches: a location like `body/name` or
# `querystring.limit` at the start of the message or after ", ", followed by a space.
_AJV_LOCATION = re.compile(
    r"(?:^|(?<=, ))((?:headers|params|query|querystring|body)[/.][^ ]+)(?= )"
)
_AJV_SPLIT = re.compile(r"[/.]")


def readers(framework: Framework | str | None, guess: bool = True) -> tuple[Validation, ...]:
    """The error-body rules the official client of `framework` applies.

    `framework` None is an unknown app: every known shape when `guess`, none otherwise.
    A string is a settings value (a name, "auto" or "none"), read by frameworks.from_setting.
    """
    if isinstance(framework, str):
        choice = frameworks.from_setting(framework)
        framework, guess = choice.framework, choice.guess
    if framework is not None:
        return (framework.validation,) if framework.validation is not None else ()
    return frameworks.EVERY_VALIDATION if guess else ()


def wants_error_body(
    framework: Framework | str | None, status: int, content_type: str | None, guess: bool = True
) -> bool:
    """Whether a response may carry validation errors worth copying (cheap header check)."""
    if status not in VALIDATION_STATUSES or not content_type or "json" not in content_type.lower():
        return False
    return any(status in v.statuses for v in readers(framework, guess))


def _decode(body: bytes, content_encoding: str | None) -> Any:
    if content_encoding is not None and content_encoding.strip().lower() == "gzip":
        try:
            # Bounded: a tiny gzip bomb must not expand into memory.
            d = zlib.decompressobj(wbits=31)
            body = d.decompress(body, MAX_ERROR_BODY * 4)
        except zlib.error:
            pass  # the official clients fall back to the raw bytes too
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def starlette_errors(body: Any) -> list[ErrorItem]:
    """FastAPI / Starlette+pydantic: the `detail` list of a 422."""
    if not isinstance(body, dict) or not isinstance(body.get("detail"), list):
        return []
    out: list[ErrorItem] = []
    for error in body["detail"]:
        if not isinstance(error, dict) or not {"loc", "msg", "type"} <= error.keys():
            continue
        loc, msg, typ = error["loc"], error["msg"], error["type"]
        # The official client does tuple(str(x) for x in loc); non-iterables are skipped.
        if not isinstance(loc, (list, str, dict)) or not _scalar(msg) or not _scalar(typ):
            continue
        out.append((tuple(_loc_part(x) for x in loc), msg, typ))
    return out


def _loc_part(value: Any) -> str:
    # str() of a JSON value the way Python prints it (True, None, 1.5, ...).
    return value if isinstance(value, str) else str(value)


def litestar_errors(body: Any) -> list[ErrorItem]:
    """Litestar: a 400 whose `detail` mentions validation and whose `extra` lists the errors."""
    if not isinstance(body, dict):
        return []
    detail, extra = body.get("detail"), body.get("extra")
    if not isinstance(detail, str) or "validation" not in detail.lower():
        return []
    if not isinstance(extra, list):
        return []
    out: list[ErrorItem] = []
    for error in extra:
        if not isinstance(error, dict) or "key" not in error or "message" not in error:
            continue
        key, msg = error["key"], error["message"]
        if not isinstance(key, str) or not _scalar(msg):
            continue
        source = error.get("source", "body")
        out.append(((_loc_part(source), *key.split(".")), msg, ""))
    return out


def fastify_errors(body: Any) -> list[ErrorItem]:
    """Fastify: one error per AJV location found in `message`."""
    if not isinstance(body, dict):
        return []
    message = body.get("message")
    code = body.get("code")
    # The JS client accepts any falsy code, like an absent one.
    if not isinstance(message, str) or (code and code != "FST_ERR_VALIDATION"):
        return []
    matches = list(_AJV_LOCATION.finditer(message))
    out: list[ErrorItem] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() - 2 if i + 1 < len(matches) else len(message)
        parts = _AJV_SPLIT.split(m.group(1))
        if parts[0] == "querystring":
            parts[0] = "query"
        # The JS client joins with "." and splits again, dropping empty parts.
        loc = tuple(p for p in parts if p)
        out.append((loc, message[m.start() : end], ""))
    return out


def express_errors(body: Any) -> list[ErrorItem]:
    """Express: express-validator's `errors`, celebrate's `validation` or NestJS's `message`
    list, whichever finds errors first (the npm client's three readers, in its order)."""
    if not isinstance(body, dict):
        return []
    return _express_validator(body) or _celebrate(body) or _nest(body)


def _js_loc(text: str) -> Loc:
    # The JS client joins location parts with "." and splits again, dropping empty parts.
    return tuple(p for p in text.split(".") if p)


def _truthy(value: Any) -> bool:
    return value is not None and value is not False and value != "" and value != 0


def _express_validator(body: dict[str, Any]) -> list[ErrorItem]:
    errors = body.get("errors")
    if not isinstance(errors, list):
        return []
    out: list[ErrorItem] = []
    for e in errors:
        if not isinstance(e, dict):
            continue
        location, path, msg, typ = e.get("location"), e.get("path"), e.get("msg"), e.get("type")
        if not all(_truthy(v) for v in (location, path, msg, typ)):
            continue
        # (A `msg` that is no string breaks the JS client's counter: it counts nothing.)
        if not (_scalar(location) and _scalar(path) and isinstance(msg, str) and _scalar(typ)):
            continue
        out.append((_js_loc(f"{_js_str(location)}.{_js_str(path)}"), msg, typ))
    return out


def _celebrate(body: dict[str, Any]) -> list[ErrorItem]:
    validation = body.get("validation")
    if not isinstance(validation, dict):
        return []
    out: list[ErrorItem] = []
    for e in validation.values():
        if not isinstance(e, dict):
            continue
        source, keys, message = e.get("source"), e.get("keys"), e.get("message")
        if not (_truthy(source) and isinstance(keys, list) and isinstance(message, str)):
            continue
        if not message or not _scalar(source):
            continue
        for key in keys:
            if not _scalar(key):
                continue
            name = _js_str(key)
            # The message's sentence naming the key, else the whole message.
            part = next((m for m in message.split(". ") if f'"{name}"' in m), message)
            out.append((_js_loc(f"{_js_str(source)}.{name}"), part, ""))
    return out


def _nest(body: dict[str, Any]) -> list[ErrorItem]:
    messages = body.get("message")
    if not isinstance(messages, list):
        return []
    return [((), m, "") for m in messages if isinstance(m, str)]


def _js_str(value: Any) -> str:
    """String(value) as JavaScript writes a JSON scalar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# The body shapes a registry entry's `Validation.parser` names.
PARSERS: dict[str, Callable[[Any], list[ErrorItem]]] = {
    "pydantic": starlette_errors,
    "detail-extra": litestar_errors,
    "ajv": fastify_errors,
    "express": express_errors,
}


def extract_validation_errors(
    framework: Framework | str | None,
    status: int,
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
    guess: bool = True,
) -> list[ErrorItem]:
    """The validation errors the official client for `framework` would read from this response.

    An unknown framework (None, or the setting "auto") tries every known shape in
    registry order; the first that finds errors wins (the shapes do not overlap).
    """
    if not wants_error_body(framework, status, content_type, guess) or not body:
        return []
    if len(body) > MAX_ERROR_BODY:
        return []
    is_json = (content_type or "").lower().startswith("application/json")
    usable = [
        v
        for v in readers(framework, guess)
        if status in v.statuses
        and (is_json or not v.json_only)
        and (v.max_body is None or len(body) <= v.max_body)
    ]
    if not usable:
        return []
    data = _decode(body, content_encoding)
    if data is None:
        return []
    for v in usable:
        found = PARSERS[v.parser](data)
        if found:
            return found
    return []


class ValidationErrorCounter:
    """Counts validation errors by (consumer, method, path, loc, msg, type).

    Bounded: past `max_keys` distinct errors per interval, new ones are dropped
    and counted in `overflow` (an app echoing input into `msg` cannot grow memory).
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        self._counts: dict[ErrorKey, int] = {}
        self._max_keys = max_keys
        self.overflow = 0

    def add_validation_errors(
        self, consumer: str | None, method: str, path: str, errors: list[ErrorItem]
    ) -> None:
        method = method.upper()
        counts = self._counts
        for loc, msg, typ in errors:
            key = (consumer, method, path, loc, msg, typ)
            n = counts.get(key)
            if n is None and len(counts) >= self._max_keys:
                self.overflow += 1
                continue
            counts[key] = (n or 0) + 1

    def rename_paths(self, renames: dict[str, str]) -> None:
        """Re-key the open interval by renamed templates, adding counts that meet."""
        merged: dict[ErrorKey, int] = {}
        for (consumer, method, path, loc, msg, typ), n in self._counts.items():
            key = (consumer, method, renames.get(path, path), loc, msg, typ)
            merged[key] = merged.get(key, 0) + n
        self._counts = merged

    def peek_validation_errors(self) -> list[dict[str, Any]]:
        """The rows so far, leaving the counter as it is (for checkpoints)."""
        return self._rows(self._counts)

    def get_and_reset_validation_errors(self) -> list[dict[str, Any]]:
        """The `validation_errors` list of a sync payload; the counter starts empty again."""
        counts, self._counts = self._counts, {}
        return self._rows(counts)

    def iter_validation_errors(self) -> Iterator[dict[str, Any]]:
        """The rows so far, one at a time (read to the end before the counter changes)."""
        return (_row(key, n) for key, n in self._counts.items())

    def take_validation_errors(self) -> Iterator[dict[str, Any]]:
        """The interval's rows, one at a time; the counter starts empty again now."""
        counts, self._counts = self._counts, {}
        return (_row(key, n) for key, n in counts.items())

    @staticmethod
    def _rows(counts: dict[ErrorKey, int]) -> list[dict[str, Any]]:
        return [_row(key, n) for key, n in counts.items()]


def _row(key: ErrorKey, n: int) -> dict[str, Any]:
    consumer, method, path, loc, msg, typ = key
    return {
        "consumer": consumer,
        "method": method,
        "path": path,
        "loc": list(loc),
        "msg": msg,
        "type": typ,
        "error_count": n,
    }
