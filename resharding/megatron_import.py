"""Importing Megatron rank directories: ``MegatronSource`` written to any format, optionally resharded.

``run_import(source, plan)`` writes what ``formats.foreign.plan_conversion`` planned for a ``MegatronSource``:
a universal checkpoint that records the spec binding (as ``ckpt.save(spec=..., dims=..., layout=...)`` does, so
``ckpt.load(layout=...)`` and ``ckpt reshard`` need no ``--spec``), or a DCP / torch / safetensors export through
``run_conversion``. With ``target`` (a parallel layout) the universal checkpoint is chunked as every rank of
``target`` would have saved it (``resharding.offline.target_boxes``, the boxes ``reshard`` writes) and records
``target``: written in one pass from the rank files, no intermediate copy; memory about one tensor.
``import_megatron`` does the three steps. ``ckpt convert --from megatron`` takes the generic path instead
(``open_source(..., "megatron", ...)``, the format ``resharding.megatron_dirs`` registers); both write through
``run_conversion``.

Who calls it: scripts; one process.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ckpt.errors import SpecError
from formats.foreign.convert import ConvertPlan, ConvertResult, plan_conversion, run_conversion
from resharding.megatron_dirs import MegatronSource, open_megatron, target_binding

Progress = Callable[[int], None]


def run_import(source: MegatronSource, plan: ConvertPlan, *, target: "str | Mapping[str, Any] | None" = None,
               workers: int = 1, overwrite: bool = False, progress: Progress | None = None,
               storage_options: dict[str, Any] | None = None) -> ConvertResult:
    """Write ``plan`` (from ``plan_conversion(source, ...)``); with ``target``, as that layout's ranks would save it.

    The writing is ``run_conversion``'s, as for every source: a retargeted source (``MegatronSource.retarget``,
    what ``open_source(..., "megatron", target=...)`` does) presents the target's boxes and records the target, and
    the universal writer writes what the source presents. Raises ``CheckpointExistsError`` if the destination holds
    a checkpoint and ``overwrite`` is false, and ``SpecError`` for a ``target`` with a non-universal destination or
    a layout the spec cannot lay out.
    """
    _check_target(target, plan.dst_format)
    if target is not None:
        source.retarget(target_binding(source, target))
    return run_conversion(source, plan, workers=workers, overwrite=overwrite, progress=progress,
                          storage_options=storage_options)


def import_megatron(src: str, dst: str, spec: Any, *, dims: Mapping[str, Any] | None = None,
                    parallel: "str | Mapping[str, Any] | None" = None, target: "str | Mapping[str, Any] | None" = None,
                    dst_format: str = "universal", dtype: Any = None, workers: int = 1, overwrite: bool = False,
                    allow_pickle: bool = False, dry_run: bool = False, progress: Progress | None = None,
                    storage_options: dict[str, Any] | None = None) -> ConvertResult:
    """Convert the Megatron rank directories at ``src`` into ``dst_format`` at ``dst`` (see ``MegatronSource`` for
    ``spec``, ``dims`` and ``parallel``; ``target`` reshards a universal destination). ``dry_run`` only plans."""
    _check_target(target, dst_format)
    with open_megatron(src, spec=spec, dims=dims, source_layout=parallel, target=target,
                       allow_pickle=allow_pickle) as source:
        plan = plan_conversion(source, dst, dst_format, dtype=dtype, storage_options=storage_options)
        if dry_run:
            return ConvertResult(plan, [], 0.0)
        return run_conversion(source, plan, workers=workers, overwrite=overwrite, progress=progress,
                              storage_options=storage_options)


def _check_target(target: "str | Mapping[str, Any] | None", dst_format: str) -> None:
    if target is not None and dst_format != "universal":
        raise SpecError(f"a target layout ({target}) needs a universal destination, not {dst_format}; convert "
                        "to universal with the target layout, then export that")


__all__ = ["import_megatron", "run_import", "target_binding"]
