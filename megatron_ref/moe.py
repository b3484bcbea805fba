"""The mixture-of-experts MLP (mixtral): replicated router, experts split over EP, each expert's ffn over TP.

Who uses it: ``model.py`` (one per layer for family ``mixtral``), on every rank of the layer's stage.

Dispatch (mcore's all-gather dispatcher, without capacity limits): each rank routes its own tokens (top-k of the
router logits, softmax over the k chosen logits), then the EP group all-gathers tokens, probabilities and
choices. Every EP rank runs its local experts on the gathered tokens that chose them, the TP ranks sum their ffn
shards, the outputs are weighted and summed over the k choices, and a reduce-scatter over EP returns to each rank
the sum over all EP ranks' experts for its own tokens. The collectives are autograd functions (``comm.py``), so
the router receives the gradient of every chosen expert, wherever it ran. There is no auxiliary load-balancing
loss (it would only add a term to the loss; the layout is what matters here).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_ref.comm import all_gather_rows, copy_to, gather_counts, gather_rows, reduce_from, reduce_scatter_rows
from megatron_ref.config import ModelConfig
from megatron_ref.layers import Getter, Weights
from megatron_ref.parallel import ParallelState, split_range


class Expert(nn.Module):
    """One SwiGLU expert: ``linear_fc1`` holds this TP rank's gate rows then up rows, ``linear_fc2`` its columns."""

    def __init__(self, mc: ModelConfig, ffn_count: int) -> None:
        super().__init__()
        self.linear_fc1 = Weights((2 * ffn_count, mc.hidden))
        self.linear_fc2 = Weights((mc.hidden, ffn_count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.linear_fc1.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.linear_fc2.weight)


class Experts(nn.Module):
    def __init__(self, mc: ModelConfig, count: int, ffn_count: int) -> None:
        super().__init__()
        self.local_experts = nn.ModuleList(Expert(mc, ffn_count) for _ in range(count))


class MoE(nn.Module):
    """``mlp`` of a mixtral layer: ``router.weight`` plus ``experts.local_experts.{j}``."""

    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.ps, self.mc = ps, mc
        self.expert_start, count = split_range(mc.experts, ps.pc.ep, ps.coords.ep)
        self.ffn_start, self.ffn_count = split_range(mc.ffn, ps.pc.tp, ps.coords.tp)
        self.router = Weights((mc.experts, mc.hidden))
        self.experts = Experts(mc, count, self.ffn_count)

    def fill(self, get: Getter, prefix: str) -> None:
        """``prefix`` is the logical ``decoder.layers.{L}.mlp.``; local expert ``j`` is global ``expert_start + j``."""
        lo, hi = self.ffn_start, self.ffn_start + self.ffn_count
        with torch.no_grad():
            self.router.weight.copy_(get(prefix + "router.weight"))
            for j, expert in enumerate(self.experts.local_experts):
                e = f"{prefix}experts.{self.expert_start + j}."
                expert.linear_fc1.weight.copy_(torch.cat([get(e + "linear_fc1_gate.weight")[lo:hi],
                                                          get(e + "linear_fc1_up.weight")[lo:hi]]))
                expert.linear_fc2.weight.copy_(get(e + "linear_fc2.weight")[:, lo:hi])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k, ps = x.shape, self.mc.top_k, self.ps
        tokens = x.reshape(-1, shape[-1])
        top_logits, choice = F.linear(tokens, self.router.weight).topk(k, dim=-1)
        probs = torch.softmax(top_logits, dim=-1)
        counts = gather_counts(tokens.shape[0], ps, "ep")
        all_tokens = gather_rows(tokens, counts, ps, "ep")
        all_probs = gather_rows(probs, counts, ps, "ep")
        all_choice = all_gather_rows(choice, counts, ps, "ep")
        expert_in = copy_to(all_tokens, ps, "tp")
        # One row per (token, choice); rows of experts elsewhere stay zero here and are filled on their EP rank.
        # Experts run even on zero tokens: that keeps ``expert_in`` in the graph, so every EP rank joins the
        # backward collectives, and every expert parameter gets a (zero) gradient.
        partial = expert_in.new_zeros((all_tokens.shape[0] * k, shape[-1]))
        for j, expert in enumerate(self.experts.local_experts):
            token, slot = (all_choice == self.expert_start + j).nonzero(as_tuple=True)
            partial = partial.index_add(0, token * k + slot, expert(expert_in[token]))
        per_choice = reduce_from(partial, ps, "tp").view(-1, k, shape[-1])
        combined = (per_choice * all_probs.unsqueeze(-1)).sum(dim=1)
        return reduce_scatter_rows(combined, counts, ps, "ep").view(shape)
