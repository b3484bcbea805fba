"""An independent producer of Megatron-Core rank checkpoints (Megatron-LM's legacy non-distributed format).

It builds a Hugging Face ``LlamaForCausalLM`` from a ``LlamaConfig`` (nothing is downloaded), trains it a step
with ``torch.optim.AdamW`` so that optimizer state exists, and cuts weights and moments into the rank-local
tensors of a Megatron-Core GPT model (Llama flavour: RMSNorm, SwiGLU, GQA, no biases, untied output layer) at a
given tensor/pipeline parallel layout, as ``model_optim_rng.pt`` would hold them. ``naming="te"`` gives the
Transformer Engine names (norms fused into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, and
``_extra_state`` entries); ``naming="local"`` the plain mcore names.

It deliberately imports nothing from the project: the slicing is written from docs/megatron-layout.md with plain
torch, so that tests importing these files and exporting them back check the project against a second reading
of the layout, not against itself.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1
MOMENTS = ("exp_avg", "exp_avg_sq")


def make_llama(vocab=997, hidden=56, heads=8, kv_heads=4, head_dim=7, ffn=96, layers=4, seed=0, train_steps=1):
    """``(model, optimizer)``: a seeded ``LlamaForCausalLM`` and an ``AdamW`` run ``train_steps`` steps.

    The optimizer has Megatron's two groups (``ndim >= 2`` with weight decay 0.1, the rest with none). With
    ``train_steps=0`` the optimizer is ``None`` (no optimizer state).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers refuses an odd fully-rotated head_dim (RoPE needs pairs). The weights do not depend on RoPE,
    # so an odd head_dim is set after validation and the model runs without position rotation (see _NoRope).
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim + head_dim % 2, intermediate_size=ffn,
                         num_hidden_layers=layers, max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5)
    config.head_dim = head_dim
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    if head_dim % 2:
        model.model.rotary_emb = _NoRope(head_dim)
    if train_steps == 0:
        return model, None
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(train_steps):
        tokens = torch.randint(0, vocab, (2, 12), generator=gen)
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    return model, optimizer


class _NoRope(torch.nn.Module):
    """Stands in for ``LlamaRotaryEmbedding`` with an odd head_dim: cos 1, sin 0 (no rotation). No parameters."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, self.head_dim)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)


def _dims(model) -> dict[str, int]:
    c = model.config
    return {"vocab": c.vocab_size, "hidden": c.hidden_size, "heads": c.num_attention_heads,
            "kv": c.num_key_value_heads, "head_dim": c.head_dim, "ffn": c.intermediate_size,
            "layers": c.num_hidden_layers}


def padded_vocab(vocab: int, tp: int, vocab_divisible_by: int = 128) -> int:
    unit = vocab_divisible_by * tp
    return math.ceil(vocab / unit) * unit


def _hf_tensors(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """``{"weight": {hf name: tensor}, "exp_avg": {...}, "exp_avg_sq": {...}, "step": {...}}`` (detached)."""
    out: dict[str, dict[str, torch.Tensor]] = {"weight": {}}
    state = optimizer.state if optimizer is not None else {}
    with_state = any(state.get(p) for p in model.parameters())
    if with_state:
        out.update({k: {} for k in (*MOMENTS, "step")})
    for name, p in model.named_parameters():
        out["weight"][name] = p.detach()
        if with_state:
            for k in (*MOMENTS, "step"):
                out[k][name] = state[p][k].detach()
    return out


# ---- cutting HF tensors into local tensors (weights and moments alike) ----
# An entry is ``(local name, hf names, cut)``: ``cut(tensors of the hf names)`` gives the local tensor. TE extra
# state entries have no hf names and ``cut=None``.

def _vocab_shard(t: torch.Tensor, v_pad: int, tp: int, rank: int) -> torch.Tensor:
    full = torch.zeros((v_pad, *t.shape[1:]), dtype=t.dtype)
    full[: t.shape[0]] = t
    rows = v_pad // tp
    return full[rank * rows:(rank + 1) * rows]


def _qkv_shard(q, k, v, d: dict[str, int], tp: int, rank: int) -> torch.Tensor:
    hd, kv = d["head_dim"], d["kv"]
    group = d["heads"] // kv
    per = kv // tp
    parts = []
    for g in range(rank * per, (rank + 1) * per):
        parts.append(q[g * group * hd:(g + 1) * group * hd])
        parts.append(k[g * hd:(g + 1) * hd])
        parts.append(v[g * hd:(g + 1) * hd])
    return torch.cat(parts, dim=0)


def _whole(ts):
    return ts[0]


def _layer_entries(L: int, i: int, d, tp: int, rank: int, naming: str):
    """The entries of local layer ``i`` (global ``L``) in Megatron module order."""
    h = f"model.layers.{L}."
    a, m = f"decoder.layers.{i}.self_attention.", f"decoder.layers.{i}.mlp."
    q_cols = d["heads"] // tp * d["head_dim"]
    f = d["ffn"] // tp
    te = naming == "te"
    extra = (lambda name: [(name, (), None)]) if te else (lambda name: [])
    return [
        (a + "linear_qkv.layer_norm_weight" if te else f"decoder.layers.{i}.input_layernorm.weight",
         (h + "input_layernorm.weight",), _whole),
        *extra(a + "core_attention._extra_state"),
        (a + "linear_qkv.weight",
         tuple(h + f"self_attn.{x}_proj.weight" for x in "qkv"), lambda ts: _qkv_shard(*ts, d, tp, rank)),
        *extra(a + "linear_qkv._extra_state"),
        (a + "linear_proj.weight", (h + "self_attn.o_proj.weight",),
         lambda ts: ts[0][:, rank * q_cols:(rank + 1) * q_cols]),
        *extra(a + "linear_proj._extra_state"),
        (m + "linear_fc1.layer_norm_weight" if te else f"decoder.layers.{i}.pre_mlp_layernorm.weight",
         (h + "post_attention_layernorm.weight",), _whole),
        (m + "linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
         lambda ts: torch.cat([x[rank * f:(rank + 1) * f] for x in ts], dim=0)),
        *extra(m + "linear_fc1._extra_state"),
        (m + "linear_fc2.weight", (h + "mlp.down_proj.weight",), lambda ts: ts[0][:, rank * f:(rank + 1) * f]),
        *extra(m + "linear_fc2._extra_state"),
    ]


def _rank_entries(d, tp: int, pp: int, t: int, p: int, naming: str, v_pad: int):
    """All entries of rank ``(t, p)`` in Megatron module order."""
    per_stage = d["layers"] // pp
    entries = []
    if p == 0:
        entries.append(("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                        lambda ts: _vocab_shard(ts[0], v_pad, tp, t)))
    for i in range(per_stage):
        entries += _layer_entries(p * per_stage + i, i, d, tp, t, naming)
    if p == pp - 1:
        entries.append(("decoder.final_layernorm.weight", ("model.norm.weight",), _whole))
        entries.append(("output_layer.weight", ("lm_head.weight",), lambda ts: _vocab_shard(ts[0], v_pad, tp, t)))
    return entries


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous().clone()


def _check_layout(d: dict[str, int], tp: int, pp: int, naming: str) -> None:
    assert naming in ("te", "local"), naming
    assert d["layers"] % pp == 0, f"layers={d['layers']} not divisible by pp={pp}"
    for key in ("heads", "kv", "ffn"):
        assert d[key] % tp == 0, f"{key}={d[key]} not divisible by tp={tp}"
    assert d["heads"] % d["kv"] == 0


def megatron_args(model, tp: int, pp: int, vocab_divisible_by: int = 128) -> argparse.Namespace:
    d = _dims(model)
    return argparse.Namespace(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_query_groups=d["kv"],
        group_query_attention=True, kv_channels=d["head_dim"], ffn_hidden_size=d["ffn"], num_layers=d["layers"],
        make_vocab_size_divisible_by=vocab_divisible_by, padded_vocab_size=padded_vocab(d["vocab"], tp,
                                                                                          vocab_divisible_by),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=1,
        expert_model_parallel_size=1, untie_embeddings_and_output_weights=True, normalization="RMSNorm",
        swiglu=True, use_distributed_optimizer=False, vocab_size=d["vocab"])


def _param_groups() -> list[dict[str, Any]]:
    return [{"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": wd} for wd in (WEIGHT_DECAY, 0.0)]


def rank_states(model, optimizer, tp, pp, *, naming="te", vocab_divisible_by=128, with_optim=True, iteration=10):
    """``{(tp_rank, pp_rank): payload}``, each payload as Megatron would ``torch.save`` it in model_optim_rng.pt.

    Payload keys: ``args`` (an ``argparse.Namespace``; ``write_megatron(args=None)`` drops it),
    ``checkpoint_version``, ``iteration``, ``model`` and, when ``with_optim`` and the optimizer has state,
    ``optimizer`` (state keyed by local parameter name, moments cut exactly like the parameter).
    """
    d = _dims(model)
    _check_layout(d, tp, pp, naming)
    v_pad = padded_vocab(d["vocab"], tp, vocab_divisible_by)
    hf = _hf_tensors(model, optimizer)
    optim = with_optim and "exp_avg" in hf
    states = {}
    for p in range(pp):
        for t in range(tp):
            entries = _rank_entries(d, tp, pp, t, p, naming, v_pad)
            model_sd = {name: (torch.empty(0, dtype=torch.uint8) if cut is None
                               else _local(cut([hf["weight"][n] for n in srcs])))
                        for name, srcs, cut in entries}
            payload: dict[str, Any] = {"args": megatron_args(model, tp, pp, vocab_divisible_by),
                                       "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd}
            if optim:
                payload["optimizer"] = {"state": _rank_optim_state(hf, entries), "param_groups": _param_groups()}
            states[(t, p)] = payload
    return states


def _rank_optim_state(hf, entries) -> dict[str, dict[str, torch.Tensor]]:
    """Per local parameter: the moments cut like the parameter, and the HF ``step`` of its (first) source."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, srcs, cut in entries:
        if cut is None:
            continue
        state[name] = {k: _local(cut([hf[k][n] for n in srcs])) for k in MOMENTS}
        state[name]["step"] = hf["step"][srcs[0]].clone()
    return state


def rank_dir_name(t: int, p: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"


def write_megatron(root, states, *, tp, pp, iteration=10, args="namespace"):
    """Writes ``root/latest_checkpointed_iteration.txt`` and one ``model_optim_rng.pt`` per rank; returns the paths.

    ``args="namespace"`` keeps each payload's ``argparse.Namespace``; ``args=None`` writes no ``args`` key; an
    ``argparse.Namespace`` given here replaces the payloads' own. Payloads are otherwise written as given.
    """
    assert set(states) == {(t, p) for t in range(tp) for p in range(pp)}, sorted(states)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    paths = {}
    for (t, p), payload in sorted(states.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out = dict(payload)
        if args is None:
            out.pop("args", None)
        elif isinstance(args, argparse.Namespace):
            out["args"] = args
        else:
            assert args == "namespace", args
        rank_dir = os.path.join(root, f"iter_{iteration:07d}", rank_dir_name(t, p, pp))
        os.makedirs(rank_dir, exist_ok=True)
        path = os.path.join(rank_dir, "model_optim_rng.pt")
        torch.save(out, path)
        paths[(t, p)] = path
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w", encoding="utf-8") as fh:
        fh.write(str(iteration))
    return paths


def _logical_sources(layers: int) -> dict[str, str]:
    """Logical name -> HF name (logical names use the local naming: input_layernorm, pre_mlp_layernorm)."""
    names = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "output_layer.weight": "lm_head.weight",
             "decoder.final_layernorm.weight": "model.norm.weight"}
    for L in range(layers):
        h, g = f"model.layers.{L}.", f"decoder.layers.{L}."
        names.update({
            g + "input_layernorm.weight": h + "input_layernorm.weight",
            g + "self_attention.linear_q.weight": h + "self_attn.q_proj.weight",
            g + "self_attention.linear_k.weight": h + "self_attn.k_proj.weight",
            g + "self_attention.linear_v.weight": h + "self_attn.v_proj.weight",
            g + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight",
            g + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight",
            g + "mlp.linear_fc1_gate.weight": h + "mlp.gate_proj.weight",
            g + "mlp.linear_fc1_up.weight": h + "mlp.up_proj.weight",
            g + "mlp.linear_fc2.weight": h + "mlp.down_proj.weight",
        })
    return names


def expected_logical(model, optimizer):
    """``{"model/<logical>": tensor, "optim/state/<logical>/{exp_avg,exp_avg_sq,step}": tensor}`` from HF."""
    hf = _hf_tensors(model, optimizer)
    out: dict[str, torch.Tensor] = {}
    for logical, src in _logical_sources(model.config.num_hidden_layers).items():
        out[f"model/{logical}"] = hf["weight"][src].clone()
        if "exp_avg" in hf:
            for k in (*MOMENTS, "step"):
                out[f"optim/state/{logical}/{k}"] = hf[k][src].clone()
    return out
