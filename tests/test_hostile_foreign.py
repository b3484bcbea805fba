"""Hostile input to the foreign-format readers (issue #22 items 3, 4 and 5): FIFOs and other non-regular files,
data files linked out of the checkpoint directory, DCP metadata of allowed classes with wrong field types, deeply
nested JSON side files, inconsistent containers, and dtypes without arithmetic. Each must raise a named
``CheckpointError`` quickly, never hang, never raise a raw exception, never allocate what the metadata declares."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckpt
from formats.foreign import diff, open_source
from formats.foreign.pickle_guard import loads_checked
from formats.foreign.source import leaf_path
from formats.manifest import ContainerEntry
from tests.test_bad_input import address_space_headroom

pytestmark = pytest.mark.timeout(60)  # a FIFO that is opened blocks forever: the timeout fails the test


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, data, off = {}, b"", 0
    for k, t in tensors.items():
        b = t.numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        data += b
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _refuses(cls: type[BaseException], fn: Callable[[], Any], *parts: str) -> str:
    with pytest.raises(cls) as info:
        fn()
    assert isinstance(info.value, ckpt.CheckpointError)
    for p in parts:
        assert p in str(info.value), f"{p!r} missing from: {info.value}"
    return str(info.value)


# -- FIFOs (item 3) -----------------------------------------------------------------------------------------------


def test_fifo_named_safetensors_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(fifo)), str(fifo), "FIFO")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(fifo), "safetensors"), str(fifo), "FIFO")


def test_fifo_shard_in_directory_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path)), "model.safetensors", "FIFO")


def test_fifo_index_is_refused(tmp_path: Path) -> None:
    _safetensors(tmp_path / "a.safetensors", {"w": torch.ones(3)})
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path), "safetensors"),
             "model.safetensors.index.json", "FIFO")


def test_fifo_config_json_is_ignored_not_opened(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})
    os.mkfifo(tmp_path / "config.json")
    with open_source(str(tmp_path)) as src:
        assert torch.equal(src.read("model/w"), torch.ones(3))
        assert "hf_config" not in src.metadata


def test_fifo_torch_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.pt")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path / "x.pt"), "torch"), "x.pt", "FIFO")


def test_fifo_dcp_metadata_and_data_file_are_refused(dcp_dir: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    shutil.copytree(dcp_dir, a)
    os.remove(a / ".metadata")
    os.mkfifo(a / ".metadata")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(a), "dcp"), ".metadata", "FIFO")
    b = tmp_path / "b"
    shutil.copytree(dcp_dir, b)
    data = next(b.glob("*.distcp"))
    os.remove(data)
    os.mkfifo(data)
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(b), "dcp"), data.name, "FIFO")


def test_fifo_deepspeed_latest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "global_step1").mkdir()
    os.mkfifo(tmp_path / "latest")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path), "deepspeed"), "latest", "FIFO")


# -- JSON side files and containers (item 4) ----------------------------------------------------------------------


def test_deeply_nested_index_is_corrupt(tmp_path: Path) -> None:
    _safetensors(tmp_path / "a.safetensors", {"w": torch.ones(3)})
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path)), "model.safetensors.index.json",
             "nested too deeply")


def test_deeply_nested_config_is_ignored(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with open_source(str(tmp_path)) as src:  # informational: dropped, never a RecursionError
        assert "hf_config" not in src.metadata


@pytest.mark.parametrize("root", [ContainerEntry("", "list", 1), ContainerEntry("", "dict", 0, ("w",))],
                         ids=["root-list", "int_keys-w"])
def test_non_integer_item_of_a_list_is_corrupt(root: ContainerEntry) -> None:
    _refuses(ckpt.CorruptCheckpointError, lambda: leaf_path("w", {"": root}, "ck"), "ck", "'w'", "integer")


def test_root_list_manifest_converts_to_an_error(tmp_path: Path) -> None:
    ckpt.save({"w": torch.ones(3)}, str(tmp_path / "u"))
    m = json.loads((tmp_path / "u" / "manifest.json").read_text())
    m["entries"][""] = {"kind": "container", "type": "list", "length": 1}
    (tmp_path / "u" / "manifest.json").write_text(json.dumps(m))
    from formats.foreign import convert
    for fmt, dst in (("torch", "o.pt"), ("dcp", "o")):
        with pytest.raises(ckpt.CheckpointError):  # the manifest validator may refuse it first; never ValueError
            convert(str(tmp_path / "u"), str(tmp_path / fmt / dst), dst_format=fmt)


def test_diff_of_a_dtype_without_arithmetic(tmp_path: Path) -> None:
    f4 = getattr(torch, "float4_e2m1fn_x2", None)
    if f4 is None:
        pytest.skip("this torch has no float4_e2m1fn_x2")
    torch.save({"w": torch.zeros(4, dtype=torch.uint8).view(f4)}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([0, 1, 0, 2], dtype=torch.uint8).view(f4)}, tmp_path / "b.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "c.pt")
    a, b, c = (open_source(str(tmp_path / n)) for n in ("a.pt", "b.pt", "c.pt"))
    assert diff(a, a).equal
    (d,) = diff(a, b).differences
    assert d.kind == "value" and d.mismatched == 2
    (d,) = diff(a, c).differences
    assert d.kind == "dtype"


# -- DCP metadata of allowed classes with wrong field types (item 4) ----------------------------------------------


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed.checkpoint as dcp

    d = tmp_path_factory.mktemp("dcp") / "ck"
    dcp.save({"w": torch.arange(12.0).reshape(3, 4), "step": 3}, checkpoint_id=str(d), no_dist=True)
    return d


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # DCP's dataclasses may be frozen


def _storage(m: Any) -> list[Any]:
    return list(m.storage_data.values())


MUTATIONS: dict[str, tuple[Callable[[Any], None], tuple[str, ...]]] = {
    "offset-str": (lambda m: [_set(i, "offset", "abc") for i in _storage(m)], ("offset", "'abc'")),
    "length-list": (lambda m: [_set(i, "length", [1]) for i in _storage(m)], ("length", "[1]")),
    "length-negative": (lambda m: [_set(i, "length", -1) for i in _storage(m)], ("length",)),
    "chunks-none": (lambda m: _set(m.state_dict_metadata["w"], "chunks", None), ("'w'", "chunks", "NoneType")),
    "size-int": (lambda m: _set(m.state_dict_metadata["w"], "size", 5), ("'w'", "size", "5")),
    "properties-none": (lambda m: _set(m.state_dict_metadata["w"], "properties", None), ("'w'", "properties")),
    "dtype-str": (lambda m: _set(m.state_dict_metadata["w"].properties, "dtype", "float32"), ("'w'", "dtype")),
    "chunk-offsets-str": (lambda m: _set(m.state_dict_metadata["w"].chunks[0], "offsets", "ab"), ("'w'", "chunks[0]")),
    "storage-none": (lambda m: _set(m, "storage_data", None), ("storage_data",)),
    "planner-str": (lambda m: _set(m, "planner_data", {"w": "w", "step": ("step",)}), ("'w'", "planner_data")),
    "planner-huge-index": (lambda m: _set(m, "planner_data", {"w": ("a", 2**40), "step": ("step",)}),
                           ("'w'", "planner_data")),
    "entries-list": (lambda m: _set(m, "state_dict_metadata", []), ("state_dict_metadata",)),
    # A flipped byte in a field's name unpickles into an object without that field (fuzz seed 240).
    "entries-missing": (lambda m: object.__delattr__(m, "state_dict_metadata"),
                        ("malformed", "AttributeError", "state_dict_metadata")),
    "chunk-sizes-missing": (lambda m: object.__delattr__(m.state_dict_metadata["w"].chunks[0], "sizes"),
                            ("malformed", "sizes")),
}


def _mutated(dcp_dir: Path, tmp_path: Path, mutate: Callable[[Any], None]) -> Path:
    meta = loads_checked((dcp_dir / ".metadata").read_bytes(), "fixture")
    m = copy.deepcopy(meta)
    mutate(m)
    out = tmp_path / "ck"
    shutil.copytree(dcp_dir, out)
    (out / ".metadata").write_bytes(pickle.dumps(m))
    return out


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_dcp_metadata_field_of_wrong_type(dcp_dir: Path, tmp_path: Path, name: str) -> None:
    mutate, parts = MUTATIONS[name]
    out = _mutated(dcp_dir, tmp_path, mutate)

    def read_all() -> None:
        with open_source(str(out), "dcp") as src:
            for k in src.tensors:
                src.read(k)

    _refuses(ckpt.CorruptCheckpointError, read_all, ".metadata", *parts)


def test_dcp_huge_declared_size_is_bounded_by_the_data_files(dcp_dir: Path, tmp_path: Path) -> None:
    def huge(m: Any) -> None:
        e = m.state_dict_metadata["w"]
        _set(e, "size", torch.Size([2**20, 2**20]))
        _set(e.chunks[0], "sizes", torch.Size([2**20, 2**20]))

    out = _mutated(dcp_dir, tmp_path, huge)
    with address_space_headroom(1 << 30):
        _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(out), "dcp"), "'w'", "4398046511104 bytes")


def test_dcp_untouched_metadata_still_reads(dcp_dir: Path, tmp_path: Path) -> None:
    out = _mutated(dcp_dir, tmp_path, lambda m: None)
    with open_source(str(out), "dcp") as src:
        assert torch.equal(src.read("w"), torch.arange(12.0).reshape(3, 4))
        assert src.values["step"] == 3


# -- links out of the checkpoint (item 5) -------------------------------------------------------------------------


def _move_out(path: Path, outside: Path) -> None:
    outside.mkdir(exist_ok=True)
    target = outside / path.name
    shutil.move(path, target)
    os.symlink(target, path)


def test_dcp_data_file_linked_outside_is_refused(dcp_dir: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(dcp_dir, ck)
    data = next(ck.glob("*.distcp"))
    _move_out(data, tmp_path / "outside")
    _refuses(ckpt.UnsafeCheckpointError, lambda: open_source(str(ck), "dcp"), str(data),
             str(tmp_path / "outside" / data.name))


def test_dcp_link_inside_the_directory_is_read(dcp_dir: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(dcp_dir, ck)
    data = next(ck.glob("*.distcp"))
    (ck / "real").mkdir()
    shutil.move(data, ck / "real" / data.name)
    os.symlink(ck / "real" / data.name, data)
    with open_source(str(ck), "dcp") as src:
        assert torch.equal(src.read("w"), torch.arange(12.0).reshape(3, 4))


def test_safetensors_shard_linked_outside_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    _safetensors(ck / "model-1.safetensors", {"a": torch.ones(2)})
    _safetensors(ck / "model-2.safetensors", {"b": torch.ones(2)})
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    _move_out(ck / "model-2.safetensors", tmp_path / "outside")
    _refuses(ckpt.UnsafeCheckpointError, lambda: open_source(str(ck)), "model-2.safetensors", "outside")
    os.remove(ck / "model.safetensors.index.json")  # found by listing the directory: refused the same
    _refuses(ckpt.UnsafeCheckpointError, lambda: open_source(str(ck)), "model-2.safetensors", "outside")


def test_safetensors_file_named_by_the_user_is_read_through_its_link(tmp_path: Path) -> None:
    _safetensors(tmp_path / "real.safetensors", {"a": torch.ones(2)})
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "real.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    with open_source(str(tmp_path / "elsewhere" / "model.safetensors")) as src:
        assert torch.equal(src.read("model/a"), torch.ones(2))


def test_deepspeed_file_linked_outside_is_refused(tmp_path: Path) -> None:
    tag = tmp_path / "ck" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("global_step1")
    torch.save({"optimizer_state_dict": {}}, tmp_path / "optim.pt")
    os.symlink(tmp_path / "optim.pt", tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}, "param_shapes": []}, tag / "mp_rank_00_model_states.pt")
    _refuses(ckpt.UnsafeCheckpointError, lambda: open_source(str(tmp_path / "ck"), "deepspeed"),
             "zero_pp_rank_0_mp_rank_00_optim_states.pt", str(tmp_path / "optim.pt"))


def test_deepspeed_field_of_wrong_type_is_corrupt(tmp_path: Path) -> None:
    tag = tmp_path / "ck" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("global_step1")
    torch.save({"optimizer_state_dict": {"partition_count": [1], "single_partition_of_fp32_groups": [torch.ones(4)],
                                         "base_optimizer_state": {"state": {}, "param_groups": [{"params": [0]}]},
                                         "param_slice_mappings": [{"w": 7}]}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}, "param_shapes": [{"w": [4]}]}, tag / "mp_rank_00_model_states.pt")
    _refuses(ckpt.CorruptCheckpointError, lambda: open_source(str(tmp_path / "ck"), "deepspeed"), "global_step1")
