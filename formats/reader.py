"""Reading chunk bytes back: byte ranges, block checksums, copies into destination tensors.

``ChunkReader`` executes read items that a planner produced: "copy the part ``rel`` of chunk ``c`` of tensor
``key`` into ``out``". It reads only the checksum blocks that part touches, verifies each of them, and never
trusts a size it has not checked against the file (a truncated file raises before any tensor is touched).
Callers: ``ckpt`` load and ``ckpt.open`` readers, from a thread pool; methods are thread-safe.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import xxhash

from ckpt.errors import CorruptCheckpointError, ShardMismatchError
from formats import checksum, codec as codecs
from formats.box import Box, flat_range_to_boxes, row_major_strides
from formats.dtypes import can_convert, dtype_from_name, itemsize
from formats.manifest import MANIFEST_NAME, ChunkEntry, Manifest, TensorEntry, check_manifest_size
from formats.storage.base import Storage
from formats.tensor_bytes import writable_bytes

#: The most bytes a read holds beyond what it returns (block slack of a partial read, a verify's scratch): blocks
#: larger than this (a manifest may declare one block of a whole 64 GiB sparse file) are hashed in pieces.
SCAN_PIECE_BYTES = 16 << 20


class ChunkReader:
    """Reads regions of chunks of one committed checkpoint."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self._checked_files: set[str] = set()
        self._verified: set[tuple[str, int, int, int]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's scratch buffer, reused across reads
        #: Bytes fetched from storage so far (read amplification = bytes_read / bytes needed).
        self.bytes_read = 0
        #: Bytes read by ``verify_in_place`` to check them before a load writes (a second pass over local files).
        self.bytes_checked = 0

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

    def _mismatch(self, entry: TensorEntry, chunk: ChunkEntry, b: int, expected: str,
                  found: str) -> CorruptCheckpointError:
        start = chunk.byte_offset + b * chunk.block_bytes
        end = min(start + chunk.block_bytes, chunk.byte_offset + chunk.byte_length)
        return CorruptCheckpointError(
            f"{self._where(chunk.file)}: checksum mismatch in key {entry.key!r}, chunk at offsets "
            f"{list(chunk.offsets)}, file bytes [{start}, {end}): expected xxh3_64 {expected}, found {found}. "
            "The file is damaged; restore it from another tier or use an earlier checkpoint."
        )

    def _verify(self, entry: TensorEntry, chunk: ChunkEntry, first_block: int, data: memoryview) -> None:
        """Verify the blocks of ``data`` that start at block ``first_block`` of ``chunk``."""
        block = chunk.block_bytes
        for i in range(0, max(len(data), 1), block):
            b = first_block + i // block
            found = checksum.digest(data[i : i + block])
            expected = chunk.checksums[b]
            if found != expected:
                raise self._mismatch(entry, chunk, b, expected, found)
            if len(data) == 0:
                break

    def _scan(self, entry: TensorEntry, chunk: ChunkEntry, start: int, end: int,
              keep: "memoryview | None" = None, keep_lo: int = 0, checking: bool = False) -> None:
        """Read and verify the stored bytes ``[start, end)`` of ``chunk`` (``start`` at a block boundary, ``end`` at
        one or at the chunk's end), holding at most ``SCAN_PIECE_BYTES`` besides ``keep``: the bytes
        ``[keep_lo, keep_lo + len(keep))`` are read straight into ``keep``, the rest into a reused scratch buffer,
        and a block larger than a piece is hashed incrementally. Used where the blocks are much larger than what
        the caller needs (partial reads of huge blocks), by ``verify_chunk`` and by ``verify_in_place``."""
        block = chunk.block_bytes
        keep_hi = keep_lo + (len(keep) if keep is not None else 0)
        scratch: memoryview | None = None
        hasher = None
        pos = start
        while pos < end:
            if keep is not None and keep_lo <= pos < keep_hi:
                nxt = min(keep_hi, end)
                view = keep[pos - keep_lo : nxt - keep_lo]
            else:
                limit = keep_lo if keep is not None and pos < keep_lo else end
                nxt = min(limit, pos + SCAN_PIECE_BYTES)
                if scratch is None:
                    scratch = self._scratch()
                view = scratch[: nxt - pos]
            self.storage.readinto(chunk.file, chunk.byte_offset + pos, view)
            self._add_read(len(view), checking)
            i = 0
            while i < len(view):  # hash the blocks this piece holds, whole ones in one call
                b, r = divmod(pos + i, block)
                bend = min((b + 1) * block, chunk.byte_length)
                take = min(len(view) - i, bend - pos - i)
                if r == 0 and take == bend - pos - i:
                    self._verify(entry, chunk, b, view[i : i + take])
                else:
                    if hasher is None:
                        hasher = xxhash.xxh3_64()
                    hasher.update(view[i : i + take])
                    if pos + i + take == bend:
                        found, hasher = hasher.hexdigest(), None
                        if found != chunk.checksums[b]:
                            raise self._mismatch(entry, chunk, b, chunk.checksums[b], found)
                i += take
            pos = nxt

    def _scratch(self) -> memoryview:
        """This thread's ``SCAN_PIECE_BYTES`` scratch buffer, allocated once: fresh memory costs page faults every
        time (on some virtual machines far more than the reads it holds)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None:
            buf = self._local.scratch = memoryview(bytearray(SCAN_PIECE_BYTES))
        return buf

    def _check_cast(self, entry: TensorEntry, dtype: torch.dtype, out: torch.Tensor) -> None:
        if out.dtype != dtype and not can_convert(dtype, out.dtype):
            raise ShardMismatchError(
                f"{self._where('')}key {entry.key!r}: stored as {entry.dtype}, which torch cannot convert to the "
                f"requested {str(out.dtype).replace('torch.', '')}; load it into a {entry.dtype} tensor")

    def _check_region(self, entry: TensorEntry, chunk: ChunkEntry, rel_sizes: tuple[int, ...],
                      out: torch.Tensor) -> "torch.dtype | None":
        """What a region read checks before reading anything: ``out``'s shape and dtype, the data file's size. The
        stored dtype, or None for an empty region (nothing to read)."""
        dtype = dtype_from_name(entry.dtype, entry.key)
        if tuple(out.shape) != tuple(rel_sizes):
            raise ValueError(f"read_region: out has shape {tuple(out.shape)}, region has {rel_sizes}")
        if math.prod(rel_sizes) == 0:
            return None
        self._check_cast(entry, dtype, out)
        self.check_file(chunk.file, entry.key)
        return dtype

    def _raw_span(self, entry: TensorEntry, chunk: ChunkEntry, rel_offsets: tuple[int, ...],
                  rel_sizes: tuple[int, ...], out: torch.Tensor) -> "tuple[Any, ...] | None":
        """``_check_region``, then for a raw chunk the element size, chunk strides, first and last element and the
        stored byte span ``[start, end)`` (whole checksum blocks) the region touches; None for an empty region."""
        dtype = self._check_region(entry, chunk, rel_sizes, out)
        if dtype is None:
            return None
        es = itemsize(dtype)
        strides = row_major_strides(chunk.sizes)
        first = sum(o * s for o, s in zip(rel_offsets, strides))
        last = sum((o + n - 1) * s for o, n, s in zip(rel_offsets, rel_sizes, strides))
        start = (first * es) // chunk.block_bytes * chunk.block_bytes
        end = min(-(-((last + 1) * es) // chunk.block_bytes) * chunk.block_bytes, chunk.byte_length)
        return dtype, es, strides, first, last, start, end

    def _mapped(self, chunk: ChunkEntry, es: int, start: int, end: int) -> "memoryview | None":
        """The stored bytes ``[start, end)`` of a raw chunk where the storage maps them (daemon segments), else None."""
        if chunk.codec == "zstd" or (chunk.byte_offset + start) % es:
            return None
        return self.storage.view(chunk.file, chunk.byte_offset + start, end - start)

    def verify_in_place(self, entry: TensorEntry, chunk: ChunkEntry, rel_offsets: tuple[int, ...],
                        rel_sizes: tuple[int, ...], out: torch.Tensor) -> bool:
        """Verify the stored bytes that ``read_region`` of the same arguments will copy, without writing ``out``:
        where the storage maps them (daemon segments), in place; where a second read is cheap
        (``Storage.rereads_are_cheap``: local files, memory), by reading them through this thread's scratch
        buffer. False (nothing verified) for compressed chunks and other storages. ``ckpt.load`` verifies every
        region this way first, so a damaged checkpoint never reaches the caller's tensors. Each block span is
        verified once, however many regions share it."""
        span = self._raw_span(entry, chunk, rel_offsets, rel_sizes, out)
        if span is None:
            return True
        if chunk.codec == "zstd":
            return False
        _, es, _, _, _, start, end = span
        done = (chunk.file, chunk.byte_offset, start, end)
        if done in self._verified:
            return True
        mapped = self._mapped(chunk, es, start, end)
        if mapped is not None:
            self._verify(entry, chunk, start // chunk.block_bytes, mapped)
        elif self.storage.rereads_are_cheap:
            self._scan(entry, chunk, start, end, checking=True)
        else:
            return False
        with self._lock:
            self._verified.add(done)
        return True

    def read_region(self, entry: TensorEntry, chunk: ChunkEntry, rel_offsets: tuple[int, ...],
                    rel_sizes: tuple[int, ...], out: torch.Tensor, verified: bool = False) -> None:
        """Copy the box ``rel_offsets/rel_sizes`` (relative to ``chunk``) of tensor ``entry`` into ``out``.

        ``out`` must have shape ``rel_sizes``; it may have another dtype (``copy_`` casts; a conversion torch
        lacks, such as from ``float4_e2m1fn_x2``, raises ``ShardMismatchError``) or device. Memory beyond ``out``
        is bounded by the bytes the region spans in the chunk (plus ``SCAN_PIECE_BYTES``), however large the
        manifest declares the chunk's checksum blocks. ``verified``: ``verify_in_place`` returned True for these
        arguments, so mapped bytes (which cannot change: sealed segments) are copied without hashing them again;
        bytes read again from files are verified again, so a file changed since is still caught.
        """
        whole = tuple(rel_offsets) == tuple(0 for _ in rel_offsets) and tuple(rel_sizes) == chunk.sizes
        if chunk.codec == "zstd":
            zdtype = self._check_region(entry, chunk, rel_sizes, out)
            if zdtype is not None:
                self._read_zstd(entry, chunk, zdtype, rel_offsets, rel_sizes, out, whole)
            return
        span = self._raw_span(entry, chunk, rel_offsets, rel_sizes, out)
        if span is None:
            return
        dtype, es, strides, first, last, start, end = span
        b0 = start // chunk.block_bytes
        # Memory a storage maps (daemon segments): verify the stored bytes where they are, then one copy_.
        mapped = self._mapped(chunk, es, start, end)
        if mapped is None and whole and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            # Zero-copy fast path: read straight into the destination and verify it there (``ckpt.load`` keeps
            # what it overwrites and puts it back if the load fails).
            view = writable_bytes(out)
            self.storage.readinto(chunk.file, chunk.byte_offset, view)
            self._add_read(len(view))
            self._verify(entry, chunk, 0, view)
            return
        lo, hi = first * es, (last + 1) * es
        if mapped is not None:
            self._add_read(len(mapped))
            if not verified:
                self._verify(entry, chunk, b0, mapped)
            buf = torch.frombuffer(mapped, dtype=torch.uint8)
            base = start
        elif (end - start) - (hi - lo) > SCAN_PIECE_BYTES:
            # Blocks far larger than the region (one checksum block over a huge file): keep only the bytes the
            # region spans and hash the rest in pieces, instead of allocating whole blocks.
            buf = torch.empty(hi - lo, dtype=torch.uint8)
            self._scan(entry, chunk, start, end, writable_bytes(buf), lo)
            base = lo
        else:
            buf = torch.empty(end - start, dtype=torch.uint8)
            view = writable_bytes(buf)
            self.storage.readinto(chunk.file, chunk.byte_offset + start, view)
            self._add_read(len(view))
            self._verify(entry, chunk, b0, view)
            base = start
        src = buf.view(dtype).as_strided(tuple(rel_sizes), strides, first - base // es)
        out.copy_(src)

    def check_box(self, entry: TensorEntry, box: Box) -> None:
        """Check that the files of the chunks ``box`` of ``entry`` touches hold the bytes the manifest declares,
        and that no compressed chunk among them claims more raw bytes than its stored bytes can decode to.

        Call it before allocating for a shape the manifest gives, so a forged shape raises
        ``CorruptCheckpointError`` instead of reserving memory no real file backs."""
        for c in entry.chunks:
            inter = box.intersect(Box(c.offsets, c.sizes))
            if inter is not None and not inter.is_empty():
                self.check_file(c.file, entry.key)
                if c.codec == "zstd":
                    codecs.check_ratio(c.byte_length, c.raw_byte_length, self._chunk_where(entry, c))

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

    def _chunk_where(self, entry: TensorEntry, chunk: ChunkEntry) -> str:
        return f"{self._where(chunk.file)}, key {entry.key!r}, file bytes [{chunk.byte_offset}, " \
               f"{chunk.byte_offset + chunk.byte_length})"

    def _read_stored(self, entry: TensorEntry, chunk: ChunkEntry) -> bytes:
        """The verified stored bytes of a compressed chunk (one block; the file's real size is checked first)."""
        where = self._chunk_where(entry, chunk)
        codecs.check_ratio(chunk.byte_length, chunk.raw_byte_length, where)  # no I/O: refuse a bomb before reading
        stored = self.storage.read(chunk.file, chunk.byte_offset, chunk.byte_length)
        self._add_read(len(stored))
        self._verify(entry, chunk, 0, memoryview(stored))
        return stored

    def _read_zstd(self, entry: TensorEntry, chunk: ChunkEntry, dtype: torch.dtype, rel_offsets: tuple[int, ...],
                   rel_sizes: tuple[int, ...], out: torch.Tensor, whole: bool) -> None:
        """Decode a zstd chunk into ``out``: straight into its bytes when it is the whole chunk in a contiguous CPU
        tensor of the stored dtype, else in ``DECODE_PIECE_BYTES`` pieces, each copied where ``out`` wants it.
        Memory beyond ``out``: the stored bytes and one piece, whatever the frame claims."""
        stored = self._read_stored(entry, chunk)
        where = self._chunk_where(entry, chunk)
        if whole and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            codecs.decompress_into(stored, writable_bytes(out), where)
            return
        es = itemsize(dtype)
        strides = row_major_strides(chunk.sizes)
        region = Box(tuple(rel_offsets), tuple(rel_sizes))
        pos = 0  # element index of the piece's first element in the chunk
        for piece in codecs.decode_pieces(stored, chunk.raw_byte_length, where,
                                          max(es, codecs.DECODE_PIECE_BYTES // es * es)):
            n = len(piece) // es
            src = torch.frombuffer(piece, dtype=torch.uint8).view(dtype)
            for piece_box in flat_range_to_boxes(chunk.sizes, pos, pos + n):
                inter = region.intersect(piece_box)
                if inter is None or inter.is_empty():
                    continue
                at = sum(o * s for o, s in zip(inter.offsets, strides)) - pos
                out[inter.relative_to(region).slices()].copy_(src.as_strided(inter.sizes, strides, at))
            pos += n

    def _add_read(self, n: int, checking: bool = False) -> None:
        with self._lock:
            if checking:
                self.bytes_checked += n
            else:
                self.bytes_read += n

    def verify_chunk(self, entry: TensorEntry, chunk: ChunkEntry) -> None:
        """Re-read every stored byte of ``chunk`` and check every block (``ckpt verify``); a compressed chunk must
        also decode to exactly its declared size. Memory: ``SCAN_PIECE_BYTES`` (plus a compressed chunk's stored
        bytes and one decoded piece), whatever the manifest declares."""
        self.check_file(chunk.file, entry.key)
        if chunk.codec == "zstd":
            stored = self._read_stored(entry, chunk)
            codecs.verify_frame(stored, chunk.raw_byte_length, self._chunk_where(entry, chunk))
            return
        if chunk.byte_length == 0:
            self._verify(entry, chunk, 0, memoryview(b""))
            return
        self._scan(entry, chunk, 0, chunk.byte_length)


def read_manifest(storage: Storage) -> Manifest:
    """Read and validate ``manifest.json`` of ``storage``.

    Where it is missing, the error says what the path is instead (``formats.foreign.detect.no_manifest_error``):
    ``CheckpointNotFoundError`` when nothing is there, ``IncompleteCheckpointError`` when only data files of a save
    that never committed are, ``UnknownFormatError`` for a Checkpointer root, a directory of checkpoints, a foreign
    format or a single file. ``CorruptCheckpointError`` when the manifest is damaged.
    """
    from ckpt.errors import StorageError

    where = f"{storage.url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        check_manifest_size(storage.size(MANIFEST_NAME), where)  # before reading: an 8 GB manifest is not read
        data = storage.read(MANIFEST_NAME)
    except FileNotFoundError:
        raise _no_manifest(storage) from None
    except StorageError as e:
        if not isinstance(e.__cause__, NotADirectoryError):  # a file where the checkpoint directory should be
            raise
        raise _no_manifest(storage) from None
    return Manifest.from_json(data, where)


def _no_manifest(storage: Storage) -> Exception:
    from formats.foreign.detect import no_manifest_error  # noqa: PLC0415 - the foreign adapters import this module

    return no_manifest_error(storage)
