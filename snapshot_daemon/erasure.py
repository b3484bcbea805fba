"""Erasure coding of snapshot shards: systematic, MDS Reed-Solomon over GF(2^8) with a Cauchy matrix.

``Codec(k, m)`` turns k equal-length data buffers into m parity buffers such that any k of the k + m shards give
the data back bit for bit (``decode``). The parity matrix has row 0 and column 0 all ones, so m = 1 is plain XOR;
every square submatrix of it is nonsingular, so the code is MDS (see ``cauchy_matrix``; docs/erasure.md).

Speed comes from the bit-matrix form (Blomer et al., 1995; Plank's Jerasure). Each shard is cut into blocks of 8
packets; packet c of a block holds "bit c" of that block's virtual symbols. Multiplying by a field element e is
then an 8 x 8 matrix over GF(2), so every parity packet is an XOR of whole data packets: numpy runs those at
memory speed. The XORs of one encode (or of one erasure pattern's decode) are planned once: a greedy common
subexpression pass (Paar, 1997) computes XORs shared by several output rows only once, which cuts a (4, 2)
encode's XOR count by about a third and a dense decode's by about a half. Blocks are sized so a block's packets of
all shards stay in the L2 cache. A shard length that is not a whole number of blocks ends in one smaller block of
8 packets and then, for the last ``length % 8`` bytes, plain byte-wise GF(2^8) arithmetic. Each region is an MDS
code of its own over the same shard indices, so the whole is one.

The field is GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11d, generator 2), the polynomial of ``reedsolo``,
which the tests use as the reference oracle for the arithmetic and the matrix inverse.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from ckpt.errors import ErasureCodingError

__all__ = ["Codec", "packet_bytes", "gf_mul", "gf_inv", "gf_matrix_inverse", "cauchy_matrix", "PRIMITIVE_POLY"]

PRIMITIVE_POLY = 0x11D
#: The block layout is part of the code (encode and every decode must cut shards alike), so the packet size
#: depends on (k, m) only: the largest power of two from 4 KiB to 64 KiB such that a block of every shard
#: (8 (k + m) packets) fits in ``CACHE_BYTES``, about one core's L2 here. Planned temporaries come on top; the
#: L3 catches them. Larger packets make each numpy call's ~1 us overhead a smaller share.
CACHE_BYTES = 2 * 1024 * 1024
MIN_PACKET_BYTES = 4 * 1024
MAX_PACKET_BYTES = 64 * 1024
#: Largest GF(2) matrix (targets x sources, in bits) the XOR planner optimises; wider ones run unplanned.
MAX_PLANNED_BITS = 32 * 128


def packet_bytes(k: int, m: int) -> int:
    """Bytes per packet of a (k, m) code's blocks (a block is 8 packets of each shard)."""
    p = MAX_PACKET_BYTES
    while p > MIN_PACKET_BYTES and 8 * (k + m) * p > CACHE_BYTES:
        p //= 2
    return p


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= PRIMITIVE_POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


_EXP, _LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two elements of GF(2^8)."""
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a nonzero element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _EXP[255 - _LOG[a]]


def gf_matrix_inverse(matrix: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(2^8) by Gauss-Jordan elimination; ``ValueError`` if singular."""
    n = len(matrix)
    a = [list(row) + [1 if i == j else 0 for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            raise ValueError("singular matrix")
        a[col], a[pivot] = a[pivot], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(v, inv) for v in a[col]]
        for r in range(n):
            f = a[r][col]
            if r != col and f:
                a[r] = [v ^ gf_mul(f, p) for v, p in zip(a[r], a[col])]
    return [row[n:] for row in a]


def _normalised_cauchy(xs: Sequence[int], ys: Sequence[int]) -> list[list[int]]:
    """``1 / (x_i + y_j)`` (distinct points, so every square submatrix is nonsingular), columns then rows
    scaled so that row 0 and column 0 are all ones; scaling keeps every square submatrix nonsingular."""
    c = [[gf_inv(x ^ y) for y in ys] for x in xs]
    for j in range(len(ys)):
        s = gf_inv(c[0][j])
        for row in c:
            row[j] = gf_mul(row[j], s)
    for i in range(1, len(xs)):
        s = gf_inv(c[i][0])
        c[i] = [gf_mul(v, s) for v in c[i]]
    return c


#: How many Cauchy point sets the m >= 3 search scores. Part of the code's definition (peers must agree).
CAUCHY_CANDIDATES = 256


@functools.lru_cache(maxsize=64)
def _parity_matrix(k: int, m: int) -> tuple[tuple[int, ...], ...]:
    if m == 1:
        return ((1,) * k,)
    if m == 2:
        # [1 ... 1; a_0 ... a_k-1]: every 1 x 1 minor is nonzero and every 2 x 2 minor is a_i + a_j, nonzero for
        # distinct a's, so the code is MDS; the a's are the k elements with the sparsest bit matrices (1 first),
        # which cuts a (4, 2) encode from 72 planned XORs (plain Cauchy) to 55.
        row = sorted(range(1, 256), key=lambda e: (_ONES[e], e))[:k]
        return ((1,) * k, tuple(row))
    # m >= 3: a deterministic search over normalised Cauchy matrices for the fewest ones in the bit matrices
    # (Plank and Xu's observation that the choice of points changes the XOR count by tens of percent).
    best, best_ones = None, None
    state = 0x9E3779B9 ^ (k << 8) ^ m
    points = list(range(256))
    for trial in range(CAUCHY_CANDIDATES):
        if trial:
            for i in range(255, 0, -1):  # Fisher-Yates with a 32-bit LCG: the same on every machine
                state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
                j = state % (i + 1)
                points[i], points[j] = points[j], points[i]
        c = _normalised_cauchy(points[:m], points[m : m + k])
        ones = sum(_ONES[e] for row in c for e in row)
        if best_ones is None or ones < best_ones:
            best, best_ones = c, ones
    assert best is not None
    return tuple(tuple(row) for row in best)


def cauchy_matrix(k: int, m: int) -> list[list[int]]:
    """The m x k parity part of the generator, row 0 and column 0 all ones (so m = 1 is XOR). m = 2: ones over k
    distinct elements; m >= 3: the normalised Cauchy matrix with the sparsest bit matrices among
    ``CAUCHY_CANDIDATES`` point sets. Every square submatrix is nonsingular, so the code is MDS."""
    return [list(row) for row in _parity_matrix(k, m)]


def _bit_matrix(e: int) -> np.ndarray:
    """The 8 x 8 GF(2) matrix of multiplication by ``e``: column c holds the bits of ``e * 2^c``."""
    out = np.zeros((8, 8), dtype=np.uint8)
    for c in range(8):
        v = gf_mul(e, 1 << c)
        for r in range(8):
            out[r, c] = (v >> r) & 1
    return out


_ONES = [0] + [int(_bit_matrix(e).sum()) for e in range(1, 256)]


def _expand(coeffs: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows of GF(2^8) coefficients -> the (8 rows) x (8 cols) GF(2) matrix acting on packets."""
    return np.block([[_bit_matrix(e) for e in row] for row in coeffs]).astype(np.uint8)


@functools.lru_cache(maxsize=256)
def _plan(matrix_bytes: bytes, rows: int, cols: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """The XORs computing ``rows`` target packets from ``cols`` source packets by the GF(2) matrix given as bytes.

    Returns (ops, temporaries). Index space: sources 0..cols-1, temporaries cols..cols+T-1, targets after. An op
    (dst, a, b) means ``x[dst] = x[a] ^ x[b]``; b = -1 means ``x[dst] = x[a]``; a = -1 means ``x[dst] = 0``.
    Greedy: while some pair of columns occurs together in two or more rows, the most frequent pair becomes a
    temporary, substituted in those rows (Paar's algorithm)."""
    b = np.frombuffer(matrix_bytes, dtype=np.uint8).reshape(rows, cols).astype(np.int32)
    ops: list[tuple[int, int, int]] = []
    n = cols
    # Each greedy step costs a (cols x cols) product; past 16 sources x 4 targets the plan would take seconds,
    # so such wide codes XOR row by row (they are far from the (4, 2)..(12, 4) a job uses).
    while rows * cols <= MAX_PLANNED_BITS:
        q = b.T @ b
        np.fill_diagonal(q, 0)
        flat = int(np.argmax(q))
        i, j = divmod(flat, q.shape[1])
        if q[i, j] < 2:
            break
        both = (b[:, i] == 1) & (b[:, j] == 1)
        new = both.astype(np.int32)
        b[both, i] = 0
        b[both, j] = 0
        b = np.concatenate([b, new[:, None]], axis=1)
        ops.append((n, i, j))
        n += 1
    temps = n - cols
    for r in range(rows):
        dst = n + r
        ones = np.flatnonzero(b[r]).tolist()
        if not ones:
            ops.append((dst, -1, -1))
        elif len(ones) == 1:
            ops.append((dst, ones[0], -1))
        else:
            ops.append((dst, ones[0], ones[1]))
            ops.extend((dst, dst, o) for o in ones[2:])
    return tuple(ops), temps


class _Region:
    """A planned linear map from ``n_src`` shards to ``n_dst`` shards: GF(2^8) coefficients and their XOR plan."""

    def __init__(self, coeffs: list[list[int]], packet: int) -> None:
        self.coeffs, self.packet = coeffs, packet
        self.n_dst, self.n_src = len(coeffs), len(coeffs[0])
        bits = _expand(coeffs)
        self.ops, self.temps = _plan(bits.tobytes(), 8 * self.n_dst, 8 * self.n_src)
        self.nonzero = [[j for j, e in enumerate(row) if e] for row in coeffs]

    def apply(self, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
        length = len(src[0])
        packet = self.packet
        block = 8 * packet
        whole = length // block
        temp = np.empty((max(self.temps, 1), packet), dtype=np.uint8)
        if whole:
            s2 = [s[: whole * block].reshape(whole, 8, packet) for s in src]
            d2 = [d[: whole * block].reshape(whole, 8, packet) for d in dst]
            temps = list(temp)
            for t in range(whole):
                self._run([p for s in s2 for p in s[t]], temps, [p for d in d2 for p in d[t]])
        rest = length - whole * block
        small = rest // 8
        if small:
            lo, hi = whole * block, whole * block + 8 * small
            temps = list(temp.reshape(-1)[: max(self.temps, 1) * small].reshape(-1, small))
            self._run([p for s in src for p in s[lo:hi].reshape(8, small)], temps,
                      [p for d in dst for p in d[lo:hi].reshape(8, small)])
        for pos in range(whole * block + 8 * small, length):  # the last length % 8 bytes: byte-wise GF(2^8)
            vals = [int(s[pos]) for s in src]
            for row, d, nz in zip(self.coeffs, dst, self.nonzero):
                acc = 0
                for j in nz:
                    acc ^= gf_mul(row[j], vals[j])
                d[pos] = acc

    def _run(self, srcs: list[np.ndarray], temps: list[np.ndarray], dsts: list[np.ndarray]) -> None:
        x = srcs + temps[: self.temps] + dsts
        xor, copy = np.bitwise_xor, np.copyto
        for d, a, b in self.ops:
            if b >= 0:
                xor(x[a], x[b], out=x[d])
            elif a >= 0:
                copy(x[d], x[a])
            else:
                x[d].fill(0)


def _bytes_of(buf: Any, what: str) -> np.ndarray:
    """A flat uint8 numpy view of a buffer (bytes, bytearray, memoryview, numpy array, CPU tensor); no copy."""
    try:
        import torch  # noqa: PLC0415  (torch is always there; imported here to keep this module's import light)

        if isinstance(buf, torch.Tensor):
            if buf.device.type != "cpu" or not buf.is_contiguous():
                raise ErasureCodingError(f"{what}: a tensor must be contiguous and on the CPU, got "
                                         f"{buf.device.type}, contiguous={buf.is_contiguous()}")
            return buf.reshape(-1).view(torch.uint8).numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ErasureCodingError(f"{what}: a numpy array must be C-contiguous")
        return buf.reshape(-1).view(np.uint8)
    try:
        view = memoryview(buf)
    except TypeError:
        raise ErasureCodingError(f"{what}: expected a buffer (bytes, numpy uint8, memoryview, CPU tensor), "
                                 f"got {type(buf).__name__}") from None
    if not view.contiguous:
        raise ErasureCodingError(f"{what}: the buffer must be contiguous")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


class Codec:
    """A systematic (k + m, k) MDS erasure code over GF(2^8): ``encode`` data, ``decode`` any k shards.

    Shards are numbered 0..k-1 (data) and k..k+m-1 (parity). Buffers are anything with the buffer protocol, or a
    contiguous CPU tensor; outputs are numpy ``uint8`` arrays of the shard length. Thread-safe: a codec holds only
    its matrix and cached plans.
    """

    def __init__(self, k: int, m: int) -> None:
        if not (isinstance(k, int) and isinstance(m, int)) or k < 1 or m < 1 or k + m > 255:
            raise ErasureCodingError(f"Codec(k={k!r}, m={m!r}): need integers k >= 1, m >= 1 and k + m <= 255 "
                                     "(GF(2^8) has 256 elements; the Cauchy construction needs k + m distinct "
                                     "points)")
        self.k, self.m = k, m
        self.matrix = cauchy_matrix(k, m)
        self._encoder: _Region | None = None

    def __repr__(self) -> str:
        return f"Codec(k={self.k}, m={self.m})"

    def encode(self, data: Sequence[Any], out: "Sequence[Any] | None" = None) -> list[np.ndarray]:
        """The m parity buffers of k equal-length data buffers; written into ``out`` (m writable buffers of the
        shard length, e.g. daemon segments) when given, instead of new arrays."""
        if isinstance(data, (bytes, bytearray, memoryview, str)) or len(data) != self.k:
            got = f"{len(data)} buffers" if not isinstance(data, (bytes, bytearray, memoryview, str)) else "one buffer"
            raise ErasureCodingError(f"{self!r}.encode: expected a sequence of {self.k} data buffers, got {got}")
        src = [_bytes_of(d, f"{self!r}.encode: data shard {i}") for i, d in enumerate(data)]
        length = _same_length(src, f"{self!r}.encode", list(range(self.k)))
        dst = _outputs(out, self.m, length, f"{self!r}.encode")
        if self._encoder is None:
            self._encoder = _Region(self.matrix, packet_bytes(self.k, self.m))
        self._encoder.apply(src, dst)
        return dst

    def decode(self, shards: Mapping[int, Any]) -> list[np.ndarray]:
        """The k data buffers from at least k shards ``{index: buffer}`` (data shards that are given come back as
        views of the given buffers; lost ones are rebuilt)."""
        n = self.k + self.m
        bad = [i for i in shards if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
        if bad:
            raise ErasureCodingError(f"{self!r}.decode: shard indices must be 0..{n - 1} (0..{self.k - 1} data, "
                                     f"{self.k}..{n - 1} parity), got {bad}")
        have = sorted(shards)
        if len(have) < self.k:
            missing = [i for i in range(n) if i not in shards]
            raise ErasureCodingError(
                f"{self!r}.decode: {len(have)} shards given, at least {self.k} needed; missing shards {missing} "
                f"(given {have}); at most {self.m} of the {n} shards may be lost")
        views = {i: _bytes_of(shards[i], f"{self!r}.decode: shard {i}") for i in have}
        _same_length(list(views.values()), f"{self!r}.decode", have)
        lost = [j for j in range(self.k) if j not in views]
        if not lost:
            return [views[j] for j in range(self.k)]
        # Survivors: every data shard there is, then the fewest parity shards, lowest index first.
        use = [j for j in range(self.k) if j in views] + [i for i in have if i >= self.k][: len(lost)]
        region = _decoder(self.k, self.m, tuple(use), tuple(lost))
        out = [np.empty(len(views[use[0]]), dtype=np.uint8) for _ in lost]
        region.apply([views[i] for i in use], out)
        rebuilt = dict(zip(lost, out))
        return [views[j] if j in views else rebuilt[j] for j in range(self.k)]


@functools.lru_cache(maxsize=256)
def _decoder(k: int, m: int, use: tuple[int, ...], lost: tuple[int, ...]) -> _Region:
    codec_matrix = cauchy_matrix(k, m)
    rows = [[1 if j == s else 0 for j in range(k)] if s < k else codec_matrix[s - k] for s in use]
    inv = gf_matrix_inverse(rows)  # data = inv @ survivors
    return _Region([inv[j] for j in lost], packet_bytes(k, m))


def _outputs(out: "Sequence[Any] | None", n: int, length: int, where: str) -> list[np.ndarray]:
    if out is None:
        return [np.empty(length, dtype=np.uint8) for _ in range(n)]
    if len(out) != n:
        raise ErasureCodingError(f"{where}: out must hold {n} buffers, got {len(out)}")
    views = [_bytes_of(o, f"{where}: out[{i}]") for i, o in enumerate(out)]
    for i, v in enumerate(views):
        if len(v) != length or not v.flags.writeable:
            raise ErasureCodingError(f"{where}: out[{i}] must be a writable buffer of {length} bytes, got "
                                     f"{len(v)} bytes{'' if v.flags.writeable else ', read-only'}")
    return views


def _same_length(views: list[np.ndarray], where: str, indices: list[int]) -> int:
    lengths = {len(v) for v in views}
    if len(lengths) != 1:
        got = ", ".join(f"shard {i}: {len(v)}" for i, v in zip(indices, views))
        raise ErasureCodingError(f"{where}: every shard must have the same length; got {got}")
    return lengths.pop()
