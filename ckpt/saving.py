"""``ckpt.save``: a collective, synchronous save into the universal format.

Order of work on every rank (the coordinator is rank 0 of the group):
1. plan: resolve Stateful objects, flatten, describe the boxes this rank holds (no copy, no I/O);
   the coordinator deduplicates replicas, balances bytes across ranks, and picks a save id.
2. write: each rank writes its assigned boxes into its own data files, in parallel threads.
3. commit: the coordinator writes the manifest (tmp + fsync + rename, or manifest-last on object stores) once
   every rank reported success. If any rank failed, nothing is committed and every rank raises.
Data file names carry the save id, so overwriting a committed checkpoint never touches the files its manifest
references until the new manifest has replaced it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.dist import DistWrapper
from ckpt.errors import CheckpointExistsError
from ckpt.options import SaveOptions
from ckpt.state import FlatState, flatten, resolve
from formats.dtypes import dtype_name
from formats.manifest import DATA_DIR, MANIFEST_NAME, ChunkEntry, ContainerEntry, FileEntry, Manifest, TensorEntry, ValueEntry
from formats.storage import Storage, open_storage
from formats.writer import ChunkWrite, WriteOptions, write_items
from resharding.layout import TensorLayout, tensor_layout
from resharding.planner import WriteAssignment, WriteCandidate, plan_global_writes

WRITER_VERSION = "0.1.0"


@dataclass(frozen=True)
class SaveResult:
    """What ``ckpt.save`` returns on every rank."""

    path: str
    save_id: str
    bytes_written_this_rank: int
    total_bytes: int
    elapsed_secs: float


@dataclass
class _LocalPlan:
    candidates: list[WriteCandidate]
    meta: dict[str, tuple[str, tuple[int, ...], dict[str, Any] | None]]
    values: dict[str, Any] | None
    containers: dict[str, ContainerEntry] | None


def describe(flat: FlatState, is_coordinator: bool) -> tuple[_LocalPlan, dict[str, TensorLayout]]:
    """This rank's write candidates and tensor meta (no copy, no I/O). Every rank, before ``plan_global``."""
    layouts: dict[str, TensorLayout] = {}
    candidates: list[WriteCandidate] = []
    meta: dict[str, tuple[str, tuple[int, ...], dict[str, Any] | None]] = {}
    for key, t in flat.tensors.items():
        lay = tensor_layout(t)
        layouts[key] = lay
        dname = dtype_name(t.dtype)
        meta[key] = (dname, lay.global_shape, lay.description)
        for piece in lay.pieces:
            candidates.append(WriteCandidate(key, dname, lay.global_shape, piece.global_box, t.element_size()))
    return (
        _LocalPlan(candidates, meta, flat.values if is_coordinator else None,
                   flat.containers if is_coordinator else None),
        layouts,
    )


def chunk_data(lay: TensorLayout, a: WriteAssignment) -> torch.Tensor:
    """The local elements of assignment ``a`` (a view into the local tensor; copied only by the writer)."""
    piece = next(p for p in lay.pieces if p.global_box == a.source)
    local = piece.local_view(lay.local)
    rel = a.box.relative_to(a.source)
    return local[rel.slices()]


@dataclass
class SavePlan:
    """The outcome of collective planning on one rank: its assignments, and on the coordinator the meta of
    every key (dtype, global shape, saved layout) plus its values and containers for the manifest."""

    save_id: str
    assignments: list[WriteAssignment]
    layouts: dict[str, TensorLayout]
    coord: dict[str, Any]


def plan_save(dw: DistWrapper, flat: FlatState, max_chunk_bytes: int, check: Any = None,
              step: str = "ckpt.save: planning") -> SavePlan:
    """Collective planning: every rank describes its boxes, the coordinator deduplicates and balances.

    ``check(plans)`` runs on the coordinator before planning (e.g. refuse to overwrite); it may raise.
    """
    layouts: dict[str, TensorLayout] = {}
    coord: dict[str, Any] = {}

    def plan_local() -> _LocalPlan:
        lp, lay = describe(flat, dw.is_coordinator)
        layouts.update(lay)
        return lp

    def plan_global(plans: list[_LocalPlan]) -> list[tuple[str, list[WriteAssignment]]]:
        if check is not None:
            check(plans)
        assignments = plan_global_writes([p.candidates for p in plans], max_chunk_bytes)
        meta: dict[str, tuple[str, tuple[int, ...], dict[str, Any] | None]] = {}
        for p in plans:
            for k, m in p.meta.items():
                meta.setdefault(k, m)
        coord.update(meta=meta, values=plans[0].values, containers=plans[0].containers)
        save_id = f"{int(time.time())}-{uuid.uuid4().hex[:12]}"
        return [(save_id, a) for a in assignments]

    save_id, mine = dw.map_reduce(step, plan_local, plan_global)
    return SavePlan(save_id, mine, layouts, coord)


def write_and_commit(dw: DistWrapper, storage: Storage, save_id: str, items: list[ChunkWrite], coord: dict[str, Any],
                     wopts: WriteOptions, step: str = "ckpt.save: writing and committing",
                     ready: Any = None) -> int:
    """Every rank writes its items; the coordinator commits the manifest once all succeeded. Returns total bytes.

    Collective over ``dw``. After the commit, data files the manifest does not list are deleted. ``ready(item)``
    (optional) blocks until an item's data is final, so items stream out as they are staged.
    """

    def write_local() -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
        return write_items(storage, f"{DATA_DIR}/{save_id}-r{dw.rank:05d}", items, wopts, ready)

    def commit(results: list[tuple[dict[str, int], list[tuple[str, ChunkEntry]]]]) -> list[int]:
        manifest = _build_manifest(results, save_id, dw.world_size, coord)
        storage.commit(MANIFEST_NAME, manifest.to_json())
        # After the commit, and only then: data files the new manifest does not list belong to the checkpoint
        # it replaced (overwrite=True) or to saves that crashed before committing here.
        stale = [p for p in storage.list(DATA_DIR) if p not in manifest.files]
        if stale:
            storage.delete(stale)
        return [sum(f.size_bytes for f in manifest.files.values())] * len(results)

    return int(dw.map_reduce(step, write_local, commit))


def save(state: Any, path: "str | Storage", *, process_group: Any = None, storage_options: dict[str, Any] | None = None,
         overwrite: bool = False, options: SaveOptions | None = None) -> SaveResult:
    """Save ``state`` to ``path`` (a directory, ``file://``, ``memory://`` or fsspec URL such as ``s3://``).

    Collective: every rank of ``process_group`` (default: the default group, or none when torch.distributed is
    not initialised) calls it with its own shard of the state. Returns when the manifest is committed.
    ``overwrite=False`` refuses to replace a committed checkpoint (``CheckpointExistsError``); with True the old
    one stays loadable until the new manifest replaces it. After the commit, data files the new manifest does not
    list (the replaced checkpoint's, or a crashed save's) are deleted.
    """
    t0 = time.perf_counter()
    opts = options or SaveOptions()
    dw = DistWrapper(process_group)
    storage = open_storage(path, storage_options)
    plain, _, _ = resolve(state)
    flat = flatten(plain)

    def refuse_overwrite(plans: list[_LocalPlan]) -> None:
        if not overwrite and storage.exists(MANIFEST_NAME):
            raise CheckpointExistsError(
                f"{storage.url}: a committed checkpoint is already there; pass overwrite=True to replace it, "
                "or save to a new path"
            )

    plan = plan_save(dw, flat, opts.max_chunk_bytes, refuse_overwrite)
    wopts = WriteOptions(opts.codec, opts.zstd_level, opts.block_bytes, opts.files_per_rank)
    items = [ChunkWrite(a.key, a.box.offsets, a.box.sizes, chunk_data(plan.layouts[a.key], a)) for a in plan.assignments]
    total = write_and_commit(dw, storage, plan.save_id, items, plan.coord, wopts)
    mine_bytes = sum(i.nbytes for i in items)
    return SaveResult(storage.url, plan.save_id, mine_bytes, total, time.perf_counter() - t0)


def _build_manifest(results: list[tuple[dict[str, int], list[tuple[str, ChunkEntry]]]], save_id: str,
                    world_size: int, coord: dict[str, Any]) -> Manifest:
    files: dict[str, FileEntry] = {}
    chunks: dict[str, list[ChunkEntry]] = {}
    for rank, (sizes, entries) in enumerate(results):
        for p, n in sizes.items():
            files[p] = FileEntry(n, rank)
        for key, c in entries:
            chunks.setdefault(key, []).append(c)
    meta = coord["meta"]
    tensors = {
        k: TensorEntry(k, d, shape, tuple(sorted(chunks.get(k, []), key=lambda c: c.offsets)), desc)
        for k, (d, shape, desc) in meta.items()
    }
    values = {k: ValueEntry(k, v) for k, v in coord["values"].items()}
    meshes = {repr(m[2]["mesh_shape"]) for m in meta.values() if m[2] is not None}
    return Manifest(
        save_id=save_id, world_size=world_size, files=files, tensors=tensors, values=values,
        containers=coord["containers"],
        writer={"library": "ckpt", "version": WRITER_VERSION, "torch": torch.__version__},
        created_unix_secs=time.time(),
        layout={"world_size": world_size, "dtensor_mesh_shapes": sorted(meshes)},
    )
