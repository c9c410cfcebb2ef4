"""The house's rules, read from collector/'s imports with `ast`: no loops, and each floor imports only down.

Every `import` counts, at module level or inside a function, under `TYPE_CHECKING` or not: a function's
import is a dependency too, only a later one. Each failure names the offending import as
`path:line imports name`.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from collector.fake.recordings import DEFAULT_RECORDINGS_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "collector"

# Libraries that talk to the network, a database or a process: binance/ is pure knowledge of Binance.
IO_LIBRARIES = (
    "aiohttp",
    "asyncio",
    "celery",
    "http",
    "httpx",
    "kombu",
    "psycopg",
    "psycopg2",
    "redis",
    "requests",
    "socket",
    "sqlalchemy",
    "ssl",
    "subprocess",
    "urllib.request",
    "urllib3",
    "websockets",
)

# (importer, imported): a floor that must never import another, by module prefix.
FORBIDDEN = (
    ("collector.streams", "collector.db"),
    ("collector.streams", "collector.tasks"),
    ("collector.db", "collector.streams"),
    ("collector.db", "collector.tasks"),
    ("collector.rest", "collector.streams"),
)


@dataclass(frozen=True)
class Import:
    """One imported name: `module` for `import module`, `module.name` for `from module import name`."""

    importer: str
    path: str
    line: int
    name: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.name}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(path: Path) -> list[Import]:
    """Every import in the file, wherever it stands; relative imports resolved against its package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = base if alias.name == "*" else f"{base}.{alias.name}"
                found.append(Import(module, rel, node.lineno, name))
    return found


@cache
def _collector_imports() -> tuple[Import, ...]:
    return tuple(i for path in sorted(PACKAGE.rglob("*.py")) for i in _imports_of(path))


@cache
def _modules() -> frozenset[str]:
    return frozenset(_module_name(path) for path in PACKAGE.rglob("*.py"))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _target(name: str, modules: frozenset[str]) -> str | None:
    """The module of ours an imported name lives in (`collector.book.book_at` -> `collector.book`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _loops(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (Tarjan's strongly
    connected components of more than one module, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                loops.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_loop_finder_finds_a_loop_round_three_modules() -> None:
    """The loop finder itself: a -> b -> c -> a is one loop, e -> e another; d (imported by c) is in none."""
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]}
    assert _loops(graph) == [["a", "b", "c"], ["e"]]


def test_no_import_loops() -> None:
    """No two modules of collector/ import each other, directly or round a loop."""
    modules = _modules()
    edges: dict[str, list[tuple[Import, str]]] = {m: [] for m in modules}
    for imp in _collector_imports():
        target = _target(imp.name, modules)
        if target is not None and target != imp.importer:
            edges[imp.importer].append((imp, target))
    graph = {m: {target for _, target in out} for m, out in edges.items()}
    problems = []
    for loop in _loops(graph):
        inside = dict.fromkeys(
            f"{imp.path}:{imp.line} imports {to}" for m in loop for imp, to in edges[m] if to in loop
        )
        problems.append(f"{' <-> '.join(loop)}: " + "; ".join(inside))
    assert not problems, "import loops:\n" + "\n".join(problems)


def test_binance_imports_no_io_library() -> None:
    """collector/binance/ is pure knowledge of Binance: no HTTP, WebSocket, Redis, SQL or socket library."""
    offending = [
        str(i)
        for i in _collector_imports()
        if _under(i.importer, "collector.binance") and any(_under(i.name, lib) for lib in IO_LIBRARIES)
    ]
    assert not offending, "binance/ must stay pure; move the I/O out (to rest/):\n" + "\n".join(offending)


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=lambda p: p.removeprefix("collector."))
def test_floors_import_only_down(importer: str, imported: str) -> None:
    """Data flows streams -> Redis -> tasks -> db, and no floor imports one it must not reach."""
    offending = [
        str(i) for i in _collector_imports() if _under(i.importer, importer) and _under(i.name, imported)
    ]
    assert not offending, f"{importer} must not import {imported}:\n" + "\n".join(offending)


def test_only_the_celery_app_imports_tasks() -> None:
    """The task shells are reached through the Celery app (collector/celery.py) and by task name."""
    offending = [
        str(i)
        for i in _collector_imports()
        if _under(i.name, "collector.tasks")
        and i.importer != "collector.celery"
        and not _under(i.importer, "collector.tasks")
    ]
    assert not offending, "only collector/celery.py imports tasks/:\n" + "\n".join(offending)


def test_only_the_cli_starts_local_servers() -> None:
    """Only the CLI reaches the dev servers and `collector services`; `collector status` reads local.stack."""
    allowed = {
        "collector.local.services": {"collector.cli"},
        "collector.local.servers": {"collector.local.services"},
    }
    offending = [
        str(i)
        for i in _collector_imports()
        for tool, importers in allowed.items()
        if _under(i.name, tool) and i.importer not in importers and not _under(i.importer, tool)
    ]
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("folder", ["collector", "bench", "scripts"])
def test_nothing_outside_tests_imports_tests(folder: str) -> None:
    """The package, the benchmarks and the scripts run without tests/ (the Docker image has none)."""
    offending = [
        str(i)
        for path in sorted((ROOT / folder).rglob("*.py"))
        for i in _imports_of(path)
        if _under(i.name, "tests")
    ]
    assert not offending, f"{folder}/ imports tests:\n" + "\n".join(offending)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of the module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_runtime_code_names_no_path_under_tests() -> None:
    """No string in collector/ (docstrings aside) points into tests/: what the package reads, it ships."""
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and ("tests/" in node.value or node.value == "tests")
            ):
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.value!r}")
    assert not offending, "\n".join(offending)


def test_the_fakes_recordings_are_package_data() -> None:
    """The recordings the fake replays are in the package, declared package data, with their licence."""
    assert PACKAGE in DEFAULT_RECORDINGS_DIR.parents, f"{DEFAULT_RECORDINGS_DIR} is outside collector/"
    files = sorted(p for p in DEFAULT_RECORDINGS_DIR.rglob("*") if p.is_file())
    assert {"LICENSE", "README.md"} <= {p.name for p in files}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    undeclared = []
    for path in files:
        package = ".".join(path.parent.relative_to(ROOT).parts)
        while package not in declared and "." in package:
            package = package.rpartition(".")[0]
        relative = str(path.relative_to(ROOT.joinpath(*package.split("."))))
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in declared.get(package, [])):
            undeclared.append(str(path.relative_to(ROOT)))
    assert not undeclared, "not in pyproject.toml's package-data:\n" + "\n".join(undeclared)


def test_the_stream_process_loads_nothing_of_the_database_side() -> None:
    """Not even through another module: `streams/` reaching `db/` (or SQLAlchemy) by way of, say, the
    audit costs the stream process ~14 MB and every start a fifth of a second."""
    probe = (
        "import sys, collector.streams.runner\n"
        "prefixes = ('collector.db', 'sqlalchemy', 'collector.audit')\n"
        "print(sorted(m for m in sys.modules if m.startswith(prefixes)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert loaded == "[]", f"the stream process imports {loaded}"
