"""Single-process round trips: every dtype, odd shapes and layouts, nested containers, keys with '/' and '.'."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt
from formats.dtypes import NAME_TO_DTYPE

pytestmark = pytest.mark.timeout(120)


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        if dtype.itemsize == 1 or "float4" in str(dtype):
            # fp8/fp4: arbitrary bit patterns (NaN encodings too) stress a bit-exact path
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(dtype)
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on the raw bytes: exact even for NaN payloads and types without equality kernels."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


ALL_DTYPES = [d for n, d in sorted(NAME_TO_DTYPE.items())]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[str(d).removeprefix("torch.") for d in ALL_DTYPES])
def test_every_dtype_round_trips(tmp_path, dtype):
    shapes = {"2d": (5, 7), "0d": (), "empty": (0, 3), "1d": (13,)}
    src = {k: _random(dtype, s, i) for i, (k, s) in enumerate(shapes.items())}
    ckpt.save(src, tmp_path / "c")
    dst = {k: torch.zeros(s, dtype=dtype) if dtype != torch.float4_e2m1fn_x2 else torch.empty(s, dtype=dtype)
           for k, s in shapes.items()}
    ckpt.load(dst, tmp_path / "c")
    for k in shapes:
        assert bit_equal(dst[k], src[k]), k
    with ckpt.open(tmp_path / "c") as r:
        for k in shapes:
            assert bit_equal(r.read(k), src[k]), k
            assert r.info(k).dtype == str(dtype).removeprefix("torch.")


def test_non_contiguous_and_shared_storage(tmp_path):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    src = {"t": base.t(), "cols": base[:, 2:5], "step": base[::2], "view_a": base[1], "view_b": base[1:3]}
    ckpt.save(src, tmp_path / "c")
    dst_base = torch.zeros(6, 8)
    dst = {"t": torch.zeros(6, 8).t(), "cols": torch.zeros(6, 3), "step": torch.zeros(3, 8),
           "view_a": dst_base[1], "view_b": dst_base[1:3]}
    ckpt.load(dst, tmp_path / "c")
    for k in src:
        assert torch.equal(dst[k], src[k]), k
    # destinations sharing storage end consistent: row 1 of view_b is view_a
    assert torch.equal(dst_base[1], base[1])


def test_nested_containers_and_escaped_keys(tmp_path):
    src = {
        "a/b": {"c.d": torch.arange(4), "~x/y~": torch.ones(2)},
        "list": [torch.zeros(3), {"inner": torch.full((2,), 7.0)}, 5, "s", None, [1.5, float("inf")]],
        "tuple": (1, torch.tensor([2, 3]), (True, "z")),
        3: {"int-keyed": 1},
        "floats": [float("nan"), -0.0, 1e-300],
    }
    ckpt.save(src, tmp_path / "c")
    with ckpt.open(tmp_path / "c") as r:
        assert "a~1b/c.d" in r.keys() and "a~1b/~0x~1y~0/" not in r.keys()
        assert "a~1b/~0x~1y~0" in r.keys()
        back = r.state()
    assert torch.equal(back["a/b"]["c.d"], src["a/b"]["c.d"])
    assert torch.equal(back["a/b"]["~x/y~"], src["a/b"]["~x/y~"])
    assert isinstance(back["tuple"], tuple) and isinstance(back["tuple"][2], tuple)
    assert back["tuple"][2] == (True, "z") and torch.equal(back["tuple"][1], src["tuple"][1])
    assert back[3] == {"int-keyed": 1}
    assert back["list"][2:5] == [5, "s", None] and back["list"][5][1] == float("inf")
    assert torch.equal(back["list"][1]["inner"], src["list"][1]["inner"])
    f = back["floats"]
    assert f[0] != f[0] and str(f[1]) == "-0.0" and f[2] == 1e-300

    dst = {
        "a/b": {"c.d": torch.zeros(4, dtype=torch.long), "~x/y~": torch.zeros(2)},
        "list": [torch.ones(3), {"inner": torch.zeros(2)}, 0, "", 1, [0.0, 0.0]],
        "tuple": (0, torch.zeros(2, dtype=torch.long), (False, "")),
        3: {"int-keyed": 0},
        "floats": [0.0, 0.0, 0.0],
    }
    ckpt.load(dst, tmp_path / "c")
    assert dst["tuple"][2] == (True, "z") and dst[3]["int-keyed"] == 1 and dst["list"][4] is None
    assert torch.equal(dst["list"][0], torch.zeros(3))


def test_manifest_is_plain_json_and_written_last(tmp_path):
    ckpt.save({"w": torch.ones(3)}, tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert doc["format"] == "ckpt-universal" and doc["format_version"] == 2
    files = doc["files"]
    for p in files:
        assert not os.path.isabs(p) and ".." not in p
        assert os.path.getsize(tmp_path / "c" / p) == files[p]["size_bytes"]
    # nothing but the manifest and data files: no stray temporaries after a commit
    names = sorted(os.listdir(tmp_path / "c"))
    assert names == ["data", "manifest.json"]


def test_module_and_optimizer_are_saved_in_fqn_form(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    ckpt.save({"model": model, "optim": opt, "step": 3}, tmp_path / "c")
    with ckpt.open(tmp_path / "c") as r:
        keys = r.keys()
        assert "model/0.weight" in keys and "optim/state/0.weight/exp_avg" in keys
        assert "optim/state/2.bias/step" in keys
    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state = {"model": model2, "optim": opt2, "step": 0}
    ckpt.load(state, tmp_path / "c")
    assert state["step"] == 3
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][m], opt2.state[b][m]), (n, m)
    assert opt2.param_groups[0]["lr"] == 0.1
    # training continues identically
    x = torch.randn(5, 4)
    for o, m in ((opt, model), (opt2, model2)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


class Counter:
    """A user Stateful object."""

    def __init__(self, n: int = 0) -> None:
        self.n = n
        self.history = torch.zeros(3)

    def state_dict(self):
        return {"n": self.n, "history": self.history}

    def load_state_dict(self, sd):
        self.n = sd["n"]
        self.history.copy_(sd["history"])


def test_stateful_objects(tmp_path):
    c = Counter(7)
    c.history += 2
    sched_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(sched_opt, step_size=2, gamma=0.5)
    for _ in range(5):
        sched_opt.step()
        sched.step()
    ckpt.save({"counter": c, "sched": sched}, tmp_path / "c")
    c2 = Counter()
    o2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    ckpt.load({"counter": c2, "sched": s2}, tmp_path / "c")
    assert c2.n == 7 and torch.equal(c2.history, c.history)
    assert s2.state_dict() == sched.state_dict()


def test_zstd_codec_round_trip(tmp_path):
    src = {"w": torch.randn(300, 70).to(torch.bfloat16), "i": torch.arange(1000)}
    ckpt.save(src, tmp_path / "c", options=ckpt.SaveOptions(codec="zstd"))
    with ckpt.open(tmp_path / "c") as r:
        assert {c.codec for c in r.info("w").chunks} == {"zstd"}
        assert torch.equal(r.read("w"), src["w"]) and torch.equal(r.read("i", slice(10, 20)), src["i"][10:20])
    dst = {"w": torch.zeros(300, 70, dtype=torch.bfloat16), "i": torch.zeros(1000, dtype=torch.long)}
    ckpt.load(dst, tmp_path / "c")
    assert torch.equal(dst["w"], src["w"]) and torch.equal(dst["i"], src["i"])


def test_partial_reads_touch_only_needed_blocks(tmp_path):
    w = torch.randn(1024, 64)  # 256 KiB, 64 blocks of 4 KiB
    ckpt.save({"w": w}, tmp_path / "c", options=ckpt.SaveOptions(block_bytes=4096, files_per_rank=1))
    with ckpt.open(tmp_path / "c") as r:
        part = r.read("w", (slice(100, 164),))
        assert torch.equal(part, w[100:164])
        needed = 64 * 64 * 4
        assert r.bytes_read <= needed + 2 * 4096
        assert torch.equal(r.read("w", (5, slice(3, 9))), w[5, 3:9])


def test_overwrite_replaces_and_cleans_up(tmp_path):
    ckpt.save({"w": torch.ones(10)}, tmp_path / "c")
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.save({"w": torch.zeros(10)}, tmp_path / "c")
    ckpt.save({"w": torch.full((10,), 2.0)}, tmp_path / "c", overwrite=True)
    dst = {"w": torch.zeros(10)}
    ckpt.load(dst, tmp_path / "c")
    assert torch.equal(dst["w"], torch.full((10,), 2.0))
    with ckpt.open(tmp_path / "c") as r:
        assert sorted(os.listdir(tmp_path / "c" / "data")) == sorted(p.split("/")[1] for p in r.manifest.files)


def test_large_tensor_split_into_chunks_loads_across_boundaries(tmp_path):
    w = torch.randn(100, 33)
    ckpt.save({"w": w}, tmp_path / "c", options=ckpt.SaveOptions(max_chunk_bytes=1000, block_bytes=256))
    with ckpt.open(tmp_path / "c") as r:
        assert len(r.info("w").chunks) > 10
        assert torch.equal(r.read("w", (slice(7, 93), slice(5, 30))), w[7:93, 5:30])
    dst = {"w": torch.zeros(100, 33)}
    ckpt.load(dst, tmp_path / "c")
    assert torch.equal(dst["w"], w)


def test_memory_storage_round_trip():
    src = {"w": torch.randn(20, 3), "n": 4}
    ckpt.save(src, "memory://roundtrip-test/c1")
    dst = {"w": torch.zeros(20, 3), "n": 0}
    ckpt.load(dst, "memory://roundtrip-test/c1")
    assert torch.equal(dst["w"], src["w"]) and dst["n"] == 4


def test_unsupported_value_type_names_the_key(tmp_path):
    with pytest.raises(ckpt.UnsupportedStateError, match="'cfg/obj'"):
        ckpt.save({"cfg": {"obj": object()}}, tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_saving_over_a_crashed_save_removes_its_files(tmp_path):
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "123-deadbeef-r00000-0.bin").write_bytes(b"half written")
    with pytest.raises(ckpt.IncompleteCheckpointError):
        ckpt.open(tmp_path / "c")
    ckpt.save({"w": torch.ones(3)}, tmp_path / "c")
    with ckpt.open(tmp_path / "c") as r:
        assert sorted(os.listdir(tmp_path / "c" / "data")) == sorted(p.split("/")[1] for p in r.manifest.files)


def test_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    ckpt.save({"w": torch.ones(1000)}, tmp_path / "c")
    with ckpt.open(tmp_path / "c") as r:
        f = r.info("w").chunks[0].file
    outside = tmp_path / "secret.bin"
    outside.write_bytes(os.urandom(8000))
    os.remove(tmp_path / "c" / f)
    os.symlink(outside, tmp_path / "c" / f)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="outside the checkpoint root"):
        ckpt.load({"w": torch.zeros(1000)}, tmp_path / "c")
