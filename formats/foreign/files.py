"""How every reader of ``formats.foreign`` opens the files of a checkpoint someone else wrote.

Three rules, the ones ``formats.storage.local`` applies to the universal format:

* Only regular files are opened. A FIFO, a device, a socket or a directory where a file is expected raises
  ``CorruptCheckpointError`` naming the path and what it is, before anything opens it (opening a FIFO blocks until
  a writer comes, forever; reading a device never ends). ``regular_size`` checks with ``stat``; ``read_small``
  opens with ``O_NONBLOCK`` and checks the open file itself, so nothing swapped in between is read.
* Files of a checkpoint directory stay inside it: a data file that resolves (through a symlink) outside the
  directory raises ``UnsafeCheckpointError`` naming the path and where it resolves (``check_confined``).
* Side files parsed as JSON (``config.json``, ``model.safetensors.index.json``) are read only up to a size cap and
  parsed without raw ``RecursionError``/``ValueError`` escaping (``read_json``).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from ckpt.errors import CorruptCheckpointError
from formats.manifest import reject_constant, unique_keys
from formats.storage.util import check_confined, kind_of, not_regular_error  # noqa: F401 (re-exported)

#: The largest JSON side file read (an index of a million tensors is about 100 MB).
MAX_JSON_BYTES = 256 * 2**20


def exists(path: str) -> bool:
    """Whether anything (of any kind, a dangling link excepted) is at ``path``."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def regular_size(path: str, what: str = "a file") -> int:
    """The size of the regular file at ``path`` (following links); ``CorruptCheckpointError`` for anything else.

    ``FileNotFoundError`` propagates: callers say what a missing file means."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot stat it ({e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise not_regular_error(path, st.st_mode, what)
    return st.st_size


def is_regular(path: str, what: str = "a file") -> bool:
    """``os.path.isfile`` that refuses instead of skipping: False where nothing is, True for a regular file, and
    ``CorruptCheckpointError`` for a FIFO, device, socket or directory at ``path``."""
    try:
        regular_size(path, what)
    except FileNotFoundError:
        return False
    return True


def read_small(path: str, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole regular file ``path`` of at most ``limit`` bytes, opened without blocking (a FIFO never hangs).

    ``FileNotFoundError`` propagates; anything not a regular file or over ``limit`` raises
    ``CorruptCheckpointError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except IsADirectoryError:
        raise CorruptCheckpointError(f"{path}: expected {what} (a regular file), found a directory") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot open {what} ({e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular_error(path, st.st_mode, what)
        if st.st_size > limit:
            raise CorruptCheckpointError(f"{path}: {what} is {st.st_size} bytes, more than the {limit} read; "
                                         "it is not what this format writes")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(st.st_size + 1)  # what the file holds (never ``limit``: that would be allocated)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot read {what} ({e})") from e
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise CorruptCheckpointError(f"{path}: {what} grew while read; read it again when nothing writes it")
    return data


def read_json(path: str, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """``read_small`` parsed as strict JSON (no duplicate keys, no NaN); ``CorruptCheckpointError`` naming the
    file for invalid or too deeply nested JSON."""
    data = read_small(path, what, limit)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: {what} is nested too deeply to parse; it is not what this format "
                                     "writes") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: {what} is not valid JSON ({e})") from e
