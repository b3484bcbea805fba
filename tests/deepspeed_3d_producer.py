"""Real DeepSpeed pipeline- and tensor-parallel checkpoints, written by DeepSpeed itself on CPU (gloo).

Who calls it: tests, through ``produce(PipeJob(...))`` (which runs ``train_and_save`` on ``world_size(job)`` spawned
gloo ranks with ``tests.distributed_utils.run_distributed``), and ``ds_to_universal`` to get DeepSpeed's own
universal checkpoint of the result as an oracle.

The model is a ``PipelineModule`` of six layers, built deterministically (every layer draws its *full* tensors from
its own seed, then keeps its tensor-parallel slice, so the merged model is the same for every degree):

    0  embedding: ``VocabEmbedding`` (vocab 37, width 13; vocabulary-parallel rows when tp > 1, padded to a
       multiple of tp); with ``tied`` it is ``TiedLayerSpec("embed", ...)``
    1  ``ColBlock`` 13->29: column-parallel ``l`` (weight [29/tp, 13], bias [29/tp]), gelu, output gathered,
       ``n`` = LayerNorm(29) replicated
    2  ``RowBlock`` 29->17: row-parallel ``l`` (weight [17, 29/tp], bias [17] replicated, added after the
       all-reduce), gelu, ``n`` = LayerNorm(17) replicated
    3  ``ColBlock`` 17->19
    4  ``RowBlock`` 19->13
    5  head: with ``tied`` the same ``TiedLayerSpec("embed", ..., forward_fn=head_forward)`` (logits = x @ E^T,
       vocab-parallel, gathered, padding cut); else ``ColHead`` 13->37 (column-parallel over the vocabulary)

Splits are *uneven* where the size does not divide (29 over tp=2: 15 + 14; the first ``n % tp`` ranks hold one
more); ``ds_to_universal`` concatenates the slices, so uneven splits merge fine. Collectives are autograd-correct
(``_CopyToTP``: identity / all-reduce grad; ``_ReduceFromTP``: all-reduce / identity; ``_GatherFromTP``: place own
slice in zeros + all-reduce / take own slice of the grad; ``_ScatterToTP``: the reverse), on the PipelineModule
grid's slice group (``model._grid.get_slice_parallel_group()``, built from ``topo.get_axis_comm_lists("model")``).

File layout DeepSpeed 0.19.8 writes in ``<out>/<tag>/`` (tag ``global_step<N>`` unless ``job.tag``; ``<out>/latest``
names it), verified on real output of pp=2 tied, pp=2 untied frozen, pp=2 dp=2, tp=2, tp=2 frozen, pp=2 x tp=2:

* Layer files, one per layer index XX (global, 00..05) and tp rank, written by data-parallel rank 0 of each stage:
  ``layer_XX-model_states.pt`` when tp == 1 (this module then uses the plain ``PipeDataParallelTopology``), and
  ``layer_XX-model_YY-model_states.pt`` when tp > 1 (YY = tp rank, two digits: ``PipelineModule.ckpt_layer_path``
  appends the topology's ``get_rank_repr``, which omits the ``pipe`` and ``data`` axes; a
  ``PipeModelDataParallelTopology`` with num_mp=1 would also write ``-model_00``). Each holds that layer module's
  ``state_dict`` with *local* keys (``weight``; ``l.weight``, ``l.bias``, ``n.weight``, ``n.bias``), fp32, this tp
  rank's slice: e.g. tp=2 ``layer_01-model_00`` ``l.weight`` [15, 13], ``-model_01`` [14, 13]; ``layer_02`` (row
  parallel) ``l.weight`` [17, 15] / [17, 14] and ``l.bias`` [17] on both; the embedding [19, 13] on both ranks
  (vocab padded 37 -> 38; the padding row is all zeros and stays zero). Frozen parameters are in these files.
  SURPRISE: with ``tied`` no ``layer_05`` file is written at all (for any pp or tp): a tied layer is saved only
  under the index of its first occurrence (``layer_00``, by stage 0), even though stage ``pp-1`` owns a copy.
* ``mp_rank_XX_model_states.pt``, XX = pp_stage * tp + tp_rank (the grid's model-parallel rank spans pipe x model),
  written by data-parallel rank 0: ``module`` is ``None`` (weights live in the layer files); ``param_shapes`` is a
  list (one OrderedDict per optimizer param group, here [matrices, vectors]) of *global module names* -> this
  rank's local ``torch.Size``, e.g. ``"tied_modules.embed.weight"`` [19, 13], ``"1.l.weight"`` [15, 13],
  ``"3.n.bias"`` [19]; untied the embedding is ``"0.weight"`` and the head ``"5.weight"``/``"5.bias"``. Frozen
  parameters are absent from ``param_shapes``, and ``frozen_param_shapes``/``frozen_param_fragments`` are ``None``
  (ZeRO 1). Also ``mp_world_size`` (= pp * tp), ``dp_world_size``, ``global_steps``, ``global_samples``,
  ``ds_config``, ``ds_version``, ``buffer_names``, ``shared_params``, ``checkpoint_parallel_dimensions``, the client
  state (``epoch``: 2) at the top level, and ``universal_checkpoint_info`` iff the module carries one.
* ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (D = data-parallel rank, XX as above; one per rank):
  ``optimizer_state_dict`` with ``single_partition_of_fp32_groups``, ``base_optimizer_state``,
  ``param_slice_mappings`` (per group: global name -> ``fragment_address(numel, start)`` inside this DP rank's flat
  partition; with dp=2 a parameter can be split across D=0 and D=1), ``partition_count``, ``group_paddings``,
  ``param_alignment_paddings``, ``zero_stage``, ``ds_version``, loss-scaler fields.
* Tied weights: ``tied_modules.embed.weight`` is in the ``param_shapes``/``param_slice_mappings``/optimizer state of
  *both* the first and the last stage (pp=2 tp=2: mp_rank 00, 01 and 02, 03), same name, same values (DeepSpeed
  all-reduces its gradient over the tie group). ``ds_to_universal`` keeps stage 0's copy for names matching
  ``pipeline_replicated_parameter_patterns``; with ``--inject_missing_state`` and no info (pp=2 tied) it also
  succeeds and writes one ``tied_modules.embed.weight`` [37, 13].
* ``ds_to_universal`` output: ``<out>/zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, a file
  ``<out>/zero/optimizer_state.pt`` beside those folders, and copies of the ``mp_rank_*`` files (no layer files);
  full shapes, e.g. ``1.l.weight`` [29, 13] (``cat_dim`` 0), ``2.l.weight`` [17, 29] (``cat_dim`` 1),
  ``tied_modules.embed.weight`` [37, 13] (padding stripped, ``vocab_tensor`` True). Frozen parameters (ZeRO 1)
  get *no* entry there: they exist only in the layer files.
* ZeRO 2 (and 3) cannot be used: ``PipelineEngine`` asserts "ZeRO-2 and ZeRO-3 are incompatible with pipeline
  parallelism" (``PipeJob(stage=2)`` fails on every rank). ``stage`` is kept so callers can test that refusal.

``universal_checkpoint_info`` is set as ``model.universal_checkpoint_info`` before ``deepspeed.initialize``; the
engine saves ``getattr(module, "universal_checkpoint_info")`` into every ``mp_rank_*`` file. See ``uc_info_for``:
tp > 1 always carries it (without the patterns ``ds_to_universal`` would concatenate every slice along dim 0,
replicated norms included); tp == 1 only with ``uc_info``. Patterns (names are the global module names above):
``tp_replicated_parameter_patterns`` ``^\\d+\\.n\\.(weight|bias)$`` and ``^(2|4)\\.l\\.bias$``;
``parameter_with_row_parallelism_patterns`` ``^(2|4)\\.l\\.weight$``; ``vocabulary_parameter_patterns`` the
embedding (``^tied_modules\\.embed\\.weight$``, untied ``^0\\.weight$``) with ``original_vocab_size`` 37 and
``padded_vocab_size``; ``pipeline_replicated_parameter_patterns`` ``^tied_modules\\.embed\\.weight$`` when tied.
The untied head ``5.weight``/``5.bias`` is column-parallel over the unpadded vocabulary (19 + 18 rows), so it
needs no pattern (default: concatenate along dim 0).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, WIDTH = 37, 13
#: Layer widths of the four blocks: 13 -> 29 -> 17 -> 19 -> 13 (no degree divides 29, 17, 19, 13, 37).
WIDTHS = (WIDTH, 29, 17, 19, WIDTH)
CLIENT_STATE = {"epoch": 2}
MICRO_BATCH, GAS, SEQ = 2, 2, 5


@dataclass(frozen=True)
class PipeJob:
    out: str
    pp: int
    dp: int = 1
    tp: int = 1
    stage: int = 1  # ZeRO stage; DeepSpeed's PipelineEngine refuses 2 and 3
    tied: bool = True
    steps: int = 3
    uc_info: bool = False
    frozen: bool = False  # freeze block 2's LayerNorm bias ("2.n.bias")
    tag: str | None = None


def world_size(job: PipeJob) -> int:
    return job.pp * job.dp * job.tp


# ----- tensor-parallel plumbing (one process per rank: a module global is per rank) -----

_TP: dict[str, Any] = {"group": None, "size": 1, "rank": 0}


def split_sizes(n: int, tp: int) -> list[int]:
    """How ``n`` rows/columns are split over ``tp`` ranks: the first ``n % tp`` ranks hold one more."""
    return [n // tp + (1 if r < n % tp else 0) for r in range(tp)]


def split_range(n: int, tp: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(n, tp)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def padded_vocab(tp: int) -> int:
    return -(-VOCAB // tp) * tp


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP["size"] == 1:
        return x
    import torch.distributed as dist  # noqa: PLC0415

    x = x.contiguous().clone()
    dist.all_reduce(x, group=_TP["group"])
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return _all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


def _place(x: torch.Tensor, full: int) -> torch.Tensor:
    """``x`` (this rank's slice of the last dim) placed in zeros of width ``full``."""
    start, end = split_range(full, _TP["size"], _TP["rank"])
    out = x.new_zeros(*x.shape[:-1], full)
    out[..., start:end] = x
    return out


class _GatherFromTP(torch.autograd.Function):
    """Forward: the full last dim (uneven slices: place own slice in zeros, all-reduce). Backward: own slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, full: int) -> torch.Tensor:
        ctx.full = full
        return _all_reduce(_place(x, full))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        start, end = split_range(ctx.full, _TP["size"], _TP["rank"])
        return g[..., start:end].contiguous(), None


class _ScatterToTP(torch.autograd.Function):
    """Forward: own slice of the last dim. Backward: the full gradient (place + all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.full = x.shape[-1]
        start, end = split_range(ctx.full, _TP["size"], _TP["rank"])
        return x[..., start:end].contiguous()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return _all_reduce(_place(g, ctx.full))


def _full_linear(seed: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bound = fan_in ** -0.5
    w = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
    return w, b


def _norm(seed: int, width: int) -> torch.nn.LayerNorm:
    g = torch.Generator().manual_seed(seed + 500)
    n = torch.nn.LayerNorm(width)
    with torch.no_grad():
        n.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
        n.bias.copy_(0.1 * torch.randn(width, generator=g))
    return n


# ----- layers -----

class VocabEmbedding(torch.nn.Module):
    """Embedding whose rows (vocab padded to a multiple of tp) are split evenly over the tp ranks."""

    def __init__(self, vocab: int, width: int, tp: int, tp_rank: int, seed: int = 100) -> None:
        super().__init__()
        padded = padded_vocab(tp)
        g = torch.Generator().manual_seed(seed)
        full = torch.zeros(padded, width)
        full[:vocab] = torch.randn(vocab, width, generator=g)
        per = padded // tp
        self.start, self.end, self.padded = tp_rank * per, (tp_rank + 1) * per, padded
        self.weight = torch.nn.Parameter(full[self.start:self.end].clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens >= self.start) & (tokens < self.end)
        local = torch.where(mask, tokens - self.start, torch.zeros_like(tokens))
        out = torch.nn.functional.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return _ReduceFromTP.apply(out)


def head_forward(embed: VocabEmbedding, x: torch.Tensor) -> torch.Tensor:
    """Tied head: logits over this rank's vocabulary rows, gathered, padding cut."""
    local = torch.nn.functional.linear(_CopyToTP.apply(x), embed.weight)
    return _GatherFromTP.apply(local, embed.padded)[..., :VOCAB]


class ColBlock(torch.nn.Module):
    """Column-parallel Linear (rows of weight and bias split), gelu, gather, replicated LayerNorm."""

    def __init__(self, fan_in: int, fan_out: int, tp: int, tp_rank: int, seed: int) -> None:
        super().__init__()
        w, b = _full_linear(seed, fan_in, fan_out)
        s, e = split_range(fan_out, tp, tp_rank)
        self.fan_out = fan_out
        self.l = torch.nn.Linear(fan_in, e - s)
        with torch.no_grad():
            self.l.weight.copy_(w[s:e])
            self.l.bias.copy_(b[s:e])
        self.n = _norm(seed, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.l(_CopyToTP.apply(x)))
        return self.n(_GatherFromTP.apply(y, self.fan_out))


class RowBlock(torch.nn.Module):
    """Row-parallel Linear (columns of weight split, bias replicated after the all-reduce), gelu, LayerNorm."""

    def __init__(self, fan_in: int, fan_out: int, tp: int, tp_rank: int, seed: int) -> None:
        super().__init__()
        w, b = _full_linear(seed, fan_in, fan_out)
        s, e = split_range(fan_in, tp, tp_rank)
        self.l = torch.nn.Linear(e - s, fan_out)
        with torch.no_grad():
            self.l.weight.copy_(w[:, s:e])
            self.l.bias.copy_(b)
        self.n = _norm(seed, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTP.apply(torch.nn.functional.linear(_ScatterToTP.apply(x), self.l.weight))
        return self.n(torch.nn.functional.gelu(y + self.l.bias))


class ColHead(torch.nn.Module):
    """Untied head: column-parallel over the (unpadded, unevenly split) vocabulary, gathered."""

    def __init__(self, fan_in: int, fan_out: int, tp: int, tp_rank: int, seed: int) -> None:
        super().__init__()
        w, b = _full_linear(seed, fan_in, fan_out)
        s, e = split_range(fan_out, tp, tp_rank)
        self.fan_out = fan_out
        self.weight = torch.nn.Parameter(w[s:e].clone())
        self.bias = torch.nn.Parameter(b[s:e].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(_CopyToTP.apply(x), self.weight, self.bias)
        return _GatherFromTP.apply(y, self.fan_out)


def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))


# ----- universal_checkpoint_info -----

#: Row-parallel blocks are layers 2 and 4; the other linears (1, 3, head 5) are column-parallel.
TP_REPLICATED_PATTERNS = [r"^\d+\.n\.(weight|bias)$", r"^(2|4)\.l\.bias$"]
ROW_PARALLEL_PATTERNS = [r"^(2|4)\.l\.weight$"]
TIED_PATTERNS = [r"^tied_modules\.embed\.weight$"]


def uc_info_for(job: PipeJob) -> dict[str, Any] | None:
    """The ``universal_checkpoint_info`` the module carries (``None``: none, ``ds_to_universal`` needs
    ``--inject_missing_state``). tp > 1 always carries the full info (ds_to_universal cannot merge TP slices
    without it)."""
    if job.tp == 1 and not job.uc_info:
        return None
    info: dict[str, Any] = {"universal_checkpoint_version": 0.2}
    if job.tied:
        info["pipeline_replicated_parameter_patterns"] = list(TIED_PATTERNS)
    if job.tp > 1:
        info["tp_replicated_parameter_patterns"] = list(TP_REPLICATED_PATTERNS)
        info["parameter_with_row_parallelism_patterns"] = list(ROW_PARALLEL_PATTERNS)
        info["vocabulary_parameter_patterns"] = list(TIED_PATTERNS) if job.tied else [r"^0\.weight$"]
        info["original_vocab_size"] = VOCAB
        info["padded_vocab_size"] = padded_vocab(job.tp)
    return info


# ----- the rank function -----

def build_layers(job: PipeJob, tp_rank: int) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # noqa: PLC0415

    tp = job.tp
    if job.tied:
        first: Any = TiedLayerSpec("embed", VocabEmbedding, VOCAB, WIDTH, tp, tp_rank)
        last: Any = TiedLayerSpec("embed", VocabEmbedding, VOCAB, WIDTH, tp, tp_rank, forward_fn=head_forward)
    else:
        first = LayerSpec(VocabEmbedding, VOCAB, WIDTH, tp, tp_rank)
        last = LayerSpec(ColHead, WIDTH, VOCAB, tp, tp_rank, 600)
    blocks = [LayerSpec(ColBlock if i % 2 == 0 else RowBlock, WIDTHS[i], WIDTHS[i + 1], tp, tp_rank, 200 + i)
              for i in range(4)]
    return [first, *blocks, last]


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def ds_config(job: PipeJob) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GAS,
            "zero_optimization": {"stage": job.stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def train_and_save(rank: int, world_size: int, job: PipeJob) -> dict[str, Any]:
    """Train ``job.steps`` pipeline steps and save; returns this rank's losses and global steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed  # noqa: PLC0415 - imported in the rank process only
    from deepspeed.pipe import PipelineModule  # noqa: PLC0415
    from deepspeed.runtime.pipe.topology import (PipeDataParallelTopology,  # noqa: PLC0415
                                                 PipeModelDataParallelTopology)

    deepspeed.init_distributed(dist_backend="gloo")
    # tp == 1: the plain pipe x data topology (what users without TP get; layer files carry no "-model_YY")
    topo: Any = (PipeModelDataParallelTopology(num_pp=job.pp, num_mp=job.tp, num_dp=job.dp) if job.tp > 1
                 else PipeDataParallelTopology(num_pp=job.pp, num_dp=job.dp))
    coord = topo.get_coord(rank)
    tp_rank = getattr(coord, "model", 0)
    _TP.update(size=job.tp, rank=tp_rank, group=None)
    torch.manual_seed(0)
    model = PipelineModule(layers=build_layers(job, tp_rank), topology=topo, loss_fn=loss_fn,
                           partition_method="uniform")
    if job.tp > 1:
        _TP["group"] = model._grid.get_slice_parallel_group()
    if job.frozen:
        for name, p in model.named_parameters():
            if name == "2.n.bias":
                p.requires_grad_(False)
    info = uc_info_for(job)
    if info is not None:
        model.universal_checkpoint_info = info
    optim = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config(job))

    def batches(seed: int) -> Any:  # same stream on every stage and tp rank of one data-parallel replica
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
            yield x, torch.roll(x, 1, dims=1)

    data = batches(1000 + coord.data)
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(job.steps)]
    engine.save_checkpoint(job.out, tag=job.tag, client_state=dict(CLIENT_STATE))
    return {"losses": losses, "global_steps": engine.global_steps, "stage": coord.pipe, "tp_rank": tp_rank,
            "dp_rank": coord.data}


def produce(job: PipeJob, timeout_secs: float = 300) -> dict[str, Any]:
    """Run ``train_and_save`` on ``world_size(job)`` ranks; returns ``ranks`` (per-rank results) and ``tag_dir``."""
    from tests.distributed_utils import run_distributed  # noqa: PLC0415

    ranks = run_distributed(train_and_save, world_size(job), job, timeout_secs=timeout_secs)
    tag = job.tag if job.tag is not None else (Path(job.out) / "latest").read_text().strip()
    return {"ranks": ranks, "tag": tag, "tag_dir": Path(job.out) / tag}


def child_env() -> dict[str, str]:
    """The environment for a child process (ds_to_universal, the CLI): this repo importable, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def ds_to_universal(tag_dir: str | Path, out_dir: str | Path, inject: bool) -> None:
    """DeepSpeed's converter on ``tag_dir`` into ``out_dir`` (a subprocess); asserts it succeeded."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out_dir), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if inject:
        cmd.append("--inject_missing_state")
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, f"ds_to_universal failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


#: The checkpoints ``ds3d_produced`` writes once per test session (``tests/conftest.py``), about 45 s on two cores:
#: pipeline 2 and 3 stages, tied and untied, data parallel 1 and 2, a frozen parameter, tensor parallel 2 with and
#: without pipeline, with and without ``universal_checkpoint_info``.
SESSION_JOBS = {
    "pp2": PipeJob(out="", pp=2),
    "pp2dp2-frozen": PipeJob(out="", pp=2, dp=2, frozen=True, uc_info=True),
    "pp3-untied": PipeJob(out="", pp=3, tied=False),
    "pp2tp2": PipeJob(out="", pp=2, tp=2, uc_info=True),
    "tp2-untied-frozen": PipeJob(out="", pp=1, tp=2, tied=False, frozen=True),
}


def produce_jobs(base: Path, jobs: dict[str, Any], produce_fn: Callable[..., dict[str, Any]],
                 inject: Callable[[Any], bool]) -> dict[str, dict[str, Any]]:
    """Produce every job of ``jobs`` (dataclass templates, ``out`` set here) under ``base`` with ``produce_fn``, and
    its ``ds_to_universal`` output (``uni``; ``--inject_missing_state`` where ``inject(job)``)."""
    out = {}
    for name, template in jobs.items():
        job = dataclasses.replace(template, out=str(base / name))
        r = produce_fn(job, timeout_secs=300)
        uni = base / f"{name}-universal" / r["tag"]
        ds_to_universal(r["tag_dir"], uni, inject=inject(job))
        out[name] = {**r, "job": job, "uni": uni}
    return out


def produce_session_jobs(base: Path) -> dict[str, dict[str, Any]]:
    """Every ``SESSION_JOBS`` checkpoint under ``base`` and its ``ds_to_universal`` output."""
    return produce_jobs(base, SESSION_JOBS, produce, lambda job: uc_info_for(job) is None)


@pytest.fixture(scope="session")
def ds3d_produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``produce_session_jobs``, once per test session (re-exported by ``tests/conftest.py``)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (make venv installs it with DS_BUILD_OPS=0)")
    return produce_session_jobs(tmp_path_factory.mktemp("ds3d"))
