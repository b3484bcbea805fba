"""Collectives, autograd-aware where activations cross ranks.

Who calls it: the layers (TP and EP collectives inside forward/backward), the training step (gradient sums,
pipeline send/recv, the loss) on every rank. Each function is a no-op for a group of one, so the same model code
runs unsharded without a process group.

The autograd functions are Megatron's pairs: ``copy_to`` (identity forward, all-reduce backward) in front of a
column-parallel matmul, ``reduce_from`` (all-reduce forward, identity backward) after a row-parallel one, and for
expert parallelism ``gather_rows`` (all-gather forward, reduce-scatter backward) and ``reduce_scatter_rows``
(reduce-scatter forward, all-gather backward). Row counts may differ per rank (uneven DP shares), so gathers pad to
the largest count; reduce-scatter is an all-reduce plus a slice, because gloo has no reduce-scatter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_ref.parallel import ParallelState


def all_reduce_(t: torch.Tensor, ps: ParallelState, kind: str, op: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum unless ``op``) over ``ps``'s group of ``kind``; returns ``t``."""
    if ps.size(kind) > 1:
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=ps.group(kind))
    return t


def all_reduce_many_(tensors: list[torch.Tensor], ps: ParallelState, kind: str) -> None:
    """Sum a list of tensors over a group with one collective (flatten, reduce, copy back)."""
    if ps.size(kind) <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=ps.group(kind))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_counts(n: int, ps: ParallelState, kind: str) -> list[int]:
    """Every group member's ``n`` (row counts before an uneven gather), in group order."""
    if ps.size(kind) == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64)
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(ps.size(kind))]
    dist.all_gather(out, mine, group=ps.group(kind))
    return [int(x.item()) for x in out]


def all_gather_rows(x: torch.Tensor, counts: list[int], ps: ParallelState, kind: str) -> torch.Tensor:
    """Concatenate every member's ``x`` (``counts[i]`` rows each) along dim 0, no autograd."""
    if ps.size(kind) == 1:
        return x
    width = max(counts)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded.contiguous(), group=ps.group(kind))
    return torch.cat([o[:c] for o, c in zip(out, counts)])


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ps: ParallelState, kind: str) -> torch.Tensor:
        ctx.ps, ctx.kind = ps, kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return all_reduce_(g.contiguous().clone(), ctx.ps, ctx.kind), None, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ps: ParallelState, kind: str) -> torch.Tensor:
        return all_reduce_(x.contiguous().clone(), ps, kind)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return g, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: list[int], ps: ParallelState, kind: str) -> torch.Tensor:
        i = ps.index(kind)
        ctx.ps, ctx.kind, ctx.start, ctx.count = ps, kind, sum(counts[:i]), counts[i]
        return all_gather_rows(x.contiguous(), counts, ps, kind)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        # Reduce-scatter: every member's rows of g are partial sums over the members' local experts.
        total = all_reduce_(g.contiguous().clone(), ctx.ps, ctx.kind)
        return total[ctx.start:ctx.start + ctx.count], None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: list[int], ps: ParallelState, kind: str) -> torch.Tensor:
        i = ps.index(kind)
        ctx.ps, ctx.kind, ctx.counts = ps, kind, counts
        start = sum(counts[:i])
        return all_reduce_(x.contiguous().clone(), ps, kind)[start:start + counts[i]]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return all_gather_rows(g.contiguous(), ctx.counts, ctx.ps, ctx.kind), None, None, None


def copy_to(x: torch.Tensor, ps: ParallelState, kind: str = "tp") -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel matmul)."""
    return x if ps.size(kind) == 1 else _CopyTo.apply(x, ps, kind)


def reduce_from(x: torch.Tensor, ps: ParallelState, kind: str = "tp") -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel matmul)."""
    return x if ps.size(kind) == 1 else _ReduceFrom.apply(x, ps, kind)


def gather_rows(x: torch.Tensor, counts: list[int], ps: ParallelState, kind: str = "ep") -> torch.Tensor:
    """All-gather along dim 0 (uneven ``counts``); backward reduce-scatters the gradient."""
    return x if ps.size(kind) == 1 else _GatherRows.apply(x, counts, ps, kind)


def reduce_scatter_rows(x: torch.Tensor, counts: list[int], ps: ParallelState, kind: str = "ep") -> torch.Tensor:
    """Sum over the group, keep this member's ``counts`` rows; backward all-gathers the gradient."""
    return x if ps.size(kind) == 1 else _ReduceScatterRows.apply(x, counts, ps, kind)


def send(t: torch.Tensor, dst: int) -> None:
    """Blocking point-to-point send to global rank ``dst`` (pipeline activations and their gradients)."""
    dist.send(t.contiguous(), dst)


def recv(shape: tuple[int, ...], src: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocking receive of a tensor of known shape from global rank ``src``."""
    buf = torch.empty(shape, dtype=dtype)
    dist.recv(buf, src)
    return buf
