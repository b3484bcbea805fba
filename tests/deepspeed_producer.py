"""Real DeepSpeed ZeRO checkpoints for tests and benchmarks, written by DeepSpeed itself on CPU (gloo).

Who calls it: ``run_distributed(train_and_save, world_size, DsJob(...))`` from tests (each rank is a spawned
process already in a gloo group, which ``deepspeed.init_distributed`` adopts), and ``benchmarks.convert``.

The model is small and deterministic: an MLP with two parameter groups (weight decay on one, none on the other),
an optional frozen parameter (``requires_grad=False``: no optimizer state, kept by DeepSpeed as a frozen
fragment or in the module state), and a torch ``AdamW`` client optimizer that DeepSpeed wraps in its ZeRO
optimizer (``zero_allow_untested_optimizer``), since the fused CPU Adam needs compiled ops (installed with
``DS_BUILD_OPS=0`` there are none). ``bf16=True`` trains in bf16 with fp32 master weights (DeepSpeed writes
``bf16_zero_pp_rank_*`` optimizer files).

``model="odd"`` trains ``OddNet`` instead, whose sizes no data-parallel degree divides (an embedding of an odd
vocabulary, a prime hidden width, a head with 7 outputs, a frozen layer, a norm): DeepSpeed pads its flat groups
to its alignment there, which is what the padding paths of the importers are tested on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

#: Client state saved with every checkpoint (DeepSpeed stores it at the top level of the model-states file).
CLIENT_STATE = {"epoch": 3, "note": "client", "samples": [1, 2, 3]}


@dataclass(frozen=True)
class DsJob:
    out: str
    stage: int
    bf16: bool = False
    steps: int = 3
    tag: str | None = None  # None: DeepSpeed's default ``global_step<N>``
    frozen: bool = True
    sizes: tuple[int, ...] = (16, 48, 40, 8)
    lr_scheduler: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    #: Load this checkpoint directory first (``load_universal`` if ``universal``), then train ``steps`` more.
    load_from: str | None = None
    universal: bool = False
    #: Give the module a ``universal_checkpoint_info`` (DeepSpeed then saves it, and ``ds_to_universal`` runs
    #: without ``--inject_missing_state``).
    uc_info: bool = False
    #: ``"mlp"`` (``build_model(sizes, frozen)``) or ``"odd"`` (``OddNet``: no size divides by any DP degree).
    model: str = "mlp"


def build_model(sizes: tuple[int, ...], frozen: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.GELU())
    model = torch.nn.Sequential(*layers)
    if frozen:
        model[0].bias.requires_grad_(False)
    return model


class OddNet(torch.nn.Module):
    """A token model whose sizes no data-parallel degree divides: vocabulary 37, width 13, hidden 29, a head of 7
    outputs, a frozen 13x13 layer (weight and bias), a LayerNorm without bias. Groups (``odd_param_groups``):
    matrices 1,061 elements (decay), biases and norm 65 (no decay); the frozen layer is in neither."""

    VOCAB, WIDTH, HIDDEN, OUT = 37, 13, 29, 7

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(self.VOCAB, self.WIDTH)
        self.frozen = torch.nn.Linear(self.WIDTH, self.WIDTH).requires_grad_(False)
        self.fc = torch.nn.Linear(self.WIDTH, self.HIDDEN)
        self.norm = torch.nn.LayerNorm(self.HIDDEN, bias=False)
        self.head = torch.nn.Linear(self.HIDDEN, self.OUT)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.frozen(self.embed(tokens))
        return self.head(self.norm(torch.nn.functional.gelu(self.fc(x))))


def odd_param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """``OddNet``'s two groups: matrices with weight decay; biases and the norm without."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def make_model(job: DsJob) -> torch.nn.Module:
    """The model ``job`` trains (``job.model``), built deterministically."""
    if job.model == "odd":
        return OddNet()
    if job.model != "mlp":
        raise ValueError(f"DsJob.model is {job.model!r}; expected 'mlp' or 'odd'")
    return build_model(job.sizes, job.frozen)


def make_param_groups(job: DsJob, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The two parameter groups of ``job``'s model."""
    return odd_param_groups(model) if job.model == "odd" else param_groups(model)


def make_batch(job: DsJob, step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch of step ``step`` for ``job``'s model: features, or token ids for ``OddNet``."""
    if job.model == "odd":
        g = torch.Generator().manual_seed(1000 * step + rank)
        return torch.randint(0, OddNet.VOCAB, (2, 5), generator=g)
    return batch(step, rank, job.sizes[0], job.bf16)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups: weight matrices with weight decay, biases without (frozen parameters in neither)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in trainable if not n.endswith("weight")], "weight_decay": 0.0}]


def ds_config(job: DsJob) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": job.stage}, "bf16": {"enabled": job.bf16},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "checkpoint": {"load_universal": job.universal},
    }
    cfg.update(job.extra_config)
    return cfg


def batch(step: int, rank: int, width: int, bf16: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, width, generator=g)
    return x.bfloat16() if bf16 else x


def train_and_save(rank: int, world_size: int, job: DsJob) -> dict[str, Any]:
    """Train ``job.steps`` steps under ZeRO ``job.stage`` and save; returns this rank's losses."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed  # noqa: PLC0415 - imported in the rank process only

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model(job)
    if job.uc_info:
        model.universal_checkpoint_info = {"universal_checkpoint_version": 0.2}
    optim = torch.optim.AdamW(make_param_groups(job, model), lr=1e-2, betas=(0.9, 0.95))
    sched = None
    if job.lr_scheduler:
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched, config=ds_config(job))
    start = 0
    if job.load_from is not None:
        path, _ = engine.load_checkpoint(job.load_from, tag=job.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {job.load_from}")
        start = engine.global_steps
    losses = train_steps(engine, job, rank, start)
    engine.save_checkpoint(job.out, tag=job.tag, client_state=dict(CLIENT_STATE))
    return {"losses": losses, "global_steps": engine.global_steps}


def train_steps(engine: Any, job: DsJob, rank: int, start: int) -> list[float]:
    """``job.steps`` DeepSpeed steps on this rank's batches ``start``, ``start + 1``, ...; returns the losses."""
    losses = []
    for i in range(start, start + job.steps):
        loss = engine(make_batch(job, i, rank)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses
