"""Compiling one ``params:`` rule (a rank-local parameter pattern and its construct) with load-time checks.

Everything that can be checked without model dimensions is checked here, each failure one positioned
``SpecError``: unknown fields and constructs, a missing or doubled construct, a ``dim`` out of range of the
logical shape, widths that do not sum to the size, units that do not divide it, placeholders a logical name
cannot fill. What needs dims (sums over expressions) is checked again at layout time, with the same positions.
"""

from __future__ import annotations

from fractions import Fraction

from spec_lang.expr import Expr
from spec_lang.model import Fused, FusedPart, IndexDecl, ParamRule, Replicated, Shard, Tied
from spec_lang.names import Names, shape_of, to_expr
from spec_lang.patterns import DIGITS, Pattern, PatternSyntaxError
from spec_lang.where import spec_error
from spec_lang.yamlnode import Y, check_fields, describe, expect_int, expect_list, expect_str

CONSTRUCTS = ("replicated", "averaged", "shard", "fused")
PARAM_FIELDS = ("name", "when", "logical", "shape", "tied", "bucket") + CONSTRUCTS


def compile_pattern(y: Y, rule: str | None, classes: dict[str, str], what: str) -> Pattern:
    text = expect_str(y, rule, what)
    try:
        return Pattern.compile(text, classes)
    except PatternSyntaxError as e:
        raise spec_error(y.text_where.shifted(e.offset), rule, f"invalid {what} {text!r}: {e}",
                         fix="write literal text with {placeholder} names declared under 'indices'") from None


def _template(y: Y, rule: str, allowed: dict[str, str], what: str) -> str:
    """A logical-name template: only the global names of the rule's indices may appear."""
    return compile_pattern(y, rule, allowed, what).text


def compile_param_rule(y: Y, indices: tuple[IndexDecl, ...], names: Names, buckets: tuple[str, ...]) -> ParamRule:
    if isinstance(y.value, dict) and isinstance(y.value.get("name", Y(None, y.where)).value, str):
        rule = y.value["name"].value
    else:
        rule = None
    m = check_fields(y, rule, "a parameter rule", PARAM_FIELDS, ("name",), noun="construct or field")
    by_local = {ix.name: ix for ix in indices}
    pattern = compile_pattern(m["name"], rule, {ix.name: DIGITS for ix in indices}, "parameter name pattern")
    rule = pattern.text
    globals_ = {by_local[p].global_name: DIGITS for p in pattern.placeholders}
    present = [c for c in CONSTRUCTS if c in m]
    if not present:
        raise spec_error(m["name"].where, rule, "the rule has no construct", expected="one of " + ", ".join(CONSTRUCTS),
                         found="fields " + ", ".join(m), fix="say how the local tensor holds its logical tensor(s)")
    if len(present) > 1:
        raise spec_error(m[present[1]].key_where, rule, "the rule has two constructs", expected="exactly one of "
                         + ", ".join(CONSTRUCTS), found=", ".join(present), fix="split it into two rules or drop one")
    kind = present[0]
    when = to_expr(m["when"], rule, "when", names.all) if "when" in m else None
    tied = None
    logical: str | None = None
    shape: tuple[Expr, ...] | None = None
    if kind == "fused":
        for f in ("logical", "shape", "tied"):
            if f in m:
                raise spec_error(m[f].key_where, rule, f"a fused rule takes no {f!r}", expected="'parts' with one "
                                 "logical name and shape each", found=f"'{f}:'", fix=f"move it into the fused parts")
        construct = _fused(m["fused"], rule, names, globals_)
    else:
        if "shape" not in m:
            raise spec_error(m["name"].where, rule, "the rule lacks the logical 'shape'", expected="shape: [d0, d1, ...]",
                             found="no shape", fix="add the logical tensor's shape (without padding)")
        shape = shape_of(m["shape"], rule, names)
        if "logical" in m:
            logical = _template(m["logical"], rule, globals_, "logical name")
        else:
            logical = pattern.fill({ix.name: "{" + ix.global_name + "}" for ix in indices})
        if kind == "shard":
            construct = _shard(m["shard"], rule, names, shape)
        else:
            axis = m[kind]
            if axis.value != "tp":
                raise spec_error(axis.where, rule, f"'{kind}' names the axis the copies span", expected="tp",
                                 found=describe(axis.value), fix=f"write '{kind}: tp' (data-parallel replicas are implied)")
            construct = Replicated("replicated" if kind == "replicated" else "averaged", m[kind].key_where or y.where)
        if "tied" in m:
            t = check_fields(m["tied"], rule, "tied", ("to", "when"), ("to",))
            tw = to_expr(t["when"], rule, "tied.when", names.static) if "when" in t else Expr("true", t["to"].where)
            tied = Tied(_template(t["to"], rule, globals_, "tied.to"), tw, m["tied"].where)
    bucket = buckets[0]
    if "bucket" in m:
        bucket = expect_str(m["bucket"], rule, "bucket")
        if bucket not in buckets:
            raise spec_error(m["bucket"].where, rule, f"unknown bucket {bucket!r}", expected="one of " + ", ".join(buckets),
                             found=repr(bucket), fix="declare it under zero.buckets or fix the spelling")
    return ParamRule(rule, pattern, when, logical, shape, construct, tied, bucket, y.where)


def _dim(y: Y, rule: str, ndims: list[int]) -> int:
    d = expect_int(y, rule, "dim")
    nd = min(ndims)
    if not 0 <= d < nd:
        raise spec_error(y.where, rule, f"dim {d} is out of range for a {nd}-d logical shape",
                         expected=f"0..{nd - 1}" if nd else "no dim (a 0-d tensor cannot be split)", found=str(d),
                         fix="count dims from 0 in the logical shape")
    return d


def _const(e: Expr | None) -> Fraction | int | None:
    return None if e is None else e.constant()


def _shard(y: Y, rule: str, names: Names, shape: tuple[Expr, ...]) -> Shard:
    m = check_fields(y, rule, "shard", ("dim", "unit", "widths", "pad_to"), ("dim",))
    dim = _dim(m["dim"], rule, [len(shape)])
    unit = to_expr(m["unit"], rule, "shard.unit", names.all) if "unit" in m else Expr("1", m["dim"].where)
    pad_to = to_expr(m["pad_to"], rule, "shard.pad_to", names.all) if "pad_to" in m else None
    widths: tuple[Expr, ...] | None = None
    widths_expr: Expr | None = None
    if "widths" in m:
        wy = m["widths"]
        if isinstance(wy.value, list):
            widths = tuple(to_expr(w, rule, "shard.widths", names.all) for w in wy.value)
            if not widths:
                raise spec_error(wy.where, rule, "shard.widths is empty", expected="one width per TP rank",
                                 found="[]", fix="list one width per rank or use an expression in r")
        else:
            widths_expr = to_expr(wy, rule, "shard.widths", names.all | {"r"})
    size, u = _const(shape[dim]), _const(unit)
    if size is not None and u is not None:
        if u <= 0 or size % u:
            raise spec_error(unit.where, rule, f"unit {unit.source} does not divide the logical size {size} of dim {dim}",
                             expected=f"a divisor of {size}", found=str(u), fix="fix the unit or the shape")
        total = _const(pad_to) if pad_to is not None else size // u
        consts = [_const(w) for w in widths] if widths is not None else None
        if pad_to is not None and total is not None and total < size // u:
            raise spec_error(pad_to.where, rule, "pad_to is smaller than the logical size", expected=f">= {size // u} units",
                             found=str(total), fix="pad_to counts units including padding")
        if consts is not None and total is not None and all(c is not None for c in consts) and sum(consts) != total:
            raise spec_error(m["widths"].where, rule, f"widths {[int(c) for c in consts]} sum to {sum(consts)}, not to "
                             f"the {'padded ' if pad_to is not None else ''}size of dim {dim}", expected=f"a sum of {total} units"
                             + (f" ({size} / unit {u})" if u != 1 and pad_to is None else ""), found=f"a sum of {sum(consts)}",
                             fix="make the per-rank widths add up to the dim's size")
    return Shard(dim, unit, widths, widths_expr, pad_to, y.where, m["widths"].where if "widths" in m else None)


def _fused(y: Y, rule: str, names: Names, globals_: dict[str, str]) -> Fused:
    m = check_fields(y, rule, "fused", ("dim", "unit", "groups", "parts"), ("dim", "parts"))
    parts_y = expect_list(m["parts"], rule, "fused.parts")
    if not parts_y:
        raise spec_error(m["parts"].where, rule, "fused.parts is empty", expected="one entry per logical sub-tensor",
                         found="[]", fix="list the sub-tensors in their local order")
    parts = []
    for p in parts_y:
        pm = check_fields(p, rule, "a fused part", ("logical", "shape"), ("logical", "shape"))
        parts.append(FusedPart(_template(pm["logical"], rule, globals_, "fused part logical name"),
                               shape_of(pm["shape"], rule, names), p.where))
    ndims = [len(p.shape) for p in parts]
    if len(set(ndims)) != 1:
        odd = next(k for k, n in enumerate(ndims) if n != ndims[0])
        raise spec_error(parts_y[odd].where, rule, "fused parts differ in rank",
                         expected=f"{ndims[0]}-d shapes like the first part", found=f"ranks {ndims}",
                         fix="all parts are concatenated along one dim, so they have the same number of dims")
    dim = _dim(m["dim"], rule, ndims)
    unit = to_expr(m["unit"], rule, "fused.unit", names.all) if "unit" in m else Expr("1", m["dim"].where)
    groups = to_expr(m["groups"], rule, "fused.groups", names.all) if "groups" in m else None
    u, g = _const(unit), _const(groups)
    for p, py in zip(parts, parts_y):
        size = _const(p.shape[dim])
        if size is None or u is None:
            continue
        if u <= 0 or size % u:
            raise spec_error(py.where, rule, f"unit {unit.source} does not divide dim {dim} ({size}) of part {p.logical!r}",
                             expected=f"a divisor of {size}", found=str(u), fix="fix the unit or the part's shape")
        if g is not None and (g <= 0 or (size // u) % g):
            raise spec_error(groups.where if groups else py.where, rule, f"groups {g} do not divide the {size // u} units "
                             f"of part {p.logical!r}", expected="a divisor of every part's unit count", found=str(g),
                             fix="groups is the number of KV groups (kv_heads for QKV)")
    return Fused(dim, unit, groups, tuple(parts), y.where)
