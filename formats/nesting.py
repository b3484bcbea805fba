"""Nested state <-> the universal format's flat keys: the one ``flatten`` and the one ``nest``.

Keys join nested dict/list/tuple levels with ``/`` (``formats.keys``); every container is recorded
(``ContainerEntry``: its type, a list's length, which dict keys were ints), so ``nest(flatten(x))`` rebuilds ``x``
exactly. Callers: ``ckpt.save`` / the Checkpointer (``ckpt.state.flatten_state``, on the training thread: the walk is
kept tight) and every foreign-format ``Source`` (``formats.foreign.source.flatten_into``), and ``ckpt.open`` /
the exporters for ``nest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ckpt.errors import CorruptCheckpointError, UnsupportedStateError
from formats import keys as K
from formats.keys import MAX_DEPTH  # the deepest nesting accepted (re-exported)
from formats.manifest import ContainerEntry, encode_value

#: ``expand(obj)``: for a Stateful object (a module, an optimizer), a function that returns its plain state; None
#: for any other object.
Expand = Callable[[Any], "Callable[[], Any] | None"]


@dataclass
class FlatState:
    """Leaves by flat key: tensors, plain values (None, bool, int, float, str), and the container records."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, ContainerEntry] = field(default_factory=dict)


def _plain(o: Any) -> bool:
    return o is None or isinstance(o, (bool, int, float, str))


def _is_mapping(o: Any) -> bool:
    # typing's Mapping check is slow; dicts and plain values (most leaves) skip it
    return isinstance(o, dict) or (not _plain(o) and not isinstance(o, (list, tuple)) and isinstance(o, Mapping))


def flatten(obj: Any, prefix: str = "", *, where: str = "", expand: Expand | None = None,
            dense_only: bool = False) -> FlatState:
    """The flat leaves and containers of ``obj``, keyed below ``prefix``.

    ``expand`` replaces Stateful objects by their plain state where they are met. ``dense_only`` refuses sparse
    and quantized tensors. Raises ``UnsupportedStateError`` naming ``where`` and the key for a value the format
    cannot store or a dict key that is neither str nor int, and ``ValueError`` past ``MAX_DEPTH`` levels.
    """
    out = FlatState()
    tensors, tensor_type, at = out.tensors, torch.Tensor, f"{where}: " if where else ""

    def tensor(t: torch.Tensor, key: str) -> None:
        if dense_only and (t.layout != torch.strided or t.is_quantized):
            raise UnsupportedStateError(f"{at}key {key!r} holds a {t.layout} tensor of dtype {t.dtype}; only dense "
                                        "(strided) tensors can be stored")
        tensors[key] = t

    def walk(o: Any, key: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"{at}state key {key!r}: nested more than {MAX_DEPTH} levels deep (a reference cycle?)")
        if isinstance(o, tensor_type):
            tensor(o, key)
        elif _is_mapping(o):
            if key == "" and "" in o:  # its flat key would be the root's own, "": the two would be confused
                raise UnsupportedStateError(f"{at}the top-level dict has the key '', which the format cannot store "
                                            "(its flat key would be the root's own); rename it")
            int_keys = []
            base = "" if key == "" else key + "/"
            for k, v in o.items():
                if type(k) is str:  # the common case, without building the error context of K.component
                    comp = K.escape(k) if "~" in k or "/" in k else k
                else:
                    comp, is_int = K.component(k, f"{at}state key {key!r}")
                    if is_int:
                        int_keys.append(comp)
                if isinstance(v, tensor_type) and not dense_only:  # most leaves: stored here, not a call deeper
                    tensors[base + comp] = v
                else:
                    walk(v, base + comp, depth + 1)
            out.containers[key] = ContainerEntry(key, "dict", 0, tuple(int_keys))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, K.join(key, str(i)), depth + 1)
            out.containers[key] = ContainerEntry(key, "list" if isinstance(o, list) else "tuple", len(o))
        else:
            to_state = expand(o) if expand is not None and not _plain(o) else None
            if to_state is not None:
                walk(to_state(), key, depth + 1)
                return
            try:
                encode_value(o, key)
            except UnsupportedStateError as e:
                raise UnsupportedStateError(f"{at}{e}") from None
            out.values[key] = o

    walk(obj, prefix, 0)
    return out


def nest(leaves: Mapping[str, Any], containers: Mapping[str, ContainerEntry], where: str) -> Any:
    """Rebuild the nested object of flat ``leaves`` (key -> tensor or value) and ``containers``.

    Keys whose parents no container records are placed in dicts. Linear in the number of keys. Raises
    ``CorruptCheckpointError`` naming ``where`` when a list or tuple record disagrees with the keys below it, or the
    nesting is deeper than ``MAX_DEPTH``."""
    children: dict[str, set[str]] = {}
    for key in [*leaves, *containers]:
        if key == "":
            continue
        parent, _, comp = key.rpartition("/")
        children.setdefault(parent, set()).add(comp)
    for key in list(children):  # parents nobody recorded: dicts (sets: linear, however many there are)
        k = key
        while k:
            parent, _, comp = k.rpartition("/")
            children.setdefault(parent, set()).add(comp)
            k = parent

    def build(key: str, depth: int) -> Any:
        if key in leaves:
            return leaves[key]
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"{where}: key {key!r} is nested more than {MAX_DEPTH} levels deep")
        c = containers.get(key)
        kids = sorted(children.get(key, ()))
        prefix = "" if key == "" else key + "/"
        if c is None or c.type == "dict":
            ints = set(c.int_keys) if c is not None else set()
            if ints and not all(ch.lstrip("-").isdigit() for ch in ints):
                raise CorruptCheckpointError(f"{where}: dict {key!r} has int_keys {sorted(ints)[:10]} that are not "
                                             "all integers")
            return {(int(ch) if ch in ints else K.unescape(ch)): build(prefix + ch, depth + 1) for ch in kids}
        if sorted(kids) != sorted(str(i) for i in range(c.length)):
            raise CorruptCheckpointError(f"{where}: {c.type} {key!r} of length {c.length} has items {kids}")
        items = [build(prefix + str(i), depth + 1) for i in range(c.length)]
        return items if c.type == "list" else tuple(items)

    return build("", 0)
