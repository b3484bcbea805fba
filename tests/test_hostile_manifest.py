"""Hostile manifests (#22 items 2-6): the manifest checksum, the key tree, allocation bounds and validation that
stays O(n log n) for adversarial chunk layouts.

Edits made without re-sealing must be refused by the checksum; edits re-sealed with ``formats.manifest.seal`` must
still be refused by the checks behind it. Bounded time is enforced with ``pytest.mark.timeout`` (generous: each
case took tens to hundreds of seconds before the fix and well under a second after).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckpt
from ckpt.cli import main as cli_main, verify_checkpoint
from formats import box as box_mod, checksum, manifest as M, manifest_seal
from formats.box import Box, tiling_fault
from formats.manifest import CHECKSUM_FIELD, seal
from formats.nesting import flatten
from tests.test_bad_input import address_space_headroom, expect_error

pytestmark = pytest.mark.timeout(120)
CORRUPT = ckpt.CorruptCheckpointError


def _state() -> dict[str, Any]:
    return {"w": torch.arange(16, dtype=torch.float32), "lr": 0.001, "step": 5, "name": "run-1"}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ck"  # w in two chunks of one file, so that their byte offsets can be swapped
    ckpt.save(_state(), str(path), options=ckpt.SaveOptions(max_chunk_bytes=32, files_per_rank=1))
    return path


def _readers(path: Path) -> list[Callable[[], Any]]:
    def load() -> None:
        ckpt.load({"w": torch.zeros(16), "lr": 0.0, "step": 0, "name": ""}, str(path))

    def read() -> None:
        with ckpt.open(str(path)) as r:
            r.state()

    return [load, read]


def _doc(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def _swap_offsets(text: str) -> str:
    doc = json.loads(text)
    a, b = doc["entries"]["w"]["chunks"]
    assert a["file"] == b["file"]
    a["byte_offset"], b["byte_offset"] = b["byte_offset"], a["byte_offset"]
    a["checksums"], b["checksums"] = b["checksums"], a["checksums"]  # consistent: every data checksum still holds
    return manifest_seal._head(doc)[:-4] + text[text.rindex("\n }"):]  # same layout, old seal kept


EDITS: list[tuple[str, Callable[[str], str]]] = [
    ("lr 0.001 -> 0.003", lambda t: t.replace('"value": 0.001', '"value": 0.003')),
    ("step 5 -> 6", lambda t: t.replace('"value": 5}', '"value": 6}')),
    ("name run-1 -> run-2", lambda t: t.replace('"run-1"', '"run-2"')),
    ("two chunks' offsets swapped", _swap_offsets),
    ("float32 -> int32", lambda t: t.replace('"dtype": "float32"', '"dtype": "int32"')),
]


@pytest.mark.parametrize("name,edit", EDITS, ids=[e[0] for e in EDITS])
def test_unsealed_edit_is_refused(saved: Path, name: str, edit: Callable[[str], str]) -> None:
    text = (saved / "manifest.json").read_text()
    edited = edit(text)
    assert edited != text and json.loads(edited)  # a real edit, still valid JSON
    expected = json.loads(text)[CHECKSUM_FIELD]
    found = checksum.digest(edited[: edited.rindex(f'"{CHECKSUM_FIELD}"')].encode())
    (saved / "manifest.json").write_text(edited)
    for fn in _readers(saved):
        with expect_error(saved.parent, CORRUPT, str(saved / "manifest.json"), expected, found, "edited or damaged"):
            fn()
    assert cli_main(["verify", str(saved)]) == 1


def test_resealed_edit_loads_and_seal_is_stable(saved: Path) -> None:
    """The seal is a pure function of the document: sealing what was read gives the file back byte for byte,
    and a deliberate, re-sealed edit loads (what tests of the checks behind the seal rely on)."""
    data = (saved / "manifest.json").read_bytes()
    doc = json.loads(data)
    assert seal(doc) == data and M.reseal(data) == data
    assert data.count(b"\n") == len(doc["entries"]) + len(doc["files"]) + 15  # one line per entry and file
    doc["entries"]["lr"]["value"] = 0.003
    (saved / "manifest.json").write_bytes(seal(doc))
    with ckpt.open(str(saved)) as r:
        assert r.read("lr") == 0.003


def test_legacy_v1_manifest_loads_without_checksum(saved: Path) -> None:
    doc = _doc(saved)
    del doc[CHECKSUM_FIELD]
    doc["format_version"] = 1
    (saved / "manifest.json").write_text(json.dumps(doc, indent=1))  # as a v1 writer wrote it
    state = {"w": torch.zeros(16), "lr": 0.0, "step": 0, "name": ""}
    ckpt.load(state, str(saved))
    assert torch.equal(state["w"], _state()["w"]) and state["lr"] == 0.001 and state["step"] == 5
    with ckpt.open(str(saved)) as r:
        assert r.manifest.format_version == 1
        assert M.Manifest.from_json(r.manifest.to_json(), "again").format_version == M.FORMAT_VERSION  # re-sealed


@pytest.mark.parametrize("case", ["v2 without checksum", "checksum not last", "checksum not hex", "v1 with a bad one"])
def test_missing_or_misplaced_checksum_is_refused(saved: Path, case: str) -> None:
    doc = _doc(saved)
    if case == "v2 without checksum":
        del doc[CHECKSUM_FIELD]
        text = json.dumps(doc)
    elif case == "checksum not last":
        text = json.dumps({CHECKSUM_FIELD: doc.pop(CHECKSUM_FIELD), **doc})
    elif case == "checksum not hex":
        text = json.dumps({**doc, CHECKSUM_FIELD: "XYZ"})
    else:
        doc["format_version"] = 1
        text = json.dumps({**doc, CHECKSUM_FIELD: "0" * 16})
    (saved / "manifest.json").write_text(text)
    parts = ("checksum",) if case == "v1 with a bad one" else (CHECKSUM_FIELD, "edited or damaged")
    for fn in _readers(saved):
        with expect_error(saved.parent, CORRUPT, str(saved / "manifest.json"), *parts):
            fn()


def test_manifest_size_cap(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CORRUPT, match="manifest is 1073741825 bytes"):
        M.check_manifest_size(M.MAX_MANIFEST_BYTES + 1, "m.json")
    M.check_manifest_size(M.MAX_MANIFEST_BYTES, "m.json")
    monkeypatch.setattr(manifest_seal, "MAX_MANIFEST_BYTES", 100)
    for fn in _readers(saved):
        with expect_error(saved.parent, CORRUPT, str(saved / "manifest.json"), "more than the 100 bytes"):
            fn()


# -- the key tree -------------------------------------------------------------------------------------------------


def _deep(n: int, typ: str = "dict") -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        k = ""
        comp = "a" if typ == "dict" else "0"
        for _ in range(n):
            doc["entries"][f"{k}/{comp}" if k else comp] = {"kind": "container", "type": typ,
                                                             **({} if typ == "dict" else {"length": 1})}
            k = f"{k}/{comp}" if k else comp
        doc["entries"][k + "/" + comp] = {"kind": "value", "type": "int", "value": 1}
    return mutate


def _set_entry(key: str, entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"].__setitem__(key, entry)


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"].__setitem__(new, doc["entries"].pop(old))


TREE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    ("key /step", _rename("step", "/step"), ("'/step'", "starts with '/'")),
    ("600 nested containers", _deep(600), ("more than 65", "components")),
    ("600 nested lists", _deep(600, "list"), ("more than 65", "components")),
    ("600 implicit levels", _set_entry("/".join(["a"] * 600), {"kind": "value", "type": "int", "value": 1}),
     ("more than 65",)),
    ("root container a list", _set_entry("", {"kind": "container", "type": "list", "length": 4}),
     ("list ''", "'lr'", "0 .. 3")),
    ("int_keys ['w']", _set_entry("", {"kind": "container", "type": "dict", "int_keys": ["w"]}),
     ("key ''", "int_keys", "['w']")),
    ("int_keys on a list", _set_entry("l", {"kind": "container", "type": "list", "length": 0, "int_keys": ["0"]}),
     ("'l'", "int_keys")),
    ("list of length 2**31", _set_entry("l", {"kind": "container", "type": "list", "length": 2**31}),
     ("'l'", "length 2147483648 has 0 items")),
    ("list item 01", lambda d: (d["entries"].update({"l": {"kind": "container", "type": "list", "length": 2},
                                                     "l/0": d["entries"]["lr"], "l/01": d["entries"]["lr"]})),
     ("'l/01'", "'01'")),
    ("value below a tensor", _set_entry("w/x", {"kind": "value", "type": "int", "value": 1}),
     ("'w/x'", "below 'w'")),
    ("value below a value, implicitly", _set_entry("step/a/b", {"kind": "value", "type": "int", "value": 1}),
     ("'step/a/b'", "below 'step'")),
    ("dict with a length", _set_entry("", {"kind": "container", "type": "dict", "length": 7}), ("key ''", "length")),
]


@pytest.mark.parametrize("name,mutate,parts", TREE_CASES, ids=[c[0] for c in TREE_CASES])
def test_malformed_key_tree(saved: Path, name: str, mutate: Callable[[dict[str, Any]], None],
                            parts: tuple[str, ...]) -> None:
    doc = _doc(saved)
    mutate(doc)
    (saved / "manifest.json").write_bytes(seal(doc))
    with address_space_headroom():
        for fn in _readers(saved):
            with expect_error(saved.parent, CORRUPT, str(saved / "manifest.json"), *parts, max_secs=5.0):
                fn()
        assert cli_main(["convert", str(saved), str(saved.parent / "out.pt"), "--to", "torch", "--no-progress"]) == 2


def test_implicit_parents_and_lists_of_dicts_still_load(tmp_path: Path) -> None:
    """What the tree check must keep accepting: lists of dicts whose items have no record of their own (foreign
    converters write those), dict keys '' below the top level, int keys."""
    state = {"l": [{"a": torch.ones(2)}, {"": 1, "b": (2, 3)}], 4: {"-1": 0}, "e": []}
    ckpt.save(state, str(tmp_path / "c"))
    doc = _doc(tmp_path / "c")
    del doc["entries"]["l/0"]  # an implicit dict under a list
    (tmp_path / "c" / "manifest.json").write_bytes(seal(doc))
    with ckpt.open(str(tmp_path / "c")) as r:
        got = r.state()
    assert torch.equal(got["l"][0]["a"], torch.ones(2)) and got["l"][1] == {"": 1, "b": (2, 3)}
    assert got[4] == {"-1": 0} and got["e"] == []


def test_top_level_empty_key_is_refused_at_save() -> None:
    with pytest.raises(ckpt.UnsupportedStateError, match="key ''"):
        flatten({"": torch.ones(1), "w": torch.ones(1)})
    assert "x/" in flatten({"x": {"": 1}}).values  # below the top level it is stored


LAYOUTS = [{}, {"mesh_shape": 5, "placements": 3}, {"mesh_shape": [2], "placements": [1]},
           {"mesh_shape": [2, 2], "placements": ["Shard(dim=0)"]}, {"mesh_shape": [2], "placements": ["R"],
                                                                    "mesh_dim_names": "dp"}, []]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[json.dumps(x) for x in LAYOUTS])
def test_malformed_saved_layout(saved: Path, layout: Any, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc(saved)
    doc["entries"]["w"]["saved_layout"] = layout
    (saved / "manifest.json").write_bytes(seal(doc))
    assert cli_main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err
    assert str(saved / "manifest.json") in err and "'w'" in err and "saved_layout" in err
    with expect_error(saved.parent, CORRUPT, "saved_layout"):
        ckpt.open(str(saved))


def test_good_saved_layout_is_shown(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc(saved)
    doc["entries"]["w"]["saved_layout"] = {"mesh_shape": [2], "mesh_dim_names": None, "placements": ["Shard(dim=0)"]}
    (saved / "manifest.json").write_bytes(seal(doc))
    assert cli_main(["inspect", str(saved)]) == 0 and "mesh [2] Shard(dim=0)" in capsys.readouterr().out


# -- validation in O(n log n) -------------------------------------------------------------------------------------


def _sparse_checkpoint(path: Path, nbytes: int) -> tuple[dict[str, Any], str]:
    ckpt.save({"x": torch.zeros(1)}, str(path))
    doc = _doc(path)
    f = next(iter(doc["files"]))
    with open(path / f, "r+b") as fh:
        fh.truncate(nbytes)
    doc["files"][f]["size_bytes"] = nbytes
    return doc, f


def _zstd_chunk(f: str, offsets: list[int], sizes: list[int]) -> dict[str, Any]:
    n = 1
    for s in sizes:
        n *= s
    return {"offsets": offsets, "sizes": sizes, "file": f, "byte_offset": 0, "byte_length": 0, "codec": "zstd",
            "raw_byte_length": n, "block_bytes": 1, "checksums": [checksum.digest(b"")]}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("broken", [False, True], ids=["exact", "one overlap"])
def test_staircase_tiling_validates_fast(tmp_path: Path, broken: bool) -> None:
    """Column j of an m x m tensor as rows [0, j) and [j, m): 20,000 chunks whose extents overlap along both dims,
    which made a sweep or pairwise check quadratic (8,000 such chunks: 28 s; 20,000: minutes)."""
    m = 10_000
    doc, f = _sparse_checkpoint(tmp_path / "s", 16)
    chunks = [_zstd_chunk(f, [o, j], [s, 1]) for j in range(m) for o, s in ((0, j), (j, m - j)) if s]
    if broken:  # move one chunk down a row onto its neighbour: same volume, one overlap and one hole
        c = chunks[len(chunks) // 2]
        c["offsets"][0] += 1 if c["offsets"][0] + c["sizes"][0] < m else -1
    doc["entries"]["x"] = {"kind": "tensor", "dtype": "uint8", "shape": [m, m], "chunks": chunks}
    (tmp_path / "s" / "manifest.json").write_bytes(seal(doc))
    if broken:
        with expect_error(tmp_path, CORRUPT, "'x'", "chunk", max_secs=20):
            ckpt.open(str(tmp_path / "s"))
    else:
        with ckpt.open(str(tmp_path / "s")) as r:
            assert len(r.info("x").chunks) == len(chunks)


@pytest.mark.timeout(30)
def test_3d_grid_validates_fast(tmp_path: Path) -> None:
    doc, f = _sparse_checkpoint(tmp_path / "g", 16)
    n = 28  # 28^3 = 21,952 unit chunks, all differing along three dims
    chunks = [_zstd_chunk(f, [a, b, c], [1, 1, 1]) for a, b, c in itertools.product(range(n), repeat=3)]
    random.Random(0).shuffle(chunks)
    doc["entries"]["x"] = {"kind": "tensor", "dtype": "uint8", "shape": [n, n, n], "chunks": chunks}
    (tmp_path / "g" / "manifest.json").write_bytes(seal(doc))
    ckpt.open(str(tmp_path / "g")).close()
    chunks[5] = dict(chunks[5], offsets=list(chunks[6]["offsets"]))
    (tmp_path / "g" / "manifest.json").write_bytes(seal(doc))
    with expect_error(tmp_path, CORRUPT, "'x'", "overlap", max_secs=20):
        ckpt.open(str(tmp_path / "g"))


@pytest.mark.timeout(30)
def test_many_empty_containers_validate_and_nest_fast(tmp_path: Path) -> None:
    """20,000 empty containers below 20,000 implicit parents: nest compared each parent with a growing list."""
    doc, _ = _sparse_checkpoint(tmp_path / "c", 4)
    for i in range(20_000):
        doc["entries"][f"c{i}/d"] = {"kind": "container", "type": "dict"}
    (tmp_path / "c" / "manifest.json").write_bytes(seal(doc))
    with ckpt.open(str(tmp_path / "c")) as r:
        got = r.state()
    assert len(got) == 20_001 and got["c7"] == {"d": {}}


@pytest.mark.timeout(90)
def test_verify_of_20000_chunks_is_not_quadratic(tmp_path: Path) -> None:
    """``ckpt verify`` of a checkpoint saved with ``max_chunk_bytes=4``: 20,000 chunks, which ran past 190 s (the
    quadratic boxes_tile) while its load takes about 2.5 s; now about as long as the load."""
    n = 20_000
    ckpt.save({"w": torch.arange(n, dtype=torch.float32)}, str(tmp_path / "v"),
              options=ckpt.SaveOptions(max_chunk_bytes=4))
    with ckpt.open(str(tmp_path / "v")) as r:
        assert len(r.info("w").chunks) == n
        assert verify_checkpoint(r) == []


def _brute(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...]) -> bool:
    count: dict[tuple[int, ...], int] = {}
    for o, s in boxes:
        for p in itertools.product(*[range(a, a + n) for a, n in zip(o, s)]):
            count[p] = count.get(p, 0) + 1
    return all(count.get(p, 0) == 1 for p in itertools.product(*[range(n) for n in shape]))


def _split(b: Box, rng: random.Random, depth: int) -> list[Box]:
    if depth == 0 or b.ndim == 0 or rng.random() < 0.3:
        return [b]
    d = rng.randrange(b.ndim)
    if b.sizes[d] < 2:
        return [b]
    c = rng.randrange(1, b.sizes[d])
    lo = Box(b.offsets, b.sizes[:d] + (c,) + b.sizes[d + 1:])
    hi = Box(b.offsets[:d] + (b.offsets[d] + c,) + b.offsets[d + 1:], b.sizes[:d] + (b.sizes[d] - c,) + b.sizes[d + 1:])
    return _split(lo, rng, depth - 1) + _split(hi, rng, depth - 1)


@pytest.mark.parametrize("pairwise", [False, True], ids=["corner sums", "pairwise fallback"])
def test_tiling_fault_agrees_with_counting_elements(pairwise: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if pairwise:
        monkeypatch.setattr(box_mod, "MAX_TERMS_PER_BOX", 0)
        monkeypatch.setattr(box_mod, "_SMALL_TERMS", 0)
    rng = random.Random(7)
    faults = 0
    for _ in range(1500):
        shape = tuple(rng.randrange(1, 5) for _ in range(rng.randrange(0, 4)))
        boxes = [(b.offsets, b.sizes) for b in _split(Box.whole(shape), rng, 5)]
        r = rng.random()
        if r < 0.3 and shape:  # shrink or shift one box
            i = rng.randrange(len(boxes))
            o, s = list(boxes[i][0]), list(boxes[i][1])
            d = rng.randrange(len(shape))
            if o[d] > 0 and rng.random() < 0.5:
                o[d] -= 1
            else:
                s[d] -= 1
            boxes[i] = (tuple(o), tuple(s))
        elif r < 0.45:
            boxes.append(boxes[rng.randrange(len(boxes))])
        elif r < 0.55:
            boxes.pop(rng.randrange(len(boxes)))
        rng.shuffle(boxes)
        fault = tiling_fault(boxes, shape)
        assert (fault is None) == _brute(boxes, shape), (shape, boxes, fault)
        if fault is not None and fault.point is not None:
            faults += 1
            cover = [i for i, (o, s) in enumerate(boxes) if all(a <= x < a + n for a, n, x in zip(o, s, fault.point))]
            assert len(cover) != 1 and set(fault.covering) <= set(cover), (shape, boxes, fault)
            assert len(fault.covering) == min(2, len(cover)), (shape, boxes, fault)
    assert faults > 300


def test_tiling_too_complex_to_check_is_refused_not_slow() -> None:
    """Boxes ending inside 20 dims would cost 2**20 corner terms each: refused (no writer splits that way)."""
    shape = (2,) * 20
    codes = random.Random(0).sample(range(1 << 20), 600)  # distinct corners; a box ends inside ~10 dims
    boxes = [(tuple((i >> d) & 1 for d in range(20)), (1,) * 20) for i in codes]
    fault = tiling_fault(boxes, shape)
    assert fault is not None and fault.too_complex and "too many dims" in fault.describe(["b"] * 600)
