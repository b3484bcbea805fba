"""The one exception hierarchy of the project.

This module is a leaf: every layer (``spec_lang``, ``formats``, ``resharding``, ``ckpt``, ``snapshot_daemon``,
``integrations``) may import it, and ``ckpt`` re-exports every name. It imports nothing of the project.

Every class subclasses ``Exception`` (never ``BaseException``) so that ``except Exception`` in user code and in
collective error handling sees it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "ShardMismatchError",
    "UnsafeCheckpointError",
    "StorageError",
    "SpecError",
    "DistributedCheckpointError",
    "CollectiveTimeoutError",
    "CheckpointExistsError",
    "UnsupportedStateError",
    "DaemonError",
    "DaemonUnavailableError",
    "DaemonBudgetError",
    "DaemonProtocolError",
]


class CheckpointError(Exception):
    """Base class of every error this project raises for something a user or an input can cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing (no manifest and no data) exists at the given path."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write, and overwriting was not allowed."""


class IncompleteCheckpointError(CheckpointError):
    """Data exists at the path but the manifest (the commit) does not: a save that never finished."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes or metadata are damaged, truncated, malicious or inconsistent."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """The input would need code execution (pickle) or escapes the checkpoint directory."""


class ShardMismatchError(CheckpointError):
    """The state being loaded does not match the checkpoint (keys, shapes, dtypes, coverage)."""


class StorageError(CheckpointError):
    """A storage backend failed (I/O error, object store error) while reading or writing."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The state holds something the format cannot store without pickle (the message names the key)."""


class UnknownFormatError(CheckpointError):
    """The path holds no checkpoint of a format ``ckpt convert`` reads; the message lists what was found."""


class FormatNotImplementedError(CheckpointError, NotImplementedError):
    """A recognised format (DeepSpeed, Megatron) whose converter is not implemented yet."""


class SpecError(CheckpointError):
    """A resharding spec is invalid; the message names file, line and column."""


class DistributedCheckpointError(CheckpointError):
    """One or more ranks failed in a collective step; raised identically on every rank.

    ``failures`` maps rank -> the exception text that rank reported.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})


class CollectiveTimeoutError(CheckpointError, TimeoutError):
    """Some ranks of a process group did not reach a ckpt collective within the timeout (a rank-0-only
    ``ckpt.save``, a rank that died or raised outside ckpt); raised on the ranks that did arrive.

    ``op`` names the call and phase, ``missing_ranks`` and ``arrived_ranks`` are group ranks, ``timeout_secs`` the
    limit that expired (``CKPT_COLLECTIVE_TIMEOUT``).
    """

    def __init__(self, message: str, op: str = "", missing_ranks: tuple[int, ...] = (),
                 arrived_ranks: tuple[int, ...] = (), timeout_secs: float | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.missing_ranks = tuple(missing_ranks)
        self.arrived_ranks = tuple(arrived_ranks)
        self.timeout_secs = timeout_secs


class DaemonError(CheckpointError):
    """The per-node snapshot daemon refused a request or could not be reached; the message names the daemon's
    directory and what to do."""


class DaemonUnavailableError(DaemonError):
    """No daemon runs in the directory (never started, stopped, or died)."""


class DaemonBudgetError(DaemonError):
    """A snapshot does not fit in the daemon's memory budget (or ``/dev/shm`` is smaller than the budget); the
    message gives the budget, what is in use and what was asked."""


class DaemonProtocolError(DaemonError):
    """A message to or from the daemon is malformed: bad framing, oversized, not JSON, or failing validation."""


class ErasureCodingError(CheckpointError):
    """An erasure decode or encode cannot proceed: too few shards (the message names the missing ones), shards of
    unequal length, or a bad codec shape."""
