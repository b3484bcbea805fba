"""The universal format as a ``Source`` (reading) and as a conversion target (``write_universal``).

``write_universal`` streams any ``Source`` into a universal checkpoint without a process group, through the one
write pipeline: ``plan_files`` (pure) cuts the source's tables into boxes (``formats.box.split_bytes``) grouped into
data files; each box becomes a ``WriteItem`` whose tensor is read from the source only when the executor
(``formats.writer.write_groups``) reaches the key's first box, and dropped when it moves on; ``formats.commit``
builds the manifest and commits it last. Peak memory is about one tensor per worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError
from formats.box import Box, split_bytes
from formats.commit import TensorMeta, build_manifest, commit, new_save_id
from formats.dtypes import dtype_from_name, dtype_name
from formats.manifest import DATA_DIR, MANIFEST_NAME, ContainerEntry, Manifest
from formats.reader import ChunkReader, read_manifest
from formats.storage import Storage, open_storage
from formats.foreign.source import Source, TensorInfo, read_as
from formats.writer import DEFAULT_MAX_CHUNK_BYTES, WriteOptions, write_groups

Progress = Callable[[int], None]
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
        box = Box.whole(tuple(entry.shape))
        self._chunks.check_box(entry, box)  # before allocating what the manifest declares
        out = torch.empty(box.sizes, dtype=dtype_from_name(entry.dtype, key))
        self._chunks.read_box(entry, box, out, f"{self.path}: ")
        return out

    @property
    def bytes_read(self) -> int:
        return self._chunks.bytes_read

    def close(self) -> None:
        self.storage.close()


@dataclass(frozen=True)
class PlannedBox:
    """One box of one tensor of the source, as planned (no data)."""

    key: str
    box: Box
    nbytes: int


def plan_files(source: Source, dtypes: dict[str, torch.dtype], workers: int, max_chunk_bytes: int,
               max_file_bytes: int) -> list[list[PlannedBox]]:
    """Boxes grouped into data files: a tensor's boxes stay together; files are spread over ``workers`` and cut at
    about ``max_file_bytes``. Pure: no I/O."""
    per_key: list[list[PlannedBox]] = []
    for key, info in source.tensors.items():
        es = dtypes[key].itemsize
        items = [PlannedBox(key, b, b.numel * es) for offsets, sizes in info.boxes
                 for b in split_bytes(Box(tuple(offsets), tuple(sizes)), es, max_chunk_bytes)]
        if items:
            per_key.append(items)
    total = sum(i.nbytes for items in per_key for i in items)
    target = max(1, min(max_file_bytes, -(-total // max(1, workers))))
    files: list[list[PlannedBox]] = [[]]
    size = 0
    for items in per_key:
        if files[-1] and size >= target:
            files.append([])
            size = 0
        files[-1].extend(items)
        size += sum(i.nbytes for i in items)
    return [f for f in files if f]


class TensorFeed:
    """The tensors one data file's boxes come from: the current key's tensor is read from the source (and cast)
    when the writer reaches its first box and dropped when it reaches another key's. Boxes of a key are adjacent."""

    def __init__(self, source: Source, dtypes: dict[str, torch.dtype]) -> None:
        self.source, self.dtypes = source, dtypes
        self.key: str | None = None
        self.tensor: torch.Tensor | None = None

    def box(self, key: str, box: Box) -> torch.Tensor:
        if key != self.key:
            self.tensor = None  # the previous key's tensor goes before the next one is read
            self.tensor = read_as(self.source, key, self.dtypes[key])
            self.key = key
        assert self.tensor is not None
        return self.tensor[box.slices()]

    def finish(self) -> None:
        self.key, self.tensor = None, None


class _FedBox:
    """A ``WriteItem``: a planned box whose data its file's ``TensorFeed`` gives when the writer reaches it."""

    final = False

    def __init__(self, planned: PlannedBox, feed: TensorFeed) -> None:
        self.key, self.offsets, self.sizes = planned.key, planned.box.offsets, planned.box.sizes
        self._planned, self._feed = planned, feed

    @property
    def nbytes(self) -> int:
        return self._planned.nbytes

    def materialize(self) -> torch.Tensor:
        return self._feed.box(self.key, self._planned.box)

    def release(self) -> None:
        """The feed keeps the key's tensor for its next box."""


def write_universal(source: Source, dst: "str | Storage", *, dtypes: dict[str, torch.dtype], workers: int = 1,
                    overwrite: bool = False, progress: Progress | None = None,
                    storage_options: dict[str, Any] | None = None, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, options: WriteOptions | None = None) -> Manifest:
    """Write ``source`` as a universal checkpoint at ``dst``; return the committed manifest.

    ``dtypes`` gives each tensor's stored dtype (tensors read from the source are cast to it).
    Raises ``CheckpointExistsError`` if a committed checkpoint is there and ``overwrite`` is false; with
    ``overwrite`` the old data files stay valid until the new manifest replaces the old one, then are deleted
    (``formats.commit``: with every other data file the new manifest does not list).
    """
    storage = open_storage(dst, storage_options)
    try:
        if storage.exists(MANIFEST_NAME) and not overwrite:
            raise CheckpointExistsError(f"{storage.url}: a committed checkpoint is already there; pass --overwrite "
                                        "(overwrite=True) to replace it, or choose another destination")
        save_id = new_save_id()
        groups = plan_files(source, dtypes, workers, max_chunk_bytes, max_file_bytes)
        feeds = [TensorFeed(source, dtypes) for _ in groups]
        items = [[_FedBox(p, feed) for p in group] for group, feed in zip(groups, feeds)]
        paths = [f"{DATA_DIR}/{save_id}-r00000-{i}.bin" for i in range(len(groups))]
        try:
            result = write_groups(storage, paths, items, options or WriteOptions(num_files=1), progress, workers)
        finally:
            for feed in feeds:
                feed.finish()
        containers = dict(source.containers)
        containers.setdefault("", ContainerEntry("", "dict"))
        manifest = build_manifest(
            save_id=save_id, results=[result], where=source.path, tool="ckpt convert",
            tensors={k: TensorMeta(dtype_name(dtypes[k]), tuple(info.shape)) for k, info in source.tensors.items()},
            values=source.values, containers=containers,
            layout=source.layout or {"world_size": 1, "dtensor_mesh_shapes": []},
            metadata={**source.metadata, "converted_from": {"format": source.format, "path": source.path}})
        commit(storage, manifest)
        return manifest
    finally:
        storage.close()
