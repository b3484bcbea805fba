"""The layout oracles: logical state <-> rank-local state, written directly from docs/megatron-layout.md.

Who uses it: tests, in one process, to check the model (its initial rank states), the project's spec-driven
resharding engine (its outputs) and checkpoints (their contents). It imports nothing from the model: every slice
is derived here from the doc's tables, as *pieces* (a logical tensor, a dimension, a logical range and where it
lands locally). Local regions no piece covers are vocabulary padding, which must be zero.

Logical state: a flat dict with ``model/<logical name>``, ``optim/state/<logical name>/{exp_avg,exp_avg_sq,step}``,
``optim/param_groups`` and ``iteration``. ``to_local`` also accepts bare weights keyed by logical name (what
``logical_init`` returns) and completes them with a fresh optimizer (zero moments, step 0, iteration 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from megatron_ref.config import LayoutMismatchError, ModelConfig, OptimConfig, ParallelConfig, check_compatible
from megatron_ref.logical import logical_specs
from megatron_ref.parallel import coords, rank_of, split_range

MOMENTS = ("exp_avg", "exp_avg_sq")
ALIGN = 8


@dataclass(frozen=True)
class Piece:
    """``logical.narrow(dim, start, count)`` sits at ``local.narrow(dim, local_start, count)``."""

    logical: str
    dim: int
    start: int
    count: int
    local_start: int


@dataclass(frozen=True)
class LocalParam:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    bucket: str  # "dense" or "expert"
    group: int  # 0: ndim >= 2, 1: the rest


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``/``-joined keys of nested dicts; a flat state comes back unchanged."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _whole(name: str, logical: str, shape: tuple[int, ...], bucket: str = "dense") -> LocalParam:
    return LocalParam(name, shape, (Piece(logical, 0, 0, shape[0], 0),), bucket, 0 if len(shape) >= 2 else 1)


def local_layout(mc: ModelConfig, pc: ParallelConfig, rank: int) -> list[LocalParam]:
    """Every local parameter of ``rank`` in ``named_parameters()`` order, with the pieces it holds."""
    check_compatible(mc, pc)
    c = coords(rank, pc)
    h, hd, out = mc.hidden, mc.head_dim, []
    v_pad = math.ceil(mc.vocab / (mc.vocab_divisible_by * pc.tp)) * mc.vocab_divisible_by * pc.tp
    rows = v_pad // pc.tp
    real = max(0, min(rows, mc.vocab - c.tp * rows))
    vocab_pieces = lambda lg: (Piece(lg, 0, c.tp * rows, real, 0),) if real else ()  # noqa: E731
    first, last = c.pp == 0, c.pp == pc.pp - 1
    if first:
        out.append(LocalParam("embedding.word_embeddings.weight", (rows, h),
                              vocab_pieces("embedding.word_embeddings.weight"), "dense", 0))

    def norm(local: str, logical: str) -> None:
        out.append(_whole(local + ".weight", logical + ".weight", (h,)))
        if mc.family == "gpt":
            out.append(_whole(local + ".bias", logical + ".bias", (h,)))

    layer_start, layer_count = split_range(mc.layers, pc.pp, c.pp)
    h_t, q_t = split_range(mc.heads, pc.tp, c.tp)
    G = mc.heads // mc.kv_heads
    g_first, g_last = h_t // G, (h_t + q_t - 1) // G
    f_t0, f_t = split_range(mc.ffn, pc.tp, c.tp)
    for i in range(layer_count):
        loc, lg = f"decoder.layers.{i}.", f"decoder.layers.{layer_start + i}."
        norm(loc + "input_layernorm", lg + "input_layernorm")
        for kind in ("weight", "bias") if mc.family == "gpt" else ("weight",):
            pieces, off = [], 0
            for g in range(g_first, g_last + 1):
                a, b = max(h_t, g * G), min(h_t + q_t, (g + 1) * G)
                pieces.append(Piece(f"{lg}self_attention.linear_q.{kind}", 0, a * hd, (b - a) * hd, off))
                off += (b - a) * hd
                for kv in "kv":
                    pieces.append(Piece(f"{lg}self_attention.linear_{kv}.{kind}", 0, g * hd, hd, off))
                    off += hd
            shape = (off, h) if kind == "weight" else (off,)
            out.append(LocalParam(f"{loc}self_attention.linear_qkv.{kind}", shape, tuple(pieces), "dense",
                                  0 if kind == "weight" else 1))
        out.append(LocalParam(f"{loc}self_attention.linear_proj.weight", (h, q_t * hd),
                              (Piece(f"{lg}self_attention.linear_proj.weight", 1, h_t * hd, q_t * hd, 0),), "dense", 0))
        if mc.family == "gpt":
            out.append(_whole(f"{loc}self_attention.linear_proj.bias", f"{lg}self_attention.linear_proj.bias", (h,)))
        norm(loc + "pre_mlp_layernorm", lg + "pre_mlp_layernorm")
        m, mg = loc + "mlp.", lg + "mlp."
        if mc.family == "gpt":
            for name, shape, dim in (("linear_fc1.weight", (f_t, h), 0), ("linear_fc1.bias", (f_t,), 0),
                                     ("linear_fc2.weight", (h, f_t), 1)):
                out.append(LocalParam(m + name, shape, (Piece(mg + name, dim, f_t0, f_t, 0),), "dense",
                                      0 if len(shape) >= 2 else 1))
            out.append(_whole(m + "linear_fc2.bias", mg + "linear_fc2.bias", (h,)))
        elif mc.family == "llama":
            out += _swiglu(m, mg, f_t0, f_t, h, "dense")
        else:
            out.append(_whole(m + "router.weight", mg + "router.weight", (mc.experts, h)))
            e_start, e_count = split_range(mc.experts, pc.ep, c.ep)
            for j in range(e_count):
                out += _swiglu(f"{m}experts.local_experts.{j}.", f"{mg}experts.{e_start + j}.", f_t0, f_t, h, "expert")
    if last:
        norm("decoder.final_layernorm", "decoder.final_layernorm")
        if not (mc.tied and pc.pp == 1):
            lg = "embedding.word_embeddings.weight" if mc.tied else "output_layer.weight"
            out.append(LocalParam("output_layer.weight", (rows, h), vocab_pieces(lg), "dense", 0))
    return out


def _swiglu(local: str, logical: str, f0: int, f_t: int, h: int, bucket: str) -> list[LocalParam]:
    fc1 = (Piece(logical + "linear_fc1_gate.weight", 0, f0, f_t, 0),
           Piece(logical + "linear_fc1_up.weight", 0, f0, f_t, f_t))
    fc2 = (Piece(logical + "linear_fc2.weight", 1, f0, f_t, 0),)
    return [LocalParam(local + "linear_fc1.weight", (2 * f_t, h), fc1, bucket, 0),
            LocalParam(local + "linear_fc2.weight", (h, f_t), fc2, bucket, 0)]


def _bucket_ranks(pc: ParallelConfig, rank: int, bucket: str) -> list[int]:
    """The data-parallel group a bucket is partitioned over, in partition order."""
    c = coords(rank, pc)
    if bucket == "dense":
        return [rank_of(pc, c.tp, c.pp, d) for d in range(pc.dp)]
    return [rank_of(pc, c.tp, c.pp, x * pc.ep + c.ep) for x in range(pc.dp // pc.ep)]


def _partition_size(params: list[LocalParam], n: int) -> tuple[int, int]:
    total = sum(math.prod(p.shape) for p in params)
    padded = math.ceil(total / (ALIGN * n)) * ALIGN * n
    return total, padded // n


def _buckets(layout: list[LocalParam]) -> dict[str, list[LocalParam]]:
    out = {}
    for bucket in ("dense", "expert"):
        for group in (0, 1):
            params = [p for p in layout if p.bucket == bucket and p.group == group]
            if params:
                out[f"{bucket}.{group}"] = params
    return out


def _complete(logical: Mapping[str, Any], mc: ModelConfig, oc: OptimConfig) -> dict[str, Any]:
    """A full logical state: bare weights get ``model/`` keys; missing optimizer entries start fresh."""
    if any(k.startswith("model/") for k in logical):
        full = dict(logical)
    else:
        full = {f"model/{k}": v for k, v in logical.items()}
    for name, shape in logical_specs(mc):
        if f"model/{name}" not in full:
            raise LayoutMismatchError(f"logical state lacks model/{name} {shape}")
        for m in MOMENTS:
            full.setdefault(f"optim/state/{name}/{m}", torch.zeros(shape))
        full.setdefault(f"optim/state/{name}/step", torch.tensor(0.0))
    full.setdefault("optim/param_groups", oc.param_groups())
    full.setdefault("iteration", 0)
    return full


def _assemble(lp: LocalParam, source: Mapping[str, Any], key: str) -> torch.Tensor:
    """The local tensor of ``lp`` built from logical tensors ``source[key.format(logical)]``; padding zero."""
    t = torch.zeros(lp.shape, dtype=torch.float32)
    for p in lp.pieces:
        src = source[key.format(p.logical)]
        t.narrow(p.dim, p.local_start, p.count).copy_(src.narrow(p.dim, p.start, p.count))
    return t


def _one_step(steps: list[torch.Tensor], what: str) -> torch.Tensor:
    for s in steps[1:]:
        if not torch.equal(s, steps[0]):
            raise LayoutMismatchError(f"{what}: step counters differ ({[float(x) for x in steps]}), "
                                      "but these tensors share one step")
    return steps[0].clone()


def to_local(logical: Mapping[str, Any], mc: ModelConfig, pc: ParallelConfig, rank: int,
             oc: OptimConfig | None = None) -> dict[str, Any]:
    """``rank``'s nested rank-local state (the structure of ``rank_state``) from a logical state."""
    full = _complete(logical, mc, oc or OptimConfig())
    layout = local_layout(mc, pc, rank)
    any_step = full[f"optim/state/{logical_specs(mc)[0][0]}/step"]
    values = {lp.name: {"model": _assemble(lp, full, "model/{}"),
                        **{m: _assemble(lp, full, "optim/state/{}/" + m) for m in MOMENTS}} for lp in layout}
    steps = {lp.name: _one_step([full[f"optim/state/{p.logical}/step"] for p in lp.pieces] or [any_step], lp.name)
             for lp in layout}
    state: dict[str, Any] = {}
    if pc.zero < 3:
        state["model"] = {lp.name: values[lp.name]["model"] for lp in layout}
    if pc.zero == 0:
        optim: dict[str, Any] = {"state": {lp.name: {"exp_avg": values[lp.name]["exp_avg"],
                                                     "exp_avg_sq": values[lp.name]["exp_avg_sq"],
                                                     "step": steps[lp.name]} for lp in layout}}
    else:
        c = coords(rank, pc)
        optim = {"flat": {}}
        for key, params in _buckets(layout).items():
            dense = key.startswith("dense")
            n, r = (pc.dp, c.dp) if dense else (pc.dp // pc.ep, c.edp)
            total, size = _partition_size(params, n)
            entry = {}
            for field, what in (("fp32_param", "model"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                flat = torch.cat([values[p.name][what].reshape(-1) for p in params] + [torch.zeros(size * n - total)])
                entry[field] = flat[r * size:(r + 1) * size].clone()
            entry["step"] = _one_step([steps[p.name] for p in params], f"optim/flat/{key}")
            optim["flat"][key] = entry
    optim["param_groups"] = [dict(g, betas=list(g["betas"])) for g in full["optim/param_groups"]]
    state["optim"] = optim
    state["iteration"] = int(full["iteration"])
    return state


class _Assembler:
    """Logical tensors filled piece by piece; a region filled twice (a replica) must hold equal values."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.filled: dict[str, torch.Tensor] = {}
        self.problems: list[str] = []

    def place(self, key: str, shape: tuple[int, ...], p: Piece, local: torch.Tensor, where: str) -> None:
        if key not in self.values:
            self.values[key] = torch.zeros(shape, dtype=local.dtype)
            self.filled[key] = torch.zeros(shape, dtype=torch.bool)
        dst = self.values[key].narrow(p.dim, p.start, p.count)
        done = self.filled[key].narrow(p.dim, p.start, p.count)
        src = local.narrow(p.dim, p.local_start, p.count)
        if done.any() and not torch.equal(dst[done], src[done]):
            self.problems.append(f"{key}: replica from {where} differs from the copy already placed")
        dst.copy_(src)
        done.fill_(True)

    def place_scalar(self, key: str, value: torch.Tensor, where: str) -> None:
        if key in self.values and not torch.equal(self.values[key], value):
            self.problems.append(f"{key}: {where} holds {value.item()}, another replica {self.values[key].item()}")
        self.values[key] = value.clone()


def _local_values(flat: Mapping[str, Any], states: Mapping[int, Mapping[str, Any]], mc: ModelConfig,
                  pc: ParallelConfig, rank: int, problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{local name: {"model"/"exp_avg"/"exp_avg_sq"/"step"/"fp32": tensor}}`` of one rank, flat buffers undone."""
    layout = local_layout(mc, pc, rank)
    out: dict[str, dict[str, torch.Tensor]] = {lp.name: {} for lp in layout}

    def take(key: str, shape: tuple[int, ...], into: dict[str, torch.Tensor], what: str) -> None:
        t = flat.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            problems.append(f"rank {rank}: {key}: expected a tensor of shape {shape}, found "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
        else:
            into[what] = t

    for lp in layout:
        if pc.zero < 3:
            take(f"model/{lp.name}", lp.shape, out[lp.name], "model")
        if pc.zero == 0:
            for what in (*MOMENTS, "step"):
                take(f"optim/state/{lp.name}/{what}", lp.shape if what != "step" else (), out[lp.name], what)
    if pc.zero == 0:
        return out
    for key, params in _buckets(layout).items():
        group = _bucket_ranks(pc, rank, key.split(".")[0])
        total, size = _partition_size(params, len(group))
        parts: dict[str, list[torch.Tensor]] = {f: [] for f in ("fp32_param", *MOMENTS)}
        for r in group:
            other = states[r]
            for f in parts:
                t = other.get(f"optim/flat/{key}/{f}")
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
                    problems.append(f"rank {r}: optim/flat/{key}/{f}: expected shape ({size},)")
                    return out
                parts[f].append(t)
        step = flat.get(f"optim/flat/{key}/step")
        if not isinstance(step, torch.Tensor) or step.dim() != 0:
            problems.append(f"rank {rank}: optim/flat/{key}/step: expected a 0-d tensor, found {step!r}")
            return out
        for f, chunks in parts.items():
            buf = torch.cat(chunks)
            if buf[total:].any():
                problems.append(f"rank {rank}: optim/flat/{key}/{f}: alignment padding is not zero")
            offset = 0
            for lp in params:
                n = math.prod(lp.shape)
                out[lp.name]["fp32" if f == "fp32_param" else f] = buf[offset:offset + n].view(lp.shape)
                offset += n
        for lp in params:
            out[lp.name]["step"] = step
    return out


def to_logical(rank_states: Mapping[int, Mapping[str, Any]], mc: ModelConfig, pc: ParallelConfig) -> dict[str, Any]:
    """The flat logical state of a whole layout from every rank's state (nested or flat); padding is dropped and
    every replica (TP-shared K/V, DP copies, tied embedding copies, fp32 masters under zero 1/2, steps, param
    groups) must be equal. Raises ``LayoutMismatchError`` listing every problem."""
    missing = [r for r in range(pc.world) if r not in rank_states]
    if missing:
        raise LayoutMismatchError(f"to_logical: no state for ranks {missing} of world {pc.world}")
    states = {r: _flatten(s) for r, s in rank_states.items()}
    shapes = dict(logical_specs(mc))
    asm, problems = _Assembler(), []
    for rank in range(pc.world):
        where = f"rank {rank}"
        local = _local_values(states[rank], states, mc, pc, rank, problems)
        for lp in local_layout(mc, pc, rank):
            got = local[lp.name]
            covered = torch.zeros(lp.shape, dtype=torch.bool)
            for p in lp.pieces:
                covered.narrow(p.dim, p.local_start, p.count).fill_(True)
                shape = shapes[p.logical]
                for what, key in (("model", "model/{}"), ("fp32", "model/{}"), ("exp_avg", "optim/state/{}/exp_avg"),
                                  ("exp_avg_sq", "optim/state/{}/exp_avg_sq")):
                    if what in got:
                        asm.place(key.format(p.logical), shape, p, got[what], f"{where} {lp.name} ({what})")
                if "step" in got:
                    asm.place_scalar(f"optim/state/{p.logical}/step", got["step"], f"{where} {lp.name}")
            for what, t in got.items():
                if what != "step" and t[~covered].any():
                    problems.append(f"{where}: {lp.name} ({what}): vocabulary padding rows are not zero")
    for name in shapes:
        for key in (f"model/{name}", f"optim/state/{name}/exp_avg", f"optim/state/{name}/exp_avg_sq"):
            if key not in asm.filled or not bool(asm.filled[key].all()):
                problems.append(f"{key}: not fully covered by the ranks' pieces")
        if f"optim/state/{name}/step" not in asm.values:
            problems.append(f"optim/state/{name}/step: missing")
    result: dict[str, Any] = dict(asm.values)
    for key in ("optim/param_groups", "iteration"):
        values = [states[r].get(key) for r in range(pc.world)]
        if any(v != values[0] for v in values) or values[0] is None:
            problems.append(f"{key}: must be present and equal on every rank, found {values}")
        result[key] = values[0]
    problems = asm.problems + problems
    if problems:
        raise LayoutMismatchError(f"to_logical: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:50]))
    return result
