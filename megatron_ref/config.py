"""Configuration of the reference model: model dimensions, parallel layout, optimizer hyperparameters, presets.

Who uses it: every other module of ``megatron_ref`` and the tests/benchmarks that build models. Everything here is
plain data validated at construction (``__post_init__``), so a bad layout fails before any process group exists.
The field names follow ``docs/megatron-layout.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

FAMILIES = ("gpt", "llama", "mixtral")
#: Axes that make up the rank grid; ``ep`` is not one of them (it is carved out of ``dp``).
GRID_AXES = ("tp", "dp", "pp")


class MegatronRefError(Exception):
    """Base class of the errors this package raises for something a caller can get wrong."""


class ConfigError(MegatronRefError, ValueError):
    """A configuration (or a pair of them) that the reference model cannot run."""


class LayoutMismatchError(MegatronRefError, ValueError):
    """Rank-local state that does not match the layout it claims (shapes, keys, replicas, padding)."""


@dataclass(frozen=True)
class ModelConfig:
    """Logical model dimensions (no parallelism). ``vocab`` is the real vocabulary; padding depends on ``tp``."""

    family: str = "gpt"
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    ffn: int = 64
    vocab: int = 50
    vocab_divisible_by: int = 8
    layers: int = 4
    experts: int = 0
    top_k: int = 0
    tied: bool = True
    seq: int = 8
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} is not one of {FAMILIES}")
        for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "vocab_divisible_by", "layers", "seq"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.kv_heads >= 1 and self.heads % self.kv_heads:
            problems.append(f"kv_heads={self.kv_heads} must divide heads={self.heads} (GQA groups)")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (rotary embedding rotates pairs)")
        if self.family == "mixtral":
            if self.experts < 1 or not 1 <= self.top_k <= self.experts:
                problems.append(f"mixtral needs experts >= 1 and 1 <= top_k <= experts, got experts={self.experts}, "
                                f"top_k={self.top_k}")
        elif self.experts or self.top_k:
            problems.append(f"experts/top_k are for family 'mixtral' only, got {self.experts}/{self.top_k}")
        if problems:
            raise ConfigError(f"invalid {self!r}: " + "; ".join(problems))

    @property
    def moe(self) -> bool:
        return self.family == "mixtral"

    @property
    def gated(self) -> bool:
        """SwiGLU MLP with a fused gate/up ``linear_fc1`` (llama, mixtral)."""
        return self.family in ("llama", "mixtral")

    @property
    def biases(self) -> bool:
        """Linears and norms carry biases (gpt only)."""
        return self.family == "gpt"

    def padded_vocab(self, tp: int) -> int:
        """``V_pad`` of the doc: rows of the embedding summed over the ``tp`` ranks."""
        unit = self.vocab_divisible_by * tp
        return math.ceil(self.vocab / unit) * unit


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. ``order`` lists the grid axes fastest-varying first, joined by ``-``.

    Accepted orders: any permutation of ``tp``, ``dp``, ``pp``; an ``ep`` token may appear, but only directly
    before ``dp`` (``"tp-ep-dp-pp"`` is the default). ``ep`` never changes the grid: expert parallelism is carved
    out of data parallelism with ``ep_rank = dp_rank % ep`` (the fast part of ``dp``), whatever the order says.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0
    order: str = "tp-ep-dp-pp"

    def __post_init__(self) -> None:
        problems = []
        for name in ("tp", "pp", "dp", "ep"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.ep >= 1 and self.dp % self.ep:
            problems.append(f"ep={self.ep} must divide dp={self.dp} (expert parallelism is carved out of dp)")
        if self.zero not in (0, 1, 2, 3):
            problems.append(f"zero={self.zero} must be 0, 1, 2 or 3")
        try:
            self.axes()
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError(f"invalid {self!r}: " + "; ".join(problems))

    def axes(self) -> tuple[str, ...]:
        """The grid axes of ``order`` fastest first, ``ep`` dropped (it is part of ``dp``)."""
        tokens = self.order.split("-")
        if "ep" in tokens:
            i = tokens.index("ep")
            if tokens.count("ep") != 1 or i + 1 >= len(tokens) or tokens[i + 1] != "dp":
                raise ConfigError(f"order={self.order!r}: 'ep' may appear once, directly before 'dp'")
            tokens = tokens[:i] + tokens[i + 1:]
        if sorted(tokens) != sorted(GRID_AXES):
            raise ConfigError(f"order={self.order!r} must be a '-'-joined permutation of tp, dp, pp "
                              "(plus 'ep' directly before dp)")
        return tuple(tokens)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size."""
        return self.dp // self.ep


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyperparameters; group 0 (``ndim >= 2``) decays with ``weight_decay``, group 1 does not."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def param_groups(self) -> list[dict[str, Any]]:
        """The two groups' hyperparameters as plain values (what ``rank_state`` stores)."""
        base = {"lr": float(self.lr), "betas": [float(b) for b in self.betas], "eps": float(self.eps)}
        return [dict(base, weight_decay=float(self.weight_decay)), dict(base, weight_decay=0.0)]


def check_compatible(mc: ModelConfig, pc: ParallelConfig) -> None:
    """Raise ``ConfigError`` when ``pc`` cannot lay out ``mc`` (every shard must hold at least one unit)."""
    problems = []
    if pc.tp > mc.heads:
        problems.append(f"tp={pc.tp} > heads={mc.heads}: a TP rank would hold no query head")
    if pc.tp > mc.ffn:
        problems.append(f"tp={pc.tp} > ffn={mc.ffn}")
    if pc.pp > mc.layers:
        problems.append(f"pp={pc.pp} > layers={mc.layers}: a stage would hold no layer")
    if mc.moe and pc.ep > mc.experts:
        problems.append(f"ep={pc.ep} > experts={mc.experts}: an EP rank would hold no expert")
    if not mc.moe and pc.ep != 1:
        problems.append(f"ep={pc.ep} needs a MoE family (mixtral), got {mc.family!r}")
    if problems:
        raise ConfigError(f"{mc!r} with {pc!r}: " + "; ".join(problems))


def config_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain values (tuples become lists), for file metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(obj).items()}


# ---------------------------------------------------------------- presets


def gpt_tiny(**overrides: Any) -> ModelConfig:
    """GPT: LayerNorm, GeLU, biases, tied embedding; vocab 50 pads to 56 (tp=1) or 64 (tp=2)."""
    return ModelConfig(**{**dict(family="gpt", hidden=32, heads=4, kv_heads=4, head_dim=8, ffn=64, vocab=50,
                                 layers=4, tied=True, seq=8), **overrides})


def llama_tiny(**overrides: Any) -> ModelConfig:
    """Llama: RMSNorm, SwiGLU, GQA (4 query heads, 2 KV heads), untied output layer, vocab 37."""
    return ModelConfig(**{**dict(family="llama", hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=48, vocab=37,
                                 layers=4, tied=False, seq=8), **overrides})


def mixtral_tiny(**overrides: Any) -> ModelConfig:
    """Mixtral: llama plus a 4-expert top-2 MoE MLP in every layer."""
    return ModelConfig(**{**dict(family="mixtral", hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=32, vocab=37,
                                 layers=4, experts=4, top_k=2, tied=False, seq=8), **overrides})


#: Benchmark shapes (hidden, layers, heads) by approximate parameter count in millions, GPT-3 paper style.
_SIZES = {125: (768, 12, 12), 350: (1024, 24, 16), 760: (1536, 24, 16), 1300: (2048, 24, 16)}


def sized(family: str = "gpt", millions: int = 125, *, vocab: int = 50257, seq: int = 1024,
          **overrides: Any) -> ModelConfig:
    """A benchmark-sized config of about ``millions`` parameters (125, 350, 760 or 1300; GPT-3 paper shapes).

    gpt: 4x MLP, tied. llama: 8/3x SwiGLU, GQA with heads/4 KV heads, untied output layer (so ~20% more at 125M).
    mixtral: llama with 8 experts of ffn hidden/3, top-2 (the experts together about as large as gpt's MLP).
    ``vocab_divisible_by`` is 128 as in Megatron's default."""
    if millions not in _SIZES:
        raise ConfigError(f"sized(millions={millions}): choose one of {sorted(_SIZES)}")
    hidden, layers, heads = _SIZES[millions]
    base: dict[str, Any] = dict(family=family, hidden=hidden, heads=heads, head_dim=hidden // heads, vocab=vocab,
                                layers=layers, seq=seq, vocab_divisible_by=128)
    if family == "gpt":
        base.update(kv_heads=heads, ffn=4 * hidden, tied=True)
    elif family == "llama":
        base.update(kv_heads=max(1, heads // 4), ffn=(8 * hidden // 3 + 63) // 64 * 64, tied=False)
    else:
        base.update(kv_heads=max(1, heads // 4), ffn=(hidden // 3 + 63) // 64 * 64, experts=8, top_k=2, tied=False)
    return ModelConfig(**{**base, **overrides})


PRESETS = {"gpt_tiny": gpt_tiny, "llama_tiny": llama_tiny, "mixtral_tiny": mixtral_tiny}
__all__ = ["ModelConfig", "ParallelConfig", "OptimConfig", "check_compatible", "config_dict", "gpt_tiny",
           "llama_tiny", "mixtral_tiny", "sized", "PRESETS", "MegatronRefError", "ConfigError",
           "LayoutMismatchError"]
