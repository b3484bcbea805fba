"""Where a snapshot's tensors sit in a pool slot, and the write plan they are flushed with.

One ``SnapshotLayout`` serves every snapshot of the same state structure (same keys, dtypes, shapes and local
pieces): the ``Checkpointer`` builds it once, collectively, and reuses it while ``signature`` stays the same. Each
local piece of each tensor gets a ``Region``: a byte range of a slot, aligned to ``ALIGN_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ckpt.dist import DistWrapper
from ckpt.pool import ALIGN_BYTES, Slot
from ckpt.saving import SavePlan, plan_save
from resharding.box import Box
from resharding.layout import TensorLayout


@dataclass
class Region:
    key: str
    piece_index: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    sizes: tuple[int, ...]


@dataclass
class SnapshotLayout:
    """A cached plan for one state structure: the write plan and where each local piece sits in a slot."""

    signature: tuple[Any, ...]
    plan: SavePlan
    regions: list[Region]
    total_bytes: int

    def piece_box(self, r: Region) -> Box:
        """The global box of region ``r``'s piece, as the write plan knows it."""
        return self.plan.layouts[r.key].pieces[r.piece_index].global_box


def signature(flat: Any, layouts: dict[str, TensorLayout]) -> tuple[Any, ...]:
    """What a layout depends on: every key's dtype, global shape and local pieces."""
    return tuple((k, str(t.dtype), layouts[k].global_shape, layouts[k].pieces) for k, t in flat.tensors.items())


def build(dw: DistWrapper, flat: Any, layouts: dict[str, TensorLayout], sig: tuple[Any, ...],
          max_chunk_bytes: int) -> SnapshotLayout:
    """Plan the writes (collective over ``dw``) and place every local piece in a slot."""
    plan = plan_save(dw, flat, max_chunk_bytes, step="ckpt.Checkpointer: planning")
    regions, offset = [], 0
    for key, t in flat.tensors.items():
        for i, piece in enumerate(layouts[key].pieces):
            n = piece.global_box.numel * t.element_size()
            regions.append(Region(key, i, offset, n, t.dtype, piece.global_box.sizes))
            offset += -(-n // ALIGN_BYTES) * ALIGN_BYTES
    return SnapshotLayout(sig, plan, regions, offset)


def slot_view(slot: Slot, r: Region) -> torch.Tensor:
    """Region ``r`` of ``slot`` as a tensor of its dtype and shape."""
    return slot.buffer[r.offset : r.offset + r.nbytes].view(r.dtype).view(r.sizes)


def slot_views(slot: Slot, lay: SnapshotLayout) -> list[torch.Tensor]:
    """Every region's view of ``slot``, made once per slot and layout (slots are reused round-robin; the pool
    drops ``slot.views`` whenever it replaces the slot's buffer)."""
    cached = slot.views.get("layout")
    if cached is None or cached[0] is not lay:
        cached = slot.views["layout"] = (lay, [slot_view(slot, r) for r in lay.regions])
    return cached[1]
