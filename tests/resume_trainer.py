"""The trainer half of the resume tests (``tests/test_checkpointer_resume.py``): deterministic CPU training that
the test runs uninterrupted, kills with SIGKILL, and resumes in a new process.

``python tests/resume_trainer.py MODE --root DIR --out DIR [--steps N] [--commit-report K] [--slow-secs S]``

* ``reference``: train steps 1..N without a Checkpointer.
* ``crash``: train with ``ckpt.Checkpointer(root, disk_every=1)``, snapshotting every step. After step K's
  snapshot is committed on disk it prints ``COMMITTED K``; from then on it sleeps ``--slow-secs`` per step so the
  test can SIGKILL it at any point of the following steps (mid-copy, mid-flush, mid-commit, between steps).
* ``resume``: ``restore()`` the latest committed step from ``root``, print ``RESTORED <step>``, train to N.

Every mode appends ``{"step": s, "loss": ...}`` per step to ``<out>/losses.jsonl`` (flushed each line, so a
killed run leaves what it did) and, when it reaches step N, writes the final model, optimizer and scheduler state
to ``<out>/final.pt`` and prints ``DONE``.

Everything that decides the numbers comes from state the Checkpointer saves: the data order from a Stateful
sampler (a per-epoch shuffle and a position in it), dropout from torch's RNG, input noise from numpy's and
python's RNGs (restored per rank by the Checkpointer), the learning rate from a scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn as nn

import ckpt

DATASET_SIZE, BATCH = 36, 8  # 4.5 batches per epoch: the sampler's position crosses epoch boundaries mid-batch


class Sampler:
    """Stateful: ``state_dict``/``load_state_dict`` carry the epoch and the position in its shuffled order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()

    def next_batch(self, size: int) -> list[int]:
        out, order = [], self._order()
        for _ in range(size):
            out.append(order[self.pos])
            self.pos += 1
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def build() -> dict[str, Any]:
    """The whole training state, identical in every process (fixed seeds, no dependence on the environment)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = Net()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + 0.1 * s))
    return {"model": model, "optim": optim, "sched": sched, "sampler": Sampler(DATASET_SIZE, seed=7), "step": 0}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(DATASET_SIZE, 10, generator=g), torch.randint(0, 4, (DATASET_SIZE,), generator=g)


def train_step(state: dict[str, Any], x_all: torch.Tensor, y_all: torch.Tensor) -> float:
    idx = state["sampler"].next_batch(BATCH)
    noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=(BATCH, 10)).astype(np.float32))
    x = x_all[idx] + noise + random.uniform(-0.01, 0.01)
    loss = nn.functional.cross_entropy(state["model"](x), y_all[idx])
    loss.backward()
    state["optim"].step()
    state["optim"].zero_grad(set_to_none=True)
    state["sched"].step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("reference", "crash", "resume"))
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--commit-report", type=int, default=10)
    p.add_argument("--slow-secs", type=float, default=0.05)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    state = build()
    x_all, y_all = dataset()
    cp = None if args.mode == "reference" else ckpt.Checkpointer(args.root, disk_every=1, keep_last=None)
    start = 0
    if args.mode == "resume":
        assert cp is not None
        start = cp.restore(state)
        assert state["step"] == start, (state["step"], start)
        print(f"RESTORED {start}", flush=True)
    with open(os.path.join(args.out, "losses.jsonl"), "a") as log:
        for step in range(start + 1, args.steps + 1):
            loss = train_step(state, x_all, y_all)
            state["step"] = step
            log.write(json.dumps({"step": step, "loss": loss}) + "\n")
            log.flush()
            if cp is not None:
                handle = cp.save(step, state)
                if args.mode == "crash" and step == args.commit_report:
                    handle.wait()
                    assert cp.steps("disk")[-1] == step
                    print(f"COMMITTED {step}", flush=True)
            if args.mode == "crash" and step > args.commit_report:
                time.sleep(args.slow_secs)  # slow from here on: the test kills somewhere in these steps
    if cp is not None:
        cp.close()
    torch.save({"model": state["model"].state_dict(), "optim": state["optim"].state_dict(),
                "sched": {k: v for k, v in state["sched"].state_dict().items() if k != "lr_lambdas"},
                "sampler": state["sampler"].state_dict()}, os.path.join(args.out, "final.pt"))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
