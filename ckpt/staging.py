"""Copies of a snapshot into its slot: eager ones now, lazy ones in the background.

The DataStates-LLM rule: parameters and optimizer state change only inside ``optimizer.step()``, so their copy
may run while the next forward and backward run; the optimizer's pre-step hook waits for it. Everything else
(buffers such as BatchNorm running stats, RNG state, step counters, CPU-side extras) can change at any time and
is copied before ``Checkpointer.save`` returns.

One code path for both devices: on CUDA the lazy copies are queued on a side stream (pinned destination,
``non_blocking``) after it waits for the compute stream, and an event marks the end; on CPU a worker thread does
the same copies and sets a ``threading.Event``. ``StagingHandle.wait()`` is the only synchronisation either way.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Copy = tuple[torch.Tensor, torch.Tensor]  # (source view, destination view in a slot)


@dataclass
class StagingHandle:
    """Completion of one snapshot's lazy copies. ``wait`` is called by the optimizer pre-step hook."""

    step: int
    _event: threading.Event = field(default_factory=threading.Event)
    #: Lazy copies finished so far, in submission order (CPU path); guarded by ``_progress``.
    copied: int = 0
    _progress: threading.Condition = field(default_factory=threading.Condition)
    _cuda_event: Any = None
    error: BaseException | None = None
    copy_secs: float = 0.0
    #: ``perf_counter()`` when the CUDA path queued the copies; the copier thread measures ``copy_secs`` from it.
    queued_at: float | None = None
    waited_secs: float = 0.0
    _callbacks: list[Callable[["StagingHandle"], None]] = field(default_factory=list)

    def done(self) -> bool:
        if not self._event.is_set():
            return False
        return self._cuda_event is None or bool(self._cuda_event.query())

    def wait(self) -> float:
        """Block until the copies finished; return the seconds this call blocked (accumulated in waited_secs)."""
        t0 = time.perf_counter()
        self._event.wait()
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
        blocked = time.perf_counter() - t0
        self.waited_secs += blocked
        return blocked

    def wait_copied(self, index: int) -> None:
        """Block until lazy copy number ``index`` (0-based) is in its slot; raise if staging failed.

        Called by tier flush threads so that each chunk streams out as soon as its own copy is done.
        """
        if self._cuda_event is not None:  # one event for the whole snapshot on the CUDA path
            self._event.wait()
            self._cuda_event.synchronize()
        else:
            with self._progress:
                self._progress.wait_for(lambda: self.copied > index or self._event.is_set())
        if self.error is not None:
            raise RuntimeError(f"staging of step {self.step} failed: {self.error}") from self.error

    def _advance(self, n: int = 1) -> None:
        with self._progress:
            self.copied += n
            self._progress.notify_all()

    def _finish(self) -> None:
        self._event.set()
        with self._progress:
            self._progress.notify_all()


#: ``Checkpointer(background_priority=...)``: how the threads that copy and flush snapshots are scheduled.
BACKGROUND_PRIORITIES = ("normal", "idle")


def set_background_priority(priority: str) -> bool:
    """Schedule the calling thread (and threads it starts later, which inherit it) as ``priority``.

    ``"idle"`` is Linux's ``SCHED_IDLE``: the thread runs only on cores no normal thread wants, and a waking
    normal thread preempts it at once. Unprivileged threads cannot switch back, so it is only ever applied to
    threads that do nothing else. Returns False where the platform has no such policy (nothing changes).
    """
    if priority not in BACKGROUND_PRIORITIES:
        raise ValueError(f"background_priority={priority!r}: expected one of {list(BACKGROUND_PRIORITIES)}")
    if priority == "normal":
        return True
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


#: Copies are issued in batches of about this many bytes, one ``torch._foreach_copy_`` call each.
COPY_BATCH_BYTES = 64 * 1024 * 1024


def _batches(copies: list[Copy]) -> list[list[Copy]]:
    out: list[list[Copy]] = []
    nbytes = COPY_BATCH_BYTES
    for c in copies:
        if nbytes >= COPY_BATCH_BYTES:
            out.append([])
            nbytes = 0
        out[-1].append(c)
        nbytes += c[1].numel() * c[1].element_size()
    return out


def copy_all(copies: list[Copy], progress: Callable[[int], None] | None = None, non_blocking: bool = False) -> None:
    """Copies in order on the calling thread; ``progress(n)`` after every batch of ``n`` of them.

    A batch is one ``torch._foreach_copy_`` call: the training thread and this one then trade the GIL once per
    batch instead of once per tensor. With per-tensor ``copy_`` calls, the hundreds of small tensors of a model
    made the training thread wait for the GIL often enough to slow a concurrent forward and backward pass of a
    98M-parameter GPT by about 45 ms here; batched, by about 10 ms. ``non_blocking``: device-to-host copies are
    queued on the current stream (the CUDA path); per-tensor queueing cost about 5 ms more per snapshot of a 200M
    GPT on an H200 node's host. Where foreach is missing or refuses a batch, that batch is copied per tensor.
    """
    foreach = getattr(torch, "_foreach_copy_", None)
    with torch.no_grad():
        for batch in _batches(copies):
            done = False
            if foreach is not None and len(batch) > 1:
                try:
                    foreach([d for _, d in batch], [s for s, _ in batch], non_blocking=non_blocking)
                    done = True
                except (RuntimeError, TypeError):  # e.g. a mix of devices it does not take: copy one by one
                    pass
            if not done:
                for src, dst in batch:
                    dst.copy_(src, non_blocking=non_blocking)
            if progress is not None:
                progress(len(batch))


class Copier:
    """Runs lazy copies in the background. Owned by a Checkpointer; one per process."""

    def __init__(self, priority: str = "normal") -> None:
        self.priority = priority
        self._queue: queue.Queue[tuple[StagingHandle, list[Copy], Callable[[], None] | None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stream: Any = None

    def submit(self, step: int, copies: list[Copy], on_done: Callable[[StagingHandle], None],
               cuda: bool | None = None, before: Callable[[], None] | None = None) -> StagingHandle:
        """Start ``copies``; ``on_done(handle)`` runs on a background thread once they are complete. ``cuda``:
        whether any source is CUDA memory, if the caller knows (else every source is asked). ``before``: runs
        first, where the copies run (the copier thread; the calling thread for CUDA sources, whose copies are
        queued at once); what it raises fails the staging like a failed copy."""
        handle = StagingHandle(step)
        handle._callbacks.append(on_done)
        if cuda if cuda is not None else any(src.is_cuda for src, _ in copies):
            if before is not None:
                before()
            self._submit_cuda(handle, copies)
        else:
            self._ensure_thread()
            self._queue.put((handle, copies, before))
        return handle

    def _submit_cuda(self, handle: StagingHandle, copies: list[Copy]) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        t0 = time.perf_counter()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(self._stream):
            copy_all(copies, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        handle._cuda_event = ev
        self._ensure_thread()
        # The worker waits for the event, then runs callbacks (flushes) off the training thread. The job holds the
        # copies, so no source is freed (and its device memory handed to the compute stream) before the side
        # stream has read it; that replaces a ``record_stream`` per tensor, most of this call's cost on a GPU host.
        self._queue.put((handle, copies, None))
        handle.queued_at = t0  # copy_secs is measured in _run, once the event completed

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="ckpt-stage", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Before the first copy: torch's OpenMP workers for this thread are created then and inherit the policy.
        set_background_priority(self.priority)
        while True:
            job = self._queue.get()
            if job is None:
                return
            handle, copies, before = job
            t0 = time.perf_counter()
            try:
                if before is not None:
                    before()
                if handle._cuda_event is not None:
                    handle._cuda_event.synchronize()
                    assert handle.queued_at is not None
                    handle.copy_secs = time.perf_counter() - handle.queued_at
                else:
                    copy_all(copies, handle._advance)
                    handle.copy_secs = time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - kept on the handle, raised by the Checkpointer
                handle.error = e
            handle._finish()
            for cb in handle._callbacks:
                cb(handle)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
