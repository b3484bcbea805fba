"""``ckpt.Checkpointer`` with the training state on a CUDA device: the pinned pool, the side-stream copies, the
pre-step wait, eager copies of buffers, restores from memory and from disk, and the CUDA RNG.

CI has no GPU, so these are skipped there (they need a device, they are not optional); they run on a GPU node
with ``pytest tests/test_checkpointer_cuda.py``. Every comparison is bit-exact (``torch.equal``) against a
synchronous copy of the state taken at the step the snapshot names. Where a test needs the device to be busy
while the snapshot's copies are pending, it queues a long chain of matrix products first; it never asserts a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import ckpt

pytestmark = [pytest.mark.timeout(300), pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU node)")]

DEV = "cuda"


@pytest.fixture(autouse=True)
def deterministic_kernels() -> Any:
    """Resumed training is compared loss for loss: keep cuDNN on its deterministic kernels."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, large enough that a device-to-host copy takes a while."""

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def build(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = Net().to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 64, generator=g).to(DEV)


def forward_backward(model: Net, step: int) -> float:
    loss = model(batch(step)).pow(2).mean()
    loss.backward()
    return float(loss.detach())


def train_step(model: Net, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    loss = forward_backward(model, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss


def busy_device(n: int = 40) -> torch.Tensor:
    """Queue a chain of large matrix products on the current stream: work the host does not wait for."""
    a = torch.randn(4096, 4096, device=DEV)
    for _ in range(n):
        a = torch.tanh(a @ a)
    return a


def after_one_step() -> tuple[Net, torch.optim.Optimizer, Any, dict[str, torch.Tensor]]:
    """The model, optimizer and scheduler after one training step, and the reference copy of that state."""
    model, opt, sched = build()
    train_step(model, opt, sched, 0)
    torch.cuda.synchronize()
    return model, opt, sched, reference(model, opt)


def reference(model: Net, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A synchronous host copy of the state, keyed as the checkpoint keys it."""
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/state/{names[id(p)]}/{k}"] = v.detach().cpu().clone()
    return out


def assert_matches(path: Path, ref: dict[str, torch.Tensor], where: str) -> None:
    with ckpt.open(str(path)) as r:
        stored = {k for k in r.keys() if k.startswith(("model/", "optim/state/"))}
        assert stored == set(ref), f"{where}: keys differ: {sorted(stored ^ set(ref))}"
        bad = [k for k, v in ref.items() if not torch.equal(r.read(k), v)]
    assert not bad, f"{where}: snapshot differs from the state at its step: {bad}"


def state_now(model: Net, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return reference(model, opt)


def step_path(root: Path, step: int) -> Path:
    return root / f"step_{step:09d}"


def test_pool_is_pinned_and_copies_run_on_a_side_stream(tmp_path: Path) -> None:
    model, opt, sched = build()
    train_step(model, opt, sched, 0)
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=0) as cp:
        h = cp.save(1, {"model": model, "optim": opt})
        slots = [s for s in cp.pool.slots if s.buffer.numel() > 0]
        assert slots and all(s.buffer.is_pinned() for s in slots), "the host pool must be pinned on CUDA"
        assert cp.copier._stream is not None and cp.copier._stream != torch.cuda.current_stream(), (
            "lazy copies must run on a side stream")
        assert h.wait(120)
        cp.wait()


def test_every_snapshot_equals_the_state_at_its_step_while_the_device_is_busy(tmp_path: Path) -> None:
    """The next step's forward, backward and the queued work run while copies are pending; the pre-step hook
    holds each update until its snapshot's copies are done."""
    model, opt, sched = build()
    refs: dict[int, dict[str, torch.Tensor]] = {}
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=1, keep_last=None) as cp:
        for step in range(1, 7):
            train_step(model, opt, sched, step)
            torch.cuda.synchronize()
            refs[step] = reference(model, opt)
            busy_device()  # the copies queue behind this on the side stream
            cp.save(step, {"model": model, "optim": opt, "sched": sched, "step": step})
        cp.wait()
        assert cp.steps("disk") == list(range(1, 7))
    for step, ref in refs.items():
        assert_matches(step_path(tmp_path, step), ref, f"step {step}")
        with ckpt.open(str(step_path(tmp_path, step))) as r:
            assert "rng/rank_00000/torch_cuda_0" in r, "the CUDA generator's state is saved"


def test_in_place_changes_of_buffers_after_save_do_not_leak(tmp_path: Path) -> None:
    """BatchNorm statistics change outside optimizer.step(): they are copied before save returns, in stream
    order, so a forward pass and in-place edits queued right after save do not reach the snapshot."""
    model, opt, sched, ref = after_one_step()
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=1, keep_last=None) as cp:
        busy_device()
        cp.save(1, {"model": model, "optim": opt})
        with torch.no_grad():
            model.bn.running_mean.add_(100.0)
            model.bn.running_var.mul_(3.0)
            model.bn.num_batches_tracked += 5
            model(batch(99))  # training-mode forward: updates the statistics again
        forward_backward(model, 1)
        opt.step()  # the pre-step hook holds this until the lazy copies are done
        cp.wait()
    assert_matches(step_path(tmp_path, 1), ref, "step 1")


def test_sources_dropped_right_after_save_are_not_reused_before_their_copy(tmp_path: Path) -> None:
    """The side stream reads the optimizer state only after the queued work; right after ``save`` the loop drops
    those tensors (as a reload would) and fills new device memory of the same sizes on the compute stream. The
    snapshot still holds its step's values: a pending copy keeps its sources alive, so the caching allocator
    cannot hand their blocks to the compute stream first (what ``record_stream`` would otherwise have to do)."""
    model, opt, sched, ref = after_one_step()
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=1, keep_last=None) as cp:
        busy_device()
        h = cp.save(1, {"model": model, "optim": opt})
        for st in opt.state.values():
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    st[k] = torch.full_like(v, 7.0)  # drops the tensor the snapshot is still copying
        junk = [torch.full_like(p, 9.0) for p in model.parameters() for _ in range(4)]
        assert h.wait(120) and not h.errors
        del junk
        cp.wait()
    assert_matches(step_path(tmp_path, 1), ref, "step 1")


def test_restore_from_memory_and_from_disk_continues_bit_identically(tmp_path: Path) -> None:
    model, opt, sched = build()
    for step in range(1, 4):
        train_step(model, opt, sched, step)
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=1) as cp:
        cp.save(3, {"model": model, "optim": opt, "sched": sched})
        cp.wait()
        saved = state_now(model, opt)
        noise = torch.randn(4, device=DEV)  # the CUDA generator's next draws after step 3
        losses = [train_step(model, opt, sched, s) for s in range(4, 7)]
        after = state_now(model, opt)
        assert cp.restore({"model": model, "optim": opt, "sched": sched}) == 3  # from the pinned pool
        assert all(torch.equal(v, saved[k]) for k, v in state_now(model, opt).items())
        assert torch.equal(torch.randn(4, device=DEV), noise), "the CUDA RNG was not restored from memory"
        assert [train_step(model, opt, sched, s) for s in range(4, 7)] == losses
        assert all(torch.equal(v, after[k]) for k, v in state_now(model, opt).items())
    model2, opt2, sched2 = build(seed=5)
    train_step(model2, opt2, sched2, 0)  # creates the AdamW state to load into
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=1) as cp2:
        assert cp2.restore({"model": model2, "optim": opt2, "sched": sched2}) == 3  # from disk
        assert all(p.is_cuda for p in model2.parameters())
        assert all(torch.equal(v, saved[k]) for k, v in state_now(model2, opt2).items())
        assert torch.equal(torch.randn(4, device=DEV), noise), "the CUDA RNG was not restored from disk"
        assert [train_step(model2, opt2, sched2, s) for s in range(4, 7)] == losses
