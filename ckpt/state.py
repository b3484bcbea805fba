"""Nested state <-> flat logical keys.

``resolve`` turns Stateful objects (modules, optimizers, schedulers, user objects) into plain nested state
through the adapter registry; ``flatten`` turns plain nested state into flat keys (``formats.keys``); ``assign``
puts loaded non-tensor values back into the plain state; ``Binding.apply`` hands each Stateful object its
loaded state. Called on every rank by save and load, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ckpt.stateful import Adapter, Context, collect_modules, find_adapter
from formats import keys as K
from formats.manifest import ContainerEntry, encode_value


@dataclass
class Binding:
    """A Stateful object found in the state and the plain state it was resolved to."""

    adapter: Adapter
    obj: Any
    plain: Any

    def apply(self, ctx: Context) -> None:
        self.adapter.from_state(self.obj, self.plain, ctx)


@dataclass
class FlatState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, ContainerEntry] = field(default_factory=dict)


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
    return _flatten(plain, None)


def flatten_state(state: Any) -> FlatState:
    """``flatten(resolve(state)[0])`` in one walk, for saving (no bindings are kept).

    Each Stateful object is replaced by its plain state where it is met, so the state is walked once instead of
    twice: the walk is about half of a ``Checkpointer.save`` request's Python for a 100M GPT and AdamW.
    """
    return _flatten(state, Context(modules=collect_modules(state)))


def _component(k: Any, key: str) -> tuple[str, bool]:
    if type(k) is str:  # the common case, without building the error context of ``K.component``
        return (K.escape(k) if "~" in k or "/" in k else k), False
    return K.component(k, f"state key {key!r}")


def _other_mapping(o: Any) -> bool:
    """A Mapping that is not a dict (typing's isinstance check is slow: plain values skip it)."""
    return not (o is None or isinstance(o, (bool, int, float, str, list, tuple))) and isinstance(o, Mapping)


def _flatten(o: Any, ctx: Context | None) -> FlatState:
    out = FlatState()
    tensors, tensor_type = out.tensors, torch.Tensor

    def walk(o: Any, key: str, depth: int) -> None:
        if depth > 64:
            raise ValueError(f"state key {key!r}: nested more than 64 levels deep (a reference cycle?)")
        if isinstance(o, tensor_type):
            tensors[key] = o
        elif isinstance(o, dict) or (ctx is not None and _other_mapping(o)):
            int_keys = []
            prefix = "" if key == "" else key + "/"
            for k, v in o.items():
                comp, is_int = _component(k, key)
                if is_int:
                    int_keys.append(comp)
                if isinstance(v, tensor_type):  # most leaves: stored here rather than one call deeper
                    tensors[prefix + comp] = v
                else:
                    walk(v, prefix + comp, depth + 1)
            out.containers[key] = ContainerEntry(key, "dict", 0, tuple(int_keys))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, K.join(key, str(i)), depth + 1)
            out.containers[key] = ContainerEntry(key, "list" if isinstance(o, list) else "tuple", len(o))
        else:
            adapter = None
            if ctx is not None and not (o is None or isinstance(o, (bool, int, float, str))):
                adapter = find_adapter(o)
            if adapter is not None:
                walk(adapter.to_state(o, ctx), key, depth + 1)
                return
            encode_value(o, key)  # raises TypeError for unsupported types
            out.values[key] = o

    walk(o, "", 0)
    return out


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


def unflatten(tensors: Mapping[str, Any], values: Mapping[str, Any], containers: Mapping[str, ContainerEntry]) -> Any:
    """Rebuild nested state from flat leaves and container records (``ckpt.open(...).state()``)."""
    leaves = {**values, **tensors}

    def build(key: str) -> Any:
        if key in leaves:
            return leaves[key]
        c = containers.get(key)
        if c is None:
            raise KeyError(key)
        prefix = "" if key == "" else key + "/"
        children = sorted(
            {k[len(prefix):].split("/", 1)[0] for k in [*leaves, *containers] if k.startswith(prefix) and k != key}
        )
        if c.type == "dict":
            ints = set(c.int_keys)
            return {(int(ch) if ch in ints else K.unescape(ch)): build(prefix + ch) for ch in children}
        items = [build(prefix + str(i)) for i in range(c.length)]
        return items if c.type == "list" else tuple(items)

    return build("")


def walk_objects(o: Any, depth: int = 0) -> list[Any]:
    """Every non-container object inside nested dicts/lists/tuples (to find optimizers in a state)."""
    if depth > 8:
        return []
    if isinstance(o, dict):
        return [x for v in o.values() for x in walk_objects(v, depth + 1)]
    if isinstance(o, (list, tuple)):
        return [x for v in o for x in walk_objects(v, depth + 1)]
    return [o]
