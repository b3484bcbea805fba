"""Bad input: damaged, forged or mismatched checkpoints give one named ``CheckpointError`` and nothing else.

Every case checks the class, that it is a ``ckpt.CheckpointError``, that the message names what it must (file,
key, byte range, checksums, ...), and that nothing was written anywhere (the whole temporary tree is unchanged).
Cases that could make a reader allocate absurd amounts run under an address-space limit of about 1 GiB above
the current size, so an attempted huge allocation fails the test instead of passing unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import resource
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import ckpt
from formats import checksum
from formats.manifest import reseal, seal

pytestmark = pytest.mark.timeout(60)

OPTIONS = dict(max_chunk_bytes=4096, block_bytes=256, files_per_rank=2)


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 32, generator=g),  # 8 KiB: two chunks of 32 rows, 16 checksum blocks each
        "b": torch.arange(100, dtype=torch.int16),
        "step": 5,
        "name": "run-1",
    }


def blank_state() -> dict[str, Any]:
    return {"w": torch.full((64, 32), 7.0), "b": torch.zeros(100, dtype=torch.int16), "step": 0, "name": ""}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    ckpt.save(make_state(), str(path), options=ckpt.SaveOptions(**OPTIONS))
    return path


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def expect_error(root: Path, cls: type[BaseException], *parts: str, max_secs: float = 10.0) -> Iterator[list[Any]]:
    """Expect exactly ``cls`` (or a subclass), a ``CheckpointError`` whose message holds every one of ``parts``,
    within ``max_secs``, with no file created, changed or removed anywhere under ``root``."""
    before = _tree(root)
    caught: list[Any] = []
    t0 = time.perf_counter()
    with pytest.raises(cls) as info:
        yield caught
    elapsed = time.perf_counter() - t0
    caught.append(info.value)
    err = info.value
    assert isinstance(err, ckpt.CheckpointError), f"{type(err).__name__} is not a ckpt.CheckpointError"
    msg = str(err)
    for p in parts:
        assert p in msg, f"{p!r} missing from the message: {msg}"
    assert elapsed < max_secs, f"took {elapsed:.1f} s to raise"
    assert _tree(root) == before, "a failing read changed files"


def both_readers(path: Path, key: str = "w") -> list[Callable[[], Any]]:
    """The ways a user meets a checkpoint: ``ckpt.load`` into a state, and ``ckpt.open(...).read(key)``."""

    def load() -> None:
        ckpt.load(blank_state(), str(path))

    def read() -> None:
        with ckpt.open(str(path)) as r:
            r.read(key)

    return [load, read]


# -- a damaged data file ------------------------------------------------------------------------------------------


def _first_chunk(path: Path, key: str) -> Any:
    with ckpt.open(str(path)) as r:
        return next(c for c in r.info(key).chunks if all(o == 0 for o in c.offsets))


def _flip(path: Path, file: str, at: int) -> None:
    with open(path / file, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x55]))


def test_flipped_byte_names_file_key_range_and_checksums(saved: Path) -> None:
    chunk = _first_chunk(saved, "w")
    assert chunk.block_bytes == 256 and chunk.sizes == (32, 32)
    block = 5  # rows 10 and 11 of the chunk (256 bytes = 64 float32 = 2 rows of 32)
    start = chunk.byte_offset + block * 256
    _flip(saved, chunk.file, start + 10)
    with open(saved / chunk.file, "rb") as f:
        f.seek(start)
        found = checksum.digest(f.read(256))
    parts = (str(saved / chunk.file), "'w'", f"[{start}, {start + 256})", chunk.checksums[block], found)
    for fn in both_readers(saved):
        with expect_error(saved.parent, ckpt.CorruptCheckpointError, *parts):
            fn()
    # A partial read that touches the damaged block fails the same way...
    for index in [(slice(10, 12),), (11,), (slice(0, 40), slice(3, 5)), (10, 31)]:
        with expect_error(saved.parent, ckpt.CorruptCheckpointError, *parts):
            with ckpt.open(str(saved)) as r:
                r.read("w", index)
    # ...and one that only touches intact blocks still reads exactly: checksums are per block.
    want = make_state()["w"]
    with ckpt.open(str(saved)) as r:
        assert torch.equal(r.read("w", (slice(0, 10),)), want[0:10])
        assert torch.equal(r.read("w", (slice(12, 64), slice(1, 4))), want[12:64, 1:4])
        assert torch.equal(r.read("b"), make_state()["b"])


def test_truncated_data_file_names_the_file(saved: Path) -> None:
    chunk = _first_chunk(saved, "w")
    full = saved / chunk.file
    for keep in (os.path.getsize(full) - 1, chunk.byte_offset + 100, 0):
        os.truncate(full, keep)
        for fn in both_readers(saved):
            with expect_error(saved.parent, ckpt.CorruptCheckpointError, str(full), "truncated"):
                fn()


def test_missing_data_file_names_the_file(saved: Path) -> None:
    chunk = _first_chunk(saved, "w")
    os.unlink(saved / chunk.file)
    for fn in both_readers(saved):
        with expect_error(saved.parent, ckpt.CorruptCheckpointError, str(saved / chunk.file), "missing"):
            fn()


def test_zstd_chunk_corruption_is_caught_before_decompression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "z"
    state = {"w": torch.zeros(64, 32).index_fill_(1, torch.arange(0, 32, 3), 1.5), "b": torch.arange(100, dtype=torch.int16)}
    ckpt.save(state, str(path), options=ckpt.SaveOptions(codec="zstd", max_chunk_bytes=4096))
    got = {"w": torch.empty(64, 32), "b": torch.empty(100, dtype=torch.int16)}
    ckpt.load(got, str(path))  # intact: loads exactly
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])
    chunk = _first_chunk(path, "w")
    assert chunk.codec == "zstd" and chunk.byte_length < chunk.raw_byte_length
    _flip(path, chunk.file, chunk.byte_offset + chunk.byte_length // 2)

    with open(path / chunk.file, "rb") as f:
        f.seek(chunk.byte_offset)
        damaged = f.read(chunk.byte_length)
    import formats.codec

    # Every decode path (whole chunk, pieces, verify) reads the frame header first: spy there.
    real = formats.codec.check_header
    calls: list[bytes] = []

    def spy(data: Any, *a: Any, **k: Any) -> Any:  # intact chunks still decompress; the damaged one must not
        if bytes(data) == damaged:
            calls.append(bytes(data))
        return real(data, *a, **k)

    monkeypatch.setattr(formats.codec, "check_header", spy)
    for fn in [lambda: ckpt.load({"w": torch.empty(64, 32), "b": torch.empty(100, dtype=torch.int16)}, str(path)),
               lambda: ckpt.open(str(path)).read("w", (slice(0, 2),))]:
        with expect_error(tmp_path, ckpt.CorruptCheckpointError, str(path / chunk.file), "'w'", chunk.checksums[0],
                          f"[{chunk.byte_offset}, {chunk.byte_offset + chunk.byte_length})"):
            fn()
    assert not calls, "the damaged zstd frame reached the decompressor"


# -- a damaged or forged manifest ---------------------------------------------------------------------------------


def read_doc(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def write_doc(path: Path, doc: Any) -> None:
    """Write an edited manifest re-sealed, so that the checks behind the manifest checksum are what is tested
    (tests/test_hostile_manifest.py tests that an unsealed edit is refused)."""
    (path / "manifest.json").write_bytes(seal(doc))


def _chunk0(doc: dict[str, Any], key: str = "w") -> dict[str, Any]:
    return next(c for c in doc["entries"][key]["chunks"] if not any(c["offsets"]))


def _set_chunk(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _chunk0(doc).__setitem__(field, value)


def _file_of_w(doc: dict[str, Any]) -> str:
    return _chunk0(doc)["file"]


def _chunk_past_declared_end(doc: dict[str, Any]) -> None:
    c = _chunk0(doc)
    c["byte_offset"] = doc["files"][c["file"]]["size_bytes"] - c["byte_length"] + 1


def _chunk_past_real_end(doc: dict[str, Any]) -> None:
    c = _chunk0(doc)  # consistent with the declared size, but the file on disk is not that long
    doc["files"][c["file"]]["size_bytes"] += 10**6
    c["byte_offset"] += 10**6 - 8192


def _rename_file(new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        old = _file_of_w(doc)
        doc["files"][new] = doc["files"].pop(old)
        for e in doc["entries"].values():
            for c in e.get("chunks", []):
                if c["file"] == old:
                    c["file"] = new
    return mutate


def _overlap_with_hole(doc: dict[str, Any]) -> None:
    chunks = doc["entries"]["w"]["chunks"]  # rows 0-31 twice, rows 32-63 nowhere: same element count
    chunks[:] = [chunks[0], dict(chunks[0])]


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def mutate(doc: dict[str, Any]) -> None:
        d = doc
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return mutate


def _del(*path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        d = doc
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]
    return mutate


UNSAFE = ckpt.UnsafeCheckpointError
CORRUPT = ckpt.CorruptCheckpointError
MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], tuple[str, ...]]] = [
    ("chunk file ../", _set_chunk("file", "../outside.bin"), UNSAFE, ("'..'", "../outside.bin")),
    ("chunk file data/../../", _set_chunk("file", "data/../../outside.bin"), UNSAFE, ("data/../../outside.bin",)),
    ("chunk file absolute", _set_chunk("file", "/etc/passwd"), UNSAFE, ("absolute", "/etc/passwd")),
    ("chunk file backslash", _set_chunk("file", "..\\outside.bin"), UNSAFE, ("backslash",)),
    ("files ../", _rename_file("../../outside.bin"), UNSAFE, ("../../outside.bin",)),
    ("files absolute", _rename_file("/tmp/outside.bin"), UNSAFE, ("absolute", "/tmp/outside.bin")),
    ("negative byte_offset", _set_chunk("byte_offset", -1), CORRUPT, ("'w'", "byte_offset", "-1")),
    ("byte_offset > 2**62", _set_chunk("byte_offset", 2**62 + 1), CORRUPT, ("'w'", "byte_offset")),
    ("byte_offset 2**64", _set_chunk("byte_offset", 2**64), CORRUPT, ("'w'", "byte_offset", str(2**64))),
    ("negative byte_length", _set_chunk("byte_length", -8192), CORRUPT, ("'w'", "byte_length")),
    ("byte_length 2**64", _set_chunk("byte_length", 2**64), CORRUPT, ("'w'", "byte_length")),
    ("negative offsets", _set_chunk("offsets", [-32, 0]), CORRUPT, ("'w'", "offsets")),
    ("offsets 2**63", _set_chunk("offsets", [2**63, 0]), CORRUPT, ("'w'", "offsets")),
    ("negative sizes", _set_chunk("sizes", [32, -32]), CORRUPT, ("'w'", "sizes")),
    ("float offset", _set_chunk("byte_offset", 0.5), CORRUPT, ("'w'", "byte_offset")),
    ("file size 2**64", lambda d: d["files"][_file_of_w(d)].__setitem__("size_bytes", 2**64), CORRUPT, ("size_bytes",)),
    ("negative file size", lambda d: d["files"][_file_of_w(d)].__setitem__("size_bytes", -1), CORRUPT, ("size_bytes",)),
    ("chunk beyond declared file end", _chunk_past_declared_end, CORRUPT, ("'w'", "beyond the end")),
    ("chunk beyond real file end", _chunk_past_real_end, CORRUPT, ("truncated",)),
    ("chunks overlap, leaving a hole", _overlap_with_hole, CORRUPT, ("'w'", "overlap")),
    ("shape [2**40, 2**40]", _set("entries", "w", "shape", [2**40, 2**40]), CORRUPT, ("'w'", "shape")),
    ("shape with 65 dims", _set("entries", "w", "shape", [1] * 65), CORRUPT, ("'w'", "shape")),
    ("format_version 3", _set("format_version", 3), CORRUPT, ("format_version", "3")),
    ("format_version '1'", _set("format_version", "1"), CORRUPT, ("format_version",)),
    ("format_version true", _set("format_version", True), CORRUPT, ("format_version",)),
    ("format_version 1.0", _set("format_version", 1.0), CORRUPT, ("format_version",)),
    ("format_version missing", _del("format_version"), CORRUPT, ("format_version",)),
    ("other format", _set("format", "safetensors"), CORRUPT, ("format",)),
    ("unknown entry kind", _set("entries", "w", "kind", "blob"), CORRUPT, ("'w'", "kind", "blob")),
    ("entry kind missing", _del("entries", "w", "kind"), CORRUPT, ("'w'", "kind")),
    ("unknown dtype", _set("entries", "w", "dtype", "float128"), CORRUPT, ("'w'", "float128")),
    ("dtype not a string", _set("entries", "w", "dtype", 7), CORRUPT, ("'w'", "dtype")),
    ("unknown codec", _set_chunk("codec", "lz4"), CORRUPT, ("'w'", "codec", "lz4")),
    ("checksum list short", _set_chunk("checksums", ["0" * 16]), CORRUPT, ("'w'", "checksums")),
    ("unknown value type", _set("entries", "step", "type", "pickle"), CORRUPT, ("'step'", "pickle")),
    ("entries not an object", _set("entries", []), CORRUPT, ("entries",)),
    ("files missing", _del("files"), CORRUPT, ("files",)),
    ("created_unix_secs a string", _set("created_unix_secs", "yesterday"), CORRUPT, ("created_unix_secs",)),
    ("world_size 0", _set("world_size", 0), CORRUPT, ("world_size",)),
]


@pytest.mark.parametrize("name,mutate,cls,parts", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_forged_manifest(saved: Path, name: str, mutate: Callable[[dict[str, Any]], None], cls: type[Exception],
                         parts: tuple[str, ...]) -> None:
    doc = read_doc(saved)
    mutate(doc)
    write_doc(saved, doc)
    for fn in both_readers(saved):
        with expect_error(saved.parent, cls, *parts):
            fn()


def _pickle_bomb(sentinel: Path) -> bytes:
    class Payload:
        def __reduce__(self) -> Any:
            return (open, (str(sentinel), "w"))  # unpickling this creates the sentinel file

    return pickle.dumps(Payload())


def _duplicate_entry(path: Path) -> bytes:
    """Two entries for tensor ``w``: a JSON parser keeps the last one and silently drops the other."""
    text = (path / "manifest.json").read_text()
    doc = json.loads(text)
    w = json.dumps(doc["entries"]["w"])
    return text.replace('"entries": {', '"entries": {"w": ' + w + ", ", 1).encode()


RAW_CASES: list[tuple[str, Callable[[Path], bytes], tuple[str, ...]]] = [
    ("invalid JSON", lambda p: b'{"format": "ckpt-universal",', ("not valid JSON",)),
    ("empty file", lambda p: b"", ("not valid JSON",)),
    ("not UTF-8", lambda p: b"\xff\xfe{}", ("not valid JSON",)),
    ("JSON list", lambda p: b"[1, 2, 3]", ("JSON object", "list")),
    ("JSON string", lambda p: b'"manifest"', ("JSON object", "str")),
    ("JSON null", lambda p: b"null", ("JSON object",)),
    ("NaN constant", lambda p: (p / "manifest.json").read_bytes().replace(b'"world_size": 1', b'"world_size": NaN'), ("NaN",)),
    ("Infinity constant", lambda p: (p / "manifest.json").read_bytes().replace(b'"world_size": 1', b'"world_size": -Infinity'), ("Infinity",)),
    ("nesting 100000 deep", lambda p: b"[" * 100_000 + b"]" * 100_000, ("not valid JSON",)),
    ("a pickle", lambda p: _pickle_bomb(p.parent / "pwned"), ("not valid JSON",)),
    ("a key twice", lambda p: _duplicate_entry(p), ("not valid JSON", "'w'", "twice")),
]


@pytest.mark.parametrize("name,make,parts", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_unparseable_manifest(saved: Path, name: str, make: Callable[[Path], bytes], parts: tuple[str, ...]) -> None:
    data = reseal(make(saved))  # text edits of a sealed manifest re-sealed: the parser's checks are tested
    (saved / "manifest.json").write_bytes(data)
    for fn in both_readers(saved):
        with expect_error(saved.parent, ckpt.CorruptCheckpointError, str(saved / "manifest.json"), *parts):
            fn()
    assert not (saved.parent / "pwned").exists(), "reading a manifest executed code"


def test_inconsistent_containers(saved: Path) -> None:
    doc = read_doc(saved)
    doc["entries"]["lst"] = {"kind": "container", "type": "list", "length": 3}  # ... but has no items at all
    write_doc(saved, doc)
    with expect_error(saved.parent, ckpt.CorruptCheckpointError, "'lst'", "containers"):  # refused at open now
        with ckpt.open(str(saved)) as r:
            r.state()


# -- absurd sizes must not allocate -------------------------------------------------------------------------------


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_headroom(extra_bytes: int = 1 << 30) -> Iterator[None]:
    """Let this process map at most ``extra_bytes`` more: a huge allocation fails instead of being overcommitted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        with pytest.raises(RuntimeError):  # the guard works: 2 GiB cannot be had now
            torch.empty(2 << 30, dtype=torch.uint8)
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _huge_tensor(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    """Declare ``b`` a uint8 tensor of ``shape`` in one raw chunk, with its file declared that large too."""
    def mutate(doc: dict[str, Any]) -> None:
        e = doc["entries"]["b"]
        c = dict(e["chunks"][0])
        n = math.prod(shape)
        e.update(dtype="uint8", shape=shape, chunks=[c])
        c.update(offsets=[0] * len(shape), sizes=shape, byte_offset=0, byte_length=n, raw_byte_length=n,
                 block_bytes=n, checksums=[c["checksums"][0]])
        doc["files"][c["file"]]["size_bytes"] = n
    return mutate


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**31, 2**31], [2**17, 2**17], [2**36]],
                         ids=["2^80 elements", "2^62 bytes", "16 GiB", "64 GiB flat"])
def test_absurd_shape_does_not_allocate(saved: Path, shape: list[int]) -> None:
    doc = read_doc(saved)
    _huge_tensor(shape)(doc)
    write_doc(saved, doc)
    state = blank_state()
    with address_space_headroom():
        for fn in [lambda: ckpt.open(str(saved)).read("b"), lambda: ckpt.open(str(saved)).read("b", (0,)),
                   lambda: ckpt.load(state, str(saved), strict=False)]:
            with expect_error(saved.parent, ckpt.CheckpointError, max_secs=2.0) as caught:
                fn()
            assert isinstance(caught[0], (ckpt.CorruptCheckpointError, ckpt.ShardMismatchError)), caught[0]
    assert torch.equal(state["w"], blank_state()["w"]), "a failing load touched the state"


def _zstd_frame(declared_bytes: int, payload: bytes) -> bytes:
    """A zstd frame whose header declares ``declared_bytes`` of content, holding one raw block of ``payload``."""
    header = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", declared_bytes)  # 8-byte size
    block = struct.pack("<I", 1 | (len(payload) << 3))[:3]  # last block, raw, len(payload) bytes
    return header + block + payload


def test_forged_zstd_frame_does_not_allocate(tmp_path: Path) -> None:
    """A frame with a valid checksum whose header promises 1 TiB: refused before zstd allocates anything."""
    path = tmp_path / "z"
    ckpt.save({"b": torch.arange(100, dtype=torch.int16)}, str(path), options=ckpt.SaveOptions(codec="zstd"))
    doc = read_doc(path)
    c = doc["entries"]["b"]["chunks"][0]
    forged = _zstd_frame(2**40, b"\0" * 200)
    data = path / c["file"]
    with open(data, "ab") as f:
        c["byte_offset"] = f.tell()
        f.write(forged)
    c.update(byte_length=len(forged), block_bytes=len(forged), checksums=[checksum.digest(forged)])
    doc["files"][c["file"]]["size_bytes"] = os.path.getsize(data)
    write_doc(path, doc)
    with address_space_headroom():
        for fn in [lambda: ckpt.open(str(path)).read("b"),
                   lambda: ckpt.load({"b": torch.empty(100, dtype=torch.int16)}, str(path))]:
            with expect_error(tmp_path, ckpt.CorruptCheckpointError, str(data), "'b'", str(2**40), max_secs=2.0):
                fn()


# -- state and checkpoint do not match ----------------------------------------------------------------------------


def test_strict_load_reports_every_mismatch_at_once(saved: Path) -> None:
    state = blank_state()
    del state["b"]  # in the checkpoint, not in the state
    state["w"] = torch.full((64, 33), 7.0)  # wrong shape
    state["extra"] = torch.zeros(3)  # in the state, not in the checkpoint
    state["lr"] = 0.1  # a value in the state, not in the checkpoint
    with expect_error(saved.parent, ckpt.ShardMismatchError, "4 problem(s)", "'b'", "'extra'", "'lr'",
                      "shape [64, 33] in the state, [64, 32] in the checkpoint", "strict=False"):
        ckpt.load(state, str(saved))
    assert torch.equal(state["w"], torch.full((64, 33), 7.0)), "a failing load touched the state"
    assert state["step"] == 0


def test_non_strict_load_tolerates_missing_and_unexpected_but_not_shapes(saved: Path) -> None:
    state = blank_state()
    del state["b"]
    state["extra"] = torch.zeros(3)
    ckpt.load(state, str(saved), strict=False)
    want = make_state()
    assert torch.equal(state["w"], want["w"]) and state["step"] == 5 and state["name"] == "run-1"
    assert torch.equal(state["extra"], torch.zeros(3))

    state["w"] = torch.full((32, 64), 7.0)
    with expect_error(saved.parent, ckpt.ShardMismatchError, "'w'", "shape [32, 64] in the state", "1 problem(s)") as c:
        ckpt.load(state, str(saved), strict=False)
    assert "'extra'" not in str(c[0]) and "'b'" not in str(c[0])


# -- missing, incomplete, already there ---------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    for path in [tmp_path / "nothing_here", tmp_path]:  # a missing directory, and an empty one
        for fn in both_readers(path):
            with expect_error(tmp_path, ckpt.CheckpointNotFoundError, str(path)):
                fn()
    assert not (tmp_path / "nothing_here").exists(), "reading created the directory"


def test_data_without_manifest_is_incomplete(saved: Path) -> None:
    os.unlink(saved / "manifest.json")
    for fn in both_readers(saved):
        with expect_error(saved.parent, ckpt.IncompleteCheckpointError, str(saved), "manifest.json"):
            fn()


def test_save_onto_committed_checkpoint_without_overwrite(saved: Path) -> None:
    other = {k: (v + 1 if isinstance(v, torch.Tensor) else v) for k, v in make_state().items()}
    with expect_error(saved.parent, ckpt.CheckpointExistsError, str(saved), "overwrite=True"):
        ckpt.save(other, str(saved), options=ckpt.SaveOptions(**OPTIONS))
    got = blank_state()
    ckpt.load(got, str(saved))
    assert_same(got, make_state())


def test_every_named_error_is_a_checkpoint_error() -> None:
    for cls in (ckpt.CheckpointNotFoundError, ckpt.IncompleteCheckpointError, ckpt.CorruptCheckpointError,
                ckpt.UnsafeCheckpointError, ckpt.ShardMismatchError, ckpt.CheckpointExistsError):
        assert issubclass(cls, ckpt.CheckpointError) and issubclass(cls, Exception)
    assert issubclass(ckpt.UnsafeCheckpointError, ckpt.CorruptCheckpointError)


def test_pristine_fixture_loads(saved: Path) -> None:
    """The fixture checkpoint itself is sound, so every failure above comes from its damage alone."""
    got = blank_state()
    ckpt.load(got, str(saved))
    assert_same(got, make_state())
    with ckpt.open(str(saved)) as r:
        assert_same(r.state(), make_state())
