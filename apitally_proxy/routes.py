"""Path → route template.

Two ways to get there:

- A known route set (the app's OpenAPI document, or routes declared in the
  config file) compiled into a `RouteTable`: a segment trie walked once per
  request. Literal segments beat parameters, a path that matches no route is
  `None` (not counted, like the official clients).
- Without any route source, heuristics: id-like segments (integers, UUIDs, long
  hex, ULIDs, ids of mixed shape, e-mail-like and dotted values) become
  parameters, so `/items/42` and `/items/43` are one endpoint, and positions
  where many distinct words appear are learned as parameters (`learning.py`).
  A per-method cap on distinct templates keeps hostile random paths from
  growing memory: past it, paths go to one overflow bucket, and the overflow is
  counted.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from apitally_proxy import frameworks
from apitally_proxy.frameworks import OPENAPI_SPELLING, MatchRules, Spelling
from apitally_proxy.learning import TemplateLearner
from apitally_proxy.text import header_text, strip_controls

OVERFLOW_TEMPLATE = "/{overflow}"
MAX_PATH_LENGTH = 2048
MAX_SEGMENTS = 32
# A route table larger than this is cut (with a warning by whoever builds it):
# real apps have hundreds of routes, not tens of thousands.
MAX_ROUTES = 5000
MAX_TEMPLATE_LENGTH = 1024

METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE")

_ID_SEGMENT = re.compile(
    r"""
    -?\d+(\.\d+)?                                                   # integer / decimal
    | [0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}  # UUID
    | [0-9a-fA-F]{16,}                                              # long hex (hashes, object ids)
    | [0-9A-HJKMNP-TV-Z]{26}                                        # ULID
    # long token mixing letters and digits (base64url too)
    | (?=[A-Za-z_\-]*\d)(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{20,}
    # ids of mixed shape: a short prefix and a number (u-1, ord_77, u42), three or more
    # parts with a digit (ord-2024-0001), or parts mixing letters and digits (cus_9s8d7f)
    | [A-Za-z]{1,4}[-_]\d+ | [A-Za-z]{1,3}\d{2,}
    | (?=[^/]*\d)[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+){2,}
    | (?=[^/]*(?:[A-Za-z]\d|\d[A-Za-z]))[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)+
    | (?=[^/]*\d)(?=[^/]*[A-Z])(?=[^/]*[a-z])[A-Za-z0-9_\-]{10,}   # mixed-case token
    | [^/@\s]+@[^/@\s]+\.[^/@\s]+                                  # e-mail-like
    # dotted values (john.doe, 1.2.3, example.com), but not file names (openapi.json)
    | [A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+){2,}
    | [A-Za-z0-9_\-]+\.(?!(?:json|html?|xml|txt|ya?ml|js|css|png|jpe?g|gif|svg|ico|csv|pdf
        |php|gz|zip|map|md)$)[A-Za-z0-9_\-]+
    | [^/]*%[0-9a-fA-F]{2}[^/]*                                     # percent-encoded values
    """,
    re.VERBOSE,
)


def template_segments(path: str) -> str:
    """Replace id-like segments of a path with `{id}` parameters (pure, uncached)."""
    if len(path) > MAX_PATH_LENGTH:
        path = path[:MAX_PATH_LENGTH]
    segments = path.split("/")
    if len(segments) > MAX_SEGMENTS + 1:
        segments = [*segments[:MAX_SEGMENTS], "{rest}"]
    n = 0
    for i, seg in enumerate(segments):
        if seg and _ID_SEGMENT.fullmatch(seg):
            n += 1
            segments[i] = "{id}" if n == 1 else f"{{id{n}}}"
    return "/".join(segments) or "/"


# --- Templates in any framework's spelling ---------------------------------

# Canonical parameter kinds, and what each framework's converter names mean.
_KIND_ALIASES = {
    "str": "str",
    "string": "str",
    "default": "str",
    "int": "int",
    "integer": "int",
    "float": "float",
    "number": "float",
    "decimal": "float",
    "uuid": "uuid",
    "path": "path",
}

# What a typed parameter accepts, as the routers check it before calling the app.
_KIND_CHECKS: dict[str, Callable[[str], bool]] = {
    "int": re.compile(r"-?[0-9]+").fullmatch,  # type: ignore[dict-item]
    "float": re.compile(r"-?[0-9]+(\.[0-9]+)?").fullmatch,  # type: ignore[dict-item]
    "uuid": re.compile(
        r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    ).fullmatch,  # type: ignore[dict-item]
}

# {name} / {name:kind} (Starlette, FastAPI, Litestar, OpenAPI), <name> / <conv:name> /
# <conv(args):name> (Flask), :name / :name(regex) (Fastify), * (Fastify wildcard).
_BRACE = r"\{(?P<b_name>[A-Za-z_][\w.\-]*)(?::(?P<b_kind>[A-Za-z_]\w*))?\}"
_ANGLE = r"<(?:(?P<a_kind>[A-Za-z_]\w*)(?:\([^)<>]*\))?:)?(?P<a_name>[A-Za-z_]\w*)>"
_COLON = r"(?<![^/\-.])\:(?P<c_name>[A-Za-z_]\w*)(?:\((?P<c_rx>[^)]*)\))?"
_PARAM = re.compile(f"{_BRACE}|{_ANGLE}|{_COLON}")


@dataclass(frozen=True, slots=True)
class Param:
    """A whole-segment parameter; `kind` is None when the route does not type it."""

    name: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A segment mixing literal text and parameters, e.g. `{name}.json`."""

    source: str
    regex: re.Pattern[str]


Segment = str | Param | Pattern


def parse_template(template: str) -> list[Segment]:
    """Split a route template in any supported spelling into segments.

    Raises ValueError with a reason when the template is unusable.
    """
    template = template.strip()
    if not template.startswith("/"):
        raise ValueError(f"route {template!r} must start with '/'")
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise ValueError(f"route of {len(template)} characters is too long")
    parts = template.split("/")[1:]
    if len(parts) > MAX_SEGMENTS:
        raise ValueError(f"route {template!r} has more than {MAX_SEGMENTS} segments")
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if part == "*" and i == len(parts) - 1:
            segments.append(Param("*", "path"))
            continue
        m = _PARAM.fullmatch(part)
        if m is not None and not m.group("c_rx"):
            name = m.group("b_name") or m.group("a_name") or m.group("c_name")
            raw_kind = m.group("b_kind") or m.group("a_kind")
            kind = _KIND_ALIASES.get(raw_kind.lower(), raw_kind.lower()) if raw_kind else None
            segments.append(Param(name, kind))
        elif _PARAM.search(part) is not None:
            segments.append(Pattern(part, _segment_regex(part)))
        else:
            segments.append(unquote(part))
    return segments


def _segment_regex(part: str) -> re.Pattern[str]:
    out = []
    pos = 0
    for m in _PARAM.finditer(part):
        out.append(re.escape(part[pos : m.start()]))
        rx = m.group("c_rx")
        kind = (m.group("b_kind") or m.group("a_kind") or "").lower()
        if rx:
            out.append(f"(?:{rx})")
        elif _KIND_ALIASES.get(kind) == "int":
            out.append("-?[0-9]+")
        else:
            out.append("[^/]+?")
        pos = m.end()
    out.append(re.escape(part[pos:]))
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ValueError(f"route segment {part!r} has a bad pattern: {exc}") from None


# --- Spelling: templates as each framework writes them ---------------------


def spell(segments: Iterable[Segment], framework: str | Spelling | None) -> str:
    """The template as `framework`'s router spells it (OpenAPI's `{name}` when unknown)."""
    if isinstance(framework, Spelling):
        spelling = framework
    else:
        known = frameworks.get(framework)
        spelling = known.spelling if known is not None else OPENAPI_SPELLING
    out = []
    for seg in segments:
        if isinstance(seg, str):
            out.append(seg)
        elif isinstance(seg, Pattern):
            out.append(seg.source)
        else:
            out.append(_spell_param(seg, spelling))
    return "/" + "/".join(out)


def _spell_param(seg: Param, spelling: Spelling) -> str:
    if spelling.style == "colon":
        return "*" if seg.name == "*" else f":{seg.name}"
    kind = seg.kind
    named = spelling.kinds is None or (kind is not None and kind in spelling.kinds)
    written = kind if kind is not None and named else spelling.untyped
    if spelling.style == "angle":
        return f"<{written}:{seg.name}>" if written else f"<{seg.name}>"
    return f"{{{seg.name}:{written}}}" if written else f"{{{seg.name}}}"


def paths_method(method: str, framework: str | None) -> str:
    """Startup `paths` method case: lower for Starlette/FastAPI, upper elsewhere."""
    known = frameworks.get(framework)
    return method.lower() if known is not None and known.paths_lower_methods else method.upper()


_CONVERTOR = re.compile(r"\{([^{}:]+):[^{}]*\}")


def paths_template(template: str, framework: str | None) -> str:
    """Startup `paths` spelling: Starlette's SchemaGenerator drops convertors ({id:int} -> {id})."""
    known = frameworks.get(framework)
    if known is not None and known.paths_drop_convertors:
        return _CONVERTOR.sub(r"{\1}", template)
    return template


# --- The compiled matcher --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One route: `method` None matches any method; `template` is what gets reported."""

    method: str | None
    template: str
    segments: tuple[Segment, ...]


class _Node:
    __slots__ = ("literals", "methods", "params", "patterns", "rest")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        # (check or None, child); typed parameters are tried before untyped ones.
        self.params: list[tuple[Callable[[str], object] | None, _Node]] = []
        self.patterns: list[tuple[Callable[[str], object], _Node]] = []
        self.methods: dict[str, str] | None = None  # method ("*" = any) → template
        self.rest: dict[str, str] | None = None  # catch-all parameter ending here


_ANY_METHOD = ""  # what a method_after_path route also answers (no request's method)


class RouteTable:
    """A compiled set of routes: `match(method, path)` walks a segment trie."""

    def __init__(self, routes: Iterable[Route], rules: MatchRules | None = None) -> None:
        self.rules = rules or MatchRules()
        self.routes: list[Route] = []
        self._root = _Node()
        seen: set[tuple[str | None, tuple[Segment, ...]]] = set()
        for route in routes:
            segs = route.segments
            if not self.rules.strict_slash and segs and segs[-1] == "" and len(segs) > 1:
                segs = segs[:-1]
            if not self.rules.case_sensitive:
                segs = tuple(_fold(seg) for seg in segs)
            key = (route.method, segs)
            if key in seen:  # the first spelling of a route wins
                continue
            seen.add(key)
            self.routes.append(route)
            self._insert(segs, route.method or "*", route.template)

    def __len__(self) -> int:
        return len(self.routes)

    def _insert(self, segs: tuple[Segment, ...], method: str, template: str) -> None:
        # method_after_path: the route also answers _ANY_METHOD, which no request has.
        methods = (method, _ANY_METHOD) if self.rules.method_after_path else (method,)
        node = self._root
        for i, seg in enumerate(segs):
            if isinstance(seg, str):
                node = node.literals.setdefault(seg, _Node())
                continue
            if isinstance(seg, Pattern):
                node = _child(node.patterns, seg.regex.fullmatch)
                continue
            if seg.kind == "path" and i == len(segs) - 1:
                if node.rest is None:
                    node.rest = {}
                for m in methods:
                    node.rest.setdefault(m, template)
                return
            check = _KIND_CHECKS.get(seg.kind or "")
            node = _child(node.params, check)
        if node.methods is None:
            node.methods = {}
        for m in methods:
            node.methods.setdefault(m, template)

    def match(self, method: str, path: str, loose: bool = False) -> str | None:
        """The template of the route serving `method path` (raw path), or None.

        `loose`: typed parameters take any value (the app rejected this one with a
        validation error, so its router did route it).
        """
        rules = self.rules
        if "%" in path:
            if rules.decode_per_segment:
                segs = [unquote(s) for s in path.split("/")]
            else:
                segs = unquote(path).split("/")
        else:
            segs = path.split("/")
        if not rules.strict_slash and len(segs) > 2 and segs[-1] == "":
            segs.pop()
        if len(segs) > MAX_SEGMENTS + 2:
            return None
        if not rules.case_sensitive:
            segs = [seg.lower() for seg in segs]
        found = _walk(self._root, segs, 1, method, loose)
        if found is None and method == "HEAD" and rules.head_from_get:
            found = _walk(self._root, segs, 1, "GET", loose)
        if found is None and rules.method_after_path:
            found = _walk(self._root, segs, 1, _ANY_METHOD, loose)
        return found

    def paths(self, framework: str | None = None) -> list[dict[str, str]]:
        """Routes in the startup payload's `paths` shape (routes without a method are left out)."""
        out = []
        for r in self.routes:
            if r.method is None or r.method in ("HEAD", "OPTIONS"):
                continue
            out.append(
                {
                    "method": paths_method(r.method, framework),
                    "path": paths_template(r.template, framework),
                }
            )
        return out


def _fold(seg: Segment) -> Segment:
    """A segment of a case-insensitive router: literals lower-case, patterns ignoring case."""
    if isinstance(seg, str):
        return seg.lower()
    if isinstance(seg, Pattern):
        return Pattern(seg.source, re.compile(seg.regex.pattern, re.IGNORECASE))
    return seg


def _child(children: list, check: Callable[[str], object] | None) -> _Node:
    for existing, node in children:
        if existing is check:
            return node
    node = _Node()
    children.append((check, node))
    # Typed (checked) parameters first: `{id:int}` beats `{slug}` for "42".
    children.sort(key=lambda pair: pair[0] is None)
    return node


def _walk(node: _Node, segs: list[str], i: int, method: str, loose: bool) -> str | None:
    if i == len(segs):
        methods = node.methods
        if methods is not None:
            found = methods.get(method) or methods.get("*")
            if found is not None:
                return found
        rest = node.rest
        if rest is not None:  # a catch-all also matches nothing at all
            return rest.get(method) or rest.get("*")
        return None
    seg = segs[i]
    child = node.literals.get(seg)
    if child is not None:
        found = _walk(child, segs, i + 1, method, loose)
        if found is not None:
            return found
    if seg:
        for check, child in node.params:
            if check is None or loose or check(seg):
                found = _walk(child, segs, i + 1, method, loose)
                if found is not None:
                    return found
        for check, child in node.patterns:
            if check(seg):
                found = _walk(child, segs, i + 1, method, loose)
                if found is not None:
                    return found
    rest = node.rest
    if rest is not None:
        return rest.get(method) or rest.get("*")
    return None


def parse_declared(entry: str) -> list[Route]:
    """One `routes` config entry: `"[METHOD[,METHOD…]] /template"` → routes.

    Raises ValueError naming what is wrong with the entry.
    """
    text = entry.strip()
    methods: list[str | None] = [None]
    if text and not text.startswith("/"):
        head, _, text = text.partition(" ")
        text = text.strip()
        methods = []
        for m in re.split(r"[,|]", head):
            m = m.strip().upper()
            if m not in METHODS:
                raise ValueError(f"route {entry!r}: {m or head!r} is not an HTTP method")
            methods.append(m)
    segments = tuple(parse_template(text))
    return [Route(m, text, segments) for m in methods]


def declared_routes(entries: Iterable[str]) -> list[Route]:
    """All `routes` entries of the config file, in order."""
    return [route for entry in entries for route in parse_declared(entry)]


# --- The resolver the meter calls ------------------------------------------


MAX_CACHED_PATH = 256  # longer paths are templated on every request, never cached
MAX_TAUGHT = 50_000  # distinct shaped paths taught to the learner
# The taught hashes' open-addressing table, one machine word per slot (`hash()` never
# returns -1, the empty slot): it doubles past a load of 0.4, up to a power of two over
# 2.5x MAX_TAUGHT (1 MB: load at most 0.38, ~1.3 probes per lookup).
_TAUGHT_MIN_SLOTS = 1024
_TAUGHT_MAX_SLOTS = 1 << (int(MAX_TAUGHT * 2.5) - 1).bit_length()
_TAUGHT_EMPTY = -1


class RouteResolver:
    """Resolves request paths to templates: the route table when known, else heuristics
    (shape rules, then positions learned from traffic)."""

    def __init__(
        self, max_templates_per_method: int = 1000, cache_size: int = 10_000, base_path: str = ""
    ) -> None:
        self._max_templates = max_templates_per_method
        self._cache_size = cache_size
        self._cache: dict[str, str] = {}  # raw path -> shaped template
        self._mapped: dict[str, str] = {}  # shaped -> learned template (reset on learning)
        # Hashes of the shaped paths taught so far (a hash, not the string: under hostile
        # traffic this fills to MAX_TAUGHT; a collision only skips teaching one path), in
        # a flat table with linear probing: 1 MB, where a set of 50k ints took 3.8 MB.
        self._taught = array("q", [_TAUGHT_EMPTY]) * _TAUGHT_MIN_SLOTS
        self._taught_mask = _TAUGHT_MIN_SLOTS - 1
        self.taught = 0  # hashes in it
        self._templates: dict[str, set[str]] = {}
        # The app sees base_path + path (the upstream URL's prefix), and its routes say so.
        self._base_path = base_path
        self.table: RouteTable | None = None
        self.framework: str | None = None
        self.learner = TemplateLearner()
        self.overflow = 0
        # Templates handed out before a position was learned -> what they are now; the
        # meter merges the open interval's aggregates with it before a sync.
        self._renames: dict[str, str] = {}
        self.learned_changed = False

    def use_table(self, table: RouteTable | None, framework: str | None = None) -> bool:
        """Switch to a route table (None: back to heuristics); True if `paths()` changed."""
        before = self.paths()
        self.table = table
        self.framework = framework
        return self.paths() != before

    def resolve(
        self, method: str, path: str, learn: bool = True, loose: bool = False
    ) -> str | None:
        """The template to count this request under; None when it matches no route.

        With heuristics, `learn=False` (the app answered 404/405: no proof of a
        route) resolves only to templates already seen, so scanners cannot fill the
        per-method cap and push real endpoints first seen later into the overflow.
        `loose` (a validation error): a value the app rejected counts under the known
        route whose parameter it was sent for; with none, it teaches as any answer.
        """
        table = self.table
        if table is not None:
            full = self._base_path + path if self._base_path else path
            found = table.match(method, full)
            if found is None and loose:
                found = table.match(method, full, loose=True)
            return found
        shaped = self._cache.get(path)
        if shaped is None:
            shaped = self._shape(path)
        if loose:
            # `/items/abc` rejected: `/items/{id}` is the route, if it is known.
            known = self.learner.apply(shaped, loose=True)
            if known in self._templates.get(method, ()):
                return known
        if (
            learn
            and self.taught < MAX_TAUGHT
            # Taught already, most often in the first slot tried: no call.
            and self._taught[(key := hash(shaped)) & self._taught_mask] != key
        ):
            self._teach(shaped, key)
        template = self._mapped.get(shaped)
        if template is None:
            template = self._map(shaped)
        seen = self._templates.get(method)
        if seen is None:
            seen = self._templates[method] = set()
        if template not in seen:
            if not learn:
                return None
            if len(seen) >= self._max_templates:
                self.overflow += 1
                return OVERFLOW_TEMPLATE
            seen.add(template)
        return template

    def _teach(self, shaped: str, key: int) -> None:
        """Teach the learner a shaped path (`key`: its hash), once."""
        taught = self._taught
        mask = self._taught_mask
        i = key & mask
        while (held := taught[i]) != key:
            if held == _TAUGHT_EMPTY:  # not taught yet
                taught[i] = key
                self.taught += 1
                if self.taught * 5 > mask * 2 and mask < _TAUGHT_MAX_SLOTS - 1:
                    self._grow_taught()
                if self.learner.teach(shaped):
                    self._learned()
                return
            i = (i + 1) & mask

    def _grow_taught(self) -> None:
        """Twice the slots for the taught hashes, each re-placed."""
        old = self._taught
        slots = len(old) * 2
        mask = self._taught_mask = slots - 1
        taught = self._taught = array("q", [_TAUGHT_EMPTY]) * slots
        for key in old:
            if key != _TAUGHT_EMPTY:
                i = key & mask
                while taught[i] != _TAUGHT_EMPTY:
                    i = (i + 1) & mask
                taught[i] = key

    def _shape(self, path: str) -> str:
        """The path with id-like segments as parameters, cached."""
        shaped = template_segments(path)
        if len(path) <= MAX_CACHED_PATH:  # hostile long paths would pin memory
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[path] = shaped
        return shaped

    def _map(self, shaped: str) -> str:
        """The shaped path with learned positions applied (cached until the next one)."""
        template = self.learner.apply(shaped)
        if len(self._mapped) >= self._cache_size:
            self._mapped.clear()
        self._mapped[shaped] = template
        return template

    def _learned(self) -> None:
        """A position became a parameter: templates seen so far are renamed to match."""
        self._mapped.clear()
        self.learned_changed = True
        for method, seen in self._templates.items():
            renamed = set()
            for template in seen:
                now = self.learner.apply(template)
                if now != template:
                    self._renames[template] = now
                renamed.add(now)
            self._templates[method] = renamed
        # A chain (a -> b, then b -> c) resolves to the latest name.
        for old, new in self._renames.items():
            self._renames[old] = self.learner.apply(new)

    @property
    def templates_seen(self) -> int:
        """Distinct (method, template) pairs handed out by the heuristics."""
        return sum(len(seen) for seen in self._templates.values())

    def take_renames(self) -> dict[str, str]:
        """Templates renamed by learning since the last call (old -> new)."""
        renames, self._renames = self._renames, {}
        return renames

    def paths(self) -> list[dict[str, str]]:
        """The route set (or templates seen so far), in the startup payload's `paths` shape."""
        if self.table is not None:
            return self.table.paths(self.framework)
        return [
            {"method": method, "path": template}
            for method, templates in sorted(self._templates.items())
            for template in sorted(templates)
        ]


class RouteOverrides:
    """Vets `X-Apitally-Route` values from the app; distinct values per method are capped."""

    def __init__(self, max_per_method: int = 1000) -> None:
        self._max = max_per_method
        self._seen: dict[str, set[str]] = {}
        self.overflow = 0

    def accept(self, method: str, value: str) -> str | None:
        """The template to count under, or None when the value is not a usable template."""
        value = value.strip()
        if not value.startswith("/") or len(value) > MAX_TEMPLATE_LENGTH:
            return None
        if not value.isprintable():
            # Raw non-UTF-8 bytes or controls: the template must encode and display.
            value = strip_controls(header_text(value))
        seen = self._seen.get(method)
        if seen is None:
            seen = self._seen[method] = set()
        if value not in seen:
            # An app that puts raw paths here must not grow memory without bound.
            if len(seen) >= self._max:
                self.overflow += 1
                return OVERFLOW_TEMPLATE
            seen.add(value)
        return value
