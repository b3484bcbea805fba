"""Streaming writes for ``LocalStorage``: early writeback (``sync_file_range``) and a piece-by-piece writer.

Kept apart from ``local.py`` so that module stays about one concern (paths, descriptors, reads, commits).
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING, Any

from ckpt.errors import StorageError
from formats.storage.base import StreamWriter
from formats.storage.util import as_byte_views

if TYPE_CHECKING:
    from formats.storage.local import LocalStorage


def _writev_all(fd: int, views: list[memoryview]) -> int:
    # ``local`` imports this module at its top, so its writer is looked up at call time.
    from formats.storage.local import writev_all  # noqa: PLC0415

    return writev_all(fd, views)


def _views(data: "bytes | bytearray | memoryview") -> list[memoryview]:
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


DIRECT_ALIGN_BYTES = 4096
#: Pieces at least this large go to disk straight from the caller's memory with ``O_DIRECT``; smaller ones are
#: copied through the writer's aligned buffer (cheap, and it keeps small tensors back to back).
DIRECT_MIN_BYTES = 1 << 20
DIRECT_BUFFER_BYTES = 8 << 20
#: One ``pwrite`` at most (aligned, below Linux's 0x7ffff000 cap).
_DIRECT_MAX_IO_BYTES = 1 << 30
_ZEROS = bytes(DIRECT_ALIGN_BYTES)


def _address(view: memoryview) -> int:
    import numpy as np  # noqa: PLC0415 - only the direct path needs it

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view[:_DIRECT_MAX_IO_BYTES], offset)
        if n <= 0 or n % DIRECT_ALIGN_BYTES and n != len(view):
            raise OSError(errno.EIO, f"direct write of {len(view)} bytes at {offset} wrote {n}")
        view, offset = view[n:], offset + n


class LocalStreamWriter(StreamWriter):
    """Appends pieces to a new file; fsync on close.

    With ``direct=True`` (the default of ``LocalStorage.open_writer``) the file is opened with ``O_DIRECT`` where
    the file system allows it. Large pieces then go from the caller's memory to the disk without a page-cache copy:
    ``append`` places each one at a file offset congruent to its memory address modulo 4 KiB (leaving up to 4 KiB of
    padding), so its aligned middle is written in place and only its unaligned head and tail pass through a small
    aligned buffer. On the developers' 2-core VM a buffered 1 GiB write slowed a concurrent training iteration by
    0.3-0.7 s (the kernel's copy into the page cache competes for the cores); a direct one by about nothing, and it
    wrote at 2.4 instead of 0.9 GB/s. File systems that refuse ``O_DIRECT`` (tmpfs) get the buffered path, which
    starts writeback every ``WRITEBACK_PIECE_BYTES`` instead.
    """

    def __init__(self, storage: LocalStorage, full: str, direct: bool = True) -> None:
        super().__init__()  # size_bytes: the logical end, where the next byte goes
        self.storage, self.full = storage, full
        self._unsynced_from = 0
        self.direct = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            self.fd: int | None = None
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self.fd = os.open(full, flags | os.O_DIRECT, 0o644)
                    self.direct = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
            if self.fd is None:
                self.fd = os.open(full, flags, 0o644)
        except OSError as e:
            raise StorageError(f"writing {full}: {e}") from e
        if self.direct:
            self._buf = mmap.mmap(-1, DIRECT_BUFFER_BYTES)  # page-aligned
            self._buf_start = 0  # file offset of _buf[0]; always a multiple of DIRECT_ALIGN_BYTES
            self._buf_len = 0

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        assert self.fd is not None, "write after close"
        try:
            if self.direct:
                for v in _views(data):
                    self._copy_in(v)
                return
            self.size_bytes += _writev_all(self.fd, _views(data))
            if _sync_file_range is not None and self.size_bytes - self._unsynced_from >= WRITEBACK_PIECE_BYTES:
                _sync_file_range(self.fd, self._unsynced_from, self.size_bytes - self._unsynced_from,
                                 _SYNC_FILE_RANGE_WRITE)
                self._unsynced_from = self.size_bytes
        except OSError as e:
            raise StorageError(f"writing {self.full}: {e}") from e

    def append(self, data: "bytes | bytearray | memoryview") -> int:
        views = _views(data)
        if not self.direct or len(views) != 1 or len(views[0]) < DIRECT_MIN_BYTES:
            return super().append(data)
        assert self.fd is not None, "write after close"
        v = views[0]
        a = DIRECT_ALIGN_BYTES
        try:
            self._copy_in(memoryview(_ZEROS)[: (_address(v) - self.size_bytes) % a])
            offset = self.size_bytes  # == the address of v modulo a
            head = -offset % a
            self._copy_in(v[:head])
            self._flush_buffer()  # the buffer now ends on a block boundary: it empties
            middle = (len(v) - head) // a * a
            _pwrite_all(self.fd, v[head : head + middle], self.size_bytes)
            self.size_bytes += middle
            self._buf_start = self.size_bytes
            self._copy_in(v[head + middle :])
        except OSError as e:
            raise StorageError(f"writing {self.full}: {e}") from e
        return offset

    def _copy_in(self, v: memoryview) -> None:
        """Append bytes through the aligned buffer, writing it out whenever it fills."""
        while len(v):
            take = min(len(v), DIRECT_BUFFER_BYTES - self._buf_len)
            self._buf[self._buf_len : self._buf_len + take] = v[:take]
            self._buf_len += take
            self.size_bytes += take
            v = v[take:]
            if self._buf_len == DIRECT_BUFFER_BYTES:
                self._flush_buffer()

    def _flush_buffer(self, final: bool = False) -> None:
        """Write the buffer's whole blocks (all of it, zero-padded to a block, when ``final``); keep the rest."""
        assert self.fd is not None
        a = DIRECT_ALIGN_BYTES
        whole = self._buf_len // a * a
        rest = self._buf_len - whole
        if final and rest:
            self._buf[self._buf_len : whole + a] = _ZEROS[: whole + a - self._buf_len]
            whole, rest = whole + a, 0
        if whole:
            _pwrite_all(self.fd, memoryview(self._buf)[:whole], self._buf_start)
        if rest:
            self._buf[:rest] = self._buf[whole : whole + rest]
        self._buf_start += whole
        self._buf_len = rest

    def close(self) -> int:
        if self.fd is None:
            return self.size_bytes
        try:
            if self.direct:
                self._flush_buffer(final=True)
                os.ftruncate(self.fd, self.size_bytes)  # drop the last block's zero padding
            os.fsync(self.fd)
        except OSError as e:
            raise StorageError(f"writing {self.full}: {e}") from e
        finally:
            os.close(self.fd)
            self.fd = None
            if self.direct:
                self._buf.close()
            self.storage.invalidate_cached(self.full)
        return self.size_bytes

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.direct:
                self._buf.close()
