"""The checkpointing methods ``benchmarks.training_stall`` compares, and its probes.

Callers: ``benchmarks.training_stall`` only. A ``Method`` is one way to checkpoint inside a training loop (ours in
three configurations, ``torch.save``, DCP ``save`` and three DCP ``async_save`` set-ups); the probes check whether
DCP's stagers copy CPU tensors, time what kinds of background work cost a training iteration without any
library, and time the first saves whose allocations the runs skip.
"""

from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any

import torch

from benchmarks import _report as rep
from benchmarks.gpt import GPT, GPTConfig, synthetic_batch, train_step

GOAL_DISK_EVERY = 10

BASE = "no checkpointing"
OURS_MEM = "ours: memory"
OURS_DISK = "ours: memory + disk"
OURS_GOAL = "ours: memory every 1 + disk every 10"
TORCH = "torch.save + fsync"
DCP = "DCP save"
DCP_ASYNC = "DCP async_save (thread, as-is)"
DCP_CLONE = "DCP async_save + clone first (thread)"
DCP_PROC = "DCP async_save (process, cached shm stager)"
ORDER = [BASE, OURS_MEM, OURS_DISK, OURS_GOAL, TORCH, DCP, DCP_ASYNC, DCP_CLONE, DCP_PROC]
ASYNC_REFS = [DCP_ASYNC, DCP_CLONE, DCP_PROC]



# -- the methods -------------------------------------------------------------------------------------------------
class CachingAllocator:
    """A ``ckpt.pool.SegmentAllocator`` that keeps freed segments for the next Checkpointer of this benchmark, so
    every run finds its pool already allocated and touched, as a long training run would after its first save."""

    def __init__(self) -> None:
        from ckpt.pool import HostAllocator

        self.inner = HostAllocator()
        self.free_segments: list[torch.Tensor] = []

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        for i, seg in enumerate(self.free_segments):
            if seg.numel() >= nbytes:
                return self.free_segments.pop(i)
        return self.inner.allocate(nbytes, name)

    def free(self, segment: torch.Tensor, name: str) -> None:
        self.free_segments.append(segment)


class Shared:
    """What methods keep across runs: our pool's segments and DCP's cached stager (both allocated once)."""

    def __init__(self) -> None:
        self.allocator = CachingAllocator()
        self.dcp_stager: Any = None
        self.cuda = False  # the model trains on a CUDA device: DCP's stager pins its host copies

    def stager(self) -> Any:
        if self.dcp_stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            class KeptStager(DefaultStager):
                """Keeps its copies across saves, as DCP intends a reused stager to. torch 2.11's async staging
                thread (``DefaultStager._stage``) closed the inner ``StateDictStager`` after every staging, which
                drops the cached copies and empties its copy dispatch table, so the next save failed with
                ``KeyError: <class 'type'>`` (seen on the H200 node; torch 2.13 no longer does this). Closing is
                left to the benchmark, once, at the end."""

                def __init__(self, options: Any) -> None:
                    super().__init__(options)
                    inner = self._state_dict_stager
                    self._inner_close = inner.close
                    inner.close = lambda: None

                def close_for_good(self) -> None:
                    self._state_dict_stager.close = self._inner_close
                    self.close()

            self.dcp_stager = KeptStager(StagingOptions(use_pinned_memory=self.cuda, use_shared_memory=True,
                                                        use_async_staging=True, use_non_blocking_copy=self.cuda))
        return self.dcp_stager

    def close(self) -> None:
        if self.dcp_stager is not None:
            self.dcp_stager.close_for_good()
            self.dcp_stager = None
        self.allocator.free_segments.clear()


SHARED = Shared()


class Method:
    """One way to checkpoint during training. The harness calls ``setup``, then per iteration ``due(step)`` and,
    when due, ``save(step)`` after ``optimizer.step()``; ``drain`` once at the end, then ``close``."""

    name = BASE
    how = "trains without saving"

    def __init__(self, k: int) -> None:
        self.k = k
        self.details: dict[int, dict[str, Any]] = {}  # per saved step
        self.post_wait_secs: dict[int, float] = {}  # waits a save causes before the next update

    def due(self, step: int) -> bool:
        return False

    def setup(self, model: GPT, optim: torch.optim.Optimizer, workdir: str) -> None:
        self.model, self.optim, self.workdir = model, optim, workdir

    def save(self, step: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def busy(self) -> bool:
        """Is background work of an earlier save still running (copies, flushes, uploads)?"""
        return False

    def close(self) -> None:
        pass

    def timed_start(self) -> None:
        """Called after warm-up: forget what the warm-up saves recorded."""
        self.details.clear()
        self.post_wait_secs.clear()

    def _ring(self, step: int) -> str:
        """Two alternating targets, so the previous checkpoint stays whole while the next one is written."""
        return os.path.join(self.workdir, f"ckpt{(step // self.k) % 2}")


class Ours(Method):
    def __init__(self, k: int, name: str, memory_every: int, disk_every: int) -> None:
        super().__init__(k)
        self.name, self.memory_every, self.disk_every = name, memory_every, disk_every
        every = {k: "k", 0: "0"} if name != OURS_GOAL else {}
        self.how = (f"Checkpointer(dir, memory_every={every.get(memory_every, memory_every)}, disk_every="
                    f"{every.get(disk_every, disk_every)}, keep_last=2); state {{'model': model, 'optim': optim}}")
        self.metrics: list[Any] = []

    def due(self, step: int) -> bool:
        return any(e and step % e == 0 for e in (self.memory_every, self.disk_every))

    def setup(self, model: GPT, optim: torch.optim.Optimizer, workdir: str) -> None:
        from ckpt import Checkpointer

        super().setup(model, optim, workdir)
        self.cp = Checkpointer(os.path.join(workdir, "ckpt"), memory_every=self.memory_every,
                               disk_every=self.disk_every, keep_last=2, allocator=SHARED.allocator)
        self.state = {"model": model, "optim": optim}
        self.first_timed = 0
        self.handles: list[Any] = []

    def timed_start(self) -> None:
        super().timed_start()
        self.first_timed = len(self.cp.metrics)

    def save(self, step: int) -> None:
        self.handles = [h for h in self.handles if not h.done()] + [self.cp.save(step, self.state)]

    def busy(self) -> bool:
        return any(not h.done() for h in self.handles)

    def drain(self) -> None:
        self.cp.wait()
        self.metrics = self.cp.metrics[self.first_timed:]
        for m in self.metrics:
            self.details[m.step] = asdict(m)
            self.post_wait_secs[m.step] = m.lazy_wait_secs

    def close(self) -> None:
        self.cp.close()


def _model_optim_state(model: GPT, optim: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


class TorchSave(Method):
    name, how = TORCH, "torch.save({model, optim state_dict}) to one of two files, then os.fsync"

    def due(self, step: int) -> bool:
        return step % self.k == 0

    def save(self, step: int) -> None:
        path = self._ring(step) + ".pt"
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optim": self.optim.state_dict()}, path)
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.details[step] = {"torch_save_secs": t1 - t0, "fsync_secs": time.perf_counter() - t1}


class DcpSave(Method):
    name, how = DCP, "dcp.save(get_state_dict(model, optim)) into one of two directories (fsyncs by default)"

    def due(self, step: int) -> bool:
        return step % self.k == 0

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        sd = _model_optim_state(self.model, self.optim)
        t1 = time.perf_counter()
        dcp.save(sd, checkpoint_id=self._ring(step))
        self.details[step] = {"state_dict_secs": t1 - t0, "dcp_save_secs": time.perf_counter() - t1}


class DcpAsync(Method):
    """``variant``: ``as-is`` (thread executor, the default stager async_save makes per call), ``clone`` (the
    same after cloning every tensor) or ``process`` (process executor; one ``DefaultStager`` kept for the whole
    run, shared memory, staging in its thread; the optimizer's pre-step hook waits for that staging)."""

    def __init__(self, k: int, variant: str) -> None:
        super().__init__(k)
        self.variant = variant
        self.name = {"as-is": DCP_ASYNC, "clone": DCP_CLONE, "process": DCP_PROC}[variant]
        self.how = {
            "as-is": "dcp.async_save(sd, checkpoint_id=dir): thread executor, a new DefaultStager per call",
            "clone": "clone every tensor of sd, then as-is",
            "process": "dcp.async_save(..., async_checkpointer_type=PROCESS, async_stager=DefaultStager("
                       f"StagingOptions(use_pinned_memory={SHARED.cuda}, use_shared_memory=True, use_async_staging="
                       f"True, use_non_blocking_copy={SHARED.cuda}))), one stager for the whole benchmark (it caches "
                       "its copies); an optimizer pre-step hook waits for staging_completion",
        }[variant]
        self.pending: Any = None
        self.pending_step = -1
        self.staging_pending = False

    def due(self, step: int) -> bool:
        return step % self.k == 0

    def setup(self, model: GPT, optim: torch.optim.Optimizer, workdir: str) -> None:
        super().setup(model, optim, workdir)
        self.stager, self.hook = None, None
        if self.variant == "process":
            self.stager = SHARED.stager()
            self.hook = optim.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optim: Any, args: Any, kwargs: Any) -> None:
        if self.staging_pending:
            t0 = time.perf_counter()
            self.pending.staging_completion.result()
            self.staging_pending = False
            self.post_wait_secs[self.pending_step] = self.post_wait_secs.get(self.pending_step, 0.0) + (
                time.perf_counter() - t0)

    def _upload(self) -> Any:
        return getattr(self.pending, "upload_completion", self.pending)

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        from torch.utils._pytree import tree_map

        d: dict[str, Any] = {}
        t0 = time.perf_counter()
        if self.pending is not None:  # a user must wait for the previous save before starting the next
            self._pre_step(None, None, None)
            self._upload().result()
        t1 = time.perf_counter()
        sd = _model_optim_state(self.model, self.optim)
        t2 = time.perf_counter()
        if self.variant == "clone":
            sd = tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, sd)
        t3 = time.perf_counter()
        kind = AsyncCheckpointerType.PROCESS if self.variant == "process" else AsyncCheckpointerType.THREAD
        self.pending = dcp.async_save(sd, checkpoint_id=self._ring(step), async_checkpointer_type=kind,
                                      async_stager=self.stager)
        self.pending_step, self.staging_pending = step, hasattr(self.pending, "staging_completion")
        d.update(previous_wait_secs=t1 - t0, state_dict_secs=t2 - t1, clone_secs=t3 - t2,
                 async_save_call_secs=time.perf_counter() - t3)
        self.details[step] = d

    def busy(self) -> bool:
        return self.pending is not None and not self._upload().done()

    def drain(self) -> None:
        if self.pending is not None:
            self._pre_step(None, None, None)
            self._upload().result()
            self.pending = None

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pending, self.staging_pending = None, False
            if self.hook is not None:
                self.hook.remove()
                self.hook = None


def methods_for(k: int) -> list[Method]:
    ms: list[Method] = [Ours(k, OURS_MEM, k, 0), Ours(k, OURS_DISK, k, k)]
    if k == GOAL_DISK_EVERY:
        ms.append(Ours(k, OURS_GOAL, 1, GOAL_DISK_EVERY))
    return ms + [TorchSave(k), DcpSave(k), DcpAsync(k, "as-is"), DcpAsync(k, "clone"), DcpAsync(k, "process")]


# -- where ours spends its time ----------------------------------------------------------------------------------
def ours_phase_targets() -> dict[str, tuple[Any, str]]:
    import ckpt.checkpointer as C
    import ckpt.plan_cache as PC
    import ckpt.pool as P
    import ckpt.snapshot_handle as H
    import ckpt.snapshot_layout as L
    import ckpt.stager as ST
    import ckpt.staging as S
    import ckpt.tiers as T

    return {
        "save() total (request)": (C.Checkpointer, "save"),
        "  raise pending errors": (H.BackgroundErrors, "raise_pending"),
        "  full state (adds RNG states)": (C.Checkpointer, "_full_state"),
        "  flatten_state: state_dict() calls + one walk": (C, "flatten_state"),
        "  optimizer signature": (PC, "optimizer_signature"),
        "  sources.update (same-memory checks)": (L.Sources, "update"),
        "  plan / cached layout": (PC.PlanCache, "layout_for"),
        "  pool.acquire (back-pressure)": (P.HostBufferPool, "acquire"),
        "  eager copies": (ST, "copy_all"),
        "  Copier.submit": (S.Copier, "submit"),
        "wait_for_staging (pre-step hook, save)": (C.Checkpointer, "wait_for_staging"),
        "lazy copies (background thread)": (S, "copy_all"),
        "disk flush (background thread)": (T.StorageTier, "flush"),
    }


def leak_probe() -> dict[str, Any]:
    """Do DCP async_save's stagers copy CPU tensors? Update the state in place right after the call (after
    staging completed, for async staging) and read back what was written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    out: dict[str, Any] = {}
    for name, kind, stager in (
            (DCP_ASYNC, AsyncCheckpointerType.THREAD, None),
            (DCP_PROC, AsyncCheckpointerType.PROCESS, DefaultStager(StagingOptions(False, True, True, False)))):
        d = tempfile.mkdtemp(prefix="ckpt-leak-")
        try:
            w = torch.zeros(1 << 20)
            f = dcp.async_save({"w": w}, checkpoint_id=d, async_checkpointer_type=kind, async_stager=stager)
            if hasattr(f, "staging_completion"):
                f.staging_completion.result()
            w.add_(1.0)
            getattr(f, "upload_completion", f).result()
            back = {"w": torch.full((1 << 20,), -1.0)}
            dcp.load(back, checkpoint_id=d)
            out[name] = {"saved_value": float(back["w"][0]), "expected": 0.0,
                         "safe": bool((back["w"] == 0).all())}
        finally:
            if stager is not None:
                stager.close()
            shutil.rmtree(d, ignore_errors=True)
    return out


def interference_probe(model: GPT, optim: torch.optim.Optimizer, cfg: GPTConfig, batch_size: int, rounds: int,
                       workdir: str) -> dict[str, Any]:
    """What background work costs a training iteration on this machine, without any checkpointing library: each
    kind of work runs in a thread started with the iteration; kinds interleave round by round (a shared machine
    drifts), two iterations each per round. Also times each kind alone."""
    srcs = [p.detach() for p in model.parameters()] + [
        v for st in optim.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    # Host copies (pinned for a CUDA model, whose copy then runs on a side stream, as ours does).
    dsts = [torch.zeros(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in srcs]
    side = torch.cuda.Stream() if any(t.is_cuda for t in srcs) else None
    path = os.path.join(workdir, "probe.bin")
    os.makedirs(workdir, exist_ok=True)

    def copy_state() -> None:  # ckpt's own copy routine, as our lazy copy runs it, without the library around it
        from ckpt.staging import copy_all

        if side is None:
            copy_all(list(zip(srcs, dsts)))
            return
        with torch.cuda.stream(side):
            copy_all(list(zip(srcs, dsts)), non_blocking=True)
        side.synchronize()

    def hold_gil(secs: float = 0.25) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < secs:
            pass

    def write_state() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in dsts:
                os.write(fd, memoryview(t.view(-1).view(torch.uint8).numpy()))
            os.fsync(fd)
        finally:
            os.close(fd)

    aligned_bytes = sum(t.numel() * t.element_size() for t in dsts) // 4096 * 4096
    page_aligned = mmap.mmap(-1, aligned_bytes)  # O_DIRECT needs aligned addresses, offsets and lengths
    view = memoryview(page_aligned)
    for off in range(0, aligned_bytes, 64 << 20):
        view[off: off + (64 << 20)] = b"\x5a" * min(64 << 20, aligned_bytes - off)

    def write_direct() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        try:
            for off in range(0, aligned_bytes, 64 << 20):
                os.write(fd, view[off: off + (64 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)

    kinds = {"nothing": None, "copy of the whole state (ckpt.staging.copy_all, as our lazy copy)": copy_state,
             "pure-Python loop holding the GIL for 250 ms": hold_gil,
             "buffered write of the whole state + fsync (one thread, page cache)": write_state,
             "O_DIRECT write of the same bytes + fsync (one thread, no page cache)": write_direct}
    try:
        write_direct()
    except OSError as e:  # a file system without O_DIRECT (tmpfs): leave that kind out
        kinds.pop("O_DIRECT write of the same bytes + fsync (one thread, no page cache)")
        print(f"O_DIRECT refused here ({e}); probe without it", file=sys.stderr)
    alone = {}
    for name, fn in kinds.items():
        if fn is not None:
            alone[name] = min(rep.timed(fn)[0] for _ in range(2))
    iters: dict[str, list[float]] = {n: [] for n in kinds}
    background: dict[str, list[float]] = {n: [] for n in kinds}
    step = 50_000
    try:
        for _ in range(rounds):
            for name, fn in kinds.items():
                for _ in range(2):
                    step += 1
                    box: dict[str, float] = {}
                    th = None if fn is None else threading.Thread(
                        target=lambda fn=fn, box=box: box.setdefault("secs", rep.timed(fn)[0]))
                    t0 = time.perf_counter()
                    if th is not None:
                        th.start()
                    train_step(model, optim, synthetic_batch(cfg, batch_size, step))
                    iters[name].append(time.perf_counter() - t0)
                    if th is not None:
                        th.join()
                        background[name].append(box["secs"])
    finally:
        view.release()
        page_aligned.close()
        shutil.rmtree(workdir, ignore_errors=True)
    base = rep.median(iters["nothing"])
    return {"rounds": rounds, "state_bytes": sum(t.numel() * t.element_size() for t in srcs),
            "kinds": {n: {"median_iter_secs": rep.median(v), "added_secs": rep.median(v) - base,
                          "alone_secs": alone.get(n), "concurrent_secs": rep.median(background[n]) if background[n]
                          else None, "iters_secs": v} for n, v in iters.items()}}


def first_save_costs(model: GPT, optim: torch.optim.Optimizer, cfg: GPTConfig, batch_size: int,
                     workdir: str) -> dict[str, Any]:
    """What the allocations skipped by the runs cost: three saves of a fresh Checkpointer (into the shared cache,
    so the runs then find the pool touched) and two of DCP's cached process stager."""
    from ckpt import Checkpointer

    out: dict[str, Any] = {"request_secs": [], "dcp_proc_staging_secs": []}
    with Checkpointer(os.path.join(workdir, "first"), memory_every=1, disk_every=0, allocator=SHARED.allocator) as cp:
        for step in range(3):
            train_step(model, optim, synthetic_batch(cfg, batch_size, step))
            cp.save(step, {"model": model, "optim": optim})
            cp.wait()
        out["request_secs"] = [m.request_secs for m in cp.metrics]
    m = DcpAsync(1, "process")
    m.setup(model, optim, workdir)
    try:
        for step in range(2):
            m.save(step)
            t0 = time.perf_counter()
            m._pre_step(None, None, None)
            out["dcp_proc_staging_secs"].append(m.details[step]["async_save_call_secs"] + time.perf_counter() - t0)
            m.drain()
    except Exception as e:  # noqa: BLE001 - reported: some torch versions' stagers fail on this state
        out["dcp_proc_error"] = f"{type(e).__name__}: {e}"
        m.pending = None
    finally:
        m.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return out
