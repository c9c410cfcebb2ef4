"""Every `binance.md §N` the code, tests and README cite is a heading of docs/binance.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINANCE_MD = ROOT / "docs" / "binance.md"

# `## 4. REST`, `### 4.5 Rate limits, ...`: the section number opens the heading.
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
# A citation runs from `binance.md` to the end of its parenthesis, clause or line:
# `(binance.md §0 fact 3, §1.2, §1.4)`, `binance.md §5.2 step 6, §5.3`, `binance.md §4.1/§4.2`.
CITATION = re.compile(r"binance\.md([^)\n;]*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")


def _sections() -> list[str]:
    return HEADING.findall(BINANCE_MD.read_text(encoding="utf-8"))


def _citations() -> list[tuple[str, int, str]]:
    """(file, line, section) of every section cited after `binance.md` in collector/, tests/ and README."""
    files = [
        *sorted((ROOT / "collector").rglob("*.py")),
        *sorted((ROOT / "tests").rglob("*.py")),
        ROOT / "README.md",
    ]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for tail in CITATION.findall(line):
                found += [(str(path.relative_to(ROOT)), number, section) for section in SECTION.findall(tail)]
    return found


def test_section_numbers_of_binance_md_are_unique() -> None:
    """A section number names one heading only, so a citation cannot be ambiguous."""
    sections = _sections()
    assert len(sections) > 20
    assert len(sections) == len(set(sections)), sorted(s for s in sections if sections.count(s) > 1)


def test_every_binance_md_citation_resolves_to_a_heading() -> None:
    """`binance.md §N` / `§N.M` in the code, the tests and the README names a heading of docs/binance.md."""
    sections = set(_sections())
    citations = _citations()
    assert len(citations) > 50  # the scan found the citations (a broken pattern would find none)
    missing = [f"{path}:{line} §{section}" for path, line, section in citations if section not in sections]
    assert not missing, f"cited but not a heading of docs/binance.md: {missing}"
