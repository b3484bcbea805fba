"""A universal checkpoint written out as Megatron rank directories at any layout (``ckpt convert --to megatron``).

The inverse of ``resharding.megatron_dirs``: for every rank of the target layout, the rank's local tensors are
read from the universal checkpoint by exact byte ranges (``resharding.offline.export_rank``: the spec's pieces,
vocabulary padding zero-filled, QKV and SwiGLU fused in Megatron-Core's order, local layer and expert indices),
nested as Megatron holds them and written with ``torch.save``:

    DST/latest_checkpointed_iteration.txt             the iteration (or ``release``)
    DST/iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    DST/iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/distrib_optim_DDD.pt     (zero >= 1: one per data-parallel rank)

``model_optim_rng.pt`` holds ``args``, ``checkpoint_version`` (3.0), ``iteration``, ``model`` (local name ->
tensor, plus the spec's ``inert`` entries, Transformer Engine's ``_extra_state``, as "no FP8 state") and, with
``zero = 0`` and a source that has optimizer state, ``optimizer`` in the layout of docs/megatron-layout.md
(``{"state": {local name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...]}``). ``args`` keeps the style of the
source's: the reference model's ``{"model": ..., "parallel": ...}`` dicts with the target's parallel settings, else
an ``argparse.Namespace`` with Megatron-LM's names (the source's plain values, the target's
``tensor_model_parallel_size`` / ``pipeline_model_parallel_size`` / ``expert_model_parallel_size`` /
``padded_vocab_size``, the dims). Files hold tensors, dicts, lists, plain values and that Namespace only.

Streaming: one rank's state in memory at a time (its tensors, read box by box); nothing is staged on disk beyond
the new iteration directory, written under a temporary name and renamed into place, then the tracker file
(written to a temporary name and renamed). A previous save in DST is never touched, except the same iteration
with ``overwrite`` (replaced only once the new one is complete).

Who calls it: ``ckpt convert SRC DST --to megatron`` (``ckpt.cli_convert``) and scripts; one process.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ckpt.errors import (CheckpointExistsError, FormatNotImplementedError, ShardMismatchError, SpecError,
                         StorageError)
from formats.dtypes import dtype_from_name
from formats.manifest import MANIFEST_NAME
from formats.nesting import nest
from formats.reader import read_manifest
from formats.storage import open_storage
from resharding.grid import Grid, layout_text
from resharding.megatron_files import ARGS_DIMS, MODEL_FILE, TRACKER_FILE, rank_dir_name
from resharding.offline import export_rank, source_binding
from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec

CHECKPOINT_VERSION = 3.0
Progress = Callable[[int], None]

#: spec dims -> Megatron-LM ``args`` names, the importer's table inverted (``tied`` is written as
#: ``untie_embeddings_and_output_weights``).
DIM_ARGS = {dim: arg for arg, dim in ARGS_DIMS.items()}


def no_fp8_state() -> torch.Tensor:
    """What Transformer Engine's ``get_extra_state`` writes for a module without FP8 state: ``pickle(None)`` as a
    byte tensor (every TE version that reads byte tensors accepts it; FP8 scaling histories are per rank and are
    not carried across a reshard: TE re-initialises them)."""
    return torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8).clone()


@dataclass
class MegatronExportResult:
    """What ``export_megatron`` wrote (or, dry, would write)."""

    path: str
    iteration: int | None
    spec: str
    layout: dict[str, Any]
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    bytes_read: int = 0
    elapsed_secs: float = 0.0
    dry_run: bool = False
    #: What Megatron-LM itself would refuse about this layout (the spec language allows uneven splits; Megatron-Core
    #: asserts that heads, query groups and ffn divide by tp, layers by pp, experts by ep).
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"dst": self.path, "format": "megatron", "iteration": self.iteration, "spec": self.spec,
                "layout": self.layout, "files": len(self.files), "bytes": self.bytes_written,
                "seconds": round(self.elapsed_secs, 3), "dry_run": self.dry_run, "warnings": self.warnings}


def export_binding(manifest: Any, where: str, target: "str | Mapping[str, Any]", spec: Any = None,
                   dims: Mapping[str, Any] | None = None) -> SpecBinding:
    """The binding the export lays the ranks out with: ``spec`` (default: the one the checkpoint records; a shipped
    name of the other naming is fine, the logical names are shared), the recorded dims overridden by ``dims``, and
    ``target``. A checkpoint without optimizer state binds the spec without its optimizer rules."""
    recorded = None
    if isinstance(manifest.layout, dict) and manifest.layout.get("spec") is not None:
        recorded = source_binding(manifest, where)
    if spec is None:
        if recorded is None:
            raise SpecError(f"{where}: this checkpoint records no spec; pass one (--spec llama-te|llama|gpt|... or a "
                            "YAML path) and the model dims (--dims JSON)")
        spec_obj = recorded.spec
    else:
        spec_obj = resolve_spec(spec)
    declared = {d.name for d in spec_obj.dims}
    all_dims = {k: v for k, v in (recorded.dims if recorded else {}).items() if k in declared}
    all_dims.update(dims or {})
    missing = sorted(d.name for d in spec_obj.dims if d.default is None and d.name not in all_dims)
    if missing:
        raise SpecError(f"{where}: spec '{spec_obj.name}' needs the model dims {missing}; pass them (--dims JSON)")
    if not any(k.startswith("optim/") for k in manifest.tensors):
        spec_obj = spec_obj.restricted_to({"model", "iteration"})
    binding = SpecBinding(spec_obj, all_dims, parse_parallel(target))
    _check_source(binding, manifest, where)
    return binding


def _check_source(binding: SpecBinding, manifest: Any, where: str) -> None:
    """Every logical tensor the target's ranks need is in the checkpoint, with the shape the dims give."""
    shapes = binding.logical_shapes()
    needed: set[str] = set()
    for r in range(binding.world_size):
        for lt in binding.rank_layout(r):
            needed.update(p.logical_key for p in lt.pieces)
    missing = sorted(needed - set(manifest.tensors))
    if missing:
        raise ShardMismatchError(f"{where}: spec '{binding.spec.name}' under {layout_text(binding.parallel)} needs "
                                 f"{len(missing)} tensor(s) the checkpoint does not hold: {', '.join(missing[:6])}"
                                 f"{', ...' if len(missing) > 6 else ''}. Is it the right spec (--spec) and model?")
    wrong = [(k, list(shapes[k]), list(manifest.tensors[k].shape)) for k in sorted(needed)
             if k in shapes and tuple(shapes[k]) != tuple(manifest.tensors[k].shape)]
    if wrong:
        lines = "\n  ".join(f"{k}: the dims give {a}, the checkpoint holds {b}" for k, a, b in wrong[:8])
        raise ShardMismatchError(f"{where}: the model dims {binding.dims} do not match the checkpoint:\n  {lines}\n"
                                 "Pass the dims it was saved with (--dims), or leave them out to use the recorded ones.")


def export_megatron(src: str, dst: str, *, target: "str | Mapping[str, Any]", spec: Any = None,
                    dims: Mapping[str, Any] | None = None, iteration: "int | str | None" = None,
                    overwrite: bool = False, dry_run: bool = False, progress: Progress | None = None,
                    on_plan: Progress | None = None, storage_options: dict[str, Any] | None = None
                    ) -> MegatronExportResult:
    """Write the universal checkpoint ``src`` as Megatron rank directories of layout ``target`` under ``dst`` (a
    local directory: a Megatron-LM save root). See the module docstring.

    ``iteration``: the iteration to record (default: the checkpoint's ``iteration`` value, else ``"release"``,
    Megatron-LM's name for a checkpoint that is not part of a run). ``on_plan(total_bytes)`` is called once before
    writing, ``progress(bytes)`` after each rank's files. Raises ``CheckpointExistsError`` if ``dst``
    already holds that iteration and ``overwrite`` is false, ``SpecError`` / ``ShardMismatchError`` before
    anything is written if the spec, dims or target do not fit the checkpoint.
    """
    start = time.monotonic()
    _check_destination(dst)
    storage = open_storage(src, storage_options)
    manifest = read_manifest(storage)
    binding = export_binding(manifest, storage.url, target, spec, dims)
    values = {k: v.value for k, v in manifest.values.items()}
    it = _iteration(iteration, values)
    name = "release" if it == "release" else f"iter_{int(it):07d}"
    final = os.path.join(dst, name)
    if os.path.exists(final) and not overwrite and not dry_run:
        raise CheckpointExistsError(f"{final}: a Megatron checkpoint of this iteration is already there; pass "
                                    "--overwrite to replace it, or choose another destination")
    grid = Grid.of(binding.parallel)
    result = MegatronExportResult(dst, None if it == "release" else int(it), binding.spec.name, dict(binding.parallel),
                                  dry_run=dry_run)
    result.warnings = megatron_limits(binding)
    payload_common = {"args": megatron_args(manifest.metadata, binding, it), "checkpoint_version": CHECKPOINT_VERSION,
                      "iteration": 0 if it == "release" else int(it)}
    optim_values = {k: v for k, v in values.items() if k.startswith("optim/")}
    writers = [r for r in range(binding.world_size) if grid.zero or grid.coords(r).edp == 0]
    if on_plan is not None and not dry_run:
        on_plan(sum(_rank_bytes(binding, r, manifest) for r in writers))
    work = os.path.join(dst, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    if not dry_run:
        os.makedirs(work)
    try:
        for rank in writers:  # a data-parallel replica without ZeRO writes nothing: one file per position
            c = grid.coords(rank)
            d = rank_dir_name(c.tp, c.pp, c.ep, grid)
            files = ([MODEL_FILE] if c.edp == 0 else []) + ([f"distrib_optim_{c.dp:03d}.pt"] if grid.zero else [])
            result.files += [f"{name}/{d}/{f}" for f in files]
            if not dry_run:
                n = _write_rank(storage, manifest, binding, rank, os.path.join(work, d), files, payload_common,
                                optim_values, result)
                if progress is not None:
                    progress(n)
        if dry_run:
            return result
        _install(work, final, overwrite)
        _write_tracker(dst, "release" if it == "release" else str(int(it)))
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise StorageError(f"{dst}: writing the Megatron files failed ({e}); nothing was installed, the previous "
                           "iterations are as they were") from e
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.elapsed_secs = time.monotonic() - start
    return result


def _iteration(iteration: "int | str | None", values: Mapping[str, Any]) -> "int | str":
    it = iteration if iteration is not None else values.get("iteration", "release")
    if isinstance(it, str) and it != "release":
        if not it.isdigit():
            raise SpecError(f"iteration must be a number or 'release', not {it!r}")
        it = int(it)
    return it


def _write_rank(storage: Any, manifest: Any, binding: SpecBinding, rank: int, folder: str, files: list[str],
                common: Mapping[str, Any], optim_values: Mapping[str, Any], result: MegatronExportResult) -> int:
    """Read ``rank``'s local tensors and write its files into ``folder``; returns the bytes read."""
    local = export_rank(storage, binding, rank, manifest)
    model, optim = _split(local, binding, optim_values, manifest.containers, f"{storage.url}: rank {rank}")
    os.makedirs(folder, exist_ok=True)
    for f in files:
        if f == MODEL_FILE:
            payload = dict(common, model=model)
            if binding.parallel.get("zero", 0) == 0 and optim:
                payload["optimizer"] = optim
        else:
            payload = dict(common, optimizer=optim)
        result.bytes_written += _save(payload, os.path.join(folder, f))
    n = sum(t.numel() * t.element_size() for t in local.values())
    result.bytes_read += n
    return n


def _rank_bytes(binding: SpecBinding, rank: int, manifest: Any) -> int:
    total = 0
    for lt in binding.rank_layout(rank):
        keys = {p.logical_key for p in lt.pieces}
        size = dtype_from_name(manifest.tensors[next(iter(keys))].dtype, lt.key).itemsize if keys else 4
        total += math.prod(lt.shape) * size
    return total


def megatron_limits(binding: SpecBinding) -> list[str]:
    """The divisibility Megatron-Core asserts when it builds the model at this layout, where the dims break it."""
    d, p = binding.dims, binding.parallel
    checks = [("heads", "tp"), ("kv_heads", "tp"), ("ffn", "tp"), ("layers", "pp"), ("experts", "ep")]
    out = []
    for dim, axis in checks:
        value, size = d.get(dim), int(p.get(axis, 1))
        if isinstance(value, int) and size > 1 and value % size:
            out.append(f"{dim} = {value} does not divide by {axis} = {size}: Megatron-Core cannot build the model at "
                       "this layout (ckpt reads and writes it; Megatron-LM will not load it)")
    return out


def _check_destination(dst: str) -> None:
    """A local directory (Megatron-LM reads local files) that is not a universal checkpoint."""
    if "://" in dst:
        raise FormatNotImplementedError(f"{dst}: the Megatron export writes a local directory, not a URL; export "
                                        "locally, then copy the directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointExistsError(f"{dst}: is a file; pass a directory (a Megatron-LM save root)")
    if os.path.exists(os.path.join(dst, MANIFEST_NAME)):
        raise CheckpointExistsError(f"{dst}: holds a universal checkpoint ({MANIFEST_NAME}); write the Megatron "
                                    "directories elsewhere")


def _split(local: Mapping[str, torch.Tensor], binding: SpecBinding, optim_values: Mapping[str, Any],
           containers: Mapping[str, Any], where: str) -> tuple[dict[str, Any], Any]:
    """A rank's flattened local tensors as Megatron's ``model`` (in the spec's order, with the spec's inert entries
    beside their parameters) and ``optimizer`` subtrees; the optimizer gets the checkpoint's ``optim/`` values
    (``param_groups``: the same on every rank), nested with the containers the manifest records for them."""
    params = {p.name: p.pattern for p in binding.spec.params}
    inert = [(rule.pattern, params[rule.beside]) for rule in binding.spec.inert]
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for key, t in local.items():
        top, _, rest = key.partition("/")
        if top == "model":
            model[rest] = t
            for name, beside in inert:
                m = beside.match(rest)
                if m is not None:
                    model.setdefault(name.fill(m), no_fp8_state())
        elif top == "optim":
            optim[key] = t
        else:
            raise SpecError(f"local key {key!r} of spec '{binding.spec.name}' is neither model/ nor optim/ state; "
                            "the Megatron export writes those two only")
    if not optim:
        return model, {}
    optim.update(optim_values)
    kept = {k: c for k, c in containers.items() if k and any(v.startswith(k + "/") for v in optim_values)}
    return model, nest(optim, kept, where)["optim"]


def megatron_args(metadata: Mapping[str, Any], binding: SpecBinding, iteration: Any) -> Any:
    """The ``args`` entry for the target layout, in the style of the source's (see the module docstring)."""
    src = (metadata.get("megatron") or {}).get("args") if isinstance(metadata.get("megatron"), Mapping) else None
    par, dims = binding.parallel, binding.dims
    if isinstance(src, Mapping) and isinstance(src.get("parallel"), Mapping) and isinstance(src.get("model"), Mapping):
        return {"model": dict(src["model"]),
                "parallel": {k: par.get(k, v) for k, v in src["parallel"].items()}}
    plain = {k: v for k, v in (src or {}).items() if _plain(v)} if isinstance(src, Mapping) else {}
    for dim, arg in DIM_ARGS.items():
        if dim in dims and dims[dim] is not None:
            plain[arg] = dims[dim]
    if "kv_heads" in dims and "heads" in dims:
        plain["group_query_attention"] = dims["kv_heads"] != dims["heads"]
    if "tied" in dims:
        plain["untie_embeddings_and_output_weights"] = not dims["tied"]
    if "vocab" in dims:
        unit = int(dims.get("vocab_divisible_by", 128)) * int(par["tp"])
        plain["padded_vocab_size"] = math.ceil(int(dims["vocab"]) / unit) * unit
    plain.update(tensor_model_parallel_size=par["tp"], pipeline_model_parallel_size=par["pp"],
                 expert_model_parallel_size=par.get("ep", 1), data_parallel_size=par.get("dp", 1),
                 world_size=binding.world_size, use_distributed_optimizer=par.get("zero", 0) >= 1)
    if iteration != "release":
        plain["iteration"] = int(iteration)
    return argparse.Namespace(**plain)


def _plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or (isinstance(v, (bool, int, float, str)) and v != "<opaque>")


def _save(payload: Mapping[str, Any], path: str) -> int:
    torch.save(dict(payload), path)
    return os.path.getsize(path)


def _install(work: str, final: str, overwrite: bool) -> None:
    """Rename the complete new iteration into place; with ``overwrite``, the old one moves aside first and is
    removed only after."""
    old = None
    if os.path.exists(final):
        if not overwrite:
            raise CheckpointExistsError(f"{final}: appeared while the export ran; nothing was replaced")
        old = f"{work}.old"
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_tracker(dst: str, text: str) -> None:
    tmp = os.path.join(dst, f".{TRACKER_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(dst, TRACKER_FILE))


__all__ = ["export_megatron", "export_binding", "megatron_args", "no_fp8_state", "MegatronExportResult"]
