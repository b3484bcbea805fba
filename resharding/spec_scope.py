"""Values of a spec's names for one layout: model dims, ``let`` values, parallel sizes and rank coordinates.

Used by ``spec_params``, ``spec_zero`` and ``spec_layout``. Dims come from the caller (a mapping, or an object such
as ``megatron_ref.ModelConfig``); declared dims the caller does not give take their defaults, required ones raise.
Names the spec does not declare are ignored (a model config has fields, like ``seed``, that no layout reads).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Mapping

from ckpt.errors import SpecError
from resharding.grid import Coords, Grid
from spec_lang import Expr, Spec, spec_error

Number = int | Fraction


def resolve_dims(spec: Spec, dims: Mapping[str, Any] | Any) -> dict[str, int]:
    """Every declared dim of ``spec`` as an int: given values, else defaults; missing required dims raise."""
    given: dict[str, Any]
    if isinstance(dims, Mapping):
        given = dict(dims)
    elif dataclasses.is_dataclass(dims) and not isinstance(dims, type):
        given = dataclasses.asdict(dims)
    else:
        given = {d.name: getattr(dims, d.name) for d in spec.dims if hasattr(dims, d.name)}
    out: dict[str, int] = {}
    missing = []
    for d in spec.dims:
        if d.name in given:
            v = given[d.name]
            if isinstance(v, bool):
                v = int(v)
            if not isinstance(v, int):
                raise spec_error(d.where, "dims", f"dim {d.name!r} must be an integer", expected="an int or a bool",
                                 found=f"{type(v).__name__} {v!r}", fix="pass integer model dimensions")
            out[d.name] = v
        elif d.default is None:
            missing.append(d)
    if missing:
        raise spec_error(missing[0].where, "dims", "required model dims are missing: " + ", ".join(d.name for d in missing),
                         expected="a value for every dim declared 'required'", found="given: " + ", ".join(sorted(given)),
                         fix="pass them in the dims mapping (or the model config)")
    pending = {d.name: d.default for d in spec.dims if d.name not in out and d.default is not None}

    def lookup(name: str) -> Number | None:
        if name in out:
            return out[name]
        if name in pending:
            expr = pending.pop(name)
            out[name] = expr.evaluate_int(lookup, "dims", f"the default of dim {name!r}")
            return out[name]
        return None

    for name in list(pending):
        if name in pending:
            lookup(name)
    return out


class Scope:
    """Name lookup for one rank (or, without a grid, for the parallel-independent logical view)."""

    def __init__(self, spec: Spec, dims: dict[str, int], grid: Grid | None = None, coords: Coords | None = None,
                 extra: dict[str, Number] | None = None, _lets: dict[str, Number] | None = None) -> None:
        self.spec, self.dims, self.grid, self.coords = spec, dims, grid, coords
        self.extra = extra or {}
        self._let_exprs = {d.name: d.expr for d in spec.lets}
        self._lets: dict[str, Number] = {} if _lets is None else _lets

    def with_(self, **extra: Number) -> "Scope":
        """This scope plus local names (``r``, ``n``, ``ndim``, ``numel``); shares the cache of ``let`` values."""
        return Scope(self.spec, self.dims, self.grid, self.coords, {**self.extra, **extra}, self._lets)

    def __call__(self, name: str) -> Number | None:
        if name in self.extra:
            return self.extra[name]
        if name in self.dims:
            return self.dims[name]
        if name in self._let_exprs:
            if name not in self._lets:
                self._lets[name] = self._let_exprs[name].evaluate(self, "let")
            return self._lets[name]
        g, c = self.grid, self.coords
        if g is not None:
            sizes = {"tp": g.tp, "pp": g.pp, "dp": g.dp, "ep": g.ep, "edp": g.edp, "zero": g.zero}
            if name in sizes:
                return sizes[name]
        if c is not None:
            ranks = {"tp_rank": c.tp, "pp_rank": c.pp, "dp_rank": c.dp, "ep_rank": c.ep, "edp_rank": c.edp}
            if name in ranks:
                return ranks[name]
        return None

    def int(self, expr: Expr, rule: str | None, what: str) -> int:
        return expr.evaluate_int(self, rule, what)

    def true(self, expr: Expr | None, rule: str | None) -> bool:
        return True if expr is None else bool(expr.evaluate(self, rule))

    def for_rank(self, coords: Coords) -> "Scope":
        """The same layout seen from another rank (a fresh ``let`` cache: lets may read rank coordinates)."""
        return Scope(self.spec, self.dims, self.grid, coords)


def axis_rank(coords: Coords, axis: str) -> int:
    return {"tp": coords.tp, "pp": coords.pp, "dp": coords.dp, "ep": coords.ep, "edp": coords.edp}[axis]


def require(cond: bool, message: str) -> None:
    """Internal invariant (not user-caused): raise ``SpecError`` so callers see one error family."""
    if not cond:
        raise SpecError(f"internal layout invariant failed: {message}")
