"""Pure planners: who writes which box at save time, and which byte ranges each local tensor reads at load time.

No I/O and no process group: save gathers every rank's ``WriteCandidate`` list, feeds the lists to
``plan_global_writes`` on the coordinator and scatters the result; load calls ``plan_reads`` per tensor. Tests
drive both with simulated ranks in one process (STYLE 2).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ckpt.errors import CorruptCheckpointError, ShardMismatchError
from formats.box import Box, boxes_tile, split_bytes
from formats.writer import DEFAULT_MAX_CHUNK_BYTES
from resharding.layout import LocalPiece

#: Replicated boxes smaller than this are written whole by one holder rather than split among holders.
MIN_SPLIT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class WriteCandidate:
    """A box of a logical tensor that one rank holds and could write."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    box: Box
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.itemsize


@dataclass(frozen=True)
class WriteAssignment:
    """Write ``box`` of ``key``; it lies inside the candidate box ``source`` this rank offered."""

    key: str
    box: Box
    source: Box


def plan_global_writes(local_plans: list[list[WriteCandidate]], max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                       overlapping_replicas: bool = False) -> list[list[WriteAssignment]]:
    """Deduplicate replicas and balance bytes across ranks; return each rank's assignments.

    A box offered by several ranks (a replica) is written once. Large replicated boxes are split into row
    ranges so every holder writes a share; every box larger than ``max_chunk_bytes`` is split likewise so that
    writes and reads parallelise. Assignment is greedy, largest first, to the least-loaded holder: no rank writes
    much more than its share. Raises ``ShardMismatchError`` listing every key whose ranks disagree on dtype or
    shape, or whose boxes do not tile the tensor exactly once.

    ``overlapping_replicas=True`` (spec-described state) accepts boxes that overlap without being equal: replicas
    cut differently, such as the Adam moments of a TP-replicated layer norm inside ZeRO partitions whose
    boundaries differ between TP ranks. The union is then cut into disjoint pieces, each written once by a rank
    whose box contains it; the union must still cover the tensor exactly.
    """
    meta: dict[str, tuple[str, tuple[int, ...], int]] = {}
    holders: dict[tuple[str, Box], list[int]] = defaultdict(list)
    problems: list[str] = []
    for rank, plan in enumerate(local_plans):
        for c in plan:
            m = (c.dtype, c.shape, c.itemsize)
            if c.key in meta and meta[c.key] != m:
                problems.append(f"key {c.key!r}: rank {rank} has dtype {c.dtype} shape {list(c.shape)}, another rank "
                                f"has dtype {meta[c.key][0]} shape {list(meta[c.key][1])}")
                continue
            meta[c.key] = m
            if not c.box.is_empty():
                holders[(c.key, c.box)].append(rank)
    by_key: dict[str, list[Box]] = defaultdict(list)
    for key, box in holders:
        by_key[key].append(box)
    pieces: list[tuple[str, Box, Box, list[int]]] = []  # (key, disjoint piece, the candidate box holding it, ranks)
    for key, (_, shape, _) in meta.items():
        boxes = by_key.get(key, [])
        if overlapping_replicas:
            disjoint = _disjoint_cover(boxes)
            for p in boxes_tile([piece for piece, _ in disjoint], shape):
                problems.append(f"key {key!r}: {p}")
            pieces.extend((key, piece, src, holders[(key, src)]) for piece, src in disjoint)
        else:
            for p in boxes_tile(boxes, shape):
                problems.append(f"key {key!r}: {p}")
            pieces.extend((key, b, b, holders[(key, b)]) for b in boxes)
    if problems:
        raise ShardMismatchError("the ranks' shards do not form consistent tensors:\n  " + "\n  ".join(problems))

    work: list[tuple[int, str, Box, Box, list[int]]] = []
    for key, box, src, ranks in pieces:
        nbytes = box.numel * meta[key][2]
        spread = len(ranks) if len(ranks) > 1 and nbytes >= MIN_SPLIT_BYTES else 1
        for sub in split_bytes(box, meta[key][2], max_chunk_bytes, spread):
            work.append((sub.numel * meta[key][2], key, sub, src, ranks))
    load = [0] * len(local_plans)
    out: list[list[WriteAssignment]] = [[] for _ in local_plans]
    for nbytes, key, sub, src, ranks in sorted(work, key=lambda w: (-w[0], w[1], w[2].offsets)):
        r = min(ranks, key=lambda x: (load[x], x))
        load[r] += nbytes
        out[r].append(WriteAssignment(key, sub, src))
    return out


def _disjoint_cover(boxes: list[Box]) -> list[tuple[Box, Box]]:
    """Cut the union of ``boxes`` into disjoint pieces: [(piece, a box of ``boxes`` containing it)].

    Largest boxes first, so replicas cut differently are mostly written from the biggest box that holds them.
    """
    covered: list[Box] = []
    out: list[tuple[Box, Box]] = []
    for box in sorted(boxes, key=lambda b: (-b.numel, b.offsets, b.sizes)):
        rest = [box]
        for c in covered:
            if box.intersect(c) is None:
                continue
            rest = [q for r in rest for q in r.subtract(c)]
            if not rest:
                break
        out.extend((r, box) for r in rest if not r.is_empty())
        covered.append(box)
    return out


@dataclass(frozen=True)
class ReadItem:
    """Copy ``rel`` (relative to chunk ``chunk_index``) into local piece ``piece_index`` at ``dest_offsets``
    (offsets into the piece's local tensor, as ``LocalPiece.local_offsets`` are)."""

    key: str
    chunk_index: int
    rel: Box
    dest_offsets: tuple[int, ...]
    piece_index: int = 0


def plan_reads(key: str, chunk_boxes: list[Box], pieces: tuple[LocalPiece, ...] | list[LocalPiece],
               where: str = "") -> list[ReadItem]:
    """Intersect each local piece with every stored chunk; raise if the chunks do not cover a piece exactly."""
    items: list[ReadItem] = []
    for pi, piece in enumerate(pieces):
        g = piece.global_box
        covered = 0
        for ci, cb in enumerate(chunk_boxes):
            inter = g.intersect(cb)
            if inter is None or inter.is_empty():
                continue
            covered += inter.numel
            dest = tuple(lo + (a - b) for lo, a, b in zip(piece.local_offsets, inter.offsets, g.offsets))
            items.append(ReadItem(key, ci, inter.relative_to(cb), dest, pi))
        if covered != g.numel and not g.is_empty():
            raise CorruptCheckpointError(
                f"{where}key {key!r}: stored chunks cover {covered} of the {g.numel} elements of box "
                f"offsets={list(g.offsets)} sizes={list(g.sizes)} (chunks overlap or leave holes)"
            )
    return items
