"""The host buffer pool: slots of pre-allocated, reused host memory that snapshots are staged into.

Allocating once matters: first-touch allocation costs several times a memcpy (DESIGN.md measured about 15 GB/s
for a copy into a touched buffer against 2.9 GB/s for ``clone()``). Each slot holds one whole snapshot of this
rank's state. Slots are handed out in a ring. The slots of the ``keep_staged`` newest staged snapshots are the
memory tier (retention per tier: the Checkpointer keeps ``min(keep_last, memory_slots - 1)`` there, one slot being
left for the snapshot being copied); the newest of them is never handed out, nor the slot a tier holds (``hold``: the
snapshot daemon's newest sealed step, whose bytes are that slot's, until a newer one is sealed). An older kept
snapshot gives its slot up when no other slot is free, rather than make ``save`` wait; when every other slot is
still being staged or flushed, ``acquire`` blocks: that is back-pressure, and its wait is measured.

Memory comes from a ``SegmentAllocator``. The default one allocates torch host tensors (pinned when CUDA is
available, for asynchronous device-to-host copies). The snapshot daemon will provide an allocator whose
segments live in shared memory it owns, so a killed trainer loses nothing; nothing above this interface changes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

ALIGN_BYTES = 64


class SegmentAllocator(Protocol):
    """Provides byte segments for slots. Called by ``HostBufferPool`` on the trainer's main thread."""

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        """A 1-D ``uint8`` CPU tensor of ``nbytes`` (the pool touches it off the training thread if need be)."""

    def free(self, segment: torch.Tensor, name: str) -> None:
        """Give ``segment`` back."""

    # Optional: ``begin(segment, step)``, called when a snapshot of ``step`` is about to be copied into ``segment``
    # (whatever it held is no longer a snapshot). The snapshot daemon's allocator tells the daemon.
    # Optional: ``owns(segment) -> bool``: False when ``segment`` is no longer the allocator's to hand out (the
    # daemon it came from went away and a new one answers); the pool then replaces it, as when a slot grows.
    # Optional: ``reserve(segment, ranges=None)``: make the memory of ``segment`` (of byte ranges ``(offset,
    # length)`` only, when given) writable before anything is written there; ``allocate`` then may return a
    # segment whose memory is not reserved yet (the daemon's: reserving a segment costs about 0.1 ms per MB on
    # /dev/shm, which the first save would otherwise wait for). The pool calls it off the training thread where
    # it can (``HostBufferPool.reserve``).
    # Optional: ``close()``, called by ``HostBufferPool.close`` instead of ``free`` on every segment: the pool is
    # done, but what the segments hold may outlive it (the daemon keeps the sealed ones for the next job).


class HostAllocator:
    """Plain (or pinned, when CUDA is available) host tensors. Not touched here: the pool faults the pages in off
    the training thread (the first slot in its first copy, on the copier thread; the others in ``prepare``)."""

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def free(self, segment: torch.Tensor, name: str) -> None:
        del segment


FREE, STAGING, STAGED = "free", "staging", "staged"


@dataclass
class Slot:
    """One snapshot's worth of host memory and what currently lives in it."""

    index: int
    buffer: torch.Tensor
    state: str = FREE
    step: int | None = None
    #: Tiers still flushing from this slot; it cannot be reused until this is empty.
    pending: set[str] = field(default_factory=set)
    #: What the slot holds now, attached by its user (the Checkpointer's ``stager.StagedSnapshot``).
    snapshot: Any = None
    #: Views of ``buffer`` a user keeps across snapshots (the Checkpointer: one per region of its layout), keyed
    #: by what they were made for; dropped whenever ``buffer`` is replaced.
    views: dict[Any, Any] = field(default_factory=dict)
    #: Set while a background thread sizes this free slot (``HostBufferPool._prepare_others``).
    ready: "threading.Event | None" = None
    #: Whether ``buffer``'s memory is reserved (always, unless the allocator has ``reserve``: see there).
    reserved: bool = True

    @property
    def capacity_bytes(self) -> int:
        return int(self.buffer.numel())


class HostBufferPool:
    """A ring of ``num_slots`` slots, keeping up to ``keep_staged`` staged snapshots (at most ``num_slots - 1``
    with two slots or more: one is always left to stage into). Thread-safe: the main thread acquires, flush threads
    release."""

    def __init__(self, num_slots: int = 2, allocator: SegmentAllocator | None = None, name: str = "ckpt",
                 keep_staged: int = 1) -> None:
        if num_slots < 1:
            raise ValueError(f"HostBufferPool(num_slots={num_slots}): need at least 1 slot")
        most = max(1, num_slots - 1)
        if not 1 <= keep_staged <= most:
            raise ValueError(f"HostBufferPool(num_slots={num_slots}, keep_staged={keep_staged}): expected 1 to "
                             f"{most} kept snapshots (one slot stays free for the snapshot being copied); "
                             "use more slots to keep more")
        self.allocator = allocator or HostAllocator()
        self.name = name
        self.keep_staged = keep_staged
        self.slots = [Slot(i, torch.empty(0, dtype=torch.uint8)) for i in range(num_slots)]
        self._cond = threading.Condition()
        self._staged: list[Slot] = []  # the memory tier: staged snapshots kept, oldest first
        self._held: Slot | None = None  # a tier's newest committed snapshot that lives in the slot itself (hold)
        self._next = 0
        self.allocated_bytes = 0
        self._preparer: threading.Thread | None = None

    @property
    def _latest(self) -> Slot | None:
        return self._staged[-1] if self._staged else None

    def _reusable(self, slot: Slot) -> bool:
        if slot.state == STAGING or slot.pending:
            return False
        return len(self.slots) == 1 or (slot not in self._staged and slot is not self._held)

    def _evictable(self) -> Slot | None:
        """The oldest kept snapshot but the newest whose slot could be reused (no tier flushes from it, none
        holds it): given up rather than make a new snapshot wait."""
        return next((s for s in self._staged[:-1] if s.state != STAGING and not s.pending and s is not self._held),
                    None)

    def acquire(self, nbytes: int, tiers: "set[str] | None" = None,
                timeout_secs: float | None = None, step: int | None = None) -> tuple[Slot, float]:
        """A slot of at least ``nbytes`` for a new snapshot, and the seconds spent waiting for one.

        ``tiers`` will flush from the slot (each calls ``release`` when done); it is not reused before. ``step``:
        the snapshot about to be copied in, passed to the allocator's ``begin`` when it has one.

        Grows the slot's segment only when the state grew (a new layout); otherwise reuses it untouched.
        Raises ``TimeoutError`` after ``timeout_secs``.
        """
        t0 = time.perf_counter()
        with self._cond:
            while True:
                for k in range(len(self.slots)):
                    slot = self.slots[(self._next + k) % len(self.slots)]
                    if self._reusable(slot):
                        break
                else:
                    evict = self._evictable()
                    if evict is not None:
                        slot = evict
                        break
                    remaining = None if timeout_secs is None else timeout_secs - (time.perf_counter() - t0)
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"no free snapshot slot after {timeout_secs}s (all {len(self.slots)} busy)")
                    self._cond.wait(remaining)
                    continue
                break
            self._next = (slot.index + 1) % len(self.slots)
            if slot in self._staged:
                self._staged.remove(slot)
            if slot is self._held:
                self._held = None
            slot.state, slot.step, slot.snapshot = STAGING, None, None
            slot.pending = set(tiers or ())
        waited = time.perf_counter() - t0
        if slot.ready is not None:  # being sized in the background (prepare_others): that finishes first
            slot.ready.wait()
        try:
            self._fit(slot, nbytes)
        except BaseException:  # the slot holds nothing: hand it out again, or the next acquire waits forever
            self.abandon(slot)
            with self._cond:
                slot.pending = set()
            raise
        begin = getattr(self.allocator, "begin", None)
        if begin is not None and step is not None:
            begin(slot.buffer, step)
        self._prepare_others(nbytes)  # after begin: a preparer's allocation must not queue ahead of it
        return slot, waited

    def _fit(self, slot: Slot, nbytes: int) -> None:
        """Give ``slot`` a segment of at least ``nbytes`` of the allocator's (grown, or replaced when the allocator
        no longer owns it); untouched otherwise."""
        owns = getattr(self.allocator, "owns", None)
        if slot.capacity_bytes < nbytes or (owns is not None and slot.buffer.numel() and not owns(slot.buffer)):
            old = slot.buffer
            slot.views = {}  # before the free: views must not keep a released segment alive
            if old.numel():
                self.allocator.free(old, f"{self.name}-{slot.index}")
                with self._cond:
                    self.allocated_bytes -= int(old.numel())
            slot.buffer = self.allocator.allocate(nbytes, f"{self.name}-{slot.index}")
            slot.reserved = getattr(self.allocator, "reserve", None) is None
            with self._cond:
                self.allocated_bytes += nbytes

    def reserve(self, slot: Slot, ranges: list[tuple[int, int]] | None = None) -> None:
        """Make ``slot``'s memory (byte ``ranges`` of it only, when given) writable: the allocator's ``reserve``
        the first time, nothing after. Called before the first write: the copier thread's for the lazy copies,
        the training thread's for the eager ranges only."""
        if slot.reserved:
            return
        self.allocator.reserve(slot.buffer, ranges)  # type: ignore[attr-defined]
        if ranges is None:
            slot.reserved = True

    def _prepare_others(self, nbytes: int) -> None:
        """Size the free slots that are too small for ``nbytes`` in a background thread, so the next snapshots
        find them allocated (pinned host memory, daemon segments: milliseconds to seconds) and no save after the
        first pays for it. A slot being prepared is handed out only once it is ready."""
        with self._cond:
            todo = [s for s in self.slots if s.state == FREE and s.ready is None and s.capacity_bytes < nbytes]
            for s in todo:
                s.ready = threading.Event()
        if not todo:
            return

        def work() -> None:
            for s in todo:
                try:
                    self._fit(s, nbytes)
                    self.reserve(s)
                    s.buffer.zero_()  # fault the pages in now, not in the copy of a later snapshot
                except Exception:  # noqa: BLE001 - acquire sizes it again on the main thread and raises there
                    pass
                finally:
                    ready, s.ready = s.ready, None
                    if ready is not None:
                        ready.set()

        self._preparer = threading.Thread(target=work, name=f"{self.name}-pool-prepare", daemon=True)
        self._preparer.start()

    def mark_staged(self, slot: Slot, step: int) -> None:
        """Staging finished: ``slot`` is the newest in-memory snapshot (tiers may still be flushing from it); the
        oldest kept one beyond ``keep_staged`` leaves the memory tier (its slot becomes free once no tier flushes
        from it)."""
        with self._cond:
            slot.state, slot.step = STAGED, step
            if slot in self._staged:
                self._staged.remove(slot)
            self._staged.append(slot)
            del self._staged[:-self.keep_staged]
            self._cond.notify_all()

    def abandon(self, slot: Slot) -> None:
        """Staging failed: the slot holds nothing usable (tiers still flushing release it as they fail)."""
        with self._cond:
            slot.state, slot.step = FREE, None
            if slot in self._staged:
                self._staged.remove(slot)
            self._cond.notify_all()

    def hold(self, slot: Slot | None, step: int | None = None) -> None:
        """A tier committed ``step`` in ``slot``'s own bytes (the daemon sealed the segment): keep the slot from
        reuse until a newer step is held, so a committed step exists at every moment. ``None`` drops the hold (the
        tier failed: nothing of it is worth blocking the ring for). Older steps than the one held are ignored."""
        with self._cond:
            if slot is None:
                self._held = None
            elif self._held is None or step is None or self._held.step is None or step >= self._held.step:
                self._held = slot
            self._cond.notify_all()

    def release(self, slot: Slot, tier: str) -> None:
        """``tier`` finished flushing from ``slot`` (successfully or not)."""
        with self._cond:
            slot.pending.discard(tier)
            self._cond.notify_all()

    def latest(self) -> Slot | None:
        """The slot holding the newest fully staged snapshot (the memory tier), if any."""
        with self._cond:
            return self._latest

    def staged(self, step: int) -> Slot | None:
        """The slot of the kept staged snapshot of ``step`` (the memory tier), if it is still there."""
        with self._cond:
            return next((s for s in self._staged if s.step == step), None)

    def staged_steps(self) -> list[int]:
        """Steps of the kept staged snapshots (the memory tier), ascending."""
        with self._cond:
            return sorted(s.step for s in self._staged if s.step is not None)

    def close(self) -> None:
        if self._preparer is not None:
            self._preparer.join()
        close = getattr(self.allocator, "close", None)
        with self._cond:
            for slot in self.slots:
                slot.views = {}
                if slot.buffer.numel() and close is None:
                    self.allocator.free(slot.buffer, f"{self.name}-{slot.index}")
                slot.buffer = torch.empty(0, dtype=torch.uint8)
                slot.state = FREE
            self._staged, self._held = [], None
            self.allocated_bytes = 0
        if close is not None:
            close()
