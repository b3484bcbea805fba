"""Collectives that carry errors (STYLE 8).

``DistWrapper`` wraps an optional process group. Each distributed step runs a function on every rank, catches
its exception, gathers the outcomes, and raises the same error on every rank, naming each failing rank; so one
rank's failure never leaves the others hanging in the next collective. Without a process group (or with world
size 1) every collective is the identity.

Every collective also has a timeout (``CKPT_COLLECTIVE_TIMEOUT`` seconds, default 600; ``0`` disables it). Before
it, each rank records its arrival in the default process group's c10d store (``_Arrivals``); a rank that waits
longer than the timeout for the others raises ``CollectiveTimeoutError`` naming the ranks that never arrived
(a ``ckpt.save`` called under ``if rank == 0:``, a rank that died), instead of hanging in the collective forever.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import threading
import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from ckpt.errors import CheckpointError, CollectiveTimeoutError, DistributedCheckpointError

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


#: Environment variable giving the collective timeout in seconds (``0``, ``off`` or ``none``: no timeout).
TIMEOUT_ENV = "CKPT_COLLECTIVE_TIMEOUT"
#: The timeout when neither the caller nor the environment gives one. It bounds the skew between ranks at one
#: collective (one rank writing a much larger shard than the others counts), not the length of a save.
DEFAULT_TIMEOUT_SECS = 600.0


def collective_timeout_secs(value: float | None = None) -> float | None:
    """``value`` if given, else ``$CKPT_COLLECTIVE_TIMEOUT``, else ``DEFAULT_TIMEOUT_SECS``; None: no timeout."""
    if value is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_SECS
        if raw.lower() in ("0", "off", "none"):
            return None
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0 or value != value or value == float("inf"):
            raise CheckpointError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds (or 0/off/none "
                                  f"for no timeout); unset it for the default of {DEFAULT_TIMEOUT_SECS:g} s")
        return value
    if value <= 0:
        return None
    return float(value)


def _group_key(group: Any) -> str:
    """A name of ``group`` that every member agrees on (the store keys of its arrivals live under it)."""
    from torch.distributed import distributed_c10d as c10d  # noqa: PLC0415

    pg = group if group is not None else c10d._get_default_group()
    return str(c10d._get_process_group_name(pg))


def _calling_api() -> str:
    """The outermost project function on this thread's stack (``ckpt.save``, ``Checkpointer.restore``, ...): what
    every rank must call. Only used to word an error."""
    f = sys._getframe(1)
    found = ""
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod.split(".")[0] in ("ckpt", "snapshot_daemon", "integrations") and mod != __name__:
            qual = getattr(f.f_code, "co_qualname", f.f_code.co_name)
            found = f"ckpt.{qual}" if mod in ("ckpt.saving", "ckpt.loading", "ckpt.reader") else qual
        f = f.f_back  # type: ignore[assignment]
    return found


_LOCAL = threading.local()


def _thread_store(store: Any) -> Any:
    """This thread's own client of ``store``. A TCPStore client serialises its requests, so a wait of one thread
    (a tier's flush thread, for its gloo group) would hold up the collectives of every other thread."""
    clones: dict[int, Any] = getattr(_LOCAL, "clones", None) or {}
    _LOCAL.clones = clones
    c = clones.get(id(store))
    if c is None or c[0] is not store:
        try:
            c = (store, store.clone())
        except Exception:  # noqa: BLE001 - a store without clone(): share it
            c = (store, store)
        clones[id(store)] = c
    return c[1]


#: Per process group: the sequence number of its next collective on this process (every rank counts the same).
_SEQ: dict[str, int] = {}
_SEQ_LOCK = threading.Lock()


class _Arrivals:
    """Arrival records in the c10d store, so a waiting rank knows which ranks never came.

    Collective number ``seq`` of a group uses keys ``ckpt/arrive/<group>/<seq>/{n,who,all}``: each rank appends
    ``+<rank>`` to ``who`` and adds 1 to ``n``; the rank that brings ``n`` to the world size sets ``all``; everyone
    waits for ``all`` (three store round trips on the normal path). A rank whose wait times out withdraws (``n``
    -1, ``-<rank>`` in ``who``), so that a later call of every rank, numbered ``seq`` again, starts clean. Keys of
    collective ``seq - 2`` are deleted by the coordinator at ``seq``: reaching ``seq`` means every rank passed
    ``seq - 1``, hence has finished reading the keys of ``seq - 2``.
    """

    def __init__(self, store: Any, group_key: str, rank: int, world_size: int, timeout_secs: float,
                 seq: dict[str, int] | None = None) -> None:
        self.store = store
        #: Sequence numbers per group: the process's (``_SEQ``); a test simulating ranks in one process gives each
        #: its own.
        self.seq = _SEQ if seq is None else seq
        self.group_key = group_key
        self.rank = rank
        self.world_size = world_size
        self.timeout_secs = timeout_secs

    def _prefix(self, seq: int) -> str:
        return f"ckpt/arrive/{self.group_key}/{seq}"

    def wait_for_all(self, what: str) -> None:
        with _SEQ_LOCK:
            seq = self.seq.get(self.group_key, 0)
            self.seq[self.group_key] = seq + 1
        p, store = self._prefix(seq), _thread_store(self.store)
        store.append(f"{p}/who", f"+{self.rank} ")
        if store.add(f"{p}/n", 1) == self.world_size:
            store.set(f"{p}/all", b"1")
        try:
            store.wait([f"{p}/all"], datetime.timedelta(seconds=self.timeout_secs))
        except Exception as e:  # noqa: BLE001 - the store's timeout (DistStoreError, RuntimeError by version)
            if not self._withdraw(seq):
                raise self._error(seq, what) from e
        if seq >= 2 and self.rank == 0:
            old = self._prefix(seq - 2)
            for k in ("n", "who", "all"):
                store.delete_key(f"{old}/{k}")

    def _withdraw(self, seq: int) -> bool:
        """After a timed-out wait: take this rank's arrival back. True when every rank had arrived after all (the
        last one just now): the collective goes ahead as if nothing happened."""
        p, store = self._prefix(seq), _thread_store(self.store)
        if store.add(f"{p}/n", -1) == self.world_size - 1:
            store.add(f"{p}/n", 1)  # the last arrival saw the full count and sets ``all``: go on
            store.wait([f"{p}/all"], datetime.timedelta(seconds=max(self.timeout_secs, 30.0)))
            return True
        store.append(f"{p}/who", f"-{self.rank} ")
        with _SEQ_LOCK:  # the next collective of every rank is number ``seq`` again
            if self.seq.get(self.group_key) == seq + 1:
                self.seq[self.group_key] = seq
        return False

    def _error(self, seq: int, what: str) -> CollectiveTimeoutError:
        try:
            # ``who`` is an ordered log of arrivals (+r) and withdrawals (-r). Arrived: ranks still in, and ranks
            # whose token follows this rank's own arrival (they were waiting with it, or came while it waited).
            toks = [(t[0], int(t[1:])) for t in _thread_store(self.store).get(f"{self._prefix(seq)}/who").decode().split()]
            mine = max(i for i, t in enumerate(toks) if t == ("+", self.rank))
            counts: dict[int, int] = {}
            for sign, r in toks:
                counts[r] = counts.get(r, 0) + (1 if sign == "+" else -1)
            arrived = sorted({r for r, c in counts.items() if c > 0} | {r for _, r in toks[mine:]})
        except Exception:  # noqa: BLE001 - the diagnosis is best effort; the timeout itself is certain
            arrived = [self.rank]
        missing = [r for r in range(self.world_size) if r not in arrived]
        api = _calling_api() or "the same ckpt call"
        t = self.timeout_secs
        return CollectiveTimeoutError(
            f"{what}: rank {self.rank} waited {t:g} s for the other ranks of the process group (world size "
            f"{self.world_size}) and rank(s) {missing} never arrived (arrived: {arrived}). Every rank of the process "
            f"group must call {api} (ckpt.save, ckpt.load and every Checkpointer method are collective), in the same "
            f"order: a call made only on some ranks, for example under `if rank == 0:`, waits for the others "
            f"forever. If the missing ranks are only slower (a much larger shard, slower storage), raise the "
            f"timeout: {TIMEOUT_ENV}=<seconds> (now {t:g}; 0 disables it).",
            op=what, missing_ranks=tuple(missing), arrived_ranks=tuple(arrived), timeout_secs=t)


class DistWrapper:
    """Who calls it: ``ckpt.save``/``ckpt.load`` and the readers, on every rank of ``group``, in the same order.

    ``timeout_secs`` bounds the wait of each collective for the other ranks (None: ``collective_timeout_secs()``;
    0: none); ``store`` is where arrivals are recorded (default: the default process group's c10d store).
    """

    def __init__(self, group: Any = None, timeout_secs: float | None = None, store: Any = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.coordinator = 0
        self.timeout_secs = collective_timeout_secs(timeout_secs) if self.world_size > 1 else None
        #: The phase of the last ``run``/``map_reduce``, named by a timeout in a collective called without one.
        self.phase = "a ckpt collective"
        self._arrivals: _Arrivals | None = None
        if self.timeout_secs is not None:
            try:
                from torch.distributed import distributed_c10d as c10d  # noqa: PLC0415

                self._arrivals = _Arrivals(store if store is not None else c10d._get_default_store(),
                                           _group_key(group), self.rank, self.world_size, self.timeout_secs)
            except Exception:  # noqa: BLE001 - no store reachable (private API moved): plain collectives
                self._arrivals = None

    def _arrive(self, phase: str | None) -> None:
        """Wait (at most the timeout) until every rank reached this collective; raise naming those that did not."""
        if self._arrivals is not None:
            self._arrivals.wait_for_all(phase or self.phase)

    def barrier(self, phase: str) -> None:
        """Every rank of the group calls it; returns once all arrived, or raises ``CollectiveTimeoutError``."""
        if self.world_size > 1:
            self._arrive(phase)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    def all_gather(self, obj: T, phase: str | None = None) -> list[T]:
        if self.world_size == 1:
            return [obj]
        self._arrive(phase)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T, phase: str | None = None) -> T:
        """``obj`` as the coordinator has it."""
        if self.world_size == 1:
            return obj
        self._arrive(phase)
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
        self.phase = phase
        local_exc: BaseException | None = None
        try:
            result: Any = fn()
            outcome: Any = None
        except Exception as e:  # noqa: BLE001 - carried to every rank, re-raised below
            result, outcome, local_exc = None, _Failure(e), e
        self.raise_if_any(self.all_gather(outcome, phase), phase, local_exc)
        return result

    def map_reduce(self, phase: str, map_fn: Callable[[], T], reduce_fn: Callable[[list[T]], list[Any]]) -> Any:
        """Every rank maps; the coordinator reduces the gathered results to one value per rank; each gets its own.

        Failures in ``map_fn`` or ``reduce_fn`` are raised on every rank.
        """
        if self.world_size == 1:
            return reduce_fn([map_fn()])[0]
        local = self.run(phase, map_fn)
        gathered = self.all_gather(local, phase)
        reduced: Any = None
        local_exc: BaseException | None = None
        if self.is_coordinator:
            try:
                reduced = reduce_fn(gathered)
            except Exception as e:  # noqa: BLE001
                reduced, local_exc = _Failure(e), e
        reduced = self.broadcast(reduced, phase)
        if isinstance(reduced, _Failure):
            self.raise_if_any([reduced] + [None] * (self.world_size - 1), phase, local_exc)
        return reduced[self.rank]
