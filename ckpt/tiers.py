"""Persistent tiers of a Checkpointer: local disk and a remote fsspec URL, each with its own cadence.

A tier is a root (directory or object-store prefix) of committed steps ``step_<n>/`` (each a universal-format
checkpoint) and a ``latest`` pointer. A flush thread per tier writes snapshots from their host slots, in step
order, and commits them collectively over the tier's own gloo group (background collectives never share a group
with training or with another tier). ``latest`` and retention move only after a commit.

Tiers are found by URL scheme (``register_tier``): ``open_tier`` builds the class registered for the URL's scheme
and a ``StorageTier`` (any ``formats.storage`` URL) otherwise, so a tier that lives elsewhere (the snapshot
daemon's) plugs in without ``ckpt`` importing it. The interface every tier offers is ``Tier``.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from ckpt.dist import DistWrapper
from ckpt.options import SaveOptions
from ckpt.policies import RetentionPolicy, SavePolicy
from ckpt.saving import ManifestPlan, write_and_commit
from ckpt.staging import set_background_priority
from formats.manifest import MANIFEST_NAME
from formats.storage import Storage, open_storage
from formats.writer import WriteItem, WriteOptions

STEP_DIR = re.compile(r"^step_(\d{9,})$")
LATEST = "latest"


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def join_url(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


class Snapshot(Protocol):
    """What a tier flushes (``ckpt.stager.StagedSnapshot``): one step's write items and manifest plan."""

    step: int

    @property
    def save_id(self) -> str: ...

    @property
    def buffer(self) -> "torch.Tensor": ...

    def items(self) -> "list[WriteItem]": ...

    def manifest(self) -> ManifestPlan | None: ...


@dataclass
class FlushResult:
    tier: str
    step: int
    ok: bool
    flush_secs: float
    bytes_written: int
    error: BaseException | None = None
    #: A failure already reported once (the tier is still unreachable): recorded, not raised again.
    quiet: bool = False


@dataclass
class FlushJob:
    """Write ``snapshot`` to the tier, then call ``done`` with the result (on the tier's thread)."""

    snapshot: Snapshot
    done: Callable[[FlushResult], None]


@dataclass
class CopyJob:
    """Copy committed ``step`` verbatim from ``source`` (another tier's storage of it) into the tier, then call
    ``done`` (tier thread). Data files first, split across ranks; the manifest last, by the coordinator."""

    step: int
    source: Storage
    done: Callable[[FlushResult], None]


@dataclass
class _Drain:
    """Queued behind every submitted job: set once they are all done."""

    event: threading.Event


class Tier(Protocol):
    """The interface a Checkpointer tier offers (docs/design.md "Tiers"); ``StorageTier`` is the built-in one.

    A tier that keeps snapshots in memory it owns (the snapshot daemon's) also has ``allocator``, a
    ``ckpt.pool.SegmentAllocator`` the Checkpointer's pool then stages into."""

    name: str

    def due(self, step: int) -> bool: ...

    def submit(self, job: FlushJob | CopyJob) -> None: ...

    def committed_steps(self) -> list[int]: ...

    def storage_for(self, step: int) -> Storage: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


#: A tier class or factory, called as ``StorageTier`` is (see ``open_tier``).
TierFactory = Callable[..., Tier]
_TIERS: dict[str, TierFactory] = {}


def register_tier(scheme: str, factory: TierFactory) -> None:
    """Make ``open_tier`` build ``factory(...)`` for URLs ``scheme://...`` (replacing an earlier registration)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"register_tier({scheme!r}): expected a URL scheme such as 'daemon'")
    _TIERS[scheme] = factory


def open_tier(name: str, url: str, cadence: SavePolicy, retention: RetentionPolicy, group: Any = None,
              storage_options: dict[str, Any] | None = None, priority: str = "normal", codec: str = "raw",
              save_options: SaveOptions | None = None) -> Tier:
    """The tier for ``url``: the factory registered for its scheme, else a ``StorageTier``."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in _TIERS:
        _load_plugin_tiers(scheme)
    factory = _TIERS.get(scheme, StorageTier)
    return factory(name, url, cadence, retention, group, storage_options, priority, codec, save_options)


#: Entry-point group of tiers that live in higher layers (``daemon``: ``snapshot_daemon.tier:register``), loaded
#: when a URL of their scheme is first opened, so that ``ckpt`` never imports them (DESIGN.md, Layers).
TIERS_GROUP = "ckpt.tiers"


def _load_plugin_tiers(scheme: str) -> None:
    from importlib.metadata import entry_points  # noqa: PLC0415

    for ep in entry_points(group=TIERS_GROUP):
        if ep.name == scheme:
            ep.load()()  # registers the scheme


def tier_group(dw: DistWrapper, process_group: Any) -> Any:
    """A gloo group of ``process_group``'s ranks for one tier's background collectives (collective over the
    world; None in a single process)."""
    if dw.world_size == 1:
        return None
    # new_group waits for every rank with no word of who is missing: a Checkpointer built on some ranks only
    # must fail here, naming them, within the collective timeout.
    dw.barrier("ckpt.Checkpointer: creating a tier's gloo group")
    ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
    return dist.new_group(ranks=ranks, backend="gloo")


class StorageTier:
    """One persistent tier: it knows when it is due (``cadence``, a public ``SavePolicy``), how its chunks are
    encoded (``codec``: ``raw`` on fast tiers, ``zstd`` where bandwidth is scarce) and what it keeps
    (``retention``). ``name`` is ``"disk"`` or ``"remote"`` (reports and errors); ``group`` is its own gloo group
    (or None); ``save_options`` gives the rest of how its chunks are laid down."""

    def __init__(self, name: str, url: str, cadence: SavePolicy, retention: RetentionPolicy, group: Any = None,
                 storage_options: dict[str, Any] | None = None, priority: str = "normal",
                 codec: str = "raw", save_options: SaveOptions | None = None) -> None:
        self.name = name
        self.priority = priority
        self.url = url
        self.cadence = cadence
        self.codec = codec
        self.retention = retention
        self.save_options = save_options or SaveOptions()
        self.storage_options = storage_options
        self.root: Any = self._open_root()
        self.dw = DistWrapper(group)
        self._queue: queue.Queue[FlushJob | CopyJob | _Drain | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _open_root(self) -> Any:
        """What the tier keeps open and closes with it: the ``Storage`` at ``url`` (a plugin tier: its client)."""
        return open_storage(self.url, self.storage_options)

    def due(self, step: int) -> bool:
        return self.cadence.should_save(step)

    def write_options(self) -> WriteOptions:
        """How this tier's executor lays bytes down: its ``save_options`` with its own codec."""
        o = self.save_options
        return WriteOptions(self.codec, o.zstd_level, o.block_bytes, o.files_per_rank)

    def flush(self, snapshot: Snapshot, storage: Storage) -> int:
        """Write and commit ``snapshot`` into ``storage`` (collective over the tier's group); bytes written."""
        items = snapshot.items()
        write_and_commit(self.dw, storage, snapshot.save_id, items, snapshot.manifest(), self.write_options(),
                         phase=f"ckpt tier {self.name!r} step {snapshot.step}", tool="ckpt.Checkpointer")
        return sum(i.nbytes for i in items)

    def storage_for(self, step: int) -> Storage:
        """Where a committed ``step`` is read from."""
        return open_storage(join_url(self.url, step_dir(step)), self.storage_options)

    def target_for(self, step: int) -> Storage:
        """Where ``step`` is written to (the same place, for a storage tier). Its folder must not be a link: the
        step's storage would write and clean up wherever the link leads."""
        self.root.check_write_path(f"{step_dir(step)}/{MANIFEST_NAME}")
        return self.storage_for(step)

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
    def submit(self, job: FlushJob | CopyJob) -> None:
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
            if isinstance(job, _Drain):  # everything queued before it is done
                job.event.set()
                continue
            job.done(self._copy_one(job) if isinstance(job, CopyJob) else self._flush_one(job.snapshot))

    def _flush_one(self, snapshot: Snapshot) -> FlushResult:
        step, t0 = snapshot.step, time.perf_counter()
        try:
            nbytes = self.flush(snapshot, self.target_for(step))
            self.dw.run(f"ckpt tier {self.name!r} step {step}: retention", lambda: self._after_commit(step))
            return FlushResult(self.name, step, True, time.perf_counter() - t0, nbytes)
        except BaseException as e:  # noqa: BLE001 - reported to the Checkpointer, raised on its next call
            return FlushResult(self.name, step, False, time.perf_counter() - t0, 0, e)

    def _copy_one(self, job: CopyJob) -> FlushResult:
        """A committed step of another tier, byte for byte (collective over the tier's group): what an uncommitted
        attempt left in the step's folder goes first, ``latest`` moves only after the manifest is committed."""
        step, t0, phase = job.step, time.perf_counter(), f"ckpt tier {self.name!r} step {job.step} (copy)"
        try:
            target = self.target_for(step)

            def clear() -> None:
                if self.dw.is_coordinator:
                    left = target.list("")
                    if left:
                        target.delete(left)

            self.dw.run(f"{phase}: clearing an uncommitted attempt", clear)
            files = [p for p in job.source.list("") if p != MANIFEST_NAME]
            mine = files[self.dw.rank::self.dw.world_size]
            nbytes = self.dw.run(f"{phase}: data", lambda: sum(target.write(p, [job.source.read(p)]) for p in mine))
            self.dw.run(f"{phase}: manifest", lambda: target.commit(MANIFEST_NAME, job.source.read(MANIFEST_NAME))
                        if self.dw.is_coordinator else None)
            self.dw.run(f"{phase}: retention", lambda: self._after_commit(step))
            return FlushResult(self.name, step, True, time.perf_counter() - t0, nbytes)
        except BaseException as e:  # noqa: BLE001 - reported to the Checkpointer, raised on its next call
            return FlushResult(self.name, step, False, time.perf_counter() - t0, 0, e)

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
        drained = _Drain(threading.Event())
        self._queue.put(drained)
        drained.event.wait()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self.root.close()

