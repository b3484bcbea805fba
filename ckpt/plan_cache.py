"""The Checkpointer's plan cache: one write plan and slot layout per state structure, reused while it holds.

A training loop saves the same structure every time, so the collective planning (``snapshot_layout.build``, which
runs ``plan_save``) happens once; later saves check, in one small collective, that every rank's structure is
unchanged. ``Sources`` (``ckpt/snapshot_layout.py``) keeps, per key, what the snapshot copies from and whether
only ``optimizer.step()`` changes it (a lazy copy).
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt import snapshot_layout
from ckpt.dist import DistWrapper
from ckpt.snapshot_layout import SnapshotLayout, SourceViews, Sources, storage_ptr


def optimizer_signature(optimizers: list[torch.optim.Optimizer]) -> tuple[Any, ...]:
    """Which optimizers hold which parameters: when it changes, the lazy keys are decided anew."""
    return tuple((id(o), tuple(id(p) for g in o.param_groups for p in g["params"])) for o in optimizers)


def optimizer_ptrs(optimizers: list[torch.optim.Optimizer]) -> set[int]:
    """Storage addresses of what only ``optimizer.step()`` changes: parameters and state tensors."""
    ptrs: set[int] = set()
    for o in optimizers:
        ptrs |= {storage_ptr(p) for g in o.param_groups for p in g["params"]}
        ptrs |= {storage_ptr(v) for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    return ptrs


class PlanCache:
    """The layout of the last state structure saved, and the per-key sources of the last save."""

    def __init__(self, dw: DistWrapper, max_chunk_bytes: int) -> None:
        self.dw = dw
        self.max_chunk_bytes = max_chunk_bytes
        self.sources = Sources()
        self.layout: SnapshotLayout | None = None

    def plan(self, flat: Any, optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, SourceViews],
                                                                               SnapshotLayout]:
        """This save's sources and layout; ``optimizers``' memory is what the snapshot copies lazily (empty: no
        lazy copies). Collective: replans on every rank when any rank's structure changed."""
        sources = self.sources.update(flat.tensors, optimizer_signature(optimizers),
                                      lambda: optimizer_ptrs(optimizers))
        return sources, self.layout_for(flat)

    def layout_for(self, flat: Any) -> SnapshotLayout:
        """The cached layout while every rank's state structure is unchanged; else a new plan (collective)."""
        sig = self.sources.signature
        assert sig is not None, "plan() decides the sources first"
        same = self.layout is not None and self.layout.signature == sig
        if all(self.dw.all_gather(same)):
            assert self.layout is not None
            return self.layout
        layouts = {k: s.layout for k, s in self.sources.by_key.items()}
        self.layout = snapshot_layout.build(self.dw, flat, layouts, sig, self.max_chunk_bytes)
        return self.layout

    def clear(self) -> None:
        self.sources.clear()
        self.layout = None
