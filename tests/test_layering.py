"""DESIGN.md's layering, checked on the import graph: every import of a project package points down.

Module-level and function-level imports both count (a lazy import is still a dependency). ``ckpt.errors`` is
the one leaf every layer may import. ``megatron_ref`` imitates an external framework, so it imports nothing of
the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("integrations", "snapshot_daemon", "ckpt", "resharding", "formats", "spec_lang", "megatron_ref")
ALLOWED = {
    "integrations": {"ckpt"},
    "snapshot_daemon": {"ckpt", "formats"},
    "ckpt": {"resharding", "formats", "spec_lang"},
    "resharding": {"formats", "spec_lang"},
    "formats": set(),
    "spec_lang": set(),
    "megatron_ref": set(),
}
LEAF = "ckpt.errors"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_imports_point_down() -> None:
    problems = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, name in _imports(path):
                top = name.split(".")[0]
                if top not in PACKAGES or top == pkg:
                    continue
                if name == LEAF or name.startswith(LEAF + "."):
                    continue
                if top == "ckpt" and name in ("ckpt", "ckpt.errors"):
                    continue
                if top not in ALLOWED[pkg]:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {pkg} imports {name}")
    assert not problems, "imports that point up or sideways (DESIGN.md, Layers):\n  " + "\n  ".join(problems)


def test_megatron_ref_imports_nothing_of_the_project() -> None:
    for path in (ROOT / "megatron_ref").rglob("*.py"):
        for line, name in _imports(path):
            assert name.split(".")[0] not in set(PACKAGES) - {"megatron_ref"}, f"{path}:{line}: {name}"
