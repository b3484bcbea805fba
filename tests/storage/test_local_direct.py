"""``LocalStreamWriter`` with ``O_DIRECT``: every piece lands at the offset ``append`` returned, whatever its size
and memory alignment, the file ends exactly at the logical end, and file systems without ``O_DIRECT`` fall back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from formats.storage import local_stream
from formats.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(120)
A = local_stream.DIRECT_ALIGN_BYTES


def _pieces(rng: random.Random) -> list[memoryview]:
    """Sizes around every threshold, at every kind of address alignment (views into one big buffer)."""
    big = np.frombuffer(rng.randbytes(40 << 20), dtype=np.uint8)
    sizes = [0, 1, 7, A - 1, A, A + 1, local_stream.DIRECT_MIN_BYTES - 1, local_stream.DIRECT_MIN_BYTES,
             local_stream.DIRECT_MIN_BYTES + 3, 3 * A, local_stream.DIRECT_BUFFER_BYTES + 5, 5 << 20]
    rng.shuffle(sizes)
    out = []
    for n in sizes:
        start = rng.randrange(0, len(big) - n)
        if rng.random() < 0.3:
            start -= start % A  # some pieces start on a block boundary in memory
        out.append(memoryview(big[start : start + n]))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("direct", [True, False])
def test_append_places_every_piece_where_it_says(tmp_path: Path, seed: int, direct: bool) -> None:
    storage = LocalStorage(str(tmp_path / "ckpt"), {"direct_io": direct})
    rng = random.Random(seed)
    pieces = _pieces(rng)
    w = storage.open_writer("data/f.bin")
    assert isinstance(w, local_stream.LocalStreamWriter)
    placed = []
    end = 0
    for i, p in enumerate(pieces):
        if i % 3 == 2:
            w.write(p)  # back to back, never padded
            placed.append((end, p))
            end += len(p)
        else:
            at = w.append(p)
            assert at >= end and at - end < 2 * A
            if not w.direct:
                assert at == end
            placed.append((at, p))
            end = at + len(p)
    size = w.close()
    assert size == end == os.path.getsize(tmp_path / "ckpt" / "data" / "f.bin")
    for at, p in placed:
        assert storage.read("data/f.bin", at, len(p)) == bytes(p)


def test_large_aligned_pieces_are_written_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of direct I/O: the middle of a large piece is handed to the kernel straight from its memory."""
    storage = LocalStorage(str(tmp_path / "ckpt"))
    w = storage.open_writer("data/f.bin")
    if not w.direct:
        w.abort()
        pytest.skip(f"{tmp_path} refuses O_DIRECT; the fallback is covered by the test above")
    writes: list[tuple[int, int]] = []
    real = local_stream._pwrite_all

    def recording(fd: int, view: memoryview, offset: int) -> None:
        writes.append((local_stream._address(view), len(view)))
        real(fd, view, offset)

    monkeypatch.setattr(local_stream, "_pwrite_all", recording)
    data = np.frombuffer(os.urandom(4 << 20), dtype=np.uint8)
    src = memoryview(data[100 : 100 + (3 << 20)])  # unaligned start
    w.append(memoryview(b"header"))
    at = w.append(src)
    w.close()
    assert (at - local_stream._address(src)) % A == 0
    direct = [(a, n) for a, n in writes if a >= local_stream._address(src)
              and a + n <= local_stream._address(src) + len(src)]
    assert sum(n for _, n in direct) >= len(src) - 2 * A, writes
    assert storage.read("data/f.bin", at, len(src)) == bytes(src)


def test_file_systems_without_o_direct_fall_back(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    root = shm / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    try:
        storage = LocalStorage(str(root))
        w = storage.open_writer("data/f.bin")
        payload = os.urandom((2 << 20) + 3)
        at = w.append(payload)
        assert w.close() == at + len(payload)
        assert storage.read("data/f.bin", at, len(payload)) == payload
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_direct_io_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="direct_io"):
        LocalStorage(str(tmp_path), {"direct_io": "yes"})
