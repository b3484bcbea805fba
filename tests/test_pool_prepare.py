"""No first-save stall from the pool (issue #16 item 7): once the first save knows the snapshot's size, the other
slots are allocated and touched on a background thread, so no later save allocates on the training thread; the
default allocator leaves first-touch to the copier thread. (Timings are in benchmarks, not here.)"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

import ckpt
from ckpt.pool import HostAllocator


class Recording(HostAllocator):
    def __init__(self) -> None:
        super().__init__(pin_memory=False)
        self.calls: list[tuple[int, str]] = []

    def allocate(self, nbytes: int, name: str) -> torch.Tensor:
        self.calls.append((nbytes, threading.current_thread().name))
        return super().allocate(nbytes, name)


def test_only_the_first_slot_is_allocated_on_the_training_thread(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(37, 11), torch.nn.LayerNorm(11), torch.nn.Linear(11, 7))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    opt.step()
    rec = Recording()
    main = threading.current_thread().name
    with ckpt.Checkpointer(str(tmp_path / "run"), disk_every=0, memory_slots=3, allocator=rec) as cp:
        cp.save(1, {"model": model, "optim": opt}).wait()
        assert [t for _, t in rec.calls].count(main) == 1, rec.calls
        cp.pool._preparer.join()
        assert len(rec.calls) == 3 and all(t != main for _, t in rec.calls[1:]), rec.calls
        assert len({n for n, _ in rec.calls}) == 1, rec.calls
        for step in range(2, 6):
            model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
            opt.step()
            cp.save(step, {"model": model, "optim": opt})
        cp.wait()
        assert len(rec.calls) == 3, rec.calls
        want = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert cp.restore({"model": model, "optim": opt}) == 5 and cp.last_restore["source"] == "memory"
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), k


def test_a_memory_snapshot_of_another_structure_is_refused_with_what_to_do(tmp_path: Path) -> None:
    import pytest

    model = torch.nn.Sequential(torch.nn.Embedding(37, 11), torch.nn.Linear(11, 7))
    with ckpt.Checkpointer(str(tmp_path / "run"), disk_every=0) as cp:
        cp.save(1, {"model": model}).wait()
        with pytest.raises(ckpt.CheckpointNotFoundError, match="keys or shapes differ"):
            cp.restore({"model": torch.nn.Sequential(torch.nn.Embedding(37, 11), torch.nn.Linear(11, 5))})


def test_a_failed_allocation_leaves_no_slot_stuck() -> None:
    """An allocator that refuses (out of memory, a daemon's budget) fails that acquire only: the slot goes back to
    the ring, so later acquires neither wait forever nor lose a slot."""
    from ckpt.pool import HostBufferPool

    class Refusing(HostAllocator):
        refuse = 3

        def allocate(self, nbytes: int, name: str) -> torch.Tensor:
            if self.refuse:
                self.refuse -= 1
                raise MemoryError(f"{name}: no room for {nbytes} bytes")
            return super().allocate(nbytes, name)

    pool = HostBufferPool(2, Refusing(pin_memory=False))
    for _ in range(3):
        try:
            pool.acquire(1000, timeout_secs=5)
        except MemoryError:
            pass
        else:
            raise AssertionError("the allocator refused, so acquire must raise")
    slot, _ = pool.acquire(1000, timeout_secs=5)
    assert slot.capacity_bytes >= 1000
    pool.mark_staged(slot, 1)
    other, _ = pool.acquire(1000, timeout_secs=5)
    assert other is not slot
    pool.close()
