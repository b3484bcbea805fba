"""What a ``Checkpointer.save`` hands back and reports: its handle, its metrics, and background failures.

``SnapshotHandle`` completes part by part (``memory`` when staged, then each due tier); ``SnapshotMetrics`` are the
per-snapshot costs on one rank, appended as JSON lines by ``MetricsLog``; ``BackgroundErrors`` collects failures
of the copier and tier threads and raises them as ``TierError`` on every rank at the same call.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt.dist import DistWrapper
from ckpt.errors import CheckpointError

#: The part of a snapshot that completes when it is staged in host memory (the memory tier).
MEMORY = "memory"


class TierError(CheckpointError):
    """A background tier failed; raised on the next Checkpointer call on every rank, naming tier and step."""


@dataclass
class SnapshotMetrics:
    """Per-snapshot costs on this rank. Seconds unless named otherwise."""

    step: int
    rank: int
    request_secs: float = 0.0
    backpressure_wait_secs: float = 0.0
    lazy_wait_secs: float = 0.0
    copy_secs: float = 0.0
    eager_copy_secs: float = 0.0
    staged_bytes: int = 0
    lazy_bytes: int = 0
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)


class SnapshotHandle:
    """Returned by ``Checkpointer.save``: ``done()`` once staged and flushed to every due tier; ``wait()`` blocks."""

    def __init__(self, step: int, tiers: set[str]) -> None:
        self.step = step
        self._pending = set(tiers) | {MEMORY}
        self._cond = threading.Condition()
        self.errors: list[BaseException] = []

    def _complete(self, part: str, error: BaseException | None = None) -> None:
        with self._cond:
            self._pending.discard(part)
            if error is not None:
                self.errors.append(error)
            self._cond.notify_all()

    def done(self) -> bool:
        with self._cond:
            return not self._pending

    def wait(self, timeout_secs: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout_secs)


class MetricsLog:
    """The metrics of every snapshot of one rank, and the JSON-lines file they are appended to (or None).

    A snapshot's line is written once its numbers are final: after a later ``save`` or at ``wait``, since its lazy
    wait happens in the next ``optimizer.step()``.
    """

    def __init__(self, root: str, rank: int, enabled: bool = True) -> None:
        self.all: list[SnapshotMetrics] = []
        self.path = self._path(root, rank) if enabled else None
        self._unwritten: list[tuple[SnapshotHandle, SnapshotMetrics]] = []

    @staticmethod
    def _path(root: str, rank: int) -> str | None:
        if "://" in root and not root.startswith("file://"):
            return None
        return os.path.join(root.removeprefix("file://"), "metrics", f"rank_{rank:05d}.jsonl")

    def add(self, handle: SnapshotHandle, m: SnapshotMetrics) -> None:
        self._unwritten.append((handle, m))
        self.all.append(m)

    def finished(self, everything: bool = False) -> list[SnapshotMetrics]:
        """Take the metrics whose numbers are final (all of them with ``everything``)."""
        done, keep = [], []
        for h, m in self._unwritten:
            if everything or h.done():
                done.append(m)
            else:
                keep.append((h, m))
        self._unwritten = keep
        return done

    def append(self, done: list[SnapshotMetrics]) -> None:
        """Append ``done`` as JSON lines; ``save`` has the copier thread do it, off the training thread."""
        if not done or self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                for m in done:
                    f.write(json.dumps(asdict(m)) + "\n")
        except OSError:
            pass  # metrics are best effort; a full disk surfaces through the disk tier itself


class BackgroundErrors:
    """Failures of background threads, raised on every rank at the same call (one small collective)."""

    def __init__(self, dw: DistWrapper) -> None:
        self.dw = dw
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def record(self, msg: str) -> None:
        with self._lock:
            self._errors.append(msg)

    def raise_pending(self) -> None:
        with self._lock:
            mine, self._errors = self._errors, []
        everyone = self.dw.all_gather(mine)
        lines = [f"rank {r}: {m}" for r, ms in enumerate(everyone) for m in ms]
        if lines:
            raise TierError(
                "background checkpointing failed (the last committed snapshot stays loadable; training may "
                "continue and later snapshots retry):\n  " + "\n  ".join(lines)
            )
