"""The daemon's shared-memory store: segments that trainers stage into, and the sealed snapshots they hold.

A *segment* is a file under ``DIR/segments`` (tmpfs on ``/dev/shm``), mode 0600, named by the daemon
(``seg-<16 hex>``), its memory reserved with ``posix_fallocate`` when it is made so that a full ``/dev/shm`` is an
error at allocation, not a SIGBUS in the middle of a copy. A trainer's pool slot is one segment, reused from
snapshot to snapshot: ``begin(step)`` says the slot is being overwritten (whatever it held is no longer a
snapshot), ``seal(step, meta)`` that this rank's bytes for ``step`` are complete and checksummed. A snapshot
``(run, step)`` is *complete* when ``world`` shards sealed it; only sealed shards are ever listed or opened.

Segments belong to the connection that allocated them. When it closes (the trainer exited or was killed), its
unsealed segments are reclaimed and its sealed ones stay, orphaned, for the restarted job to read; orphans are
evicted beyond the ``keep_last`` newest sealed steps of their run, or to make room within the budget (never the
newest complete step of a run). Segments of live connections are never evicted: they are pool slots in use.

Keys are data: run (the Checkpointer's root), step, and shard (the saved layout's coordinates), never a pid.
Thread-safe (one lock); the server calls it from one thread per connection.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt.errors import DaemonBudgetError, DaemonError
from snapshot_daemon.paths import SEGMENTS


@dataclass
class Segment:
    name: str
    path: Path
    nbytes: int
    run: str
    shard: str
    #: Connection id of the client that owns it; None once orphaned (its client is gone).
    owner: int | None
    step: int | None = None
    sealed: bool = False
    world: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    sealed_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"segment": self.name, "path": str(self.path), "nbytes": self.nbytes, "run": self.run,
                "shard": self.shard, "step": self.step, "sealed": self.sealed, "world": self.world,
                "orphaned": self.owner is None}


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def reserve_segment(fd: int, offset: int, nbytes: int, where: str) -> None:
    """Reserve bytes ``offset:offset+nbytes`` of the segment open as ``fd`` (tmpfs allocates its pages), or
    ``DaemonBudgetError`` when ``where`` (the segments' filesystem) cannot hold them."""
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as e:
        raise DaemonBudgetError(
            f"{where} cannot hold {_human(nbytes)} more ({os.strerror(e.errno or 0)}); free space there or "
            "lower --memory-budget") from None


class Store:
    def __init__(self, root: Path, budget_bytes: int, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"Store(keep_last={keep_last}): keep at least the newest sealed step")
        self.dir = root / SEGMENTS
        self.budget_bytes = budget_bytes
        self.keep_last = keep_last
        self.segments: dict[str, Segment] = {}
        self._lock = threading.Lock()
        self.evicted = 0
        self.reclaimed = 0

    # -- accounting ----------------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def _complete_steps(self, run: str) -> list[int]:
        """Steps of ``run`` sealed by every shard of their save, newest first."""
        return sorted((st for st, e in self._snapshots(run).items() if e["complete"]), reverse=True)

    def _delete(self, seg: Segment) -> None:
        self.segments.pop(seg.name, None)
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass

    def _evictable(self) -> list[Segment]:
        """Orphans that may go to make room, oldest step first; never the newest complete step of a run."""
        newest = {}
        for run in {s.run for s in self.segments.values()}:
            steps = self._complete_steps(run)
            newest[run] = steps[0] if steps else None
        cands = [s for s in self.segments.values() if s.owner is None and s.step != newest.get(s.run)]
        return sorted(cands, key=lambda s: (s.step if s.step is not None else -1, s.sealed_at))

    # -- requests --------------------------------------------------------------------------------------------------
    def alloc(self, run: str, shard: str, nbytes: int, owner: int, reserve: bool = True) -> Segment:
        """A new segment of ``nbytes`` within the budget (evicting orphans, oldest first, to make room). With
        ``reserve`` its memory is reserved now (``posix_fallocate``: a full ``/dev/shm`` is this error, not a
        SIGBUS in the writer later); without, the client reserves it before writing (``reserve_segment``)."""
        with self._lock:
            if nbytes > self.budget_bytes - self.used_bytes:
                for victim in self._evictable():
                    self._delete(victim)
                    self.evicted += 1
                    if nbytes <= self.budget_bytes - self.used_bytes:
                        break
            free = self.budget_bytes - self.used_bytes
            if nbytes > free:
                raise DaemonBudgetError(
                    f"a segment of {_human(nbytes)} ({nbytes} bytes) for run {run!r} shard {shard!r} does not fit: "
                    f"budget {_human(self.budget_bytes)} ({self.budget_bytes} bytes), in use "
                    f"{_human(self.used_bytes)} "
                    f"({len(self.segments)} segments); start the daemon with a larger --memory-budget, or save less "
                    "often into memory (fewer memory_slots)")
            name = f"seg-{secrets.token_hex(8)}"
            path = self.dir / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                if reserve:
                    try:
                        reserve_segment(fd, 0, nbytes, str(self.dir))
                    except DaemonBudgetError:
                        os.unlink(path)
                        raise
            finally:
                os.close(fd)
            seg = Segment(name, path, nbytes, run, shard, owner)
            self.segments[name] = seg
            return seg

    def _owned(self, name: str, owner: int) -> Segment:
        seg = self.segments.get(name)
        if seg is None:
            raise DaemonError(f"no segment {name!r} (freed, evicted, or from another daemon)")
        if seg.owner != owner:
            raise DaemonError(f"segment {name!r} belongs to another client")
        return seg

    def begin(self, name: str, step: int, owner: int) -> None:
        with self._lock:
            seg = self._owned(name, owner)
            seg.step, seg.sealed, seg.world, seg.meta = step, False, 0, {}

    def seal(self, name: str, step: int, world: int, meta: dict[str, Any], owner: int) -> None:
        with self._lock:
            seg = self._owned(name, owner)
            if seg.step != step:
                raise DaemonError(f"segment {name!r} is staging step {seg.step}, not {step}: begin it first")
            for other in self.segments.values():  # a re-save of the same step by the same shard replaces it
                if other is not seg and other.sealed and (other.run, other.shard, other.step) == (seg.run, seg.shard,
                                                                                                   step):
                    other.sealed = False
                    if other.owner is None:
                        self._delete(other)
            seg.sealed, seg.world, seg.meta, seg.sealed_at = True, world, meta, time.time()
            keep = set(self._complete_steps(seg.run)[:self.keep_last])
            for s in list(self.segments.values()):
                if s.run == seg.run and s.owner is None and s.step not in keep:
                    self._delete(s)
                    self.evicted += 1

    def free(self, name: str, owner: int) -> None:
        with self._lock:
            self._delete(self._owned(name, owner))

    def disconnect(self, owner: int) -> None:
        """The client ``owner`` is gone: reclaim its unsealed segments, orphan its sealed ones."""
        with self._lock:
            for s in list(self.segments.values()):
                if s.owner == owner:
                    if s.sealed:
                        s.owner = None
                    else:
                        self._delete(s)
                        self.reclaimed += 1

    def snapshots(self, run: str) -> dict[int, dict[str, Any]]:
        """Sealed steps of ``run``: step -> world, complete, and the sealed shards (shard -> bytes)."""
        with self._lock:
            return self._snapshots(run)

    def _snapshots(self, run: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for s in self.segments.values():
            if s.run == run and s.sealed and s.step is not None:
                e = out.setdefault(s.step, {"world": s.world, "shards": {}})
                e["shards"][s.shard] = s.nbytes
                e["world"] = max(e["world"], s.world)
        for e in out.values():
            e["complete"] = len(e["shards"]) >= e["world"]
        return out

    def open(self, run: str, step: int, shard: str) -> Segment:
        with self._lock:
            for s in self.segments.values():
                if s.sealed and (s.run, s.step, s.shard) == (run, step, shard):
                    return s
        raise DaemonError(f"no sealed snapshot of run {run!r} step {step} shard {shard!r} in {self.dir.parent}")

    def status(self) -> dict[str, Any]:
        with self._lock:  # one consistent picture: connection threads change segments meanwhile
            runs = sorted({s.run for s in self.segments.values()})
            return {"memory_budget": self.budget_bytes, "memory_used": self.used_bytes,
                    "segments": len(self.segments), "keep_last": self.keep_last, "evicted": self.evicted,
                    "reclaimed": self.reclaimed,
                    "runs": {r: {str(k): v for k, v in sorted(self._snapshots(r).items())} for r in runs}}

    def close(self) -> int:
        """Free every segment; the bytes freed."""
        with self._lock:
            freed = self.used_bytes
            for s in list(self.segments.values()):
                self._delete(s)
            return freed
