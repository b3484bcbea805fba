"""``MemoryStorage``: files held in a process-global dict, for tests and the in-process host-memory tier.

Chosen by ``open_storage`` for ``memory://name/sub`` URLs. Every ``MemoryStorage`` of the process shares one
dict keyed by the full path (``name/sub/<relative path>``), so two storages opened on the same URL see the same
files, as two handles on one directory would. A single lock guards the dict; values are immutable ``bytes``,
so a reader holding one never sees it change.

Semantics and errors match ``LocalStorage``: a missing file raises ``FileNotFoundError`` naming the full
``memory://`` URL, a read past the end raises ``CorruptCheckpointError``, and ``commit`` replaces the value in
one dict assignment under the lock (atomic by construction).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence

from formats.storage.base import Buffer, Storage, check_relpath
from formats.storage.util import (as_byte_views, check_range, flat_byte_view, is_tmp_name, not_found_error,
                                  truncated_error)

__all__ = ["MemoryStorage", "clear_memory_storage"]

_FILES: dict[str, bytes] = {}
_LOCK = threading.Lock()
_SCHEME = "memory://"


def clear_memory_storage(url: str | None = None) -> None:
    """Drop every file below ``url`` (everything when None). For tests and for freeing a host-memory tier."""
    with _LOCK:
        if url is None:
            _FILES.clear()
            return
        root = _root_from_url(url)
        for key in [k for k in _FILES if k.startswith(root + "/")]:
            del _FILES[key]


def _root_from_url(url: str) -> str:
    if url[: len(_SCHEME)].lower() != _SCHEME:
        raise ValueError(f"MemoryStorage: expected a memory://name URL, got {url!r}")
    root = url[len(_SCHEME):].strip("/")
    if not root:
        raise ValueError(f"MemoryStorage: {url!r} has no name; use memory://<name>[/<sub>]")
    check_relpath(root)  # the same confinement rules as any path inside it
    return root


class MemoryStorage(Storage):
    """Files in process memory; see the module docstring. Takes no ``storage_options`` (a non-empty dict is an
    error, so an option meant for another backend is not silently ignored)."""

    rereads_are_cheap = True

    def __init__(self, url: str, storage_options: "dict[str, Any] | None" = None) -> None:
        if storage_options:
            raise ValueError(f"MemoryStorage({url!r}) takes no storage_options, got {sorted(storage_options)}")
        self.url = url
        self._root: str = _root_from_url(url)

    def _key(self, path: str) -> str:
        return f"{self._root}/{check_relpath(path)}"

    def _where(self, key: str) -> str:
        return _SCHEME + key

    # -- writing -------------------------------------------------------------------------------------------------
    def write(self, path: str, buffers: Sequence[Buffer]) -> int:
        """Store the concatenation of ``buffers`` (one copy, into an immutable ``bytes``) as ``path``."""
        key = self._key(path)
        data = b"".join(as_byte_views(buffers))
        with _LOCK:
            _FILES[key] = data
        return len(data)

    def commit(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` in one assignment under the lock (atomic)."""
        key = self._key(path)
        value = bytes(data)
        with _LOCK:
            _FILES[key] = value

    # -- reading -------------------------------------------------------------------------------------------------
    def _get(self, path: str) -> tuple[str, bytes]:
        key = self._key(path)
        with _LOCK:
            data = _FILES.get(key)
        if data is None:
            raise not_found_error(self._where(key))
        return key, data

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        key, data = self._get(path)
        check_range(self._where(key), offset, length)
        end = len(data) if length is None else offset + length
        if offset > len(data) or end > len(data):
            raise truncated_error(self._where(key), offset, length, len(data))
        if offset == 0 and end == len(data):
            return data
        return data[offset:end]

    def readinto(self, path: str, offset: int, out: memoryview) -> None:
        """Copy straight from the stored bytes into ``out`` (no intermediate ``bytes``)."""
        key, data = self._get(path)
        view = flat_byte_view(out)
        check_range(self._where(key), offset, len(view))
        if offset + len(view) > len(data):
            raise truncated_error(self._where(key), offset, len(view), len(data))
        view[:] = memoryview(data)[offset : offset + len(view)]

    def size(self, path: str) -> int:
        return len(self._get(path)[1])

    def exists(self, path: str) -> bool:
        key = self._key(path)
        with _LOCK:
            return key in _FILES

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths at or below the folder ``prefix``."""
        base = self._root + "/"
        folder = prefix.rstrip("/")  # "data/" and "data" name the same folder
        exact = ""
        if folder:
            exact = self._key(folder)
            base = exact + "/"
        with _LOCK:
            keys = [k for k in _FILES if k.startswith(base) or k == exact]
        cut = len(self._root) + 1
        return sorted(k[cut:] for k in keys if not is_tmp_name(k))

    # -- removing ------------------------------------------------------------------------------------------------
    def delete(self, paths: Iterable[str]) -> None:
        keys = [self._key(p) for p in paths]  # validate every path before deleting any
        with _LOCK:
            for key in keys:
                _FILES.pop(key, None)
