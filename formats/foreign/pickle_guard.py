"""A static check of a pickle's imports, run before torch unpickles a DCP ``.metadata`` file.

DCP stores its metadata as a pickle, and ``FileSystemReader.read_metadata`` unpickles it with plain ``pickle``: a
forged file could run any code. ``loads_checked`` unpickles it instead: first ``check_globals`` walks its opcodes
(without executing any) and resolves every name the pickle would import (``GLOBAL``, ``STACK_GLOBAL``, ``INST``); each must
be one of the classes DCP metadata is made of (its dataclasses, ``torch.Size``, dtypes, layouts, paths). A name that
cannot be resolved statically, an extension-registry or persistent-id opcode, or any other import is refused
with ``UnsafeCheckpointError`` naming the file and the import. Only importable constructors of plain data pass, so
unpickling what passes cannot run user code. Callers that trust the file skip the check (``allow_pickle=True``).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._fsspec_filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


def _allowed(module: Any, name: Any) -> bool:
    if not isinstance(module, str) or not isinstance(name, str):
        return False
    if name in _DCP_MODULES.get(module, ()):
        return True
    # dtypes, layouts and memory formats are module-level constants of torch (torch.float32, torch.strided).
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


def check_globals(data: bytes, where: str) -> None:
    """Raise ``UnsafeCheckpointError`` unless every import in the pickle ``data`` is a DCP metadata class."""
    # A model of the values that can name an import: strings pushed by the stream and read back from the memo.
    # Every other push is an opaque None, so an import built any other way does not resolve and is refused.
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                stack.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1] if stack else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg)))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                _check(module, attr, pos, where)
                stack.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                _check(module, attr, pos, where)
                stack.append(None)
            elif name in _REFUSED_OPS:
                raise UnsafeCheckpointError(
                    f"{where}: the pickle uses {name} at byte {pos}, which DCP metadata never does; refusing to "
                    "unpickle it (it could run code). If you trust this checkpoint, pass allow_pickle=True "
                    "(ckpt convert --allow-pickle).")
            else:
                stack.append(None)
    except (ValueError, EOFError) as e:  # pickletools' message for truncated or invalid streams
        raise CorruptCheckpointError(f"{where}: not a valid pickle ({e}); the DCP metadata is damaged") from e


def _check(module: Any, attr: Any, pos: int, where: str) -> None:
    if not _allowed(module, attr):
        what = f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "a name built at run time"
        raise UnsafeCheckpointError(
            f"{where}: the pickle imports {what} (byte {pos}), which DCP metadata never needs; refusing to unpickle "
            "it (it could run code). If you trust this checkpoint, pass allow_pickle=True (ckpt convert "
            "--allow-pickle).")


class _CheckedUnpickler(pickle.Unpickler):
    """Resolves only the names ``check_globals`` allows, and no persistent ids (a second line behind the check)."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"import of {module}.{name} refused")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are refused")


def loads_checked(data: bytes, where: str) -> Any:
    """Unpickle ``data`` after ``check_globals`` passed it, resolving only the names it allows
    (``UnsafeCheckpointError`` otherwise; ``CorruptCheckpointError`` for a damaged stream).

    The bytes checked are the bytes unpickled: a file read once cannot be swapped between check and load.
    """
    check_globals(data, where)
    try:
        return _CheckedUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - whatever the constructors of plain data raised: the pickle is damaged
        raise CorruptCheckpointError(f"{where}: cannot be unpickled ({type(e).__name__}: {e})") from e


def refused_import(e: pickle.UnpicklingError) -> str:
    """What torch's ``weights_only`` loader refused, from its error: the import (``GLOBAL x.y``) or its reason."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return m.group(1)
    lines = [ln.strip() for ln in text.strip().splitlines()]
    return next((ln for ln in lines if "Unsupported" in ln or "unrecognized" in ln), lines[0] if lines else "?")[:300]
