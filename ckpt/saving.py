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
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from ckpt.dist import DistWrapper
from ckpt.errors import CheckpointExistsError, ShardMismatchError, SpecError
from ckpt.options import SaveOptions
from ckpt.state import FlatState, flatten_state
from formats.dtypes import dtype_name
from formats.commit import RankResult, TensorMeta, build_manifest, commit, new_save_id
from formats.manifest import DATA_DIR, MANIFEST_NAME, ContainerEntry, config_metadata
from formats.storage import Storage, open_storage
from formats.writer import ChunkWrite, WriteItem, WriteOptions, write_items
from formats import checksum
from formats.tensor_bytes import as_bytes
from formats.box import Box
from resharding.layout import LocalPiece, TensorLayout, is_dtensor, tensor_layout
from resharding.spec_bind import SpecBinding, local_layouts, parse_parallel, replica_policies, resolve_spec
from resharding.spec_layout import RankLayout
from resharding.planner import WriteAssignment, WriteCandidate, plan_global_writes



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
    meta: dict[str, TensorMeta]
    values: dict[str, Any] | None
    containers: dict[str, ContainerEntry] | None
    #: Digests of the boxes a spec calls replicated, so the coordinator can check that the holders agree.
    replica_digests: dict[tuple[str, Box], str] | None = None
    #: Keys whose tensor is the very tensor of an earlier key (tied weights): key -> that earlier key.
    tied: dict[str, str] = field(default_factory=dict)


@dataclass
class BoundState:
    """A rank's state as a spec describes it (``bind_local``): its layouts, its place in the parallel layout,
    and the digests of the boxes the spec calls replicated (so the coordinator can check the holders agree)."""

    layouts: dict[str, TensorLayout]
    rank_layout: RankLayout
    replica_digests: dict[tuple[str, Box], str]


def describe(flat: FlatState, is_coordinator: bool, bound: BoundState | None = None, store_tied_once: bool = True
             ) -> tuple[_LocalPlan, dict[str, TensorLayout]]:
    """This rank's write candidates and tensor meta (no copy, no I/O). Every rank, before ``plan_global``."""
    layouts = bound.layouts if bound is not None else {k: tensor_layout(t) for k, t in flat.tensors.items()}
    tied = tied_keys(flat) if bound is None and store_tied_once else {}
    candidates: list[WriteCandidate] = []
    meta: dict[str, TensorMeta] = {}
    for key, lay in layouts.items():
        t = lay.local
        dname = dtype_name(t.dtype)
        meta[key] = TensorMeta(dname, tuple(lay.global_shape), lay.description)
        if key in tied:  # stored once, under the key it is tied to
            continue
        for piece in lay.pieces:
            candidates.append(WriteCandidate(key, dname, lay.global_shape, piece.global_box, t.element_size()))
    return (
        _LocalPlan(candidates, meta, flat.values if is_coordinator else None,
                   flat.containers if is_coordinator else None,
                   bound.replica_digests if bound is not None else None, tied),
        layouts,
    )


def tied_keys(flat: FlatState) -> dict[str, str]:
    """Keys whose plain tensor is the same memory, shape, strides and dtype as an earlier key's (a tied embedding
    and LM head): key -> the first key. The checkpoint stores those bytes once and lists both keys on them."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for key, t in flat.tensors.items():
        if is_dtensor(t) or t.numel() == 0 or t.device.type == "meta" or t.data_ptr() == 0:
            continue
        ident = (str(t.device), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        first = seen.setdefault(ident, key)
        if first != key:
            out[key] = first
    return out


def replica_digests(layouts: dict[str, TensorLayout], rl: RankLayout) -> dict[tuple[str, Box], str]:
    """Checksums of this rank's boxes that the spec calls replicated (reads their bytes)."""
    policies = replica_policies(rl)
    return {(key, piece.global_box): checksum.digest(as_bytes(piece.local_view(lay.local).contiguous()))
            for key, lay in layouts.items() for piece in lay.pieces
            if policies.get((key, piece.global_box)) == "replicated"}


def check_replicas(plans: list[_LocalPlan], where: str) -> None:
    """Raise one ``ShardMismatchError`` naming every box a spec calls replicated whose holders differ."""
    first: dict[tuple[str, Box], tuple[int, str]] = {}
    problems: list[str] = []
    for rank, p in enumerate(plans):
        for kb, d in (p.replica_digests or {}).items():
            r0, d0 = first.setdefault(kb, (rank, d))
            if d0 != d:
                key, box = kb
                problems.append(f"key {key!r} box offsets={list(box.offsets)} sizes={list(box.sizes)}: rank {r0} "
                                f"and rank {rank} hold different values (checksums {d0} and {d})")
    if problems:
        raise ShardMismatchError(
            f"{where}: the spec calls these tensors replicated, but their replicas differ ({len(problems)}):\n  "
            + "\n  ".join(problems[:20])
            + "\nIf the replicas may diverge (for example layer norms under tensor parallelism without "
              "synchronisation), mark the rule `averaged: tp` in the spec; otherwise find why the ranks disagree."
        )


def average_replicas(dw: DistWrapper, layouts: dict[str, TensorLayout], rl: RankLayout) -> None:
    """Replace the pieces a spec calls averaged by the mean over their holders (collective over ``dw``).

    The mean is computed in float64, summing holders in rank order, then cast back: every holder computes the
    same bits. The arithmetic differs from any single replica, so tests compare averaged tensors with a
    tolerance.
    """
    policies = {kb for kb, pol in replica_policies(rl).items() if pol == "averaged"}
    mine: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for key, lay in layouts.items():
        for piece in lay.pieces:
            if (key, piece.global_box) in policies:
                mine[(key, piece.global_box.offsets)] = piece.local_view(lay.local).detach().cpu().clone()
    gathered = dw.all_gather(mine)
    if not any(gathered):
        return
    for key, lay in list(layouts.items()):
        new = []
        for piece in lay.pieces:
            kb = (key, piece.global_box.offsets)
            if kb in mine:
                reps = [g[kb] for g in gathered if kb in g]
                mean = (sum(r.to(torch.float64) for r in reps) / len(reps)).to(mine[kb].dtype)
                piece = LocalPiece(tuple(0 for _ in piece.global_box.sizes), piece.global_box, source=mean)
            new.append(piece)
        layouts[key] = TensorLayout(lay.global_shape, lay.local, tuple(new), lay.description)


def chunk_data(lay: TensorLayout, a: WriteAssignment) -> torch.Tensor:
    """The local elements of assignment ``a`` (a view into the local tensor; copied only by the writer)."""
    piece = next(p for p in lay.pieces if p.global_box == a.source)
    local = piece.local_view(lay.local)
    rel = a.box.relative_to(a.source)
    return local[rel.slices()]


@dataclass(frozen=True)
class ManifestPlan:
    """What the coordinator's global plan fixes for the manifest besides the chunks: every key's metadata, the
    plain values and containers of the state, the spec that describes it (``Spec.to_json_dict``), and the
    manifest's informational ``metadata`` (the model configs of ``formats.manifest.config_metadata``)."""

    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    containers: Mapping[str, ContainerEntry] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: Tied tensors stored once: key -> the key whose chunks it shares (``tied_keys``).
    tied: Mapping[str, str] = field(default_factory=dict)

    def layout(self, world_size: int) -> dict[str, Any]:
        """The manifest's ``layout`` record: the world size, the DTensor mesh shapes seen, and the spec."""
        meshes = {repr(m.description["mesh_shape"]) for m in self.tensors.values()
                  if m.description is not None and "mesh_shape" in m.description}
        out: dict[str, Any] = {"world_size": world_size, "dtensor_mesh_shapes": sorted(meshes)}
        if self.spec is not None:
            out["spec"] = self.spec
        return out

    def with_state(self, values: Mapping[str, Any], containers: Mapping[str, ContainerEntry]) -> "ManifestPlan":
        """The same plan for another capture of the same state structure (a Checkpointer snapshot)."""
        return replace(self, values=dict(values), containers=dict(containers))


@dataclass
class SavePlan:
    """The outcome of collective planning on one rank: its assignments and layouts; on the coordinator, the
    ``ManifestPlan`` (None on the other ranks)."""

    save_id: str
    assignments: list[WriteAssignment]
    layouts: dict[str, TensorLayout]
    manifest: ManifestPlan | None


def bind_local(dw: DistWrapper, flat: FlatState, binding: SpecBinding,
               phase: str = "ckpt.save: binding the spec") -> BoundState:
    """This rank's tensors as the spec describes them, with the replicas the spec calls averaged averaged across
    their holders and the replicated ones digested. Collective (the averaging moves data); runs before
    ``plan_save``."""
    if binding.world_size != dw.world_size:
        raise ShardMismatchError(f"{phase}: the parallel layout {binding.parallel} has {binding.world_size} ranks, "
                                 f"the process group {dw.world_size}")
    pre, rl = dw.run(phase, lambda: local_layouts(flat.tensors, binding, dw.rank, for_save=True))
    assert rl is not None
    average_replicas(dw, pre, rl)
    return BoundState(pre, rl, replica_digests(pre, rl))


def plan_save(dw: DistWrapper, flat: FlatState, max_chunk_bytes: int, phase: str = "ckpt.save: planning",
              binding: SpecBinding | None = None, bound: BoundState | None = None,
              store_tied_once: bool = True) -> SavePlan:
    """Planning, DCP's way: every rank describes its boxes (local), the coordinator deduplicates and balances them
    (``plan_global_writes``, pure), each rank gets its assignments back. The only collective is that gather and
    scatter; no I/O. With a spec ``binding`` (and its ``bind_local`` result ``bound``) the rank's tensors are
    described by the spec (rank = this rank in ``dw``), and replicas it calls replicated are checked equal.
    ``store_tied_once=False`` writes tied tensors under each key (the Checkpointer reuses a plan across saves, and
    a tie can end between them: a ``.data`` replaced under one of the keys).
    """
    if (binding is None) != (bound is None):
        raise ValueError("plan_save: a spec binding needs its bind_local() result, and only then")
    layouts: dict[str, TensorLayout] = {}
    fixed: list[ManifestPlan] = []  # set by plan_global, on the coordinator only

    def plan_local() -> _LocalPlan:
        lp, lay = describe(flat, dw.is_coordinator, bound, store_tied_once)
        layouts.update(lay)
        return lp

    def plan_global(plans: list[_LocalPlan]) -> list[tuple[str, list[WriteAssignment]]]:
        check_replicas(plans, phase)
        # Tied on every rank: stored once. Tied on some ranks only: the others offer the bytes, written as usual.
        tied = {k: v for k, v in plans[0].tied.items() if all(p.tied.get(k) == v for p in plans[1:])}
        assignments = plan_global_writes([p.candidates for p in plans], max_chunk_bytes,
                                         overlapping_replicas=binding is not None)
        meta: dict[str, TensorMeta] = {}
        for p in plans:
            for k, m in p.meta.items():
                meta.setdefault(k, m)
        fixed.append(ManifestPlan(meta, plans[0].values or {}, plans[0].containers or {},
                                  binding.to_json_dict() if binding is not None else None, tied=tied))
        save_id = new_save_id()
        return [(save_id, a) for a in assignments]

    save_id, mine = dw.map_reduce(phase, plan_local, plan_global)
    return SavePlan(save_id, mine, layouts, fixed[0] if fixed else None)


def write_and_commit(dw: DistWrapper, storage: Storage, save_id: str, items: "list[WriteItem]",
                     manifest: ManifestPlan | None, wopts: WriteOptions, phase: str = "ckpt.save: writing and committing",
                     tool: str = "ckpt.save") -> int:
    """Every rank executes its items; the coordinator commits (``formats.commit``) once all succeeded. Returns the
    total bytes written. Collective over ``dw``; ``manifest`` is the coordinator's plan (None elsewhere)."""

    def write_local() -> RankResult:
        return write_items(storage, f"{DATA_DIR}/{save_id}-r{dw.rank:05d}", items, wopts)

    def commit_all(results: list[RankResult]) -> list[int]:
        assert manifest is not None, "the coordinator holds the manifest plan"
        m = build_manifest(save_id=save_id, results=results, tensors=manifest.tensors, values=manifest.values,
                           containers=manifest.containers, layout=manifest.layout(dw.world_size), tool=tool,
                           metadata=manifest.metadata, where=storage.url, tied=manifest.tied)
        commit(storage, m)
        return [sum(f.size_bytes for f in m.files.values())] * len(results)

    return int(dw.map_reduce(phase, write_local, commit_all))


def save(state: Any, path: "str | Storage", *, process_group: Any = None, storage_options: dict[str, Any] | None = None,
         overwrite: bool = False, options: SaveOptions | None = None, spec: Any = None,
         dims: dict[str, Any] | None = None, layout: Any = None, model_config: Any = None,
         generation_config: Any = None) -> SaveResult:
    """Save ``state`` to ``path`` (a directory, ``file://``, ``memory://`` or fsspec URL such as ``s3://``).

    Collective: every rank of ``process_group`` (default: the default group, or none when torch.distributed is
    not initialised) calls it with its own shard of the state. Returns when the manifest is committed.
    ``overwrite=False`` refuses to replace a committed checkpoint (``CheckpointExistsError``); with True the old
    one stays loadable until the new manifest replaces it. After the commit, data files the new manifest does not
    list (the replaced checkpoint's, or a crashed save's) are deleted.

    ``spec`` (a ``Spec``, a shipped spec name such as ``"llama"``, a YAML path or text), ``dims`` (the model
    dimensions the spec asks for) and ``layout`` (the parallel layout, ``"tp=2,pp=2,dp=1"`` or a mapping) describe
    rank-local state whose sharding is implicit (Megatron-style, ZeRO flat buffers): the checkpoint then holds
    logical tensors and records the spec, so it loads under any other layout.

    ``model_config`` (a Hugging Face ``PretrainedConfig`` such as ``model.config``, or a dict of JSON values) and
    ``generation_config`` (a ``GenerationConfig`` or a dict) are recorded in the manifest's ``metadata``
    (``hf_config``, ``hf_generation_config``); ``ckpt convert --to safetensors`` writes them as ``config.json`` and
    ``generation_config.json``, so ``from_pretrained`` opens the export. Checked before anything is written
    (``UnsupportedStateError`` for what JSON cannot hold); the coordinator's copy is the one recorded.
    """
    t0 = time.perf_counter()
    binding = make_binding(spec, dims, layout, "ckpt.save")
    configs = config_metadata(model_config, generation_config, "ckpt.save")
    opts = options or SaveOptions()
    dw = DistWrapper(process_group)
    storage = open_storage(path, storage_options)
    flat = flatten_state(state)

    def refuse_overwrite() -> None:  # the coordinator looks; every rank raises the same error
        if dw.is_coordinator and storage.exists(MANIFEST_NAME):
            raise CheckpointExistsError(
                f"{storage.url}: a committed checkpoint is already there; pass overwrite=True to replace it, "
                "or save to a new path"
            )

    if not overwrite:
        dw.run("ckpt.save: checking the destination", refuse_overwrite)
    if dw.is_coordinator:
        warn_if_shared(storage)
    bound = bind_local(dw, flat, binding) if binding is not None else None
    plan = plan_save(dw, flat, opts.max_chunk_bytes, binding=binding, bound=bound)
    manifest = replace(plan.manifest, metadata=configs) if plan.manifest is not None else None
    wopts = WriteOptions(opts.codec, opts.zstd_level, opts.block_bytes, opts.files_per_rank)
    items = [ChunkWrite(a.key, a.box.offsets, a.box.sizes, chunk_data(plan.layouts[a.key], a)) for a in plan.assignments]
    total = write_and_commit(dw, storage, plan.save_id, items, manifest, wopts)
    mine_bytes = sum(i.nbytes for i in items)
    return SaveResult(storage.url, plan.save_id, mine_bytes, total, time.perf_counter() - t0)


def warn_if_shared(storage: Storage) -> list[str]:
    """Warn (``UserWarning``) when a local destination directory already holds entries that are not this format's
    (``manifest.json``, ``data/``): the checkpoint would be mixed in with them without a word. Returns them."""
    import os
    import warnings

    root = getattr(storage, "root", None)
    if not isinstance(root, str) or not os.path.isdir(root):
        return []
    try:
        with os.scandir(root) as it:
            others = sorted(e.name for e in it if e.name not in (MANIFEST_NAME, DATA_DIR) and not e.name.startswith("."))
    except OSError:
        return []
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        warnings.warn(f"ckpt.save {storage.url}: the directory already holds {len(others)} other entr"
                      f"{'y' if len(others) == 1 else 'ies'} ({shown}); the checkpoint (manifest.json, data/) is "
                      "written among them, and a later ckpt.save there with overwrite=True deletes only its own "
                      "data files. Save to a new or empty directory to keep it apart.", UserWarning, stacklevel=3)
    return others


def make_binding(spec: Any, dims: dict[str, Any] | None, layout: Any, where: str) -> SpecBinding | None:
    """The spec binding of ``save``/``load`` arguments, or None when no spec is given."""
    if spec is None and dims is None and layout is None:
        return None
    if spec is None or layout is None:
        raise SpecError(f"{where}: spec= and layout= go together (and dims= for the model dimensions the spec "
                        "needs); pass all of them, or none")
    return SpecBinding(resolve_spec(spec), dict(dims or {}), parse_parallel(layout))
