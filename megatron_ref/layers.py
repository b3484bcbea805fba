"""Tensor-parallel layers: norms, vocab-parallel embedding and loss, fused-QKV attention, dense MLPs.

Who uses it: ``model.py`` builds one stage of the model from these on every rank. Module and parameter names are
chosen so that ``named_parameters()`` yields the doc's local names. Each module fills its own parameters from
the logical tensors (``fill``), slicing them with its own code: the oracles in ``oracle.py`` slice independently,
so tests comparing the two catch a mistake in either.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_ref.comm import all_reduce_, copy_to, reduce_from
from megatron_ref.config import ModelConfig
from megatron_ref.parallel import ParallelState, split_range

Getter = Callable[[str], torch.Tensor]
NORM_EPS = 1e-5
ROPE_BASE = 10000.0


class Weights(nn.Module):
    """A parameter holder named like an mcore linear (``weight`` and optional ``bias``)."""

    def __init__(self, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None


class Norm(nn.Module):
    """LayerNorm with bias (gpt) or RMSNorm (llama, mixtral); replicated over TP."""

    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        self.rms = not mc.biases
        self.weight = nn.Parameter(torch.ones(mc.hidden))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(mc.hidden))

    def fill(self, get: Getter, logical: str) -> None:
        with torch.no_grad():
            self.weight.copy_(get(logical + ".weight"))
            if self.bias is not None:
                self.bias.copy_(get(logical + ".bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, NORM_EPS)


def vocab_rows(mc: ModelConfig, ps: ParallelState) -> tuple[int, int]:
    """``(first row, rows)`` of this TP rank's slice of the padded vocabulary."""
    rows = mc.padded_vocab(ps.pc.tp) // ps.pc.tp
    return ps.coords.tp * rows, rows


def fill_vocab(weight: torch.Tensor, logical: torch.Tensor, start: int) -> None:
    """Copy this rank's rows of a ``[vocab, hidden]`` logical tensor; rows past the vocabulary stay zero."""
    with torch.no_grad():
        weight.zero_()
        real = max(0, min(logical.shape[0] - start, weight.shape[0]))
        weight[:real].copy_(logical[start:start + real])


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + rows)`` of the padded table; lookups outside them contribute zeros before the TP sum."""

    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.ps = ps
        self.start, rows = vocab_rows(mc, ps)
        self.weight = nn.Parameter(torch.zeros(rows, mc.hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.size("tp") == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from(out.masked_fill(outside.unsqueeze(-1), 0.0), self.ps)


def vocab_parallel_token_losses(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int,
                                start: int, ps: ParallelState) -> torch.Tensor:
    """Per-token cross entropy with the output matrix split by rows over TP; padding logits never count.

    Padding columns are set to ``-inf`` before the max and the exp, so they get probability zero and gradient
    zero, and the padding rows of the weight stay exactly zero through training.
    """
    rows = weight.shape[0]
    logits = F.linear(copy_to(h, ps), weight)
    pad = torch.arange(start, start + rows) >= vocab
    if bool(pad.any()):
        logits = logits.masked_fill(pad, float("-inf"))
    with torch.no_grad():
        peak = all_reduce_(logits.max(dim=-1).values.contiguous(), ps, "tp", torch.distributed.ReduceOp.MAX)
    shifted = logits - peak.unsqueeze(-1)
    sum_exp = reduce_from(shifted.exp().sum(dim=-1), ps)
    local = labels - start
    inside = (local >= 0) & (local < rows)
    picked = shifted.gather(-1, local.clamp(0, rows - 1).unsqueeze(-1)).squeeze(-1)
    picked = reduce_from(torch.where(inside, picked, torch.zeros_like(picked)), ps)
    return sum_exp.log() - picked


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over ``[batch, heads, seq, head_dim]`` (no parameters, identical on every rank)."""
    seq, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Causal self-attention with fused QKV in mcore's grouped GQA order and uneven head splits over TP.

    The local QKV rows are described in head units by ``units``: unit ``u < heads`` is query head ``u``, unit
    ``heads + g`` is K of group ``g``, ``heads + kv_heads + g`` is V of group ``g``. Each local query head attends
    with its own group's local K/V; a group shared by several TP ranks is a TP replica whose gradient is summed
    over TP by ``sync_replica_grads`` (each rank only sees its own query heads' contribution).
    """

    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.ps, self.mc = ps, mc
        tp, t = ps.pc.tp, ps.coords.tp
        self.groups_by_rank = [self._groups(mc, tp, r) for r in range(tp)]
        self.local_groups = self.groups_by_rank[t]
        head_start, head_count = split_range(mc.heads, tp, t)
        per_group = mc.heads // mc.kv_heads
        units: list[int] = []
        q_pos: list[int] = []
        k_pos: list[int] = []
        v_pos: list[int] = []
        for g in self.local_groups:
            mine = range(max(head_start, g * per_group), min(head_start + head_count, (g + 1) * per_group))
            q_pos += range(len(units), len(units) + len(mine))
            units += mine
            k_pos += [len(units)] * len(mine)
            v_pos += [len(units) + 1] * len(mine)
            units += [mc.heads + g, mc.heads + mc.kv_heads + g]
        self.units = units
        self.q_pos, self.k_pos, self.v_pos = (torch.tensor(p, dtype=torch.int64) for p in (q_pos, k_pos, v_pos))
        self.head_count = head_count
        hd = mc.head_dim
        self.linear_qkv = Weights((len(units) * hd, mc.hidden), (len(units) * hd,) if mc.biases else None)
        self.linear_proj = Weights((mc.hidden, head_count * hd), (mc.hidden,) if mc.biases else None)
        self.replicated = any(
            sum(g in gs for gs in self.groups_by_rank) > 1 for g in range(mc.kv_heads))

    @staticmethod
    def _groups(mc: ModelConfig, tp: int, t: int) -> list[int]:
        start, count = split_range(mc.heads, tp, t)
        per_group = mc.heads // mc.kv_heads
        return list(range(start // per_group, (start + count - 1) // per_group + 1))

    def fill(self, get: Getter, prefix: str) -> None:
        """``prefix`` is the logical ``decoder.layers.{L}.self_attention.``."""
        mc, hd = self.mc, self.mc.head_dim
        index = torch.tensor(self.units, dtype=torch.int64)
        with torch.no_grad():
            w = torch.cat([get(prefix + f"linear_{x}.weight") for x in "qkv"]).view(-1, hd, mc.hidden)
            self.linear_qkv.weight.copy_(w[index].reshape(-1, mc.hidden))
            start, _ = split_range(mc.heads, self.ps.pc.tp, self.ps.coords.tp)
            proj = get(prefix + "linear_proj.weight")
            self.linear_proj.weight.copy_(proj[:, start * hd:(start + self.head_count) * hd])
            if mc.biases:
                b = torch.cat([get(prefix + f"linear_{x}.bias") for x in "qkv"]).view(-1, hd)
                self.linear_qkv.bias.copy_(b[index].reshape(-1))
                self.linear_proj.bias.copy_(get(prefix + "linear_proj.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = F.linear(copy_to(x, self.ps), self.linear_qkv.weight, self.linear_qkv.bias)
        qkv = qkv.view(b, s, len(self.units), self.mc.head_dim)
        q, k, v = (qkv[:, :, pos].transpose(1, 2) for pos in (self.q_pos, self.k_pos, self.v_pos))
        out = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, self.head_count * self.mc.head_dim)
        y = reduce_from(F.linear(out, self.linear_proj.weight), self.ps)
        return y if self.linear_proj.bias is None else y + self.linear_proj.bias

    def sync_replica_grads(self) -> None:
        """Sum the K/V gradients of groups held by several TP ranks over TP, so those replicas stay equal."""
        if not self.replicated:
            return
        mc, hd = self.mc, self.mc.head_dim
        kv_units = [(i, u) for i, u in enumerate(self.units) if u >= mc.heads]
        for param in (self.linear_qkv.weight, self.linear_qkv.bias):
            if param is None or param.grad is None:
                continue
            g = param.grad.view(len(self.units), hd, -1)
            buf = g.new_zeros((2 * mc.kv_heads, hd, g.shape[-1]))
            for i, u in kv_units:
                buf[u - mc.heads] = g[i]
            all_reduce_(buf, self.ps, "tp")
            for i, u in kv_units:
                g[i] = buf[u - mc.heads]


class MLP(nn.Module):
    """Dense MLP: GeLU with biases (gpt) or SwiGLU with fused gate/up rows (llama); ffn split over TP."""

    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.ps, self.mc = ps, mc
        self.ffn_start, self.ffn_count = split_range(mc.ffn, ps.pc.tp, ps.coords.tp)
        fc1_rows = (2 if mc.gated else 1) * self.ffn_count
        self.linear_fc1 = Weights((fc1_rows, mc.hidden), (fc1_rows,) if mc.biases else None)
        self.linear_fc2 = Weights((mc.hidden, self.ffn_count), (mc.hidden,) if mc.biases else None)

    def fill(self, get: Getter, prefix: str) -> None:
        """``prefix`` is the logical ``decoder.layers.{L}.mlp.``."""
        lo, hi = self.ffn_start, self.ffn_start + self.ffn_count
        with torch.no_grad():
            if self.mc.gated:
                self.linear_fc1.weight.copy_(torch.cat([get(prefix + "linear_fc1_gate.weight")[lo:hi],
                                                        get(prefix + "linear_fc1_up.weight")[lo:hi]]))
            else:
                self.linear_fc1.weight.copy_(get(prefix + "linear_fc1.weight")[lo:hi])
                self.linear_fc1.bias.copy_(get(prefix + "linear_fc1.bias")[lo:hi])
                self.linear_fc2.bias.copy_(get(prefix + "linear_fc2.bias"))
            self.linear_fc2.weight.copy_(get(prefix + "linear_fc2.weight")[:, lo:hi])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(copy_to(x, self.ps), self.linear_fc1.weight, self.linear_fc1.bias)
        if self.mc.gated:
            gate, up = h.split(self.ffn_count, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        y = reduce_from(F.linear(h, self.linear_fc2.weight), self.ps)
        return y if self.linear_fc2.bias is None else y + self.linear_fc2.bias
