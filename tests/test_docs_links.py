"""Every relative link in README.md and docs/ resolves, and no page is left out of the index.

- Each relative link and image (`[text](target)`, `![alt](target)`, reference
  definitions `[label]: target`, HTML `href`/`src`) in README.md and docs/**/*.md
  names a file or directory of the repository; a `#anchor` on a Markdown target (or
  alone, for the same page) names one of its headings, slugged as GitHub does.
- Every page under docs/ is linked from README.md's "Documentation" section, so the
  README's index is the table of contents and no page is orphaned.

Links inside code blocks and code spans are not links; absolute URLs are not checked
(nothing here reaches the network).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
INDEX_HEADING = "Documentation"

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target): text may hold one level of brackets.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\))?)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.M)
HTML = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
ABSOLUTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    fence = ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if fence:
            closing = m is not None and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)
            if closing and not line.strip().strip(fence[0]):
                fence = ""
            continue
        if m:
            fence = m.group(1)
            continue
        yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower-cased, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2… for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose(path: Path) -> str:
    """The page with code blocks and code spans blanked out (line numbers kept)."""
    lines = dict(prose_lines(path))
    total = len(path.read_text().splitlines())
    text = "\n".join(lines.get(n, "") for n in range(1, total + 1))
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image outside code (a link's text may
    run over several lines)."""
    text = prose(path)

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    for m in INLINE.finditer(text):
        yield line_of(m.start()), m.group(1).strip("<>")
    for m in REFERENCE.finditer(text):
        yield line_of(m.start()), m.group(1).strip("<>")
    for m in HTML.finditer(text):
        yield line_of(m.start()), m.group(1)


def problem(page: Path, target: str) -> str | None:
    """Why a link target does not resolve, or None when it does."""
    if ABSOLUTE.match(target):
        return None  # https:, mailto:…: not checked
    file_part, _, anchor = target.partition("#")
    resolved = (page.parent / unquote(file_part)).resolve() if file_part else page
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
        return f"no heading #{anchor} in {resolved.relative_to(ROOT)}"
    return None


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_resolves(page: Path):
    found = list(links(page))
    # Every "](" is the middle of a link this test read: a link it cannot parse fails.
    text = prose(page)
    read = {text.rfind("](", m.start(), m.start(1) + 1) for m in INLINE.finditer(text)}
    unread = [
        text.count("\n", 0, m.start()) + 1
        for m in re.finditer(r"\]\(", text)
        if m.start() not in read
    ]
    assert not unread, f"{rel(page)}: links this test cannot read on lines {unread}"
    broken = [
        f"{rel(page)}:{n}: {target} ({why})"
        for n, target in found
        if (why := problem(page, target)) is not None
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)


def index_targets() -> set[Path]:
    """The files README.md's documentation index links to."""
    text = prose(README)
    m = re.search(rf"^##[ \t]+{INDEX_HEADING}[ \t]*$", text, re.M)
    assert m, f"README.md has no '## {INDEX_HEADING}' section"
    end = re.compile(r"^#{1,2}[ \t]", re.M).search(text, m.end())
    section = text[m.end() : end.start() if end else len(text)]
    out = set()
    for link in INLINE.finditer(section):
        target = link.group(1).strip("<>").partition("#")[0]
        if target and not ABSOLUTE.match(target):
            out.add((ROOT / unquote(target)).resolve())
    return out


def test_every_docs_page_is_in_the_readme_index():
    indexed = index_targets()
    orphans = [rel(p) for p in PAGES if p != README and p.resolve() not in indexed]
    assert not orphans, f"pages not linked from README.md's '{INDEX_HEADING}' section: {orphans}"


def test_the_checks_themselves():
    """The slugs and the link reader, on the cases the pages rely on."""
    assert slug("Apitally 1.x: OpenTelemetry export") == "apitally-1x-opentelemetry-export"
    assert slug("Preflight: `apitally-proxy check`") == "preflight-apitally-proxy-check"
    assert slug("Shutdown: why 35 seconds") == "shutdown-why-35-seconds"
    assert slug("Reverse-proxy behaviour") == "reverse-proxy-behaviour"
    assert slug("Differences from the official in-process clients (by design)") == (
        "differences-from-the-official-in-process-clients-by-design"
    )
    line = 'see [a](x.md#b), ![c](img/d.png), `[not](a-link.md)` and [e [f]](g/ "t")'
    assert [m.group(1) for m in INLINE.finditer(CODE_SPAN.sub("", line))] == [
        "x.md#b",
        "img/d.png",
        "g/",
    ]
    assert problem(README, "docs/nowhere.md") == "no such file"
    assert problem(README, "#no-such-heading") is not None
    assert problem(README, "https://apitally.io") is None
