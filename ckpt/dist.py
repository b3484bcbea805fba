"""Collectives that carry errors (STYLE 8).

``DistWrapper`` wraps an optional process group. Each distributed step runs a function on every rank, catches
its exception, gathers the outcomes, and raises the same error on every rank, naming each failing rank; so one
rank's failure never leaves the others hanging in the next collective. Without a process group (or with world
size 1) every collective is the identity.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from ckpt.errors import CheckpointError, DistributedCheckpointError

T = TypeVar("T")


class _Failure:
    """An exception as it travels between ranks: its class (if a ckpt error) and its text."""

    def __init__(self, exc: BaseException) -> None:
        self.cls = _portable_class(type(exc)) if isinstance(exc, CheckpointError) else None
        self.text = f"{type(exc).__name__}: {exc}"
        self.trace = "".join(traceback.format_exception(exc))


def _portable_class(cls: type) -> type | None:
    """``cls`` or its nearest ``CheckpointError`` base that pickles by reference.

    A failure travels by ``all_gather_object``; a class defined inside a function cannot be pickled, and a
    pickling error raised on one rank before the collective would leave every other rank waiting in it.
    """
    for c in cls.__mro__:
        if isinstance(c, type) and issubclass(c, CheckpointError):
            try:
                pickle.dumps(c)
            except Exception:  # noqa: BLE001 - any pickling failure: try the next base
                continue
            return c
    return None


class DistWrapper:
    """Who calls it: ``ckpt.save``/``ckpt.load`` and the readers, on every rank of ``group``, in the same order."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.coordinator = 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    def all_gather(self, obj: T) -> list[T]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """``obj`` as the coordinator has it."""
        if self.world_size == 1:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group, self.coordinator) if self.group is not None else self.coordinator
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def raise_if_any(self, outcomes: list[Any], phase: str, local_exc: BaseException | None = None) -> None:
        """Raise on every rank if any rank's outcome is a failure.

        When every failing rank raised the same ``CheckpointError`` subclass, that class is raised everywhere (so
        ``except ShardMismatchError`` works on every rank); otherwise ``DistributedCheckpointError``.
        """
        failures = {r: o for r, o in enumerate(outcomes) if isinstance(o, _Failure)}
        if not failures:
            return
        lines = "\n".join(f"  rank {r}: {f.text}" for r, f in sorted(failures.items()))
        msg = f"{phase} failed on {len(failures)} of {self.world_size} rank(s):\n{lines}"
        classes = {f.cls for f in failures.values()}
        cls = classes.pop() if len(classes) == 1 else None
        err: Exception = DistributedCheckpointError(msg)
        if cls is not None:
            try:
                err = cls(msg)
            except Exception:  # noqa: BLE001 - a subclass with an unusual constructor
                pass
        err.failures = {r: f.text for r, f in failures.items()}  # type: ignore[attr-defined]
        raise err from local_exc

    def run(self, phase: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if any rank fails, raise the same error on all of them."""
        if self.world_size == 1:
            return fn()
        local_exc: BaseException | None = None
        try:
            result: Any = fn()
            outcome: Any = None
        except Exception as e:  # noqa: BLE001 - carried to every rank, re-raised below
            result, outcome, local_exc = None, _Failure(e), e
        self.raise_if_any(self.all_gather(outcome), phase, local_exc)
        return result

    def map_reduce(self, phase: str, map_fn: Callable[[], T], reduce_fn: Callable[[list[T]], list[Any]]) -> Any:
        """Every rank maps; the coordinator reduces the gathered results to one value per rank; each gets its own.

        Failures in ``map_fn`` or ``reduce_fn`` are raised on every rank.
        """
        if self.world_size == 1:
            return reduce_fn([map_fn()])[0]
        local = self.run(phase, map_fn)
        gathered = self.all_gather(local)
        reduced: Any = None
        local_exc: BaseException | None = None
        if self.is_coordinator:
            try:
                reduced = reduce_fn(gathered)
            except Exception as e:  # noqa: BLE001
                reduced, local_exc = _Failure(e), e
        reduced = self.broadcast(reduced)
        if isinstance(reduced, _Failure):
            self.raise_if_any([reduced] + [None] * (self.world_size - 1), phase, local_exc)
        return reduced[self.rank]
