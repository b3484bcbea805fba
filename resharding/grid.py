"""The rank grid over (tp, pp, dp), with expert parallelism carved out of dp (docs/megatron-layout.md).

Pure functions of plain data, used by the spec-driven layouts (``resharding.spec_layout``) and by tests that
simulate every rank in one process. ``order`` lists the grid axes fastest-varying first, joined by ``-``: a
permutation of ``tp``, ``dp``, ``pp``, where ``ep`` may appear once, directly before ``dp``
(default ``tp-ep-dp-pp``, Megatron's). Whatever the order, ``ep_rank = dp_rank % ep`` and
``edp_rank = dp_rank // ep``: the expert-parallel ranks are the fast part of the data-parallel rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ckpt.errors import SpecError

GRID_AXES = ("tp", "dp", "pp")
DEFAULT_ORDER = "tp-ep-dp-pp"
#: Group kinds ``group`` knows: one grid axis varies (tp, pp, dp), or ep/edp inside dp, or ``mp`` (tp x pp).
GROUP_KINDS = ("tp", "pp", "dp", "ep", "edp", "mp")


@dataclass(frozen=True)
class Coords:
    """A rank's grid coordinates; ``ep``/``edp`` derive from ``dp``."""

    tp: int
    pp: int
    dp: int
    ep: int
    edp: int


@dataclass(frozen=True)
class Grid:
    """A parallel configuration: sizes, ZeRO stage and axis order. Validated at construction."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0
    order: str = DEFAULT_ORDER

    def __post_init__(self) -> None:
        problems = []
        for name in ("tp", "pp", "dp", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name}={v!r} must be an integer >= 1")
        if not problems and self.dp % self.ep:
            problems.append(f"ep={self.ep} must divide dp={self.dp} (expert parallelism is carved out of dp)")
        if self.zero not in (0, 1, 2, 3):
            problems.append(f"zero={self.zero!r} must be 0, 1, 2 or 3")
        try:
            self.axes()
        except SpecError as e:
            problems.append(str(e))
        if problems:
            raise SpecError(f"invalid parallel configuration {self!r}: " + "; ".join(problems))

    @staticmethod
    def of(parallel: "Grid | Mapping[str, Any] | Any") -> "Grid":
        """A ``Grid`` from a mapping or any object with ``tp``/``pp``/``dp`` (``ep``, ``zero``, ``order`` optional)
        attributes, such as ``megatron_ref.ParallelConfig``. Unknown mapping keys raise."""
        if isinstance(parallel, Grid):
            return parallel
        names = [f.name for f in dataclasses.fields(Grid)]
        if isinstance(parallel, Mapping):
            unknown = sorted(set(parallel) - set(names))
            if unknown:
                raise SpecError(f"unknown parallel settings {unknown}; expected some of {names}")
            return Grid(**dict(parallel))
        return Grid(**{n: getattr(parallel, n) for n in names if hasattr(parallel, n)})

    def axes(self) -> tuple[str, ...]:
        """The grid axes fastest first, ``ep`` dropped (it lives inside dp)."""
        tokens = self.order.split("-")
        if "ep" in tokens:
            i = tokens.index("ep")
            if tokens.count("ep") != 1 or i + 1 >= len(tokens) or tokens[i + 1] != "dp":
                raise SpecError(f"order={self.order!r}: 'ep' may appear once, directly before 'dp'")
            tokens = tokens[:i] + tokens[i + 1:]
        if sorted(tokens) != sorted(GRID_AXES):
            raise SpecError(f"order={self.order!r} must be a '-'-joined permutation of tp, dp, pp (plus 'ep' before dp)")
        return tuple(tokens)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size."""
        return self.dp // self.ep

    def size(self, axis: str) -> int:
        """Size of ``tp``, ``pp``, ``dp``, ``ep`` or ``edp``."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep, "edp": self.edp}[axis]

    def _strides(self) -> dict[str, int]:
        strides, s = {}, 1
        for axis in self.axes():
            strides[axis] = s
            s *= self.size(axis)
        return strides

    def coords(self, rank: int) -> Coords:
        """Grid coordinates of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise SpecError(f"rank {rank} is outside world size {self.world_size} of {self!r}")
        st = self._strides()
        c = {axis: (rank // st[axis]) % self.size(axis) for axis in GRID_AXES}
        return Coords(tp=c["tp"], pp=c["pp"], dp=c["dp"], ep=c["dp"] % self.ep, edp=c["dp"] // self.ep)

    def rank(self, tp: int, pp: int, dp: int) -> int:
        """Global rank at ``(tp, pp, dp)``; inverse of ``coords``."""
        for axis, v in (("tp", tp), ("pp", pp), ("dp", dp)):
            if not 0 <= v < self.size(axis):
                raise SpecError(f"{axis} coordinate {v} is outside 0..{self.size(axis) - 1} of {self!r}")
        st = self._strides()
        return tp * st["tp"] + pp * st["pp"] + dp * st["dp"]

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """``rank``'s group of ``kind``, ordered by position in the group (ep/edp: by ep_rank/edp_rank)."""
        c = self.coords(rank)
        if kind == "tp":
            return tuple(self.rank(t, c.pp, c.dp) for t in range(self.tp))
        if kind == "pp":
            return tuple(self.rank(c.tp, p, c.dp) for p in range(self.pp))
        if kind == "dp":
            return tuple(self.rank(c.tp, c.pp, d) for d in range(self.dp))
        if kind == "ep":
            return tuple(self.rank(c.tp, c.pp, c.edp * self.ep + e) for e in range(self.ep))
        if kind == "edp":
            return tuple(self.rank(c.tp, c.pp, x * self.ep + c.ep) for x in range(self.edp))
        if kind == "mp":
            return tuple(self.rank(t, p, c.dp) for p in range(self.pp) for t in range(self.tp))
        raise SpecError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every distinct group of ``kind``, ordered by lowest rank."""
        seen = {self.group(kind, r) for r in range(self.world_size)}
        return sorted(seen, key=min)


def layout_text(parallel: Mapping[str, Any]) -> str:
    """``tp=2,pp=2,dp=1,ep=1,zero=0`` (the order only when it is not the default): a layout as messages write it."""
    return ",".join(f"{k}={v}" for k, v in parallel.items() if k != "order" or v != DEFAULT_ORDER)
