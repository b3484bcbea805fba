"""Trainer side of the store: a daemon segment mapped into this process as a ``uint8`` tensor.

``DaemonAllocator`` is a ``ckpt.pool.SegmentAllocator``: a Checkpointer's pool stages straight into segments the
daemon owns, so a snapshot needs no copy beyond the one into the pool, and a killed trainer leaves its sealed
snapshots in the daemon.
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from typing import Any, Callable

import torch

from ckpt.errors import DaemonBudgetError, DaemonError, DaemonUnavailableError
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.store import reserve_segment


def map_segment(path: str, nbytes: int, writable: bool = True) -> tuple[torch.Tensor, mmap.mmap]:
    """The first ``nbytes`` of segment file ``path`` as a 1-D ``uint8`` tensor, and the mapping behind it (keep it
    open as long as the tensor or any view of it lives)."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(path, flags | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise DaemonError(f"segment {path}: {size} bytes, expected at least {nbytes}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    if writable:
        return torch.frombuffer(mm, dtype=torch.uint8), mm
    with warnings.catch_warnings():  # torch warns that it cannot mark a tensor read-only; callers only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(memoryview(mm), dtype=torch.uint8), mm


#: Seconds between attempts to reach the daemon again after it went away (a connect is cheap; ``auto`` also starts).
RECONNECT_SECS = 5.0


class DaemonAllocator:
    """Pool segments from the daemon, keyed by ``run`` and ``shard`` (the saved layout's coordinates).

    It owns ``client``. If the daemon goes away (a request fails with ``DaemonUnavailableError``), training goes on:
    the segments already mapped stay valid memory of this process (the pool keeps using them, its memory tier
    included), new ones are plain host memory, and ``problem`` says why nothing can be sealed. Every
    ``RECONNECT_SECS`` ``owns`` tries ``connect`` again; once a daemon answers, segments from before are no longer
    this allocator's (``owns`` is False), so the pool replaces them with segments of the new daemon.
    """

    def __init__(self, client: DaemonClient, run: str, shard: str,
                 connect: Callable[[], DaemonClient] | None = None) -> None:
        self.client, self.run, self.shard = client, run, shard
        self.connect = connect
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}  # this daemon's segments: data_ptr -> (name, mapping)
        self._stale: dict[int, tuple[str | None, Any]] = {}  # from before the daemon went away, or host fallback
        #: Host segments handed out because the daemon refused a segment for its budget: data_ptr -> (why, when).
        self._refused: dict[int, tuple[str, float]] = {}
        self._unreserved: set[int] = set()  # segments whose memory is not reserved yet (``reserve``)
        #: Why the daemon cannot be used now (None while it can), and when that was last tried.
        self.down: str | None = None
        self._tried = 0.0

    def _lost(self, e: DaemonError) -> None:
        if self.down is None:
            self.down = str(e)
            self._tried = time.monotonic()
            self._stale.update(self._maps)
            self._maps = {}

    def _request(self, op: str, **fields: Any) -> dict[str, Any] | None:
        """A request that marks the daemon lost, instead of raising, when it is unreachable."""
        try:
            return self.client.request(op, **fields)
        except DaemonUnavailableError as e:
            self._lost(e)
            return None

    def problem(self, segment: torch.Tensor) -> str | None:
        """Why a snapshot in ``segment`` cannot be sealed in the daemon, or None."""
        if self.down is not None:
            return self.down
        refused = self.refused(segment)
        if refused is not None:
            return refused
        if segment.data_ptr() not in self._maps:
            return f"this snapshot was staged while the snapshot daemon {self.client.dir} was away"
        return None

    def refused(self, segment: torch.Tensor) -> str | None:
        """Why the daemon refused a segment for this snapshot (its budget: the need, the budget and the fix), or
        None when it did not."""
        got = self._refused.get(segment.data_ptr())
        return None if got is None else got[0]

    @property
    def refusing(self) -> bool:
        """Whether some segment handed out is host memory because the daemon refused it for its budget."""
        return bool(self._refused)

    def owns(self, segment: torch.Tensor) -> bool:
        """Whether ``segment`` is a segment of the daemon in use (always True while it is away: keep what you have);
        tries to reach the daemon again first when it was away long enough."""
        if self.down is not None and self.connect is not None and time.monotonic() - self._tried >= RECONNECT_SECS:
            self._tried = time.monotonic()
            try:
                fresh = self.connect()
            except DaemonError:
                fresh = None
            if fresh is not None:
                self.client.close()
                self.client, self.down = fresh, None
        refused = self._refused.get(segment.data_ptr())
        if refused is not None:  # host memory for a refused segment: ask the daemon again every RECONNECT_SECS
            return time.monotonic() - refused[1] < RECONNECT_SECS
        return self.down is not None or segment.data_ptr() in self._maps

    def _host(self, nbytes: int) -> torch.Tensor:
        host = torch.zeros(nbytes, dtype=torch.uint8)
        self._stale[host.data_ptr()] = (None, host)
        return host

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        try:
            reply = self._request("alloc", run=self.run, shard=self.shard, nbytes=max(1, nbytes), reserve=False) \
                if self.down is None else None
        except DaemonBudgetError as e:  # training goes on in this process's memory; the daemon tier reports why
            host = self._host(nbytes)
            self._refused[host.data_ptr()] = (f"{e}. This snapshot stays in the trainer's own pool and goes on to "
                                              f"the disk and remote tiers; the daemon is asked again every "
                                              f"{RECONNECT_SECS:g} s", time.monotonic())
            return host
        if reply is None:  # the daemon is away: this process's own memory until it is back
            return self._host(nbytes)
        seg, mm = map_segment(str(self.client.segment_path(reply["segment"])), nbytes)
        self._maps[seg.data_ptr()] = (reply["segment"], mm)
        self._unreserved.add(seg.data_ptr())
        return seg

    def reserve(self, segment: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> None:
        """Reserve the memory of ``segment`` (of byte ``ranges`` (offset, length) only, when given) before anything
        writes there: ``allocate`` leaves it to the pool, which does it off the training thread (the copier's, or
        the preparer's), so the first save does not wait for the whole segment's pages. Without it a full
        ``/dev/shm`` would be a SIGBUS in the copy; with it, a ``DaemonBudgetError`` naming the sizes."""
        ptr = segment.data_ptr()
        if ptr not in self._unreserved:
            return
        name = self._maps[ptr][0]
        fd = os.open(self.client.segment_path(name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            for offset, nbytes in ranges if ranges is not None else [(0, int(segment.numel()))]:
                if nbytes > 0:
                    reserve_segment(fd, offset, nbytes, f"snapshot daemon {self.client.dir}: segment {name}")
        finally:
            os.close(fd)
        if ranges is None:
            self._unreserved.discard(ptr)

    def segment_name(self, segment: torch.Tensor) -> str:
        return self._maps[segment.data_ptr()][0]

    def begin(self, segment: torch.Tensor, step: int) -> None:
        """A snapshot of ``step`` is about to be copied into ``segment``: the daemon forgets what it held.

        Posted, not awaited (a round trip to a daemon that must be scheduled on a busy node cost the training
        thread about half a millisecond per save): the daemon reads it before anything this process sends later
        and before it notices this process's death, so no reader sees the old step sealed once the copy has
        begun. Its error, if any, is raised by the next request (the seal of this step)."""
        if self.down is None and segment.data_ptr() in self._maps:
            try:
                self.client.post("begin", segment=self.segment_name(segment), step=step)
            except DaemonUnavailableError as e:
                self._lost(e)

    def locate(self, view: torch.Tensor) -> tuple[str, int, int]:
        """(segment name, byte offset, segment bytes) of a contiguous CPU ``view`` into one of these segments."""
        if view.device.type != "cpu" or not view.is_contiguous():
            raise DaemonError(f"a {tuple(view.shape)} view is not a contiguous host view of a daemon segment")
        ptr, n = view.data_ptr(), view.numel() * view.element_size()
        for base, (name, mm) in list(self._maps.items()):  # a copy: the main thread may add or drop one
            if base <= ptr and ptr + n <= base + len(mm):
                return name, ptr - base, len(mm)
        raise DaemonError(f"a {tuple(view.shape)} view at {ptr:#x} lies in no segment of this daemon allocator")

    @staticmethod
    def _unmap(mm: Any) -> None:
        if isinstance(mm, mmap.mmap):
            try:
                mm.close()
            except BufferError:  # a view still exports it: the mapping goes when the last view does
                pass

    def close(self) -> None:
        """The pool is done: unmap every segment but give none back, and close the connection. The daemon reclaims
        the unsealed segments and keeps the sealed ones (its ``keep_last`` newest of the run) when the connection
        closes, so a job that ends cleanly leaves its snapshots to the next one, as a killed one does."""
        for _, mm in [*self._maps.values(), *self._stale.values()]:
            self._unmap(mm)
        self._maps.clear()
        self._stale.clear()
        self._refused.clear()
        self._unreserved.clear()
        self.client.close()

    def free(self, segment: torch.Tensor, name: str) -> None:
        ptr = segment.data_ptr()
        del segment
        self._refused.pop(ptr, None)
        stale = self._stale.pop(ptr, None)
        if stale is not None:  # the daemon that made it is gone (or it is host memory): only unmap
            self._unmap(stale[1])
            return
        self._unreserved.discard(ptr)
        entry = self._maps.pop(ptr, None)
        if entry is None:
            return
        seg_name, mm = entry
        self._unmap(mm)
        try:
            self._request("free", segment=seg_name)
        except DaemonError:
            pass  # it already dropped it: nothing to give back
