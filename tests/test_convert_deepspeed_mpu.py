"""Tensor-parallel DeepSpeed checkpoints of the non-pipeline engine (an ``mpu``; ZeRO 1, 2 and 3), written by
DeepSpeed itself (``tests.deepspeed_mpu_producer``), imported directly, and DeepSpeed's own ``ds_to_universal`` output
of them imported without losing anything.

The oracle is ``ds_to_universal``: every fp32 master weight, ``exp_avg``, ``exp_avg_sq`` and ``step`` it writes must
be what both importers give, bit for bit (``torch.equal``). What the oracle lacks and the importers keep is pinned
exactly: under ZeRO-3 ``ds_to_universal`` writes no ``step`` and drops the frozen parameter; under ZeRO 1/2 it
writes the frozen parameter (from the module weights of the first model-states file) and everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")

from formats.foreign import open_source  # noqa: E402
from tests.deepspeed_3d_producer import PipeJob, build_layers  # noqa: E402
from tests.deepspeed_mpu_producer import FROZEN, MPU_SESSION_JOBS, MpuJob  # noqa: E402
from tests.test_convert_deepspeed_3d import _load, _oracle  # noqa: E402

pytestmark = pytest.mark.distributed
CASES = list(MPU_SESSION_JOBS)


def _initial_frozen() -> torch.Tensor:
    """``FROZEN``'s value at construction (frozen: it never changes), from the unsplit model."""
    layers = build_layers(PipeJob(out="", pp=1, tied=False), tp_rank=0)
    return dict(torch.nn.Sequential(*[s.build() for s in layers]).named_parameters())[FROZEN].detach()


def _not_in_oracle(job: MpuJob, oracle: dict[str, torch.Tensor], universal: bool) -> set[str]:
    """The keys an importer gives beyond ds_to_universal's tensors: under ZeRO-3 every trainable parameter's
    ``step`` (ds_to_universal's stage-3 path writes none; the importers take it from the optimizer state) and, read
    directly, the frozen parameter (which ds_to_universal's stage-3 path drops)."""
    if job.stage != 3:
        return set()
    extra = {f"optim/state/{k[len('model/'):]}/step" for k in oracle if k.startswith("model/")}
    if job.frozen and not universal:
        extra.add(f"model/{FROZEN}")
    return extra


def _trainable(job: MpuJob, oracle: dict[str, torch.Tensor]) -> set[str]:
    return {k[len("model/"):] for k in oracle if k.startswith("model/")} - ({FROZEN} if job.frozen else set())


def _check(src: Any, p: dict[str, Any], universal: bool) -> None:
    job: MpuJob = p["job"]
    oracle = _oracle(p["uni"])
    ours = {k for k in src.tensors if k.startswith("model/") or k.startswith("optim/state/")}
    assert set(oracle) <= ours, f"missing: {sorted(set(oracle) - ours)[:10]}"
    for key, want in oracle.items():
        got = src.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
    extra = ours - set(oracle)
    assert extra == _not_in_oracle(job, oracle, universal), sorted(extra ^ _not_in_oracle(job, oracle, universal))
    for key in extra:
        t = src.read(key)
        if key.endswith("/step"):
            assert t.dtype == torch.float32 and float(t) == job.steps, (key, t)
        else:  # the frozen parameter, as fp32, unchanged since construction
            assert t.dtype == torch.float32 and torch.equal(t, _initial_frozen()), key
    if job.frozen and f"model/{FROZEN}" in oracle:
        assert torch.equal(oracle[f"model/{FROZEN}"], _initial_frozen())
    grouped = {v for k, v in src.values.items() if k.startswith("optim/param_groups/") and "/params/" in k}
    assert grouped == _trainable(job, oracle)
    assert src.values["deepspeed/global_steps"] == job.steps
    assert src.values["client_state/epoch"] == 2
    assert src.values["deepspeed/zero_stage"] == job.stage


@pytest.mark.parametrize("case", CASES)
def test_direct_import_matches_ds_to_universal(dsmpu_produced: dict[str, dict[str, Any]], case: str) -> None:
    p = dsmpu_produced[case]
    with open_source(str(p["tag_dir"]), "deepspeed") as src:
        _check(src, p, universal=False)
        assert src.metadata["deepspeed"]["pp_degree"] == 1
        assert src.metadata["deepspeed"]["tp_degree"] == p["job"].tp
        assert src.metadata["deepspeed"]["dp_world_size"] == p["job"].dp


@pytest.mark.parametrize("case", CASES)
def test_ds_to_universal_output_keeps_every_tensor(dsmpu_produced: dict[str, dict[str, Any]], case: str) -> None:
    p = dsmpu_produced[case]
    with open_source(str(p["uni"]), "deepspeed") as src:
        _check(src, p, universal=True)


@pytest.mark.parametrize("case", CASES)
def test_layout_is_as_documented(dsmpu_produced: dict[str, dict[str, Any]], case: str) -> None:
    """The file names and the fields the producer's docstring describes, so a DeepSpeed upgrade that moves them fails
    here first."""
    p = dsmpu_produced[case]
    job: MpuJob = p["job"]
    tag: Path = p["tag_dir"]
    ranks = [(d, t) for d in range(job.dp) for t in range(job.tp)]
    optim = {f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d, t in ranks}
    model = ({f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt" for d, t in ranks} if job.stage == 3
             else {f"mp_rank_{t:02d}_model_states.pt" for t in range(job.tp)})
    assert {f.name for f in tag.iterdir()} == optim | model
    for name in sorted(model):
        sd = _load(tag / name)
        assert sd["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": job.tp}
        assert sd["universal_checkpoint_info"]["original_vocab_size"] == 37
        assert (sd["mp_world_size"], sd["dp_world_size"]) == (job.tp, job.dp)
        module = sd["module"]
        if job.stage == 3:  # placeholders only; the weights are in the optimizer files
            assert all(t.numel() == 0 for t in module.values())
        else:  # the whole module of this tp rank, frozen parameters included, local shapes
            assert module["0.weight"].shape == (19, 13) and module[FROZEN].shape == (17,)
            assert module["1.l.weight"].shape == ((15, 13) if name.startswith("mp_rank_00") else (14, 13))
        fragments = sd["frozen_param_fragments"]
        if not job.frozen or job.stage == 1:
            assert not fragments
        else:  # ZeRO-2: the whole (replicated) tensor; ZeRO-3: this DP rank's partition, ceil(17 / dp)
            assert fragments[FROZEN].shape == ((17,) if job.stage == 2 else (-(-17 // job.dp),))
