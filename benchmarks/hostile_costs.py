"""What #22's hostile-input defences cost: how a failed load leaves the state as it was, and verify against load.

Run ``python -m benchmarks.hostile_costs [--gib 1] [--repeats 5] [--chunks 20000]``. In one process:

* **load strategies**: ``ckpt.load`` of a float32 state of 8 tensors (``--gib`` in all, data in the page cache),
  alternating: as shipped (every byte verified before the first write: ``ckpt.loading.verify_in_place``), the
  undo copy that storages without cheap rereads use (``verify_in_place`` disabled: ``ckpt.loading.Undo`` keeps
  what the load overwrites), and neither (the load before #22, which left damage in the tensors). Each into
  tensors loaded before (warm memory) and into fresh, never touched ones (what a restarted trainer loads into);
* **restore from daemon memory**, the same two ways: the state sealed in a snapshot daemon (started here on
  ``/dev/shm``, killed by its pid at the end), restored by ``Checkpointer.restore`` (``last_restore['secs']``);
* **verify vs load**: a checkpoint saved with ``max_chunk_bytes=4`` (``--chunks`` chunks of one element), timed
  ``ckpt verify`` (``ckpt.cli.verify_checkpoint``) against ``ckpt.load`` of it; #22 asks verify within 2x load.

Best and median of ``--repeats``. Writes ``docs/benchmarks/hostile_costs.{json,md,png}``. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Iterator

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


#: Load strategies compared: name -> (disable the check before writing, disable the undo copy).
LOAD_MODES = {"as shipped (verified before writing)": (False, False),
              "undo copy (as from an object store)": (True, False),
              "neither (before #22: a failed load left damage)": (True, True)}


@contextlib.contextmanager
def _strategy(no_check: bool, no_undo: bool) -> Iterator[None]:
    real_check, real_keep = loading.verify_in_place, loading.Undo.keep
    if no_check:
        loading.verify_in_place = lambda *a: False  # type: ignore[assignment]
    if no_undo:
        loading.Undo.keep = lambda self, d: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        loading.verify_in_place, loading.Undo.keep = real_check, real_keep  # type: ignore[method-assign]


def load_costs(root: str, gib: float, repeats: int) -> dict[str, Any]:
    """Each strategy into tensors loaded before (warm memory) and into fresh ones (a restore in a new process)."""
    state = _state(gib)
    path = os.path.join(root, "load")
    ckpt.save(state, path)
    nbytes = sum(t.numel() * 4 for t in state.values())
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    times: dict[str, dict[str, list[float]]] = {m: {"warm": [], "fresh": []} for m in LOAD_MODES}
    ckpt.load(dst, path)  # warm the page cache
    for _ in range(repeats):
        for mode, flags in LOAD_MODES.items():
            with _strategy(*flags):
                times[mode]["warm"].append(_secs(lambda: ckpt.load(dst, path)))
                fresh = {k: torch.empty_like(v) for k, v in state.items()}
                times[mode]["fresh"].append(_secs(lambda: ckpt.load(fresh, path)))
                assert all(torch.equal(fresh[k], state[k]) for k in state), "a load was wrong"
                del fresh
    assert all(torch.equal(dst[k], state[k]) for k in state), "a load was wrong"
    return {"bytes": nbytes, "modes": _rates(nbytes, times)}


def _rates(nbytes: int, times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """GB/s per mode: ``{warm,fresh}_{best,median}_gbps``."""
    return {m: {f"{w}_{q}_gbps": nbytes / f(ts[w]) / 1e9 for w in ("warm", "fresh")
                for q, f in (("best", min), ("median", rep.median))} for m, ts in times.items()}


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
    modes = {"as shipped (verified before writing)": (False, False),
             "undo copy (as from an object store)": (True, False)}
    times: dict[str, dict[str, list[float]]] = {m: {"warm": [], "fresh": []} for m in modes}
    try:
        run = os.path.join(parent, "run")
        cp = ckpt.Checkpointer(run, disk_every=0, daemon=ddir)
        cp.save(1, state).wait()
        cp.close()  # a clean end leaves the sealed step in the daemon, as a killed trainer would
        dst = {k: torch.empty_like(v) for k, v in state.items()}
        for i in range(repeats + 1):  # the first round warms the mappings and is not counted
            for mode, flags in modes.items():
                for where in ("warm", "fresh"):  # fresh: tensors never touched, as in a restarted trainer
                    into = dst if where == "warm" else {k: torch.empty_like(v) for k, v in state.items()}
                    with _strategy(*flags), ckpt.Checkpointer(run, disk_every=0, daemon=ddir) as cp:
                        assert cp.restore(into) == 1 and cp.last_restore["source"] == "daemon"
                        if i:
                            times[mode][where].append(cp.last_restore["secs"])
                    assert all(torch.equal(into[k], state[k]) for k in state), "a restore was wrong"
                    del into
    finally:
        try:
            os.kill(doc["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(parent, ignore_errors=True)
    return {"bytes": nbytes, "modes": _rates(nbytes, times)}


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


def _rates_table(modes: dict[str, dict[str, float]]) -> str:
    return rep.markdown_table(["mode", "into loaded tensors: best GB/s", "median", "into fresh tensors: best GB/s",
                               "median"],
                              [[m, rep.fmt(v["warm_best_gbps"]), rep.fmt(v["warm_median_gbps"]),
                                rep.fmt(v["fresh_best_gbps"]), rep.fmt(v["fresh_median_gbps"])]
                               for m, v in modes.items()])


def render(result: dict[str, Any]) -> str:
    lo, ve, dm = result["load"], result["verify"], result["daemon"]
    lines = ["# Costs of the hostile-input defences (#22)", "", f"Command: `{result['command']}`.", "",
             rep.describe_machine_md(result["machine"]), "",
             f"## Load of {lo['bytes'] / 2**30:.2f} GiB (float32, 8 tensors, page cache warm)", "",
             _rates_table(lo["modes"]),
             "", f"## Restore of {dm['bytes'] / 2**30:.2f} GiB from snapshot daemon memory "
             "(`last_restore['secs']`)", "",
             _rates_table(dm["modes"]),
             "", f"## Verify vs load, {ve['chunks']} chunks", "",
             rep.markdown_table(["load (best)", "verify (best)", "verify / load"],
                                [[rep.fmt(ve["load_best_secs"], 2, " s"), rep.fmt(ve["verify_best_secs"], 2, " s"),
                                  rep.fmt(ve["verify_over_load"], 2, "x")]])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    modes = {f"load: {m}": v for m, v in result["load"]["modes"].items()}
    modes.update({f"daemon restore: {m}": v for m, v in result["daemon"]["modes"].items()})
    rep.grouped_bar_plot(path, "ckpt.load and daemon restores of the same state, best GB/s", list(modes),
                         {"into loaded tensors": [v["warm_best_gbps"] for v in modes.values()],
                          "into fresh tensors": [v["fresh_best_gbps"] for v in modes.values()]}, "GB/s")


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
