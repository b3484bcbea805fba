"""``LocalStorage``: a checkpoint directory on a local (or mounted) file system.

Chosen by ``open_storage`` for plain paths and ``file://`` URLs. The root directory is created lazily by the
first write, so opening a storage to *read* never creates anything.

Fast paths (why they look the way they do):

* ``write`` hands the caller's buffers straight to ``os.writev`` (no concatenation copy), loops over partial
  writes, then ``fsync``\\ s: a data file is durable when ``write`` returns.
* ``read``/``readinto`` use positional reads (``os.pread``/``os.preadv``) on file descriptors kept in a small,
  thread-safe cache, so the thousands of ranged reads of a resharding load neither reopen the file nor share a
  file position between threads. ``readinto`` fills the caller's preallocated buffer in place.
* ``commit`` writes ``<path>.tmp-<uuid hex>``, fsyncs it, ``os.replace``\\ s it over ``path`` and fsyncs the
  directory: the manifest appears whole or not at all, and survives a power cut once ``commit`` returns.
  ``list`` never reports those tmp files, so a commit interrupted before the rename is invisible.

The helpers every backend shares (byte views, range checks, the truncated and not-found errors, commit tmp
names) live in ``formats.storage.util``.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from ckpt.errors import UnsafeCheckpointError, CorruptCheckpointError, StorageError
from formats.storage.base import Buffer, Storage, StreamWriter, check_relpath
from formats.storage.local_stream import write_with_early_writeback
from formats.storage.util import (as_byte_views, check_confined, check_range, flat_byte_view, is_tmp_name,
                                  not_found_error, not_regular_error, tmp_name, truncated_error)

__all__ = ["LocalStorage", "writev_all"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A data file is opened without following a link in its last part (``write_path`` checks the folders above it).
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _iov_max() -> int:
    """Most buffers one ``os.writev`` call accepts (POSIX IOV_MAX; 1024 on Linux)."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 1024
    return value if value > 0 else 1024


_IOV_MAX: int = _iov_max()
#: Linux moves at most this many bytes per read/write system call; larger requests come back short.
_MAX_IO_BYTES: int = 0x7FFFF000
#: Open read descriptors kept per ``LocalStorage``; least recently used ones are closed beyond this.
DEFAULT_MAX_OPEN_FDS: int = 64

def _root_from_url(url: str) -> str:
    if url[:7].lower() == "file://":
        url = url[len("file://"):]
        if url.startswith("localhost/"):
            url = url[len("localhost"):]
    if not url:
        raise ValueError("LocalStorage: empty root path; pass a directory path or a file:// URL")
    return os.path.abspath(url)


class _FdCache:
    """A bounded, thread-safe LRU of read-only file descriptors keyed by absolute path.

    ``acquire`` pins a descriptor for the duration of one read; an evicted or invalidated descriptor is closed
    only when its last reader lets go, so a thread never reads a descriptor number that was closed (and maybe
    reused for another file) under it. Each use re-``stat``\\ s the path and drops the descriptor if the path now
    names another file (a commit renamed a new manifest over it, another process rewrote it) or nothing.
    """

    def __init__(self, max_open: int) -> None:
        self._max_open = max_open
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, "_FdEntry"] = OrderedDict()

    @contextmanager
    def acquire(self, full_path: str) -> Iterator[int]:
        """Yield an open descriptor of ``full_path``; ``FileNotFoundError`` when the path is missing and
        ``CorruptCheckpointError`` when it is not a regular file (opening a FIFO would block forever)."""
        st = os.stat(full_path)
        _check_regular(full_path, st.st_mode)
        with self._lock:
            entry = self._entries.get(full_path)
            if entry is not None and (entry.dev, entry.ino) != (st.st_dev, st.st_ino):
                self._drop_locked(full_path)
                entry = None
            if entry is not None:
                self._entries.move_to_end(full_path)
                entry.refs += 1
        if entry is None:
            entry = self._open(full_path)
        try:
            yield entry.fd
        finally:
            with self._lock:
                entry.refs -= 1
                if entry.closing and entry.refs == 0:
                    os.close(entry.fd)

    def _open(self, full_path: str) -> "_FdEntry":
        # O_NONBLOCK: if the path became a FIFO since ``acquire``'s stat, the open returns instead of waiting for
        # a writer, and the check below refuses it. Reads of regular files ignore the flag.
        fd = os.open(full_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        try:
            _check_regular(full_path, st.st_mode)
        except CorruptCheckpointError:
            os.close(fd)
            raise
        entry = _FdEntry(fd, st.st_dev, st.st_ino)
        entry.refs = 1
        with self._lock:
            if full_path in self._entries:  # another thread opened it meanwhile: keep theirs cached, ours is private
                entry.closing = True
                return entry
            self._entries[full_path] = entry
            while len(self._entries) > self._max_open:
                self._drop_locked(next(iter(self._entries)))
        return entry

    def invalidate(self, full_path: str) -> None:
        """Forget ``full_path`` (called after this process replaced or deleted it)."""
        with self._lock:
            self._drop_locked(full_path)

    def close_all(self) -> None:
        with self._lock:
            for path in list(self._entries):
                self._drop_locked(path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _drop_locked(self, full_path: str) -> None:
        entry = self._entries.pop(full_path, None)
        if entry is None:
            return
        entry.closing = True
        if entry.refs == 0:
            os.close(entry.fd)


def _check_regular(full_path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", full_path)
    raise not_regular_error(full_path, mode)


class _FdEntry:
    __slots__ = ("fd", "dev", "ino", "refs", "closing")

    def __init__(self, fd: int, dev: int, ino: int) -> None:
        self.fd, self.dev, self.ino = fd, dev, ino
        self.refs = 0
        self.closing = False


class LocalStorage(Storage):
    """A directory on a local file system; see the module docstring for the I/O strategy.

    Built by ``open_storage(path_or_file_url, storage_options)``. ``storage_options`` may hold
    ``max_open_fds`` (int, default ``DEFAULT_MAX_OPEN_FDS``): how many read descriptors to keep open, and
    ``direct_io`` (bool, default True): whether ``open_writer`` streams large pieces with ``O_DIRECT`` where the
    file system allows it (see ``LocalStreamWriter``). Any other key is an error, so a typo is not silently ignored.
    """

    rereads_are_cheap = True

    def __init__(self, url: str, storage_options: "dict[str, Any] | None" = None) -> None:
        opts = dict(storage_options or {})
        max_open_fds = int(opts.pop("max_open_fds", DEFAULT_MAX_OPEN_FDS))
        direct_io = opts.pop("direct_io", True)
        if opts:
            raise ValueError(f"LocalStorage({url!r}): unknown storage_options {sorted(opts)}; "
                             "the local options are 'max_open_fds' and 'direct_io'")
        if not isinstance(direct_io, bool):
            raise ValueError(f"LocalStorage({url!r}): direct_io must be true or false, got {direct_io!r}")
        self.direct_io = direct_io
        if max_open_fds < 1:
            raise ValueError(f"LocalStorage({url!r}): max_open_fds must be >= 1, got {max_open_fds}")
        self.url = url
        self.root: str = _root_from_url(url)
        self._fds = _FdCache(max_open_fds)

    def full_path(self, path: str) -> str:
        """Absolute OS path of the relative storage path ``path`` (validated)."""
        return os.path.join(self.root, *check_relpath(path).split("/"))

    def write_path(self, path: str) -> str:
        """``full_path(path)`` for writing or deleting: refuses when any part of it below the root is a link.

        A save writes and cleans up only inside the checkpoint. Through a ``data`` folder that links elsewhere it
        would write there, and its clean-up of unlisted files would delete the other folder's files. The root
        itself may be a link (a user's ``/scratch`` -> ``/mnt/...``); only what lies below it is checked.
        """
        full = self.full_path(path)
        at = self.root
        for part in check_relpath(path).split("/"):
            at = os.path.join(at, part)
            try:
                st = os.lstat(at)
            except FileNotFoundError:
                break  # the rest does not exist yet: the write creates it as plain folders and a plain file
            except OSError as e:
                raise StorageError(f"checking {at} before writing {full}: {e}") from e
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeCheckpointError(
                    f"{full}: {at} is a symbolic link (to {os.readlink(at)!r}), expected a plain "
                    f"{'file' if at == full else 'folder'}; ckpt never writes or deletes through a link inside a "
                    "checkpoint, so nothing was written. Remove the link, or save to another directory"
                )
        return full

    def check_write_path(self, path: str) -> None:
        self.write_path(path)

    # -- writing -------------------------------------------------------------------------------------------------
    def write(self, path: str, buffers: Sequence[Buffer]) -> int:
        """Write ``buffers`` back to back as the whole of ``path`` and fsync; return the bytes written.

        Called by ``formats.writer`` on every rank, from its write thread pool, once per data file.
        """
        full = self.write_path(path)
        views = as_byte_views(buffers)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            fd = os.open(full, _WRITE_FLAGS, 0o644)
            try:
                written_bytes = write_with_early_writeback(fd, views)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"writing {full}: {e}") from e
        # Same inode (O_TRUNC), so a cached read descriptor stays valid; drop it anyway so nothing depends on that.
        self._fds.invalidate(full)
        return written_bytes

    def open_writer(self, path: str) -> "StreamWriter":
        """Stream ``path`` piece by piece (direct I/O, else early writeback); fsync at ``close``."""
        from formats.storage.local_stream import LocalStreamWriter  # noqa: PLC0415

        return LocalStreamWriter(self, self.write_path(path), direct=self.direct_io)

    def commit(self, path: str, data: bytes) -> None:
        """Atomically publish ``data`` at ``path``: tmp file, fsync, rename over ``path``, fsync the directory.

        Called once per checkpoint by the coordinator, after every rank reported its data files written.
        """
        full = self.write_path(path)
        tmp = tmp_name(full)
        directory = os.path.dirname(full)
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                writev_all(fd, as_byte_views([data]))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, full)
            _fsync_dir(directory)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"committing {full}: {e}") from e
        finally:
            self._fds.invalidate(full)

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of ``path`` from ``offset`` (to the end when None); see ``Storage.read``."""
        full = self.full_path(path)
        check_range(full, offset, length)
        with self._opened(full) as fd:
            file_size = os.fstat(fd).st_size
            if length is None:
                if offset > file_size:
                    raise truncated_error(full, offset, None, file_size)
                length = file_size - offset
            elif offset + length > file_size:  # before allocating: a forged length must not size the buffer
                raise truncated_error(full, offset, length, file_size)
            out = bytearray(length)
            self._preadinto(full, fd, offset, memoryview(out))
        return bytes(out)

    def readinto(self, path: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` in place with bytes of ``path`` from ``offset``; short file -> ``CorruptCheckpointError``.

        Called by ``formats.reader`` with views of preallocated (often pinned) host buffers.
        """
        full = self.full_path(path)
        view = flat_byte_view(out)
        if view.readonly:
            raise TypeError(f"readinto({path!r}): the output buffer is read-only")
        check_range(full, offset, len(view))
        with self._opened(full) as fd:
            self._preadinto(full, fd, offset, view)

    def size(self, path: str) -> int:
        full = self.full_path(path)
        try:
            st = os.stat(full)
            _check_regular(full, st.st_mode)
            return st.st_size
        except FileNotFoundError:
            raise not_found_error(full) from None
        except OSError as e:
            raise StorageError(f"stat {full}: {e}") from e

    def exists(self, path: str) -> bool:
        return os.path.isfile(self.full_path(path))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of the files at or below the folder ``prefix`` (commit tmp files excluded)."""
        folder = prefix.rstrip("/")  # "data/" and "data" name the same folder
        start = self.full_path(folder) if folder else self.root
        if folder and os.path.isfile(start):
            return [check_relpath(folder)]
        found: list[str] = []
        try:
            for dirpath, _dirnames, filenames in os.walk(start, onerror=_raise_walk_error):
                rel_dir = os.path.relpath(dirpath, self.root)
                for name in filenames:
                    if is_tmp_name(name):
                        continue
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    found.append(rel.replace(os.sep, "/"))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"listing {start}: {e}") from e
        return sorted(found)

    # -- removing ------------------------------------------------------------------------------------------------
    def delete(self, paths: Iterable[str]) -> None:
        fulls = [self.write_path(p) for p in paths]  # validate every path before deleting any
        for full in fulls:
            self._fds.invalidate(full)
            try:
                os.unlink(full)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StorageError(f"deleting {full}: {e}") from e
        # Object stores have no folders; here, folders a delete emptied go too (never the root itself), so
        # retention of a step every iteration leaves no empty step_*/data folder behind.
        for parent in sorted({os.path.dirname(f) for f in fulls}, key=len, reverse=True):
            while parent != self.root and parent.startswith(self.root + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break  # not empty (or already gone): stop climbing
                parent = os.path.dirname(parent)

    def root_exists(self) -> bool:
        return os.path.isdir(self.root) and bool(self.list(""))

    def close(self) -> None:
        """Close cached read descriptors. Idempotent; the storage stays usable (descriptors reopen on demand)."""
        self._fds.close_all()

    def invalidate_cached(self, full: str) -> None:
        """Forget the cached read descriptor of the absolute path ``full``, if any.

        Called by this storage after it rewrote, replaced or deleted ``full``, and by ``LocalStreamWriter.close``.
        """
        self._fds.invalidate(full)

    @property
    def open_fd_count(self) -> int:
        """How many read descriptors the cache holds now (for tests and diagnostics)."""
        return len(self._fds)

    # -- helpers -------------------------------------------------------------------------------------------------
    @contextmanager
    def _opened(self, full: str) -> Iterator[int]:
        self._check_confined(full)
        try:
            with self._fds.acquire(full) as fd:
                yield fd
        except FileNotFoundError:
            raise not_found_error(full) from None
        except IsADirectoryError as e:
            raise StorageError(f"reading {full}: it is a directory, expected a file") from e
        except (CorruptCheckpointError, StorageError):
            raise
        except OSError as e:
            raise StorageError(f"reading {full}: {e}") from e

    def _check_confined(self, full: str) -> None:
        """Refuse to read through a symlink that leads outside the checkpoint root."""
        check_confined(full, self.root)

    def _preadinto(self, full: str, fd: int, offset: int, view: memoryview) -> None:
        """Positional reads into ``view`` until full; EOF first means the file is shorter than promised."""
        wanted = len(view)
        done = 0
        while done < wanted:
            chunk = view[done : done + _MAX_IO_BYTES]
            n = os.preadv(fd, [chunk], offset + done) if hasattr(os, "preadv") else _pread_into(fd, chunk, offset + done)
            if n == 0:
                raise truncated_error(full, offset, wanted, os.fstat(fd).st_size)
            done += n


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def writev_all(fd: int, views: list[memoryview]) -> int:
    """``os.writev`` until every byte is written (handles partial writes and the IOV_MAX limit).

    Used by ``LocalStorage`` and by ``formats.storage.local_stream``; it reads ``_IOV_MAX`` and ``_MAX_IO_BYTES``
    of this module at each call.
    """
    total_bytes = sum(len(v) for v in views)
    pending = list(views)
    first = 0  # pending[:first] are fully written; pending[first] may be a partially written remainder
    while first < len(pending):
        batch: list[memoryview] = []
        batch_bytes = 0
        for v in pending[first : first + _IOV_MAX]:
            if batch_bytes + len(v) > _MAX_IO_BYTES:
                if not batch:
                    batch.append(v[:_MAX_IO_BYTES])
                break
            batch.append(v)
            batch_bytes += len(v)
        n = os.writev(fd, batch)
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while n > 0:
            head = pending[first]
            if n >= len(head):
                n -= len(head)
                first += 1
            else:
                pending[first] = head[n:]
                n = 0
    return total_bytes


def _fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync directories
            raise
    finally:
        os.close(fd)


def _raise_walk_error(e: OSError) -> None:
    raise e
