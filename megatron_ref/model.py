"""One pipeline stage of the reference model on one rank, and ``build_model``.

Who uses it: callers build a model with ``build_model`` on every rank (collectively, when it creates the process
groups), then ``train.py`` runs it. The module tree mirrors mcore, so ``named_parameters()`` yields exactly the
doc's local names, in the order that fixes the ZeRO flat buffers: ``embedding`` (first stage), ``decoder.layers``
(this stage's layers, local indices), ``decoder.final_layernorm`` and ``output_layer`` (last stage).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from megatron_ref.config import ConfigError, ModelConfig, ParallelConfig, check_compatible
from megatron_ref.layers import MLP, Getter, Norm, SelfAttention, VocabParallelEmbedding, Weights, fill_vocab
from megatron_ref.layers import vocab_parallel_token_losses, vocab_rows
from megatron_ref.logical import EMBEDDING, OUTPUT, layer_prefix, logical_getter
from megatron_ref.moe import MoE
from megatron_ref.parallel import ParallelState, split_range

EXPERT_MARK = ".mlp.experts."


def is_expert(local_name: str) -> bool:
    """Expert parameters form the ``expert`` bucket and are averaged over expert-DP instead of DP."""
    return EXPERT_MARK in local_name


class TransformerLayer(nn.Module):
    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.input_layernorm = Norm(mc)
        self.self_attention = SelfAttention(mc, ps)
        self.pre_mlp_layernorm = Norm(mc)
        self.mlp: nn.Module = MoE(mc, ps) if mc.moe else MLP(mc, ps)

    def fill(self, get: Getter, layer: int) -> None:
        p = layer_prefix(layer)
        self.input_layernorm.fill(get, p + "input_layernorm")
        self.self_attention.fill(get, p + "self_attention.")
        self.pre_mlp_layernorm.fill(get, p + "pre_mlp_layernorm")
        self.mlp.fill(get, p + "mlp.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, mc: ModelConfig, ps: ParallelState, count: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(mc, ps) for _ in range(count))
        self.final_layernorm = Norm(mc) if ps.last_stage else None


class Embedding(nn.Module):
    def __init__(self, mc: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(mc, ps)


class GPTModel(nn.Module):
    """The stage of the model held by one rank (all three families; ``mc.family`` picks norms, MLP and MoE).

    With ``tied`` and ``pp == 1`` the output layer multiplies by the embedding weight and there is no
    ``output_layer.weight``; with ``tied`` and ``pp > 1`` the last stage holds a copy in ``output_layer.weight``,
    kept equal to the embedding by summing the two gradients over the embedding group.
    """

    def __init__(self, mc: ModelConfig, pc: ParallelConfig, ps: ParallelState) -> None:
        super().__init__()
        check_compatible(mc, pc)
        self.mc, self.pc, self.ps = mc, pc, ps
        self.layer_start, count = split_range(mc.layers, pc.pp, ps.coords.pp)
        self.vocab_start, vocab_local = vocab_rows(mc, ps)
        self.embedding = Embedding(mc, ps) if ps.first_stage else None
        self.decoder = Decoder(mc, ps, count)
        has_output = ps.last_stage and not (mc.tied and pc.pp == 1)
        self.output_layer = Weights((vocab_local, mc.hidden)) if has_output else None

    @property
    def shares_embedding(self) -> bool:
        """True where this rank's copy of the tied embedding must be summed with the other stage's."""
        return self.mc.tied and self.pc.pp > 1 and (self.ps.first_stage or self.ps.last_stage)

    def tied_weight(self) -> torch.Tensor:
        """The parameter that is this stage's share of the tied embedding (first or last stage)."""
        return self.embedding.word_embeddings.weight if self.ps.first_stage else self.output_layer.weight

    def fill(self, get: Getter) -> None:
        """Slice this rank's parameters out of the logical tensors."""
        if self.embedding is not None:
            fill_vocab(self.embedding.word_embeddings.weight, get(EMBEDDING), self.vocab_start)
        for i, layer in enumerate(self.decoder.layers):
            layer.fill(get, self.layer_start + i)
        if self.decoder.final_layernorm is not None:
            self.decoder.final_layernorm.fill(get, "decoder.final_layernorm")
        if self.output_layer is not None:
            fill_vocab(self.output_layer.weight, get(EMBEDDING if self.mc.tied else OUTPUT), self.vocab_start)

    def head_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding.word_embeddings(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This stage's layers on hidden states ``[batch, seq, hidden]``."""
        for layer in self.decoder.layers:
            x = layer(x)
        return x

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last stage only: final norm, output layer, per-token vocab-parallel cross entropy ``[batch, seq]``."""
        h = self.decoder.final_layernorm(h)
        return vocab_parallel_token_losses(h, self.head_weight(), labels, self.mc.vocab, self.vocab_start, self.ps)

    def attention_layers(self) -> list[SelfAttention]:
        return [layer.self_attention for layer in self.decoder.layers]


def build_model(mc: ModelConfig, pc: ParallelConfig, ps: ParallelState | None = None,
                logical: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None) -> GPTModel:
    """This rank's stage, filled from the logical weights (``logical_init`` values unless ``logical`` is given).

    ``ps`` defaults to ``ParallelState.create(pc)``, which is collective: call it on every rank, in step.
    """
    ps = ps if ps is not None else ParallelState.create(pc)
    if ps.pc != pc:
        raise ConfigError(f"build_model: ParallelState is for {ps.pc!r}, not {pc!r}")
    model = GPTModel(mc, pc, ps)
    if logical is None:
        get = logical_getter(mc)
    elif callable(logical):
        get = logical
    else:
        get = logical.__getitem__
    model.fill(get)
    return model
