"""Checks over a whole layout: do the pieces of every rank tile every logical tensor exactly?

Used by tests (every shipped spec under many layouts) and by ``ckpt spec check`` when it is given dims and a
parallel configuration. Pure (numpy for counting): per logical tensor, the piece boxes are compressed to the grid
of their boundaries and counted per cell, so the cost grows with the number of pieces, not with the elements.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from formats.box import Box
from resharding.spec_layout import UNIQUE, Piece, RankLayout


def check_tiling(layouts: Iterable[RankLayout], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems (empty when exact) with the layouts' pieces as a tiling of ``shapes``:

    - every element of every logical tensor is held by some piece, and no piece lies outside its tensor or names
      an unknown key;
    - an element held by a ``unique`` piece is held by no other piece, and every element of a ``replicated`` or
      ``averaged`` piece is held by at least one other piece (the policies are exact, not just safe);
    - every piece is a view inside its local tensor, and the pieces of one local tensor (0-d ones aside) do not
      share local elements (compared as runs of contiguous elements, not element by element).
    """
    by_key: dict[str, list[tuple[Box, bool, str]]] = {}
    problems: list[str] = []
    for lay in layouts:
        for t in lay.tensors:
            where = f"rank {lay.rank} {t.key}"
            problems += _local_problems(t.shape, t.pieces, where)
            for p in t.pieces:
                if p.logical_key not in shapes:
                    problems.append(f"{where}: piece names unknown logical key {p.logical_key!r}")
                    continue
                shape = shapes[p.logical_key]
                box = p.box
                if len(shape) != box.ndim or not Box.whole(shape).contains(box):
                    problems.append(f"{where}: piece {list(box.offsets)}+{list(box.sizes)} lies outside "
                                    f"{p.logical_key} {list(shape)}")
                    continue
                by_key.setdefault(p.logical_key, []).append((box, p.policy == UNIQUE, where))
    for key, shape in shapes.items():
        problems += _cover_problems(key, shape, by_key.get(key, []))
    return problems


def _local_problems(shape: tuple[int, ...], pieces: tuple[Piece, ...], where: str) -> list[str]:
    numel = math.prod(shape)
    out = []
    runs: list[tuple[int, int]] = []
    for p in pieces:
        if p.numel == 0:
            continue
        last = p.storage_offset + sum((s - 1) * st for s, st in zip(p.sizes, p.strides))
        if p.storage_offset < 0 or last >= numel or any(st < 0 for st in p.strides):
            out.append(f"{where}: view offset {p.storage_offset} sizes {list(p.sizes)} strides {list(p.strides)} "
                       f"reaches outside the {numel} local elements")
        elif shape:
            runs += _view_runs(p)
    runs.sort()
    for (_, stop), (start, next_stop) in zip(runs, runs[1:]):
        if start < stop:
            out.append(f"{where}: pieces share local elements [{start}, {min(stop, next_stop)})")
            break
    return out


def _view_runs(p: Piece) -> list[tuple[int, int]]:
    """The flat element intervals of a strided view; trailing dims that are contiguous merge into one run."""
    sizes, strides = list(p.sizes), list(p.strides)
    run = 1
    while sizes and (strides[-1] == run or sizes[-1] == 1):
        run *= sizes.pop()
        strides.pop()
    starts = [p.storage_offset]
    for s, st in zip(sizes, strides):
        starts = [x + i * st for x in starts for i in range(s)]
    return [(x, x + run) for x in starts]


def _cover_problems(key: str, shape: tuple[int, ...], pieces: list[tuple[Box, bool, str]]) -> list[str]:
    if math.prod(shape) == 0:
        return []
    if not shape:
        uniq = [w for _, u, w in pieces if u]
        if not pieces:
            return [f"{key}: no piece holds this 0-d tensor"]
        if uniq and len(pieces) > 1:
            return [f"{key}: {uniq[0]} marks its copy unique, but {len(pieces)} pieces hold it"]
        if not uniq and len(pieces) == 1:
            return [f"{key}: {pieces[0][2]} marks its copy replicated, but it is the only holder"]
        return []
    cuts = [sorted({0, n} | {b.offsets[d] for b, _, _ in pieces} | {b.ends[d] for b, _, _ in pieces})
            for d, n in enumerate(shape)]
    count = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    uniq = np.zeros_like(count)
    cells = []
    index = [{x: i for i, x in enumerate(c)} for c in cuts]
    for box, unique, where in pieces:
        sl = tuple(slice(ix[o], ix[e]) for ix, o, e in zip(index, box.offsets, box.ends))
        count[sl] += 1
        if unique:
            uniq[sl] += 1
        cells.append((sl, unique, where))
    out = []
    if (count == 0).any():
        cell = np.argwhere(count == 0)[0]
        out.append(f"{key}: element {[cuts[d][i] for d, i in enumerate(cell)]} of {list(shape)} is held by no piece")
    if ((uniq > 0) & (count > 1)).any():
        cell = np.argwhere((uniq > 0) & (count > 1))[0]
        holders = [w for sl, _, w in cells if all(s.start <= i < s.stop for s, i in zip(sl, cell))]
        out.append(f"{key}: element {[cuts[d][i] for d, i in enumerate(cell)]} is held by a piece marked unique and "
                   f"by others: {holders}")
    for sl, unique, where in cells:
        if not unique and count[sl].size and (count[sl] < 2).any():
            out.append(f"{key}: {where} marks its piece replicated, but part of it has no other holder")
            break
    return out
