"""Which names an expression may read where, and turning YAML scalars into checked ``Expr``s.

The loader builds one ``Names`` per spec: the declared dims and ``let`` values, the parallel sizes and rank
coordinates, and the subset that does not depend on parallelism (``static``). Logical shapes and index counts may
only read static names, because a logical tensor must look the same under every parallel layout.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field

from spec_lang.expr import FUNCTIONS, KEYWORDS, Expr
from spec_lang.model import PARALLEL_SIZES, RANK_NAMES
from spec_lang.where import spec_error
from spec_lang.yamlnode import Y, describe

#: Names a local context adds: ``r`` (the part index in ``widths``), ``n`` (a bucket's DP size in
#: ``zero.multiple``), ``ndim``/``numel`` (of the local parameter, in ``zero.groups``).
CONTEXT_NAMES = ("r", "n", "ndim", "numel")
RESERVED = frozenset(PARALLEL_SIZES) | frozenset(RANK_NAMES) | frozenset(FUNCTIONS) | frozenset(KEYWORDS) | frozenset(
    CONTEXT_NAMES)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*\Z")


@dataclass
class Names:
    dims: set[str] = field(default_factory=set)
    lets: set[str] = field(default_factory=set)
    static_lets: set[str] = field(default_factory=set)

    @property
    def static(self) -> frozenset[str]:
        return frozenset(self.dims | self.static_lets)

    @property
    def all(self) -> frozenset[str]:
        return frozenset(self.dims | self.lets) | frozenset(PARALLEL_SIZES) | frozenset(RANK_NAMES)


def check_identifier(y_key: Y, name: str, rule: str | None, what: str, taken: set[str]) -> None:
    where = y_key.key_where or y_key.where
    if not _IDENT.match(name) or keyword.iskeyword(name):
        raise spec_error(where, rule, f"{what} name {name!r} is not an identifier", expected="letters, digits, _",
                         found=repr(name), fix="rename it")
    if name in RESERVED:
        raise spec_error(where, rule, f"{what} name {name!r} is reserved", expected="a name other than "
                         + ", ".join(sorted(RESERVED)), found=repr(name), fix="rename it")
    if name in taken:
        raise spec_error(where, rule, f"{what} name {name!r} is declared twice", fix="rename one of them")


def to_expr(y: Y, rule: str | None, what: str, allowed: frozenset[str] | set[str]) -> Expr:
    """``y`` (an int, bool or string) as a parsed ``Expr`` that reads only ``allowed`` names."""
    v = y.value
    if isinstance(v, bool):
        src = "true" if v else "false"
    elif isinstance(v, int):
        src = str(v)
    elif isinstance(v, str):
        src = v
    else:
        raise spec_error(y.where, rule, f"{what} must be an integer or an expression", expected="e.g. 8 or 'heads * head_dim'",
                         found=describe(v), fix="write an integer or a quoted expression")
    e = Expr.checked(src, y.text_where, rule)
    e.check_names(allowed, rule, what)
    return e


def shape_of(y: Y, rule: str, names: Names) -> tuple[Expr, ...]:
    from spec_lang.yamlnode import expect_list
    items = expect_list(y, rule, "shape")
    out = []
    for it in items:
        e = Expr.checked(_src(it, rule), it.text_where, rule)
        for name, off in e.names():
            if name in names.static:
                continue
            if name in names.all:
                raise spec_error(e.at(off), rule, f"logical shape {e.source!r} reads {name!r}, which varies with the "
                                 "parallel layout", expected="model dims only", found=repr(name),
                                 fix="a logical tensor has one shape under every layout: describe padding and "
                                 "splits in the construct (e.g. shard.pad_to), not in the shape")
            e.check_names(names.static, rule, "shape")
        out.append(e)
    return tuple(out)


def _src(y: Y, rule: str) -> str:
    v = y.value
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise spec_error(y.where, rule, "a shape entry must be an integer or an expression",
                         expected="e.g. hidden or 'heads * head_dim'", found=describe(v), fix="fix the entry")
    return str(v)
