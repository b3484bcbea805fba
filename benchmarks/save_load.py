"""Save and load throughput to local disk, side by side: ckpt vs torch.save, DCP and raw write+fsync/readinto.

Run ``python -m benchmarks.save_load [--size-gib 1] [--repeats 3] [--out docs/benchmarks] [--dir /tmp/x]``
(``--quick``: 0.1 GiB, 1 repeat). Every method saves the same transformer-shaped fp32 state dict into a fresh
directory and loads it back; the page cache is dropped between save and load (``--cache``; where the kernel
refuses, the files are evicted with ``POSIX_FADV_DONTNEED``), so loads are cold reads from disk. Methods run
interleaved within each repeat (their order rotates), and ratios are taken per repeat before the median, so slow
drift of a shared machine affects every method alike.

Not a test: it asserts nothing about timings. It does check that every method loaded the bytes it saved.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from benchmarks import _report as rep

HIDDEN = 4096
INTERMEDIATE = 11008
VOCAB = 32000
GOAL_RAW_RATIO = 0.9
RAW_THREADS = 2  # = ckpt's default files_per_rank, so the threaded raw line is ckpt's ceiling


# -- the state ---------------------------------------------------------------------------------------------------
def transformer_shapes(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Llama-7B-shaped fp32 tensors adding up to at most ``total_bytes`` (within one embedding row).

    An embedding (a vocabulary shard when the budget is small), then whole decoder layers in order (norms,
    4096x4096 attention projections, 11008x4096 MLP projections) while they fit, then the final norm and an LM
    head shard whose row count fills the remainder.
    """
    es = 4
    row = HIDDEN * es
    shapes: dict[str, tuple[int, ...]] = {}
    left = total_bytes
    emb_rows = max(1, min(VOCAB, left // 2 // row))
    shapes["model.embed_tokens.weight"] = (emb_rows, HIDDEN)
    left -= emb_rows * row
    layer = [("input_layernorm.weight", (HIDDEN,))] + [
        (f"self_attn.{p}_proj.weight", (HIDDEN, HIDDEN)) for p in "qkvo"
    ] + [("post_attention_layernorm.weight", (HIDDEN,)), ("mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
         ("mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)), ("mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    i, full = 0, False
    while not full:
        for name, shape in layer:
            n = es * math.prod(shape)
            if n > left - HIDDEN * es:  # keep room for the final norm
                full = True
                break
            shapes[f"model.layers.{i}.{name}"] = shape
            left -= n
        i += 1
    shapes["model.norm.weight"] = (HIDDEN,)
    left -= HIDDEN * es
    head_rows = min(VOCAB, left // row)
    if head_rows > 0:
        shapes["lm_head.weight"] = (head_rows, HIDDEN)
    return shapes


def make_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- the methods -------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One way to save ``state`` into a directory and load it back.

    ``save`` returns extra timed parts (e.g. ``{"fsync_secs": ...}``); ``load`` returns the loaded dict (the
    destination itself for in-place loads).
    """

    name: str
    save: Callable[[dict[str, torch.Tensor], str], dict[str, float]]
    load: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    fsyncs: str
    load_note: str
    in_place: bool


def _raw_save(state: dict[str, torch.Tensor], d: str, name: str = "raw.bin") -> dict[str, float]:
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for t in state.values():
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return {"write_secs": t1 - t0, "fsync_secs": t2 - t1}


def _raw_load(dest: dict[str, torch.Tensor], d: str, name: str = "raw.bin") -> dict[str, torch.Tensor]:
    with open(os.path.join(d, name), "rb", buffering=0) as f:
        for t in dest.values():
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise EOFError(f"{d}/{name} is shorter than the state")
                done += n
    return dest


def _split(state: dict[str, torch.Tensor], n: int) -> list[list[str]]:
    """Keys in ``n`` groups of similar byte counts, largest first (as ckpt's writer spreads its files)."""
    groups: list[list[str]] = [[] for _ in range(n)]
    loads = [0] * n
    for k in sorted(state, key=lambda k: -state[k].numel()):
        g = loads.index(min(loads))
        groups[g].append(k)
        loads[g] += state[k].numel()
    return [g for g in groups if g]


def _raw_save_threads(state: dict[str, torch.Tensor], d: str) -> dict[str, float]:
    groups = _split(state, RAW_THREADS)
    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(lambda ig: _raw_save({k: state[k] for k in ig[1]}, d, f"raw-{ig[0]}.bin"), enumerate(groups)))
    return {}


def _raw_load_threads(dest: dict[str, torch.Tensor], d: str) -> dict[str, torch.Tensor]:
    groups = _split(dest, RAW_THREADS)
    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(lambda ig: _raw_load({k: dest[k] for k in ig[1]}, d, f"raw-{ig[0]}.bin"), enumerate(groups)))
    return dest


def _ckpt_save(state: dict[str, torch.Tensor], d: str) -> dict[str, float]:
    import ckpt

    ckpt.save(state, d)
    return {}


def _ckpt_load(dest: dict[str, torch.Tensor], d: str) -> dict[str, torch.Tensor]:
    import ckpt

    ckpt.load(dest, d)
    return dest


def _torch_save(state: dict[str, torch.Tensor], d: str) -> dict[str, float]:
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "state.pt")
    t0 = time.perf_counter()
    torch.save(state, path)
    t1 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)  # torch.save does not fsync: the fair line adds it
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"save_no_fsync_secs": t1 - t0, "fsync_secs": time.perf_counter() - t1}


def _torch_load(dest: dict[str, torch.Tensor], d: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(d, "state.pt"), weights_only=True, mmap=False)


def _dcp_save(threads: int) -> Callable[[dict[str, torch.Tensor], str], dict[str, float]]:
    def save(state: dict[str, torch.Tensor], d: str) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(d, thread_count=threads)  # sync_files=True by default: fsyncs
        dcp.save(state, storage_writer=writer)
        return {}

    return save


def _dcp_load(dest: dict[str, torch.Tensor], d: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    dcp.load(dest, checkpoint_id=d)
    return dest


METHODS: list[Method] = [
    Method("raw write+fsync / readinto", _raw_save, _raw_load, "yes (one file)", "readinto, in place", True),
    Method(f"raw, {RAW_THREADS} files x {RAW_THREADS} threads", _raw_save_threads, _raw_load_threads,
           "yes (each file)", "readinto, in place", True),
    Method("ckpt", _ckpt_save, _ckpt_load, "yes (data files, manifest, dir)", "in place", True),
    Method("torch.save + fsync / torch.load", _torch_save, _torch_load, "added by the benchmark",
           "allocates a new state", False),
    Method("DCP (1 thread)", _dcp_save(1), _dcp_load, "yes (sync_files=True)", "in place", True),
    Method("DCP (2 threads)", _dcp_save(2), _dcp_load, "yes (sync_files=True)", "in place", True),
]
RAW, RAW_MT, OURS, TORCH, DCP, DCP2 = (m.name for m in METHODS)
TORCH_NO_FSYNC = "torch.save (no fsync)"


# -- one run -----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    save_secs: float
    load_cold_secs: float
    load_warm_secs: float
    save_rss_growth_bytes: int
    load_rss_growth_bytes: int
    load_rss_retained_bytes: int
    parts: dict[str, float] = field(default_factory=dict)


def _fresh(dest: dict[str, torch.Tensor]) -> None:
    for t in dest.values():
        t.zero_()


def run_one(m: Method, state: dict[str, torch.Tensor], dest: dict[str, torch.Tensor], d: str,
            cache: rep.CacheControl, verify: bool) -> Sample:
    """Save, evict ``d`` from the page cache, load cold, load again warm; verify on request; delete ``d``."""
    cache.make_cold()
    with rep.PeakRss() as save_mem:
        save_secs, parts = rep.timed(m.save, state, d)
    cache.make_cold([d])
    _fresh(dest)
    with rep.PeakRss() as load_mem:
        cold_secs, out = rep.timed(m.load, dest, d)
    if verify:
        if set(out) != set(state):
            raise RuntimeError(f"{m.name}: loaded keys {sorted(set(out) ^ set(state))[:5]} differ from the saved ones")
        bad = [k for k, t in state.items() if not torch.equal(out[k], t)]
        if bad:
            raise RuntimeError(f"{m.name}: loaded state differs from the saved one at {bad[:5]}")
    del out
    warm_secs, out = rep.timed(m.load, dest, d)
    del out
    shutil.rmtree(d)
    return Sample(save_secs, cold_secs, warm_secs, save_mem.growth_bytes, load_mem.growth_bytes,
                  load_mem.retained_bytes, parts)


# -- where ckpt spends its time ----------------------------------------------------------------------------------
def ckpt_phases(state: dict[str, torch.Tensor], dest: dict[str, torch.Tensor], base: str, cache: rep.CacheControl,
                repeats: int) -> dict[str, Any]:
    """Instrumented ckpt saves and cold loads: median thread-seconds per phase, and median wall seconds.

    Run after the timed repeats (the wrappers cost about a microsecond per call, negligible next to I/O).
    """
    import ckpt.loading as L
    import ckpt.saving as S
    import formats.checksum as C
    import formats.reader as R
    import formats.storage.local as LS
    import formats.writer as W
    from formats.reader import read_manifest
    from formats.storage import open_storage

    save_targets = {
        "plan (local + global)": (S, "plan_save"),
        "describe local state": (S, "describe"),
        "global write plan": (S, "plan_global_writes"),
        "encode (contiguous + checksum)": (W, "_encode"),
        "checksum xxh3 (block_digests)": (C, "block_digests"),
        "storage.write (writev + fsync)": (LS.LocalStorage, "write"),
        "writev": (LS, "_writev_all"),
        "fsync (all)": (os, "fsync"),
        "build manifest": (S, "build_manifest"),
        "commit manifest": (LS.LocalStorage, "commit"),
    }
    load_targets = {
        "read manifest": (L, "read_manifest"),
        "resolve/flatten/layouts": (L, "tensor_layout"),
        "check compatible": (L, "check_compatible"),
        "plan reads": (L, "plan_reads"),
        "read_region (total)": (R.ChunkReader, "read_region"),
        "check file size": (R.ChunkReader, "check_file"),
        "storage.readinto (pread)": (LS.LocalStorage, "readinto"),
        "verify xxh3": (R.ChunkReader, "_verify"),
    }
    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        d = os.path.join(base, f"phases-ckpt-{r}")
        cache.make_cold()
        with rep.PhaseTimer(save_targets) as st:
            save_wall, _ = rep.timed(_ckpt_save, state, d)
        cache.make_cold([d])
        with rep.PhaseTimer(load_targets) as lt:
            load_wall, _ = rep.timed(_ckpt_load, dest, d)
        if r == 0:
            man = read_manifest(open_storage(d))
            n_chunks = sum(len(e.chunks) for e in man.tensors.values())
            files = {p: f.size_bytes for p, f in man.files.items()}
        shutil.rmtree(d)
        runs.append({"save_wall": save_wall, "load_wall": load_wall, "save": dict(st.secs), "load": dict(lt.secs),
                     "save_calls": dict(st.calls), "load_calls": dict(lt.calls), "missing": st.missing + lt.missing})
    med = lambda what, k: rep.median([x[what][k] for x in runs])  # noqa: E731
    return {
        "repeats": repeats,
        "save_wall_secs": rep.median([x["save_wall"] for x in runs]),
        "load_wall_secs": rep.median([x["load_wall"] for x in runs]),
        "save_phase_thread_secs": {k: med("save", k) for k in save_targets},
        "save_phase_calls": runs[0]["save_calls"],
        "load_phase_thread_secs": {k: med("load", k) for k in load_targets},
        "load_phase_calls": runs[0]["load_calls"],
        "chunks": n_chunks, "data_files": files, "phases_not_found": runs[0]["missing"],
    }


# -- report ------------------------------------------------------------------------------------------------------
def summarize(samples: dict[str, list[Sample]], nbytes: int) -> dict[str, dict[str, Any]]:
    """Medians of throughputs and of per-repeat ratios (each ratio uses the two runs of the same repeat)."""
    gb = nbytes / rep.GB
    rows: dict[str, dict[str, Any]] = {}

    def speeds(secs: list[float]) -> list[float]:
        return [gb / x for x in secs]

    def ratio(secs: list[float], ref: str, attr: str) -> float:
        return rep.median([b / a for a, b in zip(secs, [getattr(s, attr) for s in samples[ref]])])

    for name, ss in samples.items():
        save, cold, warm = ([getattr(s, a) for s in ss] for a in ("save_secs", "load_cold_secs", "load_warm_secs"))
        rows[name] = {
            "save_gbps": rep.median(speeds(save)), "load_cold_gbps": rep.median(speeds(cold)),
            "load_warm_gbps": rep.median(speeds(warm)),
            "save_secs": save, "load_cold_secs": cold, "load_warm_secs": warm,
            "save_vs_raw": ratio(save, RAW, "save_secs"), "load_vs_raw": ratio(cold, RAW, "load_cold_secs"),
            "save_vs_raw_mt": ratio(save, RAW_MT, "save_secs"), "load_vs_raw_mt": ratio(cold, RAW_MT, "load_cold_secs"),
            "save_vs_dcp": ratio(save, DCP, "save_secs"), "load_vs_dcp": ratio(cold, DCP, "load_cold_secs"),
            "save_vs_dcp2": ratio(save, DCP2, "save_secs"), "load_vs_dcp2": ratio(cold, DCP2, "load_cold_secs"),
            "warm_load_vs_raw": ratio(warm, RAW, "load_warm_secs"),
            "save_rss_growth_mib": rep.median([s.save_rss_growth_bytes for s in ss]) / 2**20,
            "load_rss_growth_mib": rep.median([s.load_rss_growth_bytes for s in ss]) / 2**20,
            "load_rss_retained_mib": rep.median([s.load_rss_retained_bytes for s in ss]) / 2**20,
            "parts_secs": {k: [s.parts[k] for s in ss] for k in (ss[0].parts if ss else {})},
        }
    # torch.save without the fsync: the same runs, timed before the benchmark's fsync.
    no_sync = [s.parts["save_no_fsync_secs"] for s in samples[TORCH]]
    rows[TORCH_NO_FSYNC] = {
        "save_gbps": rep.median(speeds(no_sync)), "save_secs": no_sync,
        "save_vs_raw": ratio(no_sync, RAW, "save_secs"), "save_vs_raw_mt": ratio(no_sync, RAW_MT, "save_secs"),
        "save_vs_dcp": ratio(no_sync, DCP, "save_secs"),
    }
    return rows


def goals(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's goals, measured (reported, never asserted)."""
    o = rows[OURS]
    out = {
        "ckpt save >= 0.9x raw write+fsync (1 file)": (o["save_vs_raw"], GOAL_RAW_RATIO),
        "ckpt load >= 0.9x raw readinto (1 file)": (o["load_vs_raw"], GOAL_RAW_RATIO),
        f"ckpt save >= 0.9x raw ({RAW_THREADS} threads)": (o["save_vs_raw_mt"], GOAL_RAW_RATIO),
        f"ckpt load >= 0.9x raw ({RAW_THREADS} threads)": (o["load_vs_raw_mt"], GOAL_RAW_RATIO),
        "ckpt save faster than DCP (1 thread)": (o["save_vs_dcp"], 1.0),
        "ckpt load faster than DCP": (o["load_vs_dcp"], 1.0),
        "ckpt save faster than DCP (2 threads)": (o["save_vs_dcp2"], 1.0),
        "ckpt load faster than DCP (2-thread checkpoint)": (o["load_vs_dcp2"], 1.0),
    }
    return {k: {"value": v, "goal": g, "met": v >= g if g < 1.0 else v > g} for k, (v, g) in out.items()}


def _row_order() -> list[str]:
    names = [m.name for m in METHODS]
    return names[: names.index(TORCH) + 1] + [TORCH_NO_FSYNC] + names[names.index(TORCH) + 1 :]


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["results"]
    kind = "cold" if result["cache_mode"] != "warm" else "warm"
    x = lambda v: rep.fmt(v, 2, "x")  # noqa: E731
    table = rep.markdown_table(
        ["method", "save GB/s", f"load GB/s ({kind})", "save / raw", "load / raw", f"save / raw{RAW_THREADS}t",
         f"load / raw{RAW_THREADS}t", "save / DCP", "load / DCP", "warm load GB/s", "load peak RSS growth"],
        [[f"**{n}**" if n == OURS else n, rep.fmt(r.get("save_gbps")), rep.fmt(r.get("load_cold_gbps")),
          x(r.get("save_vs_raw")), x(r.get("load_vs_raw")), x(r.get("save_vs_raw_mt")), x(r.get("load_vs_raw_mt")),
          x(r.get("save_vs_dcp")), x(r.get("load_vs_dcp")), rep.fmt(r.get("load_warm_gbps")),
          rep.fmt(r.get("load_rss_growth_mib"), 0, " MiB")] for n in _row_order() for r in [rows[n]]],
    )
    spread = lambda v: " ".join(f"{t:.3f}" for t in v) if v else "—"  # noqa: E731
    methods = rep.markdown_table(
        ["method", "fsync on save", "load", "save s, each repeat", f"{kind} load s, each repeat"],
        [[n, m["fsync"], m["load"], spread(rows[n]["save_secs"]), spread(rows[n]["load_cold_secs"])]
         for n, m in result["methods"].items()]
        + [[TORCH_NO_FSYNC, "no", "—", spread(rows[TORCH_NO_FSYNC]["save_secs"]), "—"]])
    goal_lines = "\n".join(f"- {k}: **{'met' if v['met'] else 'not met'}** ({v['value']:.2f}x)"
                           for k, v in result["goals"].items())
    cache = rep.CacheControl(result["cache_mode"], result["cache_note"]).describe_md()
    raw_parts = rows[RAW]["parts_secs"]
    load_avg = ("Load average (1, 5, 15 min) at the start and at the end: "
                + " and ".join(str(x) for x in result["load_average_start_end"])
                + f" on {result['machine']['usable_cores']} cores; this benchmark alone accounts for about 1-2, more means other work shared the machine.")
    state_par = " ".join([
        f"State: {result['num_tensors']} fp32 tensors with Llama-7B shapes (embedding, 4096x4096 attention,",
        f"11008x4096 MLP, norms, LM head shard), {result['state_bytes'] / rep.GIB:.3f} GiB.",
        f"GB/s are 10^9 bytes of tensor data per second, medians of {result['repeats']} repeat(s) after",
        f"{result['warmup_rounds']} untimed warm-up round(s); a ratio is the median of per-repeat ratios (both runs",
        "of a ratio come from the same repeat; above 1x means faster than the reference).",
        "Methods run interleaved, their order rotating from repeat to repeat, each into a fresh directory deleted",
        f"afterwards. {cache} Every method's loaded state was checked equal to the saved one.",
    ])
    notes = "\n".join([
        f"- ckpt runs with its defaults: {result['ckpt_defaults']}; one process, no process group.",
        "- raw: `os.write` of every tensor's bytes into one file, then `fsync` (median "
        f"{rep.median(raw_parts['write_secs']):.3f} s writing into the page cache + "
        f"{rep.median(raw_parts['fsync_secs']):.3f} s fsync); load: `readinto` the preallocated tensors. The "
        f"{RAW_THREADS}-thread raw line does the same with {RAW_THREADS} files in {RAW_THREADS} threads, as ckpt "
        f"writes {RAW_THREADS} files per rank by default: the ceiling for ckpt's I/O pattern.",
        "- DCP: `torch.distributed.checkpoint.save/load` in one process without a process group, "
        "`FileSystemWriter(thread_count=1 or 2)` with its default `sync_files=True`; the load ratio to DCP uses the "
        "1-thread checkpoint.",
        "- `torch.save` does not fsync; its fair line adds an fsync of the file after it returns, and the no-fsync "
        "line is the time before that fsync in the same runs. `torch.load(weights_only=True, mmap=False)` allocates "
        "a new state (see the RSS column); the other methods load in place into preallocated, already touched "
        "tensors.",
        f"- Peak RSS growth over the cold load call, measured with {result['rss_method']}.",
    ])
    return f"""# Save / load throughput to local disk

Generated by `{result['command']}` (git {result['git']}).

Machine: {rep.describe_machine_md(result['machine'])} {load_avg}

{state_par}

{table}

{methods}

{notes}

Goals of the issue (reported, not asserted):

{goal_lines}
{_phases_md(result.get('ckpt_phases'))}"""


def _phases_md(ph: dict[str, Any] | None) -> str:
    if not ph:
        return ""
    tables = [rep.markdown_table([f"{what} phase", "thread-seconds", "calls"],
                                 [[k, rep.fmt(v, 3), ph[f"{what}_phase_calls"][k]]
                                  for k, v in ph[f"{what}_phase_thread_secs"].items()
                                  if k not in ph["phases_not_found"]])
              for what in ("save", "load")]
    return (f"\n## Where ckpt spends its time\n\n{ph['repeats']} extra instrumented save(s) and cold load(s) "
            f"after the timed ones, medians: save wall {ph['save_wall_secs']:.3f} s, cold load wall "
            f"{ph['load_wall_secs']:.3f} s; {ph['chunks']} chunks in {len(ph['data_files'])} data files. Phases are "
            "summed over threads (thread-seconds) and nested phases are also counted in their parents, so they can "
            "add up to more than the wall time."
            + (f" Not found in this version of the code: {', '.join(ph['phases_not_found'])}."
               if ph["phases_not_found"] else "")
            + "\n\n" + "\n\n".join(tables) + "\n")


def plot(result: dict[str, Any], path: str) -> None:
    rows = result["results"]
    names = _row_order()
    kind = "cold" if result["cache_mode"] != "warm" else "warm"
    rep.grouped_bar_plot(
        path, f"Save / load of {result['state_bytes'] / rep.GIB:.2f} GiB fp32 to local disk "
              f"(median of {result['repeats']})", [n.replace(" / ", "\n/ ") for n in names],
        {"save": [rows[n].get("save_gbps") for n in names],
         f"load ({kind})": [rows[n].get("load_cold_gbps") for n in names]},
        "GB/s (higher is better)",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.save_load", description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of every method (default 3)")
    ap.add_argument("--out", default="docs/benchmarks", help="where save_load.{json,md,png} go")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a new /tmp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 GiB, 1 repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every method first (default 1)")
    ap.add_argument("--cache", choices=rep.CACHE_MODES, default="drop",
                    help="how loads are made cold: drop the page cache (root; falls back to fadvise), fadvise "
                         "the checkpoint files out of it, or warm (no eviction)")
    ap.add_argument("--no-phases", action="store_true", help="skip the instrumented ckpt run")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_gib, args.repeats = 0.1, 1
    if args.size_gib <= 0 or args.repeats < 1:
        ap.error("--size-gib must be > 0 and --repeats >= 1")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    from ckpt.options import LoadOptions, SaveOptions

    base = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    try:
        cache = rep.CacheControl.choose(args.cache)
        load_avg_start = rep.load_average()
        shapes = transformer_shapes(int(args.size_gib * rep.GIB))
        state = make_state(shapes)
        dest = {k: torch.zeros_like(t) for k, t in state.items()}
        nbytes = state_bytes(state)
        print(f"state: {len(state)} tensors, {nbytes / rep.GIB:.3f} GiB; scratch {base}; "
              f"cache mode {cache.mode} {cache.note}", file=sys.stderr)
        samples: dict[str, list[Sample]] = {m.name: [] for m in METHODS}
        for w in range(args.warmup):  # first writes into fresh page-cache memory are slower on some VMs
            for m in METHODS:
                run_one(m, state, dest, os.path.join(base, f"warmup{w}-{METHODS.index(m)}"), cache, verify=(w == 0))
        for r in range(args.repeats):
            order = METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]
            for m in order:
                d = os.path.join(base, f"r{r}-{METHODS.index(m)}")
                s = run_one(m, state, dest, d, cache, verify=(r == 0 and args.warmup == 0))
                samples[m.name].append(s)
                print(f"  repeat {r}: {m.name:34s} save {s.save_secs:7.3f} s  load cold {s.load_cold_secs:7.3f} s  "
                      f"warm {s.load_warm_secs:7.3f} s", file=sys.stderr)
        with rep.PeakRss() as probe:
            pass
        rss_method = probe.method
        phases = None if args.no_phases else ckpt_phases(state, dest, base, cache, args.repeats)
        rows = summarize(samples, nbytes)
        so, lo = SaveOptions(), LoadOptions()
        result = {
            "benchmark": "save_load", "command": rep.command_line(), "git": rep.git_revision(os.getcwd()),
            "unix_time": time.time(), "machine": rep.machine_info(base),
            "load_average_start_end": [load_avg_start, rep.load_average()], "repeats": args.repeats,
            "size_gib_requested": args.size_gib, "state_bytes": nbytes, "num_tensors": len(state),
            "shapes": {k: list(v) for k, v in shapes.items()},
            "warmup_rounds": args.warmup, "cache_mode": cache.mode, "cache_note": cache.note,
            "ckpt_defaults": f"files_per_rank={so.files_per_rank}, max_chunk_bytes={so.max_chunk_bytes >> 20} MiB, "
                             f"block_bytes={so.block_bytes >> 20} MiB, codec={so.codec}, "
                             f"load num_threads={lo.num_threads}",
            "methods": {m.name: {"fsync": m.fsyncs, "load": m.load_note, "in_place": m.in_place} for m in METHODS},
            "results": rows, "goals": goals(rows), "ckpt_phases": phases, "rss_method": rss_method,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    md = rep.write_outputs(args.out, "save_load", result, render_markdown, plot)
    print(md)
    return result


if __name__ == "__main__":
    main()
