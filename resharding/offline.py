"""Offline conversion in one process: universal checkpoint <-> the rank-local state of every rank of a layout.

Who calls it: ``ckpt reshard`` (universal -> universal under another parallel layout), the foreign-format
importers and exporters (Megatron rank directories), and tests that simulate every rank of a layout in one
process. Three operations, each streaming one box at a time, so peak memory is about the largest box read or
written (at most a tensor, split at ``max_chunk_bytes``) and nothing is staged on disk:

* ``reshard(src, dst, target)``: the data files and manifest that ``ckpt.save`` would write if every rank of
  ``target`` saved its state: the same global write plan (replicas written once, balanced across target ranks),
  each box read from ``src`` by exact byte ranges.
* ``export_rank(src, binding, rank)``: one rank's local tensors (zero padding included), for loading by a
  framework's own code.
* ``import_ranks(states, dst, binding)``: a universal checkpoint from every rank's local tensors, checking that
  replicas agree and averaging where the spec says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ckpt.errors import ShardMismatchError, SpecError
from formats.dtypes import dtype_from_name, dtype_name
from formats.box import Box, merge_rows
from formats.commit import RankResult, TensorMeta, build_manifest, commit, new_save_id
from formats.manifest import DATA_DIR, Manifest
from formats.reader import ChunkReader, read_manifest
from formats.storage import Storage
from formats.writer import DEFAULT_MAX_CHUNK_BYTES, ChunkWrite, WriteOptions, write_file
from resharding.layout import TensorLayout
from resharding.planner import WriteAssignment, WriteCandidate, plan_global_writes
from resharding.spec_bind import SpecBinding, local_layouts, replica_policies
from resharding.spec_layout import AVERAGED, REPLICATED

RESHARD_BLOCK_BYTES = 256 * 1024
Progress = Callable[[int], None]


@dataclass(frozen=True)
class OfflineWriteResult:
    """A universal checkpoint that ``reshard`` or ``import_ranks`` wrote (or, dry, would write) for every rank of a
    layout: where, its save id, the ranks, and the bytes moved."""

    path: str
    save_id: str
    ranks: int
    bytes_written: int
    bytes_read: int
    elapsed_secs: float


def source_binding(manifest: Manifest, where: str) -> SpecBinding:
    saved = manifest.layout.get("spec") if isinstance(manifest.layout, dict) else None
    if saved is None:
        raise SpecError(f"{where}: this checkpoint records no spec (it was not saved from spec-described rank "
                        "state); pass one (--spec NAME|PATH and --dims JSON)")
    return SpecBinding.from_json_dict(saved, where)


#: Per logical key: (dtype name, shape), as a manifest records them.
Tables = Mapping[str, tuple[str, tuple[int, ...]]]


def _tables(manifest: Manifest) -> Tables:
    return {k: (e.dtype, tuple(e.shape)) for k, e in manifest.tensors.items()}


def _candidates(binding: SpecBinding, tables: Tables, rank: int, where: str) -> list[WriteCandidate]:
    """What ``rank`` of ``binding`` would offer to write (dtype from the checkpoint); replicas once per rank."""
    rl = binding.rank_layout(rank)
    shapes = binding.logical_shapes()
    out: dict[tuple[str, Box], WriteCandidate] = {}
    flat_keys: dict[str, bool] = {}
    kinds = {s.match: s.kind for s in binding.spec.state}
    for lt in rl:
        flat = kinds.get(lt.rule) == "flat"
        for p in lt.pieces:
            flat_keys[p.logical_key] = flat_keys.get(p.logical_key, True) and flat
    for lt in rl:
        flat = kinds.get(lt.rule) == "flat"
        for p in lt.pieces:
            if flat and not flat_keys[p.logical_key]:
                continue  # ZeRO master partitions duplicate the model weights this rank holds whole
            entry = tables.get(p.logical_key)
            if entry is None:
                raise ShardMismatchError(f"{where}: key {p.logical_key!r} (local {lt.key!r} on target rank {rank}) is "
                                         "not in the checkpoint; is it the spec and dims it was saved with?")
            dtype, shape = entry
            if shape != shapes[p.logical_key]:
                raise ShardMismatchError(f"{where}: key {p.logical_key!r} has shape {list(shape)} in the "
                                         f"checkpoint, the spec gives {list(shapes[p.logical_key])}")
            itemsize = dtype_from_name(dtype, p.logical_key).itemsize
            out.setdefault((p.logical_key, p.box), WriteCandidate(p.logical_key, dtype, shape, p.box, itemsize))
    # Adjacent boxes of one key (a rank's attention heads, one piece each) become one chunk: fewer, longer I/Os.
    by_key: dict[str, list[WriteCandidate]] = {}
    for c in out.values():
        by_key.setdefault(c.key, []).append(c)
    merged = []
    for key, cs in by_key.items():
        c0 = cs[0]
        merged += [WriteCandidate(key, c0.dtype, c0.shape, b, c0.itemsize) for b in merge_rows([c.box for c in cs])]
    return merged


def reshard(src: Storage, dst: Storage, target: "SpecBinding | Mapping[str, Any] | str", *,
            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, options: WriteOptions | None = None,
            progress: Progress | None = None, dry_run: bool = False,
            on_plan: Callable[[int], None] | None = None) -> OfflineWriteResult:
    """Write at ``dst`` the checkpoint every rank of ``target`` would have saved; ``src`` stays untouched.

    ``target`` is a full binding, or a parallel layout (the spec and dims come from ``src``'s manifest). Keys the
    spec does not describe (plain values, extra tensors) are carried over unchanged, written by target rank 0.
    ``on_plan(total_bytes)`` is called once the plan is made (a progress bar's total), then ``progress(nbytes)``
    after each box. With ``dry_run`` nothing is written; the result counts the bytes.
    """
    t0 = time.perf_counter()
    where = src.url
    manifest = read_manifest(src)
    if not isinstance(target, SpecBinding):
        target = source_binding(manifest, where).with_parallel(target)
    n = target.world_size
    tables = _tables(manifest)
    plans = [_candidates(target, tables, r, where) for r in range(n)]
    described = {c.key for plan in plans for c in plan}
    for key, entry in manifest.tensors.items():  # keys outside the spec: carried over by rank 0
        if key not in described:
            plans[0].append(WriteCandidate(key, entry.dtype, tuple(entry.shape), Box.whole(tuple(entry.shape)),
                                           dtype_from_name(entry.dtype, key).itemsize))
    assignments = plan_global_writes(plans, max_chunk_bytes, overlapping_replicas=True)
    total = sum(a.box.numel * dtype_from_name(manifest.tensors[a.key].dtype, a.key).itemsize
                for ranks in assignments for a in ranks)
    save_id = new_save_id()
    if dry_run:
        return OfflineWriteResult(dst.url, save_id, n, total, 0, time.perf_counter() - t0)
    if on_plan is not None:
        on_plan(total)
    reader = ChunkReader(src, manifest)
    # Merged chunks hold several pieces of other layouts (a rank's heads); small checksum blocks keep a later load
    # that reads one piece from reading (and verifying) much more than it needs.
    opts = options or WriteOptions(num_files=1, block_bytes=RESHARD_BLOCK_BYTES)
    results: list[RankResult] = []
    for rank, mine in enumerate(assignments):
        items = [_SourceBox(a, manifest, reader, where) for a in mine]
        path = f"{DATA_DIR}/{save_id}-r{rank:05d}-0.bin"
        if not items:
            results.append(({}, []))
            continue
        size, entries = write_file(dst, path, items, opts, progress)
        results.append(({path: size}, entries))
    commit_offline(dst, save_id, results, target, {k: TensorMeta(e.dtype, tuple(e.shape))
                                                   for k, e in manifest.tensors.items()},
                   manifest.values, manifest.containers, "ckpt reshard")
    return OfflineWriteResult(dst.url, save_id, n, total, reader.bytes_read, time.perf_counter() - t0)


class _SourceBox:
    """A ``WriteItem`` whose box is read from the source checkpoint only when the writer reaches it
    (``materialize``) and dropped once written (``release``): one box in memory at a time."""

    final = False

    def __init__(self, a: WriteAssignment, manifest: Manifest, reader: ChunkReader, where: str) -> None:
        self.key, self.offsets, self.sizes = a.key, a.box.offsets, a.box.sizes
        self._box, self._entry, self._reader, self._where = a.box, manifest.tensors[a.key], reader, where
        self._dtype = dtype_from_name(self._entry.dtype, a.key)
        self._data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self._box.numel * self._dtype.itemsize

    def materialize(self) -> torch.Tensor:
        self._data = torch.empty(self.sizes, dtype=self._dtype)
        self._reader.read_box(self._entry, self._box, self._data, f"{self._where}: ")
        return self._data

    def release(self) -> None:
        self._data = None


def target_boxes(binding: SpecBinding, tables: Tables, where: str, *,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> dict[str, list[Box]]:
    """The boxes ``reshard`` would write each key the spec describes as, for the layout of ``binding``.

    They tile every described tensor exactly once (replicas cut differently written once, a rank's adjacent boxes
    merged), so a writer that chunks a tensor by them writes what ``reshard`` would, without a source checkpoint.
    """
    plans = [_candidates(binding, tables, r, where) for r in range(binding.world_size)]
    out: dict[str, list[Box]] = {}
    for ranks in plan_global_writes(plans, max_chunk_bytes, overlapping_replicas=True):
        for a in ranks:
            out.setdefault(a.key, []).append(a.box)
    return out


def commit_offline(dst: Storage, save_id: str, results: list[RankResult], binding: SpecBinding,
                   tensors: Mapping[str, TensorMeta], values: Mapping[str, Any], containers: Mapping[str, Any],
                   tool: str) -> Manifest:
    """Commit (``formats.commit``) data files already written at ``dst`` by every rank of ``binding``'s layout."""
    manifest = build_manifest(save_id=save_id, results=results, tensors=tensors, values=values,
                              containers=containers, tool=tool, where=dst.url,
                              layout={"world_size": len(results), "dtensor_mesh_shapes": [],
                                      "spec": binding.to_json_dict()})
    commit(dst, manifest)
    return manifest


def export_rank(src: Storage, binding: SpecBinding, rank: int, manifest: Manifest | None = None
                ) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s local tensors under ``binding`` (flattened local key -> tensor), padding zero-filled."""
    manifest = manifest or read_manifest(src)
    reader = ChunkReader(src, manifest)
    rl = binding.rank_layout(rank)
    out: dict[str, torch.Tensor] = {}
    for lt in rl:
        keys = {p.logical_key for p in lt.pieces}
        missing = sorted(k for k in keys if k not in manifest.tensors)
        if missing:
            raise ShardMismatchError(f"{src.url}: rank {rank} needs {missing[:5]} (local {lt.key!r}), which the "
                                     "checkpoint does not hold")
        dtypes = {manifest.tensors[k].dtype for k in keys}
        if len(dtypes) > 1:
            raise ShardMismatchError(f"{src.url}: local {lt.key!r} of rank {rank} gathers logical tensors of dtypes "
                                     f"{sorted(dtypes)}")
        out[lt.key] = torch.zeros(lt.shape, dtype=dtype_from_name(dtypes.pop(), lt.key) if keys else torch.float32)
    layouts, _ = local_layouts(out, binding, rank, for_save=False)
    for key, lay in layouts.items():
        entry = manifest.tensors[key]
        for piece in lay.pieces:
            reader.read_box(entry, piece.global_box, piece.local_view(lay.local), f"{src.url}: ")
    return out


def import_ranks(states: Mapping[int, Mapping[str, torch.Tensor]], dst: Storage, binding: SpecBinding, *,
                 values: Mapping[str, Any] | None = None, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 options: WriteOptions | None = None, progress: Progress | None = None) -> OfflineWriteResult:
    """A universal checkpoint at ``dst`` from every rank's flattened local tensors (rank -> key -> tensor).

    Replicas the spec calls replicated must be bit-identical (else ``ShardMismatchError`` naming the key and the
    ranks); replicas it calls averaged are written as their mean (float64, ranks in order). ``values`` are plain
    JSON values stored as they are.
    """
    t0 = time.perf_counter()
    n = binding.world_size
    if sorted(states) != list(range(n)):
        raise ShardMismatchError(f"{dst.url}: layout {binding.parallel} has ranks 0..{n - 1}; got states of ranks "
                                 f"{sorted(states)}")
    layouts: list[dict[str, TensorLayout]] = []
    policies: dict[tuple[str, Box], str] = {}
    for r in range(n):
        lay, rl = local_layouts(states[r], binding, r, for_save=True)
        layouts.append(lay)
        assert rl is not None
        policies.update(replica_policies(rl))
    _reconcile(layouts, policies, dst.url)
    plans = [[WriteCandidate(k, dtype_name(lay.local.dtype), lay.global_shape, p.global_box, lay.local.element_size())
              for k, lay in layouts[r].items() for p in lay.pieces] for r in range(n)]
    assignments = plan_global_writes(plans, max_chunk_bytes, overlapping_replicas=True)
    save_id = new_save_id()
    opts = options or WriteOptions(num_files=1)
    results = []
    written = 0
    for r, mine in enumerate(assignments):
        items = []
        for a in mine:
            lay = layouts[r][a.key]
            piece = next(p for p in lay.pieces if p.global_box == a.source)
            view = piece.local_view(lay.local)[a.box.relative_to(a.source).slices()]
            items.append(ChunkWrite(a.key, a.box.offsets, a.box.sizes, view))
        if not items:
            results.append(({}, []))
            continue
        path = f"{DATA_DIR}/{save_id}-r{r:05d}-0.bin"
        size, entries = write_file(dst, path, items, opts)
        written += size
        if progress is not None:
            progress(size)
        results.append(({path: size}, entries))
    meta = {k: TensorMeta(dtype_name(lay.local.dtype), tuple(lay.global_shape))
            for lays in layouts for k, lay in lays.items()}
    commit_offline(dst, save_id, results, binding, meta, values or {}, {}, "ckpt import")
    return OfflineWriteResult(dst.url, save_id, n, written, 0, time.perf_counter() - t0)


def _reconcile(layouts: list[dict[str, TensorLayout]], policies: Mapping[tuple[str, Box], str], where: str) -> None:
    """Check replicated boxes bit-identical across ranks; replace averaged boxes by their mean (in place)."""
    from resharding.layout import LocalPiece

    holders: dict[tuple[str, Box], list[tuple[int, torch.Tensor]]] = {}
    for r, lays in enumerate(layouts):
        for key, lay in lays.items():
            for p in lay.pieces:
                if (key, p.global_box) in policies:
                    holders.setdefault((key, p.global_box), []).append((r, p.local_view(lay.local)))
    problems = []
    means: dict[tuple[str, Box], torch.Tensor] = {}
    for kb, reps in holders.items():
        if len(reps) < 2:
            continue
        if policies[kb] == REPLICATED:
            r0, t0 = reps[0]
            for r, t in reps[1:]:
                if not torch.equal(t0, t):
                    key, box = kb
                    problems.append(f"key {key!r} box offsets={list(box.offsets)} sizes={list(box.sizes)}: ranks "
                                    f"{r0} and {r} differ (max |diff| {float((t0.double() - t.double()).abs().max()):.3g})")
                    break
        elif policies[kb] == AVERAGED:
            means[kb] = (sum(t.to(torch.float64) for _, t in reps) / len(reps)).to(reps[0][1].dtype)
    if problems:
        raise ShardMismatchError(
            f"{where}: the spec calls these tensors replicated, but their replicas differ ({len(problems)}):\n  "
            + "\n  ".join(problems[:20])
            + "\nIf the replicas may diverge, mark the rule `averaged: tp` in the spec; otherwise find why the ranks "
              "disagree."
        )
    if not means:
        return
    for lays in layouts:
        for key, lay in list(lays.items()):
            new = tuple(LocalPiece(tuple(0 for _ in p.global_box.sizes), p.global_box, source=means[(key, p.global_box)])
                        if (key, p.global_box) in means else p for p in lay.pieces)
            lays[key] = TensorLayout(lay.global_shape, lay.local, new, lay.description)


def logical_numel(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
