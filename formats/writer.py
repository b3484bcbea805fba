"""Execution of one rank's write plan: tensors -> data file bytes + chunk entries.

Called by ``ckpt`` on every rank after the global plan assigned it its boxes. Pure of planning: it receives
``ChunkWrite`` items (which box of which key, and a CPU tensor holding exactly that box) and returns the manifest
chunk entries describing where the bytes went.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from formats import checksum, codec as codecs
from formats.manifest import ChunkEntry
from formats.storage.base import Storage
from formats.tensor_bytes import as_bytes


@dataclass(frozen=True)
class ChunkWrite:
    """One box of one logical tensor, and the tensor that holds exactly its elements (any device/layout)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


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


def _encode(item: ChunkWrite, opts: WriteOptions) -> tuple[memoryview, int, int, tuple[str, ...], str]:
    """-> (stored bytes, raw length, block bytes, checksums, codec) for one item."""
    raw = as_bytes(_host_contiguous(item.data))
    if opts.codec == "zstd" and len(raw) > 0:
        stored = memoryview(codecs.compress(raw, opts.zstd_level))
        block = max(len(stored), 1)
        return stored, len(raw), block, (checksum.digest(stored),), "zstd"
    return raw, len(raw), opts.block_bytes, tuple(checksum.block_digests(raw, opts.block_bytes)), "raw"


def write_file(storage: Storage, path: str, items: list[ChunkWrite], opts: WriteOptions,
               ready: Callable[[ChunkWrite], None] | None = None) -> tuple[int, list[tuple[str, ChunkEntry]]]:
    """Write ``items`` back to back into ``path``; return (file size in bytes, [(key, chunk entry)]).

    Without ``ready`` every item's data is final: one vectored write. With ``ready``, ``ready(item)`` blocks until
    that item's data is final (a snapshot still being staged), and each item streams to storage as soon as it is.
    """
    entries: list[tuple[str, ChunkEntry]] = []
    offset = 0
    if ready is None:
        buffers: list[memoryview] = []
        for item in items:
            stored, raw_len, block, sums, codec = _encode(item, opts)
            entries.append((item.key, ChunkEntry(item.offsets, item.sizes, path, offset, len(stored), codec, raw_len,
                                                 block, sums)))
            buffers.append(stored)
            offset += len(stored)
        storage.write(path, buffers)
        return offset, entries
    writer = storage.open_writer(path)
    try:
        for item in items:
            ready(item)
            stored, raw_len, block, sums, codec = _encode(item, opts)
            at = writer.append(stored)
            entries.append((item.key, ChunkEntry(item.offsets, item.sizes, path, at, len(stored), codec, raw_len,
                                                 block, sums)))
        offset = writer.close()
    except BaseException:
        writer.abort()
        raise
    return offset, entries


def split_into_files(items: list[ChunkWrite], num_files: int) -> list[list[ChunkWrite]]:
    """Greedy, largest first: spread items over at most ``num_files`` groups of similar byte counts."""
    groups: list[list[ChunkWrite]] = [[] for _ in range(max(1, min(num_files, len(items))))]
    loads = [0] * len(groups)
    for item in sorted(items, key=lambda i: -i.nbytes):
        g = loads.index(min(loads))
        groups[g].append(item)
        loads[g] += item.nbytes
    return [g for g in groups if g]


def write_items(storage: Storage, file_prefix: str, items: list[ChunkWrite], opts: WriteOptions,
                ready: Callable[[ChunkWrite], None] | None = None) -> tuple[dict[str, int], list[tuple[str, ChunkEntry]]]:
    """Write one rank's items into ``{file_prefix}-{i}.bin`` files in parallel threads.

    Returns ({file path: size in bytes}, [(key, chunk entry)]). Called on every rank during a save.
    """
    groups = split_into_files(items, opts.num_files)
    sizes: dict[str, int] = {}
    entries: list[tuple[str, ChunkEntry]] = []
    if not groups:
        return sizes, entries
    paths = [f"{file_prefix}-{i}.bin" for i in range(len(groups))]
    if len(groups) == 1:
        results = [write_file(storage, paths[0], groups[0], opts, ready)]
    else:
        with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="ckpt-write") as pool:
            results = list(pool.map(lambda pg: write_file(storage, pg[0], pg[1], opts, ready), zip(paths, groups)))
    for path, (size, ents) in zip(paths, results):
        sizes[path] = size
        entries.extend(ents)
    return sizes, entries
