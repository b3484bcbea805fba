"""The per-node snapshot daemon, side by side in one run: recovery after a SIGKILL, save cost, memory overhead.

Run ``python -m benchmarks.daemon [--quick] [--params-m 100] [--steps 40] [--rounds 2] [--restores 3]
[--out docs/benchmarks]`` (``--help`` lists every option). The GPT of ``benchmarks.gpt`` with
``benchmarks.training_stall``'s default config (about 100 M parameters, sequence 128, batch 1, AdamW, 2 torch
threads, glibc ``malloc`` keeping freed memory) trains on synthetic tokens on the CPU. One daemon is started in a
fresh directory under ``/dev/shm`` and, whatever happens, SIGKILLed by its pid and its directory removed at the end.

1. **Recovery.** A trainer subprocess trains ``TRAIN_STEPS`` steps with ``Checkpointer(root, daemon=DIR,
   disk_every=DISK_EVERY)``, waits on the handle of its last step S (sealed in the daemon *and* committed on local
   disk), ``torch.save``s a reference copy of that step, says so, and is SIGKILLed. Then, alternating, fresh
   subprocesses (model built with another seed first) restore step S: (a) from the daemon; (b) from local disk
   with a cold page cache (``os.sync``, ``POSIX_FADV_DONTNEED`` on every file of the step folder, and
   ``echo 1 > /proc/sys/vm/drop_caches`` where writable; ``fincore`` checks what stayed resident); (c) for
   reference, from local disk again without eviction (warm). Each is timed around ``restore`` (the goal: only
   the source differs), from before ``Checkpointer(...)`` to after ``restore`` returns (``wall``; ``ckpt`` is
   imported before), next to ``cp.last_restore["secs"]`` and the time from spawning the
   process to the restored state; each is checked bit-exact (``torch.equal``, every model and optimizer tensor)
   against the reference. The floor is ``dst.copy_(src)`` of as many bytes into an already-touched buffer.
   Goal: the daemon at least 5x faster than the cold disk.
2. **Save cost.** The same loop of ``--steps`` iterations (the first ``--warmup`` excluded from medians; the first
   save reported apart) without checkpointing, with ``Checkpointer(root, disk_every=0)`` (the trainer's own host
   pool) and with ``Checkpointer(root, disk_every=0, daemon=DIR)`` (the pool in daemon segments), ``--rounds``
   times in rotating order: ``save()``'s blocked time (``request_secs``), the background copy (``copy_secs``),
   the wait of the next ``optimizer.step()`` for it, and the iteration time. Goal: the daemon at most 1.1x the
   own pool, for the blocked time and the iteration time.
3. **Memory.** The daemon's ``VmRSS`` (``/proc/PID/status``) idle and holding snapshots, ``status()["memory_used"]``
   against the snapshot bytes, the bytes its directory holds, and ``/dev/shm`` used (``statvfs``) before and after.

Writes ``daemon.json``, ``daemon.md`` and ``daemon.png`` to ``--out``. Not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import _report as rep
from benchmarks.gpt import GPT, GPTConfig, synthetic_batch, train_step

ROOT = Path(__file__).resolve().parents[1]
SHM = "/dev/shm"
LR = 1e-4  # as benchmarks.training_stall
TRAIN_STEPS = 4  # the trainer's steps before the SIGKILL; the last one is on the daemon and on disk
DISK_EVERY = 2
BUDGET_SEGMENTS = 4.5  # daemon budget in snapshots: the trainer's 2 slots + 2 kept orphans, eviction beyond
CHILD_TIMEOUT_SECS = 600.0
BASE, OWN, DAEMON = "no checkpointing", "own pool", "daemon"
METHODS = (BASE, OWN, DAEMON)
RECOVERY = ("daemon", "cold disk", "warm disk")
GOAL_RECOVERY_SPEEDUP = 5.0
GOAL_SAVE_RATIO = 1.1
QUICK = {"params_m": 10.0, "steps": 16, "warmup": 3, "rounds": 2, "restores": 2, "copy_repeats": 5}


# -- subprocesses: the trainer that gets SIGKILLed and the restorers ------------------------------------------------
def _build(spec: dict[str, Any], seed: int) -> tuple[GPTConfig, GPT, torch.optim.Optimizer, dict[str, Any]]:
    torch.set_num_threads(spec["threads"])
    cfg = GPTConfig(**spec["model"])
    torch.manual_seed(seed)
    model = GPT(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    train_step(model, optim, synthetic_batch(cfg, spec["batch_size"], 0, seed=seed))  # the AdamW state exists
    return cfg, model, optim, {"model": model, "optim": optim, "step": 0}


def _trainer(spec: dict[str, Any]) -> None:
    """Train, snapshot every step into the daemon and every DISK_EVERY to disk; after the last step is on both,
    write the reference, print one line and wait for the SIGKILL."""
    import ckpt

    rep.set_allocator(spec["allocator"])
    cfg, model, optim, state = _build(spec, seed=0)
    cp = ckpt.Checkpointer(spec["root"], daemon=spec["daemon_dir"], disk_every=spec["disk_every"])
    last = spec["steps"]
    for step in range(1, last + 1):
        train_step(model, optim, synthetic_batch(cfg, spec["batch_size"], step))
        state["step"] = step
        handle = cp.save(step, state)
    t0 = time.perf_counter()
    handle.wait()
    waited = time.perf_counter() - t0
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": last}, spec["ref"])
    m = cp.metrics[-1]
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for st in optim.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    print(json.dumps({"step": last, "state_tensor_bytes": tensor_bytes, "daemon_steps": cp.steps("daemon"),
                      "disk_steps": cp.steps("disk"),
                      "errors": [repr(e) for e in handle.errors], "last_wait_secs": waited,
                      "staged_bytes": m.staged_bytes, "lazy_bytes": m.lazy_bytes,
                      "tiers": m.tiers, "pid": os.getpid()}), flush=True)
    time.sleep(3600)


def _compare(model: GPT, optim: torch.optim.Optimizer, state: dict[str, Any], ref: dict[str, Any],
             step: int) -> dict[str, Any]:
    """torch.equal of every model and optimizer-state tensor against the trainer's torch.save of that step."""
    bad: list[str] = []
    sd = model.state_dict()
    if set(sd) != set(ref["model"]):
        bad.append(f"model keys differ: {sorted(set(sd) ^ set(ref['model']))[:5]}")
    n_model = n_optim = 0
    for k, v in ref["model"].items():
        n_model += 1
        if k not in sd or not torch.equal(sd[k], v):
            bad.append(f"model/{k}")
    got = optim.state_dict()["state"]
    for i, st in ref["optim"]["state"].items():
        for k, v in st.items():
            n_optim += 1
            mine = got.get(i, {}).get(k)
            same = torch.equal(mine, v) if isinstance(v, torch.Tensor) and isinstance(mine, torch.Tensor) else mine == v
            if not same:
                bad.append(f"optim/{i}/{k}")
    if state["step"] != step:
        bad.append(f"step {state['step']} != {step}")
    return {"bit_exact": not bad, "mismatched": bad[:10], "model_tensors": n_model, "optim_tensors": n_optim}


def _restorer(spec: dict[str, Any]) -> None:
    """Build the model with other values, then time Checkpointer(...) + restore(step), and check the result."""
    from ckpt import Checkpointer  # the import (DTensor, sympy: about 0.6 s) is a trainer's start, as torch's

    _, model, optim, state = _build(spec, seed=1)
    state["step"] = -1
    gc.collect()
    t0 = time.perf_counter()
    cp = Checkpointer(spec["root"], disk_every=spec["disk_every"], daemon=spec["daemon_dir"])
    t1 = time.perf_counter()
    got = cp.restore(state, step=spec["step"])
    wall = time.perf_counter() - t0
    restored_at = time.time()
    last = dict(cp.last_restore or {})
    cp.close()
    check = _compare(model, optim, state, torch.load(spec["ref"], weights_only=True), spec["step"])
    print(json.dumps({"step": got, "wall_secs": wall, "construct_secs": t1 - t0,
                      "restore_call_secs": wall - (t1 - t0), "restored_unix": restored_at, "last_restore": last, **check}),
          flush=True)


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    {"trainer": _trainer, "restorer": _restorer}[spec["role"]](spec)


def _spawn(spec: dict[str, Any]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", "import sys; from benchmarks.daemon import _child; "
                             "_child(sys.argv[1])", json.dumps(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE)


def _read_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """The child's first line of JSON; RuntimeError if it exits or stays silent for ``timeout`` seconds."""
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"child {proc.pid} said nothing within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"child {proc.pid} exited (rc {proc.wait()}) before reporting; see its stderr above")
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def _kill(pid: int | None) -> None:
    """SIGKILL ``pid`` and wait until it is gone (reaping it where it is our child)."""
    if not pid or pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


# -- measurements of the machine and the daemon -------------------------------------------------------------------
def shm_used_bytes() -> int:
    st = os.statvfs(SHM)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _files(top: Path) -> list[Path]:
    return [Path(dp) / n for dp, _, names in os.walk(top) for n in names]


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of ``paths`` in the page cache (``fincore``), or None where it cannot tell."""
    if not paths or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def evict(step_path: Path, try_drop: bool) -> dict[str, Any]:
    """Make the next read of the step folder cold: sync, POSIX_FADV_DONTNEED every file, and drop_caches=1."""
    files = _files(step_path)
    before = resident_bytes(files)
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    methods, why = ["posix_fadvise(POSIX_FADV_DONTNEED) on every file of the step folder after os.sync()"], None
    if try_drop:
        try:
            with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
                f.write("1\n")
            methods.append("echo 1 > /proc/sys/vm/drop_caches")
        except OSError as e:
            why = f"drop_caches not writable: {type(e).__name__}: {e}"
    else:
        why = "drop_caches not tried (--no-drop-caches)"
    return {"methods": methods, "drop_caches_note": why, "files": len(files),
            "file_bytes": sum(p.stat().st_size for p in files), "resident_bytes_before": before,
            "resident_bytes_after": resident_bytes(files)}


def daemon_memory(pid: int, ddir: Path, label: str) -> dict[str, Any]:
    """The daemon's RSS fields (bytes), what it says it uses, what its directory and /dev/shm hold."""
    from snapshot_daemon import client

    out: dict[str, Any] = {"when": label}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    st = client.status(ddir)
    out["memory_used"], out["segments"] = st["memory_used"], st["segments"]
    out["evicted"], out["reclaimed"] = st.get("evicted"), st.get("reclaimed")
    runs = st.get("runs", {})
    out["sealed_steps"] = {r: sorted(int(s) for s in v) for r, v in runs.items()}
    out["sealed_bytes"] = sum(n for v in runs.values() for e in v.values() for n in e["shards"].values())
    files = _files(ddir / "segments") if (ddir / "segments").exists() else []
    out["dir_allocated_bytes"] = sum(p.stat().st_blocks * 512 for p in files)
    out["dir_apparent_bytes"] = sum(p.stat().st_size for p in files)
    out["shm_used_bytes"] = shm_used_bytes()
    return out


def copy_floor(nbytes: int, repeats: int, threads: int) -> dict[str, Any]:
    """``dst.copy_(src)`` of ``nbytes`` uint8 into an already-touched buffer: median seconds, at ``threads`` torch
    threads and at 1."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    out: dict[str, Any] = {"bytes": nbytes, "repeats": repeats}
    before = torch.get_num_threads()
    try:
        for key, n in (("threads", threads), ("one_thread", 1)):
            torch.set_num_threads(n)
            dst.copy_(src)
            secs = [rep.timed(dst.copy_, src)[0] for _ in range(repeats)]
            out[key] = {"torch_threads": n, "secs": secs, "median_secs": rep.median(secs),
                        "gb_per_sec": nbytes / rep.median(secs) / 1e9}
    finally:
        torch.set_num_threads(before)
    return out


# -- 1. recovery ------------------------------------------------------------------------------------------------
def _restore_once(spec: dict[str, Any], mode: str, evict_info: dict[str, Any] | None,
                  procs: list[subprocess.Popen]) -> dict[str, Any]:
    t_spawn = time.time()
    p = _spawn({**spec, "role": "restorer", "daemon_dir": spec["daemon_dir"] if mode == "daemon" else None})
    procs.append(p)
    res = _read_line(p, CHILD_TIMEOUT_SECS)
    p.wait(CHILD_TIMEOUT_SECS)
    res.update(mode=mode, spawn_to_restored_secs=res["restored_unix"] - t_spawn, rc=p.returncode,
               source=res["last_restore"].get("source"), last_restore_secs=res["last_restore"].get("secs"))
    if evict_info is not None:
        res["eviction"] = evict_info
    print(f"  restore from {mode:9s}: wall {res['wall_secs']:.3f} s, last_restore {res['last_restore_secs']:.3f} s "
          f"(source {res['source']}), spawn-to-restored {res['spawn_to_restored_secs']:.1f} s, bit-exact "
          f"{res['bit_exact']}", file=sys.stderr)
    return res


def measure_recovery(spec: dict[str, Any], scratch: Path, ddir: Path, daemon_pid: int, restores: int,
                     try_drop: bool, memory: list[dict[str, Any]], procs: list[subprocess.Popen]) -> dict[str, Any]:
    from ckpt.tiers import step_dir

    root, ref = scratch / "recovery-run", scratch / "reference.pt"
    spec = {**spec, "root": str(root), "ref": str(ref), "daemon_dir": str(ddir), "steps": TRAIN_STEPS,
            "disk_every": DISK_EVERY}
    t0 = time.perf_counter()
    trainer = _spawn({**spec, "role": "trainer"})
    procs.append(trainer)
    said = _read_line(trainer, CHILD_TIMEOUT_SECS)
    trained_secs = time.perf_counter() - t0
    step = said["step"]
    if step not in said["daemon_steps"] or step not in said["disk_steps"] or said["errors"]:
        raise RuntimeError(f"the trainer's step {step} is not on both the daemon and the disk: {said}")
    memory.append(daemon_memory(daemon_pid, ddir, "trainer alive, its 2 pool slots sealed in the daemon"))
    _kill(trainer.pid)
    trainer.wait()
    memory.append(daemon_memory(daemon_pid, ddir, "after the trainer's SIGKILL (its sealed steps orphaned)"))
    print(f"  trainer: {TRAIN_STEPS} steps in {trained_secs:.1f} s, step {step} sealed and on disk; SIGKILLed "
          f"(rc {trainer.returncode})", file=sys.stderr)
    spec["step"] = step
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in RECOVERY}
    for _ in range(restores):
        runs["daemon"].append(_restore_once(spec, "daemon", None, procs))
        runs["cold disk"].append(_restore_once(spec, "cold disk", evict(root / step_dir(step), try_drop), procs))
    for _ in range(restores):
        runs["warm disk"].append(_restore_once(spec, "warm disk", None, procs))
    memory.append(daemon_memory(daemon_pid, ddir, "after the restores"))
    summary = {m: {"median_wall_secs": rep.median([r["wall_secs"] for r in rs]),
                   "wall_secs": [r["wall_secs"] for r in rs],
                   "median_last_restore_secs": rep.median([r["last_restore_secs"] for r in rs]),
                   "median_construct_secs": rep.median([r["construct_secs"] for r in rs]),
                   "median_restore_call_secs": rep.median([r["restore_call_secs"] for r in rs]),
                   "median_spawn_to_restored_secs": rep.median([r["spawn_to_restored_secs"] for r in rs]),
                   "sources": sorted({r["source"] for r in rs}), "all_bit_exact": all(r["bit_exact"] for r in rs)}
               for m, rs in runs.items()}
    return {"trainer": {**said, "wall_secs": trained_secs, "rc": trainer.returncode}, "step": step,
            "disk_step_bytes": sum(p.stat().st_size for p in _files(root / step_dir(step))),
            "runs": runs, "summary": summary}


# -- 2. save cost -----------------------------------------------------------------------------------------------
def _loop(method: str, model: GPT, optim: torch.optim.Optimizer, state: dict[str, Any], cfg: GPTConfig,
          opts: argparse.Namespace, first_step: int, root: Path, ddir: Path) -> dict[str, Any]:
    import ckpt

    cp = None if method == BASE else ckpt.Checkpointer(str(root), disk_every=0,
                                                       daemon=str(ddir) if method == DAEMON else None)
    iters = []
    try:
        for i in range(opts.steps):
            step = first_step + i
            t0 = time.perf_counter()
            train_step(model, optim, synthetic_batch(cfg, opts.batch_size, step))
            t1 = time.perf_counter()
            saved = cp is not None and i % opts.save_every == 0
            if saved:
                state["step"] = step
                cp.save(step, state)
            t2 = time.perf_counter()
            iters.append({"i": i, "step": step, "iter_secs": t2 - t0, "train_secs": t1 - t0,
                          "save_call_secs": t2 - t1, "saved": saved})
        t3 = time.perf_counter()
        if cp is not None:
            cp.wait()
        drain = time.perf_counter() - t3
        metrics = [asdict(m) for m in cp.metrics] if cp is not None else []
    finally:
        if cp is not None:
            cp.close()
    return {"method": method, "iters": iters, "drain_secs": drain, "metrics": metrics}


def _summarize_saves(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    its = [it for r in runs for it in r["iters"] if it["i"] >= warmup]
    ms = [m for r in runs for m in r["metrics"] if r["iters"][0]["step"] + warmup <= m["step"]]
    s: dict[str, Any] = {"iters": len(its), "iter_secs": [it["iter_secs"] for it in its],
                         "median_iter_secs": rep.median([it["iter_secs"] for it in its]),
                         "median_train_secs": rep.median([it["train_secs"] for it in its]),
                         "drain_secs": [r["drain_secs"] for r in runs], "saves": len(ms)}
    if ms:
        for f in ("request_secs", "copy_secs", "lazy_wait_secs", "backpressure_wait_secs", "eager_copy_secs"):
            s[f] = [m[f] for m in ms]
            s[f"median_{f}"] = rep.median(s[f])
        s["blocked_secs"] = [m["request_secs"] + m["lazy_wait_secs"] for m in ms]
        s["median_blocked_secs"] = rep.median(s["blocked_secs"])
        s["staged_bytes"], s["lazy_bytes"] = ms[0]["staged_bytes"], ms[0]["lazy_bytes"]
        s["first_save"] = [{k: r["metrics"][0][k] for k in ("request_secs", "copy_secs", "lazy_wait_secs",
                                                            "backpressure_wait_secs")}
                           for r in runs if r["metrics"]]
        s["first_iter_secs"] = [r["iters"][0]["iter_secs"] for r in runs]
        tier_ok = [t["ok"] for r in runs for m in r["metrics"] for t in m["tiers"].values()]
        s["tier_flushes"], s["tier_failures"] = len(tier_ok), tier_ok.count(False)
        flush = [t["flush_secs"] for m in ms for t in m["tiers"].values()]
        s["median_flush_secs"] = rep.median(flush) if flush else None
    return s


def measure_saves(cfg: GPTConfig, opts: argparse.Namespace, scratch: Path, ddir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    train_step(model, optim, synthetic_batch(cfg, opts.batch_size, 0))
    state = {"model": model, "optim": optim, "step": 0}
    gc.collect()
    gc.freeze()  # as benchmarks.training_stall: full collections scan only what the loop allocates
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    order_log, step = [], 1
    try:
        for r in range(opts.rounds):
            order = METHODS[r % 3:] + METHODS[:r % 3]
            order_log.append(list(order))
            for m in order:
                res = _loop(m, model, optim, state, cfg, opts, step, scratch / f"saves-{m.replace(' ', '-')}", ddir)
                step += opts.steps
                runs[m].append(res)
                its = [it["iter_secs"] for it in res["iters"][opts.warmup:]]
                req = [x["request_secs"] for x in res["metrics"][opts.warmup:]]
                print(f"  round {r}: {m:17s} iteration {1e3 * rep.median(its):6.0f} ms"
                      + (f", save() {1e3 * rep.median(req):6.2f} ms, first {1e3 * res['metrics'][0]['request_secs']:.0f}"
                         " ms" if req else ""), file=sys.stderr)
    finally:
        gc.unfreeze()
    return {"order": order_log, "runs": runs, "summary": {m: _summarize_saves(rs, opts.warmup) for m, rs in runs.items()}}


# -- goals and the report -----------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b != b or a != a or b <= 0 else a / b


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.training_stall import ratio_interval

    rec, sv = result["recovery"]["summary"], result["saves"]["summary"]
    speed = _ratio(rec["cold disk"]["median_restore_call_secs"], rec["daemon"]["median_restore_call_secs"])
    wall = _ratio(rec["cold disk"]["median_wall_secs"], rec["daemon"]["median_wall_secs"])
    spawn = _ratio(rec["cold disk"]["median_spawn_to_restored_secs"], rec["daemon"]["median_spawn_to_restored_secs"])
    out = [{"goal": f"recovery: daemon >= {GOAL_RECOVERY_SPEEDUP:g}x faster than cold local disk (`restore()`, "
                    "where the source is all that differs)", "value": speed, "unit": "x faster",
            "met": None if speed is None else speed >= GOAL_RECOVERY_SPEEDUP},
           {"goal": "context: the same with `Checkpointer()` (wall)", "value": wall, "unit": "x faster", "met": None},
           {"goal": "context: the same from spawning the process (interpreter, imports, model)", "value": spawn,
            "unit": "x faster", "met": None}]
    for field, what in (("request_secs", "save() blocked time (request_secs)"), ("iter_secs", "iteration time")):
        a = sv[DAEMON].get(field) or []
        b = sv[OWN].get(field) or []
        r = _ratio(rep.median(a) if a else None, rep.median(b) if b else None)
        out.append({"goal": f"{what}: daemon <= {GOAL_SAVE_RATIO:g}x own pool", "value": r, "unit": "x",
                    "met": None if r is None else r <= GOAL_SAVE_RATIO, "interval_90": ratio_interval(a, b)})
    exact = all(s["all_bit_exact"] for s in rec.values())
    out.append({"goal": "every restore bit-exact against the trainer's torch.save (check, not a speed goal)",
                "value": exact, "unit": "", "met": exact})
    return out


def _ms(x: float | None, digits: int = 1) -> str:
    return rep.fmt(None if x is None else 1e3 * x, digits)


def _mib(x: float | None) -> str:
    return rep.fmt(None if x is None else x / 2**20, 1)


def _goal_value(g: dict[str, Any]) -> str:
    if isinstance(g["value"], bool):
        return "yes" if g["value"] else "NO"
    iv = g.get("interval_90")
    return rep.fmt(g["value"], 2) + f" {g['unit']}".rstrip() + (f" (90% bootstrap {iv[0]:.2f}-{iv[1]:.2f})" if iv else "")


def _recovery_md(result: dict[str, Any]) -> str:
    rec, floor = result["recovery"], result["copy_floor"]
    rows = [[m, rep.fmt(s["median_wall_secs"], 3), f"{min(s['wall_secs']):.3f}-{max(s['wall_secs']):.3f}",
             rep.fmt(s["median_construct_secs"], 3), rep.fmt(s["median_restore_call_secs"], 3),
             rep.fmt(s["median_last_restore_secs"], 3), rep.fmt(s["median_spawn_to_restored_secs"], 1),
             ", ".join(map(str, s["sources"])), "yes" if s["all_bit_exact"] else "**NO**",
             rep.fmt(_ratio(s["median_wall_secs"], rec["summary"]["daemon"]["median_wall_secs"]), 1) + "x"]
            for m, s in rec["summary"].items()]
    for key, what in (("threads", f"{floor['threads']['torch_threads']} torch threads"), ("one_thread", "1 thread")):
        f = floor[key]
        rows.append([f"copy floor: `dst.copy_(src)`, {what} ({f['gb_per_sec']:.1f} GB/s)", rep.fmt(f["median_secs"], 4),
                     f"{min(f['secs']):.4f}-{max(f['secs']):.4f}", "—", "—", "—", "—", "—", "—",
                     rep.fmt(_ratio(f["median_secs"], rec["summary"]["daemon"]["median_wall_secs"]), 2) + "x"])
    head = ["restore of step " + str(rec["step"]), "wall s (median)", "min-max", "of which `Checkpointer()` s",
            "`restore()` s", "`last_restore[\"secs\"]` s",
            "spawn → restored s", "source", "bit-exact", "÷ daemon wall"]
    ev = [r["eviction"] for r in rec["runs"]["cold disk"]]
    res_before = [e["resident_bytes_before"] for e in ev if e["resident_bytes_before"] is not None]
    res_after = [e["resident_bytes_after"] for e in ev if e["resident_bytes_after"] is not None]
    cold = (f"Cold page cache: {'; '.join(ev[0]['methods'])}"
            + (f" ({ev[0]['drop_caches_note']})" if ev[0]["drop_caches_note"] else "")
            + (f". `fincore` found {_mib(max(res_before))} MiB of the step's {_mib(ev[0]['file_bytes'])} MiB "
               f"resident before eviction and at most {_mib(max(res_after))} MiB after" if res_after else "")
            + ".")
    return f"{rep.markdown_table(head, rows)}\n\n{cold}"


def _saves_md(result: dict[str, Any]) -> str:
    S = result["saves"]["summary"]
    base = S[BASE]["median_iter_secs"]
    rows = []
    for m in METHODS:
        s = S[m]
        first = s.get("first_save", [])
        rows.append([m, _ms(s.get("median_request_secs"), 2), _ms(s.get("median_lazy_wait_secs"), 2),
                     _ms(s.get("median_backpressure_wait_secs"), 2), _ms(s.get("median_copy_secs")),
                     ", ".join(_ms(f["request_secs"]) for f in first) or "—",
                     ", ".join(_ms(f["copy_secs"]) for f in first) or "—",
                     _ms(s["median_iter_secs"], 0), rep.fmt(_ratio(s["median_iter_secs"], base), 3) + "x",
                     s["saves"]])
    head = ["method", "save() blocked ms (`request_secs`)", "lazy wait in next step ms", "of which back-pressure ms",
            "lazy copy ms (`copy_secs`, background)", "first save: request ms (per round)",
            "first save: copy ms", "iteration ms (median)", "÷ no checkpointing", "saves in medians"]
    return rep.markdown_table(head, rows)


def _memory_md(result: dict[str, Any]) -> str:
    mem, snap = result["memory"], result["snapshot_bytes"]
    rows = [[p["when"], _mib(p["VmRSS"]), _mib(p.get("RssAnon")), _mib(p.get("RssShmem")), p["segments"],
             _mib(p["memory_used"]), rep.fmt(p["memory_used"] / snap if snap else None, 2),
             _mib(p["dir_allocated_bytes"]), _mib(p["shm_used_bytes"] - result["shm_used_before_bytes"])]
            for p in mem["points"]]
    head = ["when", "daemon VmRSS MiB", "RssAnon MiB", "RssShmem MiB", "segments", "`memory_used` MiB",
            "`memory_used` ÷ one snapshot", "its directory holds MiB", "/dev/shm used − before MiB"]
    o = mem["overhead"]
    return (f"{rep.markdown_table(head, rows)}\n\nA snapshot is {_mib(snap)} MiB ({snap} bytes: the state's "
            f"tensors {_mib(result['state_tensor_bytes'])} MiB plus RNG and small values). Overhead beyond the "
            f"snapshots with {o['segments_held']} held: daemon RSS {_mib(o['daemon_rss_bytes'])} MiB "
            f"(idle {_mib(o['daemon_rss_idle_bytes'])} MiB); `memory_used` − the sealed shards' bytes = "
            f"{o['memory_used_minus_snapshots_bytes']} bytes; directory allocation − `memory_used` = "
            f"{o['dir_minus_memory_used_bytes']} bytes. /dev/shm used: {_mib(result['shm_used_before_bytes'])} MiB "
            f"before the daemon started, {_mib(result['shm_used_after_bytes'])} MiB after it was killed and its "
            "directory removed (machine-wide: other processes' files count too).")


def render_markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["model"]
    verdict = {True: "met", False: "**not met**", None: "—"}
    goal_rows = [[g["goal"], _goal_value(g), verdict[g["met"]]] for g in result["goals"]]
    o = result["options"]
    return f"""# The snapshot daemon: recovery, save cost and memory

Generated by `{result['command']}` (git {result['git']}) in {result['elapsed_secs'] / 60:.1f} minutes.

Machine: {rep.describe_machine_md(m)} torch threads: {result['torch_threads']}. {result['allocator']} Load average
(1, 5, 15 min) at the start and at the end: {result['load_average_start_end'][0]} and
{result['load_average_start_end'][1]} on {m['usable_cores']} cores (the machine was shared with other work).

Model: GPT decoder ({c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, vocab {c['vocab_size']},
sequence {c['seq_len']}), {result['num_params'] / 1e6:.1f} M fp32 parameters, AdamW, batch {o['batch_size']} of
synthetic tokens; snapshot {result['snapshot_bytes'] / 1e6:.0f} MB. Daemon: budget
{result['daemon']['memory_budget'] / 2**30:.2f} GiB in `{SHM}`, keep-last 2, killed by its pid at the end.

## Goals

{rep.markdown_table(["goal", "value", "verdict"], goal_rows)}

## 1. Recovery after a trainer SIGKILL

A trainer process trained {TRAIN_STEPS} steps with `Checkpointer(root, daemon=DIR, disk_every={DISK_EVERY})`, waited
until step {result['recovery']['step']} was sealed in the daemon and committed on disk, wrote a `torch.save` of it
and was SIGKILLed. Each restore below is a fresh process (model built with another seed); **wall** = from before
`Checkpointer(...)` to after `restore(state, step)` returns; **spawn → restored** adds the interpreter, imports and
building the model. {o['restores']} restores each, daemon and cold disk alternating, warm disk after.

{_recovery_md(result)}

## 2. Save cost in the training loop

{o['steps']} iterations per run, saving every {o['save_every']}, {o['rounds']} round(s) in rotating order (a fresh
Checkpointer per run, `disk_every=0`, 2 pool slots); medians over iterations and saves after the first {o['warmup']}
of each run. *Blocked* is `request_secs` (the time `save()` took on the training thread); the lazy wait is the time
the next `optimizer.step()` waited for the background copy; the iteration includes both.

{_saves_md(result)}

## 3. Daemon memory

{_memory_md(result)}
"""


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, sv, floor = result["recovery"]["summary"], result["saves"]["summary"], result["copy_floor"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    panels = [
        ("recovery: Checkpointer() + restore (s)",
         {**{m: rec[m]["median_wall_secs"] for m in RECOVERY}, "copy floor": floor["threads"]["median_secs"]}),
        ("save() blocked, request_secs (ms)", {m: 1e3 * sv[m]["median_request_secs"] for m in (OWN, DAEMON)}),
        ("lazy copy, copy_secs (ms)", {m: 1e3 * sv[m]["median_copy_secs"] for m in (OWN, DAEMON)}),
        ("iteration (ms)", {m: 1e3 * sv[m]["median_iter_secs"] for m in METHODS}),
    ]
    for ax, (title, vals) in zip(axes, panels):
        bars = ax.bar(list(vals), list(vals.values()), color=[f"C{i}" for i in range(len(vals))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(f"Snapshot daemon, GPT {result['num_params'] / 1e6:.0f} M + AdamW "
                 f"({result['snapshot_bytes'] / 1e6:.0f} MB snapshot), CPU, medians", fontsize=11)
    rep.save_figure(fig, path, dpi=110)


# -- the run ------------------------------------------------------------------------------------------------------
def _memory_overhead(points: list[dict[str, Any]], snapshot_bytes: int) -> dict[str, Any]:
    held = max(points, key=lambda p: p["segments"])
    return {"segments_held": held["segments"], "at": held["when"], "daemon_rss_bytes": held["VmRSS"],
            "daemon_rss_idle_bytes": points[0]["VmRSS"],
            "daemon_rss_peak_bytes": max(p.get("VmHWM", 0) for p in points),
            "memory_used_minus_snapshots_bytes": held["memory_used"] - held["sealed_bytes"],
            "memory_used_over_snapshots": held["memory_used"] / held["sealed_bytes"] if held["sealed_bytes"] else None,
            "dir_minus_memory_used_bytes": held["dir_allocated_bytes"] - held["memory_used"]}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    from snapshot_daemon import client

    t_start = time.perf_counter()
    allocator = rep.set_allocator(opts.allocator)
    cfg = GPTConfig.for_params(opts.params_m, seq_len=opts.seq_len, vocab_size=opts.vocab_size)
    spec = {"model": asdict(cfg), "threads": opts.threads, "batch_size": opts.batch_size, "allocator": opts.allocator}
    est = cfg.num_params * 12 + (cfg.n_layer * 12 + 8) * 4 + (16 << 20)  # params + 2 AdamW moments + steps + slack
    budget = int(BUDGET_SEGMENTS * est) + (64 << 20)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-daemon-", dir=opts.dir))
    shm_parent = Path(tempfile.mkdtemp(prefix="ckpt-bench-daemon-", dir=SHM))
    ddir = shm_parent / "d"
    procs: list[subprocess.Popen] = []
    pid: int | None = None
    load_start, shm_before = rep.load_average(), shm_used_bytes()
    points: list[dict[str, Any]] = []
    try:
        doc = client.start(ddir, memory_budget=budget)
        pid = doc["pid"]
        print(f"daemon pid {pid} in {ddir}, budget {budget / 2**30:.2f} GiB; model {cfg}; scratch {scratch}",
              file=sys.stderr)
        points.append(daemon_memory(pid, ddir, "idle, just started"))
        recovery = measure_recovery(spec, scratch, ddir, pid, opts.restores, not opts.no_drop_caches, points, procs)
        snapshot_bytes = recovery["trainer"]["staged_bytes"]
        floor = copy_floor(snapshot_bytes, opts.copy_repeats, opts.threads)
        saves = measure_saves(cfg, opts, scratch, ddir)
        points.append(daemon_memory(pid, ddir, "after the save loops (their sealed steps orphaned)"))
        daemon_log = (ddir / "daemon.log").read_text(errors="replace").splitlines()[-20:]
    finally:
        for p in procs:
            _kill(p.pid)
        if pid is not None:
            _kill(pid)
        with contextlib.suppress(OSError, ValueError):  # a daemon that replaced ours, by its pid file
            _kill(int((ddir / "daemon.pid").read_text().strip() or 0))
        shutil.rmtree(shm_parent, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    n_params = cfg.num_params
    result = {
        "benchmark": "daemon", "command": rep.command_line(), "git": rep.git_revision(str(ROOT)),
        "unix_time": time.time(), "machine": rep.machine_info(opts.dir or tempfile.gettempdir()),
        "allocator": allocator, "torch_threads": opts.threads,
        "load_average_start_end": [load_start, rep.load_average()],
        "options": {k: v for k, v in vars(opts).items()}, "model": asdict(cfg), "num_params": n_params,
        "state_tensor_bytes": recovery["trainer"]["state_tensor_bytes"], "snapshot_bytes": snapshot_bytes,
        "daemon": {"pid": pid, "dir": str(ddir), "memory_budget": budget, "keep_last": doc.get("keep_last", 2),
                   "killed": pid is not None and not os.path.exists(f"/proc/{pid}"),
                   "dir_removed": not shm_parent.exists(), "log_tail": daemon_log},
        "shm_used_before_bytes": shm_before, "shm_used_after_bytes": shm_used_bytes(),
        "recovery": recovery, "copy_floor": floor, "saves": saves,
        "memory": {"points": points, "overhead": _memory_overhead(points, snapshot_bytes)},
    }
    result["goals"] = goals(result)
    result["elapsed_secs"] = time.perf_counter() - t_start
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.daemon", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items())
                         + " (explicit options still win)")
    ap.add_argument("--out", default="docs/benchmarks", help="where daemon.{json,md,png} go")
    ap.add_argument("--dir", default=None, help="scratch directory on the local disk to measure (default: /tmp)")
    ap.add_argument("--params-m", type=float, default=None, help="GPT size in millions of parameters (default 100, "
                                                                 "as benchmarks.training_stall)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the GPT and its synthetic tokens")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per iteration")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the trainer, restorers, loops)")
    ap.add_argument("--steps", type=int, default=None, help="iterations per save-cost run (default 40)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="first iterations and saves of each run left out of the medians (default 5)")
    ap.add_argument("--save-every", type=int, default=1, help="save every N iterations in the save-cost runs")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the three save-cost runs, in rotating order (default 2)")
    ap.add_argument("--restores", type=int, default=None, help="restores from each source (default 3)")
    ap.add_argument("--copy-repeats", type=int, default=None, help="timed copies for the copy floor (default 9)")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="evict only with POSIX_FADV_DONTNEED, do not write /proc/sys/vm/drop_caches")
    ap.add_argument("--allocator", choices=rep.ALLOCATORS, default="cached",
                    help="cached: glibc malloc keeps freed memory (as benchmarks.training_stall); glibc: as it comes")
    opts = ap.parse_args(argv)
    defaults = {"params_m": 100.0, "steps": 40, "warmup": 5, "rounds": 2, "restores": 3, "copy_repeats": 9}
    for k, v in (QUICK if opts.quick else defaults).items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.params_m <= 0 or min(opts.steps, opts.rounds, opts.restores, opts.copy_repeats, opts.save_every) < 1:
        ap.error("--params-m must be > 0 and --steps, --rounds, --restores, --copy-repeats, --save-every >= 1")
    if not 0 <= opts.warmup < opts.steps:
        ap.error(f"--warmup {opts.warmup}: expected 0 <= warmup < --steps ({opts.steps})")
    if not os.path.isdir(SHM):
        ap.error(f"{SHM} does not exist: the daemon keeps its segments there")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        result = run(opts)
    finally:
        torch.set_num_threads(threads)
    md = rep.write_outputs(opts.out, "daemon", result, render_markdown, plot)
    print(md)
    return result


if __name__ == "__main__":
    main()
