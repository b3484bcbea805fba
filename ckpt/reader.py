"""``ckpt.open(path)``: read a checkpoint without a state to load into (inspection, conversion, tests).

Single-process; reads only the bytes each request needs and verifies their checksums.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.loading import read_into
from ckpt.state import unflatten
from formats.dtypes import dtype_from_name
from formats.manifest import ChunkEntry, Manifest, TensorEntry
from formats.reader import ChunkReader, read_manifest
from formats.storage import Storage, open_storage
from formats.box import Box
from resharding.layout import LocalPiece, TensorLayout


class CheckpointReader:
    """A committed checkpoint opened for reading. Use as a context manager; thread-safe reads."""

    def __init__(self, path: "str | Storage", storage_options: dict[str, Any] | None = None, num_threads: int = 4) -> None:
        self.storage = open_storage(path, storage_options)
        self.manifest: Manifest = read_manifest(self.storage)
        self.num_threads = num_threads
        self._chunks = ChunkReader(self.storage, self.manifest)

    @property
    def path(self) -> str:
        return self.storage.url

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage so far."""
        return self._chunks.bytes_read

    def keys(self) -> list[str]:
        """Every leaf key, tensors and values, sorted."""
        return self.manifest.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.manifest.tensors or key in self.manifest.values

    def info(self, key: str) -> TensorEntry:
        """dtype, global shape and chunks of tensor ``key`` (``KeyError`` naming close keys if absent)."""
        try:
            return self.manifest.tensors[key]
        except KeyError:
            raise KeyError(self._missing(key)) from None

    def _missing(self, key: str) -> str:
        close = [k for k in self.keys() if key.split("/")[-1] in k][:5]
        return f"{self.path}: no key {key!r}" + (f"; similar keys: {close}" if close else "")

    def read(self, key: str, index: "tuple[slice | int, ...] | slice | int | None" = None) -> Any:
        """The tensor ``key`` (or its part ``index``, reading only those bytes), or the value ``key``."""
        if key in self.manifest.values:
            return self.manifest.values[key].value
        entry = self.info(key)
        box, squeeze = _index_to_box(index, tuple(entry.shape), key)
        # The shape comes from the manifest: before allocating for it, check that the files of the chunks it
        # needs really hold the bytes the manifest declares, so a forged shape raises CorruptCheckpointError
        # instead of reserving (or failing to reserve) memory no real file backs.
        self._chunks.check_box(entry, box)
        out = torch.empty(box.sizes, dtype=dtype_from_name(entry.dtype, key))
        lay = TensorLayout(tuple(entry.shape), out, (LocalPiece(tuple(0 for _ in box.sizes), box),), None)
        read_into(self._chunks, self.manifest, {key: lay}, self.num_threads)
        return out[squeeze] if squeeze else out

    def verify_chunk(self, entry: TensorEntry, chunk: ChunkEntry) -> None:
        """Re-read every stored byte of ``chunk`` of tensor ``entry`` and check its checksums (and, for a compressed
        chunk, that it decompresses to the declared size). Raises ``CorruptCheckpointError`` naming the file, key
        and byte range of the first damage (a missing or short data file included).

        Called by ``ckpt verify`` for every chunk of ``manifest``, from a thread pool (thread-safe)."""
        self._chunks.verify_chunk(entry, chunk)

    def state(self) -> Any:
        """The whole checkpoint as nested containers of tensors and values (reads every tensor)."""
        tensors = {k: self.read(k) for k in self.manifest.tensors}
        values = {k: v.value for k, v in self.manifest.values.items()}
        try:
            return unflatten(tensors, values, self.manifest.containers, self.path)
        except CorruptCheckpointError as e:  # a container record that its keys contradict
            raise CorruptCheckpointError(
                f"{e}; the manifest's containers do not match its keys, so it is damaged. Read tensors one by one "
                "with read(key) instead.") from e

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_to_box(index: Any, shape: tuple[int, ...], key: str) -> tuple[Box, tuple[Any, ...]]:
    """A tuple of unit-step slices and ints -> (box to read, indexing that drops the int dims)."""
    if index is None:
        return Box.whole(shape), ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"key {key!r}: {len(index)} indices for a {len(shape)}-d tensor")
    offs, sizes, post = [], [], []
    for d, n in enumerate(shape):
        ix = index[d] if d < len(index) else slice(None)
        if isinstance(ix, int):
            i = ix + n if ix < 0 else ix
            if not 0 <= i < n:
                raise IndexError(f"key {key!r}: index {ix} out of range for dim {d} of size {n}")
            offs.append(i)
            sizes.append(1)
            post.append(0)
        elif isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise IndexError(f"key {key!r}: only unit-step slices are supported, got {ix}")
            offs.append(start)
            sizes.append(max(0, stop - start))
            post.append(slice(None))
        else:
            raise TypeError(f"key {key!r}: index items must be int or slice, got {type(ix).__name__}")
    squeeze = tuple(post) if any(p == 0 for p in post) else ()
    return Box(tuple(offs), tuple(sizes)), squeeze


def open(path: "str | Storage", storage_options: dict[str, Any] | None = None) -> CheckpointReader:  # noqa: A001
    """Open the committed checkpoint at ``path`` for reading."""
    return CheckpointReader(path, storage_options)
