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
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_byte_length)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: zstd frame does not decode: {e}") from e
    if len(out) != raw_byte_length:
        raise CorruptCheckpointError(
            f"{where}: zstd frame decodes to {len(out)} bytes, manifest says {raw_byte_length}"
        )
    return out
