"""A torchrun worker with the Checkpointer's usual three lines (make, restore, save) and the daemon tier.

``python -m torch.distributed.run --max-restarts 1 ... tests/torchrun_worker.py DAEMON_DIR ROOT OUT KILL_AT LAST``:
in the first attempt (``TORCHELASTIC_RESTART_COUNT == 0``) rank 1 SIGKILLs itself once step ``KILL_AT`` is
sealed; torchrun then restarts every worker, which restore from the daemon and train on to ``LAST``. Each rank
writes ``OUT/rank<r>.pt``: the unsharded final state and ``cp.last_restore``.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ckpt  # noqa: E402
from ckpt.errors import CheckpointNotFoundError  # noqa: E402
from tests.test_checkpointer_dist import build, full_reference, train_step  # noqa: E402


def main() -> None:
    ddir, root, out, kill_at, last = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    attempt, world = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ["WORLD_SIZE"])
    # torch 2.13's elastic agent keeps its store across restarts, so a restarted gloo group can read the first
    # attempt's addresses and fail in connectFullMesh (reproduced without ckpt; docs/daemon.md): keys per attempt.
    store = dist.PrefixStore(f"attempt{attempt}", dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                               world, is_master=False, timeout=timedelta(seconds=120)))
    dist.init_process_group("gloo", store=store, rank=int(os.environ["RANK"]), world_size=world)
    rank = dist.get_rank()
    state = build(world, seed=attempt)  # another start on a restart: everything must come from the snapshot
    train_step(state, 1)  # optimizer state to restore into
    cp = ckpt.Checkpointer(root, disk_every=0, daemon=ddir)
    try:
        first = cp.restore(state) + 1
    except CheckpointNotFoundError:
        state = build(world, seed=0)
        first = 1
    for step in range(first, last + 1):
        train_step(state, step)
        state["step"] = step
        handle = cp.save(step, state)
        if attempt == 0 and step == kill_at and rank == 1:
            handle.wait()  # this rank's part of step KILL_AT sealed (cp.wait() is collective: not on one rank)
            os.kill(os.getpid(), signal.SIGKILL)
    cp.wait()
    torch.save({"final": full_reference(state), "last_restore": cp.last_restore, "attempt": attempt,
                "first": first}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
