"""Pure planning, tested with simulated ranks in one process (no process group, no I/O)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings, strategies as st

from ckpt.errors import CorruptCheckpointError, ShardMismatchError
from formats.box import Box, boxes_tile, flat_span, merge_rows
from resharding.layout import LocalPiece, dtensor_global_indices, pieces_from_indices
from resharding.planner import MIN_SPLIT_BYTES, WriteCandidate, plan_global_writes, plan_reads

pytestmark = pytest.mark.timeout(120)


@st.composite
def boxes(draw, ndim=None):
    n = draw(st.integers(0, 3)) if ndim is None else ndim
    offs = tuple(draw(st.integers(0, 6)) for _ in range(n))
    sizes = tuple(draw(st.integers(0, 6)) for _ in range(n))
    return Box(offs, sizes)


def _cells(b: Box) -> set[tuple[int, ...]]:
    return set(itertools.product(*[range(o, o + s) for o, s in zip(b.offsets, b.sizes)]))


@given(st.integers(1, 3).flatmap(lambda n: st.tuples(boxes(n), boxes(n))))
def test_intersection_is_the_set_intersection(pair):
    a, b = pair
    inter = a.intersect(b)
    expected = _cells(a) & _cells(b)
    assert (set() if inter is None else _cells(inter)) == expected


@given(st.integers(1, 3).flatmap(lambda n: st.tuples(boxes(n), boxes(n))))
def test_flat_span_bounds_every_element(pair):
    outer, inner = pair
    outer = Box(tuple(0 for _ in outer.sizes), tuple(s + o for s, o in zip(outer.sizes, inner.ends)))
    first, end = flat_span(outer.sizes, inner)
    strides = [math.prod(outer.sizes[d + 1:]) for d in range(outer.ndim)]
    flats = [sum(i * s for i, s in zip(c, strides)) for c in _cells(inner)]
    if flats:
        assert first == min(flats) and end == max(flats) + 1


@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(1, 7))
def test_split_tiles_the_box(shape, parts):
    b = Box.whole(tuple(shape))
    pieces = b.split(parts)
    assert not boxes_tile(pieces, tuple(shape))
    assert len(pieces) <= parts


def _even_tiling(shape, grid):
    """Boxes of a regular grid, uneven at the edges like torch.chunk."""
    per_dim = []
    for n, g in zip(shape, grid):
        step = -(-n // g)
        per_dim.append([(o, min(step, n - o)) for o in range(0, n, step)])
    return [Box(tuple(c[0] for c in combo), tuple(c[1] for c in combo)) for combo in itertools.product(*per_dim)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=3).flatmap(
    lambda shape: st.tuples(st.just(shape), st.lists(st.integers(1, 4), min_size=len(shape), max_size=len(shape)),
                            st.lists(st.integers(1, 4), min_size=len(shape), max_size=len(shape)))))
def test_any_saved_grid_reads_into_any_target_grid(args):
    """Chunks of one grid cover every target box of another grid exactly once (read planning = resharding)."""
    shape, src_grid, dst_grid = args
    chunks = _even_tiling(tuple(shape), src_grid)
    for target in _even_tiling(tuple(shape), dst_grid):
        items = plan_reads("k", chunks, [LocalPiece(tuple(0 for _ in shape), target)])
        got = set()
        for it in items:
            cb = chunks[it.chunk_index]
            glob = Box(tuple(a + b for a, b in zip(cb.offsets, it.rel.offsets)), it.rel.sizes)
            assert target.contains(glob)
            # destination offsets agree with the global position inside the target
            assert it.dest_offsets == tuple(g - t for g, t in zip(glob.offsets, target.offsets))
            cells = _cells(glob)
            assert not (cells & got)
            got |= cells
        assert got == _cells(target)


def test_read_plan_rejects_holes():
    with pytest.raises(CorruptCheckpointError, match="cover 6 of the 8"):
        plan_reads("k", [Box((0,), (3,)), Box((5,), (3,))], [LocalPiece((0,), Box((0,), (8,)))])


def _cand(key, shape, box, itemsize=4):
    return WriteCandidate(key, "float32", shape, box, itemsize)


def test_replicas_are_written_once_and_balanced():
    # 4 ranks all hold the same 4 tensors of 4 MiB (replicated, like plain tensors in DDP).
    shape = (1024, 1024)
    plans = [[_cand(f"w{i}", shape, Box.whole(shape)) for i in range(4)] for _ in range(4)]
    out = plan_global_writes(plans)
    per_rank = [sum(a.box.numel * 4 for a in rank) for rank in out]
    assert sum(per_rank) == 4 * 1024 * 1024 * 4  # every byte once
    assert max(per_rank) - min(per_rank) <= 1024 * 4 * 2  # balanced to about a row
    for i in range(4):
        assert not boxes_tile([a.box for r in out for a in r if a.key == f"w{i}"], shape)


def test_small_replicas_are_not_split():
    shape = (4,)
    out = plan_global_writes([[_cand("b", shape, Box.whole(shape))] for _ in range(3)])
    assert sum(len(r) for r in out) == 1
    assert 4 * 4 < MIN_SPLIT_BYTES


def test_sharded_plus_replicated_mesh():
    # 2-D mesh (dp=2, tp=2): rows sharded over tp, replicated over dp -> each row block written once.
    shape = (8, 4)
    plans = []
    for dp, tp in itertools.product(range(2), range(2)):
        plans.append([_cand("w", shape, Box((tp * 4, 0), (4, 4)))])
    out = plan_global_writes(plans)
    written = [a.box for r in out for a in r]
    assert not boxes_tile(written, shape)


def test_inconsistent_ranks_are_all_reported():
    plans = [
        [_cand("a", (4,), Box((0,), (2,))), _cand("b", (4,), Box((0,), (4,)))],
        [_cand("a", (5,), Box((2,), (2,))), _cand("b", (4,), Box((0,), (3,)))],
    ]
    with pytest.raises(ShardMismatchError) as e:
        plan_global_writes(plans)
    msg = str(e.value)
    assert "'a'" in msg and "'b'" in msg and "overlap" in msg


def test_large_boxes_split_by_max_chunk_bytes():
    shape = (100, 10)
    out = plan_global_writes([[_cand("w", shape, Box.whole(shape))]], max_chunk_bytes=400)
    assert len(out[0]) == 10 and not boxes_tile([a.box for a in out[0]], shape)


def test_strided_shard_indices_decompose_into_runs():
    # FSDP2 over TP on dim 0: _StridedShard(0, split_factor=2) on dp then Shard(0) on tp, 8 rows, mesh (2, 2).
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = (_StridedShard(0, split_factor=2), Shard(0))
    seen = {}
    for coord in itertools.product(range(2), range(2)):
        index = dtensor_global_indices((8, 3), (2, 2), list(coord), placements)
        seen[coord] = index[0]
        pieces = pieces_from_indices((8, 3), index)
        assert sum(p.global_box.numel for p in pieces) == len(index[0]) * 3
    rows = sorted(r for ix in seen.values() for r in ix)
    assert rows == list(range(8))  # every row held exactly once over the mesh


@given(st.integers(1, 3).flatmap(lambda n: st.tuples(boxes(n), boxes(n))))
def test_subtract_is_the_set_difference(pair):
    a, b = pair
    parts = a.subtract(b)
    assert len(parts) <= 2 * a.ndim
    cells = [_cells(p) for p in parts]
    assert set().union(*cells) == _cells(a) - _cells(b)
    assert sum(len(c) for c in cells) == len(_cells(a) - _cells(b))  # disjoint


@given(st.integers(1, 2).flatmap(lambda n: st.lists(boxes(n), min_size=1, max_size=6)))
def test_overlapping_replicas_are_written_once(bs):
    """Replicas cut differently (ZeRO partitions of a TP-replicated tensor): every element of the union is written
    exactly once, by a rank whose box holds it."""
    shape = tuple(max(b.offsets[d] + b.sizes[d] for b in bs) for d in range(bs[0].ndim))
    union = set().union(*[_cells(b) for b in bs])
    plans = [[WriteCandidate("k", "float32", shape, b, 4)] for b in bs]
    if union != _cells(Box.whole(shape)):
        with pytest.raises(ShardMismatchError):
            plan_global_writes(plans, overlapping_replicas=True)
        return
    out = plan_global_writes(plans, overlapping_replicas=True)
    written: list[tuple[int, ...]] = []
    for rank, assignments in enumerate(out):
        for a in assignments:
            assert bs[rank].contains(a.box) and a.source == bs[rank]
            written.extend(_cells(a.box))
    assert sorted(written) == sorted(union)


def test_overlapping_boxes_stay_an_error_without_the_flag():
    plans = [[WriteCandidate("k", "float32", (4,), Box((0,), (3,)), 4)], [WriteCandidate("k", "float32", (4,), Box((1,), (3,)), 4)]]
    with pytest.raises(ShardMismatchError, match="overlap"):
        plan_global_writes(plans)


@given(st.integers(1, 3).flatmap(lambda n: st.lists(boxes(n), min_size=0, max_size=6)))
def test_merge_rows_keeps_the_union(bs):
    """Merging never changes which elements are covered, and never yields more boxes than it was given."""
    merged = merge_rows(bs)
    assert len(merged) <= len(bs)
    assert set().union(*[_cells(b) for b in merged]) == set().union(*[_cells(b) for b in bs])


def test_merge_rows_joins_consecutive_heads():
    heads = [Box((h * 8, 0), (8, 32)) for h in (2, 0, 1, 3)] + [Box((40, 0), (8, 32))]
    assert merge_rows(heads) == [Box((0, 0), (32, 32)), Box((40, 0), (8, 32))]
