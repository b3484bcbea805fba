"""Helpers shared by every benchmark: machine description, cache control, memory tracking, report writers.

Callers: ``benchmarks.<name>`` modules, once per run. Nothing here times anything by itself; it describes where
a measurement ran and writes what was measured as JSON (machine-readable), markdown (for ``docs/``) and a PNG bar
plot (matplotlib's Agg backend, so no display is needed).
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import psutil
import torch

GIB = 1024**3
GB = 1e9


# -- where it ran ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_of(path: str) -> dict[str, str]:
    """Mount point, file system type and device holding ``path`` (the longest matching mount point)."""
    real = os.path.realpath(path)
    best: Any = None
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best.mountpoint)):
            best = part
    if best is None:
        return {"mountpoint": "?", "fstype": "?", "device": "?"}
    return {"mountpoint": best.mountpoint, "fstype": best.fstype, "device": best.device}


def machine_info(target_dir: str | None = None) -> dict[str, Any]:
    """A description of this machine worth printing next to any number measured on it."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernel": platform.release(),
        "torch_threads": torch.get_num_threads(),
    }
    if target_dir is not None:
        info["target_dir"] = target_dir
        info["target_fs"] = filesystem_of(target_dir)
    return info


def git_revision(repo_dir: str) -> str | None:
    """``git describe --always --dirty`` of ``repo_dir``, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", repo_dir, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a machine shared with other work shows it here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine_md(info: dict[str, Any]) -> str:
    """One markdown paragraph describing ``machine_info``'s result."""
    fs = info.get("target_fs")
    where = f"; target `{info['target_dir']}` on {fs['fstype']} ({fs['device']})" if fs else ""
    return (f"{info['cpu_model']}, {info['usable_cores']} usable cores, {info['ram_gib']} GiB RAM, "
            f"Linux {info['kernel']}, Python {info['python']}, torch {info['torch']}{where}.")


# -- page cache --------------------------------------------------------------------------------------------------
def drop_page_cache() -> tuple[bool, str]:
    """``sync`` then ask the kernel to drop clean page-cache pages; -> (done, why not).

    Needs root and a writable ``/proc/sys/vm/drop_caches`` (often read-only inside containers). Reads after a
    successful drop are *cold*: they hit the disk, not memory.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def evict_file_cache(paths: Sequence[str]) -> None:
    """Without root: fsync, then ``POSIX_FADV_DONTNEED`` every file under ``paths`` (files or directories).

    The kernel then drops those files' clean pages, so the next read of them comes from disk (best effort: pages
    another process maps stay).
    """
    files: list[str] = []
    for top in paths:
        if os.path.isdir(top):
            files += [os.path.join(dp, n) for dp, _dirs, names in os.walk(top) for n in names]
        elif os.path.exists(top):
            files.append(top)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


CACHE_MODES = ("drop", "fadvise", "warm")


@dataclass
class CacheControl:
    """How a benchmark makes the next read cold: ``drop`` (all clean pages, needs root), ``fadvise`` (only the
    files read next, no root needed) or ``warm`` (nothing is evicted; ``sync`` only).

    Build it with ``CacheControl.choose(requested)``: asking for ``drop`` where the kernel refuses falls back to
    ``fadvise`` and says why in ``note``.
    """

    mode: str
    note: str = ""

    @classmethod
    def choose(cls, requested: str) -> "CacheControl":
        if requested not in CACHE_MODES:
            raise ValueError(f"cache mode {requested!r}: expected one of {CACHE_MODES}")
        if requested == "drop":
            ok, why = drop_page_cache()
            if not ok:
                return cls("fadvise", f"drop_caches refused ({why}); evicting with POSIX_FADV_DONTNEED instead")
        return cls(requested)

    @property
    def cold(self) -> bool:
        return self.mode != "warm"

    def make_cold(self, paths: Sequence[str] = ()) -> None:
        """Flush dirty pages, then evict according to ``mode`` (``paths``: what is read next, for ``fadvise``)."""
        if self.mode == "drop":
            drop_page_cache()
        elif self.mode == "fadvise":
            os.sync()
            evict_file_cache(paths)
        else:
            os.sync()

    def describe_md(self) -> str:
        if self.mode == "drop":
            return ("The page cache was dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every save and "
                    "between save and load, so the load column is a cold read from disk; the warm column repeats "
                    "the load at once.")
        if self.mode == "fadvise":
            return (f"{self.note + '. ' if self.note else ''}The files were evicted from the page cache with "
                    "`POSIX_FADV_DONTNEED` between save and load, so the load column is a cold read from disk; the "
                    "warm column repeats the load at once.")
        return ("The page cache was not dropped: every load is warm (served from memory), so load figures overstate "
                "the disk.")


# -- memory ------------------------------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakRss:
    """Peak resident-set growth of this process over a ``with`` block, in bytes.

    Uses the kernel's exact high-water mark (``VmHWM`` after a reset through ``/proc/self/clear_refs``) when the
    kernel allows it, and otherwise samples ``psutil`` RSS from a thread every ``interval_secs``. Growth counts
    anonymous memory the block allocated and touched (a ``torch.load`` result, staging buffers); reads into
    preallocated tensors and the page cache do not count.
    """

    interval_secs: float = 0.002
    start_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    method: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def growth_bytes(self) -> int:
        return max(self.peak_bytes - self.start_bytes, 0)

    @property
    def retained_bytes(self) -> int:
        return self.end_bytes - self.start_bytes

    def __enter__(self) -> "PeakRss":
        proc = psutil.Process()
        self.start_bytes = proc.memory_info().rss
        self.peak_bytes = self.start_bytes
        if _reset_vm_hwm() and _vm_hwm_bytes() is not None:
            self.method = "VmHWM"
            self.start_bytes = proc.memory_info().rss
            return self
        self.method = "psutil sampling"
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(self.interval_secs):
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_bytes = psutil.Process().memory_info().rss
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        else:
            self.peak_bytes = max(_vm_hwm_bytes() or 0, self.start_bytes)
        self.peak_bytes = max(self.peak_bytes, self.end_bytes)


# -- the allocator ---------------------------------------------------------------------------------------------
ALLOCATORS = ("cached", "glibc")
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more than HEAP_MAX_SIZE / 2 on 64-bit


def set_allocator(mode: str) -> str:
    """Make glibc's ``malloc`` keep freed memory (``"cached"``) or leave it as it comes (``"glibc"``); returns a
    sentence for the report.

    As it comes, glibc serves blocks above a moving threshold with ``mmap`` and trims the heap's free top, so a CPU
    training iteration hands its activations, gradients and AdamW temporaries back to the kernel and faults them in
    again on the next one: 25 000 to 100 000 minor page faults per iteration of the 100 M GPT on this VM, which made
    its iteration times scatter by +-100 ms. ``"cached"`` fixes the ``mmap`` threshold at 32 MiB and never trims
    (``mallopt``), so freed memory is reused the way a GPU job's caching allocator reuses device memory (and
    jemalloc/tcmalloc, which CPU training guides recommend, reuse host memory). It applies to every method alike.
    Blocks over 32 MiB still come from ``mmap``: ``minor_faults`` shows whether any remain.
    """
    if mode not in ALLOCATORS:
        raise ValueError(f"allocator {mode!r}: expected one of {ALLOCATORS}")
    if mode == "glibc":
        return "glibc `malloc` as it comes (freed memory goes back to the kernel)."
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "glibc `malloc` as it comes: `mallopt` is not available here, so `--allocator cached` had no effect."
    return ("glibc `malloc` told to keep freed memory (`mallopt`: mmap threshold 32 MiB, no trimming), as a GPU job's "
            "caching allocator does; otherwise each CPU iteration returns its temporaries to the kernel and faults "
            "them in again.")


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# -- statistics --------------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


# -- writers -----------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before calling)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number for a table, or an em dash for a missing one."""
    if x is None or x != x:  # None or NaN
        return "—"
    return f"{x:.{digits}f}{suffix}"


def write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def grouped_bar_plot(path: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float | None]],
                     ylabel: str, hline: dict[str, float] | None = None) -> None:
    """A PNG of grouped bars: one group per label, one bar per series (missing values are left out).

    ``hline`` draws labelled horizontal reference lines (e.g. the raw disk figure).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_series = max(len(series), 1)
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n_series - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    for name, y in (hline or {}).items():
        ax.axhline(y, linestyle="--", linewidth=0.8, color="grey")
        ax.text(len(labels) - 0.5, y, name, fontsize=7, va="bottom", ha="right", color="grey")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """Lay ``fig`` out, write it to ``path`` (making its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def command_line() -> str:
    """How this benchmark was invoked, for the report."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return " ".join(["python -m " + spec.name if spec else "python " + sys.argv[0]] + sys.argv[1:])


# -- where time goes ---------------------------------------------------------------------------------------------
class PhaseTimer:
    """Times calls of named functions by wrapping them in place for the duration of a ``with`` block.

    ``PhaseTimer({"checksum": (formats.checksum, "block_digests")})`` records, per phase, the number of calls and
    the sum of their wall durations over every thread (thread-seconds: phases run by several threads at once can
    add up to more than the wall time of the whole). Nested phases are each counted in full. The originals are
    put back on exit. For profiling runs only: the wrapper costs about a microsecond per call.
    """

    def __init__(self, targets: dict[str, tuple[Any, str]]) -> None:
        self.targets = targets
        self.secs: dict[str, float] = {name: 0.0 for name in targets}
        self.calls: dict[str, int] = {name: 0 for name in targets}
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.secs[name] += dt
                    self.calls[name] += 1

        return wrapper

    def __enter__(self) -> "PhaseTimer":
        for name, (owner, attr) in self.targets.items():
            if not hasattr(owner, attr):
                self.missing.append(name)
                continue
            own = attr in vars(owner)  # False: inherited by a class, so restoring means deleting the override
            self._saved.append((owner, attr, vars(owner)[attr] if own else None))
            wrapped = self._wrap(name, getattr(owner, attr))
            if isinstance(inspect.getattr_static(owner, attr), staticmethod):  # else it would receive self
                wrapped = staticmethod(wrapped)
            setattr(owner, attr, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._saved):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._saved.clear()

    def reset(self) -> None:
        with self._lock:
            for name in self.secs:
                self.secs[name] = 0.0
                self.calls[name] = 0


class GcTimer:
    """Wall time of Python's cyclic garbage collector while inside a ``with`` block (``gc.callbacks``), and the
    number of full (generation 2) collections: a pause in the training thread that no profiler of torch shows."""

    def __init__(self) -> None:
        self.secs = 0.0
        self.full_collections = 0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.secs += time.perf_counter() - self._t0
            self.full_collections += info.get("generation") == 2

    def __enter__(self) -> "GcTimer":
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


# -- time series -------------------------------------------------------------------------------------------------
Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def line_plot_panels(path: str, title: str, panels: Sequence[tuple[str, Series]], xlabel: str, ylabel: str,
                     hlines: Sequence[dict[str, float]] | None = None,
                     markers: Sequence[dict[str, Sequence[float]]] | None = None) -> None:
    """A PNG with one line plot per panel (side by side): ``panels`` is ``[(subtitle, {series: (xs, ys)})]``.

    ``hlines[i]`` draws labelled dashed reference lines in panel ``i``; ``markers[i]`` maps a series name to the
    x values to mark with dots on its line (e.g. the iterations that checkpointed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 5.0), squeeze=False)
    for i, (subtitle, series) in enumerate(panels):
        ax = axes[0][i]
        for name, (xs, ys) in series.items():
            (line,) = ax.plot(xs, ys, linewidth=1.2, label=name)
            marked = set((markers[i] if markers and i < len(markers) else {}).get(name, ()))
            if marked:
                pts = [(x, y) for x, y in zip(xs, ys) if x in marked]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", markersize=3.5, color=line.get_color())
        for name, y in ((hlines[i] if hlines and i < len(hlines) else {}) or {}).items():
            ax.axhline(y, linestyle="--", linewidth=0.8, color="grey")
            ax.text(ax.get_xlim()[0], y, " " + name, fontsize=7, va="bottom", ha="left", color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(subtitle, fontsize=10)
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def write_outputs(out_dir: str, name: str, result: dict, render_markdown, plot) -> str:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir``; return the markdown."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), result)
    md = render_markdown(result)
    write_text(os.path.join(out_dir, f"{name}.md"), md)
    plot(result, os.path.join(out_dir, f"{name}.png"))
    return md
