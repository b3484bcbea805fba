"""ZeRO flat partitions: which element ranges of which local parameters a rank's flat buffers hold.

For each bucket (its data-parallel group, ``dp`` or ``edp``) and each optimizer group (the first whose condition
holds for the parameter), the bucket's local parameters are flattened in named_parameters() order and
concatenated; the total is padded with zeros to a multiple of ``zero.multiple`` (evaluated with ``n``, the
group's size), and rank ``r`` of the group owns elements ``[r*P, (r+1)*P)``, ``P = padded / n``. The fragments
cross parameter boundaries freely; ``spec_layout`` turns each into boxes of its parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from resharding.grid import Coords
from resharding.spec_params import LayoutContext, LocalParam
from resharding.spec_scope import axis_rank
from spec_lang import spec_error


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, stop)`` of parameter ``index`` (flat, row-major) sit at ``offset`` in the partition."""

    index: int
    start: int
    stop: int
    offset: int


def partition_fragments(numels: Sequence[int], n: int, multiple: int) -> tuple[int, int, list[list[Fragment]]]:
    """``(total, P, fragments per rank)`` of parameters with ``numels`` concatenated, padded to a multiple of
    ``multiple`` and split into ``n`` equal partitions of ``P`` elements (the padded size must divide by ``n``).
    Pure; the property tests check that the fragments tile every parameter exactly."""
    if n < 1 or multiple < 1:
        raise ValueError(f"partition_fragments: n={n} and multiple={multiple} must be >= 1")
    total = sum(numels)
    padded = math.ceil(total / multiple) * multiple
    if padded % n:
        raise ValueError(f"padded size {padded} (a multiple of {multiple}) does not split into {n} equal partitions")
    size = padded // n
    starts = [0]
    for k in numels:
        starts.append(starts[-1] + k)
    per_rank: list[list[Fragment]] = []
    for r in range(n):
        lo, hi = r * size, (r + 1) * size
        frags = []
        for i, k in enumerate(numels):
            a, b = max(lo, starts[i]), min(hi, starts[i] + k)
            if a < b:
                frags.append(Fragment(i, a - starts[i], b - starts[i], a - lo))
        per_rank.append(frags)
    return total, size, per_rank


@dataclass(frozen=True)
class FlatBuffer:
    """One flat partition of a rank: bucket and group names, its parameters, its size and its fragments."""

    bucket: str
    group: str
    params: tuple[LocalParam, ...]
    numel: int
    fragments: tuple[Fragment, ...]
    #: Size of the data-parallel group it is partitioned over (its replicas of the scalar step).
    group_size: int


def flat_buffers(ctx: LayoutContext, coords: Coords, params: list[LocalParam]) -> list[FlatBuffer]:
    """The rank's flat buffers, bucket-major in spec order; buckets/groups without parameters are absent."""
    zero = ctx.spec.zero
    scope = ctx.scope(coords)
    grouped: dict[tuple[str, str], list[LocalParam]] = {}
    for p in params:
        local = scope.with_(ndim=len(p.shape), numel=p.numel)
        group = next((g for g in zero.groups if local.true(g.when, "zero")), None)
        if group is None:
            raise spec_error(zero.where, "zero", f"parameter {p.name!r} (shape {list(p.shape)}) joins no optimizer group",
                             expected="a group whose 'when' holds", found="none", fix="end zero.groups with a "
                             "catch-all group ('when: true')")
        grouped.setdefault((p.bucket, group.name), []).append(p)
    out = []
    for bucket in zero.buckets:
        n, r = ctx.grid.size(bucket.over), axis_rank(coords, bucket.over)
        multiple = scope.with_(n=n).int(zero.multiple, "zero", "zero.multiple")
        for group in zero.groups:
            members = grouped.get((bucket.name, group.name))
            if not members:
                continue
            try:
                _, size, per_rank = partition_fragments([p.numel for p in members], n, multiple)
            except ValueError as e:
                raise spec_error(zero.multiple.where, "zero", f"bucket {bucket.name!r} group {group.name!r}: {e}",
                                 expected=f"a multiple of n = {n}", found=str(multiple),
                                 fix="pad to a multiple of the DP size, e.g. 'multiple: 8 * n'") from None
            out.append(FlatBuffer(bucket.name, group.name, tuple(members), size, tuple(per_rank[r]), n))
    return out
