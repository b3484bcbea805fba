"""``load_spec``: YAML text or file -> validated, compiled ``Spec``.

Called by users, the ``ckpt spec check`` command and the checkpoint reader (through ``Spec.from_json`` for
stored specs). Validation stops at the first problem and raises one ``SpecError`` that names the file, line and
column, the rule, what was expected and found, and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spec_lang.expr import Expr
from spec_lang.model import (BUCKET_AXES, INDEX_AXES, SPEC_VERSION, Bucket, DimDecl, Group, IndexDecl, LetDecl,
                             InertRule, ParamRule, PlainRule, Spec, StateRule, ZeroSpec)
from spec_lang.names import Names, check_identifier, to_expr
from spec_lang.patterns import DIGITS, SEGMENT, Pattern, overlap
from spec_lang.rules import compile_param_rule, compile_pattern
from spec_lang.where import Where, spec_error
from spec_lang.yamlnode import Y, check_fields, compose, describe, expect_list, expect_map, expect_str

TOP_FIELDS = ("spec", "name", "description", "dims", "let", "indices", "zero", "params", "state", "plain", "inert")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z_0-9]*)\}")


def load_spec(path_or_text: str | os.PathLike[str], *, name: str | None = None) -> Spec:
    """Load and validate a spec from a file path or from YAML text.

    A ``PathLike``, or a one-line string naming an existing file, is read as a file; any other string is YAML
    text. ``name`` labels the text in error positions (default: the path, or ``<spec>``) and names the spec when
    the YAML has no ``name:``.
    """
    if isinstance(path_or_text, os.PathLike) or ("\n" not in path_or_text and os.path.isfile(path_or_text)):
        path = Path(path_or_text)
        text = path.read_text(encoding="utf-8")
        file = name or str(path)
        default_name = name or path.stem
    else:
        text = str(path_or_text)
        file = name or "<spec>"
        default_name = name or "spec"
    return compile_spec(compose(text, file), file, text, default_name)


def compile_spec(root: Y, file: str, source: str, default_name: str) -> Spec:
    top = check_fields(root, None, "the spec", TOP_FIELDS, ("spec", "params"))
    version = top["spec"].value
    if version != SPEC_VERSION:
        raise spec_error(top["spec"].where, None, "unsupported spec version", expected=str(SPEC_VERSION),
                         found=describe(version), fix=f"write 'spec: {SPEC_VERSION}'")
    name = expect_str(top["name"], None, "name") if "name" in top else default_name
    description = str(top["description"].value) if "description" in top else ""
    names = Names()
    dims = _dims(top.get("dims"), names)
    lets = _lets(top.get("let"), names)
    indices = _indices(top.get("indices"), names)
    zero = _zero(top.get("zero"), names)
    bucket_names = tuple(b.name for b in zero.buckets)
    params = tuple(compile_param_rule(r, indices, names, bucket_names) for r in expect_list(top["params"], None, "params"))
    _no_overlap([(p.pattern, p.name, p.where) for p in params], "parameter rule")
    state = tuple(_state_rule(r, names) for r in expect_list(top["state"], None, "state")) if "state" in top else ()
    plain = tuple(_plain_rule(r) for r in expect_list(top["plain"], None, "plain")) if "plain" in top else ()
    _no_overlap([(s.pattern, s.match, s.where) for s in state] + [(p.pattern, p.match, p.where) for p in plain],
                "state rule")
    inert = tuple(_inert_rule(r, indices, params) for r in expect_list(top["inert"], None, "inert")) \
        if "inert" in top else ()
    _no_overlap([(p.pattern, p.name, p.where) for p in params] + [(r.pattern, r.name, r.where) for r in inert],
                "rule")
    return Spec(name, version, description, file, dims, lets, indices, params, state, zero, plain, source, inert)


def _inert_rule(y: Y, indices: tuple[IndexDecl, ...], params: tuple[ParamRule, ...]) -> InertRule:
    m = check_fields(y, None, "an inert rule", ("name", "beside"), ("name", "beside"))
    text = expect_str(m["name"], None, "inert name")
    pattern = compile_pattern(m["name"], text, {ix.name: DIGITS for ix in indices}, "inert name pattern")
    beside = expect_str(m["beside"], text, "beside")
    rule = next((p for p in params if p.name == beside), None)
    if rule is None:
        raise spec_error(m["beside"].where, text, "'beside' names no parameter rule", expected="the name of a rule "
                         "in params", found=repr(beside), fix="name the parameter whose module writes this key")
    extra = set(pattern.placeholders) - set(rule.pattern.placeholders)
    if extra:
        raise spec_error(m["name"].where, text, "the inert name has placeholders its parameter lacks",
                         expected=f"a subset of {sorted(rule.pattern.placeholders)}", found=str(sorted(extra)),
                         fix="use only the parameter's index placeholders")
    return InertRule(text, pattern, beside, y.where)


def _dims(y: Y | None, names: Names) -> tuple[DimDecl, ...]:
    if y is None:
        return ()
    m = expect_map(y, "dims", "dims")
    for k, v in m.items():
        check_identifier(v, k, "dims", "dim", names.dims)
        names.dims.add(k)
    out = []
    for k, v in m.items():
        default = None if v.value == "required" else to_expr(v, "dims", f"the default of dim {k!r}", names.dims)
        out.append(DimDecl(k, default, v.key_where or v.where))
    _acyclic({d.name: d.default for d in out if d.default is not None}, "dims")
    return tuple(out)


def _lets(y: Y | None, names: Names) -> tuple[LetDecl, ...]:
    if y is None:
        return ()
    m = expect_map(y, "let", "let")
    for k, v in m.items():
        check_identifier(v, k, "let", "let", names.dims | names.lets)
        names.lets.add(k)
    out = tuple(LetDecl(k, to_expr(v, "let", f"let {k!r}", names.all), v.key_where or v.where) for k, v in m.items())
    exprs = {d.name: d.expr for d in out}
    _acyclic(exprs, "let")
    # A let is static (usable in logical shapes) when it reads only dims and static lets.
    changed = True
    while changed:
        changed = False
        for d in out:
            if d.name not in names.static_lets and all(n in names.static for n, _ in d.expr.names()):
                names.static_lets.add(d.name)
                changed = True
    return out


def _acyclic(exprs: dict[str, Expr], section: str) -> None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            raise spec_error(exprs[n].where, section, f"{section} values refer to each other in a cycle: "
                             + " -> ".join(cycle), fix="break the cycle by giving one of them a value of its own")
        state[n] = 1
        for dep, _ in exprs[n].names():
            if dep in exprs:
                visit(dep, path + [n])
        state[n] = 2

    for n in exprs:
        visit(n, [])


def _indices(y: Y | None, names: Names) -> tuple[IndexDecl, ...]:
    if y is None:
        return ()
    out: list[IndexDecl] = []
    taken: set[str] = set()
    for k, v in expect_map(y, "indices", "indices").items():
        check_identifier(v, k, "indices", "index placeholder", taken | {"param", "bucket", "group", "logical"})
        taken.add(k)
        m = check_fields(v, "indices", f"index {{{k}}}", ("count", "over", "as"), ("count", "over", "as"))
        over = m["over"].value
        if over not in INDEX_AXES:
            raise spec_error(m["over"].where, "indices", f"index {{{k}}} is spread over an unknown axis",
                             expected="one of " + ", ".join(INDEX_AXES), found=describe(over),
                             fix="layers are spread over pp, experts over ep")
        gname = expect_str(m["as"], "indices", "as")
        check_identifier(m["as"], gname, "indices", "global index", taken | {"param", "bucket", "group", "logical"})
        taken.add(gname)
        count = to_expr(m["count"], "indices", f"the count of {{{k}}}", names.static)
        out.append(IndexDecl(k, gname, count, over, v.key_where or v.where))
    return tuple(out)


def _zero(y: Y | None, names: Names) -> ZeroSpec:
    if y is None:
        w = Where("<default>", 0, 0)
        return ZeroSpec(Expr("1", w), (Group("0", Expr("true", w), w),), (Bucket("dense", "dp", w),), None)
    m = check_fields(y, "zero", "zero", ("multiple", "groups", "buckets"), ("groups", "buckets"))
    multiple = to_expr(m["multiple"], "zero", "zero.multiple", names.all | {"n"}) if "multiple" in m else Expr("1", y.where)
    groups, buckets = [], []
    for g in expect_list(m["groups"], "zero", "zero.groups"):
        gm = check_fields(g, "zero", "a zero group", ("name", "when"), ("name", "when"))
        gname = str(gm["name"].value)
        if any(x.name == gname for x in groups):
            raise spec_error(gm["name"].where, "zero", f"group {gname!r} is declared twice", fix="rename one of them")
        groups.append(Group(gname, to_expr(gm["when"], "zero", "a group condition", names.all | {"ndim", "numel"}), g.where))
    for b in expect_list(m["buckets"], "zero", "zero.buckets"):
        bm = check_fields(b, "zero", "a zero bucket", ("name", "over"), ("name", "over"))
        bname = expect_str(bm["name"], "zero", "bucket name")
        if bm["over"].value not in BUCKET_AXES:
            raise spec_error(bm["over"].where, "zero", f"bucket {bname!r} is partitioned over an unknown axis",
                             expected="one of " + ", ".join(BUCKET_AXES), found=describe(bm["over"].value),
                             fix="dense parameters use dp, expert parameters edp (expert data parallel)")
        if any(x.name == bname for x in buckets):
            raise spec_error(bm["name"].where, "zero", f"bucket {bname!r} is declared twice", fix="rename one of them")
        buckets.append(Bucket(bname, bm["over"].value, b.where))
    for what, items, node in (("groups", groups, m["groups"]), ("buckets", buckets, m["buckets"])):
        if not items:
            raise spec_error(node.where, "zero", f"zero.{what} is empty", expected="at least one entry", found="[]",
                             fix=f"list the optimizer's {what}")
    return ZeroSpec(multiple, tuple(groups), tuple(buckets), y.where)


def _state_rule(y: Y, names: Names) -> StateRule:
    rule = y.value["match"].value if isinstance(y.value, dict) and "match" in y.value else None
    m = check_fields(y, rule if isinstance(rule, str) else None, "a state rule", ("match", "when", "to", "flat", "scalar"),
                     ("match",))
    kinds = [k for k in ("to", "flat") if k in m]
    if len(kinds) != 1:
        raise spec_error(m["match"].where, rule, "a state rule needs exactly one of 'to' (one key per local parameter) "
                         "and 'flat' (one key per ZeRO bucket and group)", expected="to: or flat:",
                         found=", ".join(kinds) or "neither", fix="keep exactly one")
    kind = "param" if kinds[0] == "to" else "flat"
    classes = {"param": SEGMENT} if kind == "param" else {"bucket": SEGMENT, "group": SEGMENT}
    pattern = compile_pattern(m["match"], rule, classes, "state key pattern")
    missing = [c for c in classes if c not in pattern.placeholders]
    if missing:
        raise spec_error(m["match"].text_where, rule, f"a {kinds[0]!r} rule's key pattern must use "
                         + " and ".join("{" + c + "}" for c in classes), expected=", ".join("{" + c + "}" for c in classes),
                         found=f"no {{{missing[0]}}}", fix="put the placeholder where the name appears in the key")
    tpl = compile_pattern(m[kinds[0]], pattern.text, {"logical": SEGMENT}, "logical key template")
    if "logical" not in tpl.placeholders:
        raise spec_error(m[kinds[0]].text_where, pattern.text, "the logical key template must use {logical}",
                         expected="e.g. optim/state/{logical}/exp_avg", found=repr(tpl.text),
                         fix="{logical} stands for each logical tensor name the parameter rule gives")
    when = to_expr(m["when"], pattern.text, "when", names.all) if "when" in m else None
    scalar = False
    if "scalar" in m:
        if not isinstance(m["scalar"].value, bool):
            raise spec_error(m["scalar"].where, pattern.text, "scalar must be true or false", expected="a boolean",
                             found=describe(m["scalar"].value), fix="write 'scalar: true' for a 0-d value per parameter")
        scalar = m["scalar"].value
    return StateRule(pattern.text, pattern, when, kind, tpl.text, scalar, y.where)


def _plain_rule(y: Y) -> PlainRule:
    text = expect_str(y, None, "a plain key pattern")
    classes = {n: SEGMENT for n in _PLACEHOLDER.findall(text)}
    pattern = compile_pattern(y, text, classes, "plain key pattern")
    return PlainRule(pattern.text, pattern, y.where)


def _no_overlap(items: list[tuple[Pattern, str, Where]], what: str) -> None:
    for j in range(len(items)):
        for i in range(j):
            witness = overlap(items[i][0], items[j][0])
            if witness is not None:
                raise spec_error(items[j][2], items[j][1], f"the pattern matches keys that {what} '{items[i][1]}' "
                                 f"(at {items[i][2]}) matches too, e.g. {witness!r}",
                                 expected="every key matched by one rule", found="two rules",
                                 fix="make the patterns disjoint (more literal text) or merge the two rules")
