"""Offline resharding of a multi-GB checkpoint: ``ckpt reshard`` vs ``cp -r``, peak RSS, read amplification, disk use.

Run ``python -m benchmarks.reshard [--family gpt] [--millions 350] [--from tp=4,pp=2,dp=2] [--to tp=2,pp=4,dp=1]
[--repeats 3] [--out docs/benchmarks] [--dir /tmp/x]`` (``--quick``: a tiny model, 1 repeat). The source is the
reference model's state (``megatron_ref.sized``: weights and two fp32 Adam moments, about 12 bytes per parameter)
as every rank of the source layout would have saved it; a second source saved under ZeRO-1 is measured alongside
(``--no-zero1`` skips it). Per repeat, in rotating order, each from a cold page cache: ``cp -r`` of the source
directory (then an fsync of every copied file, as ckpt fsyncs its own), and ``python -m ckpt.cli reshard`` in a
fresh process whose peak RSS comes from ``os.wait4``. A watcher thread samples free disk space and the files under
the scratch directory meanwhile (no temporary copy may appear). After the repeats: every target rank's tensors are
read from the *source* with ``export_rank`` (bytes fetched, counted by ``ChunkReader.bytes_read``, against the
bytes of the pieces the rank needs, padding excluded) and checked equal to the same rank read from the resharded
checkpoint; then one in-process ``reshard`` runs under ``PhaseTimer`` to show where the time goes.

Not a test: it asserts nothing about timings. It does check that the resharded checkpoint holds the same
rank-local tensors as the source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from benchmarks import _report as rep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "tp=4,pp=2,dp=2"
TARGET = "tp=2,pp=4,dp=1"
GOAL_COPY_RATIO = 1.5
GOAL_RSS_X_LARGEST = 2.0
GOAL_READ_AMP = 1.05
GOAL_FREE_DROP_X_OUTPUT = 1.1
GOAL_WRITE_X_OUTPUT = 1.05
#: The manifest's atomic commit writes ``manifest.json.tmp-<hex>`` then renames it over ``manifest.json``: no larger
#: than the final manifest, it is the commit itself, not a copy of the data.
COMMIT_TMP = "manifest.json.tmp-"
#: ext4 counts a large file's extent-tree blocks in ``st_blocks``: allocated bytes may exceed the file sizes by a
#: few blocks per file (plus rounding up to a block) without any hidden copy.
ALLOC_SLACK = 1e-4
CP, CP_SYNC, OURS, OURS_LIB, OURS_Z1 = ("cp -r", "cp -r + fsync", "ckpt reshard (CLI process)",
                                        "reshard() inside the CLI", "ckpt reshard, ZeRO-1 source")


# -- child processes -----------------------------------------------------------------------------------------------
@dataclass
class ChildRun:
    """One child process: wall seconds, its own peak RSS and CPU time (``os.wait4``), its output."""

    wall_secs: float
    maxrss_bytes: int
    cpu_secs: float
    stdout: str
    stderr: str
    user_secs: float = 0.0
    sys_secs: float = 0.0
    io: dict[str, int] = field(default_factory=dict)


def io_counters() -> dict[str, int]:
    """This process's I/O accounting (``/proc/self/io``); it includes children once they are reaped, so the
    difference around one ``run_child`` is that child's: ``write_bytes`` are the bytes it sent (or dirtied) for
    storage, ``cancelled_write_bytes`` dirty bytes dropped before writeback (a deleted temporary file),
    ``read_bytes`` the bytes fetched from storage (page-cache hits excluded)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def run_child(cmd: list[str]) -> ChildRun:
    """Run ``cmd`` from the repo root; its rusage is its own (not the maximum over every child so far, as
    ``RUSAGE_CHILDREN`` would give after the multi-GB set-up child)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        io0 = io_counters()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        io1 = io_counters()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        run = ChildRun(wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime, out.read().decode(), err.read().decode(),
                       ru.ru_utime, ru.ru_stime, {k: io1[k] - io0[k] for k in io1 if k in io0})
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {p.returncode}:\n{run.stderr[-4000:]}")
    return run


IMPORTS = ("import torch, ckpt, ckpt.cli, ckpt.cli_reshard, resharding.offline, resharding.spec_bind, "
           "formats.reader, formats.storage")


# -- disk ----------------------------------------------------------------------------------------------------------
def files_under(root: str) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dp, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dp, n)
            try:
                out[p] = os.stat(p)
            except FileNotFoundError:  # gone between the listing and the stat (a renamed commit tmp)
                pass
    return out


def usage(root: str) -> dict[str, int]:
    """Files, apparent bytes (sizes) and allocated bytes (blocks, what ``du`` counts) under ``root``."""
    st = files_under(root)
    return {"files": len(st), "apparent_bytes": sum(s.st_size for s in st.values()),
            "allocated_bytes": sum(s.st_blocks * 512 for s in st.values())}


def fsync_tree(root: str) -> None:
    for p in files_under(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for dp, _dirs, _names in os.walk(root):
        fd = os.open(dp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskWatch:
    """Samples free space of ``root``'s file system and every file under ``root`` (path -> largest size seen)
    from a thread while a ``with`` block runs."""

    def __init__(self, root: str, interval_secs: float = 0.02) -> None:
        self.root, self.interval = root, interval_secs
        self.free_start = self.free_min = 0
        self.seen: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _free(self) -> int:
        s = os.statvfs(self.root)
        return s.f_bavail * s.f_frsize

    def _sample(self) -> None:
        self.free_min = min(self.free_min, self._free())
        for p, s in files_under(self.root).items():
            self.seen[p] = max(self.seen.get(p, 0), s.st_size)
        self.samples += 1

    def __enter__(self) -> "DiskWatch":
        self.free_start = self.free_min = self._free()
        self._sample()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, name="disk-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()

    @property
    def peak_drop_bytes(self) -> int:
        return self.free_start - self.free_min


def disk_check(watch: DiskWatch, before: set[str], src_dirs: list[str], dst: str) -> dict[str, Any]:
    """What one run left and showed under the scratch dir: the destination's use against the bytes its manifest
    lists, files seen during the run that are gone now, new files outside the destination."""
    from formats.reader import read_manifest
    from formats.storage import open_storage

    now = files_under(watch.root)
    m = read_manifest(open_storage(dst))
    listed = sum(f.size_bytes for f in m.files.values()) + os.path.getsize(os.path.join(dst, "manifest.json"))
    u = usage(dst)
    transient = {os.path.relpath(p, watch.root): n for p, n in watch.seen.items() if p not in now and p not in before}
    inside = lambda p, d: p.startswith(d.rstrip("/") + "/")  # noqa: E731
    stray = sorted(os.path.relpath(p, watch.root) for p in now
                   if p not in before and not inside(p, dst) and not any(inside(p, s) for s in src_dirs))
    manifest_bytes = os.path.getsize(os.path.join(dst, "manifest.json"))
    big_tmp = {p: n for p, n in transient.items() if COMMIT_TMP not in p or n > manifest_bytes}
    return {
        "dst_files": u["files"], "dst_apparent_bytes": u["apparent_bytes"], "dst_allocated_bytes": u["allocated_bytes"],
        "manifest_listed_bytes": listed, "manifest_bytes": manifest_bytes, "transient_files": transient,
        "temporary_copies": big_tmp, "stray_files": stray,
        "peak_free_drop_bytes": watch.peak_drop_bytes, "watch_samples": watch.samples,
        "no_temporary_copy": not big_tmp and not stray and u["apparent_bytes"] == listed
                             and u["allocated_bytes"] <= listed * (1 + ALLOC_SLACK) + 4096 * u["files"],
    }


# -- the methods ---------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    secs: float
    lib_secs: float | None = None
    fsync_secs: float | None = None
    maxrss_bytes: int | None = None
    cpu_secs: float | None = None
    user_secs: float | None = None
    sys_secs: float | None = None
    io: dict[str, int] = field(default_factory=dict)
    disk: dict[str, Any] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict)


def run_cp(src: str, dst: str, base: str, cache: rep.CacheControl) -> Sample:
    cache.make_cold([src])
    before = set(files_under(base))
    with DiskWatch(base) as w:
        run = run_child(["cp", "-r", src, dst])
        t0 = time.perf_counter()
        fsync_tree(dst)
        fsync_secs = time.perf_counter() - t0
    u = usage(dst)
    disk = {"dst_apparent_bytes": u["apparent_bytes"], "dst_allocated_bytes": u["allocated_bytes"],
            "peak_free_drop_bytes": w.peak_drop_bytes,
            "transient_files": {os.path.relpath(p, base): n for p, n in w.seen.items()
                                if p not in files_under(base) and p not in before}}
    shutil.rmtree(dst)
    os.sync()
    return Sample(run.wall_secs, fsync_secs=fsync_secs, maxrss_bytes=run.maxrss_bytes, cpu_secs=run.cpu_secs,
                  user_secs=run.user_secs, sys_secs=run.sys_secs, io=run.io, disk=disk)


def run_reshard(src: str, dst: str, target: str, base: str, src_dirs: list[str], cache: rep.CacheControl,
                keep: bool = False) -> Sample:
    cache.make_cold([src])
    before = set(files_under(base))
    with DiskWatch(base) as w:
        run = run_child([sys.executable, "-m", "ckpt.cli", "reshard", src, dst, "--to", target, "--json",
                         "--no-progress"])
    doc = json.loads(run.stdout)
    disk = disk_check(w, before, src_dirs, dst)
    if not keep:
        shutil.rmtree(dst)
        os.sync()
    return Sample(run.wall_secs, lib_secs=doc["seconds"], maxrss_bytes=run.maxrss_bytes, cpu_secs=run.cpu_secs,
                  user_secs=run.user_secs, sys_secs=run.sys_secs, io=run.io, disk=disk, doc=doc)


# -- read amplification --------------------------------------------------------------------------------------------
@contextmanager
def counting_readers() -> Iterator[list[Any]]:
    """Every ``ChunkReader`` that ``resharding.offline`` creates meanwhile (``export_rank`` makes its own and does
    not return it), so their ``bytes_read`` can be summed."""
    import resharding.offline as off

    made: list[Any] = []
    original = off.ChunkReader

    class Counting(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            made.append(self)

    off.ChunkReader = Counting
    try:
        yield made
    finally:
        off.ChunkReader = original


def needed_bytes(binding: Any, rank: int, manifest: Any) -> int:
    """Bytes of the logical pieces ``rank`` holds (every local copy; vocabulary and alignment padding excluded)."""
    from formats.dtypes import dtype_from_name, itemsize

    return sum(p.numel * itemsize(dtype_from_name(manifest.tensors[p.logical_key].dtype, p.logical_key))
               for lt in binding.rank_layout(rank) for p in lt.pieces)


def load_from_source(src: str, target: str, cache: rep.CacheControl, verify_against: str | None) -> dict[str, Any]:
    """``export_rank`` of every target rank from ``src`` (cold, timed, bytes counted); with ``verify_against``,
    each rank is also read from that (resharded) checkpoint and must be equal."""
    from formats.reader import read_manifest
    from formats.storage import open_storage
    from resharding.offline import export_rank, source_binding

    storage = open_storage(src)
    manifest = read_manifest(storage)
    binding = source_binding(manifest, src).with_parallel(target)
    other = open_storage(verify_against) if verify_against else None
    other_manifest = read_manifest(other) if other else None
    cache.make_cold([src])
    ranks: list[dict[str, Any]] = []
    mismatched: list[str] = []
    for r in range(binding.world_size):
        with counting_readers() as made:
            secs, got = rep.timed(export_rank, storage, binding, r, manifest)
        ranks.append({"rank": r, "secs": secs, "bytes_read": sum(x.bytes_read for x in made),
                      "bytes_needed": needed_bytes(binding, r, manifest),
                      "local_bytes": sum(t.numel() * t.element_size() for t in got.values())})
        if other is not None:
            want = export_rank(other, binding, r, other_manifest)
            if sorted(want) != sorted(got):
                mismatched.append(f"rank {r}: keys differ")
            mismatched += [f"rank {r}: {k}" for k in got if k in want and not torch.equal(got[k], want[k])]
            del want
        del got
    read, need = sum(x["bytes_read"] for x in ranks), sum(x["bytes_needed"] for x in ranks)
    secs = sum(x["secs"] for x in ranks)
    return {
        "source": src, "target": target, "ranks": ranks, "bytes_read": read, "bytes_needed": need,
        "local_bytes": sum(x["local_bytes"] for x in ranks), "amplification": read / need,
        "max_rank_amplification": max(x["bytes_read"] / x["bytes_needed"] for x in ranks),
        "secs": secs, "gbps_needed": need / rep.GB / secs,
        "verified_against": verify_against, "mismatches": mismatched[:20],
    }


# -- where the time goes -------------------------------------------------------------------------------------------
@contextmanager
def read_paths() -> Iterator[dict[str, dict[str, int]]]:
    """Count ``ChunkReader.read_region`` calls by the path they take: a whole chunk into a contiguous destination
    (read in place), a whole chunk into a strided destination, or part of a chunk (both through a bounce buffer).
    The classification repeats ``read_region``'s own condition for its zero-copy path (raw chunks)."""
    import formats.reader as R

    counts = {k: {"calls": 0, "bytes": 0} for k in ("whole chunk, in place", "whole chunk, strided destination",
                                                    "part of a chunk")}
    original = R.ChunkReader.read_region

    def wrapper(self: Any, entry: Any, chunk: Any, rel_offsets: Any, rel_sizes: Any, out: torch.Tensor) -> None:
        whole = all(o == 0 for o in rel_offsets) and tuple(rel_sizes) == tuple(chunk.sizes)
        kind = ("part of a chunk" if not whole else
                "whole chunk, in place" if out.is_contiguous() else "whole chunk, strided destination")
        counts[kind]["calls"] += 1
        counts[kind]["bytes"] += out.numel() * out.element_size()
        original(self, entry, chunk, rel_offsets, rel_sizes, out)

    R.ChunkReader.read_region = wrapper  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        R.ChunkReader.read_region = original  # type: ignore[method-assign]


def profile_reshard(src: str, dst: str, target: str, cache: rep.CacheControl) -> dict[str, Any]:
    """One in-process ``reshard`` (cold) under ``PhaseTimer``; plus the CLI's dry-run plan, timed alone."""
    import formats.checksum as C
    import formats.reader as R
    import formats.storage.local as LS
    import formats.storage.local_stream as LSS
    import formats.writer as W
    import resharding.offline as off
    from formats.storage import open_storage

    targets = {
        "read manifest": (off, "read_manifest"),
        "plan: target rank layouts (_candidates)": (off, "_candidates"),
        "plan: plan_global_writes": (off, "plan_global_writes"),
        "read: _SourceBox.materialize (alloc + read_box)": (off._SourceBox, "materialize"),
        "read: ChunkReader.read_box": (R.ChunkReader, "read_box"),
        "read: ChunkReader.read_region": (R.ChunkReader, "read_region"),
        "read: pread (LocalStorage.readinto)": (LS.LocalStorage, "readinto"),
        "read: verify xxh3 (ChunkReader._verify)": (R.ChunkReader, "_verify"),
        "write: encode (contiguous + xxh3)": (W, "_encode"),
        "write: xxh3 (block_digests)": (C, "block_digests"),
        "write: LocalStreamWriter.append": (LSS.LocalStreamWriter, "append"),
        "write: O_DIRECT pwrite (_pwrite_all)": (LSS, "_pwrite_all"),
        "write: LocalStreamWriter.close (flush + fsync)": (LSS.LocalStreamWriter, "close"),
        "fsync (all)": (os, "fsync"),
        "commit manifest": (off, "commit"),
    }
    plan_secs, _ = rep.timed(off.reshard, open_storage(src), open_storage(dst), target, dry_run=True)
    cache.make_cold([src])
    with rep.PhaseTimer(targets) as pt, read_paths() as paths:
        wall, res = rep.timed(off.reshard, open_storage(src), open_storage(dst), target)
    sizes = sorted(c.byte_length for e in R.read_manifest(open_storage(dst)).tensors.values() for c in e.chunks)
    src_chunks = sum(len(e.chunks) for e in R.read_manifest(open_storage(src)).tensors.values())
    classes = {"< 64 KiB": (0, 64 << 10), "64 KiB - 1 MiB": (64 << 10, 1 << 20), ">= 1 MiB": (1 << 20, 1 << 62)}
    chunk_sizes = {name: {"chunks": sum(lo <= n < hi for n in sizes), "bytes": sum(n for n in sizes if lo <= n < hi)}
                   for name, (lo, hi) in classes.items()}
    shutil.rmtree(dst)
    os.sync()
    return {"wall_secs": wall, "dry_run_plan_secs": plan_secs, "phase_secs": dict(pt.secs),
            "phase_calls": dict(pt.calls), "not_found": pt.missing, "bytes_written": res.bytes_written,
            "bytes_read": res.bytes_read, "chunks_written": len(sizes), "chunk_sizes_written": chunk_sizes,
            "source_chunks": src_chunks, "read_paths": paths}


# -- report --------------------------------------------------------------------------------------------------------
def summarize(samples: dict[str, list[Sample]], nbytes: int) -> dict[str, dict[str, Any]]:
    gb = nbytes / rep.GB
    cp = samples[CP]
    cp_sync = [s.secs + (s.fsync_secs or 0.0) for s in cp]

    def row(secs: list[float], extra: dict[str, Any]) -> dict[str, Any]:
        return {"secs": secs, "median_secs": rep.median(secs), "gbps": rep.median([gb / s for s in secs]),
                "vs_cp_sync": rep.median([a / b for a, b in zip(secs, cp_sync)]),
                "vs_cp": rep.median([a / b.secs for a, b in zip(secs, cp)]), **extra}

    def cpu(ss: list[Sample]) -> dict[str, Any]:
        out = {k: rep.median([getattr(s, k) for s in ss]) for k in ("cpu_secs", "user_secs", "sys_secs")}
        out["storage_write_bytes"] = [s.io.get("write_bytes", 0) - s.io.get("cancelled_write_bytes", 0) for s in ss]
        out["storage_read_bytes"] = [s.io.get("read_bytes", 0) for s in ss]
        out["peak_free_drop_each"] = [s.disk["peak_free_drop_bytes"] for s in ss]
        out["output_allocated_each"] = [s.disk["dst_allocated_bytes"] for s in ss]
        return out

    rows = {CP: row([s.secs for s in cp], cpu(cp)),
            CP_SYNC: row(cp_sync, {"fsync_secs": [s.fsync_secs for s in cp]})}
    for name, method, lib in ((OURS, OURS, False), (OURS_LIB, OURS, True), (OURS_Z1, OURS_Z1, False)):
        ss = samples.get(method, [])
        if not ss:
            continue
        secs = [s.lib_secs for s in ss] if lib else [s.secs for s in ss]
        extra: dict[str, Any] = {}
        if not lib:
            extra = {"maxrss_bytes": rep.median([s.maxrss_bytes for s in ss]),
                     "maxrss_each": [s.maxrss_bytes for s in ss], **cpu(ss),
                     "no_temporary_file": all(s.disk["no_temporary_copy"] for s in ss),
                     "output_listed_each": [s.disk["manifest_listed_bytes"] for s in ss],
                     "bytes_read_by_cli": ss[0].doc.get("bytes_read"), "bytes_written": ss[0].doc.get("bytes")}
        rows[name] = row(secs, extra)
    return rows


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows, amp = result["results"], result["load_from_source"]["zero0"]
    largest = result["state"]["largest_tensor_bytes"]
    rss_above = rows[OURS]["maxrss_bytes"] - result["baseline"]["maxrss_bytes"]
    o = rows[OURS]
    write_x = max(w / n for w, n in zip(o["storage_write_bytes"], o["output_listed_each"]))
    drops = [dr / n for dr, n in zip(o["peak_free_drop_each"], o["output_allocated_each"])]
    drop_x = min(drops, key=lambda v: abs(v - 1.0))
    out = {
        f"reshard <= {GOAL_COPY_RATIO}x the time of cp -r + fsync (CLI process wall)":
            (rows[OURS]["vs_cp_sync"], GOAL_COPY_RATIO, "x"),
        f"reshard <= {GOAL_COPY_RATIO}x the time of cp -r + fsync (the reshard() call inside the CLI)":
            (rows[OURS_LIB]["vs_cp_sync"], GOAL_COPY_RATIO, "x"),
        f"stricter, against cp -r without fsync: reshard <= {GOAL_COPY_RATIO}x (CLI process wall)":
            (rows[OURS]["vs_cp"], GOAL_COPY_RATIO, "x"),
        f"peak RSS above an idle python+imports process <= {GOAL_RSS_X_LARGEST}x the largest tensor":
            (rss_above / largest, GOAL_RSS_X_LARGEST, "x the largest tensor"),
        f"load-time read amplification from the source <= {GOAL_READ_AMP}":
            (amp["amplification"], GOAL_READ_AMP, ""),
        "no temporary file (no file beyond the output appears under the scratch dir during any run; du of the "
        "output = the bytes its manifest lists)": (1.0 if o["no_temporary_file"] else 0.0, None, ""),
        f"no temporary copy written: bytes the reshard process wrote to storage <= {GOAL_WRITE_X_OUTPUT}x the "
        "output (per-process I/O accounting, worst run)": (write_x, GOAL_WRITE_X_OUTPUT, "x"),
        f"peak free-space drop within {GOAL_FREE_DROP_X_OUTPUT - 1:.0%} of the output's disk use (the run closest "
        "to it: the disk is shared, so other work's writes and deletes move this figure)":
            (drop_x, GOAL_FREE_DROP_X_OUTPUT, "x"),
    }
    res = {}
    for k, (v, g, unit) in out.items():
        met = bool(v) if g is None else (abs(v - 1.0) <= g - 1.0 if "free-space" in k else v <= g)
        res[k] = {"value": v, "goal": g, "unit": unit, "met": met}
    return res


def _mib(n: float | None) -> str:
    return rep.fmt(None if n is None else n / 2**20, 0, " MiB")


def render_markdown(result: dict[str, Any]) -> str:
    rows, st, base = result["results"], result["state"], result["baseline"]
    x = lambda v: rep.fmt(v, 2, "x")  # noqa: E731
    order = [CP, CP_SYNC, OURS, OURS_LIB] + ([OURS_Z1] if OURS_Z1 in rows else [])
    table = rep.markdown_table(
        ["method", "median s", "GB/s", "/ (cp -r + fsync)", "/ cp -r", "peak RSS", "RSS above idle",
         "CPU s (user + sys)"],
        [[f"**{n}**" if n == OURS else n, rep.fmt(r["median_secs"]), rep.fmt(r["gbps"]), x(r["vs_cp_sync"]),
          x(r["vs_cp"]), _mib(r.get("maxrss_bytes")),
          _mib(r["maxrss_bytes"] - base["maxrss_bytes"]) if r.get("maxrss_bytes") and n != CP else "—",
          f"{r['cpu_secs']:.2f} ({r['user_secs']:.2f} + {r['sys_secs']:.2f})" if r.get("cpu_secs") else "—"]
         for n in order for r in [rows[n]]])
    each = rep.markdown_table(["method", "seconds, each repeat"],
                              [[n, " ".join(f"{s:.2f}" for s in rows[n]["secs"])] for n in order])
    amp_rows = []
    for name, a in result["load_from_source"].items():
        amp_rows.append([f"{a['source_layout']} -> {a['target']}", len(a["ranks"]),
                         rep.fmt(a["bytes_needed"] / rep.GB, 3),
                         rep.fmt(a["bytes_read"] / rep.GB, 3), rep.fmt(a["amplification"], 4),
                         rep.fmt(a["max_rank_amplification"], 4), rep.fmt(a["local_bytes"] / rep.GB, 3),
                         rep.fmt(a["secs"]), rep.fmt(a["gbps_needed"]),
                         ("equal" if not a["mismatches"] else f"DIFFERENT: {a['mismatches'][:3]}")
                         if a["verified_against"] else "—"])
    amp = rep.markdown_table(["source -> target ranks", "ranks", "GB needed", "GB read", "amplification",
                              "worst rank", "GB local (with padding)", "cold s", "GB/s needed", "vs resharded copy"],
                             amp_rows)
    d = result["disk_last_run"]
    runs = [x for m in (OURS, OURS_Z1) for x in result["disk_each_run"].get(m, [])]
    seen = {p: n for x in runs for p, n in x["transient_files"].items()}
    commit_tmp = {p: n for p, n in seen.items() if COMMIT_TMP in p}
    other_tmp = {p: n for x in runs for p, n in x["temporary_copies"].items()}
    parts = [f"{len(commit_tmp)} manifest commit tmp file(s) (`manifest.json.tmp-*`, the atomic commit renamed "
             f"over `manifest.json`; largest size seen {max(commit_tmp.values()):,} B)"] if commit_tmp else []
    if other_tmp:
        parts.append("TEMPORARY COPIES: " + ", ".join(f"`{p}` ({n:,} B)" for p, n in other_tmp.items()))
    transient = "; ".join(parts) or "none"
    disk = rep.markdown_table(["destination of the last reshard", "value"], [
        ["files", d["dst_files"]],
        ["apparent bytes (file sizes)", f"{d['dst_apparent_bytes']:,}"],
        ["allocated bytes (du)", f"{d['dst_allocated_bytes']:,}"],
        ["bytes its manifest lists (data files + manifest.json)", f"{d['manifest_listed_bytes']:,}"],
        ["tensor bytes (logical state)", f"{st['tensor_bytes']:,}"],
        ["manifest.json", f"{d['manifest_bytes']:,}"],
        ["files seen during any reshard run and gone after it (sampled)", transient],
        ["new files outside source and destination, any run",
         ", ".join(sorted({p for x in runs for p in x["stray_files"]})) or "none"],
        ["scratch-dir samples taken during the run", d["watch_samples"]],
    ])
    gbs = lambda v: " ".join(f"{b / rep.GB:.3f}" for b in v)  # noqa: E731
    io = rep.markdown_table(
        ["method", "output on disk, GB (du)", "GB written to storage, each run", "GB read from storage, each run",
         "peak free-space drop, GB, each run"],
        [[n, gbs(rows[n]["output_allocated_each"][:1]), gbs(rows[n]["storage_write_bytes"]),
          gbs(rows[n]["storage_read_bytes"]), gbs(rows[n]["peak_free_drop_each"])]
         for n in (CP, OURS, OURS_Z1) if n in rows])
    goal_lines = "\n".join(
        f"- {k}: **{'met' if v['met'] else 'not met'}**"
        + (f" ({v['value']:.3f}{(' ' if v['unit'] and not v['unit'].startswith('x') else '') + v['unit']})"
           if v["goal"] is not None else "") for k, v in result["goals"].items())
    cache = result["cache_note"] + ". " if result["cache_note"] else ""
    cold = ("the source's files were evicted from the page cache (`POSIX_FADV_DONTNEED`) before every run"
            if result["cache_mode"] == "fadvise" else
            "the page cache was dropped before every run" if result["cache_mode"] == "drop" else
            "the page cache was NOT dropped (warm reads)")
    mc = st["model_config"]
    srcs = result["sources"]
    load_avg = ("Load average (1, 5, 15 min) at the start and at the end: "
                + " and ".join(str(v) for v in result["load_average_start_end"])
                + f" on {result['machine']['usable_cores']} cores (other work shared the machine when above ~1).")
    prof = result.get("profile")
    model = (f"`{mc['family']}_tiny(...)` (`--quick`)" if result["quick"]
             else f"`megatron_ref.sized(\"{mc['family']}\", {result['millions']})`")
    return f"""# Offline reshard vs copying the bytes

Generated by `{result['command']}` (git {result['git']}).

Machine: {rep.describe_machine_md(result['machine'])} {load_avg}

State: the reference model {model} (hidden {mc['hidden']},
{mc['layers']} layers, {mc['heads']} heads, ffn {mc['ffn']}, vocab {mc['vocab']}, tied={mc['tied']}),
{st['num_params'] / 1e6:.1f} M parameters; weights and both Adam moments in fp32, {st['tensor_bytes'] / rep.GB:.3f} GB
of tensors. Largest tensor: `{st['largest_tensor']}`, {st['largest_tensor_bytes'] / 2**20:.0f} MiB. Source
checkpoint: as every rank of `{srcs['zero0']['layout']}` would have saved it ({srcs['zero0']['files']} files,
{srcs['zero0']['apparent_bytes'] / rep.GB:.3f} GB); target layout `{result['target']}`
({result['target_ranks']} ranks). Every timed run reads the same source directory, and {cold}. {cache}Medians of
{result['repeats']} repeat(s); the methods run interleaved, their order rotating from repeat to repeat, each into a
fresh directory deleted afterwards. A ratio is the median of per-repeat ratios. GB/s are 10^9 bytes of tensor data
per second.

- `cp -r`: `cp -r SRC DST` (coreutils; it does not fsync). `cp -r + fsync` adds an fsync of every copied file and
  directory afterwards, which makes it as durable as ckpt's output: this is the copy time the goal compares with.
- `ckpt reshard (CLI process)`: wall time of `python -m ckpt.cli reshard SRC DST --to {result['target']} --json
  --no-progress` in a fresh process: Python start and imports (an idle process doing the same imports takes
  {base['wall_secs']:.2f} s, {base['cpu_secs']:.2f} CPU s and {base['maxrss_bytes'] / 2**20:.0f} MiB), the CLI's
  dry-run plan, then the reshard.
  `reshard() inside the CLI` is the `seconds` that command reports (the second `reshard` call only).
- Peak RSS: `ru_maxrss` of that child from `os.wait4` (its own, not the maximum over all children); "RSS above
  idle" subtracts the idle import process.

{table}

{each}

## Load-time read amplification (loading each target rank from the source)

`export_rank(SOURCE, binding of {result['target']}, rank)` for every target rank, from a cold cache; bytes read are
`ChunkReader.bytes_read` (every reader `export_rank` creates), bytes needed are the bytes of the logical pieces the
rank's layout holds (every local copy, padding excluded: TP-replicated norms and biases count on each TP rank,
the tied embedding on the first and the last stage, so more than the checkpoint's tensor bytes). Each rank's
tensors were compared with the same rank exported from the resharded checkpoint.

{amp}

## No temporary copy

A watcher thread listed every file under the scratch directory and sampled the file system's free space every
20 ms during each run. "Written to" and "read from storage" are the child process's own I/O accounting
(`write_bytes - cancelled_write_bytes` and `read_bytes` of `/proc/self/io` around the reaped child): a temporary copy
would show as about twice the output, however briefly it lived. The free-space drop covers the whole disk, which
other work shares.

{disk}

{io}

Goals of the issue (reported, not asserted):

{goal_lines}
{_profile_md(prof, result)}"""


def _profile_md(prof: dict[str, Any] | None, result: dict[str, Any]) -> str:
    if not prof:
        return ""
    z1 = result.get("profile_zero1")
    headers = ["phase (nested phases also count in their parents)", "seconds", "calls", "of wall"]
    if z1:
        headers += ["ZeRO-1 source: seconds", "calls"]
    rows = [[k, rep.fmt(v, 3), prof["phase_calls"][k], rep.fmt(100 * v / prof["wall_secs"], 0, "%")]
            + ([rep.fmt(z1["phase_secs"][k], 3), z1["phase_calls"][k]] if z1 else [])
            for k, v in prof["phase_secs"].items() if k not in prof["not_found"]]
    rows.append(["**wall**", rep.fmt(prof["wall_secs"], 3), "", ""] + (["**" + rep.fmt(z1["wall_secs"], 3) + "**", ""]
                                                                    if z1 else []))
    table = rep.markdown_table(headers, rows)
    zero1 = (f" The same for the ZeRO-1 source: wall {z1['wall_secs']:.3f} s, {z1['source_chunks']} source chunks, "
             f"{z1['bytes_read'] / rep.GB:.3f} GB read." if z1 else "")
    return (f"\n## Where the reshard's time goes\n\nOne extra in-process `reshard()` from the cold source after the "
            f"timed runs: wall {prof['wall_secs']:.3f} s, {prof['chunks_written']} chunks written, "
            f"{prof['bytes_read'] / rep.GB:.3f} GB read for {prof['bytes_written'] / rep.GB:.3f} GB written.{zero1} "
            f"The CLI plans twice (a dry run for the progress bar, then the real call): the dry run alone takes "
            f"{prof['dry_run_plan_secs']:.3f} s.\n\n{table}\n"
            + ("\n" + result["analysis"] + "\n" if result.get("analysis") else ""))


def analysis(result: dict[str, Any]) -> str:
    """Where the library limits the result, in numbers from this run."""
    prof, rows, base = result["profile"], result["results"], result["baseline"]
    if not prof:
        return ""
    ph, calls = prof["phase_secs"], prof["phase_calls"]
    load = ph["read: _SourceBox.materialize (alloc + read_box)"]
    region = ph["read: ChunkReader.read_region"]
    pread = ph["read: pread (LocalStorage.readinto)"]
    verify = ph["read: verify xxh3 (ChunkReader._verify)"]
    append = ph["write: LocalStreamWriter.append"]
    pwrite = ph["write: O_DIRECT pwrite (_pwrite_all)"]
    write = append + ph["write: LocalStreamWriter.close (flush + fsync)"]
    plan = ph["plan: target rank layouts (_candidates)"] + ph["plan: plan_global_writes"]
    bounce = region - pread - verify
    paths_text = ", ".join(f"{v['calls']} reads {k} ({v['bytes'] / rep.GB:.2f} GB)"
                           for k, v in prof["read_paths"].items())
    around = (load - region) + (append - pwrite - ph["write: encode (contiguous + xxh3)"])
    small = prof["chunk_sizes_written"]
    n_small = small["< 64 KiB"]["chunks"] + small["64 KiB - 1 MiB"]["chunks"]
    b_small = small["< 64 KiB"]["bytes"] + small["64 KiB - 1 MiB"]["bytes"]
    gb_w, gb_r = prof["bytes_written"] / rep.GB, prof["bytes_read"] / rep.GB
    cli_overhead = rows[OURS]["median_secs"] - rows[OURS_LIB]["median_secs"]
    z1 = result.get("profile_zero1")
    zero1 = []
    if z1:
        zp = z1["phase_secs"]
        grew = sorted(((zp[k] - ph[k], k) for k in ph if k in zp and ":" in k), key=lambda t: -abs(t[0]))[:3]
        zero1 = [f"- ZeRO-1 source (moments saved from flat partitions): {z1['source_chunks']} source chunks instead "
                 f"of {prof['source_chunks']}, {z1['phase_calls']['read: ChunkReader.read_region']} reads instead of "
                 f"{calls['read: ChunkReader.read_region']}, wall {z1['wall_secs']:.2f} s instead of "
                 f"{prof['wall_secs']:.2f} s. Largest differences: "
                 + ", ".join(f"{k.split(': ', 1)[1]} ({d:+.2f} s)" for d, k in grew) + "."]
    return "\n".join([
        "What limits the result (from the phases above and the tables):",
        f"- Reads and writes do not overlap: one thread reads a box ({load:.2f} s in `_SourceBox.materialize`), then "
        f"writes it ({write:.2f} s in `append`/`close`), box after box: together {load + write:.2f} s of the "
        f"{prof['wall_secs']:.2f} s wall. The disk work alone is {pread:.2f} s of `pread` ({gb_r / pread:.2f} GB/s "
        f"cold) plus {pwrite:.2f} s of O_DIRECT `pwrite` ({gb_w / pwrite:.2f} GB/s); reading box *n+1* while box *n* "
        "is written would bring the wall towards the larger of the two.",
        f"- Many small boxes: {prof['chunks_written']} chunks written (from {prof['source_chunks']} source chunks), "
        f"{n_small} of them under 1 MiB ({b_small / 2**20:.0f} MiB in all): the fused QKV weights and biases are "
        "described head by head, so each head of each of q/k/v (weights and both moments) is its own box, read "
        f"with its own `pread` ({calls['read: pread (LocalStorage.readinto)']} in all) and copied through the "
        "writer's aligned buffer. Small random `pread`s also defeat readahead: "
        f"{gb_r / pread:.2f} GB/s here against about 2 GB/s for one large sequential cold read on this disk.",
        f"- Bounce buffers: `read_region` spends {bounce:.2f} s outside `pread` and xxh3. Only a whole chunk read "
        "into a contiguous destination goes straight into it; any other read (a chunk that is a row band of a "
        "column-sharded box, a part of a chunk) gets its own newly allocated buffer (`torch.empty`; large ones are "
        "fresh pages from the kernel) and a `copy_` into the destination. Reading row runs straight into the "
        f"destination with `preadv`, or reusing one buffer, would remove most of it. Here: {paths_text}. Per-box "
        "bookkeeping around the calls "
        f"(read planning, `torch.empty` of the box, the writer's accounting) adds {around:.2f} s.",
        f"- Checksums are cheap: {verify + ph['write: xxh3 (block_digests)']:.2f} s of xxh3 (every block read is "
        "verified, every block written hashed), on the same thread.",
        f"- Planning: {plan:.2f} s per `reshard` call plus {ph['read manifest']:.2f} s to parse the source manifest "
        f"and {ph['commit manifest']:.2f} s to write the new one; the CLI plans twice (its dry run for the progress "
        f"bar took {prof['dry_run_plan_secs']:.2f} s).",
        f"- The CLI process costs {cli_overhead:.2f} s more than the `reshard()` it runs: Python start and imports "
        f"(an idle process with the same imports: {base['wall_secs']:.2f} s) plus that dry run. On a 4 GB "
        "checkpoint this fixed cost is what separates the CLI from the library call.",
        f"- CPU: the CLI process used {rows[OURS]['cpu_secs']:.2f} s of CPU ({rows[OURS]['user_secs']:.2f} user + "
        f"{rows[OURS]['sys_secs']:.2f} sys) in {rows[OURS]['median_secs']:.2f} s of wall time (medians), on "
        f"{result['machine']['usable_cores']} cores shared with other work; the kernel's page-cache copies of the "
        "buffered `pread`s count as sys time.",
    ] + zero1)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, base, st = result["results"], result["baseline"], result["state"]
    order = [n for n in (CP, CP_SYNC, OURS, OURS_LIB, OURS_Z1) if n in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12.0, 4.8))
    bars = a1.bar(range(len(order)), [rows[n]["vs_cp_sync"] for n in order],
                  color=["tab:grey", "tab:grey", "tab:blue", "tab:cyan", "tab:purple"][: len(order)])
    a1.bar_label(bars, labels=[f"{rows[n]['vs_cp_sync']:.2f}x\n{rows[n]['median_secs']:.2f} s" for n in order],
                 fontsize=7, padding=2)
    a1.axhline(GOAL_COPY_RATIO, linestyle="--", linewidth=0.8, color="grey")
    a1.text(-0.45, GOAL_COPY_RATIO, f"goal: {GOAL_COPY_RATIO}x", fontsize=7, va="bottom", ha="left", color="grey")
    a1.set_ylim(0, max([rows[n]["vs_cp_sync"] for n in order] + [GOAL_COPY_RATIO]) * 1.2)
    a1.set_xticks(range(len(order)))
    a1.set_xticklabels([n.replace(" (", "\n(").replace(", ", ",\n") for n in order], fontsize=7)
    a1.set_ylabel("time / time of cp -r + fsync (lower is better)")
    a1.set_title(f"{st['tensor_bytes'] / rep.GB:.2f} GB, {result['sources']['zero0']['layout']} -> "
                 f"{result['target']}: median of {result['repeats']} per-repeat\nratios to cp -r + fsync "
                 "(labels: ratio, median seconds)", fontsize=9)
    mem = {"ckpt reshard\n(peak RSS - idle)": rows[OURS]["maxrss_bytes"] - base["maxrss_bytes"]}
    if OURS_Z1 in rows:
        mem["ZeRO-1 source\n(peak RSS - idle)"] = rows[OURS_Z1]["maxrss_bytes"] - base["maxrss_bytes"]
    mem["largest tensor"] = st["largest_tensor_bytes"]
    bars = a2.bar(range(len(mem)), [v / 2**20 for v in mem.values()], color="tab:green")
    a2.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    g2 = GOAL_RSS_X_LARGEST * st["largest_tensor_bytes"] / 2**20
    a2.axhline(g2, linestyle="--", linewidth=0.8, color="grey")
    a2.text(-0.45, g2, f"goal: {GOAL_RSS_X_LARGEST}x the largest tensor", fontsize=7, va="bottom", ha="left",
            color="grey")
    a2.set_xticks(range(len(mem)))
    a2.set_xticklabels(list(mem), fontsize=7)
    a2.set_ylabel("MiB")
    amp = result["load_from_source"]["zero0"]["amplification"]
    a2.set_title(f"Reshard process RSS above an idle python + imports ({base['maxrss_bytes'] / 2**20:.0f} MiB);\n"
                 f"read amplification loading from the source: {amp:.3f}", fontsize=9)
    rep.save_figure(fig, path)


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reshard", description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="gpt", choices=("gpt", "llama"))
    ap.add_argument("--millions", type=int, default=350, help="model size: 125, 350, 760 or 1300 (default 350)")
    ap.add_argument("--from", dest="source", default=SOURCE, help=f"source layout (default {SOURCE})")
    ap.add_argument("--to", dest="target", default=TARGET, help=f"target layout (default {TARGET})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/benchmarks", help="where reshard.{json,md,png} go")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a new /tmp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny model, 1 repeat")
    ap.add_argument("--cache", choices=rep.CACHE_MODES, default="fadvise",
                    help="how reads are made cold: fadvise the source files out of the page cache (default), drop "
                         "the whole page cache (root; it also evicts torch's libraries, so every CLI run would pay "
                         "a cold import that cp does not), or warm (no eviction)")
    ap.add_argument("--no-zero1", action="store_true", help="skip the ZeRO-1 source")
    ap.add_argument("--no-profile", action="store_true", help="skip the instrumented in-process reshard")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    from resharding.spec_bind import parse_parallel, world_size_of

    src_layout = parse_parallel(args.source)
    zero1_layout = dict(src_layout, zero=1)
    lay_text = lambda d: ",".join(f"{k}={v}" for k, v in d.items()  # noqa: E731
                                  if (k, v) not in (("ep", 1), ("zero", 0)))
    t_start = time.perf_counter()
    base = tempfile.mkdtemp(prefix="ckpt-reshard-bench-", dir=args.dir)
    try:
        cache = rep.CacheControl.choose(args.cache)
        load_avg_start = rep.load_average()
        sources = {"zero0": lay_text(src_layout)} | ({} if args.no_zero1 else {"zero1": lay_text(zero1_layout)})
        cmd = [sys.executable, "-m", "benchmarks._reshard_setup", "--family", args.family, "--millions",
               str(args.millions), "--dir", base] + (["--quick"] if args.quick else [])
        cmd += [a for n, lay in sources.items() for a in ("--source", f"{n}={lay}")]
        print(f"building the source checkpoint(s) under {base} ...", file=sys.stderr)
        setup = run_child(cmd)
        built = json.loads(setup.stdout.strip().splitlines()[-1])
        src = {n: os.path.join(base, n) for n in sources}
        src_dirs = list(src.values())
        tensor_bytes = built["sources"]["zero0"]["bytes_written"]
        print(f"  {built['num_params'] / 1e6:.1f} M params, {tensor_bytes / rep.GB:.3f} GB of tensors; set-up "
              f"{setup.wall_secs:.1f} s, peak RSS {setup.maxrss_bytes / 2**30:.2f} GiB; cache mode {cache.mode}",
              file=sys.stderr)
        baselines = [run_child([sys.executable, "-c", IMPORTS]) for _ in range(args.repeats)]
        methods = [CP, OURS] + ([] if args.no_zero1 else [OURS_Z1])
        samples: dict[str, list[Sample]] = {m: [] for m in methods}
        last: Sample | None = None
        dst = os.path.join(base, "dst")
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                if m == CP:
                    s = run_cp(src["zero0"], os.path.join(base, "copy"), base, cache)
                    extra = f"+ fsync {s.fsync_secs:.2f} s"
                else:
                    keep = m == OURS and r == args.repeats - 1
                    s = run_reshard(src["zero0" if m == OURS else "zero1"], dst if keep else os.path.join(base, "out"),
                                    args.target, base, src_dirs, cache, keep=keep)
                    if keep:
                        last = s
                    extra = f"(reshard() {s.lib_secs:.2f} s) peak RSS {s.maxrss_bytes / 2**20:.0f} MiB"
                samples[m].append(s)
                print(f"  repeat {r}: {m:30s} {s.secs:7.2f} s {extra}", file=sys.stderr)
        assert last is not None
        print("loading every target rank from the source(s) ...", file=sys.stderr)
        amp = {}
        for n, path in src.items():
            amp[n] = load_from_source(path, args.target, cache, verify_against=dst if n == "zero0" else None)
            amp[n]["source_layout"] = sources[n]
            print(f"  {sources[n]} -> {args.target}: read amplification {amp[n]['amplification']:.4f}, "
                  f"{amp[n]['secs']:.2f} s, mismatches {amp[n]['mismatches']}", file=sys.stderr)
        shutil.rmtree(dst)
        prof = None if args.no_profile else profile_reshard(src["zero0"], os.path.join(base, "profile"),
                                                            args.target, cache)
        prof_z1 = None if args.no_profile or args.no_zero1 else profile_reshard(
            src["zero1"], os.path.join(base, "profile"), args.target, cache)
        src_info = {}
        for n, lay in sources.items():
            u = usage(src[n])
            src_info[n] = {"layout": lay, **u, "build_secs": built["sources"][n]["secs"]}
        rows = summarize(samples, tensor_bytes)
        result: dict[str, Any] = {
            "benchmark": "reshard", "command": rep.command_line(), "git": rep.git_revision(REPO),
            "unix_time": time.time(), "machine": rep.machine_info(base),
            "load_average_start_end": [load_avg_start, rep.load_average()], "repeats": args.repeats,
            "family": args.family, "millions": args.millions, "quick": args.quick,
            "cache_mode": cache.mode, "cache_note": cache.note,
            "state": {"model_config": built["model_config"], "num_params": built["num_params"],
                      "tensor_bytes": tensor_bytes, "largest_tensor": built["largest_tensor"],
                      "largest_tensor_bytes": built["largest_tensor_bytes"],
                      "setup_secs": setup.wall_secs, "setup_maxrss_bytes": setup.maxrss_bytes},
            "sources": src_info, "target": lay_text(parse_parallel(args.target)),
            "target_ranks": world_size_of(parse_parallel(args.target)),
            "baseline": {"command": f"python -c '{IMPORTS}'",
                         "maxrss_bytes": rep.median([b.maxrss_bytes for b in baselines]),
                         "wall_secs": rep.median([b.wall_secs for b in baselines]),
                         "cpu_secs": rep.median([b.cpu_secs for b in baselines])},
            "results": rows, "disk_last_run": last.disk, "cli_doc_last_run": last.doc,
            "disk_each_run": {m: [s.disk for s in ss] for m, ss in samples.items()},
            "load_from_source": amp, "profile": prof, "profile_zero1": prof_z1,
        }
        result["goals"] = goals(result)
        result["analysis"] = analysis(result) if prof else ""
        result["total_secs"] = time.perf_counter() - t_start
    finally:
        shutil.rmtree(base, ignore_errors=True)
    md = rep.write_outputs(args.out, "reshard", result, render_markdown, plot)
    print(md)
    return result


if __name__ == "__main__":
    main()
