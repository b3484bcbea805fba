"""``ckpt.Checkpointer`` on several gloo ranks with an FSDP2 (``fully_shard``) model and AdamW.

Three spawns (starting ranks is the expensive part, so each spawn runs many checks):

1. 2 ranks: snapshots every step for three steps; before each ``save`` every rank gathers the unsharded
   reference (``full_tensor()``) right after ``optimizer.step()``; then a restore from the memory tier. A remote
   tier fails on rank 1 only at step 2: both ranks raise the same ``TierError`` (naming tier, step and rank) at
   their next call, nothing incomplete is committed there, and step 3 commits on it again.
2. 4 ranks: the same run on 4 ranks, and a restore of the 2-rank run at world size 4.
3. 2 ranks (a new spawn): every step of the 2-rank run restored at the same world size, and every step of the
   4-rank run restored at world size 2.

Every restored parameter, buffer, optimizer moment and step counter is compared bit-exactly (``torch.equal`` on
``full_tensor()``) with the reference of the step it names, and each rank's RNG stream with the draws that
followed that step's snapshot on the same rank. Workers collect mismatches instead of asserting, so every rank
stays in step through the collectives and the parent reports every problem at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from ckpt.errors import StorageError
from formats.storage import Storage, register_scheme
from formats.storage.local import LocalStorage
from tests.distributed_utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS = 3
VOCAB, DIM, HIDDEN, OUT = 10, 8, 12, 5  # uneven shards at 4 ranks (10 -> 3/3/3/1, 5 -> 2/2/1/0)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, OUT)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64))  # a buffer, not sharded

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.batches_seen += 1
        h = self.norm(self.emb(idx))
        return self.head(self.down(torch.relu(self.up(h))) + h)


class RankOneFailsStep2(LocalStorage):
    """A local directory where rank 1 cannot write step 2 (registered in every rank: this module is imported
    there to unpickle the worker functions)."""

    def open_writer(self, path: str) -> Any:  # streamed files go through write(), where the failure is injected
        return Storage.open_writer(self, path)

    def write(self, path: str, buffers: Any) -> int:
        import torch.distributed as dist

        if dist.get_rank() == 1 and "step_000000002" in self.root:
            raise StorageError(f"writing {self.full_path(path)}: [Errno 5] Input/output error (injected on rank 1)")
        return super().write(path, buffers)


register_scheme("rank1fails", lambda url, opts: RankOneFailsStep2(url.split("://", 1)[1], opts))


def build(world_size: int, seed: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyNet()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    fully_shard(model.up, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "step": 0}


def train_step(state: dict[str, Any], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    idx = torch.randint(0, VOCAB, (4, 6), generator=g)
    state["model"](idx).pow(2).mean().backward()
    state["optim"].step()
    state["optim"].zero_grad()
    state["sched"].step()


def full_reference(state: dict[str, Any]) -> dict[str, Any]:
    """Unsharded copies of everything the snapshot holds (collective: ``full_tensor``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    model, optim = state["model"], state["optim"]
    out: dict[str, Any] = {f"model/{k}": full(v) for k, v in get_model_state_dict(model).items()}
    for fqn, st in get_optimizer_state_dict(model, optim)["state"].items():
        for name, v in st.items():
            out[f"optim/state/{fqn}/{name}"] = full(v)
    out["lr"] = optim.param_groups[0]["lr"]
    out["sched"] = dict(state["sched"].state_dict())
    out["step"] = state["step"]
    return out


def compare(got: dict[str, Any], want: dict[str, Any], where: str) -> list[str]:
    bad = [f"{where}: {k} only on one side" for k in sorted(set(got) ^ set(want))]
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
                bad.append(f"{where}: {k} differs")
        elif a != b:
            bad.append(f"{where}: {k}: {a!r} != {b!r}")
    return bad


def save_run(rank: int, world_size: int, root: str, failing_remote: str | None = None) -> dict[str, Any]:
    """Train with a snapshot every step; return the references, this rank's post-snapshot RNG draws, problems.

    With ``failing_remote`` (a directory), a remote tier there fails on rank 1 at step 2: every rank must raise
    the same ``TierError`` at its next call, and snapshots must go on.
    """
    import ckpt

    state = build(world_size, seed=0)
    refs: dict[int, dict[str, Any]] = {}
    draws: dict[int, torch.Tensor] = {}
    problems: list[str] = []
    remote = {} if failing_remote is None else {"remote": f"rank1fails://{failing_remote}", "remote_every": 1}
    with ckpt.Checkpointer(root, disk_every=1, keep_last=None, **remote) as cp:
        for step in range(1, STEPS + 1):
            train_step(state, step)
            state["step"] = step
            refs[step] = full_reference(state)
            if failing_remote is not None and step == 3:
                try:
                    cp.save(step, state)
                    problems.append(f"rank {rank}: no TierError after rank 1's remote flush failed")
                except ckpt.TierError as e:
                    if "'remote' step 2" not in str(e) or "rank 1" not in str(e):
                        problems.append(f"rank {rank}: TierError does not name tier, step and rank: {e}")
            h = cp.save(step, state)
            draws[step] = torch.rand(3)  # what this rank's torch RNG gives right after the snapshot
            if step == 1:
                first_sources = dict(cp.plans.sources.by_key)
            if failing_remote is not None and step == 2:
                h.wait()  # so that the failure is known on every rank before the next call
                if not h.errors:
                    problems.append(f"rank {rank}: the handle of step 2 carries no error")
        cp.wait()
        if cp.steps("disk") != list(range(1, STEPS + 1)):
            problems.append(f"disk steps {cp.steps('disk')}")
        if failing_remote is not None and cp.steps("remote") != [1, 3]:
            problems.append(f"remote steps {cp.steps('remote')}, expected [1, 3]")
        if not cp.metrics[-1].lazy_bytes > 0:
            problems.append(f"rank {rank}: nothing was copied lazily under FSDP2")
        # The sharded parameters and optimizer state are the same memory at every step: save() reused their
        # copy sources (layouts, local views, lazy flags) instead of rebuilding them (the RNG is new every save).
        rebuilt = [k for k, s in first_sources.items() if not k.startswith("rng/") and cp.plans.sources.by_key[k] is not s]
        if rebuilt:
            problems.append(f"rank {rank}: copy sources rebuilt under FSDP2 for {rebuilt[:3]}")
        # The memory tier, same process: training moves on, restore() brings back step 3 from host memory.
        if cp.steps("memory") != [STEPS]:
            problems.append(f"memory steps {cp.steps('memory')}")
        train_step(state, STEPS + 1)
        if cp.restore(state) != STEPS:
            problems.append("restore from memory did not return the latest step")
        problems += compare(full_reference(state), refs[STEPS], f"ws{world_size} memory restore, rank {rank}")
        if not torch.equal(torch.rand(3), draws[STEPS]):
            problems.append(f"rank {rank}: RNG not restored from memory")
    return {"refs": refs if rank == 0 else None, "draws": draws, "problems": problems}


def restore_runs(rank: int, world_size: int, runs: list[tuple[str, int, dict[int, Any], list[dict[int, Any]]]]) -> list[str]:
    """Restore every step of every run (root, saved world size, refs, per-rank draws) into a fresh model."""
    import ckpt

    problems: list[str] = []
    for root, saved_ws, refs, draws in runs:
        state = build(world_size, seed=1234)  # a different initialisation: a no-op restore would show
        train_step(state, 99)  # optimizer state exists and differs
        with ckpt.Checkpointer(root, disk_every=1) as cp:
            steps = cp.steps()
            if steps != sorted(refs):
                problems.append(f"{root}: steps {steps}, expected {sorted(refs)}")
            for step in reversed(steps):
                where = f"ws{saved_ws}->ws{world_size} step {step} rank {rank}"
                if cp.restore(state, step=step) != step:
                    problems.append(f"{where}: restore returned another step")
                problems += compare(full_reference(state), refs[step], where)
                # Each rank takes its own RNG stream; a rank the saving run did not have keeps its own.
                if rank < saved_ws and not torch.equal(torch.rand(3), draws[rank][step]):
                    problems.append(f"{where}: RNG stream not restored")
    return problems


def test_fsdp2_snapshots_restore_at_same_and_other_world_sizes(tmp_path: Path) -> None:
    root2, root4 = str(tmp_path / "ws2"), str(tmp_path / "ws4")

    out2 = run_distributed(save_run, 2, root2, str(tmp_path / "remote2"), timeout_secs=180)
    problems = [p for r in out2 for p in r["problems"]]
    refs2, draws2 = out2[0]["refs"], [r["draws"] for r in out2]
    assert set(refs2) == set(range(1, STEPS + 1))
    assert refs2[1]["optim/state/up.weight/exp_avg"].shape == (HIDDEN, DIM), "references are unsharded"
    assert any(not torch.equal(refs2[1][k], refs2[STEPS][k]) for k in refs2[1] if k.startswith("model/up")), \
        "training changed nothing between snapshots"
    for step in range(1, STEPS + 1):
        assert refs2[step]["model/batches_seen"].item() == step
    assert sorted(p.name for p in Path(root2, "metrics").iterdir()) == ["rank_00000.jsonl", "rank_00001.jsonl"]

    out4 = run_distributed(save_and_restore, 4, root4, [(root2, 2, refs2, draws2)], timeout_secs=240)
    problems += [p for r in out4 for p in r["problems"]]
    refs4, draws4 = out4[0]["refs"], [r["draws"] for r in out4]
    # The same training on 4 ranks: the references are the same computation, sharded differently.
    assert set(refs4) == set(refs2)

    out = run_distributed(restore_runs, 2, [(root2, 2, refs2, draws2), (root4, 4, refs4, draws4)],
                          timeout_secs=180)
    problems += [p for r in out for p in r]
    assert sorted(p.name for p in Path(root4, "metrics").iterdir()) == [f"rank_{r:05d}.jsonl" for r in range(4)]
    assert not problems, "\n".join(problems)


def save_and_restore(rank: int, world_size: int, root: str,
                     runs: list[tuple[str, int, dict[int, Any], list[dict[int, Any]]]]) -> dict[str, Any]:
    """Spawn 2: a snapshot run at this world size, then restores of earlier runs (saved at other world sizes)."""
    out = save_run(rank, world_size, root)
    out["problems"] += restore_runs(rank, world_size, runs)
    return out
