"""A small GPT-style decoder for benchmarks: token + position embedding, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and an (untied) LM head.

Callers: ``benchmarks.training_stall`` builds one with ``GPTConfig.for_params(params_m)`` and trains it on synthetic
tokens with ``train_step``. The head is not tied to the embedding so that every parameter owns its storage, as
in most sharded training setups (a tied head would be one tensor under two keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    seq_len: int = 128
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.seq_len, self.d_model, self.n_layer, self.n_head) < 1:
            raise ValueError(f"{self}: every size must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"{self}: d_model must be a multiple of n_head")

    @property
    def num_params(self) -> int:
        """Parameters of ``GPT(self)``, computed without building it."""
        d, v = self.d_model, self.vocab_size
        per_block = 12 * d * d + 13 * d  # qkv 3d^2+3d, proj d^2+d, fc 4d^2+4d, fc2 4d^2+d, 2 LayerNorms 4d
        return 2 * v * d + self.seq_len * d + self.n_layer * per_block + 2 * d

    @classmethod
    def for_params(cls, params_m: float, seq_len: int = 128, vocab_size: int = 8192) -> "GPTConfig":
        """A config with about ``params_m`` million parameters: width from a GPT-2-like ladder, then depth."""
        target = params_m * 1e6
        d = 768 if target >= 60e6 else 512 if target >= 20e6 else 256 if target >= 4e6 else 128
        fixed = 2 * vocab_size * d + seq_len * d + 2 * d
        n_layer = max(1, round((target - fixed) / (12 * d * d + 13 * d)))
        return cls(vocab_size=vocab_size, seq_len=seq_len, d_model=d, n_layer=n_layer, n_head=d // 64 or 1)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def synthetic_batch(cfg: GPTConfig, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random tokens for ``step``: ``(batch_size, seq_len + 1)`` (inputs and shifted targets)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """Forward, backward, ``optimizer.step()`` (pre-step hooks run here), ``zero_grad``; returns the loss (reading
    it waits for the device, as a loop that logs its loss does)."""
    tokens = tokens.to(model.lm_head.weight.device, non_blocking=True)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
