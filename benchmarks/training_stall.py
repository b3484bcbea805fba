"""Training stall of checkpointing a GPT-style model every 1, 5 and 10 iterations, side by side in one run.

Run ``python -m benchmarks.training_stall [--quick] [--iters N] [--params-m 100] [--threads 2]
[--out docs/benchmarks]``.
A decoder from ``benchmarks.gpt`` (about ``--params-m`` million parameters; ``--quick``: about 10 M) trains with
AdamW on synthetic tokens on the CPU (``--device cuda``: on the GPU). For each checkpoint interval every method runs once, in an order that
rotates from interval to interval: no checkpointing, ``ckpt.Checkpointer`` with the memory tier only and with
memory + disk, ``torch.save`` + fsync, DCP ``save``, and DCP ``async_save`` as it comes, with a clone first, and
with its process executor and a cached shared-memory stager.

A run: one untimed warm-up iteration that saves (plan caches, threads, a spawned process) and its drain; then
``REF_ITERS`` iterations without saving; then the timed iterations, saving every k (each save, the last one too,
followed by k - 1 that do not); then draining pending work, which counts in the end-to-end time. The run's reference is the median of its iterations without checkpointing
(those before the timed ones, and timed ones that neither save nor start while an earlier save's background
work still runs): the machine's speed during that very run, since benchmarks here share machines with other
work. Our host pool and DCP's cached stager are allocated once for the whole benchmark (as in a long training
run); what the first save costs is reported apart. A last probe times what kinds of background work (a copy of
the state, a GIL-holding loop, buffered and O_DIRECT writes) cost a training iteration, without any library.

``--allocator cached`` (the default) makes glibc ``malloc`` keep freed memory, as a GPU job's caching allocator
does: as it comes, each CPU iteration hands its temporaries back to the kernel and faults them in again (25 000 to
100 000 minor faults per iteration of the 100 M GPT on the 2-core VM), which scattered iteration times by +-100 ms
and buried stalls of a few milliseconds. ``--allocator glibc`` measures that setting.

Stall of one save = time of the iteration that saved (``save`` is called after ``optimizer.step()``) + waits it
causes before the next update in iterations that do not save themselves (our lazy-copy wait, DCP's staging
wait) - the reference. Waits for a previous save (our back-pressure, DCP's previous future) happen inside the
next saving iteration and count there. Not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch

from benchmarks import _report as rep
from benchmarks._stall_methods import (ASYNC_REFS, BASE, DCP, DCP_ASYNC, DCP_CLONE, DCP_PROC, GOAL_DISK_EVERY, ORDER,
                                       OURS_DISK, OURS_GOAL, OURS_MEM, SHARED, TORCH, Method, Ours, first_save_costs,
                                       interference_probe, leak_probe, methods_for, ours_phase_targets)
from benchmarks.gpt import GPT, GPTConfig, synthetic_batch, train_step

INTERVALS = (1, 5, 10)
METHOD_ALIASES = {"base": BASE, "ours-mem": OURS_MEM, "ours-disk": OURS_DISK, "ours-goal": OURS_GOAL,
                  "torch": TORCH, "dcp": DCP, "dcp-async": DCP_ASYNC, "dcp-clone": DCP_CLONE, "dcp-proc": DCP_PROC}
SAVES = {1: 8, 5: 6, 10: 6}  # timed saves per run by interval (medians over them); --iters or --saves override
REF_ITERS = 3
PROBE_ROUNDS = 3
GOAL_STALL_RATIO = 0.1
GOAL_E2E = 0.05


# -- the harness -------------------------------------------------------------------------------------------------
def first_timed_step(k: int) -> int:
    """Timed saves fall at timed iterations min(k // 2, 2), then every k: each is followed by iterations that do not
    save, and iterations before the first save sample the machine's speed."""
    return 2 * k - min(k // 2, 2)


def run_one(method: Method, model: GPT, optim: torch.optim.Optimizer, cfg: GPTConfig, batch_size: int, k: int,
            n_iters: int, workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    timer = rep.PhaseTimer(ours_phase_targets()) if isinstance(method, Ours) else None
    gc_timer = rep.GcTimer()

    def iteration(step: int, may_save: bool) -> dict[str, Any]:
        busy = method.busy()
        gc0 = gc_timer.secs
        f0 = rep.minor_faults()
        t0 = time.perf_counter()
        loss = train_step(model, optim, synthetic_batch(cfg, batch_size, step))
        t1 = time.perf_counter()
        saved = may_save and method.due(step)
        if saved:
            method.save(step)
        t2 = time.perf_counter()
        return {"step": step, "iter_secs": t2 - t0, "train_secs": t1 - t0, "save_call_secs": t2 - t1,
                "saved": saved, "background_busy": busy, "gc_secs": gc_timer.secs - gc0, "loss": loss,
                "minor_faults": rep.minor_faults() - f0}

    method.setup(model, optim, workdir)
    try:
        gc_timer.__enter__()
        t0 = time.perf_counter()
        iteration(k, True)  # untimed warm-up: plan caches, threads, DCP's spawned process
        method.drain()
        warmup_secs = time.perf_counter() - t0
        method.timed_start()
        ref = [iteration(k + 1 + i, False) for i in range(REF_ITERS)]
        if timer is not None:
            timer.__enter__()
        start = time.perf_counter()
        iters = [iteration(first_timed_step(k) + i, True) for i in range(n_iters)]
        t3 = time.perf_counter()
        method.drain()
        end = time.perf_counter()
    finally:
        gc_timer.__exit__()
        if timer is not None and timer._saved:
            timer.__exit__()
        method.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out = {"method": method.name, "how": method.how, "interval": k, "ref_iters": ref, "iters": iters,
           "drain_secs": end - t3,
           "wall_secs": end - start, "warmup_secs": warmup_secs, "details": method.details,
           "post_wait_secs": method.post_wait_secs, "gc_full_collections": gc_timer.full_collections}
    if timer is not None:
        out["phases"] = {n: {"thread_secs": timer.secs[n], "calls": timer.calls[n]} for n in timer.secs
                         if n not in timer.missing}
    return out


def clean_iters(iters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Timed iterations that neither save nor start while background work of an earlier save still runs: samples
    of the machine's speed during the run, taken between the saves."""
    return [it for it in iters if not it["saved"] and not it["background_busy"]]


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Stalls per save, the cost on iterations that do not save, and end-to-end overhead, against the run's
    reference: the median of its iterations without checkpointing (the ones just before the timed ones and the
    timed ones that ``clean_iters`` keeps), i.e. the machine's speed during this very run."""
    samples = run["ref_iters"] + clean_iters(run["iters"])
    ref = run["reference_secs"] = rep.median([it["iter_secs"] for it in samples])
    steps = {it["step"]: it for it in run["iters"]}
    stalls, posts, blocked = [], [], []
    for it in run["iters"]:
        if not it["saved"]:
            continue
        nxt = steps.get(it["step"] + 1)
        post = run["post_wait_secs"].get(it["step"], 0.0) if nxt is not None and not nxt["saved"] else 0.0
        stalls.append(it["iter_secs"] + post - ref)
        posts.append(post)
        blocked.append(it["save_call_secs"] + post)
    others = [it["iter_secs"] for it in run["iters"] if not it["saved"]]
    n = len(run["iters"])
    total = sum(it["iter_secs"] for it in run["iters"]) + run["drain_secs"]
    # What checkpointing caused: saving iterations, iterations that ran beside its background work, the drain. The
    # clean iterations' deviations from their own median are other work on the machine, left out.
    caused = run["drain_secs"] + sum(it["iter_secs"] - ref for it in run["iters"]
                                     if it["saved"] or it["background_busy"])
    s: dict[str, Any] = {
        "saves": len(stalls), "iters": n, "reference_secs": ref,
        "reference_samples": len(samples),
        "reference_spread_secs": [min(x["iter_secs"] for x in samples), max(x["iter_secs"] for x in samples)],
        "stall_secs": stalls, "median_stall_secs": rep.median(stalls) if stalls else None,
        "max_stall_secs": max(stalls, default=None), "median_post_wait_secs": rep.median(posts) if posts else None,
        "blocked_secs": blocked, "median_blocked_secs": rep.median(blocked) if blocked else None,
        "median_other_iter_secs": rep.median(others) if others else None,
        "interference_secs": rep.median(others) - ref if others else None,
        "busy_interference_secs": rep.median(busy) - ref if (busy := [it["iter_secs"] for it in run["iters"]
                                                                      if it["background_busy"] and not it["saved"]])
        else None,
        "total_secs": total, "e2e_overhead": total / (n * ref) - 1, "e2e_overhead_caused": caused / (n * ref),
        "busy_iters": sum(1 for it in run["iters"] if it["background_busy"] and not it["saved"]),
        "drain_secs": run["drain_secs"],
        "gc_secs_saving_iters": [it["gc_secs"] for it in run["iters"] if it["saved"]],
        "gc_secs_timed": sum(it["gc_secs"] for it in run["iters"]),
        "median_minor_faults_clean": rep.median([it.get("minor_faults", 0) for it in samples]),
        "median_minor_faults_saving": rep.median([it.get("minor_faults", 0) for it in run["iters"] if it["saved"]])
        if stalls else None,
    }
    if run["method"].startswith("ours"):
        ms = list(run["details"].values())
        for f in ("request_secs", "lazy_wait_secs", "backpressure_wait_secs", "copy_secs", "eager_copy_secs"):
            s[f"median_{f}"] = rep.median([m[f] for m in ms])
        s["staged_bytes"] = ms[0]["staged_bytes"] if ms else None
        s["lazy_bytes"] = ms[0]["lazy_bytes"] if ms else None
        flush = [t["flush_secs"] for m in ms for t in m["tiers"].values()]
        s["median_flush_secs"] = rep.median(flush) if flush else None
    elif run["details"]:
        keys = next(iter(run["details"].values())).keys()
        for f in keys:
            s[f"median_{f}"] = rep.median([d[f] for d in run["details"].values()])
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- goals and the report ----------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    """Stall ratio; a stall below the baseline median (noise) counts as zero."""
    if a is None or b is None or b <= 0:
        return None
    return max(a, 0.0) / b


def goals(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for k in summary:
        for ours in (OURS_MEM, OURS_DISK, OURS_GOAL):
            for ref in [r for r in ASYNC_REFS if r in summary[k]] if ours in summary[k] else ():
                r = _ratio(summary[k][ours]["median_stall_secs"], summary[k][ref]["median_stall_secs"])
                out.append({"goal": f"every {k}: {ours} stall <= {GOAL_STALL_RATIO:g} x {ref}", "value": r,
                            "met": None if r is None else r <= GOAL_STALL_RATIO, "unit": "x",
                            "interval_90": ratio_interval(summary[k][ours]["stall_secs"],
                                                          summary[k][ref]["stall_secs"])})
    k = str(GOAL_DISK_EVERY)
    for ours in [n for n in (OURS_DISK, OURS_GOAL) if n in summary[k]] if k in summary else ():
        for field, what in (("e2e_overhead", "wall"), ("e2e_overhead_caused", "caused by checkpointing")):
            e = summary[k][ours][field]
            out.append({"goal": f"{ours}, disk every {k}: end-to-end overhead ({what}) <= {GOAL_E2E:.0%}",
                        "value": e, "met": e <= GOAL_E2E, "unit": "%"})
    return out


def ratio_interval(ours: list[float], ref: list[float], resamples: int = 2000,
                   seed: int = 0) -> list[float] | None:
    """90% percentile-bootstrap interval of median(ours) ÷ median(ref), resampling each method's stalls apart
    (a stall below 0 counts as 0); ``None`` with fewer than 3 stalls on either side."""
    if len(ours) < 3 or len(ref) < 3:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        a = rep.median([rng.choice(ours) for _ in ours])
        b = rep.median([rng.choice(ref) for _ in ref])
        ratios.append(max(a, 0.0) / b if b > 0 else float("inf"))
    ratios.sort()
    cut = int(0.05 * resamples)
    return [ratios[cut], ratios[resamples - 1 - cut]]


def _ms(x: float | None) -> str:
    return rep.fmt(None if x is None else 1e3 * x, 0)


def _pct(x: float | None) -> str:
    return rep.fmt(None if x is None else 100 * x, 1, "%")


def _x(x: float | None) -> str:
    return "—" if x is None else ("0 (stall ≤ 0)" if x == 0 else f"{x:.2f}x" if x >= 0.01 else "<0.01x")


def _where_md(result: dict[str, Any]) -> str:
    """Where our stall and overhead come from, in this run's numbers (the tables below hold the detail)."""
    S, probe = result["summary"], result["interference"]["kinds"]
    lines = []
    for k, n in (("1", OURS_MEM), ("10", OURS_DISK), ("10", OURS_GOAL)):
        s, ph = S.get(k, {}).get(n), result["runs"].get(k, {}).get(n, {}).get("phases")
        if not s or not ph:
            continue
        per = max(s["saves"], 1)
        walk = ph["  flatten_state: state_dict() calls + one walk"]["thread_secs"] / per
        lines.append(
            f"- {n}, every {k}: median stall {_ms(s['median_stall_secs'])} ms; the save call takes "
            f"{_ms(s['median_request_secs'])} ms (of which {_ms(walk)} ms call the state_dict()s and walk "
            f"the state), lazy-copy waits {_ms(s['median_lazy_wait_secs'])} ms, back-pressure "
            f"{_ms(s['median_backpressure_wait_secs'])} ms; Python's garbage collector paused a saving iteration "
            f"for up to {_ms(max(s['gc_secs_saving_iters'], default=None))} ms; the background copy of "
            f"{s['lazy_bytes'] / 1e6:.0f} MB took {_ms(s['median_copy_secs'])} ms beside training"
            + (f"; {s['busy_iters']} iterations ran beside disk flushes ({rep.fmt(s['median_flush_secs'], 1)} s per "
               f"flush), {_ms(s['busy_interference_secs'])} ms slower each (median)" if s["busy_iters"] else "")
            + f"; end-to-end {_pct(s['e2e_overhead'])}.")
    kinds = list(probe)
    if len(kinds) >= 5:
        copy, gil, buffered, direct = (probe[kinds[i]] for i in (1, 2, 3, 4))
        lines.append(
            f"- Without a Checkpointer (last section): a copy of the state beside an iteration adds "
            f"{_ms(copy['added_secs'])} ms to it; a buffered write + fsync of the state adds "
            f"{_ms(buffered['added_secs'])} ms, the same bytes written with O_DIRECT {_ms(direct['added_secs'])} ms; "
            f"a thread holding the GIL for 250 ms adds {_ms(gil['added_secs'])} ms (training needs the GIL "
            "between every operator).")
    return "\n".join(lines)


def _failed_md(result: dict[str, Any]) -> str:
    lines = [f"- every {k}: {n} failed: `{e}`" for k, fs in result.get("failed", {}).items() for n, e in fs.items()]
    return ("Methods that failed in this run (left out of the tables):\n\n" + "\n".join(lines) + "\n\n") if lines else ""


def _dcp_first(f: dict[str, Any]) -> str:
    s = f.get("dcp_proc_staging_secs") or []
    if len(s) >= 2:
        return f"first process-executor save: staging {_ms(s[0])} ms, then {_ms(s[1])} ms"
    return f"its first process-executor saves failed here: {f.get('dcp_proc_error', 'not run')}"


def _faults(s: dict[str, Any]) -> str:
    clean, saving = s.get("median_minor_faults_clean"), s.get("median_minor_faults_saving")
    return "—" if clean is None else f"{clean:.0f}, " + ("—" if saving is None else f"{saving:.0f}")


def _bold(n: str) -> str:
    return f"**{n}**" if n.startswith("ours") else n


def render_markdown(result: dict[str, Any]) -> str:
    S = result["summary"]
    ks = list(S)
    names = [n for n in ORDER if any(n in S[k] for k in ks)]
    head = ["method"] + [f"every {k}: {c}" for k in ks for c in ("stall ms", "e2e")]
    rows = [[_bold(n)] + [x for k in ks for x in ((_ms(S[k][n]["median_stall_secs"]), _pct(S[k][n]["e2e_overhead"]))
                                                  if n in S[k] else ("—", "—"))] for n in names]
    ratio_head = ["stall ÷ DCP async_save stall"] + [f"every {k}: ÷ {r}" for k in ks
                                                     for r in ("as-is", "clone first", "process+shm")]
    ratio_rows = [[_bold(n)] + [_x(_ratio(S[k][n]["median_stall_secs"], S[k][r]["median_stall_secs"]))
                                if n in S[k] and r in S[k] else "—" for k in ks for r in ASYNC_REFS]
                  for n in names if n not in ASYNC_REFS and n != BASE]
    saves = [s["saves"] for k in ks for s in S[k].values() if s["saves"]]
    blocked_head = ["training thread blocked"] + [f"every {k}: {c}" for k in ks for c in ("ms", "÷ as-is")]
    blocked_rows = [[_bold(n)] + [x for k in ks for x in (
        (_ms(S[k][n]["median_blocked_secs"]),
         _x(_ratio(S[k][n]["median_blocked_secs"], S[k][ASYNC_REFS[0]]["median_blocked_secs"])))
        if n in S[k] and n != BASE and ASYNC_REFS[0] in S[k] else ("—", "—"))] for n in names if n != BASE]
    detail_head = ["every", "method", "reference ms (min-max, samples)", "saves", "stall ms (median, max)",
                   "wait before next update ms", "iterations beside background work: count, median − reference ms",
                   "drain s", "e2e (wall)", "e2e caused", "minor page faults per iteration: clean, saving"]
    detail = [[k, _bold(n), f"{_ms(s['reference_secs'])} ({_ms(s['reference_spread_secs'][0])}-"
                            f"{_ms(s['reference_spread_secs'][1])}, {s['reference_samples']})", s["saves"],
               f"{_ms(s['median_stall_secs'])}, {_ms(s['max_stall_secs'])}", _ms(s["median_post_wait_secs"]),
               f"{s['busy_iters']}, {_ms(s['busy_interference_secs'])}", rep.fmt(s["drain_secs"], 2),
               _pct(s["e2e_overhead"]),
               _pct(s["e2e_overhead_caused"]), _faults(s)]
              for k in ks for n in names if (s := S[k].get(n)) is not None]
    split_head = ["every", "method", "request ms", "back-pressure ms", "eager copy ms", "lazy wait ms",
                  "GC pauses in saving iterations ms (median, max)",
                  "lazy copy ms (background)", "flush s (background)", "staged MB", "lazy MB"]
    split = [[k, n, _ms(s["median_request_secs"]), _ms(s["median_backpressure_wait_secs"]),
              _ms(s["median_eager_copy_secs"]), _ms(s["median_lazy_wait_secs"]),
              f"{_ms(rep.median(s['gc_secs_saving_iters']))}, {_ms(max(s['gc_secs_saving_iters'], default=None))}",
              _ms(s["median_copy_secs"]),
              rep.fmt(s["median_flush_secs"], 2), rep.fmt(s["staged_bytes"] / 1e6, 0),
              rep.fmt(s["lazy_bytes"] / 1e6, 0)]
             for k in ks for n in (OURS_MEM, OURS_DISK, OURS_GOAL) if (s := S[k].get(n)) is not None]
    dcp_head = ["every", "method", "wait for previous ms", "get_state_dict ms", "clone ms", "async_save call ms",
                "staging wait before next update ms"]
    dcp_rows = [[k, n, _ms(s.get("median_previous_wait_secs")), _ms(s.get("median_state_dict_secs")),
                 _ms(s.get("median_clone_secs")), _ms(s.get("median_async_save_call_secs")),
                 _ms(s["median_post_wait_secs"])] for k in ks for n in ASYNC_REFS if (s := S[k].get(n))]
    probe = "\n".join(f"- {n}: the state was updated in place right after the call; the checkpoint holds "
                      f"{p['saved_value']:g} (the value at the call: {p['expected']:g}): "
                      f"**{'safe, CPU tensors are copied' if p['safe'] else 'UNSAFE on CPU, the update leaked in'}**."
                      for n, p in result["dcp_leak_probe"].items())
    how = "\n".join(f"- {n}: {h}" for n, h in result["methods"].items())
    verdict = {True: "met", False: "not met", None: "undefined: DCP's stall is not above 0 in this run"}
    goal_lines = "\n".join(
        f"- {g['goal']}: **{verdict[g['met']]}** ("
        + ("—" if g["value"] is None else _pct(g["value"]) if g["unit"] == "%" else _x(g["value"]))
        + (f"; 90% bootstrap interval over saves {_x(iv[0])} to {_x(iv[1])}" if (iv := g.get("interval_90")) else "")
        + ")"
        for g in result["goals"])
    m, c, f = result["machine"], result["model"], result["first_save"]
    every = ", ".join(ks[:-1]) + (" and " if len(ks) > 1 else "") + ks[-1]
    return f"""# Training stall: checkpointing a GPT every {every} iterations

Generated by `{result['command']}` (git {result['git']}) in {result['elapsed_secs'] / 60:.1f} minutes.

Machine: {rep.describe_machine_md(m)} torch threads: {result['torch_threads']} (training).
Allocator: {result.get('allocator', {}).get('note', 'glibc `malloc` as it comes.')} Load average (1, 5, 15
min) at the start and at the end: {result['load_average_start_end'][0]} and {result['load_average_start_end'][1]}
on {m['usable_cores']} cores (this benchmark alone accounts for about 2; more means other work shared the machine,
which the per-run references below absorb only partly).

Device: {result.get('device_name', 'CPU')}.

Model: GPT decoder ({c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, vocab {c['vocab_size']},
sequence {c['seq_len']}, untied LM head), {result['num_params'] / 1e6:.1f} M fp32 parameters, AdamW, batch
{result['batch_size']} of synthetic tokens. Checkpoint state (parameters + AdamW moments + steps):
{result['state_bytes'] / 1e6:.0f} MB. Timed iterations per run (by interval): {result['iters_per_interval']}, after
one untimed warm-up iteration that saves and {REF_ITERS} reference iterations that do not. One 1-rank gloo process
group serves every method (DCP's process executor needs one).

**Stall** of one save = the time of the iteration that saved + the waits it causes before the next update in
iterations that do not save themselves − the run's reference. The **reference** is the median of the run's
iterations without checkpointing: the {REF_ITERS} just before the timed ones, and the timed ones that neither save
nor start while an earlier save's background work still runs; it is the machine's speed during that very run (a
stall below 0 is noise). **e2e** = (timed iterations + draining pending saves at the end) ÷ (as many reference
iterations) − 1, wall clock. **e2e caused** counts only what checkpointing caused: the saving iterations and the
ones that ran beside background work, each minus the reference, plus the drain; the clean iterations' scatter
(other work on the machine) is left out. The *no checkpointing* row's e2e is that scatter alone.
**÷ async**: the stall divided by the DCP `async_save` stall at the same interval (as-is, clone first, process +
shared-memory stager); a negative stall counts as 0.

{rep.markdown_table(head, rows)}

{rep.markdown_table(ratio_head, ratio_rows)}

**Blocked** = the save call + the waits it causes before the next update (medians over saves): the part of the stall
that checkpointing code spends on the training thread, without the iteration's own scatter, which at
{min(saves)} to {max(saves)} saves per run dominates the stall above. Contention from background work is not in it: it shows in the iterations
beside background work and in e2e.

{rep.markdown_table(blocked_head, blocked_rows)}

Per run:

{rep.markdown_table(detail_head, detail)}

Ours, split from `cp.metrics` (medians over saves; the request includes back-pressure and eager copies):

{rep.markdown_table(split_head, split)}

The first save of a fresh Checkpointer (memory tier only) allocates and touches its pool slot:
request {_ms(f['request_secs'][0])} ms, second save {_ms(f['request_secs'][1])} ms, later saves
{_ms(f['request_secs'][2])} ms; DCP's cached stager pays the same once ({_dcp_first(f)}). Those costs are excluded
above.

DCP `async_save`, split (medians):

{rep.markdown_table(dcp_head, dcp_rows)}

Methods:

{how}

Does DCP `async_save` copy CPU tensors in this torch (checked in this run)?

{probe}

{_failed_md(result)}Goals (reported, not asserted):

{goal_lines}

## Where our stall and overhead come from

{_where_md(result)}
{_phases_md(result)}
## What background work costs training on this machine

No Checkpointer involved (the copy is its bare copy routine): each kind of work runs in a thread started with a training iteration
(interleaved, {result['interference']['rounds']} rounds of 2 iterations each). "Added" is the median iteration
minus the median iteration with nothing in the background; "alone" is the work's own time with training idle.

{_interference_md(result['interference'])}
"""


def _interference_md(p: dict[str, Any]) -> str:
    rows = [[n, _ms(v["median_iter_secs"]), _ms(v["added_secs"]) if v["alone_secs"] is not None else "—",
             _ms(v["alone_secs"]), _ms(v["concurrent_secs"]),
             rep.fmt(v["added_secs"] / v["alone_secs"], 2) if v["alone_secs"] else "—"]
            for n, v in p["kinds"].items()]
    return rep.markdown_table(["background work", "iteration ms", "added ms", "alone ms", "during training ms",
                               "added ÷ alone"], rows)


def _phases_md(result: dict[str, Any]) -> str:
    parts = []
    for k in result["summary"]:
        for n in (OURS_MEM, OURS_DISK, OURS_GOAL):
            run = result["runs"][k].get(n)
            if not run or "phases" not in run:
                continue
            saves = max(result["summary"][k][n]["saves"], 1)
            rows = [[p, rep.fmt(1e3 * v["thread_secs"] / saves, 1), v["calls"]] for p, v in run["phases"].items()]
            parts.append(f"**{n}, every {k}** ({saves} saves)\n\n"
                         + rep.markdown_table(["phase", "ms per save (thread time)", "calls"], rows))
    return ("\n## Where our time goes\n\nFunctions of `ckpt` timed in place during the timed iterations (summed per "
            "thread, divided by the number of saves; background phases run concurrently with training).\n\n"
            + "\n\n".join(parts) + "\n") if parts else ""


def plot(result: dict[str, Any], path: str) -> None:
    panels, hlines, markers = [], [], []
    for k in [k for k in result["runs"] if k in ("1", "5")] or list(result["runs"])[:2]:
        runs = result["runs"][k]
        series = {n: (list(range(len(runs[n]["iters"]))), [it["iter_secs"] for it in runs[n]["iters"]])
                  for n in ORDER if n in runs}
        markers.append({n: [i for i, it in enumerate(runs[n]["iters"]) if it["saved"]] for n in runs})
        panels.append((f"checkpoint every {k} iteration{'s' if k != '1' else ''} (dots: iterations that save)", series))
        hlines.append({"median reference": rep.median([r["reference_secs"] for r in runs.values()])})
    rep.line_plot_panels(path, f"Iteration time, GPT {result['num_params'] / 1e6:.0f} M + AdamW on "
                               f"{result.get('device_name', 'CPU')}, "
                               f"{result['torch_threads']} torch threads", panels, "timed iteration",
                         "seconds (log scale)", hlines, markers)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.training_stall", description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=100.0, help="model size in millions of parameters (100)")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed iterations per run at every interval (default: enough for --saves)")
    ap.add_argument("--saves", type=int, default=None,
                    help=f"timed saves per run (sets --iters by interval; default by interval: {SAVES})")
    ap.add_argument("--intervals", default=",".join(map(str, INTERVALS)),
                    help="checkpoint intervals to run, comma-separated (default 1,5,10)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per iteration (default 1)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--out", default="docs/benchmarks", help="where training_stall.{json,md,png} go")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: /tmp)")
    ap.add_argument("--quick", action="store_true", help="smoke run: about 10 M parameters")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model trains (default cpu); cuda: snapshots copy device-to-host into pinned memory")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of " + ", ".join(METHOD_ALIASES) + " (default: all)")
    ap.add_argument("--allocator", choices=rep.ALLOCATORS, default="cached",
                    help="cached (default): glibc malloc keeps freed memory, as a GPU caching allocator does; glibc: "
                         "as it comes, so every iteration faults its temporaries in again (see benchmarks/_report.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.params_m = 10.0
    if args.params_m <= 0 or (args.iters is not None and args.iters < 2) or (args.saves is not None and args.saves < 1):
        ap.error("--params-m must be > 0, --iters >= 2 and --saves >= 1")
    try:
        intervals = tuple(int(x) for x in args.intervals.split(","))
    except ValueError:
        intervals = ()
    chosen = set(METHOD_ALIASES.values())
    if args.methods is not None:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHOD_ALIASES]
        if not wanted or unknown:
            ap.error(f"--methods {args.methods!r}: unknown {unknown}; choose from {', '.join(METHOD_ALIASES)}")
        chosen = {METHOD_ALIASES[m] for m in wanted}
    if not intervals or any(k < 1 for k in intervals):
        ap.error(f"--intervals {args.intervals!r}: expected positive integers separated by commas, e.g. 1,5,10")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # DCP's background process: overwrite notices
    import torch.distributed as dist

    t_start = time.perf_counter()
    allocator = rep.set_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    def iters_for(k: int) -> int:  # at least a save and one iteration after it
        if args.iters is not None and args.saves is None:
            return max(args.iters, min(k // 2, 2) + 2)
        # Every save, the last one too, is followed by k - 1 iterations that do not save: the window is whole
        # intervals, as in a long run, so a flush shorter than an interval does not land in the final drain.
        return min(k // 2, 2) + (args.saves or SAVES.get(k, 6)) * k

    iters = {k: iters_for(k) for k in intervals}
    base_dir = tempfile.mkdtemp(prefix="ckpt-stall-", dir=args.dir)
    load_start = rep.load_average()
    cfg = GPTConfig.for_params(args.params_m, seq_len=args.seq_len)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    SHARED.cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if SHARED.cuda else "CPU"
    model = GPT(cfg).to(args.device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optim, synthetic_batch(cfg, args.batch_size, 0))  # creates the AdamW state
    # As long training jobs do (TorchTitan's GarbageCollection, Python's gc docs): after set-up, move every object
    # into the permanent generation, so full collections scan only what the loop allocates. Same for every method.
    gc.collect()
    gc.freeze()
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
        v.numel() * v.element_size() for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    print(f"model {cfg}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, state {nbytes / 1e6:.0f} MB;"
          f" scratch {base_dir}", file=sys.stderr)
    runs: dict[str, dict[str, Any]] = {}
    summary: dict[str, dict[str, Any]] = {}
    howto: dict[str, str] = {}
    failed: dict[str, dict[str, str]] = {}
    try:
        first = first_save_costs(model, optim, cfg, args.batch_size, os.path.join(base_dir, "first"))
        for gi, k in enumerate(intervals):
            ms = [m for m in [Method(k)] + methods_for(k) if m.name in chosen]
            ms = ms[gi * 3 % len(ms):] + ms[: gi * 3 % len(ms)]
            runs[str(k)], summary[str(k)] = {}, {}
            for m in ms:
                howto.setdefault(m.name, m.how)
                try:
                    r = run_one(m, model, optim, cfg, args.batch_size, k, iters[k], os.path.join(base_dir, "run"))
                except Exception as e:  # noqa: BLE001 - reported; the other methods still run
                    failed.setdefault(str(k), {})[m.name] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  every {k:2d}: {m.name:45s} FAILED: {failed[str(k)][m.name]}", file=sys.stderr)
                    continue
                runs[str(k)][m.name] = r
                s = summary[str(k)][m.name] = summarize(r)
                print(f"  every {k:2d}: {m.name:45s} reference {_ms(s['reference_secs']):>5s} ms  stall "
                      f"{_ms(s['median_stall_secs']):>6s} ms  e2e {_pct(s['e2e_overhead']):>7s} "
                      f"({_pct(s['e2e_overhead_caused'])} caused; {r['wall_secs']:.1f} s)", file=sys.stderr)
        probe = leak_probe()
        interference = interference_probe(model, optim, cfg, args.batch_size, PROBE_ROUNDS,
                                          os.path.join(base_dir, "probe"))
    finally:
        SHARED.close()
        shutil.rmtree(base_dir, ignore_errors=True)
    result = {
        "benchmark": "training_stall", "command": rep.command_line(), "git": rep.git_revision(os.getcwd()),
        "unix_time": time.time(), "machine": rep.machine_info(args.dir or tempfile.gettempdir()),
        "allocator": {"mode": args.allocator, "note": allocator},
        "device": args.device, "device_name": device_name,
        "torch_threads": torch.get_num_threads(), "load_average_start_end": [load_start, rep.load_average()],
        "model": asdict(cfg), "num_params": sum(p.numel() for p in model.parameters()), "batch_size": args.batch_size,
        "state_bytes": nbytes, "iters_per_interval": iters, "reference_iters": REF_ITERS, "first_save": first,
        "methods": {n: howto[n] for n in ORDER if n in howto}, "dcp_leak_probe": probe,
        "interference": interference,
        "summary": summary, "runs": runs, "failed": failed,
    }
    result["goals"] = goals(summary)
    result["elapsed_secs"] = time.perf_counter() - t_start
    md = rep.write_outputs(args.out, "training_stall", result, render_markdown, plot)
    print(md)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
