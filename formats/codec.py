"""Per-chunk codecs: ``raw`` (fast tiers) and ``zstd`` (slow tiers, optional).

A ``zstd`` chunk is one zstd frame of the raw row-major bytes. Its checksums cover the *stored* (compressed)
bytes, so corruption is found before decompression runs.

Decoding never trusts a size it has not checked: the frame header's content size must equal the manifest's
``raw_byte_length``, ``raw_byte_length`` may not exceed what zstd can possibly encode in the stored bytes
(``MAX_ZSTD_RATIO``), and the frame is decoded by a streaming decompressor straight into the destination (or in
``DECODE_PIECE_BYTES`` pieces), so memory is the output and nothing more, whatever the frame claims.
"""

from __future__ import annotations

from typing import Iterator

import zstandard

from ckpt.errors import CorruptCheckpointError

CODECS = ("raw", "zstd")

#: The most raw bytes one stored byte of a zstd frame can stand for: zstd's densest block, an RLE block, is a
#: 3-byte header and 1 byte for at most 128 KiB (131072 / 4 = 32768). A chunk of ``n`` stored bytes that claims
#: more than ``n * MAX_ZSTD_RATIO`` raw bytes is forged; checking it costs no I/O. (Zeros compress to this ratio.)
MAX_ZSTD_RATIO = 32768
#: Piece size of a bounded decode (``decode_pieces``): what a verify or a partial read holds at once.
DECODE_PIECE_BYTES = 16 << 20


def compress(data: memoryview, level: int = 1) -> bytes:
    """Compress ``data`` into one zstd frame that records its content size."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def check_ratio(stored_bytes: int, raw_byte_length: int, where: str) -> None:
    """Refuse a zstd chunk of ``stored_bytes`` that claims more raw bytes than any zstd frame of that size holds."""
    if raw_byte_length > stored_bytes * MAX_ZSTD_RATIO:
        raise CorruptCheckpointError(
            f"{where}: a zstd frame of {stored_bytes} bytes cannot decode to the {raw_byte_length} bytes the "
            f"manifest declares (zstd expands at most {MAX_ZSTD_RATIO}x, to {stored_bytes * MAX_ZSTD_RATIO} "
            "bytes); the chunk is damaged or forged")


def check_header(data: "bytes | memoryview", raw_byte_length: int, where: str) -> None:
    """Refuse ``data`` unless it starts a zstd frame whose header declares ``raw_byte_length`` (or no size)."""
    check_ratio(len(data), raw_byte_length, where)
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: not a zstd frame: {e}") from e
    if declared not in (-1, raw_byte_length):  # -1: the header does not say; the decode counts instead
        raise CorruptCheckpointError(
            f"{where}: zstd frame header declares {declared} decompressed bytes, manifest says {raw_byte_length}; "
            "the chunk is damaged or forged"
        )


def _reader(data: "bytes | memoryview") -> "zstandard.ZstdDecompressionReader":
    return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)


def _fill(reader: "zstandard.ZstdDecompressionReader", out: memoryview, where: str) -> int:
    """Decode into ``out`` until it is full or the frame ends; the bytes written."""
    done = 0
    try:
        while done < len(out):
            n = reader.readinto(out[done:])
            if n == 0:
                break
            done += n
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: zstd frame does not decode: {e}") from e
    return done


def _short(where: str, found: int, raw_byte_length: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: zstd frame decodes to {found} bytes, manifest says {raw_byte_length}; the chunk is damaged or "
        "forged; restore it from another tier or use an earlier checkpoint")


def _check_end(reader: "zstandard.ZstdDecompressionReader", raw_byte_length: int, where: str) -> None:
    extra = bytearray(1)
    if _fill(reader, memoryview(extra), where):
        raise CorruptCheckpointError(
            f"{where}: zstd frame decodes to more than the {raw_byte_length} bytes the manifest says; the chunk is "
            "damaged or forged; restore it from another tier or use an earlier checkpoint")


def decompress_into(data: "bytes | memoryview", out: memoryview, where: str) -> None:
    """Decode the frame ``data`` straight into ``out``, which must be exactly its decoded size (else raise)."""
    raw_byte_length = len(out)
    check_header(data, raw_byte_length, where)
    reader = _reader(data)
    found = _fill(reader, out, where)
    if found != raw_byte_length:
        raise _short(where, found, raw_byte_length)
    _check_end(reader, raw_byte_length, where)


def decode_pieces(data: "bytes | memoryview", raw_byte_length: int, where: str,
                  piece_bytes: int = DECODE_PIECE_BYTES) -> Iterator[memoryview]:
    """Decode the frame ``data`` in successive pieces of at most ``piece_bytes`` (each view is valid until the next
    one is asked for); raise unless it decodes to exactly ``raw_byte_length`` bytes. Memory: one piece."""
    check_header(data, raw_byte_length, where)
    reader = _reader(data)
    scratch = memoryview(bytearray(max(1, min(piece_bytes, raw_byte_length))))
    done = 0
    while done < raw_byte_length:
        want = scratch[: min(len(scratch), raw_byte_length - done)]
        n = _fill(reader, want, where)
        if n < len(want):  # before handing out a short piece: a caller never copies bytes of a damaged frame
            raise _short(where, done + n, raw_byte_length)
        yield want
        done += n
    _check_end(reader, raw_byte_length, where)


def verify_frame(data: "bytes | memoryview", raw_byte_length: int, where: str) -> None:
    """Check that ``data`` decodes to exactly ``raw_byte_length`` bytes, holding one piece at a time."""
    for _ in decode_pieces(data, raw_byte_length, where):
        pass
