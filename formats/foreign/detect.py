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

Anything else raises ``UnknownFormatError`` listing what was found (a ``ckpt.Checkpointer`` root or a folder of
checkpoints: which folders to pass).

``no_manifest_error`` is the other question, asked where a ckpt checkpoint was expected and ``manifest.json`` is
missing (``formats.reader.read_manifest``): what the path is instead (a save that never committed, a Checkpointer root,
a folder of checkpoints, a foreign format, a single file) and what to pass; it uses the rules above.
"""

from __future__ import annotations

import os
import re
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
    found = _marked_formats(names)
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
    below = _checkpoints_below(path)
    if below is not None:  # a Checkpointer root or a folder of checkpoints: say which ones to pass
        raise UnknownFormatError(below)
    listing = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    raise UnknownFormatError(f"{path}: no checkpoint format recognised; found [{listing or 'an empty directory'}], "
                             f"expected one of: {_NEEDS}. Pass --from to say which it is.")


def _marked_formats(names: list[str]) -> list[str]:
    """The formats whose marker file is among a directory's entry ``names``: universal, dcp, safetensors."""
    found: list[str] = []
    if MANIFEST in names:
        found.append("universal")
    if DCP_METADATA in names:
        found.append("dcp")
    if SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names):
        found.append("safetensors")
    return found


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


# -- what a path without a manifest is (``formats.reader.read_manifest``'s error) ------------------------------------
#: How a recognised foreign format is named to a user who passed it where a ckpt checkpoint was expected.
_WHAT = {
    "dcp": "a PyTorch Distributed Checkpoint (DCP) directory",
    "safetensors": "a safetensors checkpoint",
    "torch": "a torch.save file",
    "deepspeed": "a DeepSpeed checkpoint directory",
    "megatron": "a Megatron-LM checkpoint (rank directories)",
}
#: ``latest``: the pointer a ``ckpt.Checkpointer`` root holds next to its step folders (``ckpt.tiers.LATEST``).
LATEST = "latest"
_SHOW = 5  # entries named in a message before "... (N in all)"


def no_manifest_error(storage: Storage) -> CheckpointError:
    """The error for a path where ``manifest.json`` is missing (``read_manifest``, hence ``ckpt.load``,
    ``ckpt.open``, ``ckpt inspect`` / ``verify`` / ``reshard``): what the path is and what to pass instead.

    * nothing stored there: ``CheckpointNotFoundError``;
    * only files in ``data/``: a save that never committed, ``IncompleteCheckpointError``; deleting the directory is
      advised only here, and only when each file is named as this format's writers name data files
      (``_data_file_test``);
    * data files next to other files, or step folders that hold only data files: ``IncompleteCheckpointError``, with
      no advice to delete what is not a data file;
    * a ``ckpt.Checkpointer`` root (``latest`` and committed step folders), a directory holding checkpoints in
      subdirectories, a foreign format (``detect_format``: DCP, safetensors / Hugging Face, torch.save, DeepSpeed,
      Megatron, a registered format), or anything else: ``UnknownFormatError`` saying which, and what to pass.

    Lists the storage once; reads at most the ``latest`` pointer and the first bytes of a single file."""
    from formats.manifest import DATA_DIR  # noqa: PLC0415 - imports torch; only this error path needs it

    is_data_file_name = _data_file_test()

    url = storage.url.rstrip("/") or storage.url
    local = _local(url) if _is_local(url) else None
    if local is not None and os.path.isfile(local):
        return _file_error(url, local)
    files = storage.list("")
    if not files:
        return CheckpointNotFoundError(f"{url}: no checkpoint here (no {MANIFEST}); nothing is stored there. "
                                       "Check the path.")
    if all(p.startswith(DATA_DIR + "/") for p in files):  # a save that never committed (as detect_format says)
        strangers = [p for p in files if not is_data_file_name(p)]
        advice = (f"this directory holds only that save's {len(files)} data file(s) and can be deleted" if not strangers
                  else f"{len(strangers)} of the {len(files)} files in {DATA_DIR}/ are not named as ckpt names its "
                       f"data files ({', '.join(strangers[:_SHOW])}): look at those before deleting anything")
        return IncompleteCheckpointError(
            f"{url}: data files exist but {MANIFEST} does not: this save never committed (it crashed or is still "
            f"running). Load an earlier checkpoint; {advice}.")
    names = sorted({p.split("/", 1)[0] for p in files})
    fmt = _foreign_format(url, local, names)
    committed = sorted(p[: -len(MANIFEST) - 1] for p in files if p.endswith("/" + MANIFEST))
    if committed:  # checkpoints below come first: a run folder may also hold, say, one exported .pt file
        text = _holds_checkpoints_text(storage, url, files, committed)
        if fmt is not None:
            text += f". It also holds {_foreign_text(url, fmt, names)}"
        return UnknownFormatError(text)
    if fmt is not None:
        return UnknownFormatError(f"{url}: is {_foreign_text(url, fmt, names)}")
    data = [p for p in files if is_data_file_name(p)]
    found = _listing(names)
    failed = _uncommitted_folders(files, is_data_file_name)
    if failed and not data:
        shown = ", ".join(f"{url}/{d}" for d in failed[:_SHOW]) + (f", ... ({len(failed)} in all)"
                                                                  if len(failed) > _SHOW else "")
        return IncompleteCheckpointError(
            f"{url}: no committed checkpoint here (no {MANIFEST}, here or below): found [{found}], where {shown} "
            f"hold{'s' if len(failed) == 1 else ''} only data files of saves that never committed (they crashed or "
            "are still running). Load a checkpoint from elsewhere; only those folders may be deleted.")
    if data:
        return IncompleteCheckpointError(
            f"{url}: {len(data)} data file(s) of a save that never committed ({data[0]}, ...) lie next to other "
            f"files ({found}) and {MANIFEST} does not exist. Load an earlier checkpoint. Do not delete the "
            f"directory: only the files in {DATA_DIR}/ named like {data[0]} belong to the failed save.")
    return UnknownFormatError(f"{url}: not a ckpt checkpoint: expected {MANIFEST} (what ckpt.save and the "
                              f"Checkpointer commit), found [{found}] and no format ckpt convert reads ({_NEEDS}). "
                              "Pass a checkpoint directory, or ckpt convert --from FORMAT to read another format.")


def _data_file_test() -> Any:
    """Whether a path is named as this format's writers name data files: ``formats.commit.is_data_file_name``
    (``ckpt.save``, convert, reshard: ``data/<save_id>-r<rank>-<i>.bin``), or a ``ckpt.Checkpointer`` step's
    ``data/<save_id>-s<step>-r<rank>-<i>.bin`` (``ckpt.stager``), which ``formats.commit.DATA_FILE_RE`` misses, or a
    daemon segment ``data/seg-<hex>`` that a copy from the daemon's tier left."""
    from formats.commit import is_data_file_name  # noqa: PLC0415
    from formats.manifest import DATA_DIR  # noqa: PLC0415

    step_file = re.compile(rf"{DATA_DIR}/[0-9]+-[0-9a-f]+-s[0-9]+-r[0-9]+-[0-9]+[.]bin")
    segment = re.compile(rf"{DATA_DIR}/seg-[0-9a-f]+")  # a daemon segment a tier's copy was writing (snapshot_daemon)
    return lambda p: is_data_file_name(p) or step_file.fullmatch(p) is not None or segment.fullmatch(p) is not None


def _uncommitted_folders(files: list[str], is_data_file: Any) -> list[str]:
    """Folders below the root (``step_000000010``) whose files are all data files of this format: saves that never
    committed."""
    by_dir: dict[str, list[str]] = {}
    for p in files:
        head, sep, tail = p.rpartition("/data/")
        if sep:
            by_dir.setdefault(head, []).append(f"data/{tail}")
    return sorted(d for d, fs in by_dir.items() if all(is_data_file(f) for f in fs)
                  and not any(p.startswith(d + "/") and not p[len(d) + 1:].startswith("data/") for p in files))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")


def _convert_advice(url: str, fmt: str) -> str:
    spec = " --spec SPEC" if fmt == "megatron" else ""
    if not _is_local(url):  # ckpt convert reads foreign formats from local paths only
        return (f"copy it to a local directory DIR, then convert it: ckpt convert DIR OUT --from {fmt}{spec}, and "
                "pass OUT")
    return f"convert it first: ckpt convert {url} OUT --from {fmt}{spec}, then pass OUT"


def _file_error(url: str, local: str) -> CheckpointError:
    """A single file where a checkpoint directory was expected."""
    name = os.path.basename(local)
    if name == MANIFEST:
        return UnknownFormatError(f"{url}: is the manifest of a checkpoint, not the checkpoint: expected a directory, "
                                  f"found the file {MANIFEST}; pass its directory, {os.path.dirname(url) or '.'}")
    try:
        fmt = detect_format(local)
    except CheckpointError:
        fmt = None
    if fmt is None:
        return UnknownFormatError(f"{url}: is a file ({os.path.getsize(local)} bytes), not a ckpt checkpoint: expected "
                                  f"a directory holding {MANIFEST}. Pass the checkpoint's directory, or convert the "
                                  "file with ckpt convert FILE OUT --from FORMAT")
    what = _WHAT.get(fmt, f"a {fmt} checkpoint file")
    return UnknownFormatError(f"{url}: is {what}, not a ckpt checkpoint: expected a directory holding {MANIFEST}, "
                              f"found a file; {_convert_advice(url, fmt)}")


def _foreign_format(url: str, local: str | None, names: list[str]) -> str | None:
    """The foreign format ``detect_format`` finds at ``url`` (by names only for a URL), None if none."""
    if local is not None:
        try:
            fmt = detect_format(local)
        except CheckpointError:
            return None
        return None if fmt == "universal" else fmt
    marked = [f for f in _marked_formats(names) if f != "universal"]
    return marked[0] if len(marked) == 1 else _framework(names)


def _foreign_text(url: str, fmt: str, names: list[str]) -> str:
    what = _WHAT.get(fmt, f"a {fmt} checkpoint")
    if fmt == "safetensors" and "config.json" in names:
        what = "a Hugging Face safetensors directory"
    pt = [n for n in names if n.endswith(TORCH_SUFFIXES)]
    if fmt == "torch" and len(pt) == 1:  # a directory holding one torch.save file: name the file to convert
        url, names = f"{url}/{pt[0]}", pt
    return (f"{what} ({_listing(names)}), not a ckpt checkpoint: expected {MANIFEST}, which ckpt.load, ckpt inspect "
            f"and ckpt verify read. It is not a failed save; {_convert_advice(url, fmt)}")


def _checkpoints_below(path: str) -> str | None:
    """What to say of a directory that holds committed universal checkpoints in subdirectories (``detect_format``
    found no format in it), None if it holds none."""
    with open_storage(path) as storage:
        files = storage.list("")
        committed = sorted(p[: -len(MANIFEST) - 1] for p in files if p.endswith("/" + MANIFEST))
        return _holds_checkpoints_text(storage, path.rstrip("/") or path, files, committed) if committed else None


def _step_of(name: str) -> int | None:
    digits = name[len(name.rstrip("0123456789")):]
    return int(digits) if digits else None


def _holds_checkpoints_text(storage: Storage, url: str, files: list[str], committed: list[str]) -> str:
    """A ``ckpt.Checkpointer`` root, or a directory with committed checkpoints in subdirectories."""
    fileset = set(files)
    top = [d for d in committed if "/" not in d]
    if LATEST in fileset and top:
        return _checkpointer_root_text(storage, url, "", top, files)
    roots = sorted({os.path.dirname(d) for d in committed if os.path.dirname(d)
                    and f"{os.path.dirname(d)}/{LATEST}" in fileset})
    shown = ", ".join(f"{url}/{d}" for d in committed[:_SHOW])
    more = f", ... ({len(committed)} in all)" if len(committed) > _SHOW else ""
    text = (f"{url}: not a checkpoint itself (no {MANIFEST}) but a directory holding {len(committed)} committed "
            f"checkpoint(s) in subdirectories: {shown}{more}; pass one of those")
    for r in roots[:_SHOW]:
        steps = [d[len(r) + 1:] for d in committed if os.path.dirname(d) == r]
        text += f". {_checkpointer_root_text(storage, f'{url}/{r}', r + '/', steps, files)}"
    return text


def _checkpointer_root_text(storage: Storage, url: str, prefix: str, steps: list[str], files: list[str]) -> str:
    """``url`` is a Checkpointer root whose committed step folders are ``steps`` (names); ``prefix``: its path in
    ``storage``. Names the steps, the one ``latest`` points at, and what to pass."""
    steps = sorted(steps, key=lambda d: (_step_of(d) is None, _step_of(d) or 0, d))
    numbers = [_step_of(d) for d in steps]
    latest = _read_latest(storage, prefix + LATEST)
    pick = next((d for d, n in zip(steps, numbers) if latest is not None and n == latest), steps[-1])
    shown = ", ".join(str(n) if n is not None else d for n, d in zip(numbers[-_SHOW:], steps[-_SHOW:]))
    more = f" ({len(steps)} in all)" if len(steps) > _SHOW else ""
    shown = ("..., " if more else "") + shown
    committed = set(steps)
    uncommitted = sorted({p[len(prefix):].split("/", 1)[0] for p in files if p.startswith(prefix)
                          and "/" in p[len(prefix):] and p[len(prefix):].split("/", 1)[0] not in committed
                          and _step_of(p[len(prefix):].split("/", 1)[0]) is not None})
    text = (f"{url}: a ckpt.Checkpointer root, not one checkpoint (no {MANIFEST} here): it holds committed steps "
            f"{shown}{more}"
            + (f" (latest: {latest})" if latest is not None else "")
            + (f" and uncommitted step folders {', '.join(uncommitted[:_SHOW])}" if uncommitted else "")
            + f". To load or inspect one step, pass its folder, e.g. {url}/{pick}; to resume the newest, "
              f"ckpt.Checkpointer({url!r}).restore(state)")
    return text


def _read_latest(storage: Storage, path: str) -> int | None:
    """The step a ``latest`` pointer names, None if it is unreadable (it is a hint here, never trusted)."""
    try:
        if storage.size(path) > 64:
            return None
        return int(storage.read(path).decode().strip())
    except (CheckpointError, OSError, ValueError, UnicodeDecodeError):
        return None
