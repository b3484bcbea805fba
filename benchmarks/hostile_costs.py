"""What #22's hostile-input defences cost: a load's undo copy, and verify against load on many small chunks.

Run ``python -m benchmarks.hostile_costs [--gib 1] [--repeats 5] [--chunks 20000]``. In one process:

* **load with and without the undo copy**: ``ckpt.load`` of a float32 state of 8 tensors (``--gib`` in all, data in
  the page cache) into tensors allocated once, alternating: as shipped (``ckpt.loading.Undo`` keeps what the load
  overwrites, so a failed load leaves the state as it was), with ``Undo.keep`` disabled (the load before #22),
  and with a plain ``clone()`` as the keep (what the huge-page copies replace);
* **restore from daemon memory with and without the undo copy**: the same state sealed in a snapshot daemon
  (started here on ``/dev/shm``, killed by its pid at the end), restored by ``Checkpointer.restore``: as shipped
  (mapped segments are verified before the first write, so no undo copy) against the undo copy a load from
  files makes (``ckpt.loading.verify_in_place`` disabled, the path restores took before);
* **verify vs load**: a checkpoint saved with ``max_chunk_bytes=4`` (``--chunks`` chunks of one element), timed
  ``ckpt verify`` (``ckpt.cli.verify_checkpoint``) against ``ckpt.load`` of it; #22 asks verify within 2x load.

Best and median of ``--repeats``. Writes ``docs/benchmarks/hostile_costs.{json,md,png}``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import torch

import ckpt
import ckpt.loading as loading
from benchmarks import _report as rep
from ckpt.cli import verify_checkpoint

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "benchmarks")


def _secs(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load_costs(root: str, gib: float, repeats: int) -> dict[str, Any]:
    state = _state(gib)
    path = os.path.join(root, "load")
    ckpt.save(state, path)
    nbytes = sum(t.numel() * 4 for t in state.values())
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    real_keep = loading.Undo.keep

    def clone_keep(self: loading.Undo, d: torch.Tensor) -> None:
        kept = d.clone()
        with self._lock:
            self._kept.append((d, kept))

    modes = {"as shipped (undo copy)": real_keep, "no undo copy (before #22)": lambda self, d: None,
             "undo by clone()": clone_keep}
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        ckpt.load(dst, path)  # warm the page cache
        for _ in range(repeats):
            for mode, keep in modes.items():
                loading.Undo.keep = keep  # type: ignore[method-assign]
                times[mode].append(_secs(lambda: ckpt.load(dst, path)))
    finally:
        loading.Undo.keep = real_keep  # type: ignore[method-assign]
    assert all(torch.equal(dst[k], state[k]) for k in state), "a load was wrong"
    return {"bytes": nbytes, "modes": {m: {"best_gbps": nbytes / min(ts) / 1e9,
                                           "median_gbps": nbytes / rep.median(ts) / 1e9} for m, ts in times.items()}}


def _state(gib: float) -> dict[str, torch.Tensor]:
    n = int(gib * (1 << 30)) // 4 // 8
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(n + i, generator=g) for i in range(8)}  # odd lengths: no two alike


def daemon_costs(gib: float, repeats: int) -> dict[str, Any]:
    from snapshot_daemon import client

    state = _state(gib)
    nbytes = sum(t.numel() * 4 for t in state.values())
    parent = tempfile.mkdtemp(prefix="ckpt-bench-daemon-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ddir = os.path.join(parent, "d")
    doc = client.start(ddir, memory_budget=3 * nbytes + (64 << 20))
    real = loading.verify_in_place
    modes = {"as shipped (verified before writing)": real, "undo copy (as a load from files)": lambda *a: False}
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        run = os.path.join(parent, "run")
        cp = ckpt.Checkpointer(run, disk_every=0, daemon=ddir)
        cp.save(1, state).wait()
        cp.close()  # a clean end leaves the sealed step in the daemon, as a killed trainer would
        dst = {k: torch.empty_like(v) for k, v in state.items()}
        for i in range(repeats + 1):  # the first round warms the mappings and is not counted
            for mode, fn in modes.items():
                loading.verify_in_place = fn  # type: ignore[assignment]
                with ckpt.Checkpointer(run, disk_every=0, daemon=ddir) as cp:
                    assert cp.restore(dst) == 1 and cp.last_restore["source"] == "daemon"
                    if i:
                        times[mode].append(cp.last_restore["secs"])
        assert all(torch.equal(dst[k], state[k]) for k in state), "a restore was wrong"
    finally:
        loading.verify_in_place = real  # type: ignore[assignment]
        try:
            os.kill(doc["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(parent, ignore_errors=True)
    return {"bytes": nbytes, "modes": {m: {"best_gbps": nbytes / min(ts) / 1e9,
                                           "median_gbps": nbytes / rep.median(ts) / 1e9} for m, ts in times.items()}}


def verify_costs(root: str, chunks: int, repeats: int) -> dict[str, Any]:
    state = {"w": torch.arange(chunks, dtype=torch.float32)}
    path = os.path.join(root, "verify")
    ckpt.save(state, path, options=ckpt.SaveOptions(max_chunk_bytes=4))
    dst = {"w": torch.empty(chunks)}
    load = [_secs(lambda: ckpt.load(dst, path)) for _ in range(repeats)]
    assert torch.equal(dst["w"], state["w"])
    verify = []
    for _ in range(repeats):
        reader = ckpt.open(path)
        verify.append(_secs(lambda: verify_checkpoint(reader)))
    return {"chunks": chunks, "load_best_secs": min(load), "verify_best_secs": min(verify),
            "verify_over_load": min(verify) / min(load)}


def render(result: dict[str, Any]) -> str:
    lo, ve, dm = result["load"], result["verify"], result["daemon"]
    lines = ["# Costs of the hostile-input defences (#22)", "", f"Command: `{result['command']}`.", "",
             rep.describe_machine_md(result["machine"]), "",
             f"## Load of {lo['bytes'] / 2**30:.2f} GiB (float32, 8 tensors, page cache warm)", "",
             rep.markdown_table(["mode", "best GB/s", "median GB/s"],
                                [[m, rep.fmt(v["best_gbps"]), rep.fmt(v["median_gbps"])]
                                 for m, v in lo["modes"].items()]),
             "", f"## Restore of {dm['bytes'] / 2**30:.2f} GiB from snapshot daemon memory "
             "(`last_restore['secs']`)", "",
             rep.markdown_table(["mode", "best GB/s", "median GB/s"],
                                [[m, rep.fmt(v["best_gbps"]), rep.fmt(v["median_gbps"])]
                                 for m, v in dm["modes"].items()]),
             "", f"## Verify vs load, {ve['chunks']} chunks", "",
             rep.markdown_table(["load (best)", "verify (best)", "verify / load"],
                                [[rep.fmt(ve["load_best_secs"], 2, " s"), rep.fmt(ve["verify_best_secs"], 2, " s"),
                                  rep.fmt(ve["verify_over_load"], 2, "x")]])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    modes = {f"load: {m}": v for m, v in result["load"]["modes"].items()}
    modes.update({f"daemon restore: {m}": v for m, v in result["daemon"]["modes"].items()})
    rep.grouped_bar_plot(path, "Loads and daemon restores, GB/s, with and without the undo copy", list(modes),
                         {"best": [v["best_gbps"] for v in modes.values()],
                          "median": [v["median_gbps"] for v in modes.values()]}, "GB/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="state size for the load figures, GiB (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
    p.add_argument("--chunks", type=int, default=20000, help="chunks of the verify-vs-load checkpoint")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=OUT, help="folder for hostile_costs.{json,md,png} (default docs/benchmarks)")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(dir=a.dir)
    try:
        result = {"benchmark": "hostile_costs", "command": rep.command_line(), "machine": rep.machine_info(root),
                  "load_average": rep.load_average(), "load": load_costs(root, a.gib, a.repeats),
                  "daemon": daemon_costs(a.gib, a.repeats), "verify": verify_costs(root, a.chunks, a.repeats)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(rep.write_outputs(a.out, "hostile_costs", result, render, plot))


if __name__ == "__main__":
    main()
