"""``make demo``: train a small model sharded over 2 gloo ranks with FSDP2, save, and resume it unsharded.

Runs on embedded defaults with nothing to start by hand: local directory storage under ``./demo_run`` (or
``--dir``). It prints what it did at every stage and exits non-zero if anything does not match bit for bit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 5


class TinyGPTBlock(nn.Module):
    """Embedding -> attention-shaped MLP stack -> head; odd sizes so shards are uneven."""

    def __init__(self, vocab: int = 101, dim: int = 48, hidden: int = 130) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return self.head(h)


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 101, (4, 16), generator=g)


def _train_step(model: nn.Module, optim: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    optim.step()
    optim.zero_grad()
    return float(loss.detach())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sharded_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import ckpt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyGPTBlock()
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.up, model.down):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(STEPS):
            loss = _train_step(model, optim, _batch(step, rank))
            if rank == 0:
                print(f"  [world {world}] step {step} loss {loss:.4f}")
        t0 = time.perf_counter()
        res = ckpt.save({"model": model, "optim": optim, "step": STEPS}, os.path.join(run_dir, "step_5"))
        if rank == 0:
            print(f"  [world {world}] saved {res.total_bytes} bytes in {time.perf_counter() - t0:.3f}s "
                  f"(rank 0 wrote {res.bytes_written_this_rank}) -> {res.path}")
        # The reference: full (unsharded) tensors, for the bit-exact comparison after resuming elsewhere.
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        for name, param in model.named_parameters():
            for moment in ("exp_avg", "exp_avg_sq"):
                full[f"{name}/{moment}"] = optim.state[param][moment].full_tensor()
        if rank == 0:
            torch.save(full, os.path.join(run_dir, "reference_params.pt"))
        # Leave together: a rank that tore its gloo group down while the other still wrote its reference aborted
        # in gloo's teardown ("terminate called without an active exception", once in a clean-clone CI run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default="demo_run", help="where checkpoints go (default ./demo_run, recreated)")
    args = p.parse_args(argv)
    import ckpt
    from ckpt.cli import main as cli_main

    run_dir = os.path.abspath(args.dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    world = 2
    print(f"1. training {STEPS} steps with FSDP2 over {world} gloo ranks (CPU), then ckpt.save ...")
    mp.start_processes(_sharded_worker, args=(world, _free_port(), run_dir), nprocs=world, start_method="spawn")

    print("\n2. ckpt inspect (the checkpoint is parallelism-agnostic: logical tensors + chunks):")
    cli_main(["inspect", os.path.join(run_dir, "step_5")])

    print("\n3. resuming in ONE process, unsharded (world size 2 -> 1: load-time resharding) ...")
    torch.manual_seed(123)  # a different init, so a no-op load would be caught
    model = TinyGPTBlock()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": optim, "step": 0}
    t0 = time.perf_counter()
    ckpt.load(state, os.path.join(run_dir, "step_5"))
    print(f"  loaded in {time.perf_counter() - t0:.3f}s; step = {state['step']}")
    ref_path = os.path.join(run_dir, "reference_params.pt")
    ref = torch.load(ref_path, weights_only=True)
    now = dict(model.state_dict())
    for name, param in model.named_parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            now[f"{name}/{moment}"] = optim.state[param][moment]
    bad = [k for k, v in ref.items() if not torch.equal(now[k], v)]
    print(f"  {len(ref) - len(bad)}/{len(ref)} parameters and Adam moments bit-identical to the sharded run's")
    if bad or state["step"] != STEPS:
        print(f"  MISMATCH: {bad}", file=sys.stderr)
        return 1
    for step in range(STEPS, STEPS + 2):
        print(f"  [world 1] step {step} loss {_train_step(model, optim, _batch(step, 0)):.4f}")

    print("\n4. ckpt verify (re-reads every chunk and checks coverage):")
    rc = cli_main(["verify", os.path.join(run_dir, "step_5")])
    if rc == 0:
        from ckpt.demo_snapshots import run as run_snapshots

        print()
        rc = run_snapshots(run_dir)
    print("\ndemo finished OK" if rc == 0 else "\ndemo FAILED")
    return rc


if __name__ == "__main__":
    sys.exit(main())
