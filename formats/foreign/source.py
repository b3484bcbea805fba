"""The interface every checkpoint reader of ``formats.foreign`` implements, and the key conventions they share.

A ``Source`` is one opened checkpoint of any supported format (universal, DCP, ``torch.save``, safetensors) seen
the same way: a table of logical tensors (key, dtype, global shape, the boxes they are stored as), the non-tensor
values, and the containers that nest them, all under the flat keys of the universal format (``formats.keys``).
Opening a source reads and validates its metadata only; ``read(key)`` reads one whole tensor, so converting or
comparing goes tensor by tensor and never holds more than a tensor at a time.

Who calls it: ``formats.foreign.convert`` (conversion and ``diff``), from one thread per output file; ``read`` is
thread-safe in every implementation.

Model weights. Formats that hold only a model's weights (safetensors, and a ``torch.save`` / DCP file whose top level
is a bare ``{name: tensor}`` state dict, as ``pytorch_model.bin`` is) are keyed ``model/<name>``, the key ``ckpt.save``
gives a module's parameters, so the same weight has the same key whatever format it came from. Writers do the
reverse: a checkpoint holding only tensors under ``model/`` is written as a bare state dict (``is_bare_model``).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from ckpt.errors import CorruptCheckpointError
from formats import keys as K
from formats.manifest import ContainerEntry
from formats.nesting import flatten

#: Top-level key under which model weights live in a universal checkpoint (``ckpt.save({"model": module})``).
MODEL_PREFIX = "model/"

_INT = re.compile(r"-?[0-9]+")

#: A box as plain (offsets, sizes) tuples, as sources list what they hold (``formats.box.Box`` does the arithmetic).
Extent = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor of a source: dtype, global shape, and the boxes (offsets, sizes) it is stored as.

    ``boxes`` tile the tensor exactly once; a tensor stored whole has one box covering it (none if it is empty).
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    boxes: tuple[Extent, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @staticmethod
    def whole(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> "TensorInfo":
        shape = tuple(int(s) for s in shape)
        boxes: tuple[Extent, ...] = () if math.prod(shape) == 0 else ((tuple(0 for _ in shape), shape),)
        return TensorInfo(key, dtype, shape, boxes)


@dataclass
class Source(ABC):
    """An opened checkpoint. Subclasses fill the tables in their constructor and implement ``read``."""

    path: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, ContainerEntry] = field(default_factory=dict)
    #: Informational facts carried into a universal manifest's ``metadata`` (e.g. an HF ``config.json``).
    metadata: dict[str, Any] = field(default_factory=dict)

    #: Short name of the format: ``universal``, ``dcp``, ``torch``, ``safetensors``, ``deepspeed``, ``megatron``.
    format: str = ""
    #: The ``layout`` a universal copy's manifest records; None: one rank, no spec. A spec-described source (Megatron
    #: rank directories) records its spec binding, as ``ckpt.save(spec=...)`` does, so ``ckpt.load(layout=...)``
    #: and ``ckpt reshard`` need no ``--spec`` afterwards.
    layout: dict[str, Any] | None = None

    @abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` as a CPU tensor of its dtype and shape (not necessarily contiguous)."""

    def close(self) -> None:
        """Release files and handles. Idempotent."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------------------------
# Nested objects <-> flat keys (the rules of formats.keys and docs/format.md, shared by every reader and writer).


def read_as(source: Source, key: str, dtype: torch.dtype) -> torch.Tensor:
    """``source.read(key)`` cast to ``dtype`` (what writers store), checked against the source's table."""
    t = source.read(key)
    info = source.tensors[key]
    if tuple(t.shape) != info.shape or t.dtype != info.dtype:
        raise CorruptCheckpointError(f"{source.path}: key {key!r} read as {t.dtype}{list(t.shape)}, its metadata says "
                                     f"{info.dtype}{list(info.shape)}")
    return t if t.dtype == dtype else t.to(dtype)


def flatten_into(obj: Any, key: str, out: Source, where: str, tensors: dict[str, torch.Tensor]) -> None:
    """Flatten the nested ``obj`` found at ``key`` (``formats.nesting.flatten``) into ``out``'s tables; its tensors
    go into ``tensors``.

    ``where`` names the file for messages. Values must be what the universal format stores (None, bool, int,
    float, str) and tensors dense; anything else raises ``UnsupportedStateError`` naming the file and the key.
    """
    flat = flatten(obj, key, where=where, dense_only=True)
    for k, t in flat.tensors.items():
        t = t.detach()
        out.tensors[k] = TensorInfo.whole(k, t.dtype, tuple(t.shape))
        tensors[k] = t
    out.values.update(flat.values)
    out.containers.update(flat.containers)


def add_parents(key: str, containers: dict[str, ContainerEntry]) -> None:
    """Record the dict containers above ``key`` that are not recorded yet (``a/b/c`` -> ``""``, ``a``, ``a/b``)."""
    parts = key.split("/") if key else []
    for i in range(len(parts)):
        parent = "/".join(parts[:i])
        if parent not in containers:
            containers[parent] = ContainerEntry(parent, "dict")


def is_bare_model(keys: Iterable[str], values: Mapping[str, Any]) -> bool:
    """Whether a checkpoint holds only tensors under ``model/`` (then it is written as a bare state dict)."""
    keys = list(keys)
    return bool(keys) and not values and all(k.startswith(MODEL_PREFIX) and "/" not in k[len(MODEL_PREFIX):]
                                            for k in keys)


def leaf_path(key: str, containers: Mapping[str, ContainerEntry], where: str = "") -> tuple[Any, ...]:
    """The nested path of ``key``: unescaped str components, ints for list/tuple items and int dict keys.

    A component that a list (or a dict's ``int_keys``) holds but is no integer raises ``CorruptCheckpointError``
    (``where`` names the checkpoint)."""
    path: list[Any] = []
    parent = ""
    for comp in key.split("/") if key else []:
        c = containers.get(parent)
        if c is not None and (c.type != "dict" or comp in c.int_keys):
            if not _INT.fullmatch(comp) or (c.type != "dict" and comp.startswith("-")):
                what = f"a {c.type}" if c.type != "dict" else "a dict whose int_keys list it"
                raise CorruptCheckpointError(
                    f"{where}{': ' if where else ''}key {key!r}: component {comp!r} lies in {what} (container {parent!r}), so it must be a "
                    "integer (non-negative in a list); the checkpoint's containers are inconsistent")
            path.append(int(comp))
        else:
            path.append(K.unescape(comp))
        parent = K.join(parent, comp)
    return tuple(path)
