"""The storage interface every backend implements.

A ``Storage`` is rooted at a directory or object-store prefix and addresses files by *relative* POSIX paths
(``data/r00000-0.bin``). Paths are confined to the root: absolute paths, ``..`` components, backslashes and
empty components are rejected with ``UnsafeCheckpointError`` before any I/O.

Callers: ``formats.writer`` (every rank, in parallel, during a save), ``formats.reader`` (every rank during a
load), and the coordinator's commit. Methods are thread-safe: the executor calls them from a thread pool.

Commit semantics (``commit``): the bytes become visible under ``path`` all at once or not at all. Local
filesystems use write-tmp + fsync + rename (+ fsync of the directory); object stores PUT the object last and a
reader treats its absence as "incomplete".
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

from ckpt.errors import UnsafeCheckpointError

Buffer = "bytes | bytearray | memoryview"


def check_relpath(path: str) -> str:
    """Return ``path`` normalised, or raise ``UnsafeCheckpointError`` if it could escape the root.

    Called by every backend method and by the manifest validator on every file name it contains.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeCheckpointError(f"storage path {path!r}: expected a non-empty relative path")
    if "\\" in path or "\x00" in path:
        raise UnsafeCheckpointError(f"storage path {path!r}: backslashes and NUL bytes are not allowed")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafeCheckpointError(f"storage path {path!r}: absolute paths are not allowed inside a checkpoint")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeCheckpointError(
            f"storage path {path!r}: '..', '.' and empty components are not allowed (it must stay inside the checkpoint)"
        )
    return posixpath.normpath(path)


class Storage(ABC):
    """A small byte-store interface chosen by URL scheme (see ``formats.storage.open_storage``)."""

    #: The URL or path this storage is rooted at, for messages.
    url: str
    #: A second read of bytes just read costs no I/O (local files, which the first read leaves in the page cache;
    #: process memory). ``ckpt.load`` then verifies every byte it will copy before writing any, instead of keeping
    #: an undo copy of what it overwrites (docs/loading.md). False for object stores, where it would read twice.
    rereads_are_cheap: bool = False

    # -- writing -------------------------------------------------------------------------------------------------
    @abstractmethod
    def write(self, path: str, buffers: Sequence[Buffer]) -> int:
        """Write the concatenation of ``buffers`` as the whole content of ``path``; return bytes written.

        The file is durable (fsync'd where that means something) when this returns. Parent folders are created.
        Not atomic: use ``commit`` for the file whose presence means "done".
        """

    def open_writer(self, path: str) -> "StreamWriter":
        """A writer that receives ``path``'s content piece by piece, for producers whose bytes become ready over
        time (a snapshot's chunks as their copies finish). ``close()`` makes the file durable like ``write``.

        The default collects the pieces and calls ``write`` at ``close``; backends that can stream override it.
        """
        return _BufferingWriter(self, path)

    @abstractmethod
    def commit(self, path: str, data: bytes) -> None:
        """Atomically publish ``data`` at ``path`` (replace if present). Writing the manifest is the commit."""

    # -- reading -------------------------------------------------------------------------------------------------
    @abstractmethod
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of ``path`` from ``offset`` (to the end when ``length`` is None).

        Raises ``FileNotFoundError`` naming the path when it is missing, and ``CorruptCheckpointError`` when
        fewer than ``length`` bytes exist (a truncated file).
        """

    def readinto(self, path: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` (a writable byte view) with bytes of ``path`` from ``offset``.

        The default reads then copies; backends with positional reads override it to read in place.
        """
        data = self.read(path, offset, len(out))
        out[: len(data)] = data

    def view(self, path: str, offset: int, length: int) -> "memoryview | None":
        """``length`` bytes of ``path`` from ``offset`` without a copy, where the storage is memory this process can
        map (the snapshot daemon's segments); None where it is not (files, object stores), and the reader then
        reads into a buffer. The view is writable only in this process (a private mapping): writing through it
        never changes the stored bytes. Raises like ``read`` when the file is shorter than ``offset + length``."""
        return None

    @abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes of ``path``; ``FileNotFoundError`` naming the path when missing."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every file below ``prefix`` (relative paths, sorted). A missing prefix lists nothing."""

    # -- removing ------------------------------------------------------------------------------------------------
    @abstractmethod
    def delete(self, paths: Iterable[str]) -> None:
        """Delete files; missing ones are ignored."""

    def check_write_path(self, path: str) -> None:
        """Raise ``UnsafeCheckpointError`` if writing ``path`` would go through a link (local file systems; an
        object store has none, so only the path itself is validated). Writes and deletes check this themselves;
        a caller about to open a child storage below ``path`` checks it first."""
        check_relpath(path)

    def root_exists(self) -> bool:
        """Whether anything at all is stored under the root."""
        return bool(self.list(""))

    def close(self) -> None:
        """Release clients and pools. Idempotent."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class StreamWriter:
    """Returned by ``Storage.open_writer``. Not thread-safe: one producer thread writes one file.

    The base class owns the file position: ``size_bytes`` is where the next byte goes (padding included). A
    subclass calls ``StreamWriter.__init__``, and its ``write`` advances ``size_bytes`` by the bytes it appended.
    """

    def __init__(self) -> None:
        #: Bytes in the file so far, padding included: the offset the next byte goes to.
        self.size_bytes: int = 0

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        """Append ``data`` right after the previous bytes and advance ``size_bytes`` by its length."""
        raise NotImplementedError

    def append(self, data: "bytes | bytearray | memoryview") -> int:
        """Append ``data`` and return the file offset where it starts.

        Unlike ``write``, a writer may leave padding before ``data`` (the direct-I/O writer overrides this to align
        large pieces so they go to disk without a copy); readers use only the byte ranges they were given. The
        default writes back to back, at ``size_bytes``.
        """
        offset = self.size_bytes
        self.write(data)
        return offset

    def close(self) -> int:
        """Finish the file (durable when this returns); return its size in bytes."""
        raise NotImplementedError

    def abort(self) -> None:
        """Give up; the partial file may remain (it is unreferenced and removed by the next commit)."""


class _BufferingWriter(StreamWriter):
    def __init__(self, storage: Storage, path: str) -> None:
        super().__init__()
        check_relpath(path)
        self.storage, self.path = storage, path
        self.pieces: list[memoryview] = []

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        view = memoryview(data)
        self.pieces.append(view)
        self.size_bytes += view.nbytes

    def close(self) -> int:
        return self.storage.write(self.path, self.pieces)

    def abort(self) -> None:
        self.pieces = []
