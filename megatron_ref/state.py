"""The rank-local state dict of the doc (what ``ckpt.save(state, ..., spec=...)`` receives) and its inverse.

Who calls it: checkpointing code on every rank, between training steps. ``rank_state`` is a pure read;
``load_rank_state`` is collective (over DP) only with ``zero = 3``, where the parameters are re-gathered from the
loaded flat partitions.

The state is nested; joining its keys with ``/`` (``flatten_state``) gives the doc's flat keys:
``model/<local name>``, ``optim/state/<local name>/{exp_avg,exp_avg_sq,step}`` (zero 0) or
``optim/flat/<bucket>.<group>/{fp32_param,exp_avg,exp_avg_sq,step}`` (zero >= 1), ``optim/param_groups`` and
``iteration``. The tensors are the live ones (no copies): copy them if you need a snapshot while training goes on.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron_ref.model import GPTModel
from megatron_ref.optimizer import Actions, DenseAdamW, FlatAdamW, check_copy, raise_problems


def rank_state(model: GPTModel, optimizer: DenseAdamW | FlatAdamW) -> dict[str, Any]:
    """This rank's state, nested: ``{"model": {...}, "optim": {...}, "iteration": int}`` (no ``model`` with
    ``zero = 3``)."""
    state: dict[str, Any] = {}
    if model.pc.zero < 3:
        state["model"] = {name: p.detach() for name, p in model.named_parameters()}
    state["optim"] = optimizer.state_entries()
    state["iteration"] = int(optimizer.iteration)
    return state


def load_rank_state(model: GPTModel, optimizer: DenseAdamW | FlatAdamW, state: Mapping[str, Any]) -> None:
    """Restore exactly what ``rank_state`` returned (bit-exact, steps included); ``state`` may be nested or flat.

    Raises ``LayoutMismatchError`` listing every missing, unexpected or mis-shaped entry; nothing is changed then.
    """
    nested = unflatten_state(state) if any("/" in str(k) for k in state) else state
    problems: list[str] = []
    actions: Actions = []
    named = list(model.named_parameters())
    if model.pc.zero < 3:
        weights = nested.get("model", {})
        for name, p in named:
            if name not in weights:
                problems.append(f"model/{name}: missing")
            else:
                check_copy(p.data, weights[name], f"model/{name}", problems, actions)
        problems += [f"model/{n}: not a parameter of this rank" for n in sorted(set(weights) - {n for n, _ in named})]
    elif nested.get("model"):
        problems.append("model: zero = 3 keeps no model entries (the weights are the fp32_param partitions)")
    optimizer.load_entries(nested.get("optim", {}), problems, actions)
    if not isinstance(nested.get("iteration"), int):
        problems.append(f"iteration: expected an int, found {nested.get('iteration')!r}")
    raise_problems(problems, f"load_rank_state on rank {model.ps.rank}")
    with torch.no_grad():
        for act in actions:
            act()
    optimizer.iteration = nested["iteration"]
    if model.pc.zero == 3:
        optimizer.write_params()


def flatten_state(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``/``-joined keys of a nested state (dicts only; lists such as ``param_groups`` stay whole values)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten_state(v, key))
        else:
            out[key] = v
    return out


def unflatten_state(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Invert ``flatten_state`` for the keys of this package (local names contain ``.``, never ``/``).

    The doc's fixed parts are split on ``/``: ``model/<name>``, ``optim/state/<name>/<k>``,
    ``optim/flat/<key>/<k>``, ``optim/param_groups``, ``iteration``.
    """
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return out


def clone_state(state: Any) -> Any:
    """A deep copy of a nested or flat state, tensors cloned (a snapshot that training will not change)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    return state
