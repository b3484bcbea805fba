"""Trainer side of the store: a daemon segment mapped into this process as a ``uint8`` tensor.

``DaemonAllocator`` is a ``ckpt.pool.SegmentAllocator``: a Checkpointer's pool stages straight into segments the
daemon owns, so a snapshot needs no copy beyond the one into the pool, and a killed trainer leaves its sealed
snapshots in the daemon.
"""

from __future__ import annotations

import mmap
import os
import warnings
from typing import Any

import torch

from ckpt.errors import DaemonError
from snapshot_daemon.client import DaemonClient


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


class DaemonAllocator:
    """Pool segments from the daemon, keyed by ``run`` and ``shard`` (the saved layout's coordinates)."""

    def __init__(self, client: DaemonClient, run: str, shard: str) -> None:
        self.client, self.run, self.shard = client, run, shard
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        reply = self.client.request("alloc", run=self.run, shard=self.shard, nbytes=max(1, nbytes))
        seg, mm = map_segment(str(self.client.segment_path(reply["segment"])), nbytes)
        self._maps[seg.data_ptr()] = (reply["segment"], mm)
        return seg

    def segment_name(self, segment: torch.Tensor) -> str:
        return self._maps[segment.data_ptr()][0]

    def begin(self, segment: torch.Tensor, step: int) -> None:
        """A snapshot of ``step`` is about to be copied into ``segment``: the daemon forgets what it held."""
        self.client.request("begin", segment=self.segment_name(segment), step=step)

    def locate(self, view: torch.Tensor) -> tuple[str, int, int]:
        """(segment name, byte offset, segment bytes) of a contiguous CPU ``view`` into one of these segments."""
        if view.device.type != "cpu" or not view.is_contiguous():
            raise DaemonError(f"a {tuple(view.shape)} view is not a contiguous host view of a daemon segment")
        ptr, n = view.data_ptr(), view.numel() * view.element_size()
        for base, (name, mm) in self._maps.items():
            if base <= ptr and ptr + n <= base + len(mm):
                return name, ptr - base, len(mm)
        raise DaemonError(f"a {tuple(view.shape)} view at {ptr:#x} lies in no segment of this daemon allocator")

    def close(self) -> None:
        """The pool is done: unmap every segment but give none back. The daemon reclaims the unsealed ones and keeps
        the sealed ones (its ``keep_last`` newest of the run) when this client's connection closes, so a job that
        ends cleanly leaves its snapshots to the next one, as a killed one does."""
        for _, mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view still exports it: the mapping goes when the last view does
                pass
        self._maps.clear()

    def free(self, segment: torch.Tensor, name: str) -> None:
        entry: Any = self._maps.pop(segment.data_ptr(), None)
        if entry is None:
            return
        seg_name, mm = entry
        del segment
        try:
            mm.close()
        except BufferError:  # a view still exports it: the mapping goes when the last view does
            pass
        try:
            self.client.request("free", segment=seg_name)
        except DaemonError:
            pass  # the daemon is gone or already dropped it: nothing to give back
