"""Streaming writes for ``LocalStorage``: early writeback (``sync_file_range``) and a piece-by-piece writer.

Kept apart from ``local.py`` so that module stays about one concern (paths, descriptors, reads, commits).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ckpt.errors import StorageError
from formats.storage.base import StreamWriter

if TYPE_CHECKING:
    from formats.storage.local import LocalStorage


def _writev_all(fd: int, views: list[memoryview]) -> int:
    from formats.storage import local

    return local._writev_all(fd, views)


def _views(data: "bytes | bytearray | memoryview") -> list[memoryview]:
    from formats.storage.local import as_byte_views

    return as_byte_views([data])


WRITEBACK_PIECE_BYTES = 16 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None. Python's ``os`` does not expose it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def write_with_early_writeback(fd: int, views: list[memoryview]) -> int:
    """Write in pieces of ``WRITEBACK_PIECE_BYTES`` and start each piece's writeback at once.

    Without it the kernel starts writing back only under memory pressure or at the final ``fsync``, so the copy
    into the page cache and the disk I/O run one after the other. ``SYNC_FILE_RANGE_WRITE`` does not wait; the
    final ``fsync`` still gives durability. Measured on the developers' VM: about 1.3x faster saves of 1 GiB.
    """
    if _sync_file_range is None:
        return _writev_all(fd, views)
    total = 0
    piece: list[memoryview] = []
    piece_bytes = 0
    for v in views:
        while len(v):
            take = min(len(v), WRITEBACK_PIECE_BYTES - piece_bytes)
            piece.append(v[:take])
            piece_bytes += take
            v = v[take:]
            if piece_bytes == WRITEBACK_PIECE_BYTES:
                n = _writev_all(fd, piece)
                _sync_file_range(fd, total, n, _SYNC_FILE_RANGE_WRITE)
                total += n
                piece, piece_bytes = [], 0
    if piece:
        total += _writev_all(fd, piece)
    return total


class LocalStreamWriter(StreamWriter):
    """Appends pieces to a new file, starting writeback every ``WRITEBACK_PIECE_BYTES``; fsync on close."""

    def __init__(self, storage: LocalStorage, full: str) -> None:
        self.storage, self.full = storage, full
        self.size_bytes = 0
        self._unsynced_from = 0
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            self.fd: int | None = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise StorageError(f"writing {full}: {e}") from e

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        assert self.fd is not None, "write after close"
        try:
            self.size_bytes += _writev_all(self.fd, _views(data))
            if _sync_file_range is not None and self.size_bytes - self._unsynced_from >= WRITEBACK_PIECE_BYTES:
                _sync_file_range(self.fd, self._unsynced_from, self.size_bytes - self._unsynced_from,
                                 _SYNC_FILE_RANGE_WRITE)
                self._unsynced_from = self.size_bytes
        except OSError as e:
            raise StorageError(f"writing {self.full}: {e}") from e

    def close(self) -> int:
        if self.fd is None:
            return self.size_bytes
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise StorageError(f"writing {self.full}: {e}") from e
        finally:
            os.close(self.fd)
            self.fd = None
            self.storage._fds.invalidate(self.full)
        return self.size_bytes

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
