"""Reading README.md and docs/*.md for the tests that check them: headings, sections, links, code blocks.

Headings are found outside fenced code blocks only (a `# comment` in a shell block is no heading), and
anchors are made the way GitHub makes them, so a link that works here works on GitHub too.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$")
_FENCE = re.compile(r"^ *(```|~~~)")  # a fence may be indented (a block inside a list item)
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            found.append((number, line))
    return found


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, title) of every heading outside code blocks."""
    found = []
    for number, line in prose_lines(text):
        match = _HEADING.match(line)
        if match:
            found.append((number, len(match.group(1)), match.group(2)))
    return found


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of the file's headings; a repeated one gets GitHub's `-1`, `-2`, ... suffix."""
    seen: dict[str, int] = {}
    found = set()
    for _, _, title in headings(text):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def section(path: Path, title: str) -> str:
    """The text under the one heading `title` of `path`, up to the next heading of its level or higher."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = [(number, level) for number, level, text in headings("\n".join(lines)) if text == title]
    assert len(found) == 1, f"{path.name}: expected one heading {title!r}, found {len(found)}"
    start, level = found[0]
    ends = [n for n, lvl, _ in headings("\n".join(lines)) if n > start and lvl <= level]
    end = ends[0] - 1 if ends else len(lines)
    return "\n".join(lines[start:end]) + "\n"


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced code blocks of `language` (```sql, ```sh), in order, dedented."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(body) for _, body in blocks]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every body row of the Markdown tables of `text` (header and separator rows left out)."""
    rows: list[list[str]] = []
    for _, line in prose_lines(text):
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            rows.pop()  # the row above a separator is the table's header
            continue
        rows.append(cells)
    return rows


def documents() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]
