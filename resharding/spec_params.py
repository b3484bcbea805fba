"""Rank-local parameters of a spec-driven layout: names, local shapes, and the logical boxes each one holds.

Called by ``spec_layout.rank_layout`` (one rank) and ``spec_layout.logical_shapes`` (no parallelism). A parameter's
pieces are boxes of the local tensor (``ParamPiece.local_box``) equal to boxes of one logical tensor; local elements
no piece covers are padding. Every construct is a pure function of the rule, the dims and the TP coordinate:

- ``replicated``/``averaged``: the whole logical tensor on every TP rank;
- ``shard``: ``widths[r]`` units along ``dim`` on TP rank ``r`` (default ``split``), clipped to the logical size
  when ``pad_to`` pads the split (vocabulary padding);
- ``fused``: parts concatenated along ``dim``, either each split over TP on its own, or grouped (see ``_fused``).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Mapping

from formats.box import Box
from resharding.grid import Coords, Grid
from resharding.spec_scope import Scope, axis_rank
from spec_lang import Expr, Fused, ParamRule, Replicated, Shard, Spec, spec_error, split_count, split_start
from spec_lang.where import Where


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z_0-9]*)\}")


def fill(template: str, values: Mapping[str, object]) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]``."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


@dataclass(frozen=True)
class ParamPiece:
    """``local_box`` of the local parameter equals the box at ``logical_offsets`` (same sizes) of ``logical``."""

    local_box: Box
    logical: str
    logical_offsets: tuple[int, ...]
    #: Another model-parallel position (TP rank, or the other stage of a tied pair) holds the same elements.
    replicated: bool
    averaged: bool


@dataclass(frozen=True)
class LocalParam:
    name: str
    rule: ParamRule
    shape: tuple[int, ...]
    pieces: tuple[ParamPiece, ...]
    #: Every logical name the parameter contributes to, even where this rank holds none of its elements (its
    #: optimizer step counts for all of them).
    logical_names: tuple[str, ...]
    bucket: str
    sort_key: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class LayoutContext:
    """What every rank of one (spec, dims, grid) layout shares: the resolved dims, the named_parameters() order
    and the logical names that two rules produce (tied parameters)."""

    def __init__(self, spec: Spec, dims: dict[str, int], grid: Grid) -> None:
        self.spec, self.dims, self.grid = spec, dims, grid
        self.static = Scope(spec, dims)
        self.first_with_prefix: dict[str, int] = {}
        for k, rule in enumerate(spec.params):
            for prefix, _ in rule.pattern.prefixes():
                self.first_with_prefix.setdefault(prefix, k)
        self.shared = self._shared_templates()

    def scope(self, coords: Coords) -> Scope:
        return Scope(self.spec, self.dims, self.grid, coords)

    def templates(self, rule: ParamRule) -> list[str]:
        """The logical-name templates ``rule`` produces in this layout (a tied rule: its target's)."""
        if isinstance(rule.construct, Fused):
            return [p.logical for p in rule.construct.parts]
        if rule.tied is not None and self.static.true(rule.tied.when, rule.name):
            return [rule.tied.to]
        return [rule.logical or ""]

    def _shared_templates(self) -> frozenset[str]:
        producers: dict[str, list[ParamRule]] = {}
        positions = [Coords(t, p, e, e, 0) for t in range(self.grid.tp) for p in range(self.grid.pp)
                     for e in range(self.grid.ep)]
        scopes = [self.scope(c) for c in positions]
        for rule in self.spec.params:
            if any(s.true(rule.when, rule.name) for s in scopes):
                for tpl in self.templates(rule):
                    producers.setdefault(tpl, []).append(rule)
        shared = set()
        for tpl, rules in producers.items():
            if len(rules) < 2:
                continue
            if not any(r.tied is not None for r in rules):
                raise spec_error(rules[1].where, rules[1].name, f"two rules hold the logical tensor {tpl!r} (the other is "
                                 f"'{rules[0].name}' at {rules[0].where})", expected="one rule per logical tensor",
                                 found="two", fix="mark the copy with 'tied: {to: ...}' or give it its own logical name")
            shared.add(tpl)
        return frozenset(shared)

    def sort_key(self, index: int, rule: ParamRule, values: dict[str, int]) -> tuple[int, ...]:
        """named_parameters() order: rule order, rules sharing the text up to a placeholder iterated together."""
        key: list[int] = []
        for prefix, name in rule.pattern.prefixes():
            key += [self.first_with_prefix[prefix], values[name]]
        return tuple(key + [index])


def index_bindings(spec: Spec, rule: ParamRule, scope: Scope, coords: Coords | None, grid: Grid | None) -> list[dict[str, int]]:
    """Every ``{local: i, global: L}`` binding of the rule's placeholders on this rank (or globally, no coords)."""
    ranges = []
    for name in rule.pattern.placeholders:
        ix = spec.index(name)
        count = scope.int(ix.count, "indices", f"the count of {{{name}}}")
        if coords is None or grid is None:
            ranges.append([(name, ix.global_name, g, g) for g in range(count)])
            continue
        n, r = grid.size(ix.over), axis_rank(coords, ix.over)
        start = split_start(count, n, r)
        ranges.append([(name, ix.global_name, i, start + i) for i in range(split_count(count, n, r))])
    out = []
    for combo in itertools.product(*ranges):
        b: dict[str, int] = {}
        for name, gname, local, glob in combo:
            b[name], b[gname] = local, glob
        out.append(b)
    return out


def local_params(ctx: LayoutContext, coords: Coords) -> list[LocalParam]:
    """The rank's parameters in named_parameters() order."""
    scope = ctx.scope(coords)
    out = []
    for k, rule in enumerate(ctx.spec.params):
        if not scope.true(rule.when, rule.name):
            continue
        for b in index_bindings(ctx.spec, rule, scope, coords, ctx.grid):
            shape, pieces, names = build_param(ctx, rule, scope, b, coords.tp)
            out.append(LocalParam(rule.pattern.fill(b), rule, shape, tuple(pieces), tuple(names), rule.bucket,
                                  ctx.sort_key(k, rule, b)))
    out.sort(key=lambda p: p.sort_key)
    return out


def logical_params(spec: Spec, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every logical parameter name (no ``model/`` prefix) and its shape, from the rules alone."""
    scope = Scope(spec, dims)
    out: dict[str, tuple[int, ...]] = {}
    for rule in spec.params:
        for b in index_bindings(spec, rule, scope, None, None):
            items: list[tuple[str, tuple[Expr, ...], Where]]
            if isinstance(rule.construct, Fused):
                items = [(p.logical, p.shape, p.where) for p in rule.construct.parts]
            else:
                tied = rule.tied.to if rule.tied is not None and scope.true(rule.tied.when, rule.name) else None
                items = [(tied or rule.logical or "", rule.shape or (), rule.where)]
            for tpl, shape_exprs, where in items:
                name = fill(tpl, b)
                shape = tuple(scope.int(e, rule.name, "a logical shape entry") for e in shape_exprs)
                if any(s < 0 for s in shape):
                    raise spec_error(where, rule.name, f"logical shape of {name!r} is negative", expected="sizes >= 0",
                                     found=str(list(shape)), fix="check the dims")
                if name in out and out[name] != shape:
                    raise spec_error(where, rule.name, f"logical tensor {name!r} gets two shapes", expected=str(list(out[name])),
                                     found=str(list(shape)), fix="tied copies must have the logical shape of their target")
                out[name] = shape
    return out


def build_param(ctx: LayoutContext, rule: ParamRule, scope: Scope, b: dict[str, int], t: int
                ) -> tuple[tuple[int, ...], list[ParamPiece], list[str]]:
    """Local shape, pieces and logical names of one parameter on TP rank ``t``."""
    T = ctx.grid.tp
    c = rule.construct
    if isinstance(c, Fused):
        return _fused(ctx, rule, c, scope, b, t, T)
    tpl = ctx.templates(rule)[0]
    name = fill(tpl, b)
    shared = tpl in ctx.shared
    shape = tuple(scope.int(e, rule.name, "a logical shape entry") for e in rule.shape or ())
    zeros = (0,) * len(shape)
    if isinstance(c, Replicated):
        averaged = c.policy == "averaged" and T > 1
        return shape, [ParamPiece(Box.whole(shape), name, zeros, T > 1 or shared, averaged)], [name]
    assert isinstance(c, Shard)
    d = c.dim
    u = _unit(c.unit, scope, rule, shape[d], name)
    units = shape[d] // u
    total = scope.int(c.pad_to, rule.name, "pad_to") if c.pad_to is not None else units
    if total < units:
        raise spec_error(c.pad_to.where if c.pad_to else c.where, rule.name, f"pad_to {total} is smaller than the "
                         f"{units} units of {name!r}", expected=f">= {units}", found=str(total), fix="pad_to counts units, padding included")
    widths = _widths(c, scope, rule, total, T)
    start, w = sum(widths[:t]), widths[t]
    local = list(shape)
    local[d] = w * u
    real = max(0, min(start + w, units) - start)
    pieces = []
    if real and all(shape):
        sizes = list(shape)
        sizes[d] = real * u
        offs = [0] * len(shape)
        offs[d] = start * u
        pieces.append(ParamPiece(Box(zeros, tuple(sizes)), name, tuple(offs), shared, False))
    return tuple(local), pieces, [name]


def _unit(e: Expr, scope: Scope, rule: ParamRule, size: int, name: str) -> int:
    u = scope.int(e, rule.name, "unit")
    if u <= 0 or size % u:
        raise spec_error(e.where, rule.name, f"unit {e.source} = {u} does not divide {size} (the split dim of {name!r})",
                         expected=f"a positive divisor of {size}", found=str(u), fix="check the unit and the dims")
    return u


def _widths(c: Shard, scope: Scope, rule: ParamRule, total: int, T: int) -> list[int]:
    if c.widths is not None:
        if len(c.widths) != T:
            raise spec_error(c.widths_where, rule.name, f"widths lists {len(c.widths)} ranks but tp = {T}",
                             expected=f"{T} widths", found=f"{len(c.widths)}", fix="give one width per TP rank, or an "
                             "expression in r")
        widths = [scope.int(w, rule.name, "a width") for w in c.widths]
        where = c.widths_where
    elif c.widths_expr is not None:
        widths = [scope.with_(r=r).int(c.widths_expr, rule.name, "a width") for r in range(T)]
        where = c.widths_where
    else:
        return [split_count(total, T, r) for r in range(T)]
    if any(w < 0 for w in widths) or sum(widths) != total:
        raise spec_error(where, rule.name, f"widths {widths} over tp = {T} do not sum to the {total} units of dim {c.dim}",
                         expected=f"non-negative widths summing to {total}", found=f"a sum of {sum(widths)}",
                         fix="make the per-rank widths add up to the dim's size (padding included)")
    return widths


def _fused(ctx: LayoutContext, rule: ParamRule, c: Fused, scope: Scope, b: dict[str, int], t: int, T: int
           ) -> tuple[tuple[int, ...], list[ParamPiece], list[str]]:
    """Grouped (``groups``): part 0 is split over TP; the rank holds the groups its part-0 units touch and lays them
    out group by group: its part-0 units in the group, then the whole group's share of each other part. A group
    whose part-0 units span several TP ranks is held whole by each of them (TP replicas). Ungrouped: each part
    split on its own, the slices concatenated in part order."""
    d = c.dim
    names = [fill(p.logical, b) for p in c.parts]
    shapes = [tuple(scope.int(e, rule.name, "a logical shape entry") for e in p.shape) for p in c.parts]
    for p, s in zip(c.parts, shapes):
        if s[:d] + s[d + 1:] != shapes[0][:d] + shapes[0][d + 1:]:
            raise spec_error(p.where, rule.name, f"fused part {p.logical!r} has shape {list(s)}; parts may differ only in "
                             f"dim {d}", expected=f"the other dims of {list(shapes[0])}", found=str(list(s)),
                             fix="fused parts are concatenated along one dim")
    u = scope.int(c.unit, rule.name, "unit")
    units = []
    for n, s in zip(names, shapes):
        units.append(s[d] // _unit(c.unit, scope, rule, s[d], n))
    segments: list[tuple[int, int, int, bool]] = []  # (part, logical unit start, unit count, replicated)
    if c.groups is None:
        for k, n_units in enumerate(units):
            segments.append((k, split_start(n_units, T, t), split_count(n_units, T, t), False))
    else:
        G = scope.int(c.groups, rule.name, "groups")
        if G <= 0 or any(n % G for n in units):
            raise spec_error(c.groups.where, rule.name, f"groups = {G} does not divide the unit counts {units} of the parts",
                             expected="a positive divisor of every part's units", found=str(G),
                             fix="groups is the number of KV groups (kv_heads for QKV)")
        per = [n // G for n in units]
        h, w = split_start(units[0], T, t), split_count(units[0], T, t)

        def holders(g: int) -> int:
            lo, hi = g * per[0], (g + 1) * per[0]
            return sum(1 for r in range(T) if split_count(units[0], T, r) and split_start(units[0], T, r) < hi
                       and split_start(units[0], T, r) + split_count(units[0], T, r) > lo)

        if w:
            for g in range(h // per[0], (h + w - 1) // per[0] + 1):
                a, z = max(h, g * per[0]), min(h + w, (g + 1) * per[0])
                segments.append((0, a, z - a, False))
                shared_group = holders(g) > 1
                for k in range(1, len(units)):
                    segments.append((k, g * per[k], per[k], shared_group))
    pieces, off = [], 0
    zeros = [0] * len(shapes[0])
    for k, start, count, replicated in segments:
        if count:
            loc, sizes, offs = list(zeros), list(shapes[k]), list(zeros)
            loc[d], sizes[d], offs[d] = off * u, count * u, start * u
            if all(sizes):
                pieces.append(ParamPiece(Box(tuple(loc), tuple(sizes)), names[k], tuple(offs), replicated, False))
        off += count
    local = list(shapes[0])
    local[d] = off * u
    return tuple(local), pieces, names
