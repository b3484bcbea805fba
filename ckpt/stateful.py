"""How objects in a state become plain nested state and back: a registry of adapters (STYLE 14).

The core never special-cases framework types; it asks this registry. Built in:

* ``torch.nn.Module`` -> ``get_model_state_dict`` (FQN keys; DTensors stay DTensors under FSDP2/TP), its key
  mapping cached (``ckpt.state_dicts``);
* ``torch.optim.Optimizer`` -> ``get_optimizer_state_dict(model, optim)``, likewise cached, with the module of the
  same state that owns its parameters, so optimizer state is keyed by parameter FQN (PyTorch's canonical form) and can be
  resharded; without such a module it falls back to ``optim.state_dict()``;
* anything else with ``state_dict``/``load_state_dict`` (the ``Stateful`` protocol).

Register more with ``register_adapter`` (integrations do, for their trainer objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ckpt.state_dicts import ModuleFacts


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class Context:
    """What adapters may look at: every module found anywhere in the state being saved or loaded."""

    modules: list[torch.nn.Module] = field(default_factory=list)
    #: Facts about a module computed once per save or load (keyed by ``id``; the Context lives for one call).
    _facts: dict[int, "ModuleFacts"] = field(default_factory=dict, repr=False)

    def facts(self, m: torch.nn.Module) -> "ModuleFacts":
        f = self._facts.get(id(m))
        if f is None:
            from ckpt.state_dicts import module_facts

            f = self._facts[id(m)] = module_facts(m)
        return f


@dataclass(frozen=True)
class Adapter:
    matches: Callable[[Any], bool]
    to_state: Callable[[Any, Context], Any]
    from_state: Callable[[Any, Any, Context], None]


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter; ``first`` puts it before the built-ins so it can override them."""
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)


def find_adapter(obj: Any) -> Adapter | None:
    for a in _ADAPTERS:
        if a.matches(obj):
            return a
    return None


def _owner(optim: torch.optim.Optimizer, ctx: Context) -> torch.nn.Module | None:
    wanted = {id(p) for g in optim.param_groups for p in g["params"]}
    for m in ctx.modules:
        if wanted <= ctx.facts(m).param_id_set:
            return m
    return None


def _module_to(m: torch.nn.Module, ctx: Context) -> Any:
    from ckpt.state_dicts import model_state_dict

    return model_state_dict(m, ctx.facts(m))


def _module_from(m: torch.nn.Module, sd: Any, ctx: Context) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(m, sd)


def _optim_to(o: torch.optim.Optimizer, ctx: Context) -> Any:
    from ckpt.state_dicts import optimizer_state_dict

    model = _owner(o, ctx)
    return o.state_dict() if model is None else optimizer_state_dict(model, o, ctx.facts(model))


def _optim_from(o: torch.optim.Optimizer, sd: Any, ctx: Context) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model = _owner(o, ctx)
    if model is None:
        o.load_state_dict(sd)
    else:
        set_optimizer_state_dict(model, o, sd)


register_adapter(Adapter(lambda o: isinstance(o, torch.nn.Module), _module_to, _module_from), first=False)
register_adapter(Adapter(lambda o: isinstance(o, torch.optim.Optimizer), _optim_to, _optim_from), first=False)
register_adapter(
    Adapter(lambda o: isinstance(o, Stateful) and not isinstance(o, (dict, torch.Tensor, type)),
            lambda o, ctx: o.state_dict(), lambda o, sd, ctx: o.load_state_dict(sd)),
    first=False,
)


def collect_modules(state: Any) -> list[torch.nn.Module]:
    """Every ``nn.Module`` directly inside the nested containers of ``state``."""
    out: list[torch.nn.Module] = []

    def walk(o: Any, depth: int) -> None:
        if depth > 64:  # a reference cycle: the state walk that follows names the key
            return
        if isinstance(o, torch.nn.Module):
            out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)

    walk(state, 0)
    return out
