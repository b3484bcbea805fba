"""DeepSpeed ZeRO-1/2/3 checkpoints written by DeepSpeed itself (CPU, gloo) imported into the universal format.

The oracle is DeepSpeed's own converter, ``ds_to_universal`` (run as DeepSpeed's users run it, with
``--inject_missing_state`` unless the checkpoint carries ``universal_checkpoint_info``): every fp32 master weight,
``exp_avg``, ``exp_avg_sq`` and ``step`` we import must equal what it writes, bit for bit (``torch.equal``). The
matrix covers ZeRO 1, 2 and 3 at DP 2 and 4, fp32 and bf16 training, two parameter groups, a frozen parameter, an
LR scheduler, client state, the ``latest`` tag, and checkpoints with and without ``universal_checkpoint_info``.
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

from ckpt.errors import (CheckpointError, CorruptCheckpointError, IncompleteCheckpointError,  # noqa: E402
                         UnsafeCheckpointError)
from formats.foreign import convert, diff, open_source  # noqa: E402
from tests.deepspeed_3d_producer import child_env, ds_to_universal  # noqa: E402
from tests.deepspeed_producer import CLIENT_STATE, DsJob, build_model, param_groups, train_and_save  # noqa: E402
from tests.distributed_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

#: (stage, dp, bf16, universal_checkpoint_info in the checkpoint)
MATRIX = [(1, 2, False, False), (1, 4, True, True), (2, 2, True, False), (2, 4, False, False),
          (3, 2, False, True), (3, 4, True, False)]
STEPS = 3


def _ids(case: tuple[int, int, bool, bool]) -> str:
    stage, dp, bf16, uc = case
    return f"zero{stage}-dp{dp}-{'bf16' if bf16 else 'fp32'}{'-ucinfo' if uc else ''}"


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int, bool, bool], dict[str, Any]]:
    base = tmp_path_factory.mktemp("deepspeed")
    out = {}
    for case in MATRIX:
        stage, dp, bf16, uc = case
        root = base / _ids(case)
        ranks = run_distributed(train_and_save, dp, DsJob(out=str(root), stage=stage, bf16=bf16, steps=STEPS,
                                                          lr_scheduler=True, uc_info=uc), timeout_secs=300)
        tag = (root / "latest").read_text().strip()
        oracle = base / f"{_ids(case)}-oracle" / tag
        ds_to_universal(root / tag, oracle, inject=not uc)
        out[case] = {"root": root, "tag": tag, "oracle": oracle, "ranks": ranks}
    return out


def _oracle(path: Path) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=False)  # written by DeepSpeed in this test: trusted
    return obj["param"] if isinstance(obj, dict) else obj


def _oracle_steps(oracle: Path) -> list[torch.Tensor]:
    """ZeRO-3: ds_to_universal writes no step.pt; the per-group steps are in zero/optimizer_state.pt."""
    sd = torch.load(oracle / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    state = sd["optimizer_state_dict"]["state"]
    return [state[g]["step"] for g in sorted(state)]


@pytest.mark.parametrize("case", MATRIX, ids=_ids)
def test_import_matches_ds_to_universal(produced: dict[Any, dict[str, Any]], case: Any, tmp_path: Path) -> None:
    stage, dp, bf16, uc = case
    p = produced[case]
    uni = tmp_path / "uni"
    convert(str(p["root"]), str(uni))  # auto-detected from the root: follows 'latest'
    model = build_model(DsJob(out="", stage=stage).sizes, frozen=True)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    groups = [[n for n in trainable if n.endswith("weight")], [n for n in trainable if not n.endswith("weight")]]
    compared = 0
    with open_source(str(uni)) as ours:
        assert ours.values["deepspeed/zero_stage"] == stage and ours.values["deepspeed/dp_world_size"] == dp
        assert ours.values["deepspeed/global_steps"] == STEPS and ours.values["deepspeed/tag"] == p["tag"]
        for name, param in model.named_parameters():
            w = ours.read(f"model/{name}")
            assert w.dtype == torch.float32 and tuple(w.shape) == tuple(param.shape), name
            if not param.requires_grad:
                # Frozen: never updated; stored in the training dtype, imported as fp32 (as ds_to_universal does).
                expect = param.detach().to(torch.bfloat16 if bf16 else torch.float32).float()
                assert torch.equal(w, expect), name
                if stage < 3:
                    assert torch.equal(w, _oracle(p["oracle"] / "zero" / name / "fp32.pt")), name
                    compared += 1
                assert f"optim/state/{name}/exp_avg" not in ours.tensors
                continue
            assert torch.equal(w.reshape(-1), _oracle(p["oracle"] / "zero" / name / "fp32.pt").reshape(-1)), name
            for state in ("exp_avg", "exp_avg_sq"):
                t = ours.read(f"optim/state/{name}/{state}")
                assert torch.equal(t.reshape(-1), _oracle(p["oracle"] / "zero" / name / f"{state}.pt").reshape(-1)), \
                    (name, state)
            step = ours.read(f"optim/state/{name}/step")
            if stage < 3:
                theirs = _oracle(p["oracle"] / "zero" / name / "step.pt")
            else:
                theirs = _oracle_steps(p["oracle"])[0 if name in groups[0] else 1]
            assert torch.equal(step, theirs) and float(step) == STEPS, (name, step, theirs)
            compared += 4
        assert compared >= 4 * len(trainable)
        # Hyperparameters per group, the parameters named; the scheduler's state; the client state.
        for g, names in enumerate(groups):
            assert [ours.values[f"optim/param_groups/{g}/params/{i}"] for i in range(len(names))] == names
            assert ours.values[f"optim/param_groups/{g}/weight_decay"] == (0.1 if g == 0 else 0.0)
        assert ours.values["deepspeed/lr_scheduler/last_epoch"] == STEPS
        assert ours.values["client_state/epoch"] == CLIENT_STATE["epoch"]
        assert ours.values["client_state/note"] == CLIENT_STATE["note"]
        assert "deepspeed/universal_checkpoint_info/universal_checkpoint_version" in ours.values if uc else True
    # Every key and value of the DeepSpeed checkpoint itself equals the universal copy.
    with open_source(str(p["root"])) as a, open_source(str(uni)) as b:
        report = diff(a, b)
    assert report.equal, report.to_json()


def test_ds_to_universal_output_reads_as_the_same_checkpoint(produced: dict[Any, dict[str, Any]]) -> None:
    """DeepSpeed's universal checkpoints (how tensor-parallel runs come in) read to the keys and values the ZeRO
    files give; ds_to_universal's ZeRO-3 path leaves frozen parameters out, so that is the only difference."""
    for case, p in produced.items():
        oracle_root = p["oracle"].parent  # holds latest_universal
        with open_source(str(oracle_root)) as a, open_source(str(p["root"])) as b:
            assert a.metadata["deepspeed"]["universal"] and a.format == b.format == "deepspeed"
            report = diff(a, b)
        only = [(d.key, d.kind) for d in report.differences]
        assert only == ([] if case[0] < 3 else [("model/0.bias", "only_in_b")]), (_ids(case), only[:5])


def test_imported_checkpoint_loads_into_a_torch_model(produced: dict[Any, dict[str, Any]], tmp_path: Path) -> None:
    """The universal layout is what ``ckpt.save`` writes for a module + optimizer, so ``ckpt.load`` restores it."""
    import ckpt

    case = (2, 4, False, False)
    uni = tmp_path / "uni"
    convert(str(produced[case]["root"]), str(uni))
    model = build_model(DsJob(out="", stage=2).sizes, frozen=True)
    optim = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    state = {"model": model, "optim": optim}
    ckpt.load(state, str(uni), strict=False)
    with open_source(str(uni)) as src:
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), src.read(f"model/{name}")), name
            if param.requires_grad:
                st = optim.state[param]
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(st[k], src.read(f"optim/state/{name}/{k}")), (name, k)
        for g, group in enumerate(optim.param_groups):
            assert group["lr"] == src.values[f"optim/param_groups/{g}/lr"]
            assert group["weight_decay"] == src.values[f"optim/param_groups/{g}/weight_decay"]


def test_cli_convert_and_diff(produced: dict[Any, dict[str, Any]], tmp_path: Path) -> None:
    case = (3, 2, False, True)
    root = produced[case]["root"]
    out = tmp_path / "uni"
    cli = [sys.executable, "-m", "ckpt.cli"]
    r = subprocess.run([*cli, "convert", str(root), str(out), "--from", "deepspeed", "--json"], capture_output=True,
                       text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["src_format"] == "deepspeed" and doc["dst_format"] == "universal" and doc["tensors"] > 0
    r = subprocess.run([*cli, "diff", str(root / produced[case]["tag"]), str(out), "--json"], capture_output=True,
                       text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # A different checkpoint differs (exit 1, the differences listed).
    other = produced[(3, 4, True, False)]["root"]
    r = subprocess.run([*cli, "diff", str(root), str(other), "--json"], capture_output=True, text=True, env=child_env(),
                       timeout=300)
    assert r.returncode == 1 and json.loads(r.stdout)["differences"]


# -- bad input --------------------------------------------------------------------------------------------------


def _copy(produced: dict[Any, dict[str, Any]], case: Any, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ds"
    shutil.copytree(produced[case]["root"], root)
    return root, root / produced[case]["tag"]


def test_missing_rank_file_is_named(produced: dict[Any, dict[str, Any]], tmp_path: Path) -> None:
    for case, victim in (((1, 2, False, False), "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                         ((3, 4, True, False), "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"),
                         ((3, 2, False, True), "zero_pp_rank_1_mp_rank_00_model_states.pt")):
        root, tag_dir = _copy(produced, case, tmp_path / _ids(case))
        (tag_dir / victim).unlink()
        with pytest.raises(IncompleteCheckpointError, match=victim):
            open_source(str(root))
        r = subprocess.run([sys.executable, "-m", "ckpt.cli", "convert", str(root), str(tmp_path / "o")],
                           capture_output=True, text=True, env=child_env(), timeout=300)
        assert r.returncode == 2 and victim in r.stderr


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def test_malicious_optimizer_file_is_refused_without_running(produced: dict[Any, dict[str, Any]],
                                                             tmp_path: Path) -> None:
    root, tag_dir = _copy(produced, (2, 2, True, False), tmp_path)
    victim = tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"evil": _Payload(str(marker))}}, victim)
    with pytest.raises(UnsafeCheckpointError, match="allow-pickle") as e:
        open_source(str(root))
    assert str(victim) in str(e.value) and not marker.exists()


def test_truncated_and_escaping_inputs(produced: dict[Any, dict[str, Any]], tmp_path: Path) -> None:
    root, tag_dir = _copy(produced, (1, 2, False, False), tmp_path)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="mp_rank_00_model_states.pt"):
        open_source(str(root))
    model_file.write_bytes(data)
    (root / "latest").write_text("../../etc")
    with pytest.raises(CorruptCheckpointError, match="outside"):
        open_source(str(root))
    (root / "latest").write_text("global_step999")
    with pytest.raises(CheckpointError, match="global_step999"):
        open_source(str(root))
    # The tag directory itself still opens, and nothing above was changed by the failed attempts.
    with open_source(str(tag_dir), "deepspeed") as src:
        assert src.tensors
