"""The compiled spec: frozen dataclasses of plain data, hashable, serialisable to JSON and back.

``load_spec`` builds these after validation; the resharding engine (``resharding.spec_layout``) reads them. A
``Spec`` goes into checkpoint manifests as ``Spec.to_json()`` and comes back with ``Spec.from_json``; decoding is
strict (an unknown type tag or field raises ``SpecError``), as every manifest entry is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Union

from ckpt.errors import SpecError
from spec_lang.expr import Expr
from spec_lang.patterns import Pattern
from spec_lang.where import Where

SPEC_VERSION = 1
#: Parallel sizes an expression may read, and the rank coordinates (``*_rank``) of the rank being laid out.
PARALLEL_SIZES = ("tp", "pp", "dp", "ep", "edp", "zero")
RANK_NAMES = ("tp_rank", "pp_rank", "dp_rank", "ep_rank", "edp_rank")
#: Axes a layer/expert index can be spread over, and axes a ZeRO bucket can be partitioned over.
INDEX_AXES = ("pp", "ep", "tp", "dp", "edp")
BUCKET_AXES = ("dp", "edp")
POLICIES = ("replicated", "averaged")


@dataclass(frozen=True)
class DimDecl:
    """A model dimension: required (``default`` None) or defaulted by an expression over other dims."""

    name: str
    default: Expr | None
    where: Where


@dataclass(frozen=True)
class LetDecl:
    """A derived value (``let:``), evaluated lazily with dims, parallel sizes and rank coordinates."""

    name: str
    expr: Expr
    where: Where


@dataclass(frozen=True)
class IndexDecl:
    """Placeholder ``{name}``: a local index over ``split(count, <over size>)``; ``{global_name}`` is global."""

    name: str
    global_name: str
    count: Expr
    over: str
    where: Where


@dataclass(frozen=True)
class Replicated:
    """The local tensor is the whole logical tensor on every TP rank: verified equal, or averaged."""

    policy: str
    where: Where


@dataclass(frozen=True)
class Shard:
    """Split along ``dim`` over TP in units of ``unit``; per-rank unit counts from ``widths`` (a list with one entry
    per TP rank, or an expression in ``r``), default ``split``. With ``pad_to`` the split covers ``pad_to`` units and
    units at or past the logical size are padding."""

    dim: int
    unit: Expr
    widths: tuple[Expr, ...] | None
    widths_expr: Expr | None
    pad_to: Expr | None
    where: Where
    #: Where ``widths`` is written (the list or the expression), for errors found once dims are known.
    widths_where: Where | None = None


@dataclass(frozen=True)
class FusedPart:
    logical: str
    shape: tuple[Expr, ...]
    where: Where


@dataclass(frozen=True)
class Fused:
    """Several logical tensors concatenated along ``dim`` inside each TP slice.

    Without ``groups`` every part is split over TP on its own and the rank's slices are concatenated in part order
    (SwiGLU gate/up). With ``groups`` the first part drives the split; the rank holds the groups its slice touches
    and lays them out group by group, each group's share of every part in part order (mcore's grouped QKV).
    """

    dim: int
    unit: Expr
    groups: Expr | None
    parts: tuple[FusedPart, ...]
    where: Where


@dataclass(frozen=True)
class Tied:
    """When ``when`` holds, the rule's logical tensor is ``to`` (another rule's), stored once."""

    to: str
    when: Expr
    where: Where


Construct = Union[Replicated, Shard, Fused]


@dataclass(frozen=True)
class ParamRule:
    """How the rank-local parameter(s) named by ``pattern`` hold logical tensors."""

    name: str
    pattern: Pattern
    when: Expr | None
    logical: str | None
    shape: tuple[Expr, ...] | None
    construct: Construct
    tied: Tied | None
    bucket: str
    where: Where


@dataclass(frozen=True)
class StateRule:
    """Rank-local state keys: ``kind`` ``param`` (one key per local parameter, ``{param}``) or ``flat`` (one key per
    ZeRO bucket and group, ``{bucket}``/``{group}``). ``to`` makes the logical key from ``{logical}``."""

    match: str
    pattern: Pattern
    when: Expr | None
    kind: str
    to: str
    scalar: bool
    where: Where


@dataclass(frozen=True)
class Bucket:
    name: str
    over: str
    where: Where


@dataclass(frozen=True)
class Group:
    name: str
    when: Expr
    where: Where


@dataclass(frozen=True)
class ZeroSpec:
    """Flat-partition layout: buckets (what DP group partitions them), groups (first match wins) and padding."""

    multiple: Expr
    groups: tuple[Group, ...]
    buckets: tuple[Bucket, ...]
    where: Where | None


@dataclass(frozen=True)
class InertRule:
    """A local key the framework writes beside a parameter that holds no model state (Transformer Engine's
    ``_extra_state``): accepted and ignored when read; an export writes one wherever the parameter rule named
    ``beside`` is on the rank, with the same index values."""

    name: str
    pattern: Pattern
    beside: str
    where: Where


@dataclass(frozen=True)
class PlainRule:
    """Keys of non-tensor values (plain JSON), listed so ``check`` knows them."""

    match: str
    pattern: Pattern
    where: Where


@dataclass(frozen=True)
class Spec:
    """A compiled, validated spec. Pure data: equal specs compare and hash equal."""

    name: str
    version: int
    description: str
    file: str
    dims: tuple[DimDecl, ...]
    lets: tuple[LetDecl, ...]
    indices: tuple[IndexDecl, ...]
    params: tuple[ParamRule, ...]
    state: tuple[StateRule, ...]
    zero: ZeroSpec
    plain: tuple[PlainRule, ...]
    source: str
    inert: tuple[InertRule, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): what a manifest stores."""
        return json.dumps(_encode(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "Spec":
        """Invert ``to_json``; raises ``SpecError`` on anything it does not know."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpecError(f"spec JSON is not valid JSON: {e}") from e
        spec = _decode(data)
        if not isinstance(spec, Spec):
            raise SpecError(f"spec JSON holds a {type(spec).__name__}, expected a Spec")
        if spec.version != SPEC_VERSION:
            raise SpecError(f"spec JSON has version {spec.version}; this reader knows version {SPEC_VERSION}")
        return spec

    def digest(self) -> str:
        """sha256 of the canonical JSON, for comparing specs across checkpoints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def param_rule(self, name: str) -> ParamRule:
        for r in self.params:
            if r.name == name:
                return r
        raise KeyError(name)

    def restricted_to(self, tops: "set[str]") -> "Spec":
        """This spec with only the state and plain rules whose keys begin with a component in ``tops`` (e.g.
        ``{"model", "iteration"}`` for model-only state: files saved without optimizer)."""
        def keep(text: str) -> bool:
            return text.split("/", 1)[0] in tops
        return dataclasses.replace(self, state=tuple(s for s in self.state if keep(s.match)),
                                   plain=tuple(p for p in self.plain if keep(p.match)))

    def is_inert(self, key: str) -> bool:
        """Whether ``key`` (a flattened local state key) is one of the ``inert`` entries: a state rule's
        ``{param}`` that an inert rule names (read and ignored)."""
        if not self.inert:
            return False
        for s in self.state:
            m = s.pattern.match(key) if s.kind != "flat" else None
            if m is not None and any(r.pattern.match(m["param"]) is not None for r in self.inert):
                return True
        return False

    def index(self, name: str) -> IndexDecl:
        for ix in self.indices:
            if ix.name == name:
                return ix
        raise KeyError(name)


_TYPES: dict[str, type] = {c.__name__: c for c in (
    Where, Expr, Pattern, DimDecl, LetDecl, IndexDecl, Replicated, Shard, FusedPart, Fused, Tied, ParamRule,
    StateRule, Bucket, Group, ZeroSpec, PlainRule, InertRule, Spec)}


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue  # a defaulted field left at its default: the JSON (and digest) of older specs is unchanged
            out[f.name] = _encode(value)
        return out
    if isinstance(obj, (tuple, list)):
        return [_encode(x) for x in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} in a spec")


def _decode(data: Any) -> Any:
    if isinstance(data, list):
        return tuple(_decode(x) for x in data)
    if isinstance(data, dict):
        tname = data.get("type")
        cls = _TYPES.get(tname) if isinstance(tname, str) else None
        if cls is None:
            raise SpecError(f"spec JSON: unknown entry type {tname!r}; known: {', '.join(sorted(_TYPES))}")
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        given = set(data) - {"type"}
        if not (names - optional) <= given <= names:
            raise SpecError(f"spec JSON: {tname} has fields {sorted(given)}, expected {sorted(names)}")
        return cls(**{k: _decode(v) for k, v in data.items() if k != "type"})
    if data is None or isinstance(data, (str, int, bool)):
        return data
    raise SpecError(f"spec JSON: unexpected value {data!r}")
