"""The snapshot daemon as a tier of the Checkpointer: ``Checkpointer(root, daemon="auto" | DIR)``.

``ckpt`` finds it through the ``ckpt.tiers`` entry point (scheme ``daemon``), never by import. The tier gives the
Checkpointer's pool its ``allocator`` (``DaemonAllocator``): slots are daemon segments, so the stager copies
straight into daemon memory and a killed trainer loses nothing. Its flush writes nothing: every chunk of the
snapshot already lies in a segment, so each rank only checksums its items where they are (the pipeline's execute
step, in place), the coordinator builds the manifest from every rank's chunk list (``formats.commit``), and every
rank seals its segment for the step, the coordinator's seal carrying the manifest. A step is on this tier once
every rank sealed it.

``storage_for(step)`` is a read-only ``Storage`` over the sealed segments (``manifest.json`` from the coordinator's
seal, ``data/seg-...`` from the segment files), so a restore is an ordinary ``ckpt.load``: checksums verified, any
layout (load-time resharding), no byte read from disk.

Shards are keyed ``rank/world`` of the Checkpointer's group, and runs by the Checkpointer's root, so the restarted
job (any process) finds them. All ranks of a job must reach the daemon holding a step's shards: one node today;
reading other nodes' shards is the next issue's (peers, erasure coding).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any, Iterable, Sequence

from ckpt.dist import DistWrapper
from ckpt.errors import DaemonBudgetError, DaemonError, DaemonProtocolError, DaemonUnavailableError, StorageError
from ckpt.options import SaveOptions
from ckpt.policies import RetentionPolicy, SavePolicy
from ckpt.tiers import FlushResult, Snapshot, StorageTier, register_tier
from formats import checksum
from formats.commit import build_manifest
from formats.tensor_bytes import as_bytes
from formats.manifest import DATA_DIR, MANIFEST_NAME, ChunkEntry
from formats.storage.base import Buffer, Storage
from snapshot_daemon import client as daemon_client
from snapshot_daemon import segments
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.segments import DaemonAllocator

SCHEME = "daemon"


class SegmentStorage(Storage):
    """A sealed step read-only: ``manifest.json`` from memory, ``data/<segment>`` from the daemon's segment files."""

    def __init__(self, url: str, manifest: bytes, files: dict[str, tuple[str, int]]) -> None:
        self.url = url
        self._manifest = manifest
        self._files = files  # relative path -> (segment file, size)
        self.bytes_read = 0
        self._maps: dict[str, mmap.mmap] = {}
        self._map_lock = threading.Lock()

    def _map(self, path: str) -> "mmap.mmap":
        """The whole segment of ``path``, mapped once (private and read-only at the file: the daemon's bytes cannot
        be changed through it). The daemon never shortens a sealed segment, it only unlinks it, and a mapping
        keeps an unlinked file's pages, so a step evicted during the restore still reads whole."""
        with self._map_lock:
            m = self._maps.get(path)
            if m is None:
                file, size = self._path(path)
                fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    have = os.fstat(fd).st_size
                    if have < size:
                        raise StorageError(f"{self.url}/{path} ({file}): {have} bytes, sealed with {size}; the "
                                           "segment is shorter than sealed")
                    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
                self._maps[path] = m
            return m

    def view(self, path: str, offset: int, length: int) -> memoryview:
        if path == MANIFEST_NAME:
            return memoryview(self._manifest)[offset:offset + length]
        m = self._map(path)
        if offset < 0 or length < 0 or offset + length > len(m):
            raise StorageError(f"{self.url}/{path}: bytes [{offset}, {offset + length}) asked, the sealed segment "
                               f"has {len(m)}; the manifest does not fit the segment")
        self.bytes_read += length
        return memoryview(m)[offset:offset + length]

    def close(self) -> None:
        """Unmap the segments (a view still in use keeps its mapping until it is released)."""
        with self._map_lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:  # exported to a live tensor: the mapping goes when that does
                pass

    def _path(self, path: str) -> tuple[str, int]:
        if path not in self._files:
            raise FileNotFoundError(f"{self.url}/{path}: not a segment of this sealed step")
        return self._files[path]

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if path == MANIFEST_NAME:
            data = self._manifest[offset:] if length is None else self._manifest[offset:offset + length]
            return data
        file, size = self._path(path)
        n = size - offset if length is None else length
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            data = os.pread(fd, n, offset)
        finally:
            os.close(fd)
        if len(data) != n:
            raise StorageError(f"{self.url}/{path} ({file}): {len(data)} of {n} bytes at offset {offset}; the "
                               "segment is shorter than sealed")
        self.bytes_read += len(data)
        return data

    def readinto(self, path: str, offset: int, out: memoryview) -> None:
        file, _ = self._path(path)
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            got = os.preadv(fd, [out], offset)
        finally:
            os.close(fd)
        if got != len(out):
            raise StorageError(f"{self.url}/{path} ({file}): {got} of {len(out)} bytes at offset {offset}; the "
                               "segment is shorter than sealed")
        self.bytes_read += got

    def size(self, path: str) -> int:
        return len(self._manifest) if path == MANIFEST_NAME else self._path(path)[1]

    def exists(self, path: str) -> bool:
        return path == MANIFEST_NAME or path in self._files

    def list(self, prefix: str = "") -> list[str]:
        return sorted(p for p in [MANIFEST_NAME, *self._files] if p.startswith(prefix))

    def write(self, path: str, buffers: Sequence[Buffer]) -> int:
        raise StorageError(f"{self.url}: a sealed daemon snapshot is read-only")

    def commit(self, path: str, data: bytes) -> None:
        raise StorageError(f"{self.url}: a sealed daemon snapshot is read-only")

    def delete(self, paths: Iterable[str]) -> None:
        raise StorageError(f"{self.url}: a sealed daemon snapshot is read-only")


class DaemonTier(StorageTier):
    """Tier ``daemon``: snapshots sealed in the per-node daemon's shared memory (see the module docstring).

    ``url`` is ``daemon://DIR`` (``daemon://auto``: ``$CKPT_DAEMON_DIR`` or the default directory, starting a daemon
    when none runs); ``storage_options`` carries ``run`` (the Checkpointer's root), ``rank`` and ``world``."""

    #: A committed step is the pool slot's own bytes: the Checkpointer keeps the newest from reuse (pool.hold).
    holds_slot = True

    def __init__(self, name: str, url: str, cadence: SavePolicy, retention: RetentionPolicy, group: Any = None,
                 storage_options: dict[str, Any] | None = None, priority: str = "normal", codec: str = "raw",
                 save_options: SaveOptions | None = None) -> None:
        opts = dict(storage_options or {})
        where = url.split("://", 1)[1]
        self.daemon_dir = None if where in ("", "auto") else where
        self.run, self.rank, self.world = str(opts["run"]), int(opts.get("rank", 0)), int(opts.get("world", 1))
        self.auto = where == "auto"
        self._outage = False  # the last flush found the daemon unreachable (reported once, then quiet)
        self._budget_told = False  # a budget refusal was reported while the allocator still refuses
        super().__init__(name, url, cadence, retention, group, opts, priority, "raw", save_options)

    def _connect(self) -> DaemonClient:
        if self.auto:
            daemon_client.start(self.daemon_dir)
        return DaemonClient(self.daemon_dir, client=f"ckpt rank {self.rank} of {self.run}")

    def _open_root(self) -> DaemonAllocator:
        """The tier's root is its allocator, which owns the connection (and reconnects, see DaemonAllocator)."""
        return DaemonAllocator(self._connect(), self.run, f"{self.rank}/{self.world}", connect=self._connect)

    @property
    def allocator(self) -> DaemonAllocator:
        return self.root  # type: ignore[no-any-return]

    @property
    def client(self) -> DaemonClient:
        return self.allocator.client

    # -- flush: checksum in place, build the manifest, seal ----------------------------------------------------
    def _describe_in_place(self, snapshot: Snapshot) -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
        """The execute step without a write: every item's bytes are already in this rank's segment."""
        block = self.save_options.block_bytes
        files: dict[str, int] = {}
        entries: list[tuple[str, ChunkEntry]] = []
        for item in snapshot.items():
            data = item.materialize()  # waits until the copier staged this region
            name, offset, seg_bytes = self.allocator.locate(data)
            raw = as_bytes(data)
            entries.append((item.key, ChunkEntry(item.offsets, item.sizes, f"{DATA_DIR}/{name}", offset, len(raw),
                                                 "raw", len(raw), block, tuple(checksum.block_digests(raw, block)))))
            files[f"{DATA_DIR}/{name}"] = seg_bytes
            item.release()
        return files, entries

    def target_for(self, step: int) -> None:  # type: ignore[override]
        """Nothing is written anywhere: the bytes are in the segment already."""
        return None

    def flush(self, snapshot: Snapshot, storage: Storage | None) -> int:
        step, problem = snapshot.step, self.allocator.problem(snapshot.buffer)

        def describe() -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
            if self.allocator.refused(snapshot.buffer) is not None:  # its segment did not fit the daemon's budget
                raise DaemonBudgetError(problem)
            if problem is not None:  # every rank fails this step alike (map_reduce), so none seals half of it
                raise DaemonUnavailableError(
                    f"snapshot daemon {self.client.dir}: {problem}. Snapshots stay in this process's pool and go on "
                    "to the disk and remote tiers; a daemon started there again is used from the next save after "
                    f"it answers (checked every {segments.RECONNECT_SECS:g} s)")
            return self._describe_in_place(snapshot)

        plan = snapshot.manifest()
        mine: tuple[dict[str, int], list[tuple[str, ChunkEntry]]] | None = None

        def map_fn() -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
            nonlocal mine
            mine = describe()
            return mine

        def commit_all(results: list[Any]) -> list[str]:
            assert plan is not None, "the coordinator holds the manifest plan"
            m = build_manifest(save_id=snapshot.save_id, results=results, tensors=plan.tensors, values=plan.values,
                               containers=plan.containers, layout=plan.layout(self.dw.world_size),
                               tool="ckpt.Checkpointer (daemon)", where=self.url, tied=plan.tied,
                               metadata=plan.metadata)
            return [m.to_json().decode()] + [""] * (len(results) - 1)

        manifest = self.dw.map_reduce(f"ckpt tier {self.name!r} step {step}: checksums and manifest",
                                      map_fn, commit_all)
        assert mine is not None
        meta = {"save_id": snapshot.save_id, **({"manifest": manifest} if manifest else {})}
        segment = self.allocator.segment_name(snapshot.buffer)

        def seal() -> None:
            try:
                self.client.request("seal", segment=segment, step=step, world=self.dw.world_size, meta=meta)
            except DaemonUnavailableError as e:
                self.allocator._lost(e)
                raise

        self.dw.run(f"ckpt tier {self.name!r} step {step}: sealing", seal)
        return sum(e.byte_length for _, e in mine[1])

    def _flush_one(self, snapshot: Snapshot) -> FlushResult:
        """An unreachable daemon fails every step alike; its first failure is reported, the rest are quiet. So is a
        segment the daemon refused for its budget: reported once until every slot is in the daemon again."""
        res = super()._flush_one(snapshot)
        if not self.allocator.refusing:
            self._budget_told = False
        if res.ok:
            self._outage = False
        elif isinstance(res.error, DaemonUnavailableError):
            res.quiet, self._outage = self._outage, True
        elif isinstance(res.error, DaemonBudgetError):  # once while any slot is refused (some may still fit)
            res.quiet, self._budget_told = self._budget_told, True
        return res

    def _after_commit(self, step: int) -> None:
        """Nothing to move: the daemon keeps the newest sealed steps of the run (its ``keep_last``)."""

    # -- listing and reading -----------------------------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        steps = self.client.request("list", run=self.run)["steps"]
        return sorted(int(s) for s, e in steps.items() if e["complete"])

    def storage_for(self, step: int) -> Storage:
        entry = self.client.request("list", run=self.run)["steps"].get(str(step))
        if entry is None or not entry["complete"]:
            raise DaemonError(f"snapshot daemon {self.client.dir}: step {step} of run {self.run!r} is not sealed by "
                              "every rank")
        files: dict[str, tuple[str, int]] = {}
        manifest = None
        for shard in entry["shards"]:
            got = self.client.request("open", run=self.run, step=step, shard=shard)
            files[f"{DATA_DIR}/{got['segment']}"] = (str(self.client.segment_path(got["segment"])), got["nbytes"])
            m = got["meta"].get("manifest")
            if m is not None and not isinstance(m, str):
                raise DaemonProtocolError(f"snapshot daemon {self.client.dir}: step {step} shard {shard!r}: the "
                                          f"seal's manifest is {type(m).__name__}, expected JSON text")
            manifest = m or manifest
        if manifest is None:
            raise DaemonError(f"snapshot daemon {self.client.dir}: step {step} of run {self.run!r} has no manifest "
                              "(its coordinator's seal is missing)")
        return SegmentStorage(f"{self.url}/{self.run}/step_{step}", manifest.encode(), files)


def register() -> None:
    """Entry point ``ckpt.tiers: daemon``: make ``daemon://`` URLs open a ``DaemonTier``."""
    register_tier(SCHEME, DaemonTier)


__all__ = ["DaemonTier", "SegmentStorage", "register"]
