"""Size and complexity limits of the code, checked by `nox -s lint`.

A module has at most ``MAX_MODULE_LINES`` lines, a function or method at most
``MAX_FUNCTION_LINES`` (docstring included), and a cyclomatic complexity of at most
``MAX_COMPLEXITY`` as radon measures it: every ``if``, loop, ``except``, comprehension clause
and boolean operator (``and``/``or``) adds one, so a long chain of conditions counts even where
ruff's mccabe check (C901) does not see it. ``GATED`` says which limits hold where (today
every limit in each of its folders).

Usage: ``python scripts/check_size.py [folder ...]`` (default: every folder in ``GATED``; a
folder not in it gets every limit); exit status 1 and one line per breach when a limit is
exceeded.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from radon.complexity import cc_visit

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_COMPLEXITY = 15

MODULE, FUNCTION, COMPLEXITY = "module", "function", "complexity"
EVERY_LIMIT = frozenset({MODULE, FUNCTION, COMPLEXITY})
GATED: dict[str, frozenset[str]] = {
    "dandelion_lib": EVERY_LIMIT,
    "api": EVERY_LIMIT,
    "dags": EVERY_LIMIT,
    "dashboards": EVERY_LIMIT,
}

ROOT = Path(__file__).resolve().parents[1]


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def breaches(path: Path, limits: frozenset[str] = EVERY_LIMIT) -> list[str]:
    """Every one of ``limits`` that ``path`` exceeds, one line each (``file:line: what``)."""
    text = path.read_text()
    rel = path.relative_to(ROOT)
    out = []
    lines = len(text.splitlines())
    if MODULE in limits and lines > MAX_MODULE_LINES:
        out.append(f"{rel}:1: module has {lines} lines (max {MAX_MODULE_LINES})")
    for fn in _functions(ast.parse(text)) if FUNCTION in limits else []:
        length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
        if length > MAX_FUNCTION_LINES:
            out.append(
                f"{rel}:{fn.lineno}: {fn.name} has {length} lines (max {MAX_FUNCTION_LINES})"
            )
    for block in cc_visit(text) if COMPLEXITY in limits else []:
        if block.complexity > MAX_COMPLEXITY:
            out.append(
                f"{rel}:{block.lineno}: {block.fullname} has complexity {block.complexity} "
                f"(max {MAX_COMPLEXITY})"
            )
    return out


def main(argv: list[str]) -> int:
    folders = argv or list(GATED)
    found = [
        b
        for folder in folders
        for p in sorted((ROOT / folder).rglob("*.py"))
        for b in breaches(p, GATED.get(folder, EVERY_LIMIT))
    ]
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} size/complexity limit(s) exceeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
