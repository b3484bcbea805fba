"""The pipeline/tensor-parallel DeepSpeed producer (``tests.deepspeed_3d_producer``) writes what its docstring says.

Three real checkpoints, produced once per module (about 40 s on two cores): pp=2 tied (tp 1, no
``universal_checkpoint_info``), pp=2 x tp=2 tied with the info (world size 4), and tp=2 untied with a frozen
parameter. Each is checked for DeepSpeed's file layout and shard shapes, and converted by DeepSpeed's own
``ds_to_universal`` (with ``--inject_missing_state`` only where there is no info), whose merged tensors must have the
full shapes and equal the concatenated layer-file slices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")

from tests.deepspeed_3d_producer import (VOCAB, PipeJob, padded_vocab, split_sizes, uc_info_for,  # noqa: E402
                                         world_size)

pytestmark = pytest.mark.distributed


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # written by DeepSpeed in this test: trusted

def _uni(p: dict[str, Any], name: str) -> dict[str, Any]:
    return _load(p["uni"] / "zero" / name / "fp32.pt")


def test_world_size_and_uc_info() -> None:
    assert world_size(PipeJob(out="", pp=2, dp=3, tp=2)) == 12
    assert uc_info_for(PipeJob(out="", pp=2)) is None
    assert uc_info_for(PipeJob(out="", pp=2, uc_info=True)) == {
        "universal_checkpoint_version": 0.2,
        "pipeline_replicated_parameter_patterns": [r"^tied_modules\.embed\.weight$"]}
    info = uc_info_for(PipeJob(out="", pp=1, tp=2))
    assert info is not None and info["original_vocab_size"] == 37 and info["padded_vocab_size"] == 38
    assert split_sizes(29, 2) == [15, 14] and padded_vocab(4) == 40


def test_pp2_tied_layout_and_universal(ds3d_produced: dict[str, dict[str, Any]]) -> None:
    p = ds3d_produced["pp2"]
    tag_dir: Path = p["tag_dir"]
    assert p["tag"] == "global_step3"
    assert [r["global_steps"] for r in p["ranks"]] == [3, 3]
    assert p["ranks"][0]["losses"] == p["ranks"][1]["losses"]  # the last stage's loss is broadcast
    files = sorted(f.name for f in tag_dir.iterdir())
    assert files == [f"layer_0{i}-model_states.pt" for i in range(5)] + [  # no layer_05: the tied head
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    assert set(_load(tag_dir / "layer_00-model_states.pt")) == {"weight"}
    assert set(_load(tag_dir / "layer_03-model_states.pt")) == {"l.weight", "l.bias", "n.weight", "n.bias"}
    shapes = []
    for stage in (0, 1):
        m = _load(tag_dir / f"mp_rank_0{stage}_model_states.pt")
        assert m["module"] is None and m["epoch"] == 2 and m["mp_world_size"] == 2 and m["dp_world_size"] == 1
        assert "universal_checkpoint_info" not in m
        shapes.append({k: tuple(v) for g in m["param_shapes"] for k, v in g.items()})
        o = _load(tag_dir / f"zero_pp_rank_0_mp_rank_0{stage}_optim_states.pt")["optimizer_state_dict"]
        assert {k for g in o["param_slice_mappings"] for k in g} == set(shapes[-1])
    assert shapes[0]["tied_modules.embed.weight"] == shapes[1]["tied_modules.embed.weight"] == (37, 13)
    assert shapes[0]["1.l.weight"] == (29, 13) and shapes[1]["3.l.weight"] == (19, 17)
    assert "3.l.weight" not in shapes[0] and "1.l.weight" not in shapes[1]
    # DeepSpeed's converter (--inject_missing_state): full shapes, the tied weight once, equal to layer_00.
    emb = _uni(p, "tied_modules.embed.weight")["param"]
    assert torch.equal(emb, _load(tag_dir / "layer_00-model_states.pt")["weight"])
    names = sorted(d.name for d in (p["uni"] / "zero").iterdir() if d.is_dir())  # + optimizer_state.pt
    assert names == sorted(set(shapes[0]) | set(shapes[1]))
    for n in names:
        assert tuple(_uni(p, n)["param"].shape) == (shapes[0] | shapes[1])[n]


def _tp_layer(tag_dir: Path, layer: int, tp_rank: int) -> dict[str, torch.Tensor]:
    return _load(tag_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")


def test_pp2_tp2_shards_and_universal_merge(ds3d_produced: dict[str, dict[str, Any]]) -> None:
    p = ds3d_produced["pp2tp2"]
    tag_dir: Path = p["tag_dir"]
    files = sorted(f.name for f in tag_dir.iterdir())
    layer_files = [f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(5) for t in range(2)]
    assert files == layer_files + [f"mp_rank_{x:02d}_model_states.pt" for x in range(4)] + [
        f"zero_pp_rank_0_mp_rank_{x:02d}_optim_states.pt" for x in range(4)]
    coords = [(r["stage"], r["tp_rank"]) for r in p["ranks"]]
    assert coords == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Column-parallel 13->29 (uneven 15 + 14), row-parallel 29->17, vocab-parallel embedding (38 / 2 rows).
    assert [tuple(_tp_layer(tag_dir, 1, t)["l.weight"].shape) for t in (0, 1)] == [(15, 13), (14, 13)]
    assert [tuple(_tp_layer(tag_dir, 1, t)["l.bias"].shape) for t in (0, 1)] == [(15,), (14,)]
    assert [tuple(_tp_layer(tag_dir, 2, t)["l.weight"].shape) for t in (0, 1)] == [(17, 15), (17, 14)]
    assert [tuple(_tp_layer(tag_dir, 3, t)["l.weight"].shape) for t in (0, 1)] == [(10, 17), (9, 17)]
    assert [tuple(_tp_layer(tag_dir, 0, t)["weight"].shape) for t in (0, 1)] == [(19, 13), (19, 13)]
    for layer in (1, 2, 3, 4):  # replicated norms (and row-parallel biases) are equal on both tp ranks
        a, b = _tp_layer(tag_dir, layer, 0), _tp_layer(tag_dir, layer, 1)
        assert torch.equal(a["n.weight"], b["n.weight"]) and torch.equal(a["n.bias"], b["n.bias"])
        if layer % 2 == 0:
            assert torch.equal(a["l.bias"], b["l.bias"])
    for x in range(4):  # mp_rank XX = stage * tp + tp_rank
        m = _load(tag_dir / f"mp_rank_{x:02d}_model_states.pt")
        assert m["universal_checkpoint_info"] == uc_info_for(p["job"]) and m["mp_world_size"] == 4
        shapes = {k: tuple(v) for g in m["param_shapes"] for k, v in g.items()}
        assert shapes["tied_modules.embed.weight"] == (19, 13)
        if x >= 2:
            assert shapes["3.l.weight"] == ((10, 17) if x == 2 else (9, 17))
    # ds_to_universal (no --inject_missing_state) merges the slices to the full shapes.
    for name, full, cat in [("1.l.weight", (29, 13), 0), ("1.l.bias", (29,), 0), ("2.l.weight", (17, 29), 1),
                            ("3.l.weight", (19, 17), 0), ("4.l.weight", (13, 19), 1)]:
        layer, key = int(name[0]), name[2:]
        u = _uni(p, name)
        assert tuple(u["param"].shape) == full and u["cat_dim"] == cat
        assert torch.equal(u["param"], torch.cat([_tp_layer(tag_dir, layer, t)[key] for t in (0, 1)], dim=cat))
    assert torch.equal(_uni(p, "2.l.bias")["param"], _tp_layer(tag_dir, 2, 0)["l.bias"])
    emb = _uni(p, "tied_modules.embed.weight")
    assert tuple(emb["param"].shape) == (VOCAB, 13) and emb.get("vocab_tensor") is True
    full = torch.cat([_tp_layer(tag_dir, 0, t)["weight"] for t in (0, 1)])
    assert torch.equal(emb["param"], full[:VOCAB]) and not full[VOCAB:].any()  # padding row stays zero


def test_tensor_parallel_trains_like_the_unsplit_model(ds3d_produced: dict[str, dict[str, Any]]) -> None:
    """The TP collectives are autograd-correct: the same data gives the same loss at tp=1 and tp=2 (the first
    step exactly up to float rounding; later steps within Adam's amplification of that rounding)."""
    ref = ds3d_produced["pp2"]["ranks"][0]["losses"]
    for r in ds3d_produced["pp2tp2"]["ranks"]:
        assert math.isclose(r["losses"][0], ref[0], rel_tol=1e-5)
        assert all(math.isclose(a, b, rel_tol=1e-2) for a, b in zip(r["losses"], ref))


def test_tp2_untied_frozen(ds3d_produced: dict[str, dict[str, Any]]) -> None:
    p = ds3d_produced["tp2-untied-frozen"]
    tag_dir: Path = p["tag_dir"]
    assert [tuple(_tp_layer(tag_dir, 5, t)["weight"].shape) for t in (0, 1)] == [(19, 13), (18, 13)]
    for t in (0, 1):
        m = _load(tag_dir / f"mp_rank_{t:02d}_model_states.pt")
        shapes = {k for g in m["param_shapes"] for k in g}
        assert "2.n.bias" not in shapes and "0.weight" in shapes and "5.bias" in shapes
        assert m["frozen_param_shapes"] is None
        assert "n.bias" in _tp_layer(tag_dir, 2, t)  # the frozen parameter lives in the layer file only
    assert tuple(_uni(p, "5.weight")["param"].shape) == (37, 13)
    assert tuple(_uni(p, "0.weight")["param"].shape) == (37, 13)
    assert not (p["uni"] / "zero" / "2.n.bias").exists()
