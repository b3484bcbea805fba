"""The universal format as a ``Source`` (reading) and as a conversion target (``write_universal``).

``write_universal`` streams any ``Source`` into a universal checkpoint without a process group, the way
``resharding.offline`` does: the items to write (key, box) are planned from the source's tables first; then each
data file is written by ``formats.writer.write_file`` whose ``ready`` hook reads a tensor from the source only when
the writer reaches its first box, and drops it once its last box is written. Peak memory is about one tensor per
worker thread. The manifest is written last (the commit).
"""

from __future__ import annotations

import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError, CorruptCheckpointError
from formats.dtypes import dtype_from_name, dtype_name
from formats.manifest import (DATA_DIR, MANIFEST_NAME, ChunkEntry, ContainerEntry, FileEntry, Manifest, TensorEntry,
                              ValueEntry)
from formats.reader import ChunkReader, read_manifest
from formats.storage import Storage, open_storage
from formats.foreign.source import Box, Source, TensorInfo, read_as
from formats.writer import ChunkWrite, WriteOptions, write_file

Progress = Callable[[int], None]
WRITER = {"library": "ckpt", "tool": "formats.foreign"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckpt")
    except PackageNotFoundError:
        return "unknown"
#: Largest chunk written: bigger boxes are split into row ranges (the same bound as ``ckpt.SaveOptions``).
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
#: Data files are closed at about this size, so a remote destination buffers at most about this much per worker.
DEFAULT_MAX_FILE_BYTES = 2**30


class UniversalSource(Source):
    """A committed universal checkpoint opened for tensor-by-tensor reads (checksums verified on every read)."""

    def __init__(self, path: "str | Storage", storage_options: dict[str, Any] | None = None) -> None:
        storage = open_storage(path, storage_options)
        super().__init__(path=storage.url, format="universal")
        self.storage = storage
        self.manifest = read_manifest(storage)
        self._chunks = ChunkReader(storage, self.manifest)
        for key, e in self.manifest.tensors.items():
            boxes = tuple((tuple(c.offsets), tuple(c.sizes)) for c in e.chunks if c.numel > 0)
            self.tensors[key] = TensorInfo(key, dtype_from_name(e.dtype, key), tuple(e.shape), boxes)
        self.values = {k: v.value for k, v in self.manifest.values.items()}
        self.containers = dict(self.manifest.containers)
        self.metadata = dict(self.manifest.metadata)

    def read(self, key: str) -> torch.Tensor:
        entry = self.manifest.tensors[key]
        for c in entry.chunks:  # before allocating what the manifest declares, check the files back it
            self._chunks.check_file(c.file, key)
        out = torch.empty(tuple(entry.shape), dtype=dtype_from_name(entry.dtype, key))
        for c in entry.chunks:
            if c.numel == 0:
                continue
            view = out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
            self._chunks.read_region(entry, c, tuple(0 for _ in c.sizes), tuple(c.sizes), view)
        return out

    @property
    def bytes_read(self) -> int:
        return self._chunks.bytes_read

    def close(self) -> None:
        self.storage.close()


def split_rows(box: Box, itemsize: int, max_chunk_bytes: int) -> list[Box]:
    """``box`` cut into row ranges (along dim 0) of at most ``max_chunk_bytes`` each (at least one row)."""
    offsets, sizes = box
    nbytes = math.prod(sizes) * itemsize
    if not sizes or nbytes <= max_chunk_bytes or sizes[0] <= 1:
        return [box]
    row_bytes = max(1, nbytes // sizes[0])
    rows = max(1, max_chunk_bytes // row_bytes)
    return [((offsets[0] + r, *offsets[1:]), (min(rows, sizes[0] - r), *sizes[1:])) for r in range(0, sizes[0], rows)]


class _LazyChunk(ChunkWrite):
    """A box of one tensor whose data is set by the writer's ``ready`` hook just before it is written."""

    def __init__(self, key: str, box: Box, nbytes: int) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "offsets", box[0])
        object.__setattr__(self, "sizes", box[1])
        object.__setattr__(self, "_nbytes", nbytes)
        object.__setattr__(self, "_data", None)

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        if self._data is None:
            raise RuntimeError(f"key {self.key!r}: box data read before the writer reached it")
        return self._data

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def set(self, t: torch.Tensor | None) -> None:
        object.__setattr__(self, "_data", t)


class TensorFeed:
    """The ``ready`` hook of one data file: holds the tensor of the current key, read from the source (and cast)
    when the writer reaches its first box; the previous tensor is dropped then. Items of one key are adjacent."""

    def __init__(self, source: Source, dtypes: dict[str, torch.dtype], progress: Progress | None) -> None:
        self.source, self.dtypes, self.progress = source, dtypes, progress
        self.key: str | None = None
        self.tensor: torch.Tensor | None = None
        self.prev: _LazyChunk | None = None

    def __call__(self, item: _LazyChunk) -> None:
        self._release_prev()
        if item.key != self.key:
            self.tensor = None
            self.tensor = read_as(self.source, item.key, self.dtypes[item.key])
            self.key = item.key
        assert self.tensor is not None
        item.set(self.tensor[tuple(slice(o, o + s) for o, s in zip(item.offsets, item.sizes))])
        self.prev = item

    def _release_prev(self) -> None:
        if self.prev is not None:
            self.prev.set(None)
            if self.progress is not None:
                self.progress(self.prev.nbytes)
            self.prev = None

    def finish(self) -> None:
        self._release_prev()
        self.tensor = None
        self.key = None


def plan_files(source: Source, dtypes: dict[str, torch.dtype], workers: int, max_chunk_bytes: int,
               max_file_bytes: int) -> list[list[_LazyChunk]]:
    """Items grouped into data files: a tensor's boxes stay together; files are spread over ``workers`` and cut at
    about ``max_file_bytes``. Pure: no I/O."""
    per_key: list[list[_LazyChunk]] = []
    for key, info in source.tensors.items():
        es = dtypes[key].itemsize
        items = [_LazyChunk(key, b, math.prod(b[1]) * es)
                 for box in info.boxes for b in split_rows(box, es, max_chunk_bytes)]
        if items:
            per_key.append(items)
    total = sum(i.nbytes for items in per_key for i in items)
    target = max(1, min(max_file_bytes, -(-total // max(1, workers))))
    files: list[list[_LazyChunk]] = [[]]
    size = 0
    for items in per_key:
        if files[-1] and size >= target:
            files.append([])
            size = 0
        files[-1].extend(items)
        size += sum(i.nbytes for i in items)
    return [f for f in files if f]


def write_universal(source: Source, dst: "str | Storage", *, dtypes: dict[str, torch.dtype], workers: int = 1,
                    overwrite: bool = False, progress: Progress | None = None,
                    storage_options: dict[str, Any] | None = None, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, options: WriteOptions | None = None) -> Manifest:
    """Write ``source`` as a universal checkpoint at ``dst``; return the committed manifest.

    ``dtypes`` gives each tensor's stored dtype (tensors read from the source are cast to it).
    Raises ``CheckpointExistsError`` if a committed checkpoint is there and ``overwrite`` is false; with
    ``overwrite`` the old data files stay valid until the new manifest replaces the old one, then are deleted.
    """
    storage = open_storage(dst, storage_options)
    try:
        old_files: set[str] = set()
        if storage.exists(MANIFEST_NAME):
            if not overwrite:
                raise CheckpointExistsError(f"{storage.url}: a committed checkpoint is already there; pass --overwrite "
                                            "(overwrite=True) to replace it, or choose another destination")
            old_files = set(storage.list(DATA_DIR + "/"))
        save_id = f"{int(time.time())}-{uuid.uuid4().hex[:12]}"
        opts = options or WriteOptions(num_files=1)
        groups = plan_files(source, dtypes, workers, max_chunk_bytes, max_file_bytes)
        paths = [f"{DATA_DIR}/{save_id}-r00000-{i}.bin" for i in range(len(groups))]

        def write_one(i: int) -> tuple[int, list[tuple[str, ChunkEntry]]]:
            feed = TensorFeed(source, dtypes, progress)
            try:
                return write_file(storage, paths[i], groups[i], opts, ready=feed)  # type: ignore[arg-type]
            finally:
                feed.finish()

        if len(groups) <= 1 or workers <= 1:
            results = [write_one(i) for i in range(len(groups))]
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(groups)), thread_name_prefix="ckpt-convert") as pool:
                results = list(pool.map(write_one, range(len(groups))))
        manifest = _commit(storage, save_id, source, dtypes, dict(zip(paths, results)))
        stale = sorted(old_files - set(manifest.files))
        if stale:
            storage.delete(stale)
        return manifest
    finally:
        storage.close()


def _commit(storage: Storage, save_id: str, source: Source, dtypes: dict[str, torch.dtype],
            results: dict[str, tuple[int, list[tuple[str, ChunkEntry]]]]) -> Manifest:
    files = {p: FileEntry(size, 0) for p, (size, _) in results.items()}
    chunks: dict[str, list[ChunkEntry]] = {}
    for _, (_, entries) in results.items():
        for key, c in entries:
            chunks.setdefault(key, []).append(c)
    tensors = {k: TensorEntry(k, dtype_name(dtypes[k]), info.shape,
                              tuple(sorted(chunks.get(k, []), key=lambda c: c.offsets)))
               for k, info in source.tensors.items()}
    for k, t in tensors.items():
        if sum(c.numel for c in t.chunks) != t.numel:
            raise CorruptCheckpointError(f"{source.path}: key {k!r}: the boxes written cover "
                                         f"{sum(c.numel for c in t.chunks)} of {t.numel} elements")
    containers = dict(source.containers)
    containers.setdefault("", ContainerEntry("", "dict"))
    manifest = Manifest(
        save_id=save_id, world_size=1, files=files, tensors=tensors,
        values={k: ValueEntry(k, v) for k, v in source.values.items()}, containers=containers,
        writer={**WRITER, "version": _version(), "torch": torch.__version__}, created_unix_secs=time.time(),
        layout=source.layout or {"world_size": 1, "dtensor_mesh_shapes": []},
        metadata={**source.metadata, "converted_from": {"format": source.format, "path": source.path}},
    )
    storage.commit(MANIFEST_NAME, manifest.to_json())
    return manifest
