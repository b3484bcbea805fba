"""``diff``: compare two checkpoints of any supported formats key by key.

Reports keys only one side holds, tensor/value mismatches, dtype and shape differences, and value differences (the
number of differing elements and the largest absolute difference). Tensors are read one key at a time from each
side and compared in slices of ``SLICE_ELEMENTS`` elements, so memory stays about two tensors.

Equality: with ``atol == rtol == 0`` (the default) tensors must be bit-identical (a NaN equals a NaN with the same
bits; ``0.0`` and ``-0.0`` differ). With a tolerance, elements are equal when ``|a - b| <= atol + rtol * |b|``
(computed in float64; NaNs equal NaNs). Float values use the same rule; other values compare with ``==``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from formats.foreign.source import Source

SLICE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Difference:
    key: str
    #: ``only_in_a``, ``only_in_b``, ``kind`` (tensor vs value), ``dtype``, ``shape``, ``value``.
    kind: str
    detail: str
    max_abs_diff: float | None = None
    mismatched: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["max_abs_diff"] is not None and not math.isfinite(d["max_abs_diff"]):
            d["max_abs_diff"] = repr(d["max_abs_diff"])  # JSON has no nan/inf
        return d


@dataclass
class DiffReport:
    a: str
    b: str
    a_format: str
    b_format: str
    atol: float
    rtol: float
    keys_compared: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "a_format": self.a_format, "b_format": self.b_format, "atol": self.atol,
                "rtol": self.rtol, "equal": self.equal, "keys_compared": self.keys_compared,
                "differences": [d.to_json() for d in self.differences]}


def _describe(src: Source, key: str) -> str:
    if key in src.tensors:
        t = src.tensors[key]
        return f"tensor {str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    return f"value {src.values[key]!r}"[:80]


def diff(a: Source, b: Source, *, atol: float = 0.0, rtol: float = 0.0,
         progress: Callable[[int], None] | None = None) -> DiffReport:
    """Compare ``a`` and ``b`` key by key. ``progress(nbytes)`` after each tensor pair."""
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol={atol}, rtol={rtol}: tolerances must be >= 0")
    report = DiffReport(a.path, b.path, a.format, b.format, atol, rtol)
    keys_a = set(a.tensors) | set(a.values)
    keys_b = set(b.tensors) | set(b.values)
    out = report.differences
    for key in sorted(keys_a | keys_b):
        if key not in keys_b:
            out.append(Difference(key, "only_in_a", f"only in A ({_describe(a, key)})"))
            continue
        if key not in keys_a:
            out.append(Difference(key, "only_in_b", f"only in B ({_describe(b, key)})"))
            continue
        report.keys_compared += 1
        ta, tb = key in a.tensors, key in b.tensors
        if ta != tb:
            out.append(Difference(key, "kind", f"{_describe(a, key)} in A, {_describe(b, key)} in B"))
        elif not ta:
            d = _compare_values(key, a.values[key], b.values[key], atol, rtol)
            if d is not None:
                out.append(d)
        else:
            d = _compare_tensors(key, a, b, atol, rtol)
            if d is not None:
                out.append(d)
            if progress is not None:
                progress(a.tensors[key].nbytes + b.tensors[key].nbytes)
    return report


def _compare_values(key: str, va: Any, vb: Any, atol: float, rtol: float) -> Difference | None:
    if isinstance(va, float) and isinstance(vb, float):
        if (math.isnan(va) and math.isnan(vb)) or va == vb or (
                (atol or rtol) and abs(va - vb) <= atol + rtol * abs(vb)):
            return None
        return Difference(key, "value", f"values differ: {va!r} in A, {vb!r} in B", abs(va - vb), 1)
    if type(va) is type(vb) and va == vb:
        return None
    return Difference(key, "value", f"values differ: {va!r} in A, {vb!r} in B"[:300])


def _compare_tensors(key: str, a: Source, b: Source, atol: float, rtol: float) -> Difference | None:
    ia, ib = a.tensors[key], b.tensors[key]
    if ia.shape != ib.shape:
        return Difference(key, "shape", f"shape {list(ia.shape)} in A, {list(ib.shape)} in B")
    x, y = a.read(key), b.read(key)
    if not (_has_arithmetic(ia.dtype) and _has_arithmetic(ib.dtype)):
        return _compare_bits(key, ia, ib, x, y)
    if ia.dtype != ib.dtype:
        mx, n = _value_diff(x, y, 0.0, 0.0)
        return Difference(key, "dtype", f"dtype {str(ia.dtype).replace('torch.', '')} in A, "
                                        f"{str(ib.dtype).replace('torch.', '')} in B (max |a-b| {mx:.6g} as float64)",
                          mx, n)
    exact = atol == 0 and rtol == 0
    if exact and _bitwise_equal(x, y):
        return None
    mx, n = _value_diff(x, y, atol, rtol)
    if n == 0 and not exact:
        return None
    if n == 0:  # numerically equal but different bits: -0.0 vs 0.0, or NaN payloads
        return Difference(key, "value", "values are numerically equal but their bits differ (signed zeros or NaN "
                                        "payloads)", 0.0, 0)
    return Difference(key, "value", f"values differ at {n} of {ia.numel} elements, max |a-b| {mx:.6g}"
                                    + (f" (atol {atol}, rtol {rtol})" if not exact else ""), mx, n)


@functools.lru_cache(maxsize=None)
def _has_arithmetic(dtype: torch.dtype) -> bool:
    """Whether torch can widen ``dtype`` to float64 (packed sub-byte dtypes such as ``float4_e2m1fn_x2`` cannot)."""
    try:
        torch.zeros(2, dtype=dtype).to(torch.float64 if not dtype.is_complex else torch.complex128)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return True


def _compare_bits(key: str, ia: Any, ib: Any, x: torch.Tensor, y: torch.Tensor) -> Difference | None:
    """Compare tensors of a dtype without arithmetic by their bytes: equal or not, and how many bytes differ."""
    if ia.dtype != ib.dtype:
        return Difference(key, "dtype", f"dtype {str(ia.dtype).replace('torch.', '')} in A, "
                                        f"{str(ib.dtype).replace('torch.', '')} in B (no numeric comparison: torch "
                                        "has no arithmetic for one of them)")
    if _bitwise_equal(x, y):
        return None
    bx, by = _flat_bytes(x), _flat_bytes(y)
    n = sum(int((bx[s:s + SLICE_ELEMENTS] != by[s:s + SLICE_ELEMENTS]).sum()) for s in range(0, bx.numel(), SLICE_ELEMENTS))
    return Difference(key, "value", f"bytes differ at {n} of {bx.numel()} bytes (dtype "
                                    f"{str(ia.dtype).replace('torch.', '')} has no arithmetic: compared bit for bit, "
                                    "tolerances do not apply)", None, n)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    return torch.equal(_flat_bytes(x), _flat_bytes(y))


def _wide(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    if t.dtype == torch.bool:
        return t.to(torch.int64).to(torch.float64)
    return t.to(torch.float64)


def _value_diff(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> tuple[float, int]:
    """(largest |x - y| ignoring positions where both are NaN, count of elements outside the tolerance)."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    worst, count = 0.0, 0
    for s in range(0, fx.numel(), SLICE_ELEMENTS):
        a, b = _wide(fx[s:s + SLICE_ELEMENTS]), _wide(fy[s:s + SLICE_ELEMENTS])
        both_nan = torch.isnan(a) & torch.isnan(b)
        d = (a - b).abs()
        d = torch.where(both_nan, torch.zeros_like(d), d)
        bad = ~(d <= atol + rtol * b.abs())  # NaN on one side only: never within tolerance
        bad &= ~both_nan
        count += int(bad.sum())
        if d.numel():
            m = float(torch.nan_to_num(d, nan=math.inf).max())
            worst = max(worst, m)
    return worst, count
