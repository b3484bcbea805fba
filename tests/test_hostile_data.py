"""Hostile data on the read path (#22 items 2, 4 and 7): allocations bounded by real bytes, failed loads that
leave the state as it was, and dtype conversions torch lacks.

Allocation cases run under ``address_space_headroom`` (tests/test_bad_input.py): an attempted allocation larger
than the headroom fails the test instead of being overcommitted. Each case failed on the code before the fix
(noted per test).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
import zstandard

import ckpt
import megatron_ref as M
from ckpt.cli import verify_checkpoint
from formats import checksum, codec
from formats.box import flat_range_to_boxes
from tests.test_bad_input import address_space_headroom, expect_error, read_doc, write_doc
from tests.test_reshard import logical_state, spec_dims

pytestmark = pytest.mark.timeout(120)

CORRUPT = ckpt.CorruptCheckpointError


def _append_chunk(path: Path, key: str, stored: bytes, dtype: str, shape: list[int]) -> tuple[Path, dict[str, Any]]:
    """Make ``key`` one zstd chunk of ``shape`` whose stored bytes are ``stored`` (appended to its data file), with
    a valid checksum and a re-sealed manifest: only the frame itself is hostile."""
    doc = read_doc(path)
    e = doc["entries"][key]
    c = dict(e["chunks"][0])
    data = path / c["file"]
    with open(data, "ab") as f:
        c["byte_offset"] = f.tell()
        f.write(stored)
    n = 1
    for s in shape:
        n *= s
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    c.update(offsets=[0] * len(shape), sizes=shape, codec="zstd", byte_length=len(stored), raw_byte_length=n * es,
             block_bytes=max(1, len(stored)), checksums=[checksum.digest(stored)])
    e.update(dtype=dtype, shape=shape, chunks=[c])
    doc["files"][c["file"]]["size_bytes"] = os.path.getsize(data)
    write_doc(path, doc)
    return data, c


def _zstd_saved(tmp_path: Path) -> Path:
    path = tmp_path / "z"
    ckpt.save({"b": torch.arange(100, dtype=torch.int16)}, str(path), options=ckpt.SaveOptions(codec="zstd"))
    return path


def _verify(path: Path) -> None:
    with ckpt.open(str(path)) as r:
        problems = verify_checkpoint(r)
    if problems:
        raise CORRUPT("\n".join(problems))


# -- zstd bombs ---------------------------------------------------------------------------------------------------


def test_zstd_frame_without_content_size_claiming_64_gib_is_refused_before_allocating(tmp_path: Path) -> None:
    """Before: ``read`` allocated 64 GiB for the declared shape and ``verify`` raised MemoryError."""
    path = _zstd_saved(tmp_path)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1000)
    assert zstandard.frame_content_size(frame) == -1
    data, c = _append_chunk(path, "b", frame, "uint8", [2**36])
    span = f"[{c['byte_offset']}, {c['byte_offset'] + len(frame)})"
    with address_space_headroom():
        for fn in [lambda: ckpt.open(str(path)).read("b"), lambda: ckpt.open(str(path)).read("b", slice(0, 10)),
                   lambda: _verify(path)]:
            with expect_error(tmp_path, CORRUPT, str(data), "'b'", span, str(2**36), max_secs=5):
                fn()


@pytest.mark.parametrize("found", [50, 300], ids=["decodes short", "decodes long"])
def test_zstd_frame_decoding_to_another_size_is_refused(tmp_path: Path, found: int) -> None:
    """A frame without a content size that decodes to fewer or more bytes than the manifest's 200."""
    path = _zstd_saved(tmp_path)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(range(256))[:found] if found < 256
                                                                        else os.urandom(found))
    data, c = _append_chunk(path, "b", frame, "int16", [100])
    state = {"b": torch.full((100,), 3, dtype=torch.int16)}
    for fn in [lambda: ckpt.open(str(path)).read("b"), lambda: ckpt.open(str(path)).read("b", slice(10, 20)),
               lambda: ckpt.load(state, str(path)), lambda: _verify(path)]:
        with expect_error(tmp_path, CORRUPT, str(data), "'b'", "200"):
            fn()
    assert torch.equal(state["b"], torch.full((100,), 3, dtype=torch.int16)), "a failed load touched the state"


def test_zstd_bomb_ratio_is_checked_without_io() -> None:
    codec.check_ratio(1, codec.MAX_ZSTD_RATIO, "w")
    with pytest.raises(CORRUPT, match="at most 32768x"):
        codec.check_ratio(1, codec.MAX_ZSTD_RATIO + 1, "w")
    # the bound is zstd's real limit: zeros compress to about that ratio, and must stay readable
    zeros = codec.compress(memoryview(bytes(64 << 20)))
    assert len(zeros) * codec.MAX_ZSTD_RATIO >= 64 << 20 > len(zeros) * 1000


def test_real_zstd_bomb_decodes_into_the_output_only(tmp_path: Path) -> None:
    """A chunk of a few KiB that really decodes to 256 MiB: reading it holds the output and little more (before:
    about 3.4x the output, the decoded bytes, a copy of them and the tensor)."""
    n = 256 << 20
    path = tmp_path / "bomb"
    ckpt.save({"x": torch.zeros(n, dtype=torch.uint8)}, str(path),
              options=ckpt.SaveOptions(codec="zstd", max_chunk_bytes=n))
    with ckpt.open(str(path)) as r:
        (c,) = r.info("x").chunks
    assert c.byte_length * 1000 < n
    with address_space_headroom(n + (96 << 20)):
        out = ckpt.open(str(path)).read("x")
        assert out.shape == (n,) and not out.any()
        del out
        part = ckpt.open(str(path)).read("x", slice(n // 2, n // 2 + 1000))  # pieces: no whole decode
        assert part.shape == (1000,) and not part.any()
        _verify(path)  # pieces too
    # a 2-d chunk read in part, and loaded into another dtype: decoded in pieces, cast while copying
    small = tmp_path / "small"
    w = torch.arange(6 * 1000, dtype=torch.int32).reshape(6, 1000)
    ckpt.save({"w": w}, str(small), options=ckpt.SaveOptions(codec="zstd"))
    with ckpt.open(str(small)) as r:
        assert torch.equal(r.read("w", (slice(1, 5), slice(7, 900))), w[1:5, 7:900])
    got = {"w": torch.zeros(6, 1000, dtype=torch.float64)}
    ckpt.load(got, str(small), options=ckpt.LoadOptions(allow_dtype_cast=True))
    assert torch.equal(got["w"], w.double())


def test_zstd_pieces_copy_every_region_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces far smaller than rows and than the chunk, cut mid-row: every region read equals the tensor's."""
    monkeypatch.setattr(codec, "DECODE_PIECE_BYTES", 40)
    w = torch.randn(7, 11, 5, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "p"
    ckpt.save({"w": w}, str(path), options=ckpt.SaveOptions(codec="zstd"))
    with ckpt.open(str(path)) as r:
        for index in [(slice(0, 7),), (slice(2, 5), slice(3, 9), slice(1, 4)), (3, slice(None), 4), (6, 10)]:
            assert torch.equal(r.read("w", index), w[index]), index


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (5, 1, 3)])
def test_range_boxes_tile_every_flat_range(shape: tuple[int, ...]) -> None:
    n = 1
    for s in shape:
        n *= s
    flat = torch.arange(n).reshape(shape)
    for a in range(n + 1):
        for b in range(a, n + 1):
            got = []
            for box in flat_range_to_boxes(shape, a, b):
                got.extend(flat[box.slices()].reshape(-1).tolist())
            assert got == list(range(a, b)), (a, b)
            assert len(flat_range_to_boxes(shape, a, b)) <= max(1, 2 * len(shape) - 1)


def test_damaged_zstd_frame_never_reaches_the_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checksums of the stored bytes are checked before any decode (every decode path checks the header first)."""
    path = tmp_path / "d"
    ckpt.save({"w": torch.zeros(64, 32)}, str(path), options=ckpt.SaveOptions(codec="zstd", max_chunk_bytes=4096))
    c = next(iter(read_doc(path)["entries"]["w"]["chunks"]))
    with open(path / c["file"], "r+b") as f:
        f.seek(c["byte_offset"] + c["byte_length"] - 1)
        b = f.read(1)
        f.seek(c["byte_offset"] + c["byte_length"] - 1)
        f.write(bytes([b[0] ^ 1]))
    seen: list[int] = []
    real = codec.check_header
    monkeypatch.setattr(codec, "check_header", lambda data, *a: (seen.append(len(data)), real(data, *a)))
    with open(path / c["file"], "rb") as f:
        f.seek(c["byte_offset"])
        damaged = len(f.read(c["byte_length"]))
    # the damaged chunk is the first one: a single-threaded load and a read of its rows stop before any decode
    for fn in [lambda: ckpt.load({"w": torch.empty(64, 32)}, str(path), options=ckpt.LoadOptions(num_threads=1)),
               lambda: ckpt.open(str(path)).read("w", (slice(0, 2),))]:
        seen.clear()
        with expect_error(tmp_path, CORRUPT, str(path / c["file"]), "'w'", c["checksums"][0]):
            fn()
        assert not seen, "the damaged zstd frame reached the decoder"
    with expect_error(tmp_path, CORRUPT, str(path / c["file"]), "'w'", c["checksums"][0]):
        _verify(path)
    assert damaged == c["byte_length"]


# -- sparse files and huge checksum blocks ------------------------------------------------------------------------


def test_huge_checksum_block_of_a_sparse_file_reads_and_verifies_in_bounded_memory(tmp_path: Path) -> None:
    """One raw chunk of 2 GiB with one 2 GiB checksum block, in a sparse file: a 10-element read and a verify
    hash it in pieces (before: both allocated the whole block). The checksum is right, so both succeed."""
    n = 2 << 30
    path = tmp_path / "s"
    ckpt.save({"x": torch.zeros(1)}, str(path))
    doc = read_doc(path)
    e = doc["entries"]["x"]
    c = e["chunks"][0]
    with open(path / c["file"], "r+b") as f:
        f.truncate(n)
    h = xxhash.xxh3_64()
    zeros = bytes(64 << 20)
    for _ in range(n // len(zeros)):
        h.update(zeros)
    del zeros
    doc["files"][c["file"]]["size_bytes"] = n
    e.update(dtype="uint8", shape=[n])
    c.update(sizes=[n], byte_offset=0, byte_length=n, raw_byte_length=n, block_bytes=n, checksums=[h.hexdigest()])
    write_doc(path, doc)
    with address_space_headroom(256 << 20):
        with ckpt.open(str(path)) as r:
            assert torch.equal(r.read("x", slice(n // 2, n // 2 + 10)), torch.zeros(10, dtype=torch.uint8))
            assert verify_checkpoint(r) == []
    with open(path / c["file"], "r+b") as f:  # one damaged byte far from the region read: still found
        f.seek(n - 1)
        f.write(b"\1")
    with address_space_headroom(256 << 20):
        for fn in [lambda: ckpt.open(str(path)).read("x", slice(0, 10)), lambda: _verify(path)]:
            with expect_error(tmp_path, CORRUPT, str(path / c["file"]), "'x'", f"[0, {n})", h.hexdigest()):
                fn()


def test_partial_reads_with_big_blocks_return_exact_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded scan (pieces smaller than blocks, blocks straddling the region) returns what a plain read does."""
    import formats.reader as R

    monkeypatch.setattr(R, "SCAN_PIECE_BYTES", 24)
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "b"
    ckpt.save({"w": w}, str(path), options=ckpt.SaveOptions(block_bytes=1008, max_chunk_bytes=2400))
    with ckpt.open(str(path)) as r:
        for index in [(slice(3, 4),), (slice(5, 17), slice(2, 29)), (slice(None), 7), (39, slice(None))]:
            assert torch.equal(r.read("w", index), w[index]), index
        assert verify_checkpoint(r) == []


# -- conversion -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["torch", "safetensors", "universal"])
def test_convert_of_a_forged_size_creates_no_output(tmp_path: Path, target: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest declaring a 2^40-byte file: refused before any output exists (before: ``--to torch`` laid out a
    1 TiB file first and failed on the first read)."""
    from formats.foreign.convert import convert

    path = tmp_path / "c"
    ckpt.save({"model": {"x": torch.ones(4)}}, str(path))
    doc = read_doc(path)
    e = doc["entries"]["model/x"]
    c = e["chunks"][0]
    n = 2**40
    doc["files"][c["file"]]["size_bytes"] = n
    e.update(dtype="uint8", shape=[n])
    c.update(sizes=[n], byte_offset=0, byte_length=n, raw_byte_length=n, block_bytes=n)
    write_doc(path, doc)
    written: list[str] = []
    real_open = os.open

    def spy(p: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(tmp_path / "out") in os.path.abspath(str(p)):
            written.append(str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    out = tmp_path / "out" / ("m.pt" if target == "torch" else "d")
    with address_space_headroom():
        with expect_error(path, CORRUPT, str(path / c["file"]), str(n), "'model/x'"):
            convert(str(path), str(out), dst_format=target)
    assert not written and not out.exists(), written


# -- a failed load leaves the state as it was ------------------------------------------------------------------------


def _multi(tmp_path: Path, zstd: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    # Odd and prime sizes: chunks of 2048 bytes and blocks of 512 split rows and elements unevenly.
    state = {"a": torch.randn(61, 37, generator=g), "b": torch.randn(47, 13, generator=g).double(),
             "c": torch.arange(2999, dtype=torch.int16)}
    path = tmp_path / ("z" if zstd else "r")
    ckpt.save(state, str(path), options=ckpt.SaveOptions(max_chunk_bytes=2048, block_bytes=512, files_per_rank=2,
                                                         codec="zstd" if zstd else "raw"))
    return path, state


def _damage(path: Path, key: str, which: int) -> None:
    c = read_doc(path)["entries"][key]["chunks"][which]
    with open(path / c["file"], "r+b") as f:
        f.seek(c["byte_offset"] + c["byte_length"] // 2)
        b = f.read(1)
        f.seek(c["byte_offset"] + c["byte_length"] // 2)
        f.write(bytes([b[0] ^ 0x10]))


def _before() -> dict[str, torch.Tensor]:
    return {"a": torch.full((61, 37), 7.0), "b": torch.full((47, 13), -1.0, dtype=torch.float64),
            "c": torch.full((2999,), 9, dtype=torch.int16)}


MODES = {"raw, verified first": (False, True), "raw, undo copy (as from an object store)": (False, False),
         "zstd, undo copy": (True, True)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("where", [("a", 1), ("b", -1), ("c", -1)], ids=["first key", "middle key", "last key"])
def test_failed_load_leaves_every_tensor_as_it_was(tmp_path: Path, mode: str, threads: int,
                                                   where: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the fast path read in place and verified afterwards, so the damaged chunk (and every chunk read
    before it) stayed in the caller's tensors. Local raw chunks are now verified before the first write (no undo
    copy may be made: ``Undo.keep`` raises); a storage without cheap rereads, and zstd chunks, use the undo copy."""
    from ckpt.loading import Undo
    from formats.storage.local import LocalStorage

    zstd, cheap = MODES[mode]
    monkeypatch.setattr(LocalStorage, "rereads_are_cheap", cheap)
    if cheap and not zstd:
        def no_undo(self: Undo, dest: torch.Tensor) -> None:
            raise AssertionError("a load verified first kept an undo copy")
        monkeypatch.setattr(Undo, "keep", no_undo)
    path, saved = _multi(tmp_path, zstd)
    assert all(len(read_doc(path)["entries"][k]["chunks"]) > 1 for k in saved)
    _damage(path, *where)
    state = _before()
    with expect_error(tmp_path, CORRUPT, f"'{where[0]}'", "checksum mismatch"):
        ckpt.load(state, str(path), options=ckpt.LoadOptions(num_threads=threads))
    for k, v in _before().items():
        assert torch.equal(state[k], v), k
    ok = _before()
    ckpt.load(ok, str(_multi(tmp_path / "again", zstd)[0]))  # the same state loads when the files are intact
    assert all(torch.equal(ok[k], saved[k]) for k in saved)


def test_a_file_damaged_after_the_check_is_still_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes read again from files are verified again: a data file changed between the check before the first
    write and the copy (another process writing into a committed checkpoint) is an error, never a silent load."""
    import ckpt.loading as loading

    path, _ = _multi(tmp_path, False)
    real = loading.verify_in_place

    def then_damage(*args: Any) -> bool:
        ok = real(*args)
        _damage(path, "c", -1)
        return ok
    monkeypatch.setattr(loading, "verify_in_place", then_damage)
    with pytest.raises(CORRUPT, match="checksum mismatch in key 'c'"):  # not expect_error: this test changes a file
        ckpt.load(_before(), str(path))


def test_failed_cast_load_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    """Reads through a staging buffer (another dtype) are restored too."""
    path, _ = _multi(tmp_path, False)
    _damage(path, "c", -1)
    state = {k: v.float() for k, v in _before().items()}
    with pytest.raises(CORRUPT):
        ckpt.load(state, str(path), options=ckpt.LoadOptions(allow_dtype_cast=True))
    assert all(torch.equal(state[k], v.float()) for k, v in _before().items())


def test_failed_spec_layout_load_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    """A load into spec-laid-out local tensors (``layout=``, which zeroes padding rows before reading): a damaged
    chunk leaves every tensor as it was, padding included."""
    mc = M.gpt_tiny()
    state = M.to_local(logical_state(mc), mc, M.ParallelConfig(), 0)
    path = tmp_path / "g"
    ckpt.save(state, str(path), spec="gpt", dims=spec_dims(mc), layout="tp=1",
              options=ckpt.SaveOptions(max_chunk_bytes=4096, block_bytes=1024))
    doc = read_doc(path)
    key = max((k for k, e in doc["entries"].items() if e.get("kind") == "tensor"),
              key=lambda k: len(doc["entries"][k]["chunks"]))
    _damage(path, key, -1)
    fresh = M.to_local(logical_state(mc, seed=5), mc, M.ParallelConfig(), 0)
    before = {k: v.clone() for k, v in M.flatten_state(fresh).items() if isinstance(v, torch.Tensor)}
    with expect_error(tmp_path, CORRUPT, f"'{key}'", "checksum mismatch"):
        ckpt.load(fresh, str(path), layout="tp=1")
    after = M.flatten_state(fresh)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("threads", [1, 4])
def test_failed_resharded_read_is_undone(tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose local tensors are parts of stored chunks (load-time resharding: rows 10-50 and a column block,
    crossing chunk and block boundaries) reads partial boxes through staging buffers; a damaged chunk among them
    is undone by what ``ckpt.load`` keeps (``ckpt.loading.Undo``), exactly as ``load`` does it."""
    import formats.reader as R
    from ckpt.loading import Undo, read_into
    from formats.box import Box
    from resharding.layout import LocalPiece, TensorLayout

    path, saved = _multi(tmp_path, False)
    _damage(path, "a", 2)  # chunk 2 of "a": read in part (rows 10-50), after "b" and chunks 0-1 of "a" are in place
    boxes = {"a": Box((10, 0), (40, 32)), "b": Box((5, 3), (40, 9))}
    local = {k: torch.full(b.sizes, 5.0, dtype=saved[k].dtype) for k, b in boxes.items()}
    layouts = {k: TensorLayout(tuple(saved[k].shape), local[k], (LocalPiece((0, 0), boxes[k]),), None)
               for k in boxes}
    partial: list[bool] = []
    real = R.ChunkReader.read_region

    def spy(self: Any, entry: Any, chunk: Any, offs: Any, sizes: Any, out: Any, verified: bool = False) -> None:
        partial.append(tuple(sizes) != tuple(chunk.sizes))
        real(self, entry, chunk, offs, sizes, out, verified)

    monkeypatch.setattr(R.ChunkReader, "read_region", spy)
    undo = Undo()
    with ckpt.open(str(path)) as r:
        with pytest.raises(CORRUPT, match="'a'"):
            read_into(R.ChunkReader(r.storage, r.manifest), r.manifest, layouts, threads, undo)
        undo.restore()
        assert any(partial), "no partial-box read: the case does not test resharding"
        for k, b in boxes.items():
            assert torch.equal(local[k], torch.full(b.sizes, 5.0, dtype=saved[k].dtype)), k
        # intact: the same layouts read exactly the boxes
        good, _ = _multi(tmp_path / "good", False)
    with ckpt.open(str(good)) as r:
        read_into(R.ChunkReader(r.storage, r.manifest), r.manifest, layouts, threads, Undo())
    for k, b in boxes.items():
        assert torch.equal(local[k], saved[k][b.slices()]), k


# -- dtype conversions torch lacks ------------------------------------------------------------------------------------


needs_fp4 = pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch without float4_e2m1fn_x2")


@needs_fp4
@pytest.mark.parametrize("into", [torch.float32, torch.uint8, torch.bfloat16])
def test_float4_into_another_dtype_is_a_shard_mismatch(tmp_path: Path, into: torch.dtype) -> None:
    """Before: NotImplementedError from copy_ (after other tensors had been overwritten)."""
    path = tmp_path / "f4"
    x = torch.arange(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    ckpt.save({"x": x, "y": torch.ones(3)}, str(path))
    state = {"x": torch.zeros(16, dtype=into), "y": torch.zeros(3)}
    name = str(into).replace("torch.", "")
    with expect_error(tmp_path, ckpt.ShardMismatchError, "'x'", "float4_e2m1fn_x2", name):
        ckpt.load(state, str(path), options=ckpt.LoadOptions(allow_dtype_cast=True))
    assert not state["y"].any() and not state["x"].any()
    same = {"x": torch.zeros(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), "y": torch.zeros(3)}
    ckpt.load(same, str(path))
    assert torch.equal(same["x"].view(torch.uint8), x.view(torch.uint8))


@needs_fp4
def test_float32_into_float4_is_a_shard_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "f32"
    ckpt.save({"x": torch.ones(16)}, str(path))
    state = {"x": torch.zeros(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    with expect_error(tmp_path, ckpt.ShardMismatchError, "'x'", "float32", "float4_e2m1fn_x2"):
        ckpt.load(state, str(path), options=ckpt.LoadOptions(allow_dtype_cast=True))


@needs_fp4
def test_reader_refuses_an_unconvertible_destination(tmp_path: Path) -> None:
    """``ChunkReader.read_region`` (used by resharding and convert too) names key and both dtypes."""
    from formats.reader import ChunkReader

    path = tmp_path / "f4r"
    ckpt.save({"x": torch.arange(8, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, str(path))
    with ckpt.open(str(path)) as r:
        entry = r.info("x")
        reader = ChunkReader(r.storage, r.manifest)
        c = entry.chunks[0]
        with pytest.raises(ckpt.ShardMismatchError, match=r"'x'.*float4_e2m1fn_x2.*float32"):
            reader.read_region(entry, c, (0,), tuple(c.sizes), torch.zeros(8))


def test_frame_header_helper_names_both_sizes() -> None:
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 5000) + b"\1\0\0"
    with pytest.raises(CORRUPT, match="5000.*manifest says 100"):
        codec.check_header(frame, 100, "f")
