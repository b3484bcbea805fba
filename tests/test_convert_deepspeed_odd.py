"""DeepSpeed ZeRO-1/2/3 checkpoints of a model whose sizes no data-parallel degree divides, written by DeepSpeed
itself (CPU, gloo), imported and exported bit for bit (issue #15).

``OddNet`` (``tests/deepspeed_producer.py``) has an embedding of 37 x 13, a head of 7 outputs, a frozen layer, a
LayerNorm and two parameter groups of 1,061 and 65 elements. DeepSpeed pads each ZeRO-1/2 group to
``2 x dp`` elements (more with ``parameter_alignment``, which also leaves gaps between parameters), records the
padding per rank in ``group_paddings``, saves the fp32 partition without it and the optimizer moments with it; ZeRO-3
pads every parameter to ``ceil(numel / dp)`` and, with a small ``sub_group_size``, splits a parameter group into
several flat sub-groups. The oracle is DeepSpeed's own ``ds_to_universal``: every fp32 weight, ``exp_avg``,
``exp_avg_sq`` and step counter we import, and every file we export to DeepSpeed's universal layout, must equal what
it writes (``torch.equal``); DeepSpeed's ``load_universal`` then loads our export at another DP size under every
stage and holds the same state bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")

from ckpt.errors import CorruptCheckpointError, UnsupportedStateError  # noqa: E402
from formats.foreign import convert, diff, open_source  # noqa: E402
from tests.deepspeed_producer import DsJob, OddNet, train_and_save  # noqa: E402
from tests.distributed_utils import run_distributed  # noqa: E402
from tests.test_convert_deepspeed_export import _check_loaded, load_universal_and_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed
STEPS = 3
MATRICES = ["embed.weight", "fc.weight", "head.weight"]  # group 0 (weight decay)
VECTORS = ["fc.bias", "norm.weight", "head.bias"]  # group 1 (no decay)
FROZEN = ["frozen.weight", "frozen.bias"]


@dataclass(frozen=True)
class Case:
    name: str
    stage: int
    dp: int
    bf16: bool = False
    zero: dict[str, Any] = field(default_factory=dict)  # extra zero_optimization settings
    extra: dict[str, Any] = field(default_factory=dict)  # extra top-level config

    def job(self, out: str) -> DsJob:
        config = {"zero_optimization": {"stage": self.stage, **self.zero}, **self.extra}
        return DsJob(out=out, stage=self.stage, bf16=self.bf16, steps=STEPS, model="odd", extra_config=config)


CASES = [
    Case("zero1-dp2", 1, 2),
    # bf16 with fp32 gradient accumulation trains with DeepSpeed's BF16_Optimizer, which keeps the padding in the
    # fp32 partition as well as in the moments.
    Case("zero1-dp3-bf16optimizer", 1, 3, bf16=True, extra={"data_types": {"grad_accum_dtype": "fp32"}}),
    Case("zero2-dp2-bf16", 2, 2, bf16=True),
    Case("zero2-dp3-param-alignment", 2, 3, zero={"parameter_alignment": True}),
    Case("zero2-dp4", 2, 4),
    Case("zero3-dp2", 3, 2),
    Case("zero3-dp3-subgroups", 3, 3, zero={"sub_group_size": 100}),
]
ELASTIC = Case("zero2-dp2-elastic", 2, 2, zero={"elastic_checkpoint": True})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _trusted(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # written by DeepSpeed in this test: trusted


def _unwrap(obj: Any) -> torch.Tensor:
    return obj["param"] if isinstance(obj, dict) else obj


def ds_to_universal(tag_dir: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, f"ds_to_universal failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    base = tmp_path_factory.mktemp("deepspeed_odd")
    out = {}
    for case in [*CASES, ELASTIC]:
        root = base / case.name
        run_distributed(train_and_save, case.dp, case.job(str(root)), timeout_secs=300)
        tag_dir = root / (root / "latest").read_text().strip()
        entry = {"root": root, "tag_dir": tag_dir}
        if case is not ELASTIC:
            entry["oracle"] = base / f"{case.name}-oracle" / tag_dir.name
            ds_to_universal(tag_dir, entry["oracle"])
        out[case.name] = entry
    return out


def _optim_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def _assert_padded(case: Case, tag_dir: Path) -> None:
    """The checkpoint really exercises padding: a ZeRO-1/2 rank records some, a ZeRO-3 parameter is uneven."""
    if case.stage < 3:
        pads = [p for f in _optim_files(tag_dir) for p in _trusted(f)["optimizer_state_dict"]["group_paddings"]]
        assert any(pads), (case.name, pads)
    else:
        shapes = _trusted(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
        assert any(torch.Size(s).numel() % case.dp for g in shapes for s in g.values())
        if case.zero.get("sub_group_size"):
            assert len(shapes) > 2, "sub_group_size did not split the parameter groups into sub-groups"


def _zero3_steps(oracle: Path, tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3: ds_to_universal writes no step.pt; each flat sub-group's step is in zero/optimizer_state.pt."""
    state = _trusted(oracle / "zero" / "optimizer_state.pt")["optimizer_state_dict"]["state"]
    shapes = _trusted(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    return {name: state[sub]["step"] for sub, group in enumerate(shapes) for name in group}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_import_and_export_match_ds_to_universal(produced: dict[str, dict[str, Path]], case: Case,
                                                 tmp_path: Path) -> None:
    p = produced[case.name]
    _assert_padded(case, p["tag_dir"])
    uni, export = tmp_path / "uni", tmp_path / "export" / p["tag_dir"].name
    convert(str(p["root"]), str(uni))
    convert(str(uni), str(export), dst_format="deepspeed-universal")
    model = OddNet()
    compared = 0
    steps = _zero3_steps(p["oracle"], p["tag_dir"]) if case.stage == 3 else {}
    with open_source(str(uni)) as ours:
        for name in [*MATRICES, *VECTORS]:
            assert tuple(ours.tensors[f"model/{name}"].shape) == tuple(model.get_parameter(name).shape)
            for stem, key in (("fp32", f"model/{name}"), ("exp_avg", f"optim/state/{name}/exp_avg"),
                              ("exp_avg_sq", f"optim/state/{name}/exp_avg_sq")):
                theirs = _unwrap(_trusted(p["oracle"] / "zero" / name / f"{stem}.pt")).reshape(-1)
                assert torch.equal(ours.read(key).reshape(-1), theirs), (name, stem)
                exported = _unwrap(torch.load(export / "zero" / name / f"{stem}.pt", weights_only=True))
                assert torch.equal(exported.reshape(-1), theirs), ("export", name, stem)
                compared += 1
            step = ours.read(f"optim/state/{name}/step")
            theirs = steps[name] if case.stage == 3 else _trusted(p["oracle"] / "zero" / name / "step.pt")
            assert torch.equal(step, theirs) and float(step) == STEPS, (name, step, theirs)
            assert torch.equal(torch.load(export / "zero" / name / "step.pt", weights_only=True), step)
        for name in FROZEN:  # never updated: the training dtype's values, as fp32
            want = model.get_parameter(name).detach().to(torch.bfloat16 if case.bf16 else torch.float32).float()
            assert torch.equal(ours.read(f"model/{name}"), want), name
            assert f"optim/state/{name}/exp_avg" not in ours.tensors
            if case.stage < 3:  # ds_to_universal's ZeRO-3 path leaves frozen parameters out
                assert torch.equal(ours.read(f"model/{name}"), _unwrap(_trusted(p["oracle"] / "zero" / name /
                                                                                 "fp32.pt")))
        for g, (names, wd) in enumerate(((MATRICES, 0.1), (VECTORS, 0.0))):
            assert [ours.values[f"optim/param_groups/{g}/params/{i}"] for i in range(len(names))] == names
            assert ours.values[f"optim/param_groups/{g}/weight_decay"] == wd
            assert f"optim/param_groups/{g}/params/{len(names)}" not in ours.values
    assert compared == 3 * len(MATRICES + VECTORS)
    # Every key and value of the DeepSpeed checkpoint equals the universal copy, and ds_to_universal's output reads
    # as the same checkpoint (less the frozen parameters its ZeRO-3 path drops).
    with open_source(str(p["root"])) as a, open_source(str(uni)) as b:
        report = diff(a, b)
    assert report.equal, report.to_json()
    with open_source(str(p["oracle"].parent)) as a, open_source(str(p["root"])) as b:
        only = sorted(d.key for d in diff(a, b).differences)
    assert only == ([] if case.stage < 3 else sorted(f"model/{n}" for n in FROZEN)), only


@pytest.mark.parametrize("source, world", [("zero1-dp2", 3), ("zero3-dp3-subgroups", 2)])
def test_deepspeed_loads_the_export_at_another_dp(produced: dict[str, dict[str, Path]], source: str, world: int,
                                                  tmp_path: Path) -> None:
    """The export of an odd-sized checkpoint loads with ``load_universal`` under ZeRO-1, 2 and 3 at another DP size
    (so DeepSpeed pads it its own way): what DeepSpeed then holds equals the checkpoint bit for bit."""
    export = tmp_path / "export" / produced[source]["tag_dir"].name
    convert(str(produced[source]["root"]), str(export), dst_format="deepspeed-universal")
    jobs = [DsJob(out="", stage=s, steps=2, model="odd", load_from=str(export.parent), universal=True)
            for s in (1, 2, 3)]
    reports = run_distributed(load_universal_and_train, world, jobs, timeout_secs=300)
    for stage, report in zip((1, 2, 3), reports[0]):
        assert set(report["state"]) == set(MATRICES + VECTORS), stage
        _check_loaded(report, str(produced[source]["tag_dir"]), "deepspeed")
        assert report["start"] == STEPS
        for r in range(world):
            assert all(torch.isfinite(torch.tensor(reports[r][stage - 1]["losses"]))), (stage, r)


# -- inconsistent checkpoints ----------------------------------------------------------------------------------


def _rewrite(path: Path, edit: Any) -> None:
    """Load a DeepSpeed optimizer file (trusted, written in this test), edit it, save it back."""
    sd = _trusted(path)
    edit(sd["optimizer_state_dict"])
    torch.save(sd, path)


def test_inconsistent_padding_names_file_group_and_sizes(produced: dict[str, dict[str, Path]],
                                                         tmp_path: Path) -> None:
    src = produced["zero2-dp3-param-alignment"]["root"]
    last = "zero_pp_rank_2_mp_rank_00_optim_states.pt"

    def fresh(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(src, root)
        return root / (root / "latest").read_text().strip() / last

    # A moment one element short of the fp32 partition (353 + 1 padding = 354 elements; 353 stored here).
    f = fresh("short")
    _rewrite(f, lambda o: o["base_optimizer_state"]["state"][0].update(
        exp_avg=o["base_optimizer_state"]["state"][0]["exp_avg"][:-2].clone()))
    with pytest.raises(CorruptCheckpointError) as e:
        open_source(str(f.parents[1]))
    msg = str(e.value)
    assert str(f) in msg and "'exp_avg' of group 0" in msg and "354" in msg and "355" in msg, msg
    # group_paddings that disagree with the stored sizes.
    f = fresh("paddings")
    _rewrite(f, lambda o: o.update(group_paddings=[0, 0]))
    with pytest.raises(CorruptCheckpointError, match=r"group 0 holds 356 elements; expected 355") as e:
        open_source(str(f.parents[1]))
    assert str(f) in str(e.value)
    # A fragment that runs past the rank's flat partition.
    f = fresh("fragment")
    _rewrite(f, lambda o: setattr(o["param_slice_mappings"][1]["head.bias"], "numel", 99))
    with pytest.raises(CorruptCheckpointError, match=r"fragment of 'head.bias' in group 1") as e:
        open_source(str(f.parents[1]))
    assert str(f) in str(e.value) and "partition of" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "ckpt.cli", "convert", str(f.parents[1]), str(tmp_path / "o")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "head.bias" in r.stderr and not (tmp_path / "o").exists(), r.stderr


def test_elastic_checkpoint_is_refused_with_what_to_do(produced: dict[str, dict[str, Path]]) -> None:
    with pytest.raises(UnsupportedStateError, match="elastic_checkpoint false"):
        open_source(str(produced[ELASTIC.name]["root"]))
