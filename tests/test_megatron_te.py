"""Megatron-Core checkpoints with the Transformer Engine layer spec (issue #20), end to end, against the independent
producer ``tests/megatron_te_producer.py`` (HF ``LlamaForCausalLM`` + AdamW cut into Megatron rank files).

Import (``resharding.megatron_import``) must give exactly the producer's ``expected_logical`` tensors; export
(``resharding.megatron_export`` / ``ckpt convert --to megatron``) must write, at any layout, exactly the rank files
the producer writes at that layout (model tensors, moments, step, param_groups, iteration, tracker, directory
names), in TE or local naming. All comparisons are bit-exact (``torch.equal`` and equal dtypes).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.errors import CheckpointExistsError, ShardMismatchError, SpecError
from formats.foreign import open_source
from resharding.megatron_dirs import MegatronSource
from resharding.megatron_export import export_megatron, no_fp8_state
from resharding.megatron_files import load_megatron_file
from resharding.megatron_import import import_megatron
from tests.cli_utils import run_cli
from tests.megatron_te_producer import expected_logical, make_llama, rank_dir_name, rank_states, write_megatron

pytestmark = pytest.mark.timeout(120)
CKPT = [sys.executable, "-m", "ckpt.cli"]
TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 4) if tp * pp <= 8]
FULL_DIMS = {"hidden": 56, "heads": 8, "kv_heads": 4, "head_dim": 7, "ffn": 96, "vocab": 997, "layers": 4}


@pytest.fixture(scope="module")
def llama():
    return make_llama()


@pytest.fixture(scope="module")
def produced(llama):
    """``produced(tp, pp, naming, with_optim)`` -> the producer's rank states (cached)."""
    cache: dict[tuple, Any] = {}
    model, opt = llama

    def get(tp: int, pp: int, naming: str = "te", with_optim: bool = True):
        key = (tp, pp, naming, with_optim)
        if key not in cache:
            cache[key] = rank_states(model, opt, tp, pp, naming=naming, with_optim=with_optim)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def te_uni(llama, produced, tmp_path_factory) -> Path:
    """A universal checkpoint imported from TE files at tp=2,pp=2 (with optimizer)."""
    root = tmp_path_factory.mktemp("te_uni")
    write_megatron(root / "src", produced(2, 2), tp=2, pp=2)
    import_megatron(str(root / "src"), str(root / "uni"), "llama-te")
    return root / "uni"


@pytest.fixture(scope="module")
def te_src(produced, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("te_src") / "megatron"
    write_megatron(root, produced(2, 2), tp=2, pp=2)
    return root


# ---- helpers ----

def _layout_text(tp: int, pp: int) -> str:
    return f"tp={tp},pp={pp}"


def _is_no_fp8(t: Any) -> bool:
    assert isinstance(t, torch.Tensor), type(t)
    if t.numel() == 0:
        return True
    return t.dtype == torch.uint8 and pickle.loads(t.numpy().tobytes()) is None


def _same(a: Any, b: Any, what: str) -> None:
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (what, type(a), type(b))
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: values differ"


def _check_universal(uni: Path, expected: dict[str, torch.Tensor]) -> None:
    with open_source(str(uni), "universal") as s:
        assert set(s.tensors) == set(expected), (sorted(set(s.tensors) ^ set(expected))[:10])
        for k, want in expected.items():
            _same(s.read(k), want, f"universal {k}")


def _check_export(dst: Path, want: dict[tuple[int, int], dict[str, Any]], tp: int, pp: int,
                  iteration: int = 10) -> None:
    """The Megatron save root ``dst`` holds exactly the producer's ``want`` rank states at (tp, pp)."""
    it_dir = f"iter_{iteration:07d}"
    assert (dst / TRACKER).read_text().strip() == str(iteration)
    assert sorted(os.listdir(dst)) == sorted([TRACKER, it_dir])
    rank_dirs = sorted(rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp))
    assert sorted(os.listdir(dst / it_dir)) == rank_dirs
    for (t, p), payload in want.items():
        rd = dst / it_dir / rank_dir_name(t, p, pp)
        assert os.listdir(rd) == [MODEL_FILE], (rd, os.listdir(rd))
        got = torch.load(rd / MODEL_FILE, weights_only=False)
        assert got["iteration"] == iteration
        assert set(got) == set(payload), (rd, sorted(got), sorted(payload))
        args, wargs = got["args"], payload["args"]
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size",
                     "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
                     "num_layers"):
            assert getattr(args, name) == getattr(wargs, name), (rd, name, getattr(args, name),
                                                                getattr(wargs, name))
        gm, wm = got["model"], payload["model"]
        assert set(gm) == set(wm), (rd, sorted(set(gm) ^ set(wm)))
        for k, w in wm.items():
            if k.endswith("_extra_state"):
                assert _is_no_fp8(gm[k]), (rd, k, gm[k])
            else:
                _same(gm[k], w, f"{rd.name} model {k}")
        if "optimizer" in payload:
            go, wo = got["optimizer"], payload["optimizer"]
            assert go["param_groups"] == wo["param_groups"]
            assert set(go["state"]) == set(wo["state"]), (rd, sorted(set(go["state"]) ^ set(wo["state"])))
            for name, ws in wo["state"].items():
                assert set(go["state"][name]) == set(ws), (rd, name, sorted(go["state"][name]))
                for k, w in ws.items():
                    _same(go["state"][name][k], w, f"{rd.name} optimizer {name}/{k}")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- 1. the layout matrix ----

@pytest.mark.parametrize("src_layout", LAYOUTS, ids=[_layout_text(*lo) for lo in LAYOUTS])
def test_te_matrix_import_and_export(src_layout, llama, produced, tmp_path):
    tp, pp = src_layout
    write_megatron(tmp_path / "src", produced(tp, pp), tp=tp, pp=pp)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama-te")
    _check_universal(tmp_path / "uni", expected_logical(*llama))
    i = LAYOUTS.index(src_layout)
    for j in (1, 3):
        ttp, tpp = LAYOUTS[(i + j) % len(LAYOUTS)]
        dst = tmp_path / f"dst_{ttp}_{tpp}"
        res = export_megatron(str(tmp_path / "uni"), str(dst), target=_layout_text(ttp, tpp))
        assert res.iteration == 10 and res.spec == "llama-te"
        assert res.layout["tp"] == ttp and res.layout["pp"] == tpp
        assert sorted(res.files) == sorted(f"iter_0000010/{rank_dir_name(t, p, tpp)}/{MODEL_FILE}"
                                           for t in range(ttp) for p in range(tpp))
        _check_export(dst, produced(ttp, tpp), ttp, tpp)


# ---- 2. naming swap ----

def test_te_source_exports_local_naming(te_uni, produced, tmp_path):
    res = export_megatron(str(te_uni), str(tmp_path / "dst"), target="tp=1,pp=2", spec="llama")
    assert res.spec == "llama"
    _check_export(tmp_path / "dst", produced(1, 2, "local"), 1, 2)


def test_local_source_exports_te_naming(llama, produced, tmp_path):
    write_megatron(tmp_path / "src", produced(2, 2, "local"), tp=2, pp=2)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama")
    _check_universal(tmp_path / "uni", expected_logical(*llama))
    res = export_megatron(str(tmp_path / "uni"), str(tmp_path / "dst"), target="tp=4,pp=1", spec="llama-te")
    assert res.spec == "llama-te"
    _check_export(tmp_path / "dst", produced(4, 1, "te"), 4, 1)


# ---- 3. detection ----

@pytest.mark.parametrize("spec", ["llama", "auto"])
def test_family_name_detects_te(te_src, spec):
    src = MegatronSource(str(te_src), spec)
    try:
        assert src.binding.spec.name == "llama-te"
        assert src.detected
        assert src.has_optimizer
    finally:
        src.close()


def test_cli_import_reports_detection(te_src, tmp_path):
    r = run_cli("convert", str(te_src), str(tmp_path / "uni"), "--from", "megatron", "--spec", "llama", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["megatron"]["spec"] == "llama-te"
    assert doc["megatron"]["detected"]
    assert doc["megatron"]["optimizer"] is True


def test_cli_spec_check(te_src):
    r = run_cli("spec", "check", "auto", "--against", str(te_src))
    assert r.returncode == 0, r.stderr
    assert "matched: shipped spec 'llama-te'" in r.stdout
    r = run_cli("spec", "check", "llama", "--against", str(te_src))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "'llama-te'" in r.stderr


# ---- 4. files without args ----

def test_no_args_needs_dims(llama, produced, tmp_path):
    write_megatron(tmp_path / "src", produced(2, 2), tp=2, pp=2, args=None)
    with pytest.raises(SpecError) as ei:
        import_megatron(str(tmp_path / "src"), str(tmp_path / "u0"), "llama-te")
    msg = str(ei.value)
    for dim in ("hidden", "heads", "ffn", "layers", "vocab"):
        assert f'"{dim}"' in msg, (dim, msg)
    assert "--source-layout tp=2,pp=2" in msg and "--dims" in msg, msg
    assert not (tmp_path / "u0").exists()
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama-te", dims=FULL_DIMS, parallel="tp=2,pp=2")
    _check_universal(tmp_path / "uni", expected_logical(*llama))


# ---- 5. model-only files ----

@pytest.mark.parametrize("naming", ["te", "local"])
def test_model_only(naming, llama, produced, tmp_path):
    spec = "llama-te" if naming == "te" else "llama"
    states = produced(2, 2, naming, False)
    assert all("optimizer" not in p for p in states.values())
    write_megatron(tmp_path / "src", states, tp=2, pp=2)
    src = MegatronSource(str(tmp_path / "src"), spec)
    try:
        assert src.has_optimizer is False
        assert src.binding.spec.name == spec
    finally:
        src.close()
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), spec)
    model_only = {k: v for k, v in expected_logical(*llama).items() if k.startswith("model/")}
    _check_universal(tmp_path / "uni", model_only)
    reader = ckpt.open(str(tmp_path / "uni"))
    assert not [k for k in reader.manifest.tensors if k.startswith("optim/")]
    res = export_megatron(str(tmp_path / "uni"), str(tmp_path / "dst"), target="tp=4,pp=2")
    assert res.spec == spec
    _check_export(tmp_path / "dst", produced(4, 2, naming, False), 4, 2)


# ---- 6. CLI ----

def test_cli_export_json_overwrite_release_dry(te_uni, produced, tmp_path):
    dst = tmp_path / "dst"
    r = run_cli("convert", str(te_uni), str(dst), "--to", "megatron", "--target", "tp=2,pp=2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "megatron" and doc["iteration"] == 10 and doc["spec"] == "llama-te"
    assert doc["layout"]["tp"] == 2 and doc["layout"]["pp"] == 2
    assert doc["files"] == 4 and doc["dry_run"] is False and doc["bytes"] > 0
    _check_export(dst, produced(2, 2), 2, 2)
    before = _tree_bytes(dst)

    r = run_cli("convert", str(te_uni), str(dst), "--to", "megatron", "--target", "tp=1,pp=1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--overwrite" in r.stderr
    assert _tree_bytes(dst) == before
    with pytest.raises(CheckpointExistsError):
        export_megatron(str(te_uni), str(dst), target="tp=1,pp=1")
    assert _tree_bytes(dst) == before

    r = run_cli("convert", str(te_uni), str(dst), "--to", "megatron", "--target", "tp=1,pp=1", "--overwrite")
    assert r.returncode == 0, r.stderr
    _check_export(dst, produced(1, 1), 1, 1)

    rel = tmp_path / "rel"
    r = run_cli("convert", str(te_uni), str(rel), "--to", "megatron", "--target", "tp=2,pp=1",
                "--iteration", "release")
    assert r.returncode == 0, r.stderr
    assert (rel / TRACKER).read_text().strip() == "release"
    assert sorted(os.listdir(rel)) == sorted([TRACKER, "release"])
    assert sorted(os.listdir(rel / "release")) == ["mp_rank_00", "mp_rank_01"]
    for t in range(2):
        got = torch.load(rel / "release" / f"mp_rank_{t:02d}" / MODEL_FILE, weights_only=False)
        for k, w in produced(2, 1)[(t, 0)]["model"].items():
            if not k.endswith("_extra_state"):
                _same(got["model"][k], w, k)

    dry = tmp_path / "dry"
    r = run_cli("convert", str(te_uni), str(dry), "--to", "megatron", "--target", "tp=4,pp=2", "--dry-run",
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dry_run"] is True
    assert not dry.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_cli_export_refusals(te_uni, tmp_path):
    r = run_cli("convert", str(te_uni), str(tmp_path / "d1"), "--to", "megatron", "--target", "tp=2,pp=2",
                "--dims", '{"vocab": 1000}')
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "model/embedding.word_embeddings.weight" in r.stderr or "model/output_layer.weight" in r.stderr, r.stderr
    assert "[1000, 56]" in r.stderr and "[997, 56]" in r.stderr, r.stderr
    assert not (tmp_path / "d1").exists()
    with pytest.raises(ShardMismatchError):
        export_megatron(str(te_uni), str(tmp_path / "d1"), target="tp=2,pp=2", dims={"vocab": 1000})

    r = run_cli("convert", str(te_uni), str(tmp_path / "d2"), "--to", "megatron")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--target" in r.stderr
    assert not (tmp_path / "d2").exists()

    torch.save({"w": torch.arange(6.0)}, tmp_path / "x.pt")
    r = run_cli("convert", str(tmp_path / "x.pt"), str(tmp_path / "d3"), "--to", "megatron", "--target", "tp=2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "universal" in r.stderr, r.stderr
    assert not (tmp_path / "d3").exists()

    import torch.distributed.checkpoint as dcp
    dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(tmp_path / "dcp"))
    r = run_cli("convert", str(tmp_path / "dcp"), str(tmp_path / "d4"), "--to", "megatron", "--target", "tp=2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "universal" in r.stderr, r.stderr
    assert not (tmp_path / "d4").exists()


def test_cli_process_refuses_torch_file_with_message(tmp_path):
    """A real process, both ways it is started: the installed ``ckpt`` script and ``python -m ckpt.cli`` (as the
    other CLI tests run it). Each exits 2, writes nothing and says why on stderr (and, with --json, on stdout)."""
    torch.save({"w": torch.arange(6.0)}, tmp_path / "x.pt")
    script = os.path.join(os.path.dirname(sys.executable), "ckpt")
    for name, cmd in (("ckpt script", [script]), ("python -m ckpt.cli", CKPT)):
        proc = subprocess.run([*cmd, "convert", str(tmp_path / "x.pt"), str(tmp_path / "d"), "--to", "megatron",
                               "--target", "tp=2,pp=2", "--json"], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert not (tmp_path / "d").exists()
        assert "universal" in proc.stderr, f"{name}: no message on stderr: {proc.stderr!r} (stdout {proc.stdout!r})"
        assert json.loads(proc.stdout)["exit_code"] == 2, (name, proc.stdout)


# ---- 7. loading exported files; earlier iterations are kept ----

def test_exported_files_load_and_keep_previous_iteration(te_uni, produced, tmp_path):
    dst = tmp_path / "dst"
    res5 = export_megatron(str(te_uni), str(dst), target="tp=2,pp=2", iteration=5)
    assert res5.iteration == 5
    assert (dst / TRACKER).read_text().strip() == "5"
    five = _tree_bytes(dst / "iter_0000005")
    assert len(five) == 4
    res10 = export_megatron(str(te_uni), str(dst), target="tp=2,pp=2")
    assert res10.iteration == 10
    assert _tree_bytes(dst / "iter_0000005") == five
    assert (dst / TRACKER).read_text().strip() == "10"
    assert sorted(os.listdir(dst)) == sorted([TRACKER, "iter_0000005", "iter_0000010"])
    for rel in res10.files:
        path = str(dst / rel)
        a = torch.load(path, weights_only=False)
        b = load_megatron_file(path)
        assert set(a) == set(b)
        assert a["iteration"] == b["iteration"] == 10
        assert set(a["model"]) == set(b["model"])
        for k in a["model"]:
            _same(a["model"][k], b["model"][k], f"{rel} {k}")
        for name, st in a["optimizer"]["state"].items():
            for k, v in st.items():
                _same(v, b["optimizer"]["state"][name][k], f"{rel} optimizer {name}/{k}")
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for (t, p), payload in produced(2, 2).items():
        got = torch.load(dst / "iter_0000005" / rank_dir_name(t, p, 2) / MODEL_FILE, weights_only=False)
        assert got["iteration"] == 5
        for k, w in payload["model"].items():
            if k.endswith("_extra_state"):
                assert _is_no_fp8(got["model"][k])
                _same(got["model"][k], no_fp8_state(), k)
            else:
                _same(got["model"][k], w, k)


def test_spec_save_and_load_leave_te_extra_state_alone(llama, tmp_path):
    """``ckpt.save(spec="llama-te")`` of a live TE-named rank state does not store the ``_extra_state`` entries (the
    spec lists them as inert) and ``ckpt.load`` leaves them in the state, reporting nothing missing."""
    model, opt = llama
    st = rank_states(model, opt, 1, 1)[(0, 0)]
    state = {"model": st["model"], "optim": st["optimizer"], "iteration": 10}
    extra = sorted(k for k in state["model"] if k.endswith("_extra_state"))
    assert extra
    dims = {"hidden": 56, "heads": 8, "kv_heads": 4, "head_dim": 7, "ffn": 96, "vocab": 997, "layers": 4}
    ckpt.save(state, str(tmp_path / "c"), spec="llama-te", dims=dims, layout="tp=1,pp=1")
    with ckpt.open(str(tmp_path / "c")) as reader:
        assert not [k for k in reader.manifest.tensors if "_extra_state" in k]
    fresh = {"model": {k: (v.clone() if k in extra else torch.zeros_like(v)) for k, v in state["model"].items()},
             "optim": rank_states(model, opt, 1, 1)[(0, 0)]["optimizer"], "iteration": 0}
    marker = torch.tensor([7, 7], dtype=torch.uint8)
    fresh["model"][extra[0]] = marker
    report = ckpt.load(fresh, str(tmp_path / "c"), layout="tp=1,pp=1")
    assert not report.missing_keys and not report.unexpected_keys
    assert fresh["model"][extra[0]] is marker and torch.equal(marker, torch.tensor([7, 7], dtype=torch.uint8))
    for k, v in state["model"].items():
        if k not in extra:
            _same(fresh["model"][k], v, k)
    assert fresh["iteration"] == 10
