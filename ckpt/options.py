"""Options of ``ckpt.save`` and ``ckpt.load`` (validated at construction, STYLE 11)."""

from __future__ import annotations

from dataclasses import dataclass

from formats.checksum import DEFAULT_BLOCK_BYTES
from formats.writer import DEFAULT_MAX_CHUNK_BYTES


@dataclass(frozen=True)
class SaveOptions:
    """How ``ckpt.save`` lays bytes down.

    * ``codec``: ``"raw"`` (default; fast tiers) or ``"zstd"`` (slow tiers; compresses each chunk).
    * ``zstd_level``: zstd level when ``codec="zstd"``.
    * ``block_bytes``: bytes per checksum block; partial reads verify whole blocks, so smaller blocks lower
      read amplification of resharding loads at the cost of a larger manifest.
    * ``max_chunk_bytes``: larger boxes are split into row ranges so writes and reads parallelise.
    * ``files_per_rank``: data files each rank writes in parallel threads.
    """

    codec: str = "raw"
    zstd_level: int = 1
    block_bytes: int = DEFAULT_BLOCK_BYTES
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    files_per_rank: int = 2

    def __post_init__(self) -> None:
        if self.codec not in ("raw", "zstd"):
            raise ValueError(f"SaveOptions.codec={self.codec!r}: expected 'raw' or 'zstd'")
        if self.max_chunk_bytes < 1:
            raise ValueError(f"SaveOptions.max_chunk_bytes={self.max_chunk_bytes}: expected a positive byte count")
        if self.files_per_rank < 1:
            raise ValueError(f"SaveOptions.files_per_rank={self.files_per_rank}: expected at least 1")
        if self.block_bytes <= 0 or self.block_bytes % 16:
            raise ValueError(f"SaveOptions.block_bytes={self.block_bytes}: expected a positive multiple of 16")


@dataclass(frozen=True)
class LoadOptions:
    """How ``ckpt.load`` reads.

    * ``num_threads``: parallel range reads per rank.
    * ``allow_dtype_cast``: when False, a stored dtype that differs from the destination's raises
      ``ShardMismatchError``; when True (default, as DCP does) the copy casts.
    """

    num_threads: int = 4
    allow_dtype_cast: bool = True

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError(f"LoadOptions.num_threads={self.num_threads}: expected at least 1")
