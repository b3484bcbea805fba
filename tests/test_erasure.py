"""``snapshot_daemon.erasure.Codec``: MDS, systematic, bit-exact decode of every loss pattern; GF(2^8) arithmetic
and the matrix inverse checked against ``reedsolo``'s (the reference oracle, same field polynomial 0x11d)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import reedsolo
import torch

import ckpt
from snapshot_daemon.erasure import (PRIMITIVE_POLY, Codec, cauchy_matrix, gf_inv, gf_matrix_inverse, gf_mul,
                                     packet_bytes)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _reedsolo_field() -> None:
    reedsolo.init_tables(prim=PRIMITIVE_POLY)


def _oracle_inverse(m: list[list[int]]) -> list[list[int]]:
    """Gauss-Jordan with reedsolo's arithmetic only (independent of the codec's tables)."""
    n = len(m)
    a = [list(r) + [int(i == j) for j in range(n)] for i, r in enumerate(m)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c])
        a[c], a[p] = a[p], a[c]
        iv = reedsolo.gf_inverse(a[c][c])
        a[c] = [reedsolo.gf_mul(v, iv) for v in a[c]]
        for r in range(n):
            if r != c and a[r][c]:
                f = a[r][c]
                a[r] = [v ^ reedsolo.gf_mul(f, x) for v, x in zip(a[r], a[c])]
    return [r[n:] for r in a]


def test_field_arithmetic_agrees_with_reedsolo() -> None:
    for a in range(256):
        for b in range(256):
            assert gf_mul(a, b) == reedsolo.gf_mul(a, b), (a, b)
        if a:
            assert gf_inv(a) == reedsolo.gf_inverse(a)


@pytest.mark.parametrize("k, m", [(2, 1), (4, 2), (8, 3), (12, 4), (20, 5)])
def test_matrix_inverse_agrees_with_reedsolo_and_every_square_submatrix_is_invertible(k: int, m: int) -> None:
    rnd = random.Random(k * 100 + m)
    c = cauchy_matrix(k, m)
    assert c[0] == [1] * k and [row[0] for row in c] == [1] * m
    gen = [[int(i == j) for j in range(k)] for i in range(k)] + c
    for trial in range(30):
        rows = sorted(rnd.sample(range(k + m), k))
        sub = [gen[r] for r in rows]
        got = gf_matrix_inverse(sub)
        assert got == _oracle_inverse(sub), rows
        # got @ sub == I with reedsolo's multiplication
        for i in range(k):
            for j in range(k):
                acc = 0
                for t in range(k):
                    acc ^= reedsolo.gf_mul(got[i][t], sub[t][j])
                assert acc == int(i == j)


def test_parity_is_the_cauchy_product_byte_for_byte_in_the_byte_wise_region() -> None:
    """Lengths below 8 bytes are all byte-wise GF(2^8): parity byte = sum of matrix * data with reedsolo's mul."""
    codec = Codec(5, 3)
    rnd = np.random.default_rng(1)
    data = [rnd.integers(0, 256, 7, dtype=np.uint8) for _ in range(5)]
    parity = codec.encode(data)
    for i in range(3):
        for pos in range(7):
            want = 0
            for j in range(5):
                want ^= reedsolo.gf_mul(codec.matrix[i][j], int(data[j][pos]))
            assert parity[i][pos] == want


def _lengths(k: int, m: int) -> list[int]:
    block = 8 * packet_bytes(k, m)
    return [0, 1, 7, 8, 9, 1001, block - 8, block, block + 13, 2 * block + 8 * 37 + 5]


@pytest.mark.parametrize("k, m", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (4, 2), (5, 3), (4, 4)])
def test_every_loss_pattern_decodes_bit_exact_for_small_codes(k: int, m: int) -> None:
    codec = Codec(k, m)
    rnd = np.random.default_rng(k * 10 + m)
    for length in _lengths(k, m):
        data = [rnd.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
        parity = codec.encode(data)
        assert len(parity) == m and all(len(p) == length for p in parity)
        shards = dict(enumerate(data + parity))
        for lost in itertools.chain.from_iterable(itertools.combinations(range(k + m), e) for e in range(m + 1)):
            got = codec.decode({i: v for i, v in shards.items() if i not in lost})
            assert len(got) == k
            for j in range(k):
                assert np.array_equal(got[j], data[j]), (length, lost, j)


def test_random_codes_and_patterns_up_to_12_4() -> None:
    rnd = random.Random(7)
    nprnd = np.random.default_rng(7)
    for _ in range(12):
        k, m = rnd.randint(1, 12), rnd.randint(1, 4)
        codec = Codec(k, m)
        length = rnd.choice([rnd.randint(0, 300), rnd.randint(1, 3 * 8 * packet_bytes(k, m))])
        data = [nprnd.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
        shards = dict(enumerate(data + codec.encode(data)))
        for _ in range(4):
            lost = rnd.sample(range(k + m), rnd.randint(1, m))
            got = codec.decode({i: v for i, v in shards.items() if i not in lost})
            assert all(np.array_equal(g, d) for g, d in zip(got, data)), (k, m, length, lost)


def test_m1_is_plain_xor() -> None:
    rnd = np.random.default_rng(3)
    data = [rnd.integers(0, 256, 100_003, dtype=np.uint8) for _ in range(5)]
    (p,) = Codec(5, 1).encode(data)
    assert np.array_equal(p, np.bitwise_xor.reduce(np.stack(data), axis=0))


def test_any_buffer_type_in_and_preallocated_out() -> None:
    codec = Codec(3, 2)
    rnd = np.random.default_rng(4)
    arrays = [rnd.integers(0, 256, 4099, dtype=np.uint8) for _ in range(3)]
    as_bytes = codec.encode([a.tobytes() for a in arrays])
    kinds = [bytes(arrays[0]), memoryview(bytearray(arrays[1])), torch.from_numpy(arrays[2].copy())]
    mixed = codec.encode(kinds)
    out = [bytearray(4099), torch.zeros(4099, dtype=torch.uint8)]
    codec.encode(arrays, out=out)
    for a, b, c in zip(as_bytes, mixed, out):
        assert np.array_equal(a, b) and bytes(a) == bytes(c if isinstance(c, bytearray) else c.numpy())
    got = codec.decode({1: kinds[1], 3: bytes(out[0]), 4: out[1]})
    assert [bytes(g) for g in got] == [a.tobytes() for a in arrays]
    # a float tensor is coded as its bytes
    f = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    par = codec.encode(f)
    back = codec.decode({0: f[0], 3: par[0], 4: par[1]})
    assert torch.equal(torch.from_numpy(back[2].copy()).view(torch.float32), f[2])


def test_too_few_shards_names_the_missing_ones() -> None:
    codec = Codec(4, 2)
    data = [bytes([i]) * 10 for i in range(4)]
    p = codec.encode(data)
    with pytest.raises(ckpt.ErasureCodingError, match=r"3 shards given, at least 4 needed; missing shards \[0, 2, 5\]"):
        codec.decode({1: data[1], 3: data[3], 4: p[0]})


@pytest.mark.parametrize("call, match", [
    (lambda c: c.encode([b"a", b"b"]), "expected a sequence of 3 data buffers, got 2"),
    (lambda c: c.encode(b"abc"), "got one buffer"),
    (lambda c: c.encode([b"a", b"bb", b"c"]), "same length; got shard 0: 1, shard 1: 2"),
    (lambda c: c.decode({0: b"a", 1: b"b", 9: b"c"}), r"indices must be 0..4.*got \[9\]"),
    (lambda c: c.decode({0: b"a", 1: b"b", 3: b"cc"}), "same length"),
    (lambda c: c.encode([b"a"] * 3, out=[bytearray(1)]), "out must hold 2 buffers"),
    (lambda c: c.encode([b"a"] * 3, out=[bytearray(1), b"x"]), "read-only"),
    (lambda c: c.encode([1, 2, 3]), "expected a buffer"),
    (lambda c: c.encode([torch.ones(4)[::2]] * 3), "contiguous"),
])
def test_bad_arguments_raise_erasure_coding_error(call, match) -> None:  # noqa: ANN001
    with pytest.raises(ckpt.ErasureCodingError, match=match):
        call(Codec(3, 2))


@pytest.mark.parametrize("k, m", [(0, 1), (1, 0), (200, 56), (2.0, 1)])
def test_bad_shapes(k, m) -> None:  # noqa: ANN001
    with pytest.raises(ckpt.ErasureCodingError, match="k >= 1, m >= 1 and k \\+ m <= 255"):
        Codec(k, m)


def test_largest_code_round_trips() -> None:
    codec = Codec(251, 4)
    rnd = np.random.default_rng(5)
    data = [rnd.integers(0, 256, 24, dtype=np.uint8) for _ in range(251)]
    shards = dict(enumerate(data + codec.encode(data)))
    for lost in ([0, 1, 2, 3], [250, 251, 252, 253], [7, 100, 254, 3]):
        got = codec.decode({i: v for i, v in shards.items() if i not in lost})
        assert all(np.array_equal(g, d) for g, d in zip(got, data))


@pytest.mark.parametrize("k, m", [(4, 2), (6, 3), (8, 3), (5, 4), (253, 2)])
def test_every_square_submatrix_of_the_parity_matrix_is_nonsingular(k: int, m: int) -> None:
    """The MDS condition itself, exhaustively for small codes (sampled for k = 253), with reedsolo's arithmetic:
    the m = 2 construction is not a Cauchy matrix, so this is its proof in code."""
    c = cauchy_matrix(k, m)
    rnd = random.Random(k)
    for size in range(1, m + 1):
        row_sets = list(itertools.combinations(range(m), size))
        col_sets = itertools.combinations(range(k), size)
        if k > 12:
            col_sets = (tuple(sorted(rnd.sample(range(k), size))) for _ in range(2000))
        for cols in col_sets:
            for rows in row_sets:
                sub = [[c[r][j] for j in cols] for r in rows]
                _oracle_inverse(sub)  # raises StopIteration (no pivot) if singular


def test_the_matrix_is_a_fixed_function_of_k_and_m() -> None:
    """Peers encode and decode with matrices they compute themselves: pin a few so a change is deliberate."""
    assert cauchy_matrix(3, 1) == [[1, 1, 1]]
    assert cauchy_matrix(4, 2) == [[1, 1, 1, 1], [1, 2, 142, 4]]
    c = cauchy_matrix(8, 3)
    assert c[0] == [1] * 8 and [r[0] for r in c] == [1, 1, 1]
    assert c == cauchy_matrix(8, 3)
