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

import argparse
import mmap
import os
import pickle
import re
import uuid
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from ckpt.errors import CheckpointExistsError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from formats.foreign.files import regular_size
from formats.foreign.pickle_guard import refused_import
from formats import keys as K
from formats.foreign.source import MODEL_PREFIX, Source, flatten_into, is_bare_model, leaf_path, read_as
from formats.manifest import ContainerEntry
from formats.nesting import nest

Progress = Callable[[int], None]


def _is_bare_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


class TorchSource(Source):
    """A ``torch.save`` file. A bare ``{name: tensor}`` state dict is keyed ``model/<name>``; any other object
    keeps its nesting (``{"model": ..., "optim": ..., "step": 3}`` gives the keys ``ckpt.save`` would).

    Optimizer state saved as ``optim.state_dict()`` is keyed by parameter index; it is re-keyed by parameter name
    (the FQN-keyed form ``ckpt.load`` restores an optimizer from) from the model state dict in the same file, or
    from ``model_keys`` (``rekey_optimizers``); where neither can say which index is which parameter,
    ``key_notes`` says so. An ``argparse.Namespace`` (loaded with ``allow_pickle``) is stored as its ``vars()``."""

    def __init__(self, path: str, allow_pickle: bool = False, model_keys: "list[str] | None" = None) -> None:
        super().__init__(path=str(path), format="torch")
        obj = self._load(self.path, allow_pickle)
        self._tensors: dict[str, torch.Tensor] = {}
        #: Key prefix -> what a user must know about the keys under it (printed by ``ckpt convert``).
        self.key_notes: dict[str, str] = {}
        if _is_bare_state_dict(obj):
            obj = {"model": obj}
            self.metadata["torch_bare_state_dict"] = True
        namespaces: list[str] = []
        obj = _namespaces_as_dicts(obj, "", namespaces)
        if namespaces:
            self.key_notes[namespaces[0]] = (
                f"{len(namespaces)} argparse.Namespace value(s) ({', '.join(repr(k) for k in namespaces[:3])}"
                f"{', ...' if len(namespaces) > 3 else ''}) stored as dicts of their attributes (vars()); "
                "rebuild one with argparse.Namespace(**d)")
        flatten_into(obj, "", self, self.path, self._tensors)
        self._raw = (dict(self.tensors), dict(self.values), dict(self.containers), dict(self._tensors),
                     dict(self.key_notes), dict(self.metadata))
        self.use_model_keys(model_keys)

    def use_model_keys(self, model_keys: "list[str] | None") -> None:
        """Re-key index-keyed optimizer state by ``model_keys`` (the names of ``model.named_parameters()``, in
        order), or, when None, by the model state dict in the file where that is unambiguous (otherwise a note in
        ``key_notes``). Called by the constructor and by ``open_source(model_keys=...)``; explicit names that do not
        fit raise ``SourceOptionError``."""
        (self.tensors, self.values, self.containers, self._tensors, self.key_notes,
         self.metadata) = (dict(t) for t in self._raw)
        rekey_optimizers(self, self._tensors, model_keys)

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


def _namespaces_as_dicts(obj: Any, key: str, found: list[str], depth: int = 0) -> Any:
    """``obj`` with every ``argparse.Namespace`` replaced by ``vars()`` of it (``found`` gets their keys): the
    format stores plain containers, and a training script's ``args`` is the one class a trusted file commonly
    holds (only reachable with ``allow_pickle``: the weights_only loader refuses it)."""
    if depth > 64:
        return obj  # the flattening that follows names the key
    if isinstance(obj, argparse.Namespace):
        found.append(key)
        obj = dict(vars(obj))
    if isinstance(obj, dict):
        return {k: _namespaces_as_dicts(v, f"{key}/{k}" if key else str(k), found, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [_namespaces_as_dicts(v, f"{key}/{i}" if key else str(i), found, depth + 1) for i, v in enumerate(obj)]
        return type(obj)(items)
    return obj


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
        needs = refused_import(e)
        after = (" (an argparse.Namespace is then stored as the dict of its attributes)"
                 if needs == "argparse.Namespace" else "")
        raise UnsafeCheckpointError(
            f"{path}: refusing to load this {what}: it needs {needs}, beyond tensors and plain containers{holds}. "
            "Loading it could run code stored in the file. If you trust its origin, pass --allow-pickle "
            f"(allow_pickle=True){after}.") from None
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



# ---------------------------------------------------------------------------------------------------------------
# Optimizer state keyed by parameter index -> keyed by parameter name.
#
# ``optim.state_dict()`` numbers the parameters 0..N-1 in the order of its param_groups' ``params`` (for an
# optimizer built as ``AdamW(model.parameters())``: the order of ``model.parameters()``). ``ckpt.load`` restores an
# optimizer from PyTorch's canonical FQN-keyed form (``get_optimizer_state_dict``): ``state/<fqn>/exp_avg`` and
# ``param_groups/<g>/params/<j> = "<fqn>"``. The names come from ``model_keys`` or from the model state dict of the
# same file: its tensors in order, tied copies (one storage under two names, as ``parameters()`` dedups them) left
# out, and integer buffers left out when the count is still above N. That is right when the state dict holds the
# optimizer's parameters and no floating buffers (HF transformers models; a BatchNorm's running stats would not
# be); so the mapping is used only when the counts match and every state tensor has its parameter's shape.

_GROUP_PARAM = re.compile(r"(?:(.*)/)?param_groups/([0-9]+)/params/([0-9]+)")
_HOW = ("pass --model-keys FILE (model_keys=[...] in Python): the names of model.named_parameters(), in order, one "
        "per line")


def index_keyed_optimizers(values: dict[str, Any], containers: dict[str, ContainerEntry]) -> dict[str, list[str]]:
    """Optimizer state dicts keyed by index: {prefix: the value keys of their params, in param_groups order}."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    for key, v in values.items():
        m = _GROUP_PARAM.fullmatch(key)
        if m is None or type(v) is not int:
            continue
        prefix = m.group(1) or ""
        state = containers.get(K.join(prefix, "state"))
        if state is None or state.type != "dict" or containers.get(K.join(prefix, "param_groups")) is None:
            continue
        found.setdefault(prefix, []).append((int(m.group(2)), int(m.group(3)), key))
    return {p: [k for _, _, k in sorted(items)] for p, items in found.items()}


def _model_names(source: Source, tensors: dict[str, torch.Tensor], n: int) -> tuple[list[str] | None, str]:
    """The optimizer's parameter names read off the file's ``model/`` state dict, or None and why not."""
    keys = [k for k in source.tensors if k.startswith(MODEL_PREFIX) and "/" not in k[len(MODEL_PREFIX):]]
    if not keys:
        return None, "the file holds no model state dict (no model/ key) to name the parameters"
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for k in keys:
        t = tensors[k]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            continue  # a tied copy: parameters() yields the tensor once, under its first name
        if ident is not None:
            seen.add(ident)
        unique.append(k)
    tied = len(keys) - len(unique)
    floating = [k for k in unique if tensors[k].is_floating_point() or tensors[k].is_complex()]
    if len(unique) > n and len(floating) == n:
        unique = floating  # the others are integer buffers (step counters, position ids)
    if len(unique) != n:
        return None, (f"model/ holds {len(unique)} tensors ({len(floating)} floating, {tied} tied copies left out) "
                      f"but the optimizer has {n} parameters, so which tensor each index means is ambiguous "
                      "(floating buffers, or parameters the optimizer does not train)")
    return [K.unescape(k[len(MODEL_PREFIX):]) for k in unique], ""


def _shape_fault(source: Source, prefix: str, names: list[str], int_keys: tuple[str, ...]) -> str:
    """Why ``names`` cannot be the optimizer's parameters: a state tensor whose shape is not its parameter's."""
    state = K.join(prefix, "state") + "/"
    for key, info in source.tensors.items():
        if not key.startswith(state) or not info.shape:
            continue
        comp, _, leaf = key[len(state):].partition("/")
        if comp not in int_keys or int(comp) >= len(names):
            continue
        param = source.tensors.get(MODEL_PREFIX + K.escape(names[int(comp)]))
        if param is not None and tuple(param.shape) != tuple(info.shape):
            return (f"key {key!r} has shape {list(info.shape)}, but parameter {int(comp)} would be "
                    f"{names[int(comp)]!r} of shape {list(param.shape)}")
    return ""


def rekey_optimizers(source: Source, tensors: dict[str, torch.Tensor], model_keys: "list[str] | None") -> None:
    """Re-key every index-keyed optimizer state dict of ``source`` (tables and ``tensors`` renamed in place) by
    parameter name: ``model_keys`` or the file's model state dict. Without names, or when they do not fit, the
    state keeps its index keys and ``source.key_notes`` says why it will not resume an optimizer; explicit
    ``model_keys`` that do not fit raise ``SourceOptionError`` (expected and found)."""
    from formats.foreign.registry import SourceOptionError

    optims = index_keyed_optimizers(source.values, source.containers)
    notes: dict[str, str] = getattr(source, "key_notes", {})
    if model_keys is not None and not optims:
        raise SourceOptionError(f"{source.path}: --model-keys (model_keys) given, but the file holds no optimizer "
                                "state keyed by parameter index (optim.state_dict()); leave the option out")
    for prefix, param_keys in optims.items():
        n = len(param_keys)
        indices = [source.values[k] for k in param_keys]
        where = f"{source.path}: optimizer state {prefix or '(top level)'!r}"
        state = source.containers[K.join(prefix, "state")]
        stray = [k for k in state.int_keys if not (k.isdigit() and int(k) < n)]
        if sorted(indices) != list(range(n)):
            why, names = f"its param_groups list the indices {indices[:10]}, not 0..{n - 1} once each", None
        elif stray:
            why, names = f"its state holds index {stray[0]}, which no param_group lists (0..{n - 1})", None
        elif model_keys is not None:
            names, why = list(model_keys), ""
            if len(names) != n or len(set(names)) != n:
                raise SourceOptionError(f"{where}: --model-keys lists {len(names)} names ({len(set(names))} distinct); "
                                        f"the optimizer has {n} parameters: expected {n} distinct names, in "
                                        "model.parameters() order")
            fault = _shape_fault(source, prefix, names, state.int_keys)
            if fault:
                raise SourceOptionError(f"{where}: --model-keys does not fit: {fault}; list the names in the order "
                                        "of model.parameters()")
        else:
            names, why = _model_names(source, tensors, n)
            if names is not None:
                why = _shape_fault(source, prefix, names, state.int_keys)
                names = None if why else names
        if names is None and model_keys is not None:
            raise SourceOptionError(f"{where}: --model-keys cannot re-key it: {why}")
        if names is None:
            notes[prefix] = (f"optimizer state {f'under {prefix!r}' if prefix else 'at the top level'} stays keyed "
                             "by parameter index "
                             f"0..{n - 1}: {why}. ckpt.load cannot restore an optimizer from it (it expects state "
                             f"keyed by parameter name); to fix it, {_HOW}")
            continue
        _rename(source, tensors, prefix, param_keys, names)
        source.metadata.setdefault("optimizer_keys_from_index", {})[prefix or "/"] = (
            "--model-keys" if model_keys is not None else "model/ state dict order")


def _rename(source: Source, tensors: dict[str, torch.Tensor], prefix: str, param_keys: list[str],
            names: list[str]) -> None:
    state = K.join(prefix, "state")
    head = state + "/"
    ints = set(source.containers[state].int_keys)

    def new(key: str) -> str:
        if not key.startswith(head):
            return key
        comp, sep, rest = key[len(head):].partition("/")
        if comp not in ints:
            return key
        return head + K.escape(names[int(comp)]) + sep + rest

    source.tensors = {new(k): replace(v, key=new(k)) for k, v in source.tensors.items()}
    tensors_new = {new(k): t for k, t in tensors.items()}
    tensors.clear()
    tensors.update(tensors_new)
    values = {new(k): v for k, v in source.values.items()}
    for i, k in enumerate(param_keys):
        values[k] = names[source.values[k]]
    source.values = values
    source.containers = {new(k): replace(c, key=new(k)) for k, c in source.containers.items()}
    source.containers[state] = replace(source.containers[state], int_keys=())
