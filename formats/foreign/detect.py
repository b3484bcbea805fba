"""Which format a path holds: ``detect_format`` (used by ``ckpt convert`` / ``ckpt diff`` with ``--from auto``).

Rules, checked on the path itself (nothing is unpickled or read beyond a file's first bytes):

* ``universal``: ``manifest.json`` in the directory (or object-store prefix; the only format read from URLs).
* ``dcp``: ``.metadata`` in the directory (PyTorch Distributed Checkpoint).
* ``safetensors``: a ``*.safetensors`` file, a ``model.safetensors.index.json`` file, or a directory holding either.
  A Hugging Face directory holding both safetensors and ``pytorch_model.bin`` is read as safetensors, as
  ``transformers`` does.
* ``torch``: a single ``.pt`` / ``.pth`` / ``.bin`` file (or a file starting with a zip or pickle header), or a
  directory holding exactly one such file.

* ``deepspeed``: a DeepSpeed ``save_checkpoint`` directory: the root (``latest`` and ``global_step*/``) or one tag
  directory (``*_model_states.pt`` / ``*_optim_states.pt``).
* ``megatron``: Megatron-LM rank directories: ``mp_rank_*/`` (or a root with ``iter_*/`` and
  ``latest_checkpointed_iteration.txt``). Reading them needs a spec (``ckpt convert --from megatron --spec``); the
  reader registers itself from ``resharding.megatron_dirs`` (``formats`` only recognises the directories).
* a format registered with a ``detect`` hook (``formats.foreign.registry.register_source``): a path none of the
  rules above recognises and its hook claims.

Anything else raises ``UnknownFormatError`` listing what was found.
"""

from __future__ import annotations

import os
from typing import Any

from ckpt.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, FormatNotImplementedError,  # noqa: F401 - re-exported
                         IncompleteCheckpointError, UnknownFormatError)
from formats.foreign.files import kind_of
from formats.foreign.registry import detected_sources
from formats.storage import open_storage, split_scheme

#: Formats read and written by ``formats.foreign`` alone.
FORMATS = ("universal", "dcp", "torch", "safetensors")
#: Every format the built-in rules of ``detect_format`` can return (``megatron`` is read by
#: ``resharding.megatron_dirs``, with a spec, once that module has registered it); registered formats with a
#: ``detect`` hook come on top (``formats.foreign.registry.source_names``).
SOURCE_FORMATS = (*FORMATS, "deepspeed", "megatron")
#: What to do when a recognised format's reader is not registered (it lives a layer above ``formats``).
UNREGISTERED = {
    "megatron": "Megatron rank directories are read together with a spec that says how the ranks cut each tensor: "
                "ckpt convert SRC DST --from megatron --spec SPEC (Python: import resharding.megatron_dirs, which "
                "registers the format, then open_source(path, 'megatron', spec=SPEC))",
}
#: Recognised names whose converters do not exist yet (``ckpt convert`` exits 2 with "not implemented yet").
PLANNED_SOURCES: tuple[str, ...] = ()
PLANNED_TARGETS: tuple[str, ...] = ()
#: Formats ``ckpt convert --to`` writes (``deepspeed-universal``: ``formats.foreign.deepspeed_universal``).
TARGETS = (*FORMATS, "deepspeed-universal")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
DCP_METADATA = ".metadata"
MANIFEST = "manifest.json"

_NEEDS = ("manifest.json (universal), .metadata (dcp), *.safetensors or model.safetensors.index.json "
          "(safetensors), one .pt/.pth/.bin file (torch), latest + global_step*/ or *_model_states.pt (deepspeed), "
          "mp_rank_*/ or iter_*/ (megatron)")


def not_implemented(name: str, direction: str) -> FormatNotImplementedError:
    return FormatNotImplementedError(
        f"{direction} {name!r} is not implemented yet (it is planned); supported formats are {', '.join(FORMATS)}")


def unregistered(path: str, fmt: str, known: tuple[str, ...]) -> UnknownFormatError:
    """The error for a format no reader is registered for: what to do, for a format the rules recognise."""
    if fmt in UNREGISTERED:
        return UnknownFormatError(f"{path}: {UNREGISTERED[fmt]}")
    return UnknownFormatError(f"unknown format {fmt!r}; expected auto or one of {', '.join(known)}")


def _is_local(path: str) -> bool:
    return split_scheme(path)[0] == "file"


def _local(path: str) -> str:
    return split_scheme(path)[1] if path.startswith("file://") else path


def _sniff_torch(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch's zip format, or a legacy pickle


def torch_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory)
                  if n.endswith(TORCH_SUFFIXES) and os.path.isfile(os.path.join(directory, n)))


def detect_format(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The format of ``path``: one of ``SOURCE_FORMATS``, or a registered format whose ``detect`` hook claims it
    (asked only where the built-in rules recognise nothing). Raises ``UnknownFormatError`` listing what was found,
    ``CheckpointNotFoundError`` if nothing exists there, and ``IncompleteCheckpointError`` for a universal
    checkpoint that never committed."""
    path = str(path)
    if not _is_local(path):
        storage = open_storage(path, storage_options)
        try:
            if storage.exists(MANIFEST):
                return "universal"
            found = storage.list("")[:10]
        finally:
            storage.close()
        if not found:
            raise CheckpointNotFoundError(f"{path}: nothing is stored there")
        raise UnknownFormatError(f"{path}: found {found} but no {MANIFEST}; only universal checkpoints are read from "
                                 "URLs (copy other formats to a local directory first)")
    local = _local(path)
    if not os.path.exists(local):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if not os.path.isfile(local) and not os.path.isdir(local):  # a FIFO, device or socket: never open it
        raise CorruptCheckpointError(f"{path}: is {kind_of(os.stat(local).st_mode)}, neither a checkpoint file nor a "
                                     "directory; refusing to open it")
    if os.path.isfile(local):
        name = os.path.basename(local)
        if name.endswith(".safetensors") or name == SAFETENSORS_INDEX:
            return "safetensors"
        if name.endswith(TORCH_SUFFIXES) or _sniff_torch(local):
            return "torch"
        claimed = _claimed(path, local)
        if claimed is not None:
            return claimed
        size = os.path.getsize(local)
        raise UnknownFormatError(f"{path}: cannot tell the format of this file ({size} bytes, name {name!r}); "
                                 f"recognised: {_NEEDS}. Pass --from to say which it is.")
    names = sorted(os.listdir(local))
    found: list[str] = []
    if MANIFEST in names:
        found.append("universal")
    if DCP_METADATA in names:
        found.append("dcp")
    if SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names):
        found.append("safetensors")
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UnknownFormatError(f"{path}: ambiguous, it holds files of several formats ({', '.join(found)}); "
                                 "pass --from to say which to read")
    tfiles = torch_files(local)
    framework = _framework(names)
    if framework is not None:
        return framework
    claimed = _claimed(path, local)
    if claimed is not None:
        return claimed
    if "data" in names and os.path.isdir(os.path.join(local, "data")) and not tfiles:
        raise IncompleteCheckpointError(f"{path}: data/ exists but {MANIFEST} does not: a universal checkpoint whose "
                                        "save never committed. Use an earlier checkpoint.")
    if len(tfiles) == 1:
        return "torch"
    if len(tfiles) > 1:
        raise UnknownFormatError(f"{path}: holds several torch files {tfiles[:10]}; pass the file to convert")
    listing = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    raise UnknownFormatError(f"{path}: no checkpoint format recognised; found [{listing or 'an empty directory'}], "
                             f"expected one of: {_NEEDS}. Pass --from to say which it is.")


def _claimed(path: str, local: str) -> str | None:
    """The registered format whose ``detect`` hook claims ``local`` (None if none does)."""
    claimed = detected_sources(local)
    if len(claimed) > 1:
        raise UnknownFormatError(f"{path}: ambiguous, several registered formats claim it ({', '.join(claimed)}); "
                                 "pass --from to say which to read")
    return claimed[0] if claimed else None


def _framework(names: list[str]) -> str | None:
    """``deepspeed`` or ``megatron`` for directories laid out by those frameworks (by names only)."""
    if any(n.endswith("_model_states.pt") or n.endswith("_optim_states.pt") for n in names) or (
            ("latest" in names or "latest_universal" in names) and any(n.startswith("global_step") for n in names)):
        return "deepspeed"
    if "latest_checkpointed_iteration.txt" in names or any(n.startswith("iter_") for n in names) or any(
            n.startswith("mp_rank_") for n in names):
        return "megatron"
    return None
