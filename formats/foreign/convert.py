"""Conversion between checkpoint formats: open a source, plan (pure), then write.

``open_source(path, fmt, **options)`` opens any registered format (``formats.foreign.registry``) as a ``Source``;
``plan_conversion`` says what a conversion would write (no I/O beyond what opening did); ``run_conversion`` writes
it, tensor by tensor; ``convert`` does all three. Every pair of formats converts directly (safetensors -> DCP needs no universal copy in between); the
universal format is the hub only in that every key follows its conventions.

Who calls it: ``ckpt convert`` (``ckpt.cli_convert``) and scripts. Single process; ``workers`` threads write
output files in parallel (peak memory about ``workers`` tensors).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError
from formats.box import Box
from formats.foreign.detect import (PLANNED_SOURCES, PLANNED_TARGETS, TARGETS, UnknownFormatError, detect_format,
                                    not_implemented, unregistered)
from formats.foreign.registry import SourceOptionError, find_source, source_names
from formats.foreign.source import MODEL_PREFIX, Source
from formats.manifest import Manifest
from formats.reader import ChunkReader

Progress = Callable[[int], None]

#: ``--dtype`` names: the short ones and torch's own (``torch.bfloat16``, ``bfloat16``, ``half``, ...), any case.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "f16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
          "float": torch.float32, "f32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
          "double": torch.float64, "f64": torch.float64}
#: Floating dtypes a ``--dtype`` cast applies to; fp8 and other quantised types keep their bits (they need scales).
CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(name: "str | torch.dtype | None") -> torch.dtype | None:
    """The dtype a ``--dtype`` / ``dtype=`` name means (``DTYPES``, with or without ``torch.``); ``ValueError``
    listing the accepted names otherwise."""
    if name is None or isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower()
    try:
        return DTYPES[text[len("torch."):] if text.startswith("torch.") else text]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)} (torch's names, with or without "
                         "'torch.', are accepted)") from None


def open_source(path: str, fmt: str = "auto", *, allow_pickle: bool = False,
                storage_options: dict[str, Any] | None = None, model_keys: "list[str] | None" = None,
                **options: Any) -> Source:
    """Open ``path`` as format ``fmt`` (``auto`` detects it). Reads and validates metadata only.

    ``fmt`` is any registered format (``formats.foreign.registry``); ``options`` are that format's own (Megatron's
    ``spec``, ``dims``, ``source_layout``, ``target``), checked against what it declares: one it does not take, or
    one it requires and did not get, raises ``SourceOptionError``. Options given as None count as not given.
    ``model_keys`` (``--model-keys``): the names of ``model.named_parameters()`` in order, which re-key a torch.save
    file's index-keyed optimizer state (``optim.state_dict()``) by parameter name; other formats refuse it.
    """
    path = str(path)
    if fmt in PLANNED_SOURCES:
        raise not_implemented(fmt, "reading")
    if fmt == "auto":
        fmt = detect_format(path, storage_options)
    entry = find_source(fmt)
    if entry is None:
        raise unregistered(path, fmt, source_names())
    source = entry.open(path, allow_pickle=allow_pickle, storage_options=storage_options, **options)
    if model_keys is not None:
        use = getattr(source, "use_model_keys", None)
        try:
            if use is None:
                raise SourceOptionError(f"{path}: --model-keys (model_keys) applies to torch.save files (--from "
                                        f"torch), whose optimizer state is keyed by parameter index; the source is "
                                        f"{fmt}: leave the option out")
            use(list(model_keys))
        except BaseException:
            source.close()
            raise
    return source


def read_model_keys(path: str) -> list[str]:
    """``--model-keys FILE``: a JSON list of names, or one name per line (blank lines and ``#`` comments skipped).
    ``SourceOptionError`` naming the file for one that cannot be read or lists no name."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(16 * 2**20 + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise SourceOptionError(f"--model-keys {path}: cannot read it ({e}); give a text file with the names of "
                                "model.named_parameters(), one per line") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as e:
            raise SourceOptionError(f"--model-keys {path}: not a valid JSON list ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SourceOptionError(f"--model-keys {path}: expected a JSON list of strings")
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise SourceOptionError(f"--model-keys {path}: lists no name; expected the names of model.named_parameters(), "
                                "one per line")
    return names


@dataclass
class ConvertPlan:
    """What a conversion writes. Pure data; ``to_json()`` for ``--json`` and ``--dry-run``."""

    src: str
    src_format: str
    dst: str
    dst_format: str
    dtype: str | None
    tensors: int
    values: int
    bytes_in: int
    bytes_out: int
    #: Files the conversion writes (shards, the torch file) or a description of them (DCP, universal).
    outputs: list[str] = field(default_factory=list)
    #: Keys the target format cannot hold (non-model keys for safetensors); they are not written.
    skipped: list[str] = field(default_factory=list)
    #: Tensors cast by ``dtype``.
    cast: int = 0
    dst_exists: bool = False
    #: Largest safetensors shard (bytes); None for other targets.
    max_shard_bytes: int | None = None
    #: What the user must know about keys written (the source's ``key_notes``: optimizer state that cannot resume
    #: an optimizer, values stored differently).
    notes: list[str] = field(default_factory=list)
    #: Safetensors: the model config files written (``config.json``, ``generation_config.json``).
    configs: list[str] = field(default_factory=list)
    #: Safetensors: no ``config.json`` is known (none recorded, none at the destination), so ``from_pretrained``
    #: cannot open the export as it is.
    missing_config: bool = False
    #: Per written tensor: its stored dtype.
    dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dtypes"}


@dataclass(frozen=True)
class ConvertResult:
    """What ``run_conversion`` wrote: the plan, the files written and the time it took (``--json`` output)."""

    plan: ConvertPlan
    written: list[str]
    elapsed_secs: float

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "written": self.written, "seconds": round(self.elapsed_secs, 3)}


def cast_keys(source: Source, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The stored dtype of every tensor under a ``dtype`` cast: model weights (keys under ``model/``; every key when
    there is no ``model/``) of a standard floating dtype are cast; optimizer state, step counters, integer and fp8
    tensors keep theirs."""
    has_model = any(k.startswith(MODEL_PREFIX) for k in source.tensors)
    out = {}
    for k, info in source.tensors.items():
        target = info.dtype
        if dtype is not None and info.dtype in CASTABLE and (k.startswith(MODEL_PREFIX) or not has_model):
            target = dtype
        out[k] = target
    return out


def plan_conversion(source: Source, dst: str, dst_format: str, *, dtype: "str | torch.dtype | None" = None,
                    max_shard_bytes: int | None = None, storage_options: dict[str, Any] | None = None) -> ConvertPlan:
    """What converting ``source`` to ``dst_format`` at ``dst`` writes. Raises for targets that cannot hold it."""
    if dst_format in PLANNED_TARGETS:
        raise not_implemented(dst_format, "writing")
    if dst_format not in TARGETS:
        raise UnknownFormatError(f"unknown target format {dst_format!r}; expected one of {', '.join(TARGETS)}")
    if max_shard_bytes is not None and dst_format != "safetensors":
        raise ValueError(f"max_shard_bytes applies to safetensors targets only (the target is {dst_format})")
    dt = parse_dtype(dtype)
    dtypes = cast_keys(source, dt)
    skipped: list[str] = []
    outputs: list[str] = []
    configs: list[str] = []
    missing_config = False
    written_keys = list(source.tensors)
    bytes_out: int | None = None
    if dst_format == "safetensors":
        from formats.foreign.hf_safetensors import (CONFIG_METADATA, DEFAULT_MAX_SHARD_BYTES, INDEX_NAME,
                                                    config_files, model_names, plan_shards, shard_names)

        names = model_names(source)
        written_keys = list(names)
        skipped = sorted(k for k in [*source.tensors, *source.values] if k not in names)
        nb = {k: source.tensors[k].numel * dtypes[k].itemsize for k in names}
        max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        shards = plan_shards(names, nb, max_shard_bytes)
        files = shard_names(len(shards))
        outputs = [f"{os.path.join(dst, f)} ({sum(nb[k] for k in s)} bytes, {len(s)} tensors)"
                   for f, s in zip(files, shards)] + ([os.path.join(dst, INDEX_NAME)] if len(shards) > 1 else [])
        exists = any(os.path.exists(os.path.join(dst, f)) for f in [*files, INDEX_NAME])
        configs = [CONFIG_METADATA[n] for n in config_files(source, dst)]
        outputs += [os.path.join(dst, f) for f in configs]
        missing_config = "config.json" not in configs and not os.path.exists(os.path.join(dst, "config.json"))
    elif dst_format == "torch":
        outputs = [dst]
        exists = os.path.exists(dst)
    elif dst_format == "dcp":
        outputs = [f"{dst}/ (one .distcp file per entry, then .metadata)"]
        exists = os.path.exists(os.path.join(dst, ".metadata"))
    elif dst_format == "deepspeed-universal":
        from formats.foreign.deepspeed_universal import destination_exists, plan_deepspeed_universal

        ds_plan = plan_deepspeed_universal(source, dst)
        written_keys = ds_plan.tensor_keys(source)
        skipped = list(ds_plan.skipped)
        outputs = ds_plan.outputs()
        bytes_out = ds_plan.bytes_out(source, dtypes)
        exists = destination_exists(ds_plan.dst)
    else:
        from formats.storage import open_storage

        outputs = [f"{dst}/data/*.bin, then {dst}/manifest.json"]
        with open_storage(dst, storage_options) as st:
            exists = st.exists("manifest.json")
    dtypes = {k: dtypes[k] for k in written_keys}
    notes = key_notes(source, [*written_keys, *([] if dst_format == "safetensors" else source.values)])
    return ConvertPlan(
        src=source.path, src_format=source.format, dst=str(dst), dst_format=dst_format,
        dtype=None if dt is None else str(dt).replace("torch.", ""), tensors=len(written_keys),
        values=0 if dst_format == "safetensors" else len(source.values),
        bytes_in=sum(source.tensors[k].nbytes for k in written_keys),
        bytes_out=bytes_out if bytes_out is not None else sum(
            math.prod(source.tensors[k].shape) * dtypes[k].itemsize for k in written_keys),
        outputs=outputs, skipped=skipped, cast=sum(1 for k in written_keys if dtypes[k] != source.tensors[k].dtype),
        dst_exists=exists, max_shard_bytes=max_shard_bytes if dst_format == "safetensors" else None, notes=notes,
        configs=configs, missing_config=missing_config, dtypes=dtypes)


def key_notes(source: Source, written: list[str]) -> list[str]:
    """The source's notes (``key_notes``: key prefix -> text) about keys that are written."""
    out = []
    for prefix, text in getattr(source, "key_notes", {}).items():
        if not prefix or any(k == prefix or k.startswith(prefix + "/") for k in written):
            out.append(text)
    return out


def check_backed(source: Source) -> None:
    """Raise ``CorruptCheckpointError`` unless the data files of a universal ``source`` hold every byte its manifest
    declares (and no compressed chunk claims more than it can decode to). Called before any output is created:
    the targets preallocate what the source declares (the torch writer lays out the whole file first), so a
    manifest declaring a 2^40-byte tensor would otherwise create a 1 TiB output before the first read fails.
    Other sources check their data files against their metadata when they are opened."""
    manifest = getattr(source, "manifest", None)
    storage = getattr(source, "storage", None)
    if not isinstance(manifest, Manifest) or storage is None:
        return
    reader = ChunkReader(storage, manifest)
    for entry in manifest.tensors.values():
        reader.check_box(entry, Box.whole(tuple(entry.shape)))


def run_conversion(source: Source, plan: ConvertPlan, *, workers: int = 1, overwrite: bool = False,
                   progress: Progress | None = None,
                   storage_options: dict[str, Any] | None = None) -> ConvertResult:
    """Write what ``plan`` describes, reading ``source`` tensor by tensor. ``progress(nbytes)`` after each tensor
    (or box). Raises ``CheckpointExistsError`` if the target exists and ``overwrite`` is false."""
    t0 = time.perf_counter()
    if plan.dst_exists and not overwrite:
        raise CheckpointExistsError(f"{plan.dst}: a {plan.dst_format} checkpoint is already there; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another destination")
    check_backed(source)
    dtypes = plan.dtypes
    if plan.dst_format == "universal":
        from formats.foreign.universal import write_universal

        manifest = write_universal(source, plan.dst, dtypes=dtypes, workers=workers,
                                   overwrite=overwrite, progress=progress, storage_options=storage_options)
        written = [f"{plan.dst}/{p}" for p in sorted(manifest.files)] + [f"{plan.dst}/manifest.json"]
    elif plan.dst_format == "dcp":
        from formats.foreign.dcp import write_dcp

        written = write_dcp(source, plan.dst, dtypes=dtypes, workers=workers,
                            overwrite=overwrite, progress=progress)
    elif plan.dst_format == "torch":
        from formats.foreign.torch_file import write_torch

        written = write_torch(source, plan.dst, dtypes=dtypes, overwrite=overwrite,
                              progress=progress)
    elif plan.dst_format == "deepspeed-universal":
        from formats.foreign.deepspeed_universal import write_deepspeed_universal

        written = write_deepspeed_universal(source, plan.dst, dtypes=dtypes, overwrite=overwrite, progress=progress)
    else:
        from formats.foreign.hf_safetensors import DEFAULT_MAX_SHARD_BYTES, write_safetensors

        written = write_safetensors(source, plan.dst, dtypes=dtypes,
                                    max_shard_bytes=plan.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                                    overwrite=overwrite, workers=workers, progress=progress)
    return ConvertResult(plan, written, time.perf_counter() - t0)


def convert(src: str, dst: str, *, src_format: str = "auto", dst_format: str = "universal",
            dtype: "str | torch.dtype | None" = None, workers: int = 1, max_shard_bytes: int | None = None,
            allow_pickle: bool = False, overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, storage_options: dict[str, Any] | None = None,
            model_keys: "list[str] | None" = None, **options: Any) -> ConvertResult:
    """Convert the checkpoint at ``src`` into ``dst_format`` at ``dst``; with ``dry_run`` only plan it. ``options``
    are the source format's own, and ``model_keys`` as for ``open_source``."""
    if dst_format in PLANNED_TARGETS:
        raise not_implemented(dst_format, "writing")
    if src_format == "auto":
        src_format = detect_format(src, storage_options)
    entry = find_source(src_format)
    if entry is not None:  # before anything is read (open_source raises for an unregistered format)
        entry.check_options(options)
        entry.check_target(options, dst_format)
    with open_source(src, src_format, allow_pickle=allow_pickle, storage_options=storage_options,
                     model_keys=model_keys, **options) as source:
        plan = plan_conversion(source, dst, dst_format, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               storage_options=storage_options)
        if dry_run:
            return ConvertResult(plan, [], 0.0)
        return run_conversion(source, plan, workers=workers, overwrite=overwrite, progress=progress,
                              storage_options=storage_options)
