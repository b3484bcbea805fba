"""Box arithmetic: n-dimensional boxes of a logical tensor (global offsets + sizes).

Pure functions on plain tuples; no torch, no I/O. Used by the planners and, through them, by save and load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """The half-open box ``[offsets[d], offsets[d] + sizes[d])`` in every dim ``d``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"Box{self!r}: offsets and sizes differ in length")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise ValueError(f"Box{self!r}: offsets and sizes must be non-negative")

    @staticmethod
    def whole(shape: tuple[int, ...]) -> "Box":
        return Box(tuple(0 for _ in shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def intersect(self, other: "Box") -> "Box | None":
        """The common box, or None when they do not overlap (or either is empty)."""
        if self.ndim != other.ndim:
            raise ValueError(f"cannot intersect a {self.ndim}-d box with a {other.ndim}-d box")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)):
            # 0-d boxes always intersect (both are the single element).
            return Box((), ()) if self.ndim == 0 else None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def contains(self, other: "Box") -> bool:
        return all(a <= b and b + s <= a + t for a, t, b, s in zip(self.offsets, self.sizes, other.offsets, other.sizes))

    def relative_to(self, outer: "Box") -> "Box":
        """This box in the coordinates of ``outer`` (which must contain it)."""
        return Box(tuple(a - b for a, b in zip(self.offsets, outer.offsets)), self.sizes)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def split(self, parts: int) -> list["Box"]:
        """Split into at most ``parts`` boxes, as evenly as possible, along the first dim longer than 1.

        Splitting the outermost dim keeps each part contiguous in a row-major tensor holding the box, so a
        writer needs no copy. Never produces empty parts.
        """
        d = next((i for i, s in enumerate(self.sizes) if s > 1), None)
        if parts <= 1 or d is None:
            return [self]
        n = self.sizes[d]
        parts = min(parts, n)
        out = []
        start = 0
        for i in range(parts):
            size = n // parts + (1 if i < n % parts else 0)
            offs = list(self.offsets)
            sizes = list(self.sizes)
            offs[d] += start
            sizes[d] = size
            out.append(Box(tuple(offs), tuple(sizes)))
            start += size
        return out


def row_major_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a contiguous row-major array of ``sizes``."""
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(sizes[d + 1], 1)
    return tuple(strides)


def flat_span(outer_sizes: tuple[int, ...], inner: Box) -> tuple[int, int]:
    """``[first, last + 1)`` flat element indices that ``inner`` touches inside a row-major ``outer_sizes`` array."""
    if inner.numel == 0:
        return (0, 0)
    strides = row_major_strides(outer_sizes)
    first = sum(o * s for o, s in zip(inner.offsets, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(inner.offsets, inner.sizes, strides))
    return first, last + 1


def boxes_tile(boxes: list[Box], shape: tuple[int, ...]) -> list[str]:
    """Problems with ``boxes`` as an exact tiling of ``shape`` (empty list when they tile it exactly once).

    Checks bounds, pairwise overlap and total volume; quadratic in the number of boxes of one tensor, which stays
    small (one per rank or chunk).
    """
    problems = []
    whole = Box.whole(shape)
    nonempty = [b for b in boxes if not b.is_empty()]
    for b in nonempty:
        if not whole.contains(b):
            problems.append(f"box offsets={list(b.offsets)} sizes={list(b.sizes)} lies outside shape {list(shape)}")
    for i in range(len(nonempty)):
        for j in range(i + 1, len(nonempty)):
            if nonempty[i].intersect(nonempty[j]) is not None:
                a, b = nonempty[i], nonempty[j]
                problems.append(f"boxes {list(a.offsets)}+{list(a.sizes)} and {list(b.offsets)}+{list(b.sizes)} overlap")
    total = sum(b.numel for b in nonempty) if shape else (1 if boxes else 0)
    if total != whole.numel:
        problems.append(f"boxes cover {total} elements, shape {list(shape)} has {whole.numel}")
    return problems
