"""Foreign checkpoint formats: PyTorch DCP, ``torch.save`` files, safetensors (single or sharded, Hugging Face style),
DeepSpeed ZeRO checkpoints (read) and DeepSpeed's universal checkpoint layout (written).

Import into the universal format, export from it, convert between any two, and compare any two, streaming one
tensor at a time. ``docs/convert.md`` is the user's guide; ``ckpt convert`` / ``ckpt diff`` are the command line.

Layering: this package imports only ``formats``, ``ckpt.errors``, torch and the standard library (safetensors
files are parsed here; the ``safetensors`` package is not needed; DeepSpeed is never imported). Megatron rank
directories need a spec, so their reader lives a layer up (``resharding.megatron_dirs``).

Public API::

    open_source(path, fmt="auto", allow_pickle=False) -> Source      # tensors, values, containers, read(key)
    detect_format(path) -> "universal" | "dcp" | "torch" | "safetensors" | "deepspeed" | "megatron"
    plan_conversion(source, dst, dst_format, dtype=None, max_shard_bytes=None) -> ConvertPlan
    run_conversion(source, plan, workers=1, overwrite=False, progress=None) -> ConvertResult
    convert(src, dst, src_format="auto", dst_format="universal", ...) -> ConvertResult
    diff(a, b, atol=0.0, rtol=0.0) -> DiffReport
"""

from formats.foreign.convert import (ConvertPlan, ConvertResult, convert, open_source, parse_dtype, plan_conversion,
                                     run_conversion)
from formats.foreign.detect import (FORMATS, PLANNED_SOURCES, PLANNED_TARGETS, SOURCE_FORMATS, TARGETS,
                                    FormatNotImplementedError,
                                    UnknownFormatError, detect_format)
from formats.foreign.diff import Difference, DiffReport, diff
from formats.foreign.hf_safetensors import parse_size
from formats.foreign.source import MODEL_PREFIX, Source, TensorInfo

__all__ = [
    "FORMATS", "PLANNED_SOURCES", "PLANNED_TARGETS", "SOURCE_FORMATS", "TARGETS", "MODEL_PREFIX",
    "ConvertPlan", "ConvertResult", "Difference", "DiffReport", "FormatNotImplementedError", "Source", "TensorInfo",
    "UnknownFormatError",
    "convert", "detect_format", "diff", "open_source", "parse_dtype", "parse_size", "plan_conversion",
    "run_conversion",
]
