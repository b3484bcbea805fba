"""Real DeepSpeed tensor-parallel checkpoints of the *non-pipeline* engine, which gets its parallel groups from a
Megatron-style ``mpu``, under ZeRO 1, 2 and 3, written by DeepSpeed itself on CPU (gloo).

Who calls it: tests, through ``produce(MpuJob(...))`` (which runs ``train_and_save`` on ``tp * dp`` spawned gloo
ranks with ``tests.distributed_utils.run_distributed``), and the session fixture ``dsmpu_produced`` (re-exported by
``tests/conftest.py``), which also runs DeepSpeed's ``ds_to_universal`` on each result as an oracle.

The model is the untied pipeline model of ``tests.deepspeed_3d_producer`` (its ``build_layers`` with pp=1, tied
False), built into a plain ``torch.nn.Sequential``, so the global names are the same as there: ``0.weight`` the
vocabulary-parallel embedding (vocab 37 padded to 38, [19, 13] per rank), ``1``/``3`` column-parallel blocks
13->29 and 17->19 (``l.weight`` [15, 13] / [14, 13]), ``2``/``4`` row-parallel blocks 29->17 and 19->13
(``l.weight`` [17, 15] / [17, 14], ``l.bias`` replicated), ``<i>.n`` replicated LayerNorms, ``5`` the
column-parallel head 13->37 (19 + 18 rows). Its ``uc_info_for`` patterns therefore apply unchanged. Rank ``r`` is
tp rank ``r % tp`` of data-parallel replica ``r // tp``; ``TensorParallelMpu`` builds the groups with
``new_group`` on gloo. Split parameters carry ``tensor_model_parallel = True`` (as Megatron marks them), which
ZeRO's gradient-norm uses (DeepSpeed clips at 1.0 by default) to count replicated parameters once.

Of the ``mpu`` methods, DeepSpeed 0.19.8 called (counted on real runs, ZeRO 1, 2 and 3 alike)
``get_data_parallel_group``, ``get_data_parallel_world_size``, ``get_model_parallel_rank``,
``get_model_parallel_world_size`` and ``get_model_parallel_group``; ``get_data_parallel_rank`` is kept because
Megatron's mpu has it (the engine's data loader uses it). It probes ``get_tensor_model_parallel_*``,
``get_pipe(line_model)_parallel_*`` and ``get_sequence_parallel_*`` with ``hasattr`` and falls back to the
model-parallel ones (tp) and to 1 (pipeline, sequence); ``initialize_sequence_parallel`` must be absent (its
presence switches DeepSpeed to ignoring the mpu's groups).

``universal_checkpoint_info`` is passed the way Megatron-DeepSpeed passes it: in ``client_state`` of
``save_checkpoint`` (the engine writes client state at the top level of every model-states file, the same place
the module attribute route of ``tests.deepspeed_3d_producer`` puts it).

File layout DeepSpeed 0.19.8 writes in ``<out>/<tag>/`` (tag ``global_step<N>`` unless ``job.tag``; ``<out>/latest``
names it; ``<out>/zero_to_fp32.py`` and ``zero_to_torch.py`` are copied beside the tag), verified on real output of
tp=2 dp=1 ZeRO-2 frozen, tp=2 dp=2 ZeRO-1, tp=2 dp=2 ZeRO-2, tp=2 dp=2 ZeRO-3 frozen:

* ZeRO 1 and 2: ``mp_rank_XX_model_states.pt`` (XX = tp rank, two digits), written by data-parallel rank 0 of each
  tp rank, and ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (D = data-parallel rank), one per rank. No layer
  files. Unlike a pipeline run, ``module`` is the whole module ``state_dict`` of that tp rank, fp32, with global
  names and *local* shapes (``1.l.weight`` [15, 13] / [14, 13]; ``0.weight`` [19, 13] on both, the padding row
  zero), frozen parameters included. ``param_shapes`` is one OrderedDict per optimizer group ([matrices,
  vectors]) of global name -> this tp rank's shape, frozen parameters absent. Frozen parameters: ZeRO-2 records
  ``frozen_param_shapes`` {``2.n.bias``: [17]} and ``frozen_param_fragments`` (the whole [17] tensor, tp
  replicated); ZeRO-1 records ``None`` for both (the parameter is then only in ``module``). Also
  ``mp_world_size`` (= tp), ``dp_world_size``, ``global_steps``, ``global_samples``,
  ``checkpoint_parallel_dimensions`` {pp_degree: 1, tp_degree: tp}, ``ds_config``, ``ds_version``, the client
  state (``epoch``: 2) and ``universal_checkpoint_info`` at the top level. The optimizer files are the plain
  ZeRO-1/2 ones over this tp rank's parameters: ``single_partition_of_fp32_groups``, ``base_optimizer_state``,
  ``param_slice_mappings`` (global name -> ``fragment_address`` in this DP rank's partition; with dp=2 a parameter
  can straddle D=0 and D=1, e.g. ``2.l.weight`` 180 + 75 elements on tp rank 0), ``partition_count`` [dp, dp],
  ``group_paddings``, ``zero_stage`` (``ZeroStageEnum``), ``clip_grad`` 1.0.
* ZeRO 3: ``zero_pp_rank_D_mp_rank_XX_model_states.pt`` and ``zero_pp_rank_D_mp_rank_XX_optim_states.pt``, one of
  each per rank (every data-parallel rank writes a model-states file). ``module`` holds an empty [0] placeholder
  per parameter; ``param_shapes`` the tp-local shapes as above; ``frozen_param_shapes`` {``2.n.bias``: [17]} and
  ``frozen_param_fragments`` this DP rank's *partition* of it (9 elements on both D=0 and D=1: ceil(17 / 2), the
  last one padded). Optimizer files: ``fp32_flat_groups`` and ``optimizer_state_dict`` (flat ``exp_avg`` etc.),
  ``partition_count`` dp (an int), ``zero_stage`` 3; every parameter is partitioned on its own (tp rank 0's
  matrices group is 624 elements per DP rank: the per-parameter ceilings of 1244 / 2).
* ``ds_to_universal`` (with the run's info, no ``--inject_missing_state``) succeeds for every case, ZeRO-3 x TP
  included (its stage-3 path rebuilds the (tp, dp) grid from the file names): ``<out>/zero/<name>/`` with full
  shapes (``0.weight`` [37, 13] padding stripped, ``vocab_tensor`` True; ``2.l.weight`` [17, 29], ``cat_dim`` 1;
  ``5.weight`` [37, 13]), ``<out>/zero/optimizer_state.pt``, and copies of the model-states files.
  SURPRISES: under ZeRO 1/2 it writes the frozen ``2.n.bias`` too (``fp32.pt`` only, taken from the ``module`` of
  the *first* ``mp_rank`` file: right for a replicated parameter, tp rank 0's slice for a split one), while a
  pipeline run's frozen parameters get no entry. Under ZeRO-3 it writes no ``step.pt`` for any parameter (only
  ``fp32``, ``exp_avg``, ``exp_avg_sq``) and drops the frozen parameter.

ZeRO-3 needs one change to the model: ``RowBlock`` reads its child ``l``'s weight and bias outside ``l.forward``,
so they are registered with ``deepspeed.zero.register_external_parameter`` (else ZeRO-3 never gathers them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.deepspeed_3d_producer import (_TP, CLIENT_STATE, MICRO_BATCH, SEQ, VOCAB, PipeJob, RowBlock,
                                         build_layers, ds_config, loss_fn, param_groups, produce_jobs,
                                         uc_info_for, world_size)

FROZEN = "2.n.bias"  # the parameter ``MpuJob(frozen=True)`` freezes (replicated over tp, 17 elements)


@dataclass(frozen=True)
class MpuJob:
    out: str
    tp: int = 2
    dp: int = 1
    stage: int = 1  # ZeRO stage: 1, 2 or 3
    steps: int = 3
    frozen: bool = False  # freeze ``FROZEN``
    tag: str | None = None


def as_pipe_job(job: MpuJob) -> PipeJob:
    """The untied one-stage pipeline job whose layers, config and ``universal_checkpoint_info`` this run shares."""
    return PipeJob(out=job.out, pp=1, dp=job.dp, tp=job.tp, stage=job.stage, tied=False, steps=job.steps,
                   frozen=job.frozen, tag=job.tag)


class TensorParallelMpu:
    """The Megatron-style ``mpu`` DeepSpeed's engine and ZeRO optimizers query (model parallel = tensor parallel).

    Built by every rank, before ``deepspeed.initialize``: ``new_group`` is collective over the world, so every rank
    creates every group in the same order (tp groups, then dp groups) and keeps its own."""

    def __init__(self, tp: int, dp: int, rank: int) -> None:
        import torch.distributed as dist  # noqa: PLC0415 - the rank process only

        self.tp, self.dp = tp, dp
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_group: Any = None
        self.dp_group: Any = None
        for d in range(dp):
            group = dist.new_group([d * tp + t for t in range(tp)], backend="gloo")
            if d == self.dp_rank:
                self.tp_group = group
        for t in range(tp):
            group = dist.new_group([d * tp + t for d in range(dp)], backend="gloo")
            if t == self.tp_rank:
                self.dp_group = group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> Any:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Any:
        return self.dp_group


def build_model(job: MpuJob, tp_rank: int) -> torch.nn.Sequential:
    """The model of tp rank ``tp_rank``: split parameters marked ``tensor_model_parallel``, ``FROZEN`` frozen."""
    import deepspeed  # noqa: PLC0415

    pipe_job = as_pipe_job(job)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[spec.build() for spec in build_layers(pipe_job, tp_rank)])
    replicated = (uc_info_for(pipe_job) or {}).get("tp_replicated_parameter_patterns", [])
    for name, p in model.named_parameters():
        p.tensor_model_parallel = job.tp > 1 and not any(re.match(pat, name) for pat in replicated)
        if job.frozen and name == FROZEN:
            p.requires_grad_(False)
    if job.stage == 3:
        for m in model.modules():
            if isinstance(m, RowBlock):
                deepspeed.zero.register_external_parameter(m, m.l.weight)
                deepspeed.zero.register_external_parameter(m, m.l.bias)
    return model


def train_and_save(rank: int, world_size: int, job: MpuJob) -> dict[str, Any]:
    """Train ``job.steps`` optimizer steps (``GAS`` micro-batches each) and save; returns this rank's losses."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed  # noqa: PLC0415 - imported in the rank process only

    deepspeed.init_distributed(dist_backend="gloo")
    mpu = TensorParallelMpu(job.tp, job.dp, rank)
    _TP.update(size=job.tp, rank=mpu.tp_rank, group=mpu.tp_group)
    model = build_model(job, mpu.tp_rank)
    optim = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, mpu=mpu, config=ds_config(as_pipe_job(job)))
    g = torch.Generator().manual_seed(1000 + mpu.dp_rank)  # the same stream on every tp rank of one replica
    losses = []
    for _ in range(job.steps * engine.gradient_accumulation_steps()):
        x = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
        loss = loss_fn(engine(x), torch.roll(x, 1, dims=1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    client = {**CLIENT_STATE, "universal_checkpoint_info": uc_info_for(as_pipe_job(job))}
    engine.save_checkpoint(job.out, tag=job.tag, client_state=client)
    return {"losses": losses, "global_steps": engine.global_steps, "tp_rank": mpu.tp_rank, "dp_rank": mpu.dp_rank}


def produce(job: MpuJob, timeout_secs: float = 300) -> dict[str, Any]:
    """Run ``train_and_save`` on ``tp * dp`` ranks; returns ``ranks`` (per-rank results), ``tag`` and ``tag_dir``."""
    from tests.distributed_utils import run_distributed  # noqa: PLC0415

    ranks = run_distributed(train_and_save, world_size(as_pipe_job(job)), job, timeout_secs=timeout_secs)
    tag = job.tag if job.tag is not None else (Path(job.out) / "latest").read_text().strip()
    return {"ranks": ranks, "tag": tag, "tag_dir": Path(job.out) / tag}


#: The checkpoints ``dsmpu_produced`` writes once per test session, about 40 s on two cores (produce and
#: ``ds_to_universal``): tensor parallel 2 under ZeRO-2 with a frozen parameter, ZeRO-1 and ZeRO-2 with data
#: parallel 2, and ZeRO-3 with data parallel 2 and a frozen parameter.
MPU_SESSION_JOBS = {
    "tp2-z2-frozen": MpuJob(out="", tp=2, dp=1, stage=2, frozen=True),
    "tp2dp2-z1": MpuJob(out="", tp=2, dp=2, stage=1),
    "tp2dp2-z2": MpuJob(out="", tp=2, dp=2, stage=2),
    "tp2dp2-z3-frozen": MpuJob(out="", tp=2, dp=2, stage=3, frozen=True),
}


def produce_mpu_session_jobs(base: Path) -> dict[str, dict[str, Any]]:
    """Every ``MPU_SESSION_JOBS`` checkpoint under ``base`` and its ``ds_to_universal`` output."""
    return produce_jobs(base, MPU_SESSION_JOBS, produce, lambda job: False)  # every job records its uc info


@pytest.fixture(scope="session")
def dsmpu_produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``produce_mpu_session_jobs``, once per test session (re-exported by ``tests/conftest.py``)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")
    return produce_mpu_session_jobs(tmp_path_factory.mktemp("dsmpu"))
