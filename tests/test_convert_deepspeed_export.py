"""Export to DeepSpeed's universal checkpoint layout, loaded by DeepSpeed itself (CPU, gloo) with ``load_universal``.

The evidence is DeepSpeed's own loader: after ``engine.load_checkpoint(dir)`` under ``"checkpoint":
{"load_universal": true}``, every fp32 master weight, ``exp_avg`` and ``exp_avg_sq`` DeepSpeed holds (gathered with
``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), every group's step counter and
hyperparameters must equal the exported checkpoint's bit for bit (``torch.equal``), at a DP size other than the one
that wrote it, under ZeRO-1, 2 and 3; then training goes on. For a plain torch run the continued losses must equal
those of continuing the torch run itself (simulated DP 2, no clipping): DeepSpeed's ZeRO step runs the same torch
AdamW over flat partitions, and averaging two ranks' gradients is exact. For a DeepSpeed-written checkpoint the
chain DeepSpeed -> universal -> deepspeed-universal -> DeepSpeed at DP 4 is checked against the import, and the
exported files against those of DeepSpeed's own ``ds_to_universal``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")

import ckpt  # noqa: E402
from ckpt.errors import CheckpointError, CheckpointExistsError  # noqa: E402
from formats.foreign import convert, open_source  # noqa: E402
from formats.foreign.deepspeed_universal import MissingStateError  # noqa: E402
from tests.deepspeed_producer import (CLIENT_STATE, DsJob, batch, build_model, ds_config,  # noqa: E402
                                      make_model, make_param_groups, param_groups, train_and_save, train_steps)
from tests.distributed_utils import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed

SIZES = (16, 48, 40, 8)
STEPS = 3
MORE_STEPS = 2
NO_CLIP = {"gradient_clipping": 0.0}
STAGES = (1, 2, 3)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------------
# Rank functions (run in spawned gloo processes)


def load_universal_and_train(rank: int, world_size: int, jobs: list[DsJob]) -> list[dict[str, Any]]:
    """For each job in turn: a fresh engine loads ``job.load_from`` with ``load_universal``, reports what DeepSpeed
    then holds (full fp32 weights and moments, steps, hyperparameters, counters; rank 0 only), and trains on."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed  # noqa: PLC0415 - imported in the rank process only
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415

    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for job in jobs:
        model = make_model(job)
        optim = torch.optim.AdamW(make_param_groups(job, model), lr=1e-2, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5) if job.lr_scheduler else None
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched,
                                               config=ds_config(job))
        path, client = engine.load_checkpoint(job.load_from)
        if path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {job.load_from}")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in engine.module.named_parameters():
            if p.requires_grad:  # collectives: every rank calls them
                state[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
        base = engine.optimizer.optimizer
        steps = [st["step"].clone() for st in base.state.values() if "step" in st]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        sched_state = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        start = engine.global_steps
        losses = train_steps(engine, job, rank, start)
        report: dict[str, Any] = {"losses": losses, "start": start, "optimizer": type(engine.optimizer).__name__}
        if rank == 0:
            report.update(state=state, steps=steps, hyper=hyper, sched=sched_state,
                          client={k: v for k, v in client.items() if isinstance(v, (int, float, str, list))})
        out.append(report)
        engine.destroy()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The plain torch reference


def _dp_steps(model: torch.nn.Module, optim: torch.optim.Optimizer, start: int, steps: int, world: int,
              shared_step: bool = False) -> list[list[float]]:
    """``steps`` AdamW steps on the mean of ``world`` ranks' gradients (each rank's batch as DeepSpeed's ranks see
    it); returns the losses per rank. One thread, as each DeepSpeed rank runs.

    ``shared_step`` replays what DeepSpeed's ZeRO-3 universal load does: it gives every group's flat partition the
    same step tensor (``optimizer_state_dict["state"][0]["step"]``), and steps the groups one after the other, so
    each group's step sees the counter the previous group's step advanced (group 0 step 4, group 1 step 5, ...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses: list[list[float]] = [[] for _ in range(world)]
    counter = float(optim.state[optim.param_groups[0]["params"][0]]["step"]) if shared_step else 0.0
    try:
        for i in range(start, start + steps):
            total: dict[str, torch.Tensor] = {}
            for r in range(world):
                optim.zero_grad(set_to_none=True)
                loss = model(batch(i, r, SIZES[0], False)).float().pow(2).mean()
                loss.backward()
                losses[r].append(loss.item())
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        total[n] = p.grad.clone() if n not in total else total[n] + p.grad
            for n, p in model.named_parameters():
                p.grad = total[n] / world if n in total else None
            if not shared_step:
                optim.step()
                continue
            grads = {p: p.grad for p in model.parameters()}
            for group in optim.param_groups:
                for p in model.parameters():
                    p.grad = grads[p] if any(p is q for q in group["params"]) else None
                for p in group["params"]:
                    optim.state[p]["step"] = torch.tensor(counter)
                optim.step()
                counter += 1
            for p in model.parameters():
                p.grad = grads[p]
    finally:
        torch.set_num_threads(threads)
    return losses


def _check_loaded(report: dict[str, Any], src_path: str, src_format: str = "auto") -> None:
    """What DeepSpeed holds after the load equals the source checkpoint bit for bit."""
    with open_source(src_path, src_format) as src:
        for name, got in report["state"].items():
            for stem, key in (("fp32", f"model/{name}"), ("exp_avg", f"optim/state/{name}/exp_avg"),
                              ("exp_avg_sq", f"optim/state/{name}/exp_avg_sq")):
                want = src.read(key).float()
                assert torch.equal(got[stem], want), f"{name} {stem}: DeepSpeed loaded other values"
            step = src.read(f"optim/state/{name}/step")
            assert all(torch.equal(s, step) for s in report["steps"]), (report["steps"], step)
        assert set(report["state"]) == {k[len("optim/state/"):].split("/")[0] for k in src.tensors
                                        if k.startswith("optim/state/")}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain torch model + AdamW trained STEPS steps (simulated DP 2), saved with ckpt.save, exported."""
    base = tmp_path_factory.mktemp("ds_export")
    model = build_model(SIZES, frozen=True)
    optim = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    _dp_steps(model, optim, 0, STEPS, 2)
    uni = base / "uni"
    ckpt.save({"model": model, "optim": optim}, str(uni))
    dst = base / "ds" / "global_step3"
    result = convert(str(uni), str(dst), dst_format="deepspeed-universal")
    return {"base": base, "uni": uni, "dst": dst, "model": model, "optim": optim, "result": result}


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_layout_is_what_deepspeed_reads(torch_run: dict[str, Any]) -> None:
    dst: Path = torch_run["dst"]
    assert (dst.parent / "latest_universal").read_text() == "global_step3"
    assert sorted(os.listdir(dst / "zero" / "0.weight")) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    assert sorted(os.listdir(dst / "zero" / "0.bias")) == ["fp32.pt"]  # frozen: no optimizer state
    w = torch.load(dst / "zero" / "2.weight" / "fp32.pt", weights_only=True)
    assert set(w) == {"param", "cat_dim"} and w["cat_dim"] == 0
    assert torch.equal(w["param"], torch_run["model"].state_dict()["2.weight"])
    with open_source(str(torch_run["uni"])) as src:
        assert torch.equal(w["param"], src.read("model/2.weight"))
        assert torch.equal(torch.load(dst / "zero" / "2.weight" / "step.pt", weights_only=True),
                           src.read("optim/state/2.weight/step"))
    ms = torch.load(dst / "mp_rank_00_model_states.pt", weights_only=True)
    assert ms["global_steps"] == STEPS and ms["mp_world_size"] == 1 and ms["optimizer"] is None
    assert [list(g) for g in ms["param_shapes"]] == [["0.weight", "2.weight", "4.weight"], ["2.bias", "4.bias"]]
    assert os.path.samefile(dst / "mp_rank_00_model_states.pt", dst / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    osd = torch.load(dst / "zero" / "optimizer_state.pt", weights_only=True)
    assert [g["weight_decay"] for g in osd["param_groups"]] == [0.1, 0.0]
    assert osd["optimizer_state_dict"]["state"][0]["step"].item() == STEPS
    assert not [n for n in os.listdir(dst.parent) if ".tmp-" in n or ".old-" in n]
    # The export reads back (as a DeepSpeed universal checkpoint): every tensor of the source, bit for bit.
    with open_source(str(dst)) as back, open_source(str(torch_run["uni"])) as src:
        for key in src.tensors:
            if key.startswith(("model/", "optim/state/")):
                assert torch.equal(back.read(key), src.read(key)), key


def test_deepspeed_loads_torch_export_and_trains_on(torch_run: dict[str, Any]) -> None:
    """ZeRO-1, 2 and 3 at DP 2 load the export of a plain torch run; state bit-exact, losses as torch's own."""
    root = str(torch_run["dst"].parent)
    jobs = [DsJob(out="", stage=s, steps=MORE_STEPS, load_from=root, universal=True, extra_config=NO_CLIP)
            for s in STAGES]
    reports = run_distributed(load_universal_and_train, 2, jobs, timeout_secs=240)
    for stage, report in zip(STAGES, reports[0]):
        _check_loaded(report, str(torch_run["uni"]))
        assert report["start"] == STEPS
        # ZeRO-1/2 restore each group's hyperparameters; ZeRO-3's universal load gives every group those of
        # group 0 (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3), a DeepSpeed limitation.
        want_wd = [0.1, 0.0] if stage < 3 else [0.1, 0.1]
        assert [h["weight_decay"] for h in report["hyper"]] == want_wd, stage
        assert all(h["lr"] == 1e-2 and h["betas"] == (0.9, 0.95) for h in report["hyper"])
        model, optim = copy.deepcopy(torch_run["model"]), None
        groups = param_groups(model)
        groups[1]["weight_decay"] = want_wd[1]
        optim = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
        optim.load_state_dict(_with_wd(torch_run["optim"].state_dict(), want_wd))
        want = _dp_steps(model, optim, STEPS, MORE_STEPS, 2, shared_step=stage == 3)
        got = [reports[r][STAGES.index(stage)]["losses"] for r in range(2)]
        assert got == want, f"ZeRO-{stage}: DeepSpeed's continued losses {got} differ from torch's {want}"


def _with_wd(sd: dict[str, Any], wd: list[float]) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    for g, w in zip(sd["param_groups"], wd):
        g["weight_decay"] = w
    return sd


def test_cli_export_dry_run_and_overwrite(torch_run: dict[str, Any], tmp_path: Path) -> None:
    dst = tmp_path / "out" / "global_step3"

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckpt.cli", "convert", str(torch_run["uni"]), str(dst),
                               "--to", "deepspeed-universal", *extra], capture_output=True, text=True, env=_env(),
                              timeout=120)

    r = cli("--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["dst_format"] == "deepspeed-universal" and not plan["dst_exists"]
    assert any("latest_universal" in o for o in plan["outputs"]) and not dst.exists()
    r = cli("--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["written"]
    assert str(dst / "zero" / "4.bias" / "exp_avg_sq.pt") in written and (dst / "zero" / "optimizer_state.pt").is_file()
    before = (dst / "zero" / "4.weight" / "fp32.pt").read_bytes()
    r = cli()
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr
    assert (dst / "zero" / "4.weight" / "fp32.pt").read_bytes() == before
    r = cli("--overwrite", "--dtype", "bf16")
    assert r.returncode == 0 and r.stdout.startswith("OK:"), r.stderr
    ms = torch.load(dst / "mp_rank_00_model_states.pt", weights_only=True)
    assert ms["module"]["4.weight"].dtype == torch.bfloat16  # --dtype casts the module copy only
    assert torch.load(dst / "zero" / "4.weight" / "fp32.pt", weights_only=True)["param"].dtype == torch.float32
    assert sorted(os.listdir(dst.parent)) == ["global_step3", "latest_universal"]


def test_overwrite_refuses_a_directory_that_is_no_checkpoint(torch_run: dict[str, Any], tmp_path: Path) -> None:
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointExistsError, match="not a DeepSpeed checkpoint"):
        convert(str(torch_run["uni"]), str(dst), dst_format="deepspeed-universal", overwrite=True)
    assert (dst / "notes.txt").read_text() == "keep me"


def test_model_only_checkpoint_is_refused(tmp_path: Path) -> None:
    model = build_model(SIZES, frozen=False)
    ckpt.save({"model": model}, str(tmp_path / "uni"))
    with pytest.raises(MissingStateError, match=r"optim/param_groups/<i>/params") as e:
        convert(str(tmp_path / "uni"), str(tmp_path / "out" / "t"), dst_format="deepspeed-universal")
    assert isinstance(e.value, CheckpointError) and "ckpt.save" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_moments_of_one_parameter_are_named(tmp_path: Path) -> None:
    model = build_model(SIZES, frozen=False)
    optim = torch.optim.AdamW(param_groups(model), lr=1e-2)
    model(torch.randn(2, SIZES[0])).pow(2).mean().backward()
    model[4].bias.grad = None  # AdamW skips it: no state for 4.bias, while its group has some
    optim.step()
    ckpt.save({"model": model, "optim": optim}, str(tmp_path / "uni"))
    with pytest.raises(MissingStateError) as e:
        convert(str(tmp_path / "uni"), str(tmp_path / "out" / "t"), dst_format="deepspeed-universal")
    for key in ("optim/state/4.bias/exp_avg", "optim/state/4.bias/exp_avg_sq", "optim/state/4.bias/step"):
        assert key in str(e.value)
    r = subprocess.run([sys.executable, "-m", "ckpt.cli", "convert", str(tmp_path / "uni"), str(tmp_path / "o2"),
                        "--to", "deepspeed-universal"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and "optim/state/4.bias/exp_avg" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A DeepSpeed ZeRO-3 run at DP 2 (LR scheduler, client state) and its deepspeed-universal export."""
    base = tmp_path_factory.mktemp("ds_chain")
    run_distributed(train_and_save, 2, DsJob(out=str(base / "src"), stage=3, steps=STEPS, lr_scheduler=True),
                    timeout_secs=240)
    tag_dir = base / "src" / f"global_step{STEPS}"
    dst = base / "export" / f"global_step{STEPS}"
    convert(str(tag_dir), str(dst), src_format="deepspeed", dst_format="deepspeed-universal")
    return {"base": base, "tag_dir": tag_dir, "dst": dst}


def test_deepspeed_chain_to_dp4(ds_run: dict[str, Any]) -> None:
    """DeepSpeed ZeRO-3 at DP 2 -> deepspeed-universal -> DeepSpeed at DP 4 under ZeRO-1, 2, 3 and bf16 ZeRO-1 with
    fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, whose loader is another), and training goes on."""
    root = str(ds_run["dst"].parent)
    targets = [(1, False), (2, False), (3, False), (1, True)]
    jobs = [DsJob(out="", stage=s, bf16=bf16, steps=MORE_STEPS, load_from=root, universal=True, lr_scheduler=True,
                  extra_config={"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {})
            for s, bf16 in targets]
    reports = run_distributed(load_universal_and_train, 4, jobs, timeout_secs=300)
    with open_source(str(ds_run["tag_dir"]), "deepspeed") as src:
        sched = {k[len("deepspeed/lr_scheduler/"):]: v for k, v in src.values.items()
                 if k.startswith("deepspeed/lr_scheduler/")}
    for j, ((stage, bf16), report) in enumerate(zip(targets, reports[0])):
        _check_loaded(report, str(ds_run["tag_dir"]), "deepspeed")
        assert (report["optimizer"] == "BF16_Optimizer") == bf16, report["optimizer"]
        assert report["start"] == STEPS
        assert {k: report["client"][k] for k in CLIENT_STATE} == CLIENT_STATE
        assert report["sched"]["last_epoch"] == sched["last_epoch"] == STEPS
        assert [h["lr"] for h in report["hyper"]] == report["sched"]["_last_lr"]
        for r in range(4):
            losses = reports[r][j]["losses"]
            assert len(losses) == MORE_STEPS and all(torch.isfinite(torch.tensor(losses))), (stage, bf16, r, losses)


def test_export_matches_ds_to_universal(ds_run: dict[str, Any]) -> None:
    """Every tensor file of the export holds what DeepSpeed's own converter writes for the same checkpoint."""
    ref = ds_run["base"] / "ref" / f"global_step{STEPS}"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_run["tag_dir"]),
           "--output_folder", str(ref), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    compared = 0
    for pdir in sorted((ref / "zero").iterdir()):
        if not pdir.is_dir():
            continue
        for f in sorted(pdir.iterdir()):
            theirs = torch.load(f, weights_only=False)
            theirs = theirs["param"] if isinstance(theirs, dict) else theirs
            ours = torch.load(ds_run["dst"] / "zero" / pdir.name / f.name, weights_only=True)
            ours = ours["param"] if isinstance(ours, dict) else ours
            assert torch.equal(ours.reshape(-1), theirs.detach().reshape(-1)), f"{pdir.name}/{f.name}"
            compared += 1
    assert compared >= 15
    theirs = torch.load(ref / "zero" / "optimizer_state.pt", weights_only=False)
    ours = torch.load(ds_run["dst"] / "zero" / "optimizer_state.pt", weights_only=True)
    strip = [{k: v for k, v in g.items() if k != "params"} for g in theirs["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in ours["param_groups"]]
