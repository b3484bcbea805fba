"""Layouts of the tensors a rank holds: which boxes of which logical tensor live where in the local tensor.

For a plain tensor the rank holds the whole logical tensor. For a DTensor the boxes come from its mesh and
placements, computed without communication: ``Shard`` (even or uneven), ``Replicate`` and ``_StridedShard``
(FSDP2 over tensor parallel), in any nesting order. A ``_StridedShard`` can give a rank a non-contiguous set of
global rows; those are decomposed into boxes (runs of consecutive indices), never gathered.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from formats.box import Box

try:  # DTensor is part of torch.distributed; absent on builds without distributed support.
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - every supported torch has it
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class LocalPiece:
    """The local box ``local_offsets`` + ``global_box.sizes`` of the local tensor holds ``global_box``.

    ``source`` is the tensor the local box indexes into when it is not the layout's ``local`` tensor: a spec
    layout gives one logical tensor pieces that live in several rank-local tensors (fused QKV, ZeRO flat
    buffers), each piece a strided view of its own.
    """

    local_offsets: tuple[int, ...]
    global_box: Box
    source: "torch.Tensor | None" = field(default=None, compare=False, hash=False, repr=False)

    def local_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.local_offsets, self.global_box.sizes))

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        """The local elements of this piece: a view of ``source`` (if set) or of the layout's ``local``; the tensor
        itself when the piece is all of it (a plain tensor's one piece: no new view per save)."""
        t = self.source if self.source is not None else local
        if self.global_box.sizes == tuple(t.shape) and not any(self.local_offsets):
            return t
        return t[self.local_slices()]


@dataclass(frozen=True)
class TensorLayout:
    """Where one logical tensor's elements live on this rank."""

    global_shape: tuple[int, ...]
    local: torch.Tensor
    pieces: tuple[LocalPiece, ...]
    #: JSON description of the parallel layout (mesh and placements), or None for a plain tensor.
    description: dict[str, Any] | None


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def memory_identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What two views of the same memory, seen the same way, have in common: data pointer, shape, strides, dtype
    and device (and, for a DTensor, its local memory's, plus global shape and placements on the same mesh).

    While some view of the memory is kept alive, no other storage can take its address, so equal identities
    then mean the same elements. None where a tensor has no data pointer (wrapper subclasses without storage).
    """
    try:
        if is_dtensor(t):
            local = t.to_local()
            return (type(t), local.data_ptr(), local.shape, local.stride(), t.dtype, local.device, t.shape,
                    tuple(t.placements), id(t.device_mesh))
        return (type(t), t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
    except RuntimeError:  # wrapper subclasses without storage
        return None


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive runs of a global index list -> [(local_start, global_start, length)]."""
    runs: list[tuple[int, int, int]] = []
    for local, g in enumerate(index):
        if runs and runs[-1][1] + runs[-1][2] == g:
            ls, gs, n = runs[-1]
            runs[-1] = (ls, gs, n + 1)
        else:
            runs.append((local, g, 1))
    return runs


def _placement_name(p: object) -> str:
    if isinstance(p, _StridedShard):
        return f"_StridedShard(dim={p.dim}, split_factor={p.split_factor})"
    if isinstance(p, Shard):
        return f"Shard(dim={p.dim})"
    if isinstance(p, Replicate):
        return "Replicate()"
    return repr(p)


def dtensor_global_indices(global_shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: list[int],
                           placements: tuple[object, ...]) -> list[list[int] | None]:
    """Per tensor dim, the global index of every local position (None for an unsharded dim).

    Shards are applied left to right over the mesh dims, as DTensor does; a shard of a shard indexes into the
    previous shard's index list, which is how ``_StridedShard`` orders rows.
    """
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

    local_shape = list(global_shape)
    index: list[list[int] | None] = [None] * len(global_shape)
    for mesh_dim, p in enumerate(placements):
        if not isinstance(p, (Shard, _StridedShard)):
            if not isinstance(p, Replicate):
                raise ValueError(f"placement {p!r} cannot be saved: reduce Partial tensors before checkpointing")
            continue
        d = p.dim
        if isinstance(p, _StridedShard):
            size, offs = p._local_shard_size_and_offset(
                local_shape[d], mesh_shape[mesh_dim], coordinate[mesh_dim], offset_mode=_StridedShardOffsetMode.ALL
            )
            positions = list(offs) if size else []
        else:
            size, off = p._local_shard_size_and_offset(local_shape[d], mesh_shape[mesh_dim], coordinate[mesh_dim])
            positions = list(range(off, off + size))
        prev = index[d]
        index[d] = positions if prev is None else [prev[i] for i in positions]
        local_shape[d] = size
    return index


def pieces_from_indices(global_shape: tuple[int, ...], index: list[list[int] | None]) -> list[LocalPiece]:
    """Boxes of the cartesian product of per-dim index lists (runs of consecutive indices)."""
    per_dim = []
    for d, n in enumerate(global_shape):
        per_dim.append([(0, 0, n)] if index[d] is None else _runs(index[d]))  # type: ignore[arg-type]
    pieces = []
    for combo in itertools.product(*per_dim):
        pieces.append(LocalPiece(tuple(c[0] for c in combo), Box(tuple(c[1] for c in combo), tuple(c[2] for c in combo))))
    return pieces


@functools.lru_cache(maxsize=4096)
def _whole_piece(shape: tuple[int, ...]) -> LocalPiece:
    """The one piece of a plain tensor of ``shape`` (immutable, so shared by every tensor of that shape)."""
    return LocalPiece(tuple(0 for _ in shape), Box.whole(shape))


def tensor_layout(t: torch.Tensor) -> TensorLayout:
    """The layout of ``t`` on this rank (called on every rank by save and load)."""
    if not is_dtensor(t):
        shape = tuple(t.shape)
        return TensorLayout(shape, t, (_whole_piece(shape),), None)
    mesh = t.device_mesh
    placements = tuple(t.placements)
    shape = tuple(t.shape)
    local = t.to_local()
    desc = {
        "mesh_shape": list(mesh.shape),
        "mesh_dim_names": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
        "placements": [_placement_name(p) for p in placements],
    }
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the mesh: it holds nothing
        return TensorLayout(shape, local, (), desc)
    index = dtensor_global_indices(shape, tuple(mesh.shape), list(coordinate), placements)
    if any(ix is not None and len(ix) == 0 for ix in index):
        return TensorLayout(shape, local, (), desc)
    pieces = pieces_from_indices(shape, index)
    expected = tuple(len(ix) if ix is not None else n for ix, n in zip(index, shape))
    if tuple(local.shape) != expected:
        raise ValueError(f"DTensor local shape {tuple(local.shape)} differs from its placements' {expected}")
    return TensorLayout(shape, local, tuple(pieces), desc)
