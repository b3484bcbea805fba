"""ckpt: checkpointing and fault tolerance for distributed PyTorch training.

Public API (the contract): ``save``, ``load``, ``open`` and the exception hierarchy. Heavy submodules load on
first use, so that the leaf ``ckpt.errors`` can be imported by every layer without import cycles.
"""

from __future__ import annotations

from typing import Any

from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    UnsupportedStateError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    CollectiveTimeoutError,
    IncompleteCheckpointError,
    ShardMismatchError,
    SpecError,
    StorageError,
    UnsafeCheckpointError,
    UnknownFormatError,
    FormatNotImplementedError,
    DaemonError,
    DaemonUnavailableError,
    DaemonBudgetError,
    DaemonProtocolError,
    ErasureCodingError,
)

__version__ = "0.1.0"

_LAZY = {
    "save": ("ckpt.saving", "save"),
    "SaveResult": ("ckpt.saving", "SaveResult"),
    "load": ("ckpt.loading", "load"),
    "LoadReport": ("ckpt.loading", "LoadReport"),
    "open": ("ckpt.reader", "open"),
    "CheckpointReader": ("ckpt.reader", "CheckpointReader"),
    "SaveOptions": ("ckpt.options", "SaveOptions"),
    "LoadOptions": ("ckpt.options", "LoadOptions"),
    "Stateful": ("ckpt.stateful", "Stateful"),
    "Checkpointer": ("ckpt.checkpointer", "Checkpointer"),
    "SnapshotHandle": ("ckpt.checkpointer", "SnapshotHandle"),
    "SnapshotMetrics": ("ckpt.checkpointer", "SnapshotMetrics"),
    "TierError": ("ckpt.checkpointer", "TierError"),
    "RNGState": ("ckpt.rng", "RNGState"),
    "EveryNSteps": ("ckpt.policies", "EveryNSteps"),
    "KeepLatestN": ("ckpt.policies", "KeepLatestN"),
    "KeepEveryN": ("ckpt.policies", "KeepEveryN"),
    "AnyOf": ("ckpt.policies", "AnyOf"),
}

__all__ = [
    "save", "load", "LoadReport", "open", "CheckpointReader", "Checkpointer", "SnapshotHandle", "SnapshotMetrics", "TierError",
    "RNGState", "EveryNSteps", "KeepLatestN", "KeepEveryN", "AnyOf", "SaveOptions", "LoadOptions", "SaveResult", "Stateful",
    "CheckpointError", "CheckpointNotFoundError", "IncompleteCheckpointError", "CorruptCheckpointError",
    "ShardMismatchError", "UnsafeCheckpointError", "StorageError", "SpecError", "DistributedCheckpointError",
    "CollectiveTimeoutError", "CheckpointExistsError", "UnsupportedStateError", "UnknownFormatError", "FormatNotImplementedError",
    "DaemonError", "DaemonUnavailableError", "DaemonBudgetError", "DaemonProtocolError", "ErasureCodingError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
