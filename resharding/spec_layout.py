"""Spec-driven rank layouts: for one rank, every local tensor key, its shape, and the logical boxes it holds.

Who calls it: save and load (on every rank, for the rank's own layout), offline conversion and tests (for every
rank of a layout, simulated in one process). Pure: no torch, no I/O.

A ``Piece`` says that the strided view ``(storage_offset, sizes, strides)`` of the contiguous local tensor equals
the box ``(logical_offsets, sizes)`` of logical tensor ``logical_key``. For an ordinary parameter the view is a box
of the local tensor; for a ZeRO flat buffer it is a box of a parameter that lives contiguously inside the 1-D
partition (a fragment is first cut into contiguous boxes of the local parameter, each then intersected with the
parameter's own pieces). Local elements no piece covers are padding (vocabulary rows, alignment): zero on load.
A piece's ``policy`` says how the ranks holding the same elements relate: ``unique`` (no other holder),
``replicated`` (every holder has equal values; verify) or ``averaged`` (holders diverge; take the mean).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ckpt.errors import SpecError
from formats.box import Box, box_flat_start, flat_range_to_boxes, row_major_strides
from resharding.grid import Coords, Grid
from resharding.spec_params import LayoutContext, LocalParam, ParamPiece, fill, local_params, logical_params
from resharding.spec_scope import resolve_dims
from resharding.spec_zero import FlatBuffer, flat_buffers
from spec_lang import Spec, StateRule, spec_error

UNIQUE, REPLICATED, AVERAGED = "unique", "replicated", "averaged"
POLICIES = (UNIQUE, REPLICATED, AVERAGED)


@dataclass(frozen=True)
class Piece:
    """Local view ``as_strided(sizes, strides, storage_offset)`` == logical ``logical_key[logical_offsets + sizes]``."""

    logical_key: str
    logical_offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    storage_offset: int
    strides: tuple[int, ...]
    policy: str

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise SpecError(f"{self!r}: policy must be one of {POLICIES}")
        if not len(self.logical_offsets) == len(self.sizes) == len(self.strides):
            raise SpecError(f"{self!r}: offsets, sizes and strides differ in length")

    @property
    def box(self) -> Box:
        return Box(self.logical_offsets, self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class LocalTensor:
    """One rank-local tensor key: its shape and pieces; ``rule`` is the state rule (its key pattern) that made it."""

    key: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    rule: str
    #: Local parameter names it holds (one, or every parameter of a flat buffer).
    params: tuple[str, ...]


@dataclass(frozen=True)
class RankLayout:
    """Every local tensor of one rank, in state-rule order then parameter order; index it by key."""

    rank: int
    coords: Coords
    grid: Grid
    tensors: tuple[LocalTensor, ...]
    _by_key: dict[str, LocalTensor] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {t.key: t for t in self.tensors})

    def __getitem__(self, key: str) -> LocalTensor:
        return self._by_key[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[LocalTensor]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        return [t.key for t in self.tensors]


@functools.lru_cache(maxsize=64)
def _context(spec: Spec, dims: tuple[tuple[str, int], ...], grid: Grid) -> LayoutContext:
    return LayoutContext(spec, dict(dims), grid)


def layout_context(spec: Spec, dims: Mapping[str, Any] | Any, parallel: Grid | Mapping[str, Any] | Any) -> LayoutContext:
    """The shared part of a layout (cached): resolved dims, grid, parameter order, tied names."""
    resolved = resolve_dims(spec, dims)
    return _context(spec, tuple(sorted(resolved.items())), Grid.of(parallel))


def logical_shapes(spec: Spec, dims: Mapping[str, Any] | Any) -> dict[str, tuple[int, ...]]:
    """Every logical key the spec's state rules produce, with its shape (scalar rules: ``()``). Parallel-free."""
    params = logical_params(spec, resolve_dims(spec, dims))
    out: dict[str, tuple[int, ...]] = {}
    for s in spec.state:
        for name, shape in params.items():
            key = fill(s.to, {"logical": name})
            shp = () if s.scalar else shape
            if out.setdefault(key, shp) != shp:
                raise spec_error(s.where, s.match, f"logical key {key!r} gets two shapes", expected=str(list(out[key])),
                                 found=str(list(shp)), fix="a scalar rule and a tensor rule may not share a logical key")
    return out


def rank_layout(spec: Spec, dims: Mapping[str, Any] | Any, parallel: Grid | Mapping[str, Any] | Any, rank: int,
                local_shapes: Mapping[str, tuple[int, ...]] | None = None) -> RankLayout:
    """The layout of global ``rank`` under ``parallel`` (``tp``, ``pp``, ``dp``, ``ep``, ``zero``, ``order``).

    With ``local_shapes`` (the rank's flattened tensor keys and shapes), also check that the spec describes exactly
    that state: every key it predicts is present with its shape, and every given key is predicted or matches a
    ``plain`` rule; all mismatches are raised together in one ``SpecError``.
    """
    ctx = layout_context(spec, dims, parallel)
    coords = ctx.grid.coords(rank)
    params = local_params(ctx, coords)
    scope = ctx.scope(coords)
    active = [s for s in spec.state if scope.true(s.when, s.match)]
    counts: dict[str, int] = {}
    for s in active:
        counts[s.to] = counts.get(s.to, 0) + 1
    multi = {tpl for tpl, c in counts.items() if c > 1}
    buffers = flat_buffers(ctx, coords, params) if any(s.kind == "flat" for s in active) else []
    tensors: list[LocalTensor] = []
    seen: dict[str, StateRule] = {}
    for s in active:
        made = ([_param_tensor(ctx, s, p, s.to in multi) for p in params] if s.kind == "param"
                else [_flat_tensor(ctx, s, buf, s.to in multi) for buf in buffers])
        for t in made:
            if t.key in seen:  # only possible when a parameter name makes a key another rule's pattern covers
                raise spec_error(s.where, s.match, f"the local key {t.key!r} is also made by rule '{seen[t.key].match}' "
                                 f"(at {seen[t.key].where})", expected="one rule per key", found="two",
                                 fix="make the key patterns disjoint")
            seen[t.key] = s
        tensors += made
    rl = RankLayout(rank, coords, ctx.grid, tuple(tensors))
    if local_shapes is not None:
        check_against(spec, rl, local_shapes)
    return rl


def _policy(pp: ParamPiece, more_holders: bool) -> str:
    if pp.averaged:
        return AVERAGED
    return REPLICATED if pp.replicated or more_holders else UNIQUE


def _dp_size(ctx: LayoutContext, p: LocalParam) -> int:
    bucket = next(b for b in ctx.spec.zero.buckets if b.name == p.bucket)
    return ctx.grid.size(bucket.over)


def _scalar_pieces(ctx: LayoutContext, s: StateRule, p: LocalParam, more_holders: bool) -> list[Piece]:
    # Every TP rank holding the parameter, every member of its DP group, and the other copy of a tied parameter
    # hold the same step.
    shared = ctx.grid.tp > 1 or any(pc.replicated for pc in p.pieces) or more_holders or any(
        tpl in ctx.shared for tpl in ctx.templates(p.rule))
    policy = REPLICATED if shared else UNIQUE
    return [Piece(fill(s.to, {"logical": n}), (), (), 0, (), policy) for n in p.logical_names]


def _param_tensor(ctx: LayoutContext, s: StateRule, p: LocalParam, multi: bool) -> LocalTensor:
    key = fill(s.pattern.text, {"param": p.name})
    more = multi or _dp_size(ctx, p) > 1
    if s.scalar:
        return LocalTensor(key, (), tuple(_scalar_pieces(ctx, s, p, more)), s.match, (p.name,))
    strides = row_major_strides(p.shape)
    pieces = tuple(Piece(fill(s.to, {"logical": pp.logical}), pp.logical_offsets, pp.local_box.sizes,
                         box_flat_start(p.shape, pp.local_box), strides, _policy(pp, more)) for pp in p.pieces)
    return LocalTensor(key, p.shape, pieces, s.match, (p.name,))


def _flat_tensor(ctx: LayoutContext, s: StateRule, buf: FlatBuffer, multi: bool) -> LocalTensor:
    key = fill(s.pattern.text, {"bucket": buf.bucket, "group": buf.group})
    names = tuple(p.name for p in buf.params)
    if s.scalar:
        pieces = [pc for p in buf.params for pc in _scalar_pieces(ctx, s, p, multi or buf.group_size > 1)]
        return LocalTensor(key, (), tuple(pieces), s.match, names)
    out = []
    for frag in buf.fragments:
        p = buf.params[frag.index]
        strides = row_major_strides(p.shape)
        for box in flat_range_to_boxes(p.shape, frag.start, frag.stop):
            for pp in p.pieces:
                inter = box.intersect(pp.local_box)
                if inter is None or inter.is_empty():
                    continue
                offs = tuple(lo + (a - b) for lo, a, b in zip(pp.logical_offsets, inter.offsets, pp.local_box.offsets))
                at = frag.offset + box_flat_start(p.shape, inter) - frag.start
                out.append(Piece(fill(s.to, {"logical": pp.logical}), offs, inter.sizes, at, strides,
                                 _policy(pp, multi)))
    return LocalTensor(key, (buf.numel,), tuple(out), s.match, names)


def check_against(spec: Spec, rl: RankLayout, local_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one ``SpecError`` listing every difference between ``rl`` and a rank's real tensor shapes."""
    problems = []
    for t in rl.tensors:
        if t.key not in local_shapes:
            problems.append(f"{t.key}: the spec expects a local tensor of shape {list(t.shape)} (rule '{t.rule}'), "
                            "the state has none")
        elif tuple(local_shapes[t.key]) != t.shape:
            problems.append(f"{t.key}: the spec expects shape {list(t.shape)} (rule '{t.rule}'), the state has "
                            f"{list(local_shapes[t.key])}")
    for key in local_shapes:
        if key not in rl and not any(p.pattern.match(key) is not None for p in spec.plain) and not spec.is_inert(key):
            problems.append(f"{key}: no rule of the spec predicts this key on rank {rl.rank}")
    if problems:
        raise SpecError(f"spec '{spec.name}' ({spec.file}) does not describe the state of rank {rl.rank} "
                        f"(coords {rl.coords}); {len(problems)} problem(s):\n  " + "\n  ".join(problems)
                        + "\nFix the spec (or the dims and parallel settings passed in) so that they match the state.")
