"""Single-file ``torch.save`` checkpoints: reading (``TorchSource``) and writing (``write_torch``).

Reading uses ``torch.load(weights_only=True, mmap=True)``: torch's restricted unpickler builds tensors and plain
containers only, and the tensors stay backed by the file's pages, so converting reads one tensor at a time. A file
that needs more than that restricted unpickler allows (pickled classes, functions) is refused with
``UnsafeCheckpointError`` naming the file and the opt-in, before any of its code runs; ``allow_pickle=True``
loads it with full pickle (only for files you trust). Files of the legacy (pre-zip) format cannot be memory-mapped
and are read whole.

Writing streams too: the nested state is first saved with placeholder tensors and no data
(``torch.serialization.skip_data``), then the file is memory-mapped shared and each tensor is copied into its place
as it is read from the source, so the file is never held in memory. The file is written under a temporary name,
fsync'd and renamed: a reader never sees a partial file.
"""

from __future__ import annotations

import mmap
import os
import pickle
import uuid
from typing import Any, Callable, Sequence

import torch

from ckpt.errors import CheckpointExistsError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from formats.foreign.files import regular_size
from formats.foreign.pickle_guard import refused_import
from formats.foreign.source import Source, flatten_into, is_bare_model, leaf_path, read_as
from formats.nesting import nest

Progress = Callable[[int], None]


def _is_bare_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


class TorchSource(Source):
    """A ``torch.save`` file. A bare ``{name: tensor}`` state dict is keyed ``model/<name>``; any other object
    keeps its nesting (``{"model": ..., "optim": ..., "step": 3}`` gives the keys ``ckpt.save`` would)."""

    def __init__(self, path: str, allow_pickle: bool = False) -> None:
        super().__init__(path=str(path), format="torch")
        obj = self._load(self.path, allow_pickle)
        self._tensors: dict[str, torch.Tensor] = {}
        if _is_bare_state_dict(obj):
            obj = {"model": obj}
            self.metadata["torch_bare_state_dict"] = True
        flatten_into(obj, "", self, self.path, self._tensors)

    @staticmethod
    def _load(path: str, allow_pickle: bool) -> Any:
        try:
            regular_size(path, "a torch.save file")  # a FIFO would block torch.load forever
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: no such file") from None
        return load_restricted(path, allow_pickle=allow_pickle, what="torch.save file")

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


def load_restricted(path: str, *, allow_pickle: bool, what: str, holds: str = "",
                    stand_ins: Sequence[Any] = ()) -> Any:
    """``torch.load`` a file someone else wrote, memory-mapped, without running code stored in it.

    torch's ``weights_only`` loader builds tensors and plain containers only; ``stand_ins`` (``(stand-in,
    "module.Name")`` pairs for ``torch.serialization.safe_globals``) let it read the few framework classes a format
    is known to hold (``holds`` names them in messages) as inert objects. Any other import stops it before anything is called:
    ``UnsafeCheckpointError`` naming the file and the import, and the opt-in. ``allow_pickle=True`` loads with full
    pickle (trusted files only). Unreadable files raise ``CorruptCheckpointError``.
    """
    try:
        if allow_pickle:
            return _torch_load(path, weights_only=False)
        with torch.serialization.safe_globals(list(stand_ins)):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise CorruptCheckpointError(f"{path}: cannot be unpickled: {e}") from e
        raise UnsafeCheckpointError(
            f"{path}: refusing to load this {what}: it needs {refused_import(e)}, beyond tensors and plain containers{holds}. "
            "Loading it could run code stored in the file. If you trust its origin, pass --allow-pickle "
            "(allow_pickle=True).") from None
    except CorruptCheckpointError:
        raise
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: nested too deeply to unpickle; not a {what} this reader takes") from None
    except Exception as e:  # noqa: BLE001 - whatever torch's loader raised on damaged bytes (zip, pickle, storage)
        raise CorruptCheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:300]})") from e


def _torch_load(path: str, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # The legacy (non-zip) format cannot be memory-mapped: read it whole.
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def write_torch(source: Source, path: str, *, dtypes: dict[str, torch.dtype], overwrite: bool = False,
                progress: Progress | None = None) -> list[str]:
    """Write ``source`` as one ``torch.save`` file at ``path``; return the written paths.

    A checkpoint holding only ``model/`` tensors is written as a bare state dict (as ``pytorch_model.bin``);
    anything else keeps its nesting. ``torch.load(path, weights_only=True)`` reads the result.
    """
    path = str(path)
    if os.path.isdir(path):
        raise CheckpointExistsError(f"{path}: is a directory; the torch target is a file path such as model.pt")
    if os.path.exists(path) and not overwrite:
        raise CheckpointExistsError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    bare = is_bare_model(source.tensors, source.values)
    paths = {k: (leaf_path(k, source.containers, source.path)[1:] if bare else leaf_path(k, source.containers, source.path))
             for k in source.tensors}
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_streaming(source, tmp, paths, dtypes, bare, progress)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return [path]


def _placeholders(source: Source, dtypes: dict[str, torch.dtype], bare: bool) -> Any:
    """The nested state with data-less tensors of the right dtype and shape (no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # what skip_data(materialize_fake_tensors) expects

    with FakeTensorMode():
        leaves: dict[str, Any] = {k: torch.empty(info.shape, dtype=dtypes[k]) for k, info in source.tensors.items()}
    leaves.update(source.values)
    obj = nest(leaves, source.containers, source.path)
    return obj["model"] if bare else obj


def _write_streaming(source: Source, tmp: str, paths: dict[str, tuple[Any, ...]], dtypes: dict[str, torch.dtype],
                     bare: bool, progress: Progress | None) -> None:
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(_placeholders(source, dtypes, bare), tmp)
    try:
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            mapped = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError) as e:  # torch reports a failed mmap (ENOMEM: address space) as RuntimeError
        raise StorageError(f"{tmp}: cannot map the {os.path.getsize(tmp)}-byte torch output to fill it in place "
                           f"({e}); raise the address-space limit (ulimit -v) or convert to safetensors or "
                           "universal, whose writers stream") from None
    for key in source.tensors:
        dest = mapped
        try:
            for comp in paths[key]:
                dest = dest[comp]
        except (KeyError, IndexError, TypeError) as e:
            raise CorruptCheckpointError(f"{source.path}: key {key!r} has no place in the nested state its containers "
                                         f"describe ({type(e).__name__}: {e}); the source's metadata is "
                                         "inconsistent") from None
        if not isinstance(dest, torch.Tensor):
            raise CorruptCheckpointError(f"{source.path}: key {key!r} lands on a {type(dest).__name__}, not a "
                                         "tensor, in the nested state; the source's metadata is inconsistent")
        src = read_as(source, key, dtypes[key])
        dest.copy_(src)
        del src, dest
        if progress is not None:
            progress(source.tensors[key].numel * dtypes[key].itemsize)
    del mapped  # unmaps; the pages are in the file (fsync'd by the caller)

