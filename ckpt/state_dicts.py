"""DCP's ``get_model_state_dict`` / ``get_optimizer_state_dict``, with their key mapping cached per object.

Both DCP functions rebuild every parameter's fully qualified name (FQN) on each call: about 9 ms per call pair for a
149-parameter GPT here, half of a ``Checkpointer.save`` request. The mapping depends only on the module tree and
the optimizer's parameter list, so it is computed once, by DCP itself, and replayed while those are unchanged:

* the model: ``model.state_dict()`` (what DCP reads too) with its keys renamed and ordered as DCP did on the call
  that filled the cache, for the same tuple of keys;
* the optimizer: ``optim.state_dict()`` (what DCP reads too) with parameter ids turned into the FQNs DCP chose,
  for the same parameters (by identity, in order) and the same module parameters.

Anything the replay cannot reproduce exactly goes to DCP every time: FSDP1 wrappers (their state-dict contexts
change values, not just keys), meta tensors (DCP drops them), an optimizer without state (DCP initialises it with
a zero-gradient step), or a first DCP result whose values are not the module's own ``state_dict`` values. The
cache holds weak references, so it never keeps a model or optimizer alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from resharding.layout import memory_identity

_PARAMS = "params"


def _has_fsdp1(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # a torch without distributed
        return False
    return any(isinstance(m, FSDP1) for m in module.modules())


@dataclass(frozen=True)
class ModuleFacts:
    """What one save or load asks of a module more than once (each a walk over every submodule): whether FSDP1
    wraps any of it, and its parameters' ids in ``parameters()`` order, also as a set."""

    fsdp1: bool
    param_ids: tuple[int, ...]
    param_id_set: frozenset[int]


def module_facts(module: torch.nn.Module) -> ModuleFacts:
    ids = tuple(id(p) for p in module.parameters())
    return ModuleFacts(_has_fsdp1(module), ids, frozenset(ids))


def _identity(v: Any) -> tuple[Any, ...] | None:
    """What makes two state-dict values the same value: views of the same memory (a DTensor's local memory and
    placements), or the same object. None for a tensor without accessible memory (replayed never)."""
    if not isinstance(v, torch.Tensor):
        return ("object", id(v))
    if v.is_meta:
        return None
    return memory_identity(v)


class _ModuleMap:
    """For one module: the ``state_dict`` keys seen, and DCP's output order as (fqn, index into those keys)."""

    def __init__(self, keys: tuple[str, ...], order: list[tuple[str, int]] | None) -> None:
        self.keys, self.order = keys, order  # order None: DCP's result could not be replayed


class _OptimMap:
    def __init__(self, params: tuple[int, ...], module_params: tuple[int, ...], fqns: list[str]) -> None:
        self.params, self.module_params, self.fqns = params, module_params, fqns


_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, _ModuleMap]" = weakref.WeakKeyDictionary()
_OPTIMS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptimMap]" = weakref.WeakKeyDictionary()


def model_state_dict(model: torch.nn.Module, facts: ModuleFacts | None = None) -> dict[str, Any]:
    """Equal to ``get_model_state_dict(model)``: the same keys in the same order and the same tensors.

    ``facts``: ``module_facts(model)`` if the caller has them already (taken during this same call)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if (facts.fsdp1 if facts is not None else _has_fsdp1(model)):
        return get_model_state_dict(model)
    with torch.no_grad():
        sd = model.state_dict()
    values = list(sd.values())
    if any(isinstance(v, torch.Tensor) and v.is_meta for v in values):
        return get_model_state_dict(model)
    keys = tuple(sd)
    cached = _MODULES.get(model)
    if cached is not None and cached.keys == keys:
        if cached.order is None:
            return get_model_state_dict(model)
        return {fqn: values[i] for fqn, i in cached.order}
    out = get_model_state_dict(model)
    _MODULES[model] = _ModuleMap(keys, _replay_order(out, values))
    return out


def _replay_order(out: dict[str, Any], values: list[Any]) -> list[tuple[str, int]] | None:
    """Match DCP's values to the ``state_dict`` values they are; None unless each maps to exactly one."""
    if len(out) != len(values):
        return None
    free: dict[tuple[Any, ...], list[int]] = {}
    for i, v in enumerate(values):
        ident = _identity(v)
        if ident is None:
            return None
        free.setdefault(ident, []).append(i)
    order = []
    for fqn, v in out.items():
        ident = _identity(v)
        hits = free.get(ident) if ident is not None else None
        if not hits:
            return None
        # Tied weights are one tensor under two keys: DCP keeps state_dict's order, so take them in order.
        order.append((fqn, hits.pop(0)))
    return order


def optimizer_state_dict(model: torch.nn.Module, optim: torch.optim.Optimizer,
                         facts: ModuleFacts | None = None) -> dict[str, Any]:
    """Equal to ``get_optimizer_state_dict(model, optim)`` for an optimizer that already has state.

    ``facts``: ``module_facts(model)`` if the caller has them already (taken during this same call)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if facts is None:
        facts = module_facts(model)
    if not optim.state or facts.fsdp1:
        return get_optimizer_state_dict(model, optim)
    params = tuple(id(p) for g in optim.param_groups for p in g[_PARAMS])
    module_params = facts.param_ids
    cached = _OPTIMS.get(optim)
    if cached is None or cached.params != params or cached.module_params != module_params:
        out = get_optimizer_state_dict(model, optim)
        fqns = [f for g in out["param_groups"] for f in g[_PARAMS]]
        if len(fqns) == len(params):
            _OPTIMS[optim] = _OptimMap(params, module_params, fqns)
        return out
    osd = optim.state_dict()
    fqns = cached.fqns
    state = {fqns[pid]: v for pid, v in osd["state"].items()}
    groups = []
    for g in osd["param_groups"]:
        g[_PARAMS] = [fqns[pid] for pid in g[_PARAMS]]
        groups.append(g)
    return {"state": state, "param_groups": groups}
