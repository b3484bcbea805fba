"""STYLE.md's house rules on size, checked on the source: no library function over 80 lines, no module over 500
lines, and no god class (``Checkpointer`` keeps fewer than 15 methods of its own).

Lines are counted as ``ast`` sees them: a function from its ``def`` (decorators excluded) to its last line, a module
by its newline characters.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("ckpt", "formats", "resharding", "spec_lang", "snapshot_daemon")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
MAX_CHECKPOINTER_METHODS = 14


def _modules() -> list[Path]:
    return [p for pkg in LIBRARY_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_library_is_found() -> None:
    assert len(_modules()) > 20, f"expected the library packages {LIBRARY_PACKAGES} under {ROOT}"


def test_no_function_is_longer_than_80_lines() -> None:
    too_long = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for fn in _functions(tree):
            lines = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {lines} lines")
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into named helpers):\n  "
                          + "\n  ".join(too_long))


def test_no_module_is_longer_than_500_lines() -> None:
    too_long = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, (f"modules over {MAX_MODULE_LINES} lines (split them by concern):\n  "
                          + "\n  ".join(too_long))


def test_checkpointer_is_not_a_god_class() -> None:
    path = ROOT / "ckpt" / "checkpointer.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Checkpointer"]
    assert len(classes) == 1, f"{path}: expected one class Checkpointer, found {len(classes)}"
    methods = [n.name for n in classes[0].body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert len(methods) <= MAX_CHECKPOINTER_METHODS, (
        f"{path}: Checkpointer defines {len(methods)} methods ({', '.join(methods)}); keep it under 15 by moving "
        "jobs into collaborators")
