"""Part two of ``make demo``: snapshots every step, a SIGKILL mid-run, an automatic resume, a stall table.

The parent starts a snapshot daemon (``ckpt daemon start`` in a private directory on /dev/shm) and a trainer
process that snapshots every step into it (the memory tier in the daemon, disk every step, keep 3), kills the
trainer with SIGKILL once a few steps are committed, starts a new trainer that resumes from the daemon's memory
(printing where the restore came from and how long it took), checks the final state against an uninterrupted
run, bit for bit, and stops the daemon.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from torch import nn

TOTAL_STEPS = 12


def _model() -> nn.Module:
    from ckpt.demo import TinyGPTBlock

    torch.manual_seed(0)
    return TinyGPTBlock()


class SampleStream:
    """A Stateful data source: the position in a seeded token stream (the dataloader of a real job)."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + self.position)
        self.position += 1
        return torch.randint(0, 101, (4, 16), generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.position = int(sd["position"])


def train(root: str, resume: bool, sleep_secs: float, quiet: bool = False) -> dict[str, torch.Tensor]:
    """The trainer: prints one JSON line per step; returns the final parameters."""
    import ckpt
    from ckpt.demo import _train_step

    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=4, gamma=0.5)
    data = SampleStream()
    state = {"model": model, "optim": optim, "sched": sched, "data": data, "step": 0}
    daemon = os.environ.get("DEMO_DAEMON") or None
    cp = ckpt.Checkpointer(root, memory_every=1, disk_every=1, keep_last=3, daemon=daemon) if root else None
    start = 0
    if cp is not None and resume and cp.latest_step() is not None:
        start = cp.restore(state)
        print(json.dumps({"event": "resumed", **(cp.last_restore or {})}), flush=True)
    for step in range(start + 1, TOTAL_STEPS + 1):
        loss = _train_step(model, optim, data.next_batch())
        sched.step()
        state["step"] = step
        if cp is not None:
            h = cp.save(step, state)
            h.wait()  # the demo reports commits; a real job would not wait here
        if not quiet:
            print(json.dumps({"event": "step", "step": step, "loss": loss, "committed": cp is not None}), flush=True)
        time.sleep(sleep_secs)
    if cp is not None:
        cp.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer_cmd(root: str, resume: bool, out: str) -> list[str]:
    return [sys.executable, "-m", "ckpt.demo_snapshots", "--trainer", root, "--out", out] + (["--resume"] if resume else [])


def _daemon(*args: str) -> dict:
    """``ckpt daemon ARGS --json`` in this process (the daemon is a plugin command: ckpt never imports it)."""
    import contextlib
    import io

    from ckpt.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["daemon", *args, "--json"])
    if rc:
        raise RuntimeError(f"ckpt daemon {' '.join(args)} exited {rc}: {out.getvalue()}")
    return json.loads(out.getvalue())


def run(run_dir: str) -> int:
    import shutil
    import tempfile

    parent = tempfile.mkdtemp(prefix="ckpt-demo-daemon-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ddir = os.path.join(parent, "d")
    doc = _daemon("start", "--dir", ddir, "--memory-budget", "256MiB")
    print(f"5. snapshot daemon started (ckpt daemon start: pid {doc['pid']}, {ddir}); it outlives the trainers "
          "it serves")
    try:
        return _run(run_dir, ddir)
    finally:
        try:
            stopped = _daemon("stop", "--dir", ddir)
            print(f"  snapshot daemon stopped (ckpt daemon stop), {stopped.get('freed_bytes', 0)} bytes of "
                  "snapshots freed")
        except Exception as e:  # noqa: BLE001 - it is killed below either way
            print(f"  snapshot daemon stop: {e}", file=sys.stderr)
            os.kill(doc["pid"], signal.SIGKILL)
        shutil.rmtree(parent, ignore_errors=True)


def _run(run_dir: str, ddir: str) -> int:
    root = os.path.join(run_dir, "snapshots")
    env = {**os.environ, "DEMO_DAEMON": ddir}
    kill_after = random.Random().randint(4, 8)
    print(f"  trainer with a snapshot every step (memory in the daemon + disk, keep 3); SIGKILL after step "
          f"{kill_after} ...")
    proc = subprocess.Popen(_trainer_cmd(root, False, os.path.join(run_dir, "unused.pt")),
                            stdout=subprocess.PIPE, text=True, env={**env, "DEMO_SLEEP": "0.2"})
    assert proc.stdout is not None
    for line in proc.stdout:
        ev = json.loads(line)
        print(f"  [trainer 1] step {ev['step']} loss {ev['loss']:.4f} (committed)")
        if ev["step"] >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    print(f"  trainer killed with SIGKILL (exit {proc.returncode})")

    print("\n6. a new trainer resumes from the last committed step automatically (the daemon's memory first) ...")
    resumed_out = os.path.join(run_dir, "resumed.pt")
    out = subprocess.run(_trainer_cmd(root, True, resumed_out), capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return 1
    resumed_at, source = 0, None
    for line in out.stdout.splitlines():
        ev = json.loads(line)
        if ev["event"] == "resumed":
            resumed_at, source = ev["step"], ev["source"]
            read = ev["storage_bytes_read"]
            print(f"  [trainer 2] restored step {ev['step']} from {ev['source']} in {ev['secs'] * 1e3:.1f} ms "
                  f"({'no byte from storage' if read == 0 else 'storage bytes read: ' + str(read)})")
        else:
            print(f"  [trainer 2] step {ev['step']} loss {ev['loss']:.4f}")

    print("\n7. the same run without interruption, for comparison ...")
    reference = train("", False, 0.0, quiet=True)
    resumed = torch.load(resumed_out, weights_only=True)
    same = all(torch.equal(reference[k], resumed[k]) for k in reference)
    print(f"  final parameters identical to the uninterrupted run: {same}")
    if source != "daemon":
        print(f"  expected the restore to come from the daemon's memory, it came from {source}", file=sys.stderr)
        same = False

    print("\n8. training stall per snapshot (trainer 2, from metrics/rank_00000.jsonl):")
    print_stall_table(os.path.join(root, "metrics", "rank_00000.jsonl"), after_step=resumed_at)
    return 0 if same else 1


def print_stall_table(path: str, after_step: int = 0) -> None:
    """Training stall = request latency + lazy wait + back-pressure wait; copy and flush run in the background."""
    rows = [r for r in (json.loads(line) for line in open(path)) if r["step"] > after_step]
    print(f"  {'step':>4} {'stall ms':>8} {'request ms':>10} {'lazy wait ms':>12} {'backpressure ms':>15} "
          f"{'bg copy ms':>10} {'bg disk flush ms':>16} {'bytes':>9}")
    for r in rows:
        disk = r["tiers"].get("disk", {})
        stall = r["request_secs"] + r["lazy_wait_secs"] + r["backpressure_wait_secs"]
        print(f"  {r['step']:>4} {stall * 1e3:>8.2f} {r['request_secs'] * 1e3:>10.2f} {r['lazy_wait_secs'] * 1e3:>12.2f} "
              f"{r['backpressure_wait_secs'] * 1e3:>15.2f} {r['copy_secs'] * 1e3:>10.2f} "
              f"{disk.get('flush_secs', 0) * 1e3:>16.2f} {r['staged_bytes']:>9}")


def main() -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--trainer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    params = train(args.trainer, args.resume, float(os.environ.get("DEMO_SLEEP", "0")))
    torch.save(params, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
