"""Persistent tiers of a Checkpointer: local disk and a remote fsspec URL, each with its own cadence.

A tier is a root (directory or object-store prefix) of committed steps ``step_<n>/`` (each a universal-format
checkpoint) and a ``latest`` pointer. A flush thread per tier writes snapshots from their host slots, in step
order, and commits them collectively over the tier's own gloo group (background collectives never share a group
with training or with another tier). ``latest`` and retention move only after a commit.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ckpt.dist import DistWrapper
from ckpt.options import SaveOptions
from ckpt.policies import RetentionPolicy, SavePolicy
from ckpt.staging import set_background_priority
from formats.manifest import MANIFEST_NAME
from formats.storage import Storage, open_storage
from formats.writer import WriteOptions

STEP_DIR = re.compile(r"^step_(\d{9,})$")
LATEST = "latest"


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def join_url(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


@dataclass
class FlushJob:
    """Write one staged snapshot to this tier. ``write(storage, dw)`` returns bytes this rank wrote."""

    step: int
    write: Callable[[Storage, DistWrapper], int]
    done: Callable[["FlushResult"], None]


@dataclass
class FlushResult:
    tier: str
    step: int
    ok: bool
    flush_secs: float
    bytes_written: int
    error: BaseException | None = None


class StorageTier:
    """One persistent tier: it knows when it is due (``cadence``, a public ``SavePolicy``), how its chunks are
    encoded (``codec``: ``raw`` on fast tiers, ``zstd`` where bandwidth is scarce) and what it keeps
    (``retention``). ``name`` is ``"disk"`` or ``"remote"`` (reports and errors); ``group`` is its own gloo group
    (or None)."""

    def __init__(self, name: str, url: str, cadence: SavePolicy, retention: RetentionPolicy, group: Any = None,
                 storage_options: dict[str, Any] | None = None, priority: str = "normal",
                 codec: str = "raw") -> None:
        self.name = name
        self.priority = priority
        self.url = url
        self.cadence = cadence
        self.codec = codec
        self.retention = retention
        self.storage_options = storage_options
        self.root: Storage = open_storage(url, storage_options)
        self.dw = DistWrapper(group)
        self._queue: queue.Queue[FlushJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def due(self, step: int) -> bool:
        return self.cadence.should_save(step)

    def write_options(self, save: SaveOptions) -> WriteOptions:
        """How this tier's executor lays bytes down: ``save``'s layout settings with this tier's codec."""
        return WriteOptions(self.codec, save.zstd_level, save.block_bytes, save.files_per_rank)

    def storage_for(self, step: int) -> Storage:
        return open_storage(join_url(self.url, step_dir(step)), self.storage_options)

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists, ascending (lists the tier; call on one rank and broadcast)."""
        steps = set()
        for p in self.root.list(""):
            parts = p.split("/")
            m = STEP_DIR.match(parts[0])
            if m and len(parts) == 2 and parts[1] == MANIFEST_NAME:
                steps.add(int(m.group(1)))
        return sorted(steps)

    # -- flushing (background) ---------------------------------------------------------------------------------
    def submit(self, job: FlushJob) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"ckpt-flush-{self.name}", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _run(self) -> None:
        set_background_priority(self.priority)  # writer threads it starts inherit it
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.step < 0:  # a drain marker: everything before it is done
                job.done(FlushResult(self.name, job.step, True, 0.0, 0))
                continue
            t0 = time.perf_counter()
            try:
                nbytes = job.write(self.storage_for(job.step), self.dw)
                self.dw.run(f"ckpt tier {self.name!r} step {job.step}: retention", lambda: self._after_commit(job.step))
                res = FlushResult(self.name, job.step, True, time.perf_counter() - t0, nbytes)
            except BaseException as e:  # noqa: BLE001 - reported to the Checkpointer, raised on its next call
                res = FlushResult(self.name, job.step, False, time.perf_counter() - t0, 0, e)
            job.done(res)

    def _after_commit(self, step: int) -> None:
        """Coordinator only: move ``latest`` and apply retention (deleting crashed, uncommitted steps too)."""
        if not self.dw.is_coordinator:
            return
        self.root.commit(LATEST, f"{step}\n".encode())
        committed = self.committed_steps()
        keep = self.retention.keep(committed) | {step}
        doomed: list[str] = []
        for p in self.root.list(""):
            m = STEP_DIR.match(p.split("/")[0])
            if not m:
                continue
            s = int(m.group(1))
            # committed steps the policy drops, and uncommitted leftovers older than this commit (crashed saves)
            if (s in committed and s not in keep) or (s not in committed and s < step):
                doomed.append(p)
        if doomed:
            self.root.delete(doomed)

    def drain(self) -> None:
        """Block until every submitted job finished."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(FlushJob(-1, lambda s, d: 0, lambda r: done.set()))
        done.wait()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self.root.close()

