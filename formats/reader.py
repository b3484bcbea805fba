"""Reading chunk bytes back: byte ranges, block checksums, copies into destination tensors.

``ChunkReader`` executes read items that a planner produced: "copy the part ``rel`` of chunk ``c`` of tensor
``key`` into ``out``". It reads only the checksum blocks that part touches, verifies each of them, and never
trusts a size it has not checked against the file (a truncated file raises before any tensor is touched).
Callers: ``ckpt`` load and ``ckpt.open`` readers, from a thread pool; methods are thread-safe.
"""

from __future__ import annotations

import threading

import torch

from ckpt.errors import CorruptCheckpointError
from formats import checksum, codec as codecs
from formats.box import Box, row_major_strides
from formats.dtypes import dtype_from_name, itemsize
from formats.manifest import MANIFEST_NAME, ChunkEntry, Manifest, TensorEntry
from formats.storage.base import Storage
from formats.tensor_bytes import writable_bytes


class ChunkReader:
    """Reads regions of chunks of one committed checkpoint."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self._checked_files: set[str] = set()
        self._lock = threading.Lock()
        #: Bytes fetched from storage so far (read amplification = bytes_read / bytes needed).
        self.bytes_read = 0

    def _where(self, path: str) -> str:
        return f"{self.storage.url.rstrip('/')}/{path}"

    def check_file(self, path: str, key: str) -> None:
        """Raise ``CorruptCheckpointError`` if ``path`` is shorter than the manifest says (checked once per file)."""
        if path in self._checked_files:
            return
        declared = self.manifest.files[path].size_bytes
        try:
            actual = self.storage.size(path)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(
                f"{self._where(path)}: data file of key {key!r} is missing (manifest lists {declared} bytes)"
            ) from e
        if actual < declared:
            raise CorruptCheckpointError(
                f"{self._where(path)}: data file is truncated: {actual} bytes, manifest says {declared} "
                f"(key {key!r} lives there); restore it from another tier or use an earlier checkpoint"
            )
        with self._lock:
            self._checked_files.add(path)

    def _verify(self, entry: TensorEntry, chunk: ChunkEntry, first_block: int, data: memoryview) -> None:
        """Verify the blocks of ``data`` that start at block ``first_block`` of ``chunk``."""
        block = chunk.block_bytes
        for i in range(0, max(len(data), 1), block):
            b = first_block + i // block
            found = checksum.digest(data[i : i + block])
            expected = chunk.checksums[b]
            if found != expected:
                start = chunk.byte_offset + b * block
                end = min(start + block, chunk.byte_offset + chunk.byte_length)
                raise CorruptCheckpointError(
                    f"{self._where(chunk.file)}: checksum mismatch in key {entry.key!r}, chunk at offsets "
                    f"{list(chunk.offsets)}, file bytes [{start}, {end}): expected xxh3_64 {expected}, found {found}. "
                    "The file is damaged; restore it from another tier or use an earlier checkpoint."
                )
            if len(data) == 0:
                break

    def read_region(self, entry: TensorEntry, chunk: ChunkEntry, rel_offsets: tuple[int, ...],
                    rel_sizes: tuple[int, ...], out: torch.Tensor) -> None:
        """Copy the box ``rel_offsets/rel_sizes`` (relative to ``chunk``) of tensor ``entry`` into ``out``.

        ``out`` must have shape ``rel_sizes``; it may have another dtype (``copy_`` casts) or device.
        """
        dtype = dtype_from_name(entry.dtype, entry.key)
        if tuple(out.shape) != tuple(rel_sizes):
            raise ValueError(f"read_region: out has shape {tuple(out.shape)}, region has {rel_sizes}")
        numel = 1
        for s in rel_sizes:
            numel *= s
        if numel == 0:
            return
        self.check_file(chunk.file, entry.key)
        whole = tuple(rel_offsets) == tuple(0 for _ in rel_offsets) and tuple(rel_sizes) == chunk.sizes
        if chunk.codec == "zstd":
            self._read_zstd(entry, chunk, dtype, rel_offsets, rel_sizes, out)
            return
        es = itemsize(dtype)
        strides = row_major_strides(chunk.sizes)
        first = sum(o * s for o, s in zip(rel_offsets, strides))
        last = sum((o + n - 1) * s for o, n, s in zip(rel_offsets, rel_sizes, strides))
        b0 = (first * es) // chunk.block_bytes
        start = b0 * chunk.block_bytes
        end = min(-(-((last + 1) * es) // chunk.block_bytes) * chunk.block_bytes, chunk.byte_length)
        # Memory a storage maps (daemon segments): verify the stored bytes where they are, then one copy_.
        mapped = self.storage.view(chunk.file, chunk.byte_offset + start, end - start) \
            if (chunk.byte_offset + start) % es == 0 else None
        if mapped is None and whole and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            # Zero-copy fast path: read straight into the destination and verify it there.
            view = writable_bytes(out)
            self.storage.readinto(chunk.file, chunk.byte_offset, view)
            self._add_read(len(view))
            self._verify(entry, chunk, 0, view)
            return
        if mapped is not None:
            self._add_read(len(mapped))
            self._verify(entry, chunk, b0, mapped)
            buf = torch.frombuffer(mapped, dtype=torch.uint8)
        else:
            buf = torch.empty(end - start, dtype=torch.uint8)
            view = writable_bytes(buf)
            self.storage.readinto(chunk.file, chunk.byte_offset + start, view)
            self._add_read(len(view))
            self._verify(entry, chunk, b0, view)
        src = buf.view(dtype).as_strided(tuple(rel_sizes), strides, first - start // es)
        out.copy_(src)

    def check_box(self, entry: TensorEntry, box: Box) -> None:
        """Check that the files of the chunks ``box`` of ``entry`` touches hold the bytes the manifest declares.

        Call it before allocating for a shape the manifest gives, so a forged shape raises
        ``CorruptCheckpointError`` instead of reserving memory no real file backs."""
        for c in entry.chunks:
            inter = box.intersect(Box(c.offsets, c.sizes))
            if inter is not None and not inter.is_empty():
                self.check_file(c.file, entry.key)

    def read_box(self, entry: TensorEntry, box: Box, out: torch.Tensor, where: str = "") -> None:
        """Fill ``out`` (shape ``box.sizes``) with ``box`` of tensor ``entry``, reading only the byte ranges of the
        chunks it touches. The one way any reader of the format reads one box (``ckpt.open``, ``ckpt reshard``,
        ``ckpt convert``); the load path plans many boxes at once (``ckpt.loading``) and reads them with
        ``read_region`` likewise. Raises ``CorruptCheckpointError`` if the chunks do not cover the box exactly."""
        if tuple(out.shape) != tuple(box.sizes):
            raise ValueError(f"read_box: out has shape {tuple(out.shape)}, the box {box.sizes}")
        self.check_box(entry, box)
        covered = 0
        for c in entry.chunks:
            cb = Box(c.offsets, c.sizes)
            inter = box.intersect(cb)
            if inter is None or inter.is_empty():
                continue
            covered += inter.numel
            rel = inter.relative_to(cb)
            self.read_region(entry, c, rel.offsets, rel.sizes, out[inter.relative_to(box).slices()])
        if covered != box.numel and not box.is_empty():
            raise CorruptCheckpointError(
                f"{where}key {entry.key!r}: stored chunks cover {covered} of the {box.numel} elements of box "
                f"offsets={list(box.offsets)} sizes={list(box.sizes)} (chunks overlap or leave holes)")

    def _read_zstd(self, entry: TensorEntry, chunk: ChunkEntry, dtype: torch.dtype, rel_offsets: tuple[int, ...],
                   rel_sizes: tuple[int, ...], out: torch.Tensor) -> None:
        stored = self.storage.read(chunk.file, chunk.byte_offset, chunk.byte_length)
        self._add_read(len(stored))
        self._verify(entry, chunk, 0, memoryview(stored))
        raw = self._decompress(entry, chunk, stored)
        full = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(chunk.sizes)
        out.copy_(full[tuple(slice(o, o + n) for o, n in zip(rel_offsets, rel_sizes))])

    def _decompress(self, entry: TensorEntry, chunk: ChunkEntry, stored: bytes) -> bytes:
        where = f"{self._where(chunk.file)}, key {entry.key!r}, file bytes [{chunk.byte_offset}, " \
                f"{chunk.byte_offset + chunk.byte_length})"
        return codecs.decompress(stored, chunk.raw_byte_length, where)

    def _add_read(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def verify_chunk(self, entry: TensorEntry, chunk: ChunkEntry) -> None:
        """Re-read every stored byte of ``chunk`` and check every block (``ckpt verify``)."""
        self.check_file(chunk.file, entry.key)
        if chunk.byte_length == 0:
            self._verify(entry, chunk, 0, memoryview(b""))
            return
        step = max(chunk.block_bytes, 1)
        for b, start in enumerate(range(0, chunk.byte_length, step)):
            n = min(step, chunk.byte_length - start)
            data = self.storage.read(chunk.file, chunk.byte_offset + start, n)
            self._add_read(n)
            self._verify(entry, chunk, b, memoryview(data))
        if chunk.codec == "zstd":
            data = self.storage.read(chunk.file, chunk.byte_offset, chunk.byte_length)
            self._decompress(entry, chunk, data)


def read_manifest(storage: Storage) -> Manifest:
    """Read and validate ``manifest.json`` of ``storage``.

    Raises ``CheckpointNotFoundError`` when nothing is there, ``IncompleteCheckpointError`` when data exists but
    the manifest (the commit) does not, ``CorruptCheckpointError`` when it is damaged.
    """
    from ckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError

    from formats.manifest import check_manifest_size

    try:
        check_manifest_size(storage.size(MANIFEST_NAME), f"{storage.url.rstrip('/')}/{MANIFEST_NAME}")
        data = storage.read(MANIFEST_NAME)
    except FileNotFoundError:
        if storage.root_exists():
            raise IncompleteCheckpointError(
                f"{storage.url}: data files exist but {MANIFEST_NAME} does not: this save never committed "
                "(it crashed or is still running). Load an earlier checkpoint; this directory can be deleted."
            ) from None
        raise CheckpointNotFoundError(f"{storage.url}: no checkpoint here (no {MANIFEST_NAME})") from None
    return Manifest.from_json(data, f"{storage.url.rstrip('/')}/{MANIFEST_NAME}")
