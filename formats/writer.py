"""Execution of one rank's write plan: write items -> data file bytes + chunk entries.

The one executor of the universal format's write pipeline (plan -> items -> execute -> commit): ``ckpt.save``, the
Checkpointer's tiers, ``ckpt reshard`` / the Megatron import and ``ckpt convert --to universal`` all hand it
``WriteItem`` objects and commit what it returns with ``formats.commit``. Pure of planning: an item says which box
of which key it is and what it costs (``nbytes``); its bytes exist only once the executor asks for them
(``materialize()``), as torchsnapshot's stagers state their cost up front, so a writer holds about one item per
file in memory when the items are lazy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from formats import checksum, codec as codecs
from formats.manifest import ChunkEntry
from formats.storage.base import Storage
from formats.tensor_bytes import as_bytes


#: Largest chunk written: bigger boxes are split into row ranges (``ckpt.SaveOptions.max_chunk_bytes``, ``ckpt
#: reshard``, ``ckpt convert``), so a reader of part of a tensor reads at most about this much more than it needs.
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20


class WriteItem(Protocol):
    """One box (``offsets``, ``sizes``) of logical tensor ``key`` for ``write_file``.

    ``nbytes`` is known when the item is planned. ``materialize()`` gives a tensor holding exactly the box's
    elements; the executor calls it when it reaches the item, from its writer thread, and it may block (a staging
    copy still running) or read (a source checkpoint). ``release()`` follows once the bytes are written. ``final``
    says the data is already in memory and ``materialize()`` returns at once, so the executor may gather every item
    of a file into one vectored write."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...

    @property
    def final(self) -> bool: ...

    def materialize(self) -> torch.Tensor: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class ChunkWrite:
    """A ``WriteItem`` over a tensor that holds exactly its elements (any device/layout). ``until``, when given,
    blocks until that tensor's bytes are final (a snapshot region still being staged)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: torch.Tensor
    until: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def final(self) -> bool:
        return self.until is None

    def materialize(self) -> torch.Tensor:
        if self.until is not None:
            self.until()
        return self.data

    def release(self) -> None:
        """Nothing to free: the tensor belongs to the caller."""


@dataclass(frozen=True)
class WriteOptions:
    """How bytes are laid down. ``codec`` is ``raw`` or ``zstd``; ``num_files`` files are written in parallel."""

    codec: str = "raw"
    zstd_level: int = 1
    block_bytes: int = checksum.DEFAULT_BLOCK_BYTES
    num_files: int = 2

    def __post_init__(self) -> None:
        if self.codec not in codecs.CODECS:
            raise ValueError(f"WriteOptions.codec={self.codec!r}: expected one of {list(codecs.CODECS)}")
        if self.block_bytes <= 0 or self.block_bytes % 16:
            raise ValueError(f"WriteOptions.block_bytes={self.block_bytes}: expected a positive multiple of 16")
        if self.num_files < 1:
            raise ValueError(f"WriteOptions.num_files={self.num_files}: expected at least 1")


def _host_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def _encode(data: torch.Tensor, opts: WriteOptions) -> tuple[memoryview, int, int, tuple[str, ...], str]:
    """-> (stored bytes, raw length, block bytes, checksums, codec) for one item's data."""
    raw = as_bytes(_host_contiguous(data))
    if opts.codec == "zstd" and len(raw) > 0:
        stored = memoryview(codecs.compress(raw, opts.zstd_level))
        block = max(len(stored), 1)
        return stored, len(raw), block, (checksum.digest(stored),), "zstd"
    return raw, len(raw), opts.block_bytes, tuple(checksum.block_digests(raw, opts.block_bytes)), "raw"


def write_file(storage: Storage, path: str, items: "list[WriteItem]", opts: WriteOptions,
               progress: Callable[[int], None] | None = None) -> tuple[int, list[tuple[str, ChunkEntry]]]:
    """Write ``items`` back to back into ``path``; return (file size in bytes, [(key, chunk entry)]).

    When every item is ``final``, one vectored write. Otherwise each item is materialized when the writer reaches
    it and streams to storage at once, then is released. ``progress(nbytes)`` follows each item written.
    """
    entries: list[tuple[str, ChunkEntry]] = []
    offset = 0
    if all(item.final for item in items):
        buffers: list[memoryview] = []
        for item in items:
            stored, raw_len, block, sums, codec = _encode(item.materialize(), opts)
            entries.append((item.key, ChunkEntry(item.offsets, item.sizes, path, offset, len(stored), codec, raw_len,
                                                 block, sums)))
            buffers.append(stored)
            offset += len(stored)
        storage.write(path, buffers)
        for item in items:
            item.release()
            if progress is not None:
                progress(item.nbytes)
        return offset, entries
    writer = storage.open_writer(path)
    try:
        for item in items:
            stored, raw_len, block, sums, codec = _encode(item.materialize(), opts)
            at = writer.append(stored)
            entries.append((item.key, ChunkEntry(item.offsets, item.sizes, path, at, len(stored), codec, raw_len,
                                                 block, sums)))
            del stored
            item.release()
            if progress is not None:
                progress(item.nbytes)
        offset = writer.close()
    except BaseException:
        writer.abort()
        raise
    return offset, entries


def split_into_files(items: "list[WriteItem]", num_files: int) -> "list[list[WriteItem]]":
    """Greedy, largest first: spread items over at most ``num_files`` groups of similar byte counts."""
    groups: list[list[WriteItem]] = [[] for _ in range(max(1, min(num_files, len(items))))]
    loads = [0] * len(groups)
    for item in sorted(items, key=lambda i: -i.nbytes):
        g = loads.index(min(loads))
        groups[g].append(item)
        loads[g] += item.nbytes
    return [g for g in groups if g]


def write_items(storage: Storage, file_prefix: str, items: "list[WriteItem]", opts: WriteOptions,
                progress: Callable[[int], None] | None = None
                ) -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
    """Write one rank's items into ``{file_prefix}-{i}.bin`` files (``opts.num_files``) in parallel threads.

    Returns ({file path: size in bytes}, [(key, chunk entry)]): what ``formats.commit.build_manifest`` takes, per
    rank. Called on every rank during a save, from the thread that flushes.
    """
    groups = split_into_files(items, opts.num_files)
    return write_groups(storage, [f"{file_prefix}-{i}.bin" for i in range(len(groups))], groups, opts, progress,
                        len(groups))


def write_groups(storage: Storage, paths: list[str], groups: "list[list[WriteItem]]", opts: WriteOptions,
                 progress: Callable[[int], None] | None = None, workers: int = 1
                 ) -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
    """Write ``groups[i]`` into ``paths[i]``, ``workers`` files at a time; returns what ``write_items`` does."""
    sizes: dict[str, int] = {}
    entries: list[tuple[str, ChunkEntry]] = []
    if not groups:
        return sizes, entries
    if len(groups) == 1 or workers <= 1:
        results = [write_file(storage, p, g, opts, progress) for p, g in zip(paths, groups)]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(groups)), thread_name_prefix="ckpt-write") as pool:
            results = list(pool.map(lambda pg: write_file(storage, pg[0], pg[1], opts, progress), zip(paths, groups)))
    for path, (size, ents) in zip(paths, results):
        sizes[path] = size
        entries.extend(ents)
    return sizes, entries
