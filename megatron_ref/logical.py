"""Logical tensors: their names and shapes in a fixed order, and their deterministic initial values.

Who uses it: ``build_model`` (every rank slices its local parameters out of these), the oracles and the tests.
A logical tensor is the tensor as if no parallelism existed: real vocabulary, global layer and expert indices,
fused parameters split into named sub-tensors (``linear_q/k/v``, ``linear_fc1_gate/up``).

Each logical tensor is drawn from its own CPU generator seeded with ``(seed, its index in the fixed order)``. The
values are therefore the same for every parallel layout, and a rank can draw only the tensors it needs (a 1B
model is never materialized whole on every rank).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from megatron_ref.config import ModelConfig

#: Standard deviation of the normal init of matrices (Megatron's ``init_method_std``).
INIT_STD = 0.02
#: Spread of norm weights around 1 and of biases around 0: non-constant so that layout mistakes show in tests.
SMALL_STD = 0.02

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


def layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def logical_specs(mc: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every logical parameter name and shape, in the fixed generation order."""
    h, hd, specs = mc.hidden, mc.head_dim, []
    q_rows, kv_rows = mc.heads * hd, mc.kv_heads * hd

    def norm(name: str) -> None:
        specs.append((f"{name}.weight", (h,)))
        if mc.biases:
            specs.append((f"{name}.bias", (h,)))

    specs.append((EMBEDDING, (mc.vocab, h)))
    for L in range(mc.layers):
        p = layer_prefix(L)
        norm(p + "input_layernorm")
        a = p + "self_attention."
        specs += [(a + "linear_q.weight", (q_rows, h)), (a + "linear_k.weight", (kv_rows, h)),
                  (a + "linear_v.weight", (kv_rows, h))]
        if mc.biases:
            specs += [(a + "linear_q.bias", (q_rows,)), (a + "linear_k.bias", (kv_rows,)),
                      (a + "linear_v.bias", (kv_rows,))]
        specs.append((a + "linear_proj.weight", (h, q_rows)))
        if mc.biases:
            specs.append((a + "linear_proj.bias", (h,)))
        norm(p + "pre_mlp_layernorm")
        m = p + "mlp."
        if mc.family == "gpt":
            specs += [(m + "linear_fc1.weight", (mc.ffn, h)), (m + "linear_fc1.bias", (mc.ffn,)),
                      (m + "linear_fc2.weight", (h, mc.ffn)), (m + "linear_fc2.bias", (h,))]
        elif mc.family == "llama":
            specs += [(m + "linear_fc1_gate.weight", (mc.ffn, h)), (m + "linear_fc1_up.weight", (mc.ffn, h)),
                      (m + "linear_fc2.weight", (h, mc.ffn))]
        else:
            specs.append((m + "router.weight", (mc.experts, h)))
            for E in range(mc.experts):
                e = f"{m}experts.{E}."
                specs += [(e + "linear_fc1_gate.weight", (mc.ffn, h)), (e + "linear_fc1_up.weight", (mc.ffn, h)),
                          (e + "linear_fc2.weight", (h, mc.ffn))]
    norm("decoder.final_layernorm")
    if not mc.tied:
        specs.append((OUTPUT, (mc.vocab, h)))
    return specs


def logical_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    return dict(logical_specs(mc))


def _seed_of(mc: ModelConfig, index: int) -> int:
    return (mc.seed * 1_000_003 + index) % (2**63)


def _draw(mc: ModelConfig, index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed_of(mc, index))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("layernorm.weight"):
        return 1.0 + SMALL_STD * noise
    if name.endswith(".bias"):
        return SMALL_STD * noise
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        # Output projections scaled by depth as in Megatron's scaled_init_method_normal.
        return (INIT_STD / math.sqrt(2.0 * mc.layers)) * noise
    return INIT_STD * noise


def logical_getter(mc: ModelConfig) -> Callable[[str], torch.Tensor]:
    """A function returning one logical tensor by name, drawn on demand (same values as ``logical_init``)."""
    index = {name: (i, shape) for i, (name, shape) in enumerate(logical_specs(mc))}

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise KeyError(f"{name!r} is not a logical tensor of {mc!r}")
        i, shape = index[name]
        return _draw(mc, i, name, shape)

    return get


def logical_init(mc: ModelConfig, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The initial logical weights, keyed by logical name (all of them, or only ``names``)."""
    get = logical_getter(mc)
    wanted = [n for n, _ in logical_specs(mc)] if names is None else list(names)
    return {n: get(n) for n in wanted}


def num_params(mc: ModelConfig) -> int:
    """Logical parameter count (tied embedding counted once, no padding)."""
    return sum(math.prod(shape) for _, shape in logical_specs(mc))
