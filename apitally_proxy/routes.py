"""Path → route template.

First cut: heuristics. Id-like segments (integers, UUIDs, long hex, ULIDs,
long mixed tokens) become parameters, so `/items/42` and `/items/43` are one
endpoint. A per-method cap on distinct templates keeps hostile random paths
from growing memory: past it, paths go to one overflow bucket, and the
overflow is counted.
"""

from __future__ import annotations

import re

OVERFLOW_TEMPLATE = "/{overflow}"
MAX_PATH_LENGTH = 2048
MAX_SEGMENTS = 32

_ID_SEGMENT = re.compile(
    r"""
    -?\d+(\.\d+)?                                                   # integer / decimal
    | [0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}  # UUID
    | [0-9a-fA-F]{16,}                                              # long hex (hashes, object ids)
    | [0-9A-HJKMNP-TV-Z]{26}                                        # ULID
    # long token mixing letters and digits
    | (?=[A-Za-z_\-]*\d)(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{20,}
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


class RouteResolver:
    """Resolves request paths to templates; remembers results within bounds."""

    def __init__(self, max_templates_per_method: int = 1000, cache_size: int = 10_000) -> None:
        self._max_templates = max_templates_per_method
        self._cache_size = cache_size
        self._cache: dict[str, str] = {}
        self._templates: dict[str, set[str]] = {}
        self.overflow = 0

    def resolve(self, method: str, path: str) -> str:
        """The template to count this request under."""
        template = self._cache.get(path)
        if template is None:
            template = template_segments(path)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[path] = template
        seen = self._templates.get(method)
        if seen is None:
            seen = self._templates[method] = set()
        if template not in seen:
            if len(seen) >= self._max_templates:
                self.overflow += 1
                return OVERFLOW_TEMPLATE
            seen.add(template)
        return template

    def paths(self) -> list[dict[str, str]]:
        """Templates seen so far, in the startup payload's `paths` shape."""
        return [
            {"method": method, "path": template}
            for method, templates in sorted(self._templates.items())
            for template in sorted(templates)
        ]
