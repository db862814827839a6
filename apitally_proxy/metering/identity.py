"""Consumers without app changes: a salted hash of a request header the operator names.

The credential itself (an API key, a bearer token) is never stored: what the hub,
the request log and the disk see is `HMAC-SHA256(salt, credential)`, first 16
hex characters. The salt comes from the `consumer_salt` setting or, when unset,
from a file created once under the state dir (mode 0600), so every worker and
every restart on that state dir computes the same identifiers.

Hot path: one header lookup and one dict lookup per request. Results are cached
in a bounded in-memory dict keyed by the raw header value. That keeps raw
credentials in process memory for as long as they stay cached, which the
request headers already do while a request is in flight; it is never written
anywhere, and caching by the raw value is what makes a hit cost a dict lookup
instead of an HMAC. Values longer than MAX_CACHED_VALUE are hashed every time,
so hostile headers cannot make the cache big.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apitally_proxy.config import MIN_SALT_LENGTH
from apitally_proxy.metering.consumers import MAX_NAME, Consumer

ID_LENGTH = 16  # hex characters of the HMAC kept as the identifier (64 bits)
SALT_FILE = "consumer-salt"
CACHE_SIZE = 4096
# Identifiers the app has accepted (answered below 400) at least once; bounded, oldest out.
MAX_CONFIRMED = 20_000
REFUSED = frozenset({401, 403})  # the app refused the credential: nobody's requests
MAX_CACHED_VALUE = 512  # characters; longer values are hashed on every request
_BARE_SCHEMES = frozenset({"basic", "bearer", "digest", "token", "apikey", "api-key"})
_HEX_ID = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")


class ConsumerMapError(ValueError):
    """The consumer map file is unreadable or malformed; the message says where."""


def hash_credential(salt: bytes, credential: str) -> str:
    """The consumer identifier for one credential: a salted HMAC-SHA256 prefix."""
    digest = hmac.new(salt, credential.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return digest.hexdigest()[:ID_LENGTH]


def credential_of(header: str, value: str) -> str | None:
    """The secret part of a header value: for Authorization, what follows the scheme."""
    value = value.strip()
    if header in ("authorization", "proxy-authorization"):
        # `Bearer <token>`, `Basic <b64>`, `ApiKey <key>`; a bare value is taken whole.
        scheme, sep, rest = value.partition(" ")
        if sep:
            value = rest.strip()
        elif scheme.lower() in _BARE_SCHEMES:
            return None  # a scheme without credentials
    return value or None


def load_salt(configured: str | None, state_dir: Path) -> bytes:
    """The salt: the setting if given, else the state dir's salt file (created once, 0600).

    Workers starting together race to create the file; the loser reads the winner's
    salt, so every worker on a state dir hashes alike. Raises OSError on I/O trouble.
    """
    if configured:
        return configured.encode()
    path = state_dir / SALT_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_salt(path)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SALT_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another worker got there first: never replace a salt in use.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_salt(path)


def _read_salt(path: Path) -> bytes:
    salt = path.read_bytes().strip()
    if len(salt) < MIN_SALT_LENGTH:
        raise OSError(f"salt file {path} is shorter than {MIN_SALT_LENGTH} characters")
    return salt


def read_consumer_map(path: str | Path) -> list[dict[str, str]]:
    """Read and check a consumer map file (TOML or JSON); entries as written.

    Each entry has exactly one of `id` (a 16-hex identifier, as the dashboard
    shows) or `key` (the raw credential, hashed at load), and `name` and/or `group`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConsumerMapError(f"file {path} does not exist") from None
    except OSError as exc:
        raise ConsumerMapError(f"file {path} is unreadable ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() == ".json":
            doc: Any = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConsumerMapError(f"file {path} is not UTF-8") from None
    except ValueError as exc:
        # Both parsers report a position, never the text around it (which could be a key).
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConsumerMapError(f"file {path} is not valid {kind}: {exc}") from None
    entries = doc.get("consumer") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise ConsumerMapError(
            f"file {path} needs a list of entries: [[consumer]] tables in TOML, "
            'or {"consumer": [...]} in JSON'
        )
    out = []
    for n, entry in enumerate(entries, 1):
        out.append(_check_entry(path, n, entry))
    return out


def _check_entry(path: Path, n: int, entry: Any) -> dict[str, str]:
    where = f"file {path} entry {n}"
    if not isinstance(entry, dict):
        raise ConsumerMapError(f"{where} is not a table/object")
    unknown = set(entry) - {"id", "key", "name", "group"}
    if unknown:
        raise ConsumerMapError(f"{where} has unknown fields {sorted(unknown)}")
    if not all(isinstance(v, str) for v in entry.values()):
        raise ConsumerMapError(f"{where}: every value must be a string")
    if ("id" in entry) == ("key" in entry):
        raise ConsumerMapError(f"{where} needs exactly one of `id` (hashed) or `key` (raw)")
    if "id" in entry and not _HEX_ID.match(entry["id"]):
        raise ConsumerMapError(f"{where}: id {entry['id']!r} is not {ID_LENGTH} lowercase hex")
    if "key" in entry and not entry["key"].strip():
        raise ConsumerMapError(f"{where}: key is empty")
    if not entry.get("name", "").strip() and not entry.get("group", "").strip():
        raise ConsumerMapError(f"{where} needs a name or a group")
    for field in ("name", "group"):
        if len(entry.get(field, "")) > MAX_NAME:
            raise ConsumerMapError(f"{where}: {field} is longer than {MAX_NAME} characters")
    return entry


def build_names(
    entries: list[dict[str, str]], salt: bytes
) -> dict[str, tuple[str | None, str | None]]:
    """identifier → (name, group); raw keys are hashed here and not kept."""
    names: dict[str, tuple[str | None, str | None]] = {}
    for entry in entries:
        key = entry.get("key")
        ident = hash_credential(salt, key.strip()) if key is not None else entry["id"]
        name = entry.get("name", "").strip() or None
        group = entry.get("group", "").strip() or None
        names[ident] = (name, group)
    return names


class ConsumerIdentity:
    """Request header → Consumer (hashed identifier, name/group from the map)."""

    def __init__(
        self,
        header: str,
        salt: bytes,
        names: Mapping[str, tuple[str | None, str | None]] | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.header = header
        self._lname = header.lower()
        # A keyed HMAC copied per credential skips the key schedule (~0.4 µs a miss).
        self._keyed = hmac.new(salt, digestmod=hashlib.sha256)
        self._names = dict(names or {})
        self._cache: dict[str, Consumer | None] = {}
        self._cache_size = cache_size
        self._confirmed: dict[str, None] = {}
        self.unconfirmed = 0  # requests whose key the app never accepted: no consumer

    def vouched(self, identifier: str, status: int) -> bool:
        """Whether a request answered `status` counts under the identifier of its key.

        A key counts once the app accepted it (a status below 400); after that its other
        4xx are still its consumer's, but a refusal (401, 403) never is. Random keys a
        scanner sends are refused or answered 404 and so never take one of the
        `max_consumers` slots from a real consumer.
        """
        confirmed = self._confirmed
        if status < 400:
            if identifier not in confirmed:
                if len(confirmed) >= MAX_CONFIRMED:
                    del confirmed[next(iter(confirmed))]
                confirmed[identifier] = None
            return True
        if status not in REFUSED and identifier in confirmed:
            return True
        self.unconfirmed += 1
        return False

    def identify(self, headers: Mapping[str, str]) -> Consumer | None:
        """The consumer for these request headers, or None without a usable credential."""
        value = headers.get(self.header)
        if value is None:
            return None
        cache = self._cache
        consumer = cache.get(value, _MISS)
        if consumer is not _MISS:
            return consumer
        consumer = self._compute(value)
        if len(value) <= MAX_CACHED_VALUE:
            if len(cache) >= self._cache_size:
                # Evict the oldest entry (insertion order): bounded, O(1).
                del cache[next(iter(cache))]
            cache[value] = consumer
        return consumer

    def _compute(self, value: str) -> Consumer | None:
        credential = credential_of(self._lname, value)
        if credential is None:
            return None
        mac = self._keyed.copy()
        mac.update(credential.encode("utf-8", "surrogateescape"))
        ident = mac.hexdigest()[:ID_LENGTH]
        name, group = self._names.get(ident, (None, None))
        return Consumer(ident, name, group)


_MISS: Any = object()
