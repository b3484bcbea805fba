"""Box arithmetic: n-dimensional boxes of a logical tensor (global offsets + sizes).

Pure functions on plain tuples; no torch, no I/O. The geometry of the universal format, below every layer that
cuts, plans or reads boxes: the reader (``formats.reader``), the writers' chunking (``split_bytes``), the planners
(``resharding``) and, through them, save and load.
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

    def subtract(self, other: "Box") -> list["Box"]:
        """This box minus ``other``: at most ``2 * ndim`` disjoint boxes (``[self]`` when they do not overlap).

        Peels the parts below and above the intersection one dim at a time, so the pieces tile the difference.
        """
        inter = self.intersect(other)
        if inter is None or inter.is_empty() or self.ndim == 0:
            return [] if (inter is not None and self.ndim == 0) else [self]
        out: list[Box] = []
        offs, sizes = list(self.offsets), list(self.sizes)
        for d in range(self.ndim):
            lo, hi = inter.offsets[d], inter.offsets[d] + inter.sizes[d]
            if lo > offs[d]:
                o, s = list(offs), list(sizes)
                s[d] = lo - offs[d]
                out.append(Box(tuple(o), tuple(s)))
            if hi < offs[d] + sizes[d]:
                o, s = list(offs), list(sizes)
                o[d], s[d] = hi, offs[d] + sizes[d] - hi
                out.append(Box(tuple(o), tuple(s)))
            offs[d], sizes[d] = lo, hi - lo
        return out

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


def split_bytes(box: Box, itemsize: int, max_bytes: int, at_least: int = 1) -> list[Box]:
    """``box`` split (``Box.split``) into parts of at most about ``max_bytes`` each, and at least ``at_least``
    parts: how every writer of the universal format cuts a large box into chunks."""
    nbytes = box.numel * itemsize
    parts = math.ceil(nbytes / max_bytes) if nbytes > max_bytes else 1
    return box.split(max(parts, at_least))


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

    Checks bounds, total volume and, when every box lies inside the shape, finds an element covered twice or not
    at all (``tiling_fault``: O(n log n) for boxes that differ along one dim, linear for more).
    """
    problems = []
    whole = Box.whole(shape)
    nonempty = [b for b in boxes if not b.is_empty()]
    outside = False
    for b in nonempty:
        if b.ndim != len(shape) or not whole.contains(b):
            outside = True
            problems.append(f"box offsets={list(b.offsets)} sizes={list(b.sizes)} lies outside shape {list(shape)}")
    if not outside:
        fault = tiling_fault([(b.offsets, b.sizes) for b in nonempty], tuple(shape))
        if fault is not None:
            problems.append(fault.describe([f"{list(b.offsets)}+{list(b.sizes)}" for b in nonempty]))
    total = sum(b.numel for b in nonempty) if shape else (1 if boxes else 0)
    if total != whole.numel:
        problems.append(f"boxes cover {total} elements, shape {list(shape)} has {whole.numel}")
    return problems


#: ``tiling_fault`` spends at most this many corner terms per box on average (plus ``_SMALL_TERMS``); a box that
#: ends inside ``k`` dims of the shape costs ``2**k`` terms, so this admits boxes split along up to 6 dims.
MAX_TERMS_PER_BOX = 64
_SMALL_TERMS = 1 << 16
#: Below this many boxes, too many corner terms fall back to comparing every pair of boxes.
_PAIRWISE_MAX_BOXES = 512


@dataclass(frozen=True)
class TilingFault:
    """Why boxes do not tile a shape exactly once: the element at ``point`` is covered ``count`` times
    (``covering``: indices of up to two boxes that cover it), or ``too_complex`` when the check would cost more
    than its bound (boxes split along more dims than any writer produces)."""

    point: tuple[int, ...] | None = ()
    count: int = 0
    covering: tuple[int, ...] = ()
    too_complex: bool = False

    def describe(self, labels: list[str], one: str = "box", noun: str = "boxes") -> str:
        """A message; ``labels[i]`` names box ``i`` (``one`` / ``noun``: what a box is called, singular / plural)."""
        if self.too_complex:
            return (f"the {len(labels)} {noun} are split along too many dims to check that they tile the tensor "
                    f"(more than {MAX_TERMS_PER_BOX} corner terms per box); no writer produces such a tiling")
        if self.count >= 2:
            a, b = self.covering[:2]
            return (f"{noun} {labels[a]} and {labels[b]} overlap (both cover the element at offsets "
                    f"{list(self.point)}); they must tile the tensor exactly once")
        where = "some element" if self.point is None else f"the element at offsets {list(self.point)}"
        return (f"no {one} covers {where}, a hole (so {noun} overlap elsewhere or are missing); {noun} must "
                "tile the tensor exactly once")


def tiling_fault(boxes: "list[tuple[tuple[int, ...], tuple[int, ...]]]", shape: tuple[int, ...]) -> TilingFault | None:
    """None when the boxes ``(offsets, sizes)``, each inside ``shape``, cover every element exactly once.

    Dims along which every non-empty box has the same extent cannot tell boxes apart and are dropped. Boxes that
    differ along one dim: sort and compare neighbours, O(n log n). Along more dims: the indicator function of a box
    is a signed sum of ``2**d`` orthant indicators at its corners; the boxes tile the shape exactly once iff their
    corner sums cancel to those of the shape, and the smallest corner left over is an element covered twice or
    not at all. That is linear in the boxes (``2**k`` terms for a box ending inside ``k`` dims), whatever their
    arrangement (a pairwise or sweep check is quadratic for staircase tilings), and bounded by
    ``MAX_TERMS_PER_BOX``.
    """
    live = [i for i, (_, s) in enumerate(boxes) if all(s)]
    if not shape:
        if len(live) == 1:
            return None
        return TilingFault((), len(live), tuple(live[:2]))
    if not live:
        return None if math.prod(shape) == 0 else TilingFault(tuple(0 for _ in shape), 0, ())
    o0, s0 = boxes[live[0]]
    dims = [d for d in range(len(shape)) if any(boxes[i][0][d] != o0[d] or boxes[i][1][d] != s0[d] for i in live)]
    base = list(o0)  # a witness's coordinates along the dropped dims: inside every box
    if not dims and len(live) > 1:  # identical boxes
        return TilingFault(tuple(o0), len(live), tuple(live[:2]))
    short = next((d for d in range(len(shape)) if d not in dims and s0[d] != shape[d]), None)
    if short is not None:  # every box misses the same part of this dim
        base[short] = o0[short] + s0[short] if o0[short] + s0[short] < shape[short] else o0[short] - 1
        return TilingFault(tuple(base), 0, ())
    if not dims:  # one box that spans the shape
        return None
    if len(dims) == 1:
        return _fault_1d(boxes, live, dims[0], shape, base)
    cost = 0
    for i in live:
        o, s = boxes[i]
        cost += 1 << sum(1 for d in dims if o[d] + s[d] < shape[d])
    if cost > MAX_TERMS_PER_BOX * len(live) + _SMALL_TERMS:
        if len(live) <= _PAIRWISE_MAX_BOXES:
            return _fault_pairwise(boxes, live, shape)
        return TilingFault(too_complex=True)
    acc: dict[tuple[int, ...], int] = {}
    get = acc.get
    for i in live:
        o, s = boxes[i]
        terms: list[tuple[tuple[int, ...], int]] = [((), 1)]
        for d in dims:
            a, b = o[d], o[d] + s[d]
            if b < shape[d]:
                terms = [(t + (a,), w) for t, w in terms] + [(t + (b,), -w) for t, w in terms]
            else:
                terms = [(t + (a,), w) for t, w in terms]
        for t, w in terms:
            acc[t] = get(t, 0) + w
    origin = tuple(0 for _ in dims)
    acc[origin] = get(origin, 0) - 1
    left = [c for c, w in acc.items() if w]
    if not left:
        return None
    corner = min(left)  # lexicographically smallest, so no other left-over corner lies below it in every dim:
    count = 1 + acc[corner]  # the coverage there is 1 + its weight
    for d, x in zip(dims, corner):
        base[d] = x
    point = tuple(base)
    return TilingFault(point, count, _covering(boxes, live, point))


def _fault_1d(boxes: "list[tuple[tuple[int, ...], tuple[int, ...]]]", live: list[int], d: int,
              shape: tuple[int, ...], base: list[int]) -> TilingFault | None:
    order = sorted(live, key=lambda i: boxes[i][0][d])
    end, prev = 0, -1
    for i in order:
        start = boxes[i][0][d]
        if start < end:
            base[d] = start
            return TilingFault(tuple(base), 2, (prev, i))
        if start > end:
            base[d] = end
            return TilingFault(tuple(base), 0, ())
        end, prev = start + boxes[i][1][d], i
    if end < shape[d]:
        base[d] = end
        return TilingFault(tuple(base), 0, ())
    return None


def _covering(boxes: "list[tuple[tuple[int, ...], tuple[int, ...]]]", live: list[int],
              point: tuple[int, ...]) -> tuple[int, ...]:
    hits = []
    for i in live:
        o, s = boxes[i]
        if all(a <= x < a + n for a, n, x in zip(o, s, point)):
            hits.append(i)
            if len(hits) == 2:
                break
    return tuple(hits)


def _fault_pairwise(boxes: "list[tuple[tuple[int, ...], tuple[int, ...]]]", live: list[int],
                    shape: tuple[int, ...]) -> TilingFault | None:
    """Few boxes in many dims: compare every pair (at most ``_PAIRWISE_MAX_BOXES ** 2 / 2``); with the volume
    checked by the caller, no overlap means an exact tiling."""
    for x, i in enumerate(live):
        oi, si = boxes[i]
        for j in live[x + 1:]:
            oj, sj = boxes[j]
            if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(oi, si, oj, sj)):
                return TilingFault(tuple(max(a, b) for a, b in zip(oi, oj)), 2, (i, j))
    if sum(math.prod(boxes[i][1]) for i in live) != math.prod(shape):
        return TilingFault(None, 0, ())  # disjoint, but too few elements: a hole somewhere
    return None


def flat_range_to_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The flat element range ``[start, stop)`` of a row-major ``shape`` array as boxes, in flat order.

    Each box is contiguous in row-major order (its dims before some dim ``d`` have size 1 and its dims after ``d``
    are full), there are at most ``2 * ndim - 1`` of them (one for a 0-d array), and together they cover the
    range exactly once. This is how a ZeRO flat-buffer fragment, which cuts a parameter at an arbitrary element,
    becomes boxes without padding or gathering.
    """
    numel = math.prod(shape)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"flat range [{start}, {stop}) is outside a {numel}-element array of shape {list(shape)}")
    if start == stop:
        return []
    if not shape:
        return [Box((), ())]
    return _range_boxes(tuple(shape), start, stop)


def _range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    # Invariant: 0 <= start < stop <= prod(shape), len(shape) >= 1.
    inner_shape = shape[1:]
    inner = math.prod(inner_shape)
    if not inner_shape:
        return [Box((start,), (stop - start,))]
    first, first_off = divmod(start, inner)
    last, last_off = divmod(stop, inner)

    def lift(row: int, boxes: list[Box]) -> list[Box]:
        return [Box((row,) + b.offsets, (1,) + b.sizes) for b in boxes]

    if first == last:  # inside one row: recurse into it
        return lift(first, _range_boxes(inner_shape, first_off, last_off))
    out: list[Box] = []
    if first_off:  # the tail of a partial first row
        out += lift(first, _range_boxes(inner_shape, first_off, inner))
        first += 1
    if last > first:  # whole rows
        out.append(Box((first,) + (0,) * len(inner_shape), (last - first,) + inner_shape))
    if last_off:  # the head of a partial last row
        out += lift(last, _range_boxes(inner_shape, 0, last_off))
    return out


def is_contiguous_box(shape: tuple[int, ...], box: Box) -> bool:
    """Whether ``box`` is one contiguous run of a row-major ``shape`` array."""
    if box.is_empty():
        return True
    d = 0
    while d < box.ndim and box.sizes[d] == 1:
        d += 1
    return all(box.offsets[k] == 0 and box.sizes[k] == shape[k] for k in range(d + 1, box.ndim))


def box_flat_start(shape: tuple[int, ...], box: Box) -> int:
    """Flat row-major index (in a ``shape`` array) of the first element of ``box``."""
    return sum(o * s for o, s in zip(box.offsets, row_major_strides(shape)))


def merge_rows(boxes: list[Box]) -> list[Box]:
    """Merge boxes that continue each other along dim 0 (same extent in every other dim) into fewer, taller ones.

    The union is unchanged; overlapping boxes are left as they are. Used by the offline reshard, where a rank's
    logical boxes (one per attention head of a fused QKV, for example) are read and written whole, so fewer and
    larger chunks mean fewer, longer I/Os.
    """
    out: list[Box] = []
    for b in sorted(boxes, key=lambda x: (x.offsets[1:], x.sizes[1:], x.offsets[:1])):
        last = out[-1] if out else None
        if (last is not None and b.ndim > 0 and last.offsets[1:] == b.offsets[1:] and last.sizes[1:] == b.sizes[1:]
                and last.offsets[0] + last.sizes[0] == b.offsets[0]):
            out[-1] = Box(last.offsets, (last.sizes[0] + b.sizes[0],) + last.sizes[1:])
        else:
            out.append(b)
    return out
