"""Importing Megatron rank directories: ``MegatronSource`` written to any format, optionally resharded.

``run_import(source, plan)`` writes what ``formats.foreign.plan_conversion`` planned for a ``MegatronSource``:
a universal checkpoint that records the spec binding (as ``ckpt.save(spec=..., dims=..., layout=...)`` does, so
``ckpt.load(layout=...)`` and ``ckpt reshard`` need no ``--spec``), or a DCP / torch / safetensors export through
``run_conversion``. With ``target`` (a parallel layout) the universal checkpoint is chunked as every rank of
``target`` would have saved it (``resharding.offline.target_boxes``, the boxes ``reshard`` writes) and records
``target``: written in one pass from the rank files, no intermediate copy; memory about one tensor.
``import_megatron`` does the three steps.

Who calls it: ``ckpt convert --from megatron`` (``ckpt.cli_convert``) and scripts; one process.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ckpt.errors import CheckpointExistsError, SpecError
from formats.foreign.convert import ConvertPlan, ConvertResult, plan_conversion, run_conversion
from formats.foreign.universal import write_universal
from formats.manifest import MANIFEST_NAME
from resharding.megatron_dirs import MegatronSource
from resharding.spec_bind import SpecBinding, parse_parallel

Progress = Callable[[int], None]


def run_import(source: MegatronSource, plan: ConvertPlan, *, target: "str | Mapping[str, Any] | None" = None,
               workers: int = 1, overwrite: bool = False, progress: Progress | None = None,
               storage_options: dict[str, Any] | None = None) -> ConvertResult:
    """Write ``plan`` (from ``plan_conversion(source, ...)``); with ``target``, as that layout's ranks would save it.

    Raises ``CheckpointExistsError`` if the destination holds a checkpoint and ``overwrite`` is false, and
    ``SpecError`` for a ``target`` with a non-universal destination or a layout the spec cannot lay out.
    """
    t0 = time.perf_counter()
    if plan.dst_exists and not overwrite:
        raise CheckpointExistsError(f"{plan.dst}: a {plan.dst_format} checkpoint is already there; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another destination")
    if target is not None and plan.dst_format != "universal":
        raise SpecError(f"a target layout ({target}) needs a universal destination, not {plan.dst_format}; convert "
                        "to universal with the target layout, then export that")
    if plan.dst_format != "universal":
        return run_conversion(source, plan, workers=workers, overwrite=overwrite, progress=progress,
                              storage_options=storage_options)
    if target is not None:
        # Chunked as every rank of the target would save it, the target recorded: that layout's checkpoint,
        # written straight from the rank files (what ``ckpt reshard`` would make of an import, with no copy between).
        source.retarget(target_binding(source, target))
    manifest = write_universal(source, plan.dst, dtypes=plan.dtypes, workers=workers, overwrite=overwrite,
                               progress=progress, storage_options=storage_options)
    written = [f"{plan.dst}/{p}" for p in sorted(manifest.files)] + [f"{plan.dst}/{MANIFEST_NAME}"]
    return ConvertResult(plan, written, time.perf_counter() - t0)


def target_binding(source: MegatronSource, target: "str | Mapping[str, Any]") -> SpecBinding:
    """The source's spec and dims under ``target``, checked (every rank laid out) before anything is written."""
    binding = source.binding.with_parallel(parse_parallel(target))
    for rank in range(binding.world_size):
        binding.rank_layout(rank)
    return binding


def import_megatron(src: str, dst: str, spec: Any, *, dims: Mapping[str, Any] | None = None,
                    parallel: "str | Mapping[str, Any] | None" = None, target: "str | Mapping[str, Any] | None" = None,
                    dst_format: str = "universal", dtype: Any = None, workers: int = 1, overwrite: bool = False,
                    allow_pickle: bool = False, dry_run: bool = False, progress: Progress | None = None,
                    storage_options: dict[str, Any] | None = None) -> ConvertResult:
    """Convert the Megatron rank directories at ``src`` into ``dst_format`` at ``dst`` (see ``MegatronSource`` for
    ``spec``, ``dims`` and ``parallel``; ``target`` reshards a universal destination). ``dry_run`` only plans."""
    with MegatronSource(src, spec, dims=dims, parallel=parallel, allow_pickle=allow_pickle) as source:
        if target is not None:
            target_binding(source, target)
        plan = plan_conversion(source, dst, dst_format, dtype=dtype, storage_options=storage_options)
        if dry_run:
            return ConvertResult(plan, [], 0.0)
        return run_import(source, plan, target=target, workers=workers, overwrite=overwrite, progress=progress,
                          storage_options=storage_options)


__all__ = ["import_megatron", "run_import", "target_binding"]
