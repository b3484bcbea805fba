"""Applying spec layout pieces to tensors: logical -> rank-local and rank-local -> logical.

Used by tests (random logical tensors through every rank's layout and back) and, later, by load (filling local
tensors from read boxes) and offline conversion. A piece's view is ``local.as_strided(sizes, strides,
storage_offset)`` of a contiguous local tensor; it addresses exactly the local elements that hold the piece's box.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ckpt.errors import ShardMismatchError
from resharding.spec_layout import AVERAGED, LocalTensor, Piece


def piece_view(local: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The elements of contiguous ``local`` that hold ``piece`` (a view: writes go to ``local``)."""
    if not local.is_contiguous():
        raise ValueError("piece views need a contiguous local tensor")
    return local.as_strided(piece.sizes, piece.strides, local.storage_offset() + piece.storage_offset)


def local_from_logical(lt: LocalTensor, logical: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
                       ) -> torch.Tensor:
    """A new local tensor for ``lt``: every piece copied from its logical box, padding zero."""
    dt = dtype or next((logical[p.logical_key].dtype for p in lt.pieces), torch.float32)
    out = torch.zeros(lt.shape, dtype=dt)
    for p in lt.pieces:
        src = logical[p.logical_key][tuple(slice(o, o + s) for o, s in zip(p.logical_offsets, p.sizes))]
        piece_view(out, p).copy_(src)
    return out


def logical_from_locals(items: Iterable[tuple[LocalTensor, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]],
                        dtype: torch.dtype = torch.float32, *, check_padding: bool = True) -> dict[str, torch.Tensor]:
    """Assemble logical tensors from local tensors (of any number of ranks).

    Replicated pieces must agree with what is already placed; averaged pieces are averaged over their holders;
    with ``check_padding`` every local element no piece covers must be zero. Every problem (disagreeing replica,
    hole, non-zero padding) is collected and raised once as ``ShardMismatchError``.
    """
    values = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
    filled = {k: torch.zeros(s, dtype=torch.int32) for k, s in shapes.items()}
    sums: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for lt, local in items:
        local = local.contiguous()
        covered = torch.zeros(lt.shape, dtype=torch.bool)
        for p in lt.pieces:
            src = piece_view(local, p)
            if lt.shape:
                piece_view(covered, p).fill_(True)
            sl = tuple(slice(o, o + s) for o, s in zip(p.logical_offsets, p.sizes))
            dst, done = values[p.logical_key][sl], filled[p.logical_key][sl]
            if p.policy == AVERAGED:
                acc = sums.setdefault(p.logical_key, torch.zeros(shapes[p.logical_key], dtype=torch.float64))
                acc[sl] += src.to(torch.float64)
            else:
                seen = done > 0
                if bool(seen.any()) and not torch.equal(dst[seen], src.to(dtype)[seen]):
                    problems.append(f"{lt.key} -> {p.logical_key}{[list(p.logical_offsets), list(p.sizes)]}: replica "
                                    "differs from the copy already placed")
                dst.copy_(src)
            done += 1
        if check_padding and lt.shape and bool((local[~covered] != 0).any()):
            problems.append(f"{lt.key}: padding elements are not zero")
    for key, acc in sums.items():
        n = filled[key].clamp(min=1)
        values[key] = (acc / n).to(dtype)
    for key, done in filled.items():
        if not bool((done > 0).all()):
            problems.append(f"{key}: not every element is held by some local tensor")
    if problems:
        raise ShardMismatchError(f"{len(problems)} problem(s) assembling logical tensors:\n  " + "\n  ".join(problems[:50]))
    return values
