"""The house rules of steerlin/ (README "Layout"): one idea per module, no module over 600
lines, no function over 120 lines. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "steerlin"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method whose def..last line spans over `limit`."""
    return [
        (f.name, f.end_lineno - f.lineno + 1)
        for f in _functions(ast.parse(source))
        if f.end_lineno - f.lineno + 1 > limit
    ]


def test_the_check_sees_a_long_function_and_a_nested_one():
    body = "\n".join(f"    x{i} = {i}" for i in range(130))
    src = f"def long():\n{body}\n\nclass C:\n    def short(self):\n        return 1\n"
    assert long_functions(src) == [("long", 131)]
    nested = "class C:\n    def m(self):\n        def inner():\n" + "\n".join(
        f"            y{i} = {i}" for i in range(125)
    )
    assert {n for n, _ in long_functions(nested)} == {"m", "inner"}


def test_modules_found():
    names = {p.relative_to(PKG).as_posix() for p in _modules()}
    assert {"frozen.py", "halfprec.py", "steer_eval/__init__.py", "cli/ablate.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PKG).as_posix())
def test_module_within_limits(path):
    source = path.read_text(encoding="utf-8")
    n = len(source.splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.name}: {n} lines (split it: one idea per module)"
    assert long_functions(source) == [], f"{path.name}: functions over {MAX_FUNCTION_LINES}"
