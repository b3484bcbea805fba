"""Conversions side by side: DeepSpeed ZeRO -> universal (``ckpt convert`` vs ``ds_to_universal``) and DCP ->
safetensors (``ckpt convert`` vs torch's own routes), in one run.

Run ``python -m benchmarks.convert [--params-m 350] [--stages 2,3] [--fp32] [--repeats 3] [--work-dir DIR]
[--out docs/benchmarks] [--only deepspeed|dcp]`` (``--quick``: tiny models, 1 repeat). The sources are written by
the frameworks themselves (``benchmarks._convert_setup``, in a child process) and cached under ``--work-dir``, so a
rerun does not train again: a ``benchmarks.gpt`` decoder trained 2 steps under DeepSpeed ZeRO-2 and ZeRO-3 on 2
gloo ranks (bf16 with fp32 master weights unless ``--fp32``), and a ``transformers`` Llama sharded with FSDP2 on 2
ranks, its model state saved with DCP.

Every method runs as its own process (as users run it), in an order that rotates from repeat to repeat, after the
source's files were evicted from the page cache. The methods: ``python -m ckpt.cli convert`` with ``--workers 1``
and ``2`` (its in-call ``seconds`` from ``--json`` are reported too); ``python -m deepspeed.checkpoint.ds_to_universal
--inject_missing_state`` at its defaults (4 extract and 2 merge processes) and with 2 + 2; torch's
``dcp_to_torch_save`` then ``safetensors.torch.save_file`` of the ``torch.load``\\ ed file, and DCP's
``HuggingFaceStorageWriter`` fed by the same in-memory load. Meanwhile a thread samples, every 50 ms, the bytes
under the run's output directory (``ds_to_universal`` writes its fragments to ``tmp/`` inside it; torch's route
its intermediate ``.pt``) and the summed RSS (and anonymous RSS) of the tool's process tree. After each run its
output is fsynced (the time reported apart: ``ckpt`` fsyncs its own files, ``ds_to_universal``, ``torch.save`` and
``save_file`` do not).
The last repeat's outputs are compared tensor by tensor with ``torch.equal``: ours against ``ds_to_universal``'s
``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``, and every safetensors output against torch's ``.pt`` route,
read with ``safetensors`` itself. A mismatch fails the run (after the report is written).

Not a test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil

from benchmarks import _report as rep
from benchmarks._convert_checks import check_deepspeed, check_safetensors
from benchmarks.reshard import DiskWatch, files_under, fsync_tree, run_child, usage

GOAL_SPEEDUP = 5.0
GOAL_DISK_RATIO = 0.5
SAMPLE_SECS = 0.05
OURS1, OURS2 = "ckpt convert --workers 1", "ckpt convert --workers 2"
DS_DEFAULT, DS_2 = "ds_to_universal (defaults: 4 extract + 2 merge)", "ds_to_universal (2 extract + 2 merge)"
TORCH_PT, TORCH_HF = "dcp_to_torch_save + save_file", "DCP load + HuggingFaceStorageWriter"
SETUP = [sys.executable, "-m", "benchmarks._convert_setup"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- one measured run --------------------------------------------------------------------------------------------
def rss_anon_bytes(pid: int) -> int:
    """``RssAnon`` of ``pid``: its resident memory less mapped files (a memory-mapped source counts in RSS, but its
    pages are page cache the kernel can drop) and shared memory."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class RunWatch(DiskWatch):
    """``DiskWatch`` that also keeps, per sample, the bytes under ``root`` (their peak) and the summed RSS (and
    anonymous RSS) of this process's children: the tool and any worker processes it starts."""

    def __init__(self, root: str, interval_secs: float = SAMPLE_SECS) -> None:
        super().__init__(root, interval_secs)
        self.peak_allocated_bytes = self.peak_apparent_bytes = self.peak_processes = 0
        self.peak_rss_bytes = self.peak_anon_bytes = 0

    def _sample(self) -> None:
        self.free_min = min(self.free_min, self._free())
        st = files_under(self.root)
        for p, s in st.items():
            self.seen[p] = max(self.seen.get(p, 0), s.st_size)
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, sum(s.st_blocks * 512 for s in st.values()))
        self.peak_apparent_bytes = max(self.peak_apparent_bytes, sum(s.st_size for s in st.values()))
        rss = anon = 0
        procs = psutil.Process().children(recursive=True)
        for p in procs:
            try:
                rss += p.memory_info().rss
                anon += rss_anon_bytes(p.pid)
            except (psutil.Error, OSError):  # exited between the listing and the read
                pass
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.samples += 1


@dataclass
class Sample:
    secs: float
    fsync_secs: float
    maxrss_bytes: int  # the larger of the sampled process-tree sum and the largest single process (os.wait4)
    peak_anon_bytes: int  # sampled process-tree sum of RssAnon
    peak_disk_bytes: int  # allocated (du), sampled
    peak_disk_apparent_bytes: int
    final_disk_bytes: int
    final_files: int
    peak_free_drop_bytes: int
    processes: int
    samples: int
    lib_secs: float | None = None
    phases: dict[str, float] = field(default_factory=dict)


def last_json(stdout: str) -> dict[str, Any]:
    """The JSON document a child printed last (``ckpt convert --json`` prints one, indented)."""
    text = stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def measure(cmd: list[str], run_root: str, src: str, cache: rep.CacheControl) -> Sample:
    """Run ``cmd`` (which writes under ``run_root``) from a cold source; sample disk and memory meanwhile."""
    os.makedirs(run_root)
    cache.make_cold([src])
    with RunWatch(run_root) as w:
        run = run_child(cmd)
    fsync_secs, _ = rep.timed(fsync_tree, run_root)
    final = usage(run_root)
    doc = last_json(run.stdout) if run.stdout.strip().endswith("}") else {}
    return Sample(run.wall_secs, fsync_secs, max(w.peak_rss_bytes, run.maxrss_bytes), w.peak_anon_bytes,
                  w.peak_allocated_bytes,
                  w.peak_apparent_bytes, final["allocated_bytes"], final["files"], w.peak_drop_bytes,
                  w.peak_processes, w.samples, doc.get("seconds"), doc.get("phases_secs", {}))


# -- the cases ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One source and the methods that convert it; ``command(method, dst)`` -> argv; ``output(method, run_root)``
    -> the converted checkpoint inside the run's directory."""

    name: str
    kind: str
    src: str
    facts: dict[str, Any]
    methods: list[str]
    peer: str
    command: Callable[[str, str], list[str]]
    output: Callable[[str, str], str]


def ours_cmd(src: str, dst: str, to: str, workers: int, src_format: str) -> list[str]:
    return [sys.executable, "-m", "ckpt.cli", "convert", src, dst, "--from", src_format, "--to", to, "--json",
            "--no-progress", "--workers", str(workers)]


def deepspeed_case(name: str, root: str, facts: dict[str, Any]) -> Case:
    src = os.path.join(root, facts["tag"])
    out = lambda m, run_root: os.path.join(run_root, facts["tag"])  # noqa: E731 - ds writes latest_universal above

    def command(m: str, run_root: str) -> list[str]:
        if m in (OURS1, OURS2):
            return ours_cmd(src, out(m, run_root), "universal", 1 if m == OURS1 else 2, "deepspeed")
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
               "--output_folder", out(m, run_root), "--inject_missing_state"]
        return cmd + (["--num_extract_workers", "2", "--num_merge_workers", "2"] if m == DS_2 else [])

    return Case(name, "deepspeed", src, facts, [OURS1, OURS2, DS_DEFAULT, DS_2], DS_DEFAULT, command, out)


def dcp_case(src: str, facts: dict[str, Any]) -> Case:
    out = lambda m, run_root: os.path.join(run_root, "out")  # noqa: E731

    def command(m: str, run_root: str) -> list[str]:
        if m in (OURS1, OURS2):
            return ours_cmd(src, out(m, run_root), "safetensors", 1 if m == OURS1 else 2, "dcp")
        return SETUP + ["torch-route", "pt" if m == TORCH_PT else "hf", src, out(m, run_root)]

    return Case("dcp-llama", "dcp", src, facts, [OURS1, OURS2, TORCH_PT, TORCH_HF], TORCH_PT, command, out)


def source(work: str, key: str, build_args: list[str]) -> tuple[str, dict[str, Any]]:
    """The cached source ``work/key`` (built by ``benchmarks._convert_setup`` when missing) and its facts."""
    path = os.path.join(work, key)
    if not (os.path.isdir(path) and os.path.isfile(path + ".json")):
        print(f"building {path} ...", file=sys.stderr)
        run_child(SETUP + build_args + ["--dir", path])
    with open(path + ".json", encoding="utf-8") as f:
        return path, json.load(f)


# -- running -----------------------------------------------------------------------------------------------------
def run_case(case: Case, base: str, repeats: int, cache: rep.CacheControl) -> dict[str, Any]:
    """Every method of ``case`` ``repeats`` times (rotating order); then the checks on the last repeat's outputs."""
    samples: dict[str, list[Sample]] = {m: [] for m in case.methods}
    kept: dict[str, str] = {}
    for r in range(repeats):
        order = case.methods[r % len(case.methods):] + case.methods[: r % len(case.methods)]
        for m in order:
            run_root = os.path.join(base, f"{case.name}-{case.methods.index(m)}-r{r}")
            s = measure(case.command(m, run_root), run_root, case.src, cache)
            samples[m].append(s)
            if r == repeats - 1:
                kept[m] = case.output(m, run_root)
            else:
                shutil.rmtree(run_root)
            inner = f" (in-call {s.lib_secs:.2f} s)" if s.lib_secs is not None and m in (OURS1, OURS2) else ""
            print(f"  {case.name} repeat {r}: {m:48s} {s.secs:7.2f} s{inner} + fsync {s.fsync_secs:.2f} s, peak disk "
                  f"{s.peak_disk_bytes / rep.GB:.2f} GB, peak RSS {s.maxrss_bytes / 2**20:.0f} MiB", file=sys.stderr)
        os.sync()
    if case.kind == "deepspeed":
        checks = {OURS1: check_deepspeed(kept[OURS1], kept[DS_DEFAULT], case.facts["stage"]),
                  OURS2: check_deepspeed(kept[OURS2], kept[DS_2], case.facts["stage"])}
    else:
        checks = {m: check_safetensors(kept[m], kept[TORCH_PT]) for m in (OURS1, OURS2, TORCH_HF)}
    for run_root in {os.path.dirname(p) for p in kept.values()}:
        shutil.rmtree(run_root, ignore_errors=True)
    return {"name": case.name, "kind": case.kind, "source": case.src, "facts": case.facts, "peer": case.peer,
            "source_bytes": usage(case.src)["allocated_bytes"], "methods": case.methods,
            "rows": summarize(samples, case.peer), "checks": checks,
            "samples": {m: [asdict(s) for s in ss] for m, ss in samples.items()}}


def summarize(samples: dict[str, list[Sample]], peer: str) -> dict[str, dict[str, Any]]:
    med = lambda ss, k: rep.median([getattr(s, k) for s in ss])  # noqa: E731
    peer_secs = med(samples[peer], "secs")
    rows = {}
    for m, ss in samples.items():
        secs = med(ss, "secs")
        synced = rep.median([s.secs + s.fsync_secs for s in ss])
        rows[m] = {"median_secs": secs, "secs_each": [s.secs for s in ss], "median_fsync_secs": med(ss, "fsync_secs"),
                   "median_secs_with_fsync": synced, "speedup_vs_peer": peer_secs / secs,
                   "median_lib_secs": med(ss, "lib_secs") if ss[0].lib_secs is not None else None,
                   "peak_disk_bytes": max(s.peak_disk_bytes for s in ss),
                   "peak_disk_apparent_bytes": max(s.peak_disk_apparent_bytes for s in ss),
                   "final_disk_bytes": med(ss, "final_disk_bytes"), "final_files": ss[0].final_files,
                   "maxrss_bytes": max(s.maxrss_bytes for s in ss), "processes": max(s.processes for s in ss),
                   "peak_anon_bytes": max(s.peak_anon_bytes for s in ss),
                   "phases_secs": {k: rep.median([s.phases[k] for s in ss]) for k in ss[0].phases}}
    return rows


def goals(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's goals for each DeepSpeed case: ours (``--workers 1``, the CLI process) against the faster and the
    smaller-peak ``ds_to_universal`` configuration; bit-identical results."""
    out = {}
    for c in (c for c in cases if c["kind"] == "deepspeed"):
        rows, n = c["rows"], c["name"]
        fast = min((DS_DEFAULT, DS_2), key=lambda m: rows[m]["median_secs"])
        small = min((DS_DEFAULT, DS_2), key=lambda m: rows[m]["peak_disk_bytes"])
        for m in (OURS1, OURS2):
            speed = rows[fast]["median_secs"] / rows[m]["median_secs"]
            speed_sync = rows[fast]["median_secs_with_fsync"] / rows[m]["median_secs_with_fsync"]
            out[f"{n}: {m} at least {GOAL_SPEEDUP:g}x faster than {fast} (process wall; theirs without fsync)"] = \
                {"value": speed, "goal": GOAL_SPEEDUP, "met": speed >= GOAL_SPEEDUP}
            out[f"{n}: {m}, the same with both outputs fsynced"] = \
                {"value": speed_sync, "goal": GOAL_SPEEDUP, "met": speed_sync >= GOAL_SPEEDUP}
        disk = max(rows[m]["peak_disk_bytes"] for m in (OURS1, OURS2)) / rows[small]["peak_disk_bytes"]
        same = all(ch["equal"] for ch in c["checks"].values())
        out[f"{n}: peak disk use at most {GOAL_DISK_RATIO:g}x that of {small}"] = \
            {"value": disk, "goal": GOAL_DISK_RATIO, "met": disk <= GOAL_DISK_RATIO}
        out[f"{n}: bit-identical ({sum(ch['tensors_compared'] for ch in c['checks'].values())} tensors compared)"] = \
            {"value": float(same), "goal": None, "met": same}
    return out


# -- report ------------------------------------------------------------------------------------------------------
def _gb(n: float | None) -> str:
    return rep.fmt(None if n is None else n / rep.GB, 2, " GB")


def _same(case: dict[str, Any], m: str) -> str:
    ch = case["checks"].get(m)
    if ch is None:
        return "reference" if m in (case["peer"], DS_2) else "—"
    return (f"yes ({ch['tensors_compared']} tensors)" if ch["equal"]
            else f"**NO**: {'; '.join(ch['mismatches'][:2])}")


def case_table(case: dict[str, Any]) -> str:
    rows = case["rows"]
    body = []
    for m in case["methods"]:
        r = rows[m]
        body.append([f"**{m}**" if m in (OURS1, OURS2) else m,
                     f"{r['median_secs']:.2f} ({' '.join(f'{s:.2f}' for s in r['secs_each'])})",
                     rep.fmt(r["median_lib_secs"]), f"{r['speedup_vs_peer']:.2f}x",
                     f"{r['median_secs_with_fsync']:.2f}", _gb(r["peak_disk_bytes"]), _gb(r["final_disk_bytes"]),
                     f"{r['final_files']}", f"{r['maxrss_bytes'] / 2**20:.0f} MiB",
                     f"{r['peak_anon_bytes'] / 2**20:.0f} MiB", r["processes"], _same(case, m)])
    return rep.markdown_table(["method", "median s (each repeat)", "in-call s", "x vs peer", "s + fsync of output",
                               "peak disk", "final size", "files", "peak RSS", "peak anon RSS", "processes",
                               "bit-identical"], body)


def describe_source(c: dict[str, Any]) -> str:
    f = c["facts"]
    if c["kind"] == "deepspeed":
        cfg = f["config"]
        what = (f"`benchmarks.gpt.GPT` (d_model {cfg['d_model']}, {cfg['n_layer']} layers, vocab "
                f"{cfg['vocab_size']}), DeepSpeed ZeRO-{f['stage']}, DP {f['dp']}, "
                f"{'bf16 (fp32 master weights)' if f['bf16'] else 'fp32'}, {f['steps']} steps, torch AdamW")
    else:
        cfg = f["config"]
        what = (f"`transformers` Llama (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
                f"{cfg['vocab_size']}, untied head), FSDP2 on {f['dp']} ranks, model state only, fp32")
    return f"| {c['name']} | {what} | {f['num_params'] / 1e6:.1f} M | {_gb(c['source_bytes'])} | `{c['source']}` |"


def render_markdown(result: dict[str, Any]) -> str:
    cases = result["cases"]
    sources = "\n".join(["| case | checkpoint | parameters | on disk | path |", "|---|---|---|---|---|"]
                        + [describe_source(c) for c in cases])
    what = {"deepspeed": "DeepSpeed -> universal", "dcp": "DCP -> safetensors"}
    tables = "\n\n".join(f"### {c['name']}: {what[c['kind']]} (peer: {c['peer']})\n\n{case_table(c)}" for c in cases)
    goal_lines = "\n".join(f"- {k}: **{'met' if v['met'] else 'NOT met'}**"
                           + (f" ({v['value']:.3f}x; goal {v['goal']:g}x)" if v["goal"] is not None else "")
                           for k, v in result["goals"].items()) or "- (no DeepSpeed case in this run)"
    phases = []
    for c in cases:
        for m in c["methods"]:
            ph = c["rows"][m]["phases_secs"]
            if ph:
                phases.append(f"- {c['name']}, {m}: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
    odd = [f"- {c['name']}: `ds_to_universal`'s ZeRO-3 output holds flattened (1-D) tensors: "
           f"{ch['shape_differs']} of the {ch['tensors_compared']} tensors compared differ from the parameter's shape "
           "only in that (values compared flattened)." for c in cases for m, ch in c["checks"].items()
           if m == OURS1 and ch.get("shape_differs")]
    odd += [f"- {c['name']}: `ds_to_universal` also writes `zero/optimizer_state.pt` "
            f"({ch['theirs_optimizer_state_pt_bytes'] / rep.GB:.2f} GB): rank 0's whole optimizer state, its "
            "flat fp32 partition and moments included (the ZeRO-1/2 path leaves those out), which is why its ZeRO-3 "
            "output is larger than ours." for c in cases for m, ch in c["checks"].items()
            if m == OURS1 and c["kind"] == "deepspeed" and c["facts"]["stage"] == 3
            and (ch.get("theirs_optimizer_state_pt_bytes") or 0) > 2**20]
    load = " and ".join(str(v) for v in result["load_average_start_end"])
    sample_ms = result["sample_secs"] * 1000
    return f"""# Converting checkpoints: `ckpt convert` vs DeepSpeed's and torch's own routes

Generated by `{result['command']}` (git {result['git']}), {result['repeats']} repeat(s), total
{result['total_secs'] / 60:.1f} min.

Machine: {rep.describe_machine_md(result['machine'])} Load average (1, 5, 15 min) at the start and at the end:
{load} on {result['machine']['usable_cores']} cores (other work shared the machine when above ~1). Versions:
{', '.join(f'{k} {v}' for k, v in result['versions'].items())}.

## Sources

Written by the frameworks themselves (`benchmarks._convert_setup`), cached under the work directory.

{sources}

## Results

Each method is one process, run as users run it, from a cold source (its files evicted from the page cache with
`POSIX_FADV_DONTNEED`), in an order that rotates from repeat to repeat. *median s*: wall time of the process.
*in-call s*: the conversion inside the process (`ckpt convert --json`'s `seconds`; torch's routes time their own
calls; the rest is Python start-up and imports). *x vs peer*: the peer's median / this method's (higher is faster).
*s + fsync*: plus an fsync of every output file after the run (`ckpt` fsyncs its files itself, so it pays nothing
more; `ds_to_universal`, `torch.save` and `save_file` leave their data to the kernel's writeback). *peak disk*: the
largest total of allocated bytes (`du`) under the run's output directory in samples every {sample_ms:.0f}
ms (`ds_to_universal` keeps its fragments in `tmp/` inside the output folder until the merge is done;
torch's route writes the whole state as an intermediate `.pt`); the largest of all repeats. *final size*: what is
left. *peak RSS*: the larger of the summed RSS of the tool's process tree (sampled; shared pages of forked workers
count in each) and the largest single process (`os.wait4`). *peak anon RSS*: the sampled sum of `RssAnon`, resident
memory less memory-mapped files: `ckpt` maps the source files (`torch.load(mmap=True)`), whose pages count in RSS
but are page cache the kernel can reclaim, while `torch.load` without `mmap` copies into anonymous memory.
*processes*: the most seen at once. *bit-identical*: the last repeat's output against the peer's, tensor by tensor
with `torch.equal` (`--workers 1` against `ds_to_universal` at its defaults, `--workers 2` against its 2 + 2 run):
DeepSpeed: every fp32 master weight, `exp_avg`, `exp_avg_sq` and `step` of ours against
`zero/<param>/{{fp32,exp_avg,exp_avg_sq,step}}.pt` (ZeRO-3: the steps of `zero/optimizer_state.pt`, since no
`step.pt` is written); safetensors: every tensor, read with `safetensors`, against the `.pt` route's file.

{tables}

## Goals (from the issue; DeepSpeed cases)

{goal_lines}

## Notes

{chr(10).join(phases + odd) or '- none'}
- The DCP -> safetensors comparison has no goal in the issue; it is here for the record. `_consolidate_hf_safetensors`
  (torch) merges the shards written by `HuggingFaceStorageWriter(save_distributed=True)`, not `.distcp` files, so
  it is not a third DCP route.
- Not a test: nothing here asserts a timing.

![convert](convert.png)
"""


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(2, len(cases), figsize=(4.6 * len(cases), 8.0), squeeze=False)
    colors = {OURS1: "tab:blue", OURS2: "tab:cyan", DS_DEFAULT: "tab:grey", DS_2: "silver", TORCH_PT: "tab:grey",
              TORCH_HF: "silver"}
    for i, c in enumerate(cases):
        rows, ms = c["rows"], c["methods"]
        labels = [m.replace(" (", "\n(").replace(" + ", "\n+ ").replace(" --", "\n--") for m in ms]
        a1, a2 = axes[0][i], axes[1][i]
        bars = a1.bar(range(len(ms)), [rows[m]["median_secs"] for m in ms], color=[colors[m] for m in ms])
        a1.bar_label(bars, labels=[f"{rows[m]['median_secs']:.1f} s\n{rows[m]['speedup_vs_peer']:.1f}x" for m in ms],
                     fontsize=7, padding=2)
        a1.set_ylim(0, max(rows[m]["median_secs"] for m in ms) * 1.25)
        a1.set_title(f"{c['name']}: wall seconds (median)\nlabels: seconds, speed-up vs {c['peer'].split(' (')[0]}",
                     fontsize=8)
        peak = [rows[m]["peak_disk_bytes"] / rep.GB for m in ms]
        bars = a2.bar(range(len(ms)), peak, color=[colors[m] for m in ms], alpha=0.5, label="peak")
        a2.bar(range(len(ms)), [rows[m]["final_disk_bytes"] / rep.GB for m in ms], color=[colors[m] for m in ms],
               width=0.4, label="final")
        a2.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        a2.set_ylim(0, max(peak) * 1.2)
        a2.set_title(f"{c['name']}: disk under the output, GB\n(wide: peak, narrow: final)", fontsize=8)
        for ax in (a1, a2):
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels(labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)  # rep.write_outputs made its folder
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=350.0, help="GPT size for DeepSpeed, millions (default 350)")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages (default 2,3)")
    ap.add_argument("--fp32", action="store_true", help="DeepSpeed trains in fp32 (default: bf16)")
    ap.add_argument("--only", choices=("deepspeed", "dcp"), default=None, help="run one half only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "ckpt-bench-convert"),
                    help="where the sources are cached and the outputs written (default: a fixed /tmp dir)")
    ap.add_argument("--out", default="docs/benchmarks", help="where convert.{json,md,png} go")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    stages = [int(s) for s in args.stages.split(",") if s]
    t_start = time.perf_counter()
    os.makedirs(args.work_dir, exist_ok=True)
    cache = rep.CacheControl.choose("fadvise")
    load_start = rep.load_average()
    versions = {k: importlib.metadata.version(k) for k in ("torch", "deepspeed", "safetensors", "transformers")}
    q = ["--quick"] if args.quick else []
    cases: list[Case] = []
    if args.only in (None, "deepspeed"):
        for stage in stages:
            prec = "fp32" if args.fp32 else "bf16"
            key = (f"deepspeed-gpt{'quick' if args.quick else f'{args.params_m:g}m'}-zero{stage}-{prec}-dp2-steps2-"
                   f"ds{versions['deepspeed']}")
            root, facts = source(args.work_dir, key, ["deepspeed", "--stage", str(stage), "--params-m",
                                                      str(args.params_m)] + ([] if args.fp32 else ["--bf16"]) + q)
            cases.append(deepspeed_case(f"zero{stage}-{prec}", root, facts))
    if args.only in (None, "dcp"):
        key = f"dcp-llama{'quick' if args.quick else '271m'}-fsdp2-dp2-torch{versions['torch']}"
        src, facts = source(args.work_dir, key, ["dcp"] + q)
        cases.append(dcp_case(src, facts))
    base = tempfile.mkdtemp(prefix="runs-", dir=args.work_dir)
    try:
        done = []
        for c in cases:
            gb = usage(c.src)["allocated_bytes"] / rep.GB
            print(f"{c.name}: {c.facts['num_params'] / 1e6:.1f} M params, {gb:.2f} GB at {c.src}", file=sys.stderr)
            done.append(run_case(c, base, args.repeats, cache))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "convert", "command": rep.command_line(), "git": rep.git_revision(REPO),
        "unix_time": time.time(), "machine": rep.machine_info(args.work_dir), "versions": versions,
        "load_average_start_end": [load_start, rep.load_average()], "repeats": args.repeats, "quick": args.quick,
        "sample_secs": SAMPLE_SECS, "cache_mode": cache.mode, "cases": done,
    }
    result["goals"] = goals(done)
    result["total_secs"] = time.perf_counter() - t_start
    print(rep.write_outputs(args.out, "convert", result, render_markdown, plot))
    bad = {f"{c['name']} / {m}": ch["mismatches"] for c in done for m, ch in c["checks"].items() if not ch["equal"]}
    if bad:
        raise SystemExit(f"benchmarks.convert: outputs are NOT identical: {json.dumps(bad, indent=1)}")
    return result


if __name__ == "__main__":
    main()
