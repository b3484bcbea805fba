"""Bind a spec layout to a rank's real tensors: logical-keyed ``TensorLayout``\\ s whose pieces are strided views.

Who calls it: ``ckpt.save``/``ckpt.load`` with ``spec=`` (one rank, its own tensors) and the offline converter
(every simulated rank of a layout). The pieces come from ``resharding.spec_layout.rank_layout``; this module only
turns each ``(storage_offset, sizes, strides)`` into a view of the local tensor, so the save and load paths that
already handle DTensor shards handle fused, padded, renumbered and ZeRO-flattened tensors unchanged.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ckpt.errors import ShardMismatchError, SpecError
from formats.box import Box
from resharding.layout import LocalPiece, TensorLayout, tensor_layout
from resharding.spec_apply import piece_view
from resharding.spec_layout import (REPLICATED, AVERAGED, RankLayout, check_against, logical_shapes,
                                    rank_layout)
from spec_lang import SHIPPED, Spec, load_spec, shipped_spec
from spec_lang.shipped import ALIASES

PARALLEL_KEYS = ("tp", "pp", "dp", "ep", "zero")


def resolve_spec(spec: "Spec | str | os.PathLike[str]") -> Spec:
    """A ``Spec``, a shipped spec's name (``gpt``, ``llama``, ``mixtral``), a YAML file path, or YAML text."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str) and (spec in SHIPPED or spec in ALIASES):
        return shipped_spec(spec)
    return load_spec(spec)


def parse_parallel(parallel: "str | Mapping[str, Any]") -> dict[str, Any]:
    """``"tp=2,pp=4,dp=1[,ep=..][,zero=..][,order=tp-ep-dp-pp]"`` or a mapping -> a full parallel mapping.

    Missing sizes default to 1 (``zero`` to 0); unknown names raise ``SpecError`` naming them.
    """
    if isinstance(parallel, str):
        items: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in parallel.split(","))):
            m = re.fullmatch(r"([a-z_]+)=([A-Za-z0-9_-]+)", part)
            if not m:
                raise SpecError(f"parallel layout {parallel!r}: cannot read {part!r}; expected NAME=VALUE, "
                                "e.g. tp=2,pp=4,dp=1")
            items[m.group(1)] = m.group(2)
    else:
        items = dict(parallel)
    unknown = sorted(set(items) - set(PARALLEL_KEYS) - {"order"})
    if unknown:
        raise SpecError(f"parallel layout {parallel!r}: unknown name(s) {unknown}; known: {list(PARALLEL_KEYS)} "
                        "and order")
    out: dict[str, Any] = {}
    for k in PARALLEL_KEYS:
        v = items.get(k, 0 if k == "zero" else 1)
        try:
            out[k] = int(v)
        except (TypeError, ValueError):
            raise SpecError(f"parallel layout {parallel!r}: {k}={v!r} is not an integer") from None
        if out[k] < (0 if k == "zero" else 1):
            raise SpecError(f"parallel layout {parallel!r}: {k}={out[k]} is out of range")
    if "order" in items:
        out["order"] = str(items["order"])
    return out


def world_size_of(parallel: Mapping[str, Any]) -> int:
    return int(parallel["tp"]) * int(parallel["pp"]) * int(parallel["dp"])


@dataclass(frozen=True)
class SpecBinding:
    """A spec with the model dims and the parallel layout it is applied under: everything ``rank_layout`` needs.

    The manifest stores it (``layout["spec"]``), so a checkpoint carries the description of how it was saved and
    ``ckpt reshard`` needs only the target layout.
    """

    spec: Spec
    dims: dict[str, Any]
    parallel: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "dims": dict(self.dims), "parallel": dict(self.parallel)}

    @staticmethod
    def from_json_dict(doc: Mapping[str, Any], where: str) -> "SpecBinding":
        try:
            return SpecBinding(Spec.from_json(doc["spec"]), dict(doc["dims"]), parse_parallel(doc["parallel"]))
        except (KeyError, TypeError) as e:
            raise SpecError(f"{where}: the manifest's layout.spec is malformed ({e!r}); expected spec, dims and "
                            "parallel") from e

    def with_parallel(self, parallel: "str | Mapping[str, Any]") -> "SpecBinding":
        return SpecBinding(self.spec, self.dims, parse_parallel(parallel))

    @property
    def world_size(self) -> int:
        return world_size_of(self.parallel)

    def _key(self) -> tuple[Any, ...]:
        return (self.spec, tuple(sorted(self.dims.items())), tuple(sorted(self.parallel.items())))

    def rank_layout(self, rank: int, local_shapes: Mapping[str, tuple[int, ...]] | None = None) -> RankLayout:
        """``rank``'s layout (cached); with ``local_shapes``, also checked against the rank's real state."""
        rl = _rank_layout(self._key(), rank)
        if local_shapes is not None:
            check_against(self.spec, rl, local_shapes)
        return rl

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Logical key -> shape (cached; do not modify the returned dict)."""
        return _logical_shapes(self.spec, self._key()[1])


@functools.lru_cache(maxsize=512)
def _rank_layout(key: tuple[Any, ...], rank: int) -> RankLayout:
    spec, dims, parallel = key
    return rank_layout(spec, dict(dims), dict(parallel), rank)


@functools.lru_cache(maxsize=64)
def _logical_shapes(spec: Spec, dims: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    return logical_shapes(spec, dict(dims))


def bind_tensors(tensors: Mapping[str, torch.Tensor], rl: RankLayout, shapes: Mapping[str, tuple[int, ...]],
                 spec: Spec, *, for_save: bool) -> dict[str, TensorLayout]:
    """Logical key -> ``TensorLayout`` over this rank's ``tensors`` (flattened local key -> tensor).

    For saving, pieces of a flat (ZeRO) buffer are dropped when the same logical key also has pieces from an
    ordinary rule on this rank: under ZeRO-1/2 the fp32 master partitions are replicas of the model weights the
    rank already holds whole, and offering both would overlap. Loading fills both.
    """
    kinds = {s.match: s.kind for s in spec.state}
    pieces: dict[str, list[tuple[LocalPiece, bool]]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for lt in rl:
        t = tensors[lt.key]
        if tuple(t.shape) != lt.shape:
            raise ShardMismatchError(f"local key {lt.key!r}: the spec expects shape {list(lt.shape)}, the state "
                                     f"holds {list(t.shape)}")
        if not t.is_contiguous():
            raise ShardMismatchError(f"local key {lt.key!r}: a spec-described tensor must be contiguous "
                                     f"(strides {list(t.stride())})")
        flat = kinds.get(lt.rule) == "flat"
        for p in lt.pieces:
            if dtypes.setdefault(p.logical_key, t.dtype) != t.dtype:
                raise ShardMismatchError(f"logical key {p.logical_key!r}: local tensors of dtypes "
                                         f"{dtypes[p.logical_key]} and {t.dtype} (local key {lt.key!r}) hold it")
            view = piece_view(t, p)
            piece = LocalPiece(tuple(0 for _ in p.sizes), Box(p.logical_offsets, p.sizes), source=view)
            pieces.setdefault(p.logical_key, []).append((piece, flat))
    out: dict[str, TensorLayout] = {}
    for key, flagged in pieces.items():
        if key not in shapes:
            raise SpecError(f"logical key {key!r}: spec '{spec.name}' gives it no shape")
        if for_save and not all(flat for _, flat in flagged):
            flagged = [(p, flat) for p, flat in flagged if not flat]
        if for_save:  # a rank may hold a box twice (a tied weight on one stage): offer it once
            seen: dict[Box, LocalPiece] = {}
            for p, _ in flagged:
                seen.setdefault(p.global_box, p)
            uniq = tuple(seen.values())
        else:  # every local copy is filled
            uniq = tuple(p for p, _ in flagged)
        out[key] = TensorLayout(tuple(shapes[key]), uniq[0].source, uniq, None)  # type: ignore[arg-type]
    return out


def local_layouts(tensors: Mapping[str, torch.Tensor], binding: SpecBinding | None, rank: int, *, for_save: bool
                  ) -> tuple[dict[str, TensorLayout], RankLayout | None]:
    """Logical key -> layout of one rank's tensors (flattened key -> tensor): from a spec binding for the keys it
    describes, from the tensor itself (plain or DTensor) for every other key but the spec's ``inert`` ones."""
    if binding is None:
        return {k: tensor_layout(t) for k, t in tensors.items()}, None
    rl = binding.rank_layout(rank, {k: tuple(t.shape) for k, t in tensors.items()})
    layouts = bind_tensors(tensors, rl, binding.logical_shapes(), binding.spec, for_save=for_save)
    for k, t in tensors.items():
        if k not in rl:
            if binding.spec.is_inert(k):
                continue  # framework metadata the spec lists as inert (TE's _extra_state): neither saved nor loaded
            if k in layouts:
                raise ShardMismatchError(f"key {k!r} is both a logical key of spec '{binding.spec.name}' and a plain "
                                         "key of the state; rename one")
            layouts[k] = tensor_layout(t)
    return layouts, rl


def replica_policies(rl: RankLayout) -> dict[tuple[str, Box], str]:
    """(logical key, box) -> ``replicated`` or ``averaged`` for the pieces other ranks also hold."""
    out: dict[tuple[str, Box], str] = {}
    for lt in rl:
        for p in lt.pieces:
            if p.policy in (REPLICATED, AVERAGED):
                out[(p.logical_key, p.box)] = p.policy
    return out
