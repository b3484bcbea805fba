"""``run_distributed``: run a function on N gloo ranks in spawned CPU processes and collect what each returned.

Who calls it: multi-process tests, from the pytest process. Each rank is a fresh ``spawn`` process that joins a
gloo process group rendezvousing over TCP on 127.0.0.1, runs ``fn(rank, world_size, *args)``, and reports its
return value or its traceback through a queue. The parent never hangs: it enforces one wall-clock deadline for
the whole group, gives the surviving ranks a short grace period once any rank has failed (they are likely blocked
in a collective the failed rank will never join), then kills every straggler and raises one
``DistributedTestError`` naming each failed rank with its traceback.

``fn`` and its arguments cross a process boundary, so ``fn`` must be a module-level function and the arguments
and return values must be picklable (CPU tensors are fine). Starting a rank costs seconds (importing torch), so
tests should run several checks per call.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

#: Seconds the other ranks get to finish (usually: to raise the same error) after one rank failed.
FAILURE_GRACE_SECS = 15.0
#: Seconds a process gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_SECS = 3.0
#: Environment every rank gets: one intra-op thread each, so N ranks do not oversubscribe a small machine.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class DistributedTestError(AssertionError):
    """One or more ranks failed, crashed or timed out; ``failures`` maps rank -> traceback or reason."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args_pickle: bytes,
            results: Any, pg_timeout_secs: float) -> None:
    """Entry point of one rank (runs in the spawned child)."""
    for k, v in CHILD_ENV.items():
        os.environ[k] = v
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_secs),
        )
        try:
            value = fn(rank, world_size, *pickle.loads(args_pickle))
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may already be broken by the failure being reported
                pass
        # Plain pickle, not the queue's: torch registers a reducer that passes tensors as shared-memory file
        # descriptors, which the parent can no longer fetch once this process has exited.
        payload = pickle.dumps(value)
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))


def _stop(procs: list[Any]) -> None:
    """Terminate, then kill, every process still alive (only the ones this helper started)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_SECS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


class _Outcome:
    """What one attempt at running the ranks produced (parent side)."""

    def __init__(self, world_size: int, timeout_secs: float) -> None:
        self.values: dict[int, bytes] = {}
        self.failures: dict[int, str] = {}
        self.first_failure: int | None = None
        self.deadline = time.monotonic() + timeout_secs
        self.timed_out = False
        self.world_size = world_size

    def record(self, rank: int, ok: bool, payload: Any) -> None:
        if ok:
            self.values[rank] = payload
            return
        self.failures[rank] = payload
        if self.first_failure is None:
            # The others are probably blocked in a collective the failed rank will never join: give them a short
            # grace period to fail on their own, then kill them.
            self.first_failure = rank
            self.deadline = min(self.deadline, time.monotonic() + FAILURE_GRACE_SECS)

    def pending(self, rank: int) -> bool:
        return rank not in self.values and rank not in self.failures

    def done(self) -> bool:
        return len(self.values) + len(self.failures) == self.world_size


def _run_once(fn: Callable[..., Any], world_size: int, args_pickle: bytes, timeout_secs: float) -> tuple[_Outcome, list[Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # The child imports torch while unpickling ``fn`` (its module imports torch), before ``_worker`` runs: the
    # thread settings must already be in the environment it inherits.
    saved = {k: os.environ.get(k) for k in CHILD_ENV}
    os.environ.update(CHILD_ENV)
    procs: list[Any] = []
    out = _Outcome(world_size, timeout_secs)
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker, name=f"ckpt-test-rank{rank}", daemon=True,
                            args=(fn, rank, world_size, port, args_pickle, results, max(timeout_secs, 10.0)))
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        while not out.done():
            now = time.monotonic()
            if now >= out.deadline:
                out.timed_out = True
                break
            try:
                out.record(*results.get(timeout=min(0.2, out.deadline - now)))
                continue
            except queue.Empty:
                pass
            # A rank that exited without reporting (segfault, os._exit, OOM kill) never will. Its report, if any, was
            # flushed to the pipe before it exited: drain once more before declaring it lost.
            dead = [r for r, p in enumerate(procs) if out.pending(r) and not p.is_alive()]
            if dead:
                try:
                    while True:
                        out.record(*results.get(timeout=0.2))
                except queue.Empty:
                    pass
                for r in dead:
                    if out.pending(r):
                        out.record(r, False, f"process exited with code {procs[r].exitcode} without reporting a result")
    finally:
        _stop(procs)
        results.close()
        results.cancel_join_thread()
    return out, procs


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout_secs: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    Raises ``DistributedTestError`` (an ``AssertionError``, so pytest shows it as a test failure) if any rank
    raised, died without reporting, or did not finish within ``timeout_secs``; the message names every failing
    rank and includes its traceback. Never leaves a child process behind.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size={world_size}, expected at least 1")
    args_pickle = pickle.dumps(args)  # plain pickle for the same reason as the results (see ``_worker``)
    for attempt in range(2):
        out, procs = _run_once(fn, world_size, args_pickle, timeout_secs)
        # The port was free when chosen but another process may have taken it before rank 0 bound it: retry once.
        if attempt == 0 and any("Address already in use" in f or "EADDRINUSE" in f for f in out.failures.values()):
            continue
        break

    for r in range(world_size):
        if out.pending(r):
            if out.first_failure is not None:
                reason = f"still running {FAILURE_GRACE_SECS:.0f} s after rank {out.first_failure} failed (a hang?)"
            else:
                reason = f"did not finish within timeout_secs={timeout_secs:.0f}"
            out.failures[r] = f"{reason}; killed (exit code {procs[r].exitcode})"
    if out.failures:
        why = f"timed out after {timeout_secs:.0f} s" if out.timed_out and out.first_failure is None else "failed"
        parts = [f"run_distributed({getattr(fn, '__name__', fn)!r}, world_size={world_size}) {why}: "
                 f"{len(out.failures)} of {world_size} rank(s) did not succeed"]
        for r in sorted(out.failures):
            parts.append(f"----- rank {r} -----\n{out.failures[r].rstrip()}")
        raise DistributedTestError("\n".join(parts), dict(out.failures))
    return [pickle.loads(out.values[r]) for r in range(world_size)]
