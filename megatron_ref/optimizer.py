"""AdamW for the reference model: ``torch.optim.AdamW`` with ``zero = 0``, flat DP partitions with ``zero >= 1``.

Who uses it: callers build it with ``build_optimizer(model, oc)`` right after ``build_model`` (no collective);
``train_step`` calls ``step()`` on every rank after the gradients are summed; ``state.py`` reads and writes its
state through ``state_entries`` / ``load_entries``.

Both optimizers create their state eagerly (zero moments, ``step`` 0) so that a fresh optimizer already has the
state layout of the doc and can be checkpointed or loaded before the first step.

ZeRO simplifications (same math as Megatron's distributed optimizer, simpler communication): gradients are
all-reduced over DP in full (``zero = 2`` would reduce-scatter them; the owned slice is the same), and with
``zero = 3`` every rank still keeps the full parameters for compute (re-gathered after every step); only the
checkpointed state differs: it holds no ``model/`` entries, the weights live in the ``fp32_param`` partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from megatron_ref.config import LayoutMismatchError, OptimConfig
from megatron_ref.model import GPTModel, is_expert

#: Elements per rank of flat-buffer alignment (the doc's ``align``).
ALIGN = 8
MOMENTS = ("exp_avg", "exp_avg_sq")


def param_group(p: torch.Tensor) -> int:
    """Group 0 decays (``ndim >= 2``), group 1 does not."""
    return 0 if p.ndim >= 2 else 1


def plain_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"lr": float(g["lr"]), "betas": [float(b) for b in g["betas"]], "eps": float(g["eps"]),
             "weight_decay": float(g["weight_decay"])} for g in groups]


Actions = list[Callable[[], None]]


def check_copy(dst: torch.Tensor, src: Any, key: str, problems: list[str], actions: Actions) -> None:
    """Queue ``dst.copy_(src)`` if ``src`` matches ``dst``; else record why not. Loads validate every entry
    first and apply the queued actions only when there is no problem, so a bad state changes nothing."""
    if not isinstance(src, torch.Tensor):
        problems.append(f"{key}: expected a tensor, found {type(src).__name__}")
    elif src.shape != dst.shape or src.dtype != dst.dtype:
        problems.append(f"{key}: expected {tuple(dst.shape)} {dst.dtype}, found {tuple(src.shape)} {src.dtype}")
    else:
        actions.append(lambda: dst.copy_(src))


class DenseAdamW:
    """``zero = 0``: ``torch.optim.AdamW`` over this rank's parameters, state per local parameter."""

    zero = 0

    def __init__(self, model: GPTModel, oc: OptimConfig) -> None:
        self.model = model
        self.named = list(model.named_parameters())
        hyper = oc.param_groups()
        groups = [{"params": [p for _, p in self.named if param_group(p) == g], **hyper[g]} for g in (0, 1)]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self.inner = torch.optim.AdamW(groups, foreach=False)
        for _, p in self.named:
            self.inner.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                   "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                   "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        self.iteration = 0

    def step(self) -> None:
        self.inner.step()

    def state_entries(self) -> dict[str, Any]:
        state = {name: {k: self.inner.state[p][k] for k in (*MOMENTS, "step")} for name, p in self.named}
        return {"state": state, "param_groups": plain_groups(self.inner.param_groups)}

    def load_entries(self, optim: Mapping[str, Any], problems: list[str], actions: Actions) -> None:
        state = optim.get("state", {})
        for name, p in self.named:
            for k in (*MOMENTS, "step"):
                key = f"optim/state/{name}/{k}"
                if name not in state or k not in state[name]:
                    problems.append(f"{key}: missing")
                else:
                    check_copy(self.inner.state[p][k], state[name][k], key, problems, actions)
        extra = sorted(set(state) - {n for n, _ in self.named})
        problems += [f"optim/state/{n}: not a parameter of this rank" for n in extra]
        _load_groups(self.inner.param_groups, optim.get("param_groups"), problems, actions)

    def write_params(self) -> None:
        """Nothing to do: the parameters are the state."""


def _load_groups(target: list[dict[str, Any]], loaded: Any, problems: list[str], actions: Actions) -> None:
    if not isinstance(loaded, (list, tuple)) or len(loaded) != 2:
        problems.append(f"optim/param_groups: expected a list of 2 dicts, found {loaded!r}")
        return
    for g, src in zip(target, loaded):
        try:
            hp = dict(lr=float(src["lr"]), betas=tuple(float(b) for b in src["betas"]), eps=float(src["eps"]),
                      weight_decay=float(src["weight_decay"]))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"optim/param_groups: bad entry {src!r} ({e})")
        else:
            actions.append(lambda g=g, hp=hp: g.update(hp))


@dataclass
class FlatPartition:
    """One bucket x group: the flat buffer of its parameters and this rank's ``[r*P, (r+1)*P)`` slice."""

    key: str  # "<bucket>.<group>"
    group: int
    kind: str  # the bucket's data-parallel group: "dp" (dense) or "edp" (expert)
    params: list[torch.nn.Parameter]
    total: int
    size: int  # P
    index: int  # r
    fp32_param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's slice of the padded concatenation of ``tensors`` (same shapes as ``params``)."""
        lo, hi = self.index * self.size, (self.index + 1) * self.size
        pieces, offset = [], 0
        for t in tensors:
            n = t.numel()
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append(t.detach().reshape(-1)[a - offset:b - offset])
            offset += n
        out = torch.cat(pieces) if pieces else torch.zeros(0)
        return torch.cat([out, out.new_zeros(self.size - out.numel())]).to(torch.float32)


class FlatAdamW:
    """``zero >= 1``: Megatron-style distributed AdamW over flat, aligned, DP-partitioned buffers."""

    def __init__(self, model: GPTModel, oc: OptimConfig) -> None:
        self.model, self.ps = model, model.ps
        self.zero = model.pc.zero
        self.groups = oc.param_groups()
        named = list(model.named_parameters())
        self.partitions: list[FlatPartition] = []
        for bucket, kind in (("dense", "dp"), ("expert", "edp")):
            for g in (0, 1):
                params = [p for n, p in named if is_expert(n) == (bucket == "expert") and param_group(p) == g]
                if not params:
                    continue
                n = self.ps.size(kind)
                total = sum(p.numel() for p in params)
                padded = math.ceil(total / (ALIGN * n)) * ALIGN * n
                part = FlatPartition(f"{bucket}.{g}", g, kind, params, total, padded // n, self.ps.index(kind),
                                     torch.empty(0), torch.empty(0), torch.empty(0), torch.tensor(0.0))
                part.fp32_param = part.flat(params).clone()
                part.exp_avg = torch.zeros(part.size)
                part.exp_avg_sq = torch.zeros(part.size)
                self.partitions.append(part)
        self.iteration = 0

    def step(self) -> None:
        """Update the owned slices, then all-gather them back into the parameters (collective over DP)."""
        for part in self.partitions:
            grad = part.flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in part.params])
            hp = self.groups[part.group]
            adamw_(part.fp32_param, grad, part.exp_avg, part.exp_avg_sq, part.step, hp["lr"], hp["betas"],
                   hp["eps"], hp["weight_decay"])
        self.write_params()

    def write_params(self) -> None:
        """Rebuild every parameter from the partitions of its bucket's DP group (collective over DP/expert-DP)."""
        for part in self.partitions:
            n = self.ps.size(part.kind)
            if n > 1:
                chunks = [torch.empty_like(part.fp32_param) for _ in range(n)]
                dist.all_gather(chunks, part.fp32_param, group=self.ps.group(part.kind))
                full = torch.cat(chunks)
            else:
                full = part.fp32_param
            offset = 0
            with torch.no_grad():
                for p in part.params:
                    p.copy_(full[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def state_entries(self) -> dict[str, Any]:
        flat = {part.key: {"fp32_param": part.fp32_param, "exp_avg": part.exp_avg, "exp_avg_sq": part.exp_avg_sq,
                           "step": part.step} for part in self.partitions}
        return {"flat": flat, "param_groups": plain_groups(self.groups)}

    def load_entries(self, optim: Mapping[str, Any], problems: list[str], actions: Actions) -> None:
        flat = optim.get("flat", {})
        for part in self.partitions:
            for k in ("fp32_param", *MOMENTS, "step"):
                key = f"optim/flat/{part.key}/{k}"
                if part.key not in flat or k not in flat[part.key]:
                    problems.append(f"{key}: missing")
                else:
                    check_copy(getattr(part, k), flat[part.key][k], key, problems, actions)
        extra = sorted(set(flat) - {p.key for p in self.partitions})
        problems += [f"optim/flat/{k}: no such bucket on this rank" for k in extra]
        groups = [dict(g) for g in self.groups]
        _load_groups(groups, optim.get("param_groups"), problems, actions)
        actions.append(lambda: setattr(self, "groups", plain_groups(groups)))


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           step: torch.Tensor, lr: float, betas: Any, eps: float, weight_decay: float) -> None:
    """One AdamW update, op for op as ``torch.optim.AdamW``'s single-tensor path (so zero 0 and zero >= 1 agree
    element for element given the same gradients)."""
    beta1, beta2 = float(betas[0]), float(betas[1])
    step += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    s = step.item()
    step_size = lr / (1 - beta1**s)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**s) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def build_optimizer(model: GPTModel, oc: OptimConfig | None = None) -> DenseAdamW | FlatAdamW:
    """The optimizer for ``model.pc.zero`` (no collective)."""
    oc = oc if oc is not None else OptimConfig()
    return DenseAdamW(model, oc) if model.pc.zero == 0 else FlatAdamW(model, oc)


def raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise LayoutMismatchError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
