"""Nested state <-> flat logical keys.

``resolve`` turns Stateful objects (modules, optimizers, schedulers, user objects) into plain nested state
through the adapter registry; ``flatten`` turns plain nested state into flat keys (``formats.keys``); ``assign``
puts loaded non-tensor values back into the plain state; ``Binding.apply`` hands each Stateful object its
loaded state. Called on every rank by save and load, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import torch

from ckpt.stateful import Adapter, Context, collect_modules, find_adapter
from formats import keys as K
from formats.manifest import ContainerEntry
from formats.nesting import FlatState, flatten as _flatten_nested, nest


@dataclass
class Binding:
    """A Stateful object found in the state and the plain state it was resolved to."""

    adapter: Adapter
    obj: Any
    plain: Any

    def apply(self, ctx: Context) -> None:
        self.adapter.from_state(self.obj, self.plain, ctx)


def resolve(state: Any) -> tuple[Any, list[Binding], Context]:
    """Replace every Stateful object in ``state`` with its plain state; return (plain, bindings, context).

    Containers are copied shallowly (the caller's dicts are not modified); tensors are not copied.
    """
    ctx = Context(modules=collect_modules(state))
    bindings: list[Binding] = []

    def walk(o: Any, depth: int) -> Any:
        if depth > 64:
            raise ValueError("state is nested more than 64 levels deep (a reference cycle?)")
        if isinstance(o, torch.Tensor) or o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, dict) or isinstance(o, Mapping):  # dict first: typing's Mapping check is slow
            return {k: walk(v, depth + 1) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            items = [walk(v, depth + 1) for v in o]
            return items if isinstance(o, list) else tuple(items)
        adapter = find_adapter(o)
        if adapter is None:
            return o  # flatten reports the unsupported type with its key
        plain = walk(adapter.to_state(o, ctx), depth + 1)
        bindings.append(Binding(adapter, o, plain))
        return plain

    return walk(state, 0), bindings, ctx


def flatten(plain: Any) -> FlatState:
    """Flat keys of a plain nested state. ``TypeError`` naming the key for values the format cannot store."""
    return _flatten_nested(plain)


def flatten_state(state: Any) -> FlatState:
    """``flatten(resolve(state)[0])`` in one walk, for saving (no bindings are kept).

    Each Stateful object is replaced by its plain state where it is met, so the state is walked once instead of
    twice: the walk is about half of a ``Checkpointer.save`` request's Python for a 100M GPT and AdamW.
    """
    return _flatten_nested(state, expand=_expander(Context(modules=collect_modules(state))))


def _expander(ctx: Context) -> Callable[[Any], "Callable[[], Any] | None"]:
    def expand(o: Any) -> "Callable[[], Any] | None":
        adapter = find_adapter(o)
        return None if adapter is None else partial(adapter.to_state, o, ctx)

    return expand


def assign(state: Any, values: Mapping[str, Any], bindings: list[Binding] | None = None, key: str = "") -> Any:
    """Put loaded value leaves back: dicts and lists of ``state`` are updated in place, tuples rebuilt.

    ``state`` is the caller's original state; where it holds a Stateful object, the values go into the plain
    state that ``resolve`` made for it (``bindings``), which ``Binding.apply`` then hands to the object.
    Returns the (possibly rebuilt) object.
    """
    by_id = {id(b.obj): b for b in bindings or []}

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            return o
        if isinstance(o, dict):
            for k in list(o.keys()):
                comp, _ = K.component(k, f"state key {key!r}")
                o[k] = walk(o[k], K.join(key, comp))
            return o
        if isinstance(o, list):
            for i in range(len(o)):
                o[i] = walk(o[i], K.join(key, str(i)))
            return o
        if isinstance(o, tuple):
            return tuple(walk(v, K.join(key, str(i))) for i, v in enumerate(o))
        b = by_id.get(id(o))
        if b is not None:
            b.plain = walk(b.plain, key)
            return o
        return values.get(key, o)

    return walk(state, key)


def unflatten(tensors: Mapping[str, Any], values: Mapping[str, Any], containers: Mapping[str, ContainerEntry],
              where: str = "") -> Any:
    """Rebuild nested state from flat leaves and container records (``ckpt.open(...).state()``)."""
    return nest({**values, **tensors}, containers, where)


def walk_objects(o: Any, depth: int = 0) -> list[Any]:
    """Every non-container object inside nested dicts/lists/tuples (to find optimizers in a state)."""
    if depth > 8:
        return []
    if isinstance(o, dict):
        return [x for v in o.values() for x in walk_objects(v, depth + 1)]
    if isinstance(o, (list, tuple)):
        return [x for v in o for x in walk_objects(v, depth + 1)]
    return [o]
