"""``ckpt convert`` / ``ckpt diff`` and ``formats.foreign`` with real producers, in one process.

Producers: Hugging Face ``transformers`` models built from a config (GPT-2, Llama with grouped-query attention, a
tiny Mixtral; random init, no downloads) saved by ``save_pretrained`` (one file, and sharded through a small
``max_shard_size``); ``torch.save``; ``ckpt.save``. Every round trip is compared with ``torch.equal``.
DCP checkpoints written by FSDP2 / tensor-parallel models on gloo are in ``tests/test_convert_dcp.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cli_utils import run_cli
import torch

import ckpt
from formats.foreign import UnknownFormatError, convert, detect_format, open_source, parse_size

pytestmark = pytest.mark.timeout(180)


_run = run_cli


def _assert_same(got: Any, want: Any, where: str = "") -> None:
    """Nested structures equal, tensors bit-exact with the same dtype and shape."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            _assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want and type(got) is type(want), (where, got, want)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models


def _hf_model(arch: str) -> Any:
    import transformers  # a dev dependency: the HF round trips must run, never skip
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 4]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_hf_safetensors_round_trip(arch: str, sharded: bool, tmp_path: Path) -> None:
    import transformers  # a dev dependency: the HF round trips must run, never skip
    model = _hf_model(arch)
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="40KB" if sharded else "5GB")
    if sharded:
        assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 2
    assert detect_format(str(src)) == "safetensors"

    uni = tmp_path / "universal"
    res = convert(str(src), str(uni))
    assert res.plan.src_format == "safetensors" and res.plan.tensors > 0
    # What transformers wrote, read by the safetensors package itself. (The files need not hold the in-memory state
    # dict: tied copies are dropped, and Mixtral's fused experts are written per expert.)
    from safetensors.torch import load_file

    files = {}
    for f in sorted(src.glob("*.safetensors")):
        files.update(load_file(str(f)))
    with ckpt.open(uni) as r:
        stored = {k[len("model/"):] for k in r.keys()}
        assert stored == set(files)
        for name, want in files.items():
            got = r.read(f"model/{name}")
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert "hf_config" in r.manifest.metadata
    sd = model.state_dict()
    if arch == "llama":  # the imported keys are what ckpt.save gives a module: ckpt.load resumes a fresh model
        fresh = _hf_model(arch)
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        ckpt.load({"model": fresh}, uni)
        assert torch.equal(_logits(fresh), _logits(model))

    out = tmp_path / "out"
    rc = _run("convert", str(uni), str(out), "--to", "safetensors", *(["--max-shard-size", "30KB"] if sharded else []))
    assert rc.returncode == 0, rc.stderr
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"]) == stored
    else:
        assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    loaded = type(model).from_pretrained(out).eval()
    got = loaded.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert torch.equal(_logits(loaded), _logits(model))
    # The exported files hold the same tensors as the ones transformers wrote (any sharding).
    assert _run("diff", str(src), str(out)).returncode == 0
    # safetensors' own reader accepts what we wrote.
    back = {}
    for f in sorted(out.glob("*.safetensors")):
        back.update(load_file(str(f)))
    assert set(back) == set(files) and all(torch.equal(back[k], v) for k, v in files.items())
    del transformers


def test_safetensors_written_by_the_safetensors_package(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"note": "hi"})
    convert(str(tmp_path / "w.safetensors"), str(tmp_path / "u"))
    with ckpt.open(tmp_path / "u") as r:
        for k, v in tensors.items():
            _assert_same(r.read(f"model/{k}"), v, k)
        assert r.manifest.metadata["safetensors_metadata"] == {"w.safetensors": {"note": "hi"}}
    convert(str(tmp_path / "u"), str(tmp_path / "back.pt"), dst_format="torch")
    _assert_same(torch.load(tmp_path / "back.pt", weights_only=True), tensors)


# ---------------------------------------------------------------------------------------------------------------
# torch.save, ckpt.save, dtype casts


def _training_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"emb.weight": torch.randn(10, 4, generator=g), "head.bias": torch.randn(3, generator=g).half(),
                  "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16), "ids": torch.arange(5),
                  "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 2)},
        "optim": {"state": {"emb.weight": {"exp_avg": torch.randn(10, 4, generator=g), "step": torch.tensor(7.0)}},
                  "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "params": ["emb.weight"], "fused": None}]},
        "step": 7, "name": "run/a", "by_int": {3: torch.ones(2)},
    }


def test_torch_save_round_trip_nested(tmp_path: Path) -> None:
    state = _training_state()
    torch.save(state, tmp_path / "train.pt")
    res = convert(str(tmp_path / "train.pt"), str(tmp_path / "u"))
    assert res.plan.src_format == "torch" and res.plan.values == 7
    with ckpt.open(tmp_path / "u") as r:
        assert r.read("optim/param_groups/0/betas/1") == 0.95 and r.read("name") == "run/a"
        assert torch.equal(r.read("model/emb.weight"), state["model"]["emb.weight"])
        _assert_same(r.state(), state)  # ckpt.open rebuilds the same nesting (int dict keys, tuples included)
    convert(str(tmp_path / "u"), str(tmp_path / "back.pt"), dst_format="torch")
    _assert_same(torch.load(tmp_path / "back.pt", weights_only=True), state)


def test_torch_bare_state_dict_round_trip_and_ckpt_save_source(tmp_path: Path) -> None:
    sd = _training_state()["model"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    convert(str(tmp_path / "pytorch_model.bin"), str(tmp_path / "u"))
    with ckpt.open(tmp_path / "u") as r:
        assert set(r.keys()) == {f"model/{k}" for k in sd}  # a bare state dict is model weights
    convert(str(tmp_path / "u"), str(tmp_path / "back.bin"), dst_format="torch")
    _assert_same(torch.load(tmp_path / "back.bin", weights_only=True), sd)  # bare again, as pytorch_model.bin

    # A universal checkpoint written by ckpt.save with small chunks converts the same way.
    state = _training_state()
    ckpt.save(state, tmp_path / "saved", options=ckpt.SaveOptions(max_chunk_bytes=64, block_bytes=32))
    with ckpt.open(tmp_path / "saved") as r:
        assert len(r.info("model/emb.weight").chunks) > 1
    convert(str(tmp_path / "saved"), str(tmp_path / "saved.pt"), dst_format="torch")
    _assert_same(torch.load(tmp_path / "saved.pt", weights_only=True), state)
    assert _run("diff", str(tmp_path / "saved"), str(tmp_path / "saved.pt")).returncode == 0


def test_dtype_cast_export(tmp_path: Path) -> None:
    state = _training_state()
    ckpt.save(state, tmp_path / "saved")
    out = tmp_path / "st"
    rc = _run("convert", str(tmp_path / "saved"), str(out), "--to", "safetensors", "--dtype", "bf16", "--json")
    assert rc.returncode == 0, rc.stderr
    doc = json.loads(rc.stdout)
    assert doc["dtype"] == "bfloat16" and doc["cast"] == 3  # emb (fp32), head.bias (fp16); empty fp32; not ints
    assert any(k.startswith("optim/") for k in doc["skipped"]) and "step" in doc["skipped"]
    from safetensors.torch import load_file

    got = load_file(str(out / "model.safetensors"))
    for k, v in state["model"].items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        _assert_same(got[k], want, k)
    # To the universal format: model weights are cast; optimizer state and step counters keep their dtype.
    convert(str(tmp_path / "saved"), str(tmp_path / "u16"), dtype="fp16")
    with ckpt.open(tmp_path / "u16") as r:
        assert r.info("model/emb.weight").dtype == "float16" and r.info("model/norm.weight").dtype == "float16"
        assert torch.equal(r.read("model/emb.weight"), state["model"]["emb.weight"].half())
        assert r.info("optim/state/emb.weight/exp_avg").dtype == "float32"
        assert torch.equal(r.read("optim/state/emb.weight/step"), torch.tensor(7.0))
        assert r.info("model/ids").dtype == "int64"


def test_convert_workers_many_files_and_dry_run(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": torch.randn(64, 16) for i in range(8)}
    torch.save(tensors, tmp_path / "m.pt")
    rc = _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "u"), "--dry-run", "--json")
    assert rc.returncode == 0 and json.loads(rc.stdout)["dry_run"] is True and not (tmp_path / "u").exists()
    rc = _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "st"), "--to", "safetensors", "--dry-run",
              "--max-shard-size", "10KB")
    assert rc.returncode == 0 and "model-00001-of-00004.safetensors" in rc.stdout, rc.stdout
    rc = _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "u"), "--workers", "3")
    assert rc.returncode == 0 and rc.stdout.startswith("OK: torch"), rc.stderr
    assert rc.stderr == ""  # no progress bar when stderr is not a terminal
    with ckpt.open(tmp_path / "u") as r:
        assert len(r.manifest.files) == 3
        for k, v in tensors.items():
            assert torch.equal(r.read(f"model/{k}"), v)
    assert _run("verify", str(tmp_path / "u")).returncode == 0
    # An existing destination needs --overwrite.
    rc = _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "u"))
    assert rc.returncode == 2 and "--overwrite" in rc.stderr
    assert _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "u"), "--overwrite").returncode == 0
    with ckpt.open(tmp_path / "u") as r:
        assert sorted(os.listdir(tmp_path / "u" / "data")) == sorted(p.split("/")[-1] for p in r.manifest.files)


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    torch.save({"w": torch.randn(256, 256)}, tmp_path / "m.pt")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    from ckpt.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "u")]) == 0
    assert "convert: 100%" in err.getvalue() and "B/s" in err.getvalue(), err.getvalue()
    bad = _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "v"), "--max-shard-size", "1MB")
    assert bad.returncode == 2 and "--max-shard-size applies to --to safetensors only" in bad.stderr
    assert _run("convert", str(tmp_path / "m.pt"), str(tmp_path / "v"), "--workers", "0").returncode == 2


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    assert parse_size("1.5MB") == 1_500_000 and parse_size("10kb") == 10_000
    with pytest.raises(ValueError):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------------------------
# ckpt diff


def test_diff_exit_codes_and_messages(tmp_path: Path) -> None:
    state = _training_state()
    ckpt.save(state, tmp_path / "a")
    torch.save(state, tmp_path / "same.pt")
    rc = _run("diff", str(tmp_path / "a"), str(tmp_path / "same.pt"))
    assert rc.returncode == 0 and rc.stdout.startswith("EQUAL"), rc.stdout + rc.stderr

    changed = _training_state()
    changed["model"]["emb.weight"][2, 1] += 0.5
    torch.save(changed, tmp_path / "changed.pt")
    rc = _run("diff", str(tmp_path / "a"), str(tmp_path / "changed.pt"))
    assert rc.returncode == 1 and "DIFFERENT" in rc.stdout
    assert "model/emb.weight: values differ at 1 of 40 elements, max |a-b| 0.5" in rc.stdout, rc.stdout
    assert _run("diff", str(tmp_path / "a"), str(tmp_path / "changed.pt"), "--atol", "0.6").returncode == 0
    doc = json.loads(_run("diff", str(tmp_path / "a"), str(tmp_path / "changed.pt"), "--json").stdout)
    assert doc["equal"] is False and doc["differences"][0]["key"] == "model/emb.weight"
    assert doc["differences"][0]["max_abs_diff"] == 0.5 and doc["differences"][0]["mismatched"] == 1

    missing = _training_state()
    del missing["model"]["head.bias"]
    missing["step"] = 8
    missing["model"]["ids"] = torch.arange(6)
    torch.save(missing, tmp_path / "missing.pt")
    rc = _run("diff", str(tmp_path / "a"), str(tmp_path / "missing.pt"))
    assert rc.returncode == 1
    assert "model/head.bias: only in A (tensor float16[3])" in rc.stdout, rc.stdout
    assert "step: values differ: 7 in A, 8 in B" in rc.stdout
    assert "model/ids: shape [5] in A, [6] in B" in rc.stdout
    rc = _run("diff", str(tmp_path / "a"), str(tmp_path / "nowhere"))
    assert rc.returncode == 2 and "no such file or directory" in rc.stderr


def test_diff_bitwise_and_nan() -> None:
    from formats.foreign.diff import _value_diff, _bitwise_equal

    x = torch.tensor([1.0, float("nan"), 0.0])
    assert _bitwise_equal(x, x.clone())
    assert not _bitwise_equal(x, torch.tensor([1.0, float("nan"), -0.0]))
    assert _value_diff(x, torch.tensor([1.0, float("nan"), 0.25]), 0.0, 0.0) == (0.25, 1)
    mx, n = _value_diff(x, torch.tensor([1.0, 2.0, 0.0]), 1.0, 0.0)
    assert n == 1 and mx == float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Bad input


class _Payload:
    """Pickles as a call that creates a directory: proof that unpickling ran it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.marker,))


def test_malicious_torch_file_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "x": _Payload(str(marker))}, bad)
    rc = _run("convert", str(bad), str(tmp_path / "u"))
    assert rc.returncode == 2
    assert str(bad) in rc.stderr and "--allow-pickle" in rc.stderr and "refusing" in rc.stderr, rc.stderr
    assert not marker.exists() and not (tmp_path / "u").exists()
    rc = _run("diff", str(bad), str(bad))
    assert rc.returncode == 2 and "--allow-pickle" in rc.stderr and not marker.exists()


def test_truncated_and_inconsistent_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(8, 8), "b": torch.randn(8)}, str(good))
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])

    cases = {
        "short.safetensors": data[:5],  # not even the length field
        "header.safetensors": data[: 8 + n // 2],  # the header is cut
        "body.safetensors": data[: 8 + n + 10],  # the tensor bytes are cut
    }
    header = json.loads(data[8 : 8 + n])
    header["w"]["data_offsets"] = [0, 10**6]  # out of range and inconsistent with the shape
    raw = json.dumps(header).encode()
    cases["offsets.safetensors"] = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    header = json.loads(data[8 : 8 + n])
    header["b"]["data_offsets"] = [0, 32]  # overlaps "w"
    header["w"]["data_offsets"] = [0, 256]
    raw = json.dumps(header).encode()
    cases["overlap.safetensors"] = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    expect = {"short.safetensors": "less than the 8-byte header length",
              "header.safetensors": "truncated safetensors header",
              "body.safetensors": "lie beyond the end of the data",
              "offsets.safetensors": "data_offsets [0, 1000000] hold 1000000 bytes",
              "overlap.safetensors": "overlap"}
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ckpt.CorruptCheckpointError) as e:
            open_source(str(p))
        assert str(p) in str(e.value) and expect[name] in str(e.value), (name, str(e.value))
        if name in ("body.safetensors", "offsets.safetensors"):
            assert "key 'b'" in str(e.value) or "key 'w'" in str(e.value), str(e.value)
        rc = _run("convert", str(p), str(tmp_path / f"u-{name}"))
        assert rc.returncode == 2 and str(p) in rc.stderr

    # A sharded directory whose index names a missing shard.
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"w": torch.randn(2)}, str(d / "model-00001-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                        "v": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"key 'v'.*model-00002-of-00002.safetensors.*missing"):
        open_source(str(d))


def test_unknown_format_lists_what_was_found(tmp_path: Path) -> None:
    d = tmp_path / "weird"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    (d / "weights.npz").write_bytes(b"\x00" * 10)
    rc = _run("convert", str(d), str(tmp_path / "u"))
    assert rc.returncode == 2
    assert "notes.txt" in rc.stderr and "weights.npz" in rc.stderr and "manifest.json (universal)" in rc.stderr
    with pytest.raises(UnknownFormatError):
        detect_format(str(d))
    (tmp_path / "blob.dat").write_bytes(b"hello world")
    rc = _run("diff", str(tmp_path / "blob.dat"), str(d))
    assert rc.returncode == 2 and "cannot tell the format" in rc.stderr and "--from" in rc.stderr
    # A directory that looks like DeepSpeed's but is not a ZeRO checkpoint: detected, then a clear refusal.
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert detect_format(str(ds)) == "deepspeed"
    rc = _run("convert", str(ds), str(tmp_path / "u"))
    assert rc.returncode == 2 and "not a ZeRO checkpoint" in rc.stderr, rc.stderr
    rc = _run("convert", str(d), str(tmp_path / "u"), "--from", "deepspeed")
    assert rc.returncode == 2 and str(d) in rc.stderr, rc.stderr
