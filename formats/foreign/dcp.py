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

from ckpt.errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                         StorageError, UnsafeCheckpointError, UnsupportedStateError)
from formats import keys as K
from formats.codec import MAX_ZSTD_RATIO
from formats.foreign.pickle_guard import loads_checked, refused_import
from formats.foreign.source import Extent, Source, TensorInfo, flatten_into, is_bare_model, leaf_path, read_as
from formats.nesting import nest
from formats.manifest import ContainerEntry
from formats.foreign.files import check_confined, is_regular, read_small, regular_size
from formats.storage.base import check_relpath

Progress = Callable[[int], None]
METADATA_NAME = ".metadata"
#: Up to this many chunks per tensor are checked pairwise for overlaps; more must be slabs of one dimension.
_PAIRWISE_BOXES = 64
#: The most dimensions a DCP tensor may declare (the universal format's bound).
_MAX_NDIM = 64
#: The largest ``.metadata`` read (one of a model with a million tensors saved by a thousand ranks is smaller).
_MAX_METADATA_BYTES = 2**31


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - heavy import, only when DCP is used

    return dcp


def _tiles(boxes: list[Extent], shape: tuple[int, ...]) -> bool:
    """Whether non-empty ``boxes`` lie inside ``shape``, do not overlap, and cover it exactly.

    O(n log n): a few boxes are compared pairwise; many must be slabs along one dimension (what FSDP and TP save),
    checked by sorting. Many boxes cut otherwise count as not tiling (the tensor is then read whole)."""
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
    if len(boxes) > _PAIRWISE_BOXES:
        cut = {d for offs, sizes in boxes for d, (o, s, n) in enumerate(zip(offs, sizes, shape)) if (o, s) != (0, n)}
        if len(cut) != 1:
            return False
        d = cut.pop()
        end = 0
        for offs, sizes in sorted(boxes, key=lambda b: b[0][d]):
            if offs[d] != end:
                return False
            end += sizes[d]
        return end == shape[d]
    for i, (ao, asz) in enumerate(boxes):
        for bo, bsz in boxes[i + 1:]:
            if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(ao, asz, bo, bsz)):
                return False
    return True


def _checkpoint_exception() -> type[BaseException]:
    """torch's ``CheckpointException``: a ``BaseException``, so ``except Exception`` alone lets it through."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _is_int(v: Any, low: int = 0, high: int = 2**62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < high


def _int_seq(v: Any, n: int | None = None) -> bool:
    """A tuple/list/``torch.Size`` of (at most ``_MAX_NDIM``, or exactly ``n``) non-negative ints."""
    return (isinstance(v, (tuple, list)) and (len(v) == n if n is not None else len(v) <= _MAX_NDIM)
            and all(_is_int(x) for x in v))


def _validated(md: Any, where: str) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]], dict[Any, Any]]:
    """Check every field of unpickled DCP metadata for its type and range, once, before anything uses it.

    The pickle guard lets only DCP's own classes through, but their fields can hold anything (``offset="abc"``,
    ``chunks=None``, a ``size`` of 2^40 elements). Returns (entries, nested path of each entry, storage_data);
    a wrong field raises ``CorruptCheckpointError`` naming the file, the entry, what was expected and what was
    found."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    def bad(key: Any, field: str, expected: str, found: Any) -> CorruptCheckpointError:
        at = f", key {key!r}" if key is not None else ""
        return CorruptCheckpointError(f"{where}{at}: {field} must be {expected}, found {found!r}"[:600]
                                      + "; the DCP metadata is damaged")

    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"{where}: holds a {type(md).__name__}, not DCP metadata")
    entries = md.state_dict_metadata
    if not isinstance(entries, dict):
        raise bad(None, "state_dict_metadata", "a dict", type(entries).__name__)
    for fqn, e in entries.items():
        if not isinstance(fqn, str):
            raise bad(fqn, "an entry's name", "a str", type(fqn).__name__)
        if isinstance(e, BytesStorageMetadata):
            continue
        if not isinstance(e, TensorStorageMetadata):
            raise bad(fqn, "the entry", "TensorStorageMetadata or BytesStorageMetadata", type(e).__name__)
        if not _int_seq(e.size):
            raise bad(fqn, "size", f"a list of at most {_MAX_NDIM} non-negative integers", e.size)
        if not isinstance(e.properties, TensorProperties):
            raise bad(fqn, "properties", "TensorProperties", type(e.properties).__name__)
        if not isinstance(e.properties.dtype, torch.dtype):
            raise bad(fqn, "properties.dtype", "a torch.dtype", e.properties.dtype)
        if not isinstance(e.chunks, (list, tuple)):
            raise bad(fqn, "chunks", "a list of ChunkStorageMetadata", type(e.chunks).__name__)
        ndim = len(e.size)
        for i, c in enumerate(e.chunks):
            if not isinstance(c, ChunkStorageMetadata):
                raise bad(fqn, f"chunks[{i}]", "ChunkStorageMetadata", type(c).__name__)
            if not _int_seq(c.offsets, ndim) or not _int_seq(c.sizes, ndim):
                raise bad(fqn, f"chunks[{i}] offsets and sizes", f"{ndim} non-negative integers each (the tensor's "
                          f"dimensions)", (c.offsets, c.sizes))
    mappings = md.planner_data if md.planner_data is not None else {}
    if not isinstance(mappings, dict):
        raise bad(None, "planner_data", "a dict (or None)", type(mappings).__name__)
    paths: dict[str, tuple[Any, ...]] = {}
    for fqn in entries:
        p = mappings.get(fqn, (fqn,))
        if (not isinstance(p, (tuple, list)) or not 0 < len(p) <= 256
                or not all((isinstance(c, str) and c) or _is_int(c, 0, len(entries)) for c in p)):
            raise bad(fqn, "its planner_data path", "a non-empty tuple of names and list indices below the number "
                      f"of entries ({len(entries)})", p)
        paths[fqn] = tuple(p)
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise bad(None, "storage_data", "a dict", type(storage).__name__)
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(index, MetadataIndex) or not isinstance(fqn, str):
            raise bad(fqn, "a storage_data key", "a MetadataIndex naming its entry", index)
        rel = getattr(info, "relative_path", None)
        try:
            check_relpath(rel)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{where}, key {fqn!r}: data file {e}") from e
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not _is_int(offset) or not _is_int(length):
            raise bad(fqn, "its storage offset and length", "non-negative integers", (offset, length))
        td = getattr(info, "transform_descriptors", None)
        if td is not None and (not isinstance(td, (list, tuple)) or not all(isinstance(t, str) for t in td)):
            raise bad(fqn, "its transform_descriptors", "a list of str (or None)", td)
    return entries, paths, storage


class DcpSource(Source):
    """A DCP checkpoint directory written by ``torch.distributed.checkpoint.save`` under any layout."""

    def __init__(self, path: str, allow_pickle: bool = False) -> None:
        super().__init__(path=str(path), format="dcp")
        self.allow_pickle = allow_pickle
        meta_path = os.path.join(self.path, METADATA_NAME)
        if not os.path.isdir(self.path):
            raise CheckpointNotFoundError(f"{self.path}: no such directory")
        if not is_regular(meta_path, f"DCP {METADATA_NAME}"):  # a FIFO would block the read forever
            raise CorruptCheckpointError(f"{self.path}: no {METADATA_NAME}: not a DCP checkpoint, or its save never "
                                         "finished (DCP writes .metadata last)")
        check_confined(meta_path, self.path)
        if allow_pickle:
            try:
                self._md = _dcp().FileSystemReader(self.path).read_metadata()
            except Exception as e:  # noqa: BLE001 - whatever unpickling raised: the file is not usable metadata
                raise CorruptCheckpointError(
                    f"{meta_path}: cannot be read as DCP metadata ({type(e).__name__}: {e})") from e
        else:  # read once: the bytes checked are the bytes unpickled
            self._md = loads_checked(read_small(meta_path, f"DCP {METADATA_NAME}", _MAX_METADATA_BYTES), meta_path)
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        try:
            entries, paths, storage = _validated(self._md, meta_path)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
            # A flipped byte in the pickle can rename or drop a field of DCP's dataclasses: the object unpickles,
            # but lacks what its class promises.
            raise CorruptCheckpointError(f"{meta_path}: the DCP metadata is malformed ({type(e).__name__}: "
                                         f"{str(e)[:300]}); it was damaged or written by something else") from None
        self._fqn: dict[str, str] = {}
        self._inline: dict[str, torch.Tensor] = {}
        bare = bool(entries) and all(len(p) == 1 for p in paths.values()) and all(
            isinstance(md, TensorStorageMetadata) for md in entries.values())
        if bare:  # a bare model state dict: weights are keyed model/<name>
            paths = {fqn: ("model", *p) for fqn, p in paths.items()}
            self.metadata["dcp_bare_state_dict"] = True
        keys = {fqn: self._key_of(p) for fqn, p in paths.items()}
        if len(set(keys.values())) != len(keys):
            dup = next(k for i, k in enumerate(keys.values()) if k in list(keys.values())[:i])
            raise CorruptCheckpointError(f"{meta_path}: two entries map to the key {dup!r} (planner_data)")
        self._record_containers(paths, meta_path)
        stored = self._check_files(meta_path, keys, storage)
        byte_keys: list[str] = []
        for fqn, md in entries.items():
            key = keys[fqn]
            self._fqn[key] = fqn
            if isinstance(md, TensorStorageMetadata):
                info = self._tensor_info(key, md)
                if info.nbytes > stored.get(fqn, 0):
                    raise CorruptCheckpointError(
                        f"{meta_path}, key {fqn!r}: declares a {info.dtype} tensor of shape {list(info.shape)} "
                        f"({info.nbytes} bytes) but its data files can hold at most {stored.get(fqn, 0)} bytes of it "
                        f"(the bytes stored, times {MAX_ZSTD_RATIO} where compressed); the metadata is damaged")
                self.tensors[key] = info
            elif isinstance(md, BytesStorageMetadata):
                byte_keys.append(fqn)
            else:
                raise CorruptCheckpointError(f"{meta_path}, key {fqn!r}: unknown entry {type(md).__name__}")
        self._load_values(byte_keys, keys)

    @staticmethod
    def _key_of(path: tuple[Any, ...]) -> str:
        return "/".join(K.escape(str(c)) if isinstance(c, str) else str(c) for c in path)

    def _record_containers(self, paths: dict[str, tuple[Any, ...]], meta_path: str) -> None:
        lengths: dict[str, int] = {}
        kinds: dict[str, str] = {}
        for fqn, p in paths.items():
            for i in range(len(p)):
                parent = self._key_of(p[:i])
                kind = "list" if isinstance(p[i], int) else "dict"
                if kinds.setdefault(parent, kind) != kind:
                    raise CorruptCheckpointError(
                        f"{meta_path}, key {fqn!r}: planner_data puts it in {parent!r} as a {kind} item, another "
                        f"entry as a {kinds[parent]} item; the metadata is damaged")
                if kind == "list":
                    lengths[parent] = max(lengths.get(parent, 0), p[i] + 1)
        kinds.setdefault("", "dict")
        if kinds[""] != "dict":
            raise CorruptCheckpointError(f"{meta_path}: planner_data makes the top level a list; DCP saves a dict")
        for k, t in kinds.items():
            self.containers[k] = ContainerEntry(k, t, lengths.get(k, 0))

    def _tensor_info(self, key: str, md: Any) -> TensorInfo:
        shape = tuple(md.size)  # every field was checked by _validated
        dtype = md.properties.dtype
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
        boxes = [b for b in boxes if all(s > 0 for s in b[1]) or not b[1]]
        if not shape:
            boxes = boxes[:1] if boxes else [((), ())]
        if _tiles(boxes, shape):
            return TensorInfo(key, dtype, shape, tuple(sorted(boxes)))
        # Replicated shards saved more than once (DCP deduplicates, but other writers may not): store it whole.
        return TensorInfo.whole(key, dtype, shape)

    def _check_files(self, meta_path: str, keys: dict[str, str], storage: dict[Any, Any]) -> dict[str, int]:
        """Every data file the metadata names exists, is a regular file inside the directory and holds its byte
        ranges. Returns, per entry, the most bytes its ranges can hold (what bounds the tensor it declares): their
        lengths, times ``MAX_ZSTD_RATIO`` for compressed ones."""
        needed: dict[str, tuple[int, str]] = {}
        stored: dict[str, int] = {}
        for index, info in storage.items():
            rel = info.relative_path
            end = info.offset + info.length
            fqn = index.fqn
            # A compressed range (DCP's ``_extensions``, e.g. ZStandard: transform_descriptors ["stream.zstd/1"])
            # decodes to at most MAX_ZSTD_RATIO times its stored bytes.
            stored[fqn] = stored.get(fqn, 0) + info.length * (MAX_ZSTD_RATIO if info.transform_descriptors else 1)
            if end > needed.get(rel, (-1, ""))[0]:
                needed[rel] = (end, keys.get(fqn, fqn))
        for rel, (end, key) in sorted(needed.items()):
            full = os.path.join(self.path, rel)
            try:
                size = regular_size(full, f"a DCP data file (key {key!r} is stored there)")
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{full}: DCP data file is missing (key {key!r} is stored there); the "
                                             "checkpoint is incomplete") from None
            check_confined(full, self.path)
            if size < end:
                raise CorruptCheckpointError(f"{full}: DCP data file is truncated: {size} bytes, the metadata needs "
                                             f"{end} (key {key!r}); the checkpoint is damaged")
        return stored

    def _load_values(self, fqns: list[str], keys: dict[str, str]) -> None:
        if not fqns:
            return
        planner = _BytesPlanner(weights_only=not self.allow_pickle)
        try:
            self._load({fqn: None for fqn in fqns}, planner)
        except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - torch's reader failing on a damaged blob
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
        except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - torch's reader: damaged bytes, vanished files
            raise CorruptCheckpointError(f"{self.path}: key {key!r} (DCP entry {fqn!r}): cannot read its data "
                                         f"({_root(e)})") from e
        return out


def _inner(e: BaseException) -> BaseException:
    """The first rank's original error inside torch's ``CheckpointException`` (which wraps even single-process
    failures with every traceback), else ``e`` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            return inner
    return e


def _root(e: BaseException) -> str:
    """``_inner(e)`` as one short line: its type and the first line of its message."""
    e = _inner(e)
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
        path = leaf_path(key, source.containers, source.path)
        by_path[tuple(str(c) for c in (path[1:] if bare else path))] = key
    leaves.update(source.values)
    state = nest(leaves, source.containers, source.path)
    if bare:
        state = state["model"]
    if not isinstance(state, dict):
        raise UnsupportedStateError(f"{source.path}: its root is a {type(state).__name__}; a DCP checkpoint holds a "
                                    "state dict (a dict at the top). Convert it to torch or universal instead.")
    dcp = _dcp()
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    writer = dcp.FileSystemWriter(directory, single_file_per_rank=False, thread_count=max(1, workers),
                                  per_thread_copy_ahead=0, sync_files=True)
    planner = _StreamingPlanner(source, by_path, dtypes, progress)
    try:
        _save_state_dict(state, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:  # a BaseException: it would pass every ``except Exception``
        inner = _inner(e)
        if isinstance(inner, CheckpointError):  # the source failed to read a tensor: its own message says why
            raise inner from None
        raise StorageError(f"{directory}: writing the DCP checkpoint failed ({_root(e)})") from None
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
