"""The package's layout rules (docs/design.md, "Layout"), checked so that they cannot drift.

- no module over :data:`MAX_MODULE_LINES` lines and no function body over :data:`MAX_BODY_LINES`
  lines, unless a ``# long: <reason>`` comment on the ``def`` line or just above it says why;
- no module imports another module's private name;
- docs/design.md's module map names every module of the package, and nothing that is not one;
- the tests mirror the package: each subpackage has its folder of tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxcompress"
MAX_MODULE_LINES = 600
MAX_BODY_LINES = 80
MODULES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A ``# long: reason`` on the line ``lineno`` (1-based) or the line above it."""
    window = lines[max(lineno - 2, 0) : lineno]
    return any(re.search(r"#\s*long:\s*\S", line) for line in window)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    first = body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if is_doc and isinstance(first.value.value, str) and len(body) > 1:
        first = body[1]
    return (fn.end_lineno or fn.lineno) - first.lineno + 1


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_is_over_the_line_limit_without_a_reason(path: Path) -> None:
    lines = path.read_text().splitlines()
    if len(lines) > MAX_MODULE_LINES:
        assert _has_reason(lines, 1) or _has_reason(lines, 2), (
            f"{_rel(path)} has {len(lines)} lines (limit {MAX_MODULE_LINES}): split it, or say "
            "why not in a '# long: <reason>' comment on its first line"
        )


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_function_body_is_over_the_line_limit_without_a_reason(path: Path) -> None:
    text = path.read_text()
    lines = text.splitlines()
    long = [
        f"{node.name} (line {node.lineno}: {_body_lines(node)} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_BODY_LINES
        and not _has_reason(lines, node.lineno)
    ]
    assert not long, (
        f"{_rel(path)}: function bodies over {MAX_BODY_LINES} lines with no '# long: <reason>' "
        f"comment: {long}"
    )


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_imports_another_modules_private_name(path: Path) -> None:
    leaks = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fxcompress"):
            leaks += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    assert not leaks, f"{_rel(path)} imports private names of other modules: {leaks}"


def test_design_map_names_every_module_and_no_other() -> None:
    """Each module (an ``__init__.py`` only where it holds code) is in the map, and nothing else."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Module map", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| `([\w/]+\.py)` \|", section, re.MULTILINE)
    mapped = set(cells)
    every = {p.relative_to(PACKAGE).as_posix() for p in MODULES}
    required = {m for m in every if not m.endswith("__init__.py") or m == "__init__.py"}
    missing, absent = sorted(required - mapped), sorted(mapped - every)
    assert not missing, f"modules missing from docs/design.md: {missing}"
    assert not absent, f"docs/design.md maps modules that do not exist: {absent}"


def test_every_subpackage_has_a_folder_of_tests() -> None:
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [n for n in subpackages if not list((ROOT / "tests" / n).glob("test_*.py"))]
    assert not missing, f"subpackages without a tests/<name>/ folder of tests: {missing}"
