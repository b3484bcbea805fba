"""Pipeline- and tensor-parallel DeepSpeed checkpoints (written by DeepSpeed itself, ``tests.deepspeed_3d_producer``)
imported directly, and DeepSpeed's own ``ds_to_universal`` output of them imported without losing anything.

The oracle is ``ds_to_universal``: every fp32 master weight, ``exp_avg``, ``exp_avg_sq`` and ``step`` it writes must
be what both importers give, bit for bit (``torch.equal``). Cases: pipeline 2 and 3 stages, tied embedding/head
across the first and last stage and untied, data parallel 1 and 2, a frozen parameter (which ``ds_to_universal``
drops and the direct import keeps, from the layer files), tensor parallel 2 (column, row, vocabulary-parallel and
replicated parameters, uneven splits) alone and under pipeline 2, merged by the run's ``universal_checkpoint_info``.
ZeRO-2 cannot be combined with DeepSpeed's pipeline engine (it asserts), so these are ZeRO-1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")

import ckpt  # noqa: E402
from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, UnsupportedStateError  # noqa: E402
from formats.foreign import open_source  # noqa: E402
from formats.foreign.deepspeed_mp import DeepSpeedModelParallelSource  # noqa: E402
from tests.deepspeed_3d_producer import SESSION_JOBS, child_env  # noqa: E402

pytestmark = pytest.mark.distributed
CASES = list(SESSION_JOBS)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # written by DeepSpeed in this test: trusted


def _oracle(uni: Path) -> dict[str, torch.Tensor]:
    """Every tensor ds_to_universal wrote, by the key the importers give it."""
    out = {}
    zero = uni / "zero"
    for pdir in sorted(p for p in zero.iterdir() if p.is_dir()):
        for f in sorted(pdir.iterdir()):
            obj = _load(f)
            t = obj["param"] if isinstance(obj, dict) else obj
            stem = f.name[:-3]
            out[f"model/{pdir.name}" if stem == "fp32" else f"optim/state/{pdir.name}/{stem}"] = t
    return out


def _frozen_names(job: Any) -> set[str]:
    return {"2.n.bias"} if job.frozen else set()


@pytest.mark.parametrize("case", CASES)
def test_direct_import_matches_ds_to_universal(ds3d_produced: dict[str, dict[str, Any]], case: str) -> None:
    p = ds3d_produced[case]
    oracle = _oracle(p["uni"])
    assert any(k.startswith("optim/state/") and k.endswith("/exp_avg") for k in oracle)
    with open_source(str(p["tag_dir"]), "deepspeed") as src:
        ours = {k for k in src.tensors if k.startswith("model/") or k.startswith("optim/state/")}
        assert set(oracle) <= ours, f"missing: {sorted(set(oracle) - ours)[:10]}"
        for key, want in oracle.items():
            got = src.read(key)
            assert got.dtype == want.dtype and torch.equal(got, want), key
        # What ds_to_universal leaves out is the frozen parameter (from the layer files, fp32) and nothing else.
        extra = ours - set(oracle)
        assert {k[len("model/"):] for k in extra} == _frozen_names(p["job"]), sorted(extra)
        for key in extra:
            t = src.read(key)
            assert t.dtype == torch.float32 and t.shape == (17,)
        # One group per stage group, every trainable parameter in it, with its step; DeepSpeed's counters.
        grouped = {v for k, v in src.values.items() if k.startswith("optim/param_groups/") and "/params/" in k}
        trainable = {k[len("model/"):] for k in oracle if k.startswith("model/")}
        assert grouped == trainable
        assert src.values["deepspeed/global_steps"] == p["job"].steps
        assert src.values["client_state/epoch"] == 2
        assert src.metadata["deepspeed"]["pp_degree"] == p["job"].pp
        assert src.metadata["deepspeed"]["tp_degree"] == p["job"].tp


@pytest.mark.parametrize("case", CASES)
def test_ds_to_universal_output_keeps_every_stage(ds3d_produced: dict[str, dict[str, Any]], case: str) -> None:
    """Importing ds_to_universal's output of a pipeline run keeps the moments of every stage (it kept stage 0's)."""
    p = ds3d_produced[case]
    oracle = _oracle(p["uni"])
    with open_source(str(p["uni"]), "deepspeed") as src:
        ours = {k for k in src.tensors if k.startswith("model/") or k.startswith("optim/state/")}
        assert ours == set(oracle), sorted(set(oracle) ^ ours)[:10]
        for key, want in oracle.items():
            assert torch.equal(src.read(key), want), key
        last = max(int(k.split("/")[2].split(".")[0]) for k in oracle
                   if k.startswith("optim/state/") and k.split("/")[2][0].isdigit())
        assert last >= 4, "the last stage's blocks carry optimizer state"
        grouped = {v for k, v in src.values.items() if k.startswith("optim/param_groups/") and "/params/" in k}
        assert grouped == {k[len("model/"):] for k in oracle if k.startswith("model/")}


def test_cli_convert_both_ways_agree_and_load(ds3d_produced: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """``ckpt convert --from deepspeed`` of the run and of ds_to_universal's output: ``ckpt diff`` finds them equal;
    the result loads into a module + optimizer of the other stage count's stage (global names), bit for bit."""
    p = ds3d_produced["pp2tp2"]
    cli = [sys.executable, "-m", "ckpt.cli"]
    a, b = tmp_path / "direct", tmp_path / "via_uc"
    for src, dst in ((p["tag_dir"].parent, a), (p["uni"], b)):
        r = subprocess.run([*cli, "convert", str(src), str(dst), "--from", "deepspeed", "--json"],
                           capture_output=True, text=True, env=child_env(), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["tensors"] > 0
    r = subprocess.run([*cli, "diff", str(a), str(b), "--json"], capture_output=True, text=True, env=child_env(),
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads(r.stdout)["equal"] is True
    oracle = _oracle(p["uni"])
    # Stage 1 of a 3-stage split (layers 2 and 3) under new names: only those parameters, loaded by name.
    names = [n for n in (k[len("model/"):] for k in oracle if k.startswith("model/")) if n[:2] in ("2.", "3.")]
    state = {"model": {n: torch.zeros_like(oracle[f"model/{n}"]) for n in names}}
    ckpt.load(state, str(a), strict=False)
    for n in names:
        assert torch.equal(state["model"][n], oracle[f"model/{n}"]), n


def _copy(ds3d_produced: dict[str, dict[str, Any]], case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(ds3d_produced[case]["tag_dir"], dst)
    return dst


def test_tied_copies_that_differ_are_refused(ds3d_produced: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    tag = _copy(ds3d_produced, "pp2", tmp_path)
    f = tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    sd = _load(f)
    with torch.no_grad():  # (the saved fp32 partition is a leaf that requires grad)
        sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][0] += 1.0  # the tied weight's first element
    torch.save(sd, f)
    with open_source(str(tag), "deepspeed") as src:
        with pytest.raises(CorruptCheckpointError, match=r"tied_modules\.embed\.weight.*tied across pipeline"):
            src.read("model/tied_modules.embed.weight")
        src.read("model/3.l.weight")  # the rest still reads


def test_missing_stage_and_unmapped_layer_entry(ds3d_produced: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    tag = _copy(ds3d_produced, "pp3-untied", tmp_path)
    (tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    (tag / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"model-parallel rank\(s\) \[1\]"):
        open_source(str(tag), "deepspeed")
    # A pipeline's ZeRO-1 model-states files record no frozen parameters (frozen_param_shapes is None), so a layer
    # entry the optimizer does not hold is a frozen parameter: kept (as fp32, like the master weights), never dropped.
    tag = _copy(ds3d_produced, "pp3-untied", tmp_path / "b")
    layer = tag / "layer_03-model_states.pt"
    sd = _load(layer)
    sd["l.extra"] = torch.arange(3, dtype=torch.bfloat16)
    torch.save(sd, layer)
    with open_source(str(tag), "deepspeed") as src:
        got = src.read("model/3.l.extra")
        assert got.dtype == torch.float32 and torch.equal(got, torch.arange(3, dtype=torch.float32))
    sd["l.extra"] = "not a tensor"
    torch.save(sd, layer)
    with pytest.raises(UnsupportedStateError, match=r"layer_03-model_states\.pt: entry 'l\.extra' is str"):
        open_source(str(tag), "deepspeed")


def test_layer_entry_of_an_ambiguous_tied_layer_is_refused() -> None:
    """Unit case: with two ties, a tied layer's unrecorded entry could belong to either; the reader refuses to guess."""
    known = {"tied_modules.a.weight", "tied_modules.b.weight", "1.w"}
    name = DeepSpeedModelParallelSource._layer_entry_name
    assert name(0, "weight", {"tied_modules.a.weight", "1.w"}, {"1"}, ["a"], "f") == "tied_modules.a.weight"
    assert name(1, "bias", known, {"1"}, ["a", "b"], "f") == "1.bias"
    with pytest.raises(UnsupportedStateError, match=r"f: entry 'bias' of layer 0 cannot be named.*refusing to guess"):
        name(0, "bias", known, {"1"}, ["a", "b"], "f")


def test_tensor_parallel_without_uc_info_is_refused(ds3d_produced: dict[str, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    tag = _copy(ds3d_produced, "tp2-untied-frozen", tmp_path)
    for f in tag.glob("mp_rank_*_model_states.pt"):
        sd = _load(f)
        sd.pop("universal_checkpoint_info", None)
        torch.save(sd, f)
    with pytest.raises(UnsupportedStateError, match=r"tp_degree 2\) without universal_checkpoint_info"):
        open_source(str(tag), "deepspeed")


def test_unknown_file_in_universal_output_is_refused(ds3d_produced: dict[str, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    uni = tmp_path / "u" / "global_step3"
    shutil.copytree(ds3d_produced["pp2"]["uni"], uni)
    (uni / "zero" / "3.l.weight" / "notes.txt").write_text("x")
    with pytest.raises(UnsupportedStateError, match=r"3\.l\.weight.*notes\.txt.*refusing to drop"):
        open_source(str(uni), "deepspeed")


def test_replicated_slices_that_differ_are_refused(ds3d_produced: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """A parameter ``universal_checkpoint_info`` calls tensor-parallel replicated (the LayerNorm ``1.n.weight``,
    29 elements) whose tp rank 1 copy differs from rank 0's: an error naming it, not rank 0's copy picked."""
    tag = _copy(ds3d_produced, "tp2-untied-frozen", tmp_path)
    f = tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    sd = _load(f)
    osd = sd["optimizer_state_dict"]
    g = next(i for i, m in enumerate(osd["param_slice_mappings"]) if "1.n.weight" in m)
    with torch.no_grad():  # (the saved fp32 partition is a leaf that requires grad)
        osd["single_partition_of_fp32_groups"][g][osd["param_slice_mappings"][g]["1.n.weight"].start] += 1.0
    torch.save(sd, f)
    with open_source(str(tag), "deepspeed") as src:
        with pytest.raises(CorruptCheckpointError, match=r"1\.n\.weight.*replicated over tensor-parallel ranks"):
            src.read("model/1.n.weight")
        src.read("model/1.l.weight")  # the rest still reads
