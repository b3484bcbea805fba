"""Per-chunk codecs: ``raw`` (fast tiers) and ``zstd`` (slow tiers, optional).

A ``zstd`` chunk is one zstd frame of the raw row-major bytes. Its checksums cover the *stored* (compressed)
bytes, so corruption is found before decompression runs.
"""

from __future__ import annotations

import zstandard

from ckpt.errors import CorruptCheckpointError

CODECS = ("raw", "zstd")


def compress(data: memoryview, level: int = 1) -> bytes:
    """Compress ``data`` into one zstd frame that records its content size."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress(data: "bytes | memoryview", raw_byte_length: int, where: str) -> bytes:
    """Decompress one zstd frame that must expand to exactly ``raw_byte_length`` bytes."""
    # zstandard allocates the size a frame header declares and ignores max_output_size then, so a forged
    # header claiming 2**40 bytes would raise MemoryError (or reserve gigabytes) before any size check.
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: not a zstd frame: {e}") from e
    if declared not in (-1, raw_byte_length):  # -1: the header does not say
        raise CorruptCheckpointError(
            f"{where}: zstd frame header declares {declared} decompressed bytes, manifest says {raw_byte_length}; "
            "the chunk is damaged or forged"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_byte_length)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: zstd frame does not decode: {e}") from e
    if len(out) != raw_byte_length:
        raise CorruptCheckpointError(
            f"{where}: zstd frame decodes to {len(out)} bytes, manifest says {raw_byte_length}"
        )
    return out
