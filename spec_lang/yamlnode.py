"""YAML composed into positioned values (``Y``) and the small field-checking helpers the loader uses.

``yaml.compose`` keeps every node's start mark; the values are built with pyyaml's safe constructor (so ``0x10``,
``true`` and ``1e3`` mean what YAML says), and every mapping is checked for duplicate keys, which plain
``yaml.safe_load`` silently merges.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import yaml

from spec_lang.where import Where, spec_error


@dataclass
class Y:
    """A YAML value with its position. Mappings hold ``dict[str, Y]``, sequences ``list[Y]``."""

    value: Any
    where: Where
    #: Columns between the node's mark and the first character of the scalar text (1 for a quoted scalar).
    text_shift: int = 0
    key_where: Where | None = None

    @property
    def text_where(self) -> Where:
        return self.where.shifted(self.text_shift)


def _where(file: str, mark: Any) -> Where:
    return Where(file, mark.line + 1, mark.column + 1)


def compose(text: str, file: str) -> Y:
    """Parse ``text`` into ``Y`` values; YAML syntax errors become positioned ``SpecError``s."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _where(file, mark) if mark is not None else None
        raise spec_error(where, None, f"not valid YAML: {e.problem or e}",
                         fix="fix the YAML syntax at this position") from None
    if node is None:
        raise spec_error(Where(file, 1, 1), None, "the spec is empty", expected="a mapping with 'spec: 1'",
                         found="nothing", fix="start from one of the shipped specs in spec_lang/specs/")
    return _convert(node, file, yaml.SafeLoader(""))


def _convert(node: yaml.Node, file: str, loader: yaml.SafeLoader) -> Y:
    where = _where(file, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Y] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            kwhere = _where(file, knode.start_mark)
            if not isinstance(key, str):
                raise spec_error(kwhere, None, f"mapping key {key!r} is not a string", expected="a string key",
                                 found=type(key).__name__, fix="quote the key")
            if key in out:
                raise spec_error(kwhere, None, f"duplicate key {key!r} (first at {out[key].key_where})",
                                 fix="remove or rename one of them")
            y = _convert(vnode, file, loader)
            y.key_where = kwhere
            out[key] = y
        return Y(out, where)
    if isinstance(node, yaml.SequenceNode):
        return Y([_convert(v, file, loader) for v in node.value], where)
    value = loader.construct_object(node, deep=True)
    shift = 1 if node.style in ("'", '"') else 0
    return Y(value, where, text_shift=shift)


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def check_fields(y: Y, rule: str | None, what: str, allowed: tuple[str, ...], required: tuple[str, ...] = (),
                 noun: str = "field") -> dict[str, Y]:
    """``y`` must be a mapping whose keys are in ``allowed`` and include ``required``; returns the mapping."""
    m = expect_map(y, rule, what)
    for k, v in m.items():
        if k not in allowed:
            hint = suggest(k, allowed)
            raise spec_error(v.key_where, rule, f"unknown {noun} {k!r} in {what}", expected="one of " + ", ".join(allowed),
                             found=repr(k), fix=(hint.capitalize() + " Otherwise r" if hint else "R")
                             + "emove it or use a listed one")
    for k in required:
        if k not in m:
            raise spec_error(y.where, rule, f"{what} lacks the required field {k!r}", expected=f"a {k!r} field",
                             found="fields " + (", ".join(m) or "none"), fix=f"add '{k}:'")
    return m


def expect_map(y: Y, rule: str | None, what: str) -> dict[str, Y]:
    if not isinstance(y.value, dict):
        raise spec_error(y.where, rule, f"{what} must be a mapping", expected="a mapping (key: value lines)",
                         found=describe(y.value), fix="write it as 'key: value' entries")
    return y.value


def expect_list(y: Y, rule: str | None, what: str) -> list[Y]:
    if not isinstance(y.value, list):
        raise spec_error(y.where, rule, f"{what} must be a list", expected="a list ('- item' lines or [a, b])",
                         found=describe(y.value), fix="write it as a YAML list")
    return y.value


def expect_str(y: Y, rule: str | None, what: str) -> str:
    if not isinstance(y.value, str) or not y.value:
        raise spec_error(y.where, rule, f"{what} must be a non-empty string", expected="a string",
                         found=describe(y.value), fix="quote the value")
    return y.value


def expect_int(y: Y, rule: str | None, what: str) -> int:
    if isinstance(y.value, bool) or not isinstance(y.value, int):
        raise spec_error(y.where, rule, f"{what} must be an integer literal", expected="an integer",
                         found=describe(y.value), fix="write a plain integer")
    return y.value


def describe(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "nothing (null)"
    return f"{type(v).__name__} {v!r}"
