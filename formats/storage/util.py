"""Helpers every storage backend shares, so each rule is written once.

``local``, ``local_stream``, ``memory`` and ``fsspec_backend`` import them from here (none imports another
backend for them):

* ``as_byte_views``: the one place that turns the caller's buffers into flat byte views, without copying;
* ``flat_byte_view``: the same for the one output buffer of a ``readinto``;
* ``check_range``: the one check of a requested byte range;
* ``truncated_error`` / ``not_found_error``: the one wording of "shorter than the read needs" and of
  "no such file";
* ``tmp_name`` / ``is_tmp_name``: commit tmp files, which ``list`` never reports;
* ``kind_of`` / ``not_regular_error``: the one wording of "this is a FIFO (device, socket...), not a file";
* ``check_confined``: the one check that a path does not resolve outside its checkpoint directory (local
  storage and every reader of ``formats.foreign`` use it).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from typing import Sequence

from ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from formats.storage.base import Buffer

__all__ = ["as_byte_views", "check_confined", "check_range", "flat_byte_view", "is_tmp_name", "kind_of",
           "not_found_error", "not_regular_error", "tmp_name", "truncated_error"]

_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")


def tmp_name(path: str) -> str:
    """The name a commit of ``path`` writes before renaming it: ``<path>.tmp-<uuid4 hex>``."""
    return f"{path}.tmp-{uuid.uuid4().hex}"


def is_tmp_name(path: str) -> bool:
    """Whether ``path`` is a commit's temporary file (which ``list`` must never report)."""
    return _TMP_RE.search(path) is not None


def as_byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """Flat, C-contiguous ``uint8`` views of ``buffers`` without copying; zero-length buffers are dropped.

    Accepts anything with the buffer protocol (bytes, bytearray, memoryviews of numpy arrays or of
    ``tensor.numpy()``); a non-contiguous buffer raises ``TypeError`` naming its position, because writing
    it would need a hidden copy the caller should make explicitly.
    """
    views: list[memoryview] = []
    for i, buf in enumerate(buffers):
        view = buf if isinstance(buf, memoryview) else memoryview(buf)  # type: ignore[arg-type]
        if view.format != "B" or view.ndim != 1 or view.itemsize != 1:
            if not view.c_contiguous:
                raise TypeError(f"buffer {i} ({view.format!r}, shape {view.shape}) is not C-contiguous; "
                                "pass a contiguous copy")
            view = view.cast("B")
        elif not view.c_contiguous:  # a strided 1-D byte view, e.g. b[::2]
            raise TypeError(f"buffer {i} is a strided byte view; pass a contiguous copy")
        if len(view):
            views.append(view)
    return views


def flat_byte_view(out: "memoryview | bytearray") -> memoryview:
    """``out`` (the destination of a ``readinto``) as a flat byte view over the same memory."""
    view = out if isinstance(out, memoryview) else memoryview(out)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def check_range(where: str, offset: int, length: int | None) -> None:
    """``ValueError`` naming ``where`` unless ``offset`` (and ``length`` when given) are non-negative."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"{where}: invalid byte range offset={offset} length={length}")


def truncated_error(where: str, offset: int, wanted_bytes: int | None, file_size: int) -> CorruptCheckpointError:
    """The error every backend raises when a file is shorter than a read needs."""
    wanted = "bytes to the end" if wanted_bytes is None else f"{wanted_bytes} bytes"
    return CorruptCheckpointError(
        f"{where}: truncated: wanted {wanted} at offset {offset} but the file has {file_size} bytes "
        f"(only {max(file_size - offset, 0)} available there); the file was cut short or replaced: "
        "re-save the checkpoint or restore this file from another tier"
    )


def not_found_error(where: str, what: str = "file") -> FileNotFoundError:
    """The ``FileNotFoundError`` a backend raises for a missing ``what`` (``file``, ``object``), naming ``where``."""
    return FileNotFoundError(errno.ENOENT, f"no such {what} in checkpoint storage", where)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words, for messages."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular_error(path: str, mode: int, what: str = "a file") -> CorruptCheckpointError:
    """The error for a FIFO, device, socket or directory where ``what`` (a regular file) was expected; raised
    before anything opens it (opening a FIFO blocks until a writer comes, forever)."""
    return CorruptCheckpointError(f"{path}: is {kind_of(mode)}, expected a regular file ({what}); a checkpoint "
                                  "holds only regular files, so it is not opened. Replace it with the real file.")


def check_confined(path: str, root: str) -> str:
    """``path`` resolved, if it lies inside ``root`` (resolved); ``UnsafeCheckpointError`` naming both otherwise."""
    real = os.path.realpath(path)
    top = os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise UnsafeCheckpointError(f"{path}: resolves to {real}, outside the checkpoint root {top} (a symlink?); "
                                    "refusing to read it. Copy the real file into the checkpoint (cp -L) if you "
                                    "trust it.")
    return real
