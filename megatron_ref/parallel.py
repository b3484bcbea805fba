"""The rank grid: uneven splits, rank coordinates, communication groups, and the process groups built from them.

Who uses it: the model and optimizer (through ``ParallelState``) on every rank, and the pure oracles and tests
(through the plain functions, which need no process group). The grid math lives in pure functions so that tests
can simulate every rank of a layout inside one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megatron_ref.config import ConfigError, ParallelConfig

#: Group kinds, in the order ``ParallelState.create`` builds them (every rank must create them in one order).
GROUP_KINDS = ("tp", "pp", "dp", "ep", "edp", "embedding")


def split(n: int, parts: int) -> list[int]:
    """Counts of ``n`` units over ``parts``: the first ``n % parts`` parts get one more (the doc's ``split``)."""
    if parts < 1 or n < 0:
        raise ConfigError(f"split(n={n}, parts={parts}): need n >= 0 and parts >= 1")
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """``(start, count)`` of part ``i`` of ``split(n, parts)``."""
    counts = split(n, parts)
    if not 0 <= i < parts:
        raise ConfigError(f"split_range(n={n}, parts={parts}, i={i}): i out of range")
    return sum(counts[:i]), counts[i]


@dataclass(frozen=True)
class Coords:
    """A rank's place in the grid; ``ep``/``edp`` are derived from ``dp``."""

    tp: int
    pp: int
    dp: int
    ep: int
    edp: int


def _strides(pc: ParallelConfig) -> dict[str, int]:
    sizes = {"tp": pc.tp, "dp": pc.dp, "pp": pc.pp}
    strides, s = {}, 1
    for axis in pc.axes():
        strides[axis] = s
        s *= sizes[axis]
    return strides


def coords(rank: int, pc: ParallelConfig) -> Coords:
    """Grid coordinates of global ``rank`` (the first axis of ``pc.order`` varies fastest)."""
    if not 0 <= rank < pc.world:
        raise ConfigError(f"rank {rank} outside world size {pc.world} of {pc!r}")
    sizes = {"tp": pc.tp, "dp": pc.dp, "pp": pc.pp}
    st = _strides(pc)
    c = {axis: (rank // st[axis]) % sizes[axis] for axis in sizes}
    return Coords(tp=c["tp"], pp=c["pp"], dp=c["dp"], ep=c["dp"] % pc.ep, edp=c["dp"] // pc.ep)


def rank_of(pc: ParallelConfig, tp: int, pp: int, dp: int) -> int:
    """Global rank at grid coordinates ``(tp, pp, dp)`` (inverse of ``coords``)."""
    st = _strides(pc)
    return tp * st["tp"] + pp * st["pp"] + dp * st["dp"]


def group_ranks(pc: ParallelConfig, kind: str, rank: int) -> list[int]:
    """The ranks of ``rank``'s group of ``kind``, ordered by their rank inside the group.

    ``tp``/``pp``/``dp`` vary one axis; ``ep`` varies ``ep_rank`` at fixed ``edp_rank``; ``edp`` varies
    ``edp_rank`` at fixed ``ep_rank``; ``embedding`` is the first and last stage at the same tp/dp coordinates
    (a single rank when ``pp == 1``, and for middle stages).
    """
    c = coords(rank, pc)
    if kind == "tp":
        return [rank_of(pc, t, c.pp, c.dp) for t in range(pc.tp)]
    if kind == "pp":
        return [rank_of(pc, c.tp, p, c.dp) for p in range(pc.pp)]
    if kind == "dp":
        return [rank_of(pc, c.tp, c.pp, d) for d in range(pc.dp)]
    if kind == "ep":
        return [rank_of(pc, c.tp, c.pp, c.edp * pc.ep + e) for e in range(pc.ep)]
    if kind == "edp":
        return [rank_of(pc, c.tp, c.pp, x * pc.ep + c.ep) for x in range(pc.edp)]
    if kind == "embedding":
        if c.pp not in (0, pc.pp - 1):
            return [rank]  # middle stages hold no embedding
        return sorted({rank_of(pc, c.tp, 0, c.dp), rank_of(pc, c.tp, pc.pp - 1, c.dp)})
    raise ConfigError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")


def all_groups(pc: ParallelConfig, kind: str) -> list[list[int]]:
    """Every distinct group of ``kind``, in order of their lowest rank (middle stages get singleton
    embedding groups)."""
    seen: dict[tuple[int, ...], None] = {}
    for r in range(pc.world):
        seen.setdefault(tuple(group_ranks(pc, kind, r)), None)
    return [list(g) for g in sorted(seen, key=lambda g: g[0])]


@dataclass
class ParallelState:
    """One rank's view of the grid plus its process groups (``None`` for a group of one: no communication).

    Built by ``create`` on every rank after ``torch.distributed.init_process_group`` (or without it when the world
    is one rank), or by ``simulated`` for a rank that will never communicate (tests build modules this way).
    """

    pc: ParallelConfig
    rank: int
    coords: Coords
    members: dict[str, list[int]]
    handles: dict[str, Any] = field(default_factory=dict)
    simulated_only: bool = False

    @classmethod
    def simulated(cls, pc: ParallelConfig, rank: int) -> "ParallelState":
        """A rank's grid view with no process groups: fine for building a model and reading its state, not for
        running it (any collective would raise)."""
        return cls(pc, rank, coords(rank, pc), {k: group_ranks(pc, k, rank) for k in GROUP_KINDS},
                   simulated_only=True)

    @classmethod
    def create(cls, pc: ParallelConfig) -> "ParallelState":
        """Build every group with ``dist.new_group``; collective: all ranks call it in the same order."""
        if not dist.is_available() or not dist.is_initialized():
            if pc.world != 1:
                raise ConfigError(f"{pc!r} has world size {pc.world}: initialize torch.distributed first")
            return cls(pc, 0, coords(0, pc), {k: [0] for k in GROUP_KINDS})
        if dist.get_world_size() != pc.world:
            raise ConfigError(f"{pc!r} needs world size {pc.world}, the process group has {dist.get_world_size()}")
        rank = dist.get_rank()
        state = cls(pc, rank, coords(rank, pc), {k: group_ranks(pc, k, rank) for k in GROUP_KINDS})
        made: dict[tuple[int, ...], Any] = {}
        for kind in GROUP_KINDS:
            for ranks in all_groups(pc, kind):
                key = tuple(ranks)
                if len(ranks) == 1 or key in made:
                    continue  # every rank skips the same groups, so the new_group calls still line up
                made[key] = dist.new_group(ranks)
        for kind in GROUP_KINDS:
            key = tuple(state.members[kind])
            state.handles[kind] = made.get(key)
        return state

    def size(self, kind: str) -> int:
        return len(self.members[kind])

    def index(self, kind: str) -> int:
        """This rank's position inside its group of ``kind``."""
        return self.members[kind].index(self.rank)

    def group(self, kind: str) -> Any:
        """The process group handle of ``kind`` (only meaningful when ``size(kind) > 1``)."""
        if self.simulated_only and self.size(kind) > 1:
            raise ConfigError(f"rank {self.rank} is simulated: it cannot communicate over its {kind} group")
        return self.handles.get(kind)

    @property
    def first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def last_stage(self) -> bool:
        return self.coords.pp == self.pc.pp - 1
