"""Where a snapshot's tensors sit in a pool slot, and the write plan they are flushed with.

One ``SnapshotLayout`` serves every snapshot of the same state structure (same keys, dtypes, shapes and local
pieces): the ``Checkpointer`` builds it once, collectively, and reuses it while ``signature`` stays the same. Each
local piece of each tensor gets a ``Region``: a byte range of a slot, aligned to ``ALIGN_BYTES``.

``Sources`` keeps, per key, what a snapshot copies from (the tensor's layout, its local views, whether only
``optimizer.step()`` changes it) and reuses it while the key's tensor is the same memory, so a save of unchanged
state does not recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ckpt.dist import DistWrapper
from ckpt.pool import ALIGN_BYTES, Slot
from ckpt.saving import SavePlan, plan_save
from formats.box import Box
from resharding.layout import TensorLayout, is_dtensor, memory_identity, tensor_layout


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
    #: The bytes of the regions (``total_bytes`` without the alignment padding between them).
    staged_bytes: int = 0

    def piece_box(self, r: Region) -> Box:
        """The global box of region ``r``'s piece, as the write plan knows it."""
        return self.plan.layouts[r.key].pieces[r.piece_index].global_box


def signature(flat: Any, layouts: dict[str, TensorLayout]) -> tuple[Any, ...]:
    """What a layout depends on: every key's dtype, global shape and local pieces."""
    return _signature((k, t.dtype, layouts[k]) for k, t in flat.tensors.items())


def _signature(entries: Any) -> tuple[Any, ...]:
    return tuple((k, str(dtype), lay.global_shape, lay.pieces) for k, dtype, lay in entries)


def build(dw: DistWrapper, flat: Any, layouts: dict[str, TensorLayout], sig: tuple[Any, ...],
          max_chunk_bytes: int) -> SnapshotLayout:
    """Plan the writes (collective over ``dw``) and place every local piece in a slot."""
    # ties are not in the plan cache's signature, so a reused plan must not assume one (store_tied_once=False)
    plan = plan_save(dw, flat, max_chunk_bytes, phase="ckpt.Checkpointer: planning", store_tied_once=False)
    regions, offset = [], 0
    for key, t in flat.tensors.items():
        for i, piece in enumerate(layouts[key].pieces):
            n = piece.global_box.numel * t.element_size()
            regions.append(Region(key, i, offset, n, t.dtype, piece.global_box.sizes))
            offset += -(-n // ALIGN_BYTES) * ALIGN_BYTES
    return SnapshotLayout(sig, plan, regions, offset, sum(r.nbytes for r in regions))


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


def storage_ptr(t: torch.Tensor) -> int:
    """The address of the storage under ``t`` (a DTensor's local storage): tensors sharing memory share it."""
    local = t.to_local() if is_dtensor(t) else t
    return local.untyped_storage().data_ptr()


@dataclass
class SourceViews:
    """What one key's snapshot copies from: its layout, each local piece's view, and whether the copy is lazy."""

    ident: tuple[Any, ...] | None
    layout: TensorLayout
    views: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    lazy: bool = False

    def same_layout(self, other: "SourceViews") -> bool:
        return (self.dtype == other.dtype and self.layout.global_shape == other.layout.global_shape
                and self.layout.pieces == other.layout.pieces)


class Sources:
    """Per key of a snapshot's flat state, its ``SourceViews``, kept from one ``Checkpointer.save`` to the next.

    A key's source is rebuilt when its tensor is not the same memory as before (``memory_identity``), such as
    RNG states, which are new tensors at every save. Which keys are lazy is decided anew, from the optimizers'
    memory, when the keys or the optimizers' parameters changed or when a lazy key's tensor changed (a parameter
    whose ``.data`` was replaced, optimizer state reloaded); a key whose tensor changed otherwise stays eager, which
    is always safe. Holds references to the last save's views until the next save or ``clear``.
    """

    def __init__(self) -> None:
        self.by_key: dict[str, SourceViews] = {}
        self.keys: tuple[str, ...] = ()
        self.optim_sig: Any = None
        self.signature: tuple[Any, ...] | None = None
        #: Whether any lazy copy reads CUDA memory (decided with the lazy keys).
        self.lazy_cuda = False

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def update(self, tensors: dict[str, torch.Tensor], optim_sig: Any,
               lazy_ptrs: Callable[[], set[int]]) -> dict[str, SourceViews]:
        """This save's sources; ``lazy_ptrs()`` gives the storage addresses only ``optimizer.step()`` changes
        (called only when the lazy keys must be decided anew). ``self.signature`` is then this state's."""
        keys = tuple(tensors)
        classify = keys != self.keys or optim_sig != self.optim_sig
        relayout = classify or self.signature is None
        old = {} if classify else self.by_key
        new: dict[str, SourceViews] = {}
        for k, t in tensors.items():
            ident = memory_identity(t)
            prev = old.get(k)
            if prev is not None and ident is not None and prev.ident == ident:
                new[k] = prev
                continue
            lay = tensor_layout(t)
            src = new[k] = SourceViews(ident, lay, tuple(p.local_view(lay.local) for p in lay.pieces), t.dtype)
            if prev is not None:
                classify = classify or prev.lazy
                relayout = relayout or not src.same_layout(prev)
        if classify:
            ptrs = lazy_ptrs()
            for k, t in tensors.items():
                new[k].lazy = storage_ptr(t) in ptrs
            self.lazy_cuda = any(v.is_cuda for s in new.values() if s.lazy for v in s.views)
        if relayout:
            self.signature = signature_of(new)
        self.by_key, self.keys, self.optim_sig = new, keys, optim_sig
        return new


def signature_of(sources: dict[str, SourceViews]) -> tuple[Any, ...]:
    """``signature`` of the state the sources were made of."""
    return _signature((k, s.dtype, s.layout) for k, s in sources.items())
