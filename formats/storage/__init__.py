"""Storage backends chosen by URL scheme.

``open_storage(url, storage_options)`` returns a ``Storage`` rooted at ``url``:

* a plain path or ``file://`` URL -> ``LocalStorage`` (positional reads into preallocated buffers, fsync'd
  sequential writes, tmp + fsync + rename commits);
* ``memory://name`` -> ``MemoryStorage`` (process-local, for tests and the host-memory tier);
* any other scheme fsspec knows (``s3://``, ``gs://``, ...) -> ``FsspecStorage`` (manifest-last commits).

Other layers register extra schemes with ``register_scheme`` (the snapshot daemon's client registers its own),
which keeps imports pointing down the layer graph.
"""

from __future__ import annotations

from typing import Any, Callable

from formats.storage.base import Storage, check_relpath

StorageFactory = Callable[[str, "dict[str, Any] | None"], Storage]

_SCHEMES: dict[str, StorageFactory] = {}


def register_scheme(scheme: str, factory: StorageFactory) -> None:
    """Make ``open_storage`` build ``factory(url, storage_options)`` for URLs starting with ``scheme://``."""
    _SCHEMES[scheme] = factory


def split_scheme(url: str) -> tuple[str, str]:
    """``"s3://b/p" -> ("s3", "b/p")``; a plain path has scheme ``"file"``."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme.lower(), rest
    return "file", url


def open_storage(url: "str | Storage", storage_options: "dict[str, Any] | None" = None) -> Storage:
    """Return a ``Storage`` rooted at ``url``. A ``Storage`` passed in is returned unchanged."""
    if isinstance(url, Storage):
        return url
    url = str(url)
    scheme, _ = split_scheme(url)
    if scheme in _SCHEMES:
        return _SCHEMES[scheme](url, storage_options)
    if scheme == "file":
        from formats.storage.local import LocalStorage

        return LocalStorage(url, storage_options)
    if scheme == "memory":
        from formats.storage.memory import MemoryStorage

        return MemoryStorage(url, storage_options)
    from formats.storage.fsspec_backend import FsspecStorage

    return FsspecStorage(url, storage_options)


__all__ = ["Storage", "check_relpath", "open_storage", "register_scheme", "split_scheme"]
