"""PyTorch Distributed Checkpoint (DCP) directories: reading (``DcpSource``) and writing (``write_dcp``).

Reading goes through torch's own code, in one process, without a process group. ``.metadata`` is read once and
unpickled by ``pickle_guard.loads_checked``, which first checks that the pickle imports nothing but DCP's metadata
classes (``FileSystemReader.read_metadata()`` with ``allow_pickle=True``). DCP's chunk metadata becomes the boxes of each logical tensor (the shards the saving ranks held,
whatever the layout: DTensor/FSDP2/TP with ``_StridedShard``, ShardedTensor). Tensor bytes are read by torch's
``_load_state_dict`` with the default planner into one plain tensor per key, so DCP itself reassembles the
shards, one tensor at a time. Every data file the metadata names is checked (present, long enough) when the source
is opened, so a missing file is reported before anything is written.

Non-tensor values (``step``, optimizer hyperparameters) are stored by DCP as ``torch.save`` blobs and loaded by
DCP with full pickle. Here they are loaded with ``torch.load(weights_only=True)`` (plain containers, numbers and
strings only, nothing runs); a blob that needs more is refused with ``UnsafeCheckpointError`` naming its key and
the opt-in ``allow_pickle=True``.

Writing uses torch's ``FileSystemWriter`` with a save planner that reads each tensor from the source only when the
writer asks for it (``resolve_data``), one file per tensor so each is released once written; the result is a plain
DCP checkpoint (one chunk per tensor) that ``torch.distributed.checkpoint.load`` reshards onto any mesh.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from formats import keys as K
from formats.foreign.pickle_guard import loads_checked, refused_import
from formats.foreign.source import Extent, Source, TensorInfo, flatten_into, is_bare_model, leaf_path, read_as
from formats.nesting import nest
from formats.manifest import ContainerEntry
from formats.storage.base import check_relpath

Progress = Callable[[int], None]
METADATA_NAME = ".metadata"


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - heavy import, only when DCP is used

    return dcp


def _tiles(boxes: list[Extent], shape: tuple[int, ...]) -> bool:
    """Whether non-empty ``boxes`` lie inside ``shape``, do not overlap, and cover it exactly."""
    import math

    total = 0
    for offs, sizes in boxes:
        if len(offs) != len(shape) or len(sizes) != len(shape):
            return False
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offs, sizes, shape)):
            return False
        total += math.prod(sizes)
    if total != math.prod(shape):
        return False
    for i, (ao, asz) in enumerate(boxes):
        for bo, bsz in boxes[i + 1:]:
            if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(ao, asz, bo, bsz)):
                return False
    return True


class DcpSource(Source):
    """A DCP checkpoint directory written by ``torch.distributed.checkpoint.save`` under any layout."""

    def __init__(self, path: str, allow_pickle: bool = False) -> None:
        super().__init__(path=str(path), format="dcp")
        self.allow_pickle = allow_pickle
        meta_path = os.path.join(self.path, METADATA_NAME)
        if not os.path.isdir(self.path):
            raise CheckpointNotFoundError(f"{self.path}: no such directory")
        if not os.path.isfile(meta_path):
            raise CorruptCheckpointError(f"{self.path}: no {METADATA_NAME}: not a DCP checkpoint, or its save never "
                                         "finished (DCP writes .metadata last)")
        if allow_pickle:
            try:
                self._md = _dcp().FileSystemReader(self.path).read_metadata()
            except Exception as e:  # noqa: BLE001 - whatever unpickling raised: the file is not usable metadata
                raise CorruptCheckpointError(
                    f"{meta_path}: cannot be read as DCP metadata ({type(e).__name__}: {e})") from e
        else:  # read once: the bytes checked are the bytes unpickled
            with open(meta_path, "rb") as f:
                self._md = loads_checked(f.read(), meta_path)
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

        if not isinstance(self._md, Metadata) or not isinstance(self._md.state_dict_metadata, dict):
            raise CorruptCheckpointError(f"{meta_path}: holds a {type(self._md).__name__}, not DCP metadata")
        self._fqn: dict[str, str] = {}
        self._inline: dict[str, torch.Tensor] = {}
        mappings = self._md.planner_data if isinstance(self._md.planner_data, dict) else {}
        entries = self._md.state_dict_metadata
        paths = {fqn: tuple(mappings.get(fqn, (fqn,))) for fqn in entries}
        bare = bool(entries) and all(len(p) == 1 for p in paths.values()) and all(
            isinstance(md, TensorStorageMetadata) for md in entries.values())
        if bare:  # a bare model state dict: weights are keyed model/<name>
            paths = {fqn: ("model", *p) for fqn, p in paths.items()}
            self.metadata["dcp_bare_state_dict"] = True
        keys = {fqn: self._key_of(p) for fqn, p in paths.items()}
        self._record_containers(paths)
        self._check_files(meta_path, keys)
        byte_keys: list[str] = []
        for fqn, md in entries.items():
            key = keys[fqn]
            self._fqn[key] = fqn
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = self._tensor_info(key, md)
            elif isinstance(md, BytesStorageMetadata):
                byte_keys.append(fqn)
            else:
                raise CorruptCheckpointError(f"{meta_path}, key {fqn!r}: unknown entry {type(md).__name__}")
        self._load_values(byte_keys, keys)

    @staticmethod
    def _key_of(path: tuple[Any, ...]) -> str:
        return "/".join(K.escape(str(c)) if isinstance(c, str) else str(c) for c in path)

    def _record_containers(self, paths: dict[str, tuple[Any, ...]]) -> None:
        lengths: dict[str, int] = {}
        kinds: dict[str, str] = {}
        for p in paths.values():
            for i in range(len(p)):
                parent = self._key_of(p[:i])
                if isinstance(p[i], int):
                    kinds.setdefault(parent, "list")
                    lengths[parent] = max(lengths.get(parent, 0), p[i] + 1)
                else:
                    kinds.setdefault(parent, "dict")
        kinds.setdefault("", "dict")
        for k, t in kinds.items():
            self.containers[k] = ContainerEntry(k, t, lengths.get(k, 0))

    def _tensor_info(self, key: str, md: Any) -> TensorInfo:
        shape = tuple(int(s) for s in md.size)
        dtype = md.properties.dtype
        boxes = [(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in md.chunks]
        boxes = [b for b in boxes if all(s > 0 for s in b[1]) or not b[1]]
        if not shape:
            boxes = boxes[:1] if boxes else [((), ())]
        if _tiles(boxes, shape):
            return TensorInfo(key, dtype, shape, tuple(sorted(boxes)))
        # Replicated shards saved more than once (DCP deduplicates, but other writers may not): store it whole.
        return TensorInfo.whole(key, dtype, shape)

    def _check_files(self, meta_path: str, keys: dict[str, str]) -> None:
        """Every data file the metadata names exists, stays inside the directory and holds its byte ranges."""
        storage = self._md.storage_data
        if not isinstance(storage, dict):
            raise CorruptCheckpointError(f"{meta_path}: storage_data is {type(storage).__name__}, expected a dict")
        needed: dict[str, tuple[int, str]] = {}
        for index, info in storage.items():
            rel = getattr(info, "relative_path", None)
            try:
                check_relpath(rel)
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(f"{meta_path}: data file {e}") from e
            end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
            fqn = getattr(index, "fqn", "?")
            if end > needed.get(rel, (-1, ""))[0]:
                needed[rel] = (end, keys.get(fqn, fqn))
        for rel, (end, key) in sorted(needed.items()):
            full = os.path.join(self.path, rel)
            if not os.path.isfile(full):
                raise CorruptCheckpointError(f"{full}: DCP data file is missing (key {key!r} is stored there); the "
                                             "checkpoint is incomplete")
            size = os.path.getsize(full)
            if size < end:
                raise CorruptCheckpointError(f"{full}: DCP data file is truncated: {size} bytes, the metadata needs "
                                             f"{end} (key {key!r}); the checkpoint is damaged")

    def _load_values(self, fqns: list[str], keys: dict[str, str]) -> None:
        if not fqns:
            return
        planner = _BytesPlanner(weights_only=not self.allow_pickle)
        try:
            self._load({fqn: None for fqn in fqns}, planner)
        except Exception as e:  # noqa: BLE001 - torch's reader failing on a damaged blob
            raise CorruptCheckpointError(f"{self.path}: cannot read the non-tensor values ({_root(e)})") from e
        if planner.refused:
            fqn, reason = planner.refused[0]
            others = [keys.get(f, f) for f, _ in planner.refused[1:]]
            raise UnsafeCheckpointError(
                f"{self.path}: key {keys.get(fqn, fqn)!r} (DCP entry {fqn!r}) is a pickled object that torch's "
                f"weights_only loader refuses ({reason[:300]})"
                + (f"; so are {others[:10]}" if others else "")
                + ". Loading it could run code stored in the checkpoint. If you trust this checkpoint, pass "
                  "allow_pickle=True (ckpt convert --allow-pickle)."
            )
        for fqn in fqns:
            flatten_into(planner.loaded[fqn], keys[fqn], self, f"{self.path} (DCP entry {fqn!r})", self._inline)

    def _load(self, state_dict: dict[str, Any], planner: Any) -> None:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        _load_state_dict(state_dict, storage_reader=_CachedReader(self.path, self._md), planner=planner, no_dist=True)

    def read(self, key: str) -> torch.Tensor:
        if key in self._inline:
            return self._inline[key]
        info = self.tensors[key]
        fqn = self._fqn[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        try:
            self._load({fqn: out}, DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
        except Exception as e:  # noqa: BLE001 - torch's reader: damaged bytes, vanished files
            raise CorruptCheckpointError(f"{self.path}: key {key!r} (DCP entry {fqn!r}): cannot read its data "
                                         f"({_root(e)})") from e
        return out


def _root(e: BaseException) -> str:
    """The first rank's original error inside torch's ``CheckpointException`` (which wraps even single-process
    failures with every traceback), else ``e`` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            e = inner
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


@functools.lru_cache(maxsize=1)
def _reader_class() -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class CachedReader(FileSystemReader):
        """torch's reader, with the metadata already read (and checked) once for all keys."""

        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self._cached = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._cached

    return CachedReader


def _CachedReader(path: str, metadata: Any) -> Any:  # noqa: N802 - a factory standing for the lazily built class
    return _reader_class()(path, metadata)


def _BytesPlanner(weights_only: bool) -> Any:  # noqa: N802
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class BytesPlanner(DefaultLoadPlanner):
        """Loads DCP's ``torch.save`` blobs with the weights_only unpickler unless pickle is allowed."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.loaded: dict[str, Any] = {}
            #: (entry, reason) of blobs the weights_only loader refused; nothing of theirs ran.
            self.refused: list[tuple[str, str]] = []

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.loaded[fqn] = torch.load(value, map_location="cpu", weights_only=weights_only)
            except pickle.UnpicklingError as e:
                if not weights_only:
                    raise
                self.refused.append((fqn, refused_import(e)))
                self.loaded[fqn] = None

    return BytesPlanner()


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_dcp(source: Source, directory: str, *, dtypes: dict[str, torch.dtype], workers: int = 1,
              overwrite: bool = False,
              progress: Progress | None = None) -> list[str]:
    """Write ``source`` as a DCP checkpoint in ``directory``; return the paths written (``.metadata`` last).

    A checkpoint holding only ``model/`` tensors is written as a bare model state dict (load it with
    ``dcp.load(model.state_dict(), ...)``); anything else keeps its nesting (``{"model": ..., "optim": ...}``).
    """
    if os.path.exists(os.path.join(directory, METADATA_NAME)) and not overwrite:
        raise CheckpointExistsError(f"{directory}: a DCP checkpoint is already there; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another destination")
    os.makedirs(directory, exist_ok=True)
    bare = is_bare_model(source.tensors, source.values)
    leaves: dict[str, Any] = {}
    by_path: dict[tuple[str, ...], str] = {}
    for key, info in source.tensors.items():
        # A data-less stand-in of the right dtype and shape: the planner reads the real tensor when it is written.
        leaves[key] = torch.empty((), dtype=dtypes[key]).expand(info.shape)
        path = leaf_path(key, source.containers)
        by_path[tuple(str(c) for c in (path[1:] if bare else path))] = key
    leaves.update(source.values)
    state = nest(leaves, source.containers, source.path)
    if bare:
        state = state["model"]
    dcp = _dcp()
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    writer = dcp.FileSystemWriter(directory, single_file_per_rank=False, thread_count=max(1, workers),
                                  per_thread_copy_ahead=0, sync_files=True)
    planner = _StreamingPlanner(source, by_path, dtypes, progress)
    _save_state_dict(state, storage_writer=writer, planner=planner, no_dist=True)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.endswith(".distcp") or n == METADATA_NAME)


def _StreamingPlanner(source: Source, by_path: dict[tuple[str, ...], str],  # noqa: N802
                      dtypes: dict[str, torch.dtype], progress: Progress | None) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingPlanner(DefaultSavePlanner):
        """Resolves each tensor by reading it from the source when the writer reaches it."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False)

        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            fqn = write_item.index.fqn
            path = tuple(str(c) for c in self.mappings.get(fqn, (fqn,)))
            key = by_path[path]
            t = read_as(source, key, dtypes[key]).contiguous()
            if progress is not None:
                progress(t.numel() * t.element_size())
            return t

    return StreamingPlanner()
