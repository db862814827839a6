"""Route templates learned from traffic, for apps without a route list.

Shape rules (`routes.template_segments`) already turn id-like segments into
parameters. What they cannot see is a parameter made of plain words: usernames,
slugs, country codes. This module watches the distinct values at each path
position (a trie of the paths the app answered) and, like passive API-discovery
agents, makes a position a parameter once enough distinct siblings under the
same parent lead to the same continuation:

- `/users/alice/posts/{id}`, `/users/bob/posts/{id}` … (10 siblings, all
  continuing with `posts`) become `/users/{id}/posts/{id2}`;
- siblings that are all leaves (`/users/alice`, `/users/bob` …) need twice as
  many, since an API's collections are leaves too;
- the first segment is never learned (`/users`, `/items` are the API's own
  names), and common words and versions (`v1`, `api`, `me`, `new`, `search` …)
  stay literal wherever they are.

404/405 answers never teach; a validation error teaches only when no known route
fits (else it counts under that route);
everything is bounded (nodes, children per node), and what was learned is a
short list of parameter positions, saved in the state dir.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import orjson

from apitally_proxy.fileio import write_atomic

log = logging.getLogger("apitally_proxy.routes")

MIN_SIBLINGS = 10  # distinct values with one continuation that make a parameter
MIN_LEAF_SIBLINGS = 20  # the same, for values that end the path
MAX_CHILDREN = 256  # distinct literal values tracked under one node
MAX_NODES = 50_000
MAX_SAVED = 1000  # learned positions kept in the state dir

# Words that name things rather than values: never folded into a parameter.
_WORDS = """
api apis rest graphql rpc v public private internal admin me my self current new
latest all search find filter query count stats status health healthz ready live
metrics info about config settings preferences profile login logout signin signout
signup register auth oauth token tokens refresh callback webhook webhooks events
batch bulk export import upload uploads download downloads docs openapi swagger
schema static assets media files images default recent popular top trending
"""
KEPT_WORDS = frozenset(_WORDS.split())
_VERSION = re.compile(r"v\d+(\.\d+)*|\d{4}-\d{2}-\d{2}")


def is_parameter(segment: str) -> bool:
    """A segment the shape rules already made a parameter (`{id}`, `{id2}` …)."""
    return segment.startswith("{") and segment.endswith("}")


def kept_literal(segment: str) -> bool:
    return segment.lower() in KEPT_WORDS or _VERSION.fullmatch(segment) is not None


class _Node:
    __slots__ = ("children", "end", "learned", "param")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.learned = False  # the parameter here was learned from sibling values
        self.end = False  # a taught path ended here


class TemplateLearner:
    """A trie of the paths the app answered; `apply` maps a shaped path to its template."""

    def __init__(
        self,
        min_siblings: int = MIN_SIBLINGS,
        min_leaf_siblings: int = MIN_LEAF_SIBLINGS,
        max_nodes: int = MAX_NODES,
    ) -> None:
        self._root = _Node()
        self._nodes = 1
        self._min = min_siblings
        self._min_leaf = min_leaf_siblings
        self._max_nodes = max_nodes
        self.learned = 0  # positions learned as parameters

    # --- teaching -------------------------------------------------------------

    def teach(self, template: str) -> bool:
        """Add a shaped path the app answered; True when a position became a parameter."""
        segments = template.split("/")[1:]
        path = [self._root]
        node = self._root
        for seg in segments:
            child = self._step(node, seg, loose=False)
            if child is None:
                child = self._add(node, seg)
                if child is None:
                    return False  # bounds reached: shapes alone, as before
            node = child
            path.append(node)
        node.end = True
        promoted = False
        # Deepest first: a parameter found low in the tree can make siblings above alike.
        for depth in range(len(path) - 2, 0, -1):
            if self._maybe_promote(path[depth]):
                promoted = True
        return promoted

    def _add(self, node: _Node, seg: str) -> _Node | None:
        if self._nodes >= self._max_nodes:
            return None
        if is_parameter(seg):
            node.param = _Node()
            self._nodes += 1
            return node.param
        if len(node.children) >= MAX_CHILDREN:
            return None
        child = node.children[seg] = _Node()
        self._nodes += 1
        return child

    def _maybe_promote(self, node: _Node) -> bool:
        candidates = [k for k in node.children if not kept_literal(k)]
        if len(candidates) < self._min:
            return False
        continuing: dict[str, list[str]] = {}  # next segment -> siblings followed by it
        leaves: list[str] = []
        for key in candidates:
            child = node.children[key]
            following = [*child.children, *(("{id}",) if child.param is not None else ())]
            if not following:
                leaves.append(key)
            for nxt in following:
                continuing.setdefault(nxt, []).append(key)
        shared = max(continuing.values(), key=len, default=[])
        if len(shared) >= self._min:
            keys = [*shared, *leaves]  # `/users/alice` and `/users/bob/posts`: one position
        elif len(leaves) >= self._min_leaf:
            keys = leaves
        else:
            return False
        target = node.param
        if target is None:
            target = node.param = _Node()
            self._nodes += 1
        if not node.learned:
            node.learned = True
            self.learned += 1
        for key in keys:
            self._merge(node.children.pop(key), target)
        return True

    def _merge(self, source: _Node, into: _Node) -> None:
        into.end = into.end or source.end
        self._nodes -= 1
        for key, child in source.children.items():
            mine = into.children.get(key)
            if mine is None:
                into.children[key] = child
            else:
                self._merge(child, mine)
        if source.param is not None:
            if into.param is None:
                into.param = source.param
            else:
                self._merge(source.param, into.param)
        if source.learned and into.learned:
            self.learned -= 1  # two learned positions became one
        into.learned = into.learned or source.learned

    # --- mapping --------------------------------------------------------------

    def _step(self, node: _Node, seg: str, loose: bool) -> _Node | None:
        if is_parameter(seg):
            return node.param
        child = node.children.get(seg)
        if child is not None:
            return child
        if node.param is not None and (loose or (node.learned and not kept_literal(seg))):
            return node.param
        return None

    def apply(self, template: str, loose: bool = False) -> str:
        """The template for a shaped path: learned parameter positions become `{id…}`.

        `loose` (the app rejected a parameter, 400/422): a value the trie never saw
        at a position that takes a parameter is that parameter.
        """
        segments = template.split("/")
        node: _Node | None = self._root
        changed = False
        for i in range(1, len(segments)):
            seg = segments[i]
            if node is None:
                break
            child = self._step(node, seg, loose)
            if child is not None and child is node.param and not is_parameter(seg):
                segments[i] = "{id}"
                changed = True
            node = child
        if not changed:
            return template
        n = 0
        for i, seg in enumerate(segments):
            if is_parameter(seg):
                n += 1
                segments[i] = "{id}" if n == 1 else f"{{id{n}}}"
        return "/".join(segments)

    # --- persistence ----------------------------------------------------------

    def learned_positions(self) -> list[str]:
        """Where parameters were learned, as shaped prefixes ending in `{id}` (to save)."""
        out: list[str] = []

        def walk(node: _Node, prefix: list[str]) -> None:
            if node.learned and node.param is not None:
                out.append("/".join(["", *prefix, "{id}"]))
            for key, child in node.children.items():
                walk(child, [*prefix, key])
            if node.param is not None:
                walk(node.param, [*prefix, "{id}"])

        walk(self._root, [])
        return sorted(out)

    def restore(self, positions: list[str]) -> None:
        """Re-learn saved positions (from `learned_positions`)."""
        for position in positions:
            segments = position.split("/")[1:]
            if len(segments) < 2 or not is_parameter(segments[-1]):
                continue
            node = self._root
            for seg in segments[:-1]:
                child = self._step(node, seg, loose=False) or self._add(node, seg)
                if child is None:
                    break
                node = child
            else:
                if node.param is None and self._nodes < self._max_nodes:
                    node.param = _Node()
                    self._nodes += 1
                if node.param is not None and not node.learned:
                    node.learned = True
                    self.learned += 1


def load_positions(path: Path) -> list[str]:
    """Positions saved by an earlier run ([] when none or unreadable)."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("ignoring learned routes in %s (%s)", path, exc)
        return []
    positions = data.get("positions") if isinstance(data, dict) else None
    if not isinstance(positions, list):
        return []
    return [p for p in positions[:MAX_SAVED] if isinstance(p, str) and p.startswith("/")]


def save_positions(path: Path, positions: list[str]) -> None:
    """Save positions, adding to what other workers saved (atomic replace)."""
    merged = sorted(set(load_positions(path)) | set(positions))[:MAX_SAVED]
    data = orjson.dumps({"version": 1, "positions": merged}, option=orjson.OPT_INDENT_2)
    write_atomic(path, data)
