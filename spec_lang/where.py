"""Source positions and the one error format of the spec language.

Every compiled construct carries the ``Where`` it came from (file, 1-based line and column), so an error found
long after loading (at layout time, with real model dimensions) still points at the YAML that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.errors import SpecError


#: Top-level sections; an error inside one (rather than inside a rule) names the section.
SECTIONS = frozenset({"dims", "let", "indices", "zero", "params", "state", "plain"})


@dataclass(frozen=True)
class Where:
    """A position in a spec file: 1-based ``line`` and ``column``."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def shifted(self, columns: int) -> "Where":
        """The position ``columns`` characters further along the same line."""
        return Where(self.file, self.line, self.column + columns)


def spec_error(where: Where | None, rule: str | None, problem: str, *, expected: str | None = None,
               found: str | None = None, fix: str | None = None) -> SpecError:
    """Build the one ``SpecError`` format: ``file:line:col: rule 'R': problem; expected E, found F. Fix.``

    The position, rule, expectation and fix are also kept as attributes (``where``, ``rule``, ``expected``,
    ``found``, ``fix``) for tools that format errors themselves.
    """
    head = f"{where}: " if where is not None else ""
    ctx = (f"section '{rule}': " if rule in SECTIONS else f"rule '{rule}': ") if rule else ""
    parts = [problem]
    if expected is not None or found is not None:
        parts.append("; ".join(x for x in (f"expected {expected}" if expected is not None else None,
                                            f"found {found}" if found is not None else None) if x))
    msg = head + ctx + "; ".join(parts) + "."
    if fix:
        fix_text = fix.strip().rstrip(".")
        msg += " " + fix_text[:1].upper() + fix_text[1:] + "."
    err = SpecError(msg)
    err.where = where  # type: ignore[attr-defined]
    err.rule = rule  # type: ignore[attr-defined]
    err.expected = expected  # type: ignore[attr-defined]
    err.found = found  # type: ignore[attr-defined]
    err.fix = fix  # type: ignore[attr-defined]
    return err
