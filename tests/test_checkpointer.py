"""``ckpt.Checkpointer`` in one process: what a snapshot holds, when copies happen, tiers, failures, retention.

Every snapshot is compared bit-exactly (``torch.equal``) with a synchronous copy of the training state taken at
the step the snapshot names. Timing is never asserted: where a test needs the background copier or a tier to be
slow, it holds it behind a ``threading.Event`` (a gate) and checks what happened in which order.

Storage failures are injected through storage backends registered by URL scheme (``register_scheme``), never by
patching the library: ``failing://`` raises from ``write`` once a budget of writes is spent, ``gated://`` blocks
each ``write`` until the test opens a gate. The S3 outage test stops moto's real server in the middle of a flush.
"""

from __future__ import annotations

import copy
import json
import os
import random
import threading
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn

import ckpt
import ckpt.checkpointer  # imported now: it binds ``copy_all`` at import, before ``copier_gate`` patches staging's
import ckpt.staging
import formats.writer
from ckpt.errors import StorageError
from formats.storage import Storage, register_scheme
from formats.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(120)


# -- a small model, its training step, and the reference copy of its state ------------------------------------


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: parameters the optimizer updates, buffers the forward updates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def build(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def forward_backward(model: Net, g: torch.Generator) -> float:
    loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
    loss.backward()
    return float(loss.detach())


def train_step(model: Net, opt: torch.optim.Optimizer, sched: Any, g: torch.Generator) -> float:
    loss = forward_backward(model, g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss


def reference(model: Net, opt: torch.optim.Optimizer, sched: Any | None = None) -> dict[str, Any]:
    """A synchronous deep copy of the state, keyed as the checkpoint keys it (``model/...``, ``optim/state/...``)."""
    out: dict[str, Any] = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim/state/{names[id(p)]}/{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    out["optim/param_groups/0/lr"] = opt.param_groups[0]["lr"]
    if sched is not None:
        out["sched"] = copy.deepcopy(sched.state_dict())
    return out


def assert_matches(path: str | Path, ref: dict[str, Any], where: str,
                   storage_options: dict[str, Any] | None = None) -> None:
    """The committed checkpoint at ``path`` holds exactly ``ref`` (every tensor bit-exact, every model/optim key)."""
    with ckpt.open(str(path), storage_options=storage_options) as r:
        state = r.state()
        stored = {k for k in r.keys() if k.startswith(("model/", "optim/state/"))}
        expected = {k for k in ref if k.startswith(("model/", "optim/state/"))}
        assert stored == expected, f"{where}: keys differ: {sorted(stored ^ expected)}"
        bad = []
        for k, v in ref.items():
            if k == "sched":
                if state["sched"] != v:
                    bad.append(f"sched: {state['sched']} != {v}")
                continue
            got = r.read(k)
            if isinstance(v, torch.Tensor):
                if got.dtype != v.dtype or not torch.equal(got, v):
                    bad.append(f"{k}: {got} != {v}")
            elif got != v:
                bad.append(f"{k}: {got!r} != {v!r}")
    assert not bad, f"{where}: snapshot differs from the state at its step:\n  " + "\n  ".join(bad)


def step_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:09d}"


def latest_pointer(root: str | Path) -> int | None:
    p = Path(root) / "latest"
    return int(p.read_text().strip()) if p.exists() else None


def step_dirs_with_files(root: str | Path) -> set[int]:
    return {int(d.name[5:]) for d in Path(root).glob("step_*") if any(f.is_file() for f in d.rglob("*"))}


def state_of(model: Net, opt: torch.optim.Optimizer, sched: Any, step: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "optim": opt, "sched": sched, "step": step, **extra}


# -- test storage backends: registered by scheme, as any backend is ------------------------------------------


class FailingStorage(LocalStorage):
    """A local directory whose ``write`` raises ``StorageError`` (as a full disk would) once
    ``writes_left`` writes have been spent; ``writes_left = None`` never fails. Shared by every instance.

    Streamed files (``open_writer``) go through the base class's buffering writer, i.e. through ``write``, so
    the injected failure covers the Checkpointer's streaming flushes too."""

    def open_writer(self, path: str) -> Any:
        return Storage.open_writer(self, path)

    writes_left: ClassVar[int | None] = None
    failures: ClassVar[int] = 0
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def write(self, path: str, buffers: Sequence[Any]) -> int:
        with FailingStorage._lock:
            if FailingStorage.writes_left is not None:
                if FailingStorage.writes_left <= 0:
                    FailingStorage.failures += 1
                    raise StorageError(f"writing {self.full_path(path)}: [Errno 28] No space left on device (injected)")
                FailingStorage.writes_left -= 1
        return super().write(path, buffers)


class GatedStorage(LocalStorage):
    """A local directory whose ``write`` waits until ``gate`` is set: a tier as slow as the test wants.
    Streamed files go through ``write`` as in ``FailingStorage``."""

    def open_writer(self, path: str) -> Any:
        return Storage.open_writer(self, path)

    gate: ClassVar[threading.Event] = threading.Event()
    writes_done: ClassVar[int] = 0

    def write(self, path: str, buffers: Sequence[Any]) -> int:
        assert GatedStorage.gate.wait(60), "the test never opened the gate"
        n = super().write(path, buffers)
        GatedStorage.writes_done += 1
        return n


register_scheme("failing", lambda url, opts: FailingStorage(url.split("://", 1)[1], opts))
register_scheme("gated", lambda url, opts: GatedStorage(url.split("://", 1)[1], opts))


@pytest.fixture
def failing() -> Iterable[type[FailingStorage]]:
    FailingStorage.writes_left, FailingStorage.failures = None, 0
    yield FailingStorage
    FailingStorage.writes_left = None


@pytest.fixture
def gate() -> Iterable[threading.Event]:
    GatedStorage.gate = threading.Event()
    GatedStorage.writes_done = 0
    yield GatedStorage.gate
    GatedStorage.gate.set()  # never leave a flush thread blocked


def set_later(event: threading.Event, delay_secs: float) -> threading.Thread:
    t = threading.Timer(delay_secs, event.set)
    t.daemon = True
    t.start()
    return t


# -- 1. a snapshot equals the state at the step it names ------------------------------------------------------


def test_every_snapshot_equals_the_state_at_its_step(tmp_path: Path) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(1)
    refs: dict[int, dict[str, Any]] = {}
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        for step in range(1, 9):
            train_step(model, opt, sched, g)  # the next step runs at once, while copies and flushes are pending
            refs[step] = reference(model, opt, sched)
            h = cp.save(step, state_of(model, opt, sched, step))
            assert isinstance(h, ckpt.SnapshotHandle) and h.step == step
        cp.wait()
        assert cp.steps("disk") == list(range(1, 9)) and cp.latest_step() == 8
    assert latest_pointer(tmp_path) == 8
    for step, ref in refs.items():
        assert_matches(step_path(tmp_path, step), ref, f"step {step}")
        with ckpt.open(str(step_path(tmp_path, step))) as r:
            assert r.read("step") == step
            assert "rng/rank_00000/torch_cpu" in r, "the per-rank RNG is saved automatically"
    # Nothing was lazy that could change outside optimizer.step(): BN statistics and counters were copied eagerly.
    m = [x for x in _metrics(tmp_path) if x["step"] == 8][0]
    assert 0 < m["lazy_bytes"] < m["staged_bytes"]


def test_in_place_changes_after_save_do_not_leak(tmp_path: Path, copier_gate: threading.Event) -> None:
    """BN statistics, a CPU-side extra and a counter are mutated right after ``save`` returns, while the lazy
    copies are still held: the snapshot still holds the values of its step."""
    model, opt, sched = build()
    g = torch.Generator().manual_seed(2)
    train_step(model, opt, sched, g)
    extra = torch.arange(5, dtype=torch.float64)
    counter = torch.tensor(7)
    ref = reference(model, opt, sched)
    ref_extra, ref_counter = extra.clone(), counter.clone()
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        h = cp.save(1, state_of(model, opt, sched, 1, extra={"noise": extra, "counter": counter}))
        assert not h.done(), "the lazy copies are held: the snapshot cannot be done yet"
        with torch.no_grad():
            extra.add_(100.0)
            counter += 1
            model.bn.running_mean.add_(100.0)
            model.bn.running_var.mul_(3.0)
            model.bn.num_batches_tracked += 5
            # A forward pass in training mode updates the BN statistics in place as well.
            model(torch.randn(8, 6, generator=g))
        copier_gate.set()
        assert h.wait(60) and h.done() and not h.errors
        cp.wait()
    assert_matches(step_path(tmp_path, 1), ref, "step 1")
    with ckpt.open(str(step_path(tmp_path, 1))) as r:
        assert torch.equal(r.read("extra/noise"), ref_extra) and torch.equal(r.read("extra/counter"), ref_counter)


def test_optimizer_pre_step_hook_waits_for_the_lazy_copies(tmp_path: Path, copier_gate: threading.Event) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(3)
    train_step(model, opt, sched, g)
    ref = reference(model, opt, sched)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        h = cp.save(1, state_of(model, opt, sched, 1))
        forward_backward(model, g)  # the next step's forward and backward run while the copy is held
        assert not h.done()
        set_later(copier_gate, 0.2)
        opt.step()  # the pre-step hook must hold this update until the copy of step 1 is complete
        assert copier_gate.is_set(), "optimizer.step() ran before the snapshot's lazy copies were released"
        opt.zero_grad()
        sched.step()
        m1 = cp.metrics[-1]
        assert m1.step == 1 and m1.lazy_wait_secs > 0
        cp.wait()
        assert cp.steps("disk") == [1]
    assert_matches(step_path(tmp_path, 1), ref, "step 1 (taken before an update the hook held)")


def test_wait_for_staging_guards_updates_by_hand(tmp_path: Path, copier_gate: threading.Event) -> None:
    """A loop that changes parameters outside ``optimizer.step()`` calls ``wait_for_staging()`` first."""
    model, opt, sched = build()
    train_step(model, opt, sched, torch.Generator().manual_seed(4))
    ref = reference(model, opt, sched)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        cp.save(1, state_of(model, opt, sched, 1))
        set_later(copier_gate, 0.2)
        blocked_secs = cp.wait_for_staging()
        assert copier_gate.is_set() and blocked_secs > 0
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)  # an update by hand, after the wait
        assert cp.wait_for_staging() == 0.0, "nothing left to wait for"
        cp.wait()
    assert_matches(step_path(tmp_path, 1), ref, "step 1")


def test_without_an_optimizer_everything_is_copied_before_save_returns(tmp_path: Path,
                                                                      copier_gate: threading.Event) -> None:
    """Nothing would wait for a lazy copy of a bare module, so nothing may be lazy (docs/decisions.md)."""
    model, opt, sched = build()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        h = cp.save(1, {"model": model})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        copier_gate.set()
        h.wait(60)
        cp.wait()
        assert cp.metrics[-1].lazy_bytes == 0
    with ckpt.open(str(step_path(tmp_path, 1))) as r:
        for k, v in ref.items():
            assert torch.equal(r.read(f"model/{k}"), v), k


# -- 3. failures of a tier in the middle of a flush -----------------------------------------------------------


SMALL_FILES = ckpt.SaveOptions(files_per_rank=4)


def test_failing_remote_tier(tmp_path: Path, failing: type[FailingStorage]) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(5)
    disk, remote_dir = tmp_path / "disk", tmp_path / "remote"
    refs: dict[int, dict[str, Any]] = {}
    cp = ckpt.Checkpointer(disk, disk_every=1, remote=f"failing://{remote_dir}", remote_every=1, keep_last=None,
                           save_options=SMALL_FILES)
    try:
        for step in (1, 2):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        # Step 3: the remote tier's fourth write fails, after three data files of the step were written.
        failing.writes_left = 3
        train_step(model, opt, sched, g)
        refs[3] = reference(model, opt, sched)
        h3 = cp.save(3, state_of(model, opt, sched, 3))
        assert h3.wait(60) and h3.errors
        assert failing.failures >= 1
        assert list((remote_dir / "step_000000003" / "data").iterdir()), "the flush failed midway, not before it"

        # Nothing incomplete is committed; the disk tier (independent of the remote one) committed step 3.
        assert cp.steps("remote") == [1, 2] and latest_pointer(remote_dir) == 2
        assert cp.steps("disk") == [1, 2, 3] and latest_pointer(disk) == 3
        with pytest.raises(ckpt.IncompleteCheckpointError):
            ckpt.open(str(remote_dir / "step_000000003"))
        assert_matches(remote_dir / "step_000000002", refs[2], "remote step 2 after the failure")

        # The failure is raised on the next call, naming the tier and the step; then it is gone.
        train_step(model, opt, sched, g)
        with pytest.raises(ckpt.TierError) as ei:
            cp.save(4, state_of(model, opt, sched, 4))
        assert isinstance(ei.value, ckpt.CheckpointError)
        msg = str(ei.value)
        assert "'remote'" in msg and "step 3" in msg and "No space left" in msg, msg

        # Training and snapshots go on; the tier recovered, the next remote commit cleans the failed step up.
        failing.writes_left = None
        for step in (5, 6):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("remote") == [1, 2, 5, 6] and latest_pointer(remote_dir) == 6
        assert step_dirs_with_files(remote_dir) == {1, 2, 5, 6}, "the failed step's data files were not cleaned up"
        assert cp.steps("disk") == [1, 2, 3, 5, 6]
        m3 = next(m for m in cp.metrics if m.step == 3)
        assert m3.tiers["remote"]["ok"] is False and "No space left" in m3.tiers["remote"]["error"]
        assert m3.tiers["disk"]["ok"] is True
    finally:
        failing.writes_left = None
        cp.close()
    for step in (2, 5, 6):
        assert_matches(remote_dir / step_path("", step), refs[step], f"remote step {step}")


def test_failing_disk_tier(tmp_path: Path, failing: type[FailingStorage]) -> None:
    """The root itself fails: the error surfaces at ``wait()``; the last commit is restored by a new process."""
    model, opt, sched = build()
    g = torch.Generator().manual_seed(6)
    root = tmp_path / "disk"
    refs: dict[int, dict[str, Any]] = {}
    cp = ckpt.Checkpointer(f"failing://{root}", disk_every=1, keep_last=2, save_options=SMALL_FILES)
    try:
        for step in (1, 2):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        failing.writes_left = 1
        train_step(model, opt, sched, g)
        cp.save(3, state_of(model, opt, sched, 3))
        with pytest.raises(ckpt.TierError, match=r"tier 'disk' step 3") as ei:
            cp.wait()
        assert "No space left" in str(ei.value)
        assert cp.steps("disk") == [1, 2] and latest_pointer(root) == 2
        assert cp.latest_step() == 3, "step 3 is still held by the memory tier"

        # What a new process would see: step 2, loadable, bit-exact.
        model2, opt2, sched2 = build(seed=99)
        state2 = state_of(model2, opt2, sched2, 0)
        with ckpt.Checkpointer(f"failing://{root}", disk_every=1) as cp2:
            assert cp2.latest_step() == 2
            assert cp2.restore(state2) == 2
        assert state2["step"] == 2
        for k, v in reference(model2, opt2, sched2).items():
            assert (torch.equal(v, refs[2][k]) if isinstance(v, torch.Tensor) else v == refs[2][k]), k

        failing.writes_left = None
        for step in (4, 5, 6):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("disk") == [5, 6] and latest_pointer(root) == 6
        assert step_dirs_with_files(root) == {5, 6}
    finally:
        failing.writes_left = None
        cp.close()
    assert_matches(step_path(root, 6), refs[6], "step 6 after recovery")


S3_FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


@pytest.mark.s3
def test_s3_outage_during_a_remote_flush(tmp_path: Path, s3_server_running: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from formats.storage.fsspec_backend import FsspecStorage

    s3 = s3_server_running
    url = s3.url("checkpointer")
    opts = {**s3.storage_options, **S3_FAST_FAIL}
    model, opt, sched = build()
    g = torch.Generator().manual_seed(7)
    refs: dict[int, dict[str, Any]] = {}

    # The server goes away right after the first data file of step 4 reached it: a flush cut in the middle.
    real_write = FsspecStorage.write
    cut = threading.Event()

    def write(self: FsspecStorage, path: str, buffers: Sequence[Any]) -> int:
        n = real_write(self, path, buffers)
        if "step_000000004" in self.url and not cut.is_set():
            cut.set()
            s3.stop()
        return n

    monkeypatch.setattr(FsspecStorage, "write", write)
    cp = ckpt.Checkpointer(tmp_path / "disk", disk_every=1, remote=url, remote_every=2, keep_last=None,
                           storage_options=opts, save_options=SMALL_FILES)
    try:
        for step in (1, 2, 3):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("remote") == [2]
        train_step(model, opt, sched, g)
        refs[4] = reference(model, opt, sched)
        h4 = cp.save(4, state_of(model, opt, sched, 4))
        assert h4.wait(120), "the remote flush hung during the outage"
        assert cut.is_set() and not s3.running and h4.errors

        # The error surfaces at the next call; training and disk snapshots go on while the server is down.
        with pytest.raises(ckpt.TierError) as ei:
            cp.wait()
        assert "'remote'" in str(ei.value) and "step 4" in str(ei.value), str(ei.value)
        train_step(model, opt, sched, g)
        refs[5] = reference(model, opt, sched)
        cp.save(5, state_of(model, opt, sched, 5))
        cp.wait()
        assert cp.steps("disk") == [1, 2, 3, 4, 5]
        with pytest.raises(ckpt.StorageError):
            cp.steps("remote")  # asked for explicitly: an unreachable tier is an error, not an empty list
        assert cp.steps() == [1, 2, 3, 4, 5] and cp.latest_step() == 5, "an unreachable remote hides the disk tier"
        # The last committed snapshot stays loadable during the outage (memory, then disk).
        model2, opt2, sched2 = build(seed=99)
        assert cp.restore(state_of(model2, opt2, sched2, 0), step=3) == 3
        assert not diff(reference(model2, opt2, sched2), refs[3])

        # The server is back: step 4 was never committed there, step 2 still loads, step 6 commits.
        s3.start()
        prefix = url.split("/", 3)[3]

        def remote_latest() -> int:
            return int(s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/latest")["Body"].read())

        assert cp.steps("remote") == [2] and remote_latest() == 2
        assert_matches(f"{url}/step_000000002", refs[2], "remote step 2 after the outage", opts)
        train_step(model, opt, sched, g)
        refs[6] = reference(model, opt, sched)
        cp.save(6, state_of(model, opt, sched, 6))
        cp.wait()
        assert cp.steps("remote") == [2, 6] and remote_latest() == 6
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/")
                .get("Contents", [])]
        assert not [k for k in keys if "step_000000004" in k], f"step 4's partial upload was not cleaned up: {keys}"
    finally:
        s3.start()
        cp.close()

    # A new process restoring from the remote tier alone gets steps 2 and 6, bit-exact.
    for step in (2, 6):
        model2, opt2, sched2 = build(seed=99)
        state2 = state_of(model2, opt2, sched2, 0)
        with ckpt.Checkpointer(tmp_path / "empty", disk_every=0, remote=url, remote_every=2,
                               storage_options=opts) as cp2:
            assert cp2.steps() == [2, 6]
            assert cp2.restore(state2, step=step) == step
        got = reference(model2, opt2, sched2)
        bad = [k for k, v in refs[step].items()
               if not (torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v)]
        assert not bad and state2["step"] == step, f"remote step {step}: {bad}"


# -- 4. back-pressure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2])
def test_backpressure_when_the_pool_is_full(tmp_path: Path, gate: threading.Event, slots: int) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(8)
    with ckpt.Checkpointer(f"gated://{tmp_path}", disk_every=1, keep_last=None, memory_slots=slots) as cp:
        # Snapshots that fit in free slots return while the tier is still blocked.
        for step in range(1, slots):
            train_step(model, opt, sched, g)
            cp.save(step, state_of(model, opt, sched, step))
            assert not gate.is_set() and GatedStorage.writes_done == 0
        # Every slot is now held by a snapshot waiting for the blocked tier (or by the memory tier's latest one):
        # the next save cannot return before the gate opens and a flush completes.
        train_step(model, opt, sched, g)
        cp.save(slots, state_of(model, opt, sched, slots))
        train_step(model, opt, sched, g)
        set_later(gate, 0.3)
        cp.save(slots + 1, state_of(model, opt, sched, slots + 1))
        assert gate.is_set(), "save returned although every slot was busy"
        m = cp.metrics[-1]
        assert m.step == slots + 1 and m.backpressure_wait_secs > 0
        cp.wait()
        assert cp.steps("disk") == list(range(1, slots + 2))
    assert not (tmp_path / "metrics").exists(), "metrics go to <root>/metrics only for a local root"


def test_pool_is_allocated_once_and_reused(tmp_path: Path) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(9)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=2, memory_slots=2) as cp:
        buffers: set[int] = set()
        for step in range(1, 7):
            train_step(model, opt, sched, g)
            cp.save(step, state_of(model, opt, sched, step))
            cp.wait()
            buffers |= {s.buffer.data_ptr() for s in cp.pool.slots if s.buffer.numel()}
            if step == 2:
                allocated = cp.pool.allocated_bytes
        assert len(buffers) == 2, "slots were reallocated instead of reused"
        assert cp.pool.allocated_bytes == allocated


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only; elsewhere the option is a no-op")
@pytest.mark.parametrize("priority", ["idle", "normal"])
def test_background_priority_schedules_copy_and_flush_threads(tmp_path: Path, priority: str) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(12)
    policies: dict[str, int] = {}
    record = ckpt.staging.copy_all

    def copy_and_record(*args: Any, **kwargs: Any) -> None:
        policies["copy"] = os.sched_getscheduler(0)
        record(*args, **kwargs)

    write_file = formats.writer.write_file

    def write_and_record(*args: Any, **kwargs: Any) -> Any:
        policies[threading.current_thread().name] = os.sched_getscheduler(0)
        return write_file(*args, **kwargs)

    ckpt.staging.copy_all, formats.writer.write_file = copy_and_record, write_and_record
    try:
        with ckpt.Checkpointer(tmp_path, disk_every=1, background_priority=priority) as cp:
            train_step(model, opt, sched, g)
            ref = reference(model, opt, sched)
            cp.save(1, state_of(model, opt, sched, 1))
            cp.wait()
    finally:
        ckpt.staging.copy_all, formats.writer.write_file = record, write_file
    expected = os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the training thread must keep its policy"
    assert "copy" in policies and any(n.startswith("ckpt-write") or n.startswith("ckpt-flush") for n in policies)
    assert set(policies.values()) == {expected}, policies  # the copier, and the writers the flush thread started
    assert_matches(step_path(tmp_path, 1), ref, "step 1")
    with pytest.raises(ValueError, match="background_priority"):
        ckpt.Checkpointer(tmp_path, background_priority="low")


# -- 5. retention ---------------------------------------------------------------------------------------------


def test_keep_last_leaves_the_newest_commits(tmp_path: Path) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(10)
    refs = {}
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=3) as cp:
        for step in range(1, 9):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("disk") == [6, 7, 8]
    assert step_dirs_with_files(tmp_path) == {6, 7, 8}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        "step_000000006", "step_000000007", "step_000000008"], "pruned step directories are left behind"
    assert latest_pointer(tmp_path) == 8
    for step in (6, 7, 8):
        assert_matches(step_path(tmp_path, step), refs[step], f"step {step}")


def test_keep_every_keeps_milestones_on_each_tier(tmp_path: Path) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(11)
    disk, remote = tmp_path / "disk", tmp_path / "remote"
    with ckpt.Checkpointer(disk, disk_every=1, keep_last=2, keep_every=4, remote=f"file://{remote}",
                           remote_every=2, remote_keep_last=1) as cp:
        for step in range(1, 11):
            train_step(model, opt, sched, g)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("disk") == [4, 8, 9, 10]
        assert cp.steps("remote") == [4, 8, 10]
        assert cp.steps() == [4, 8, 9, 10] and cp.latest_step() == 10
    assert step_dirs_with_files(disk) == {4, 8, 9, 10} and latest_pointer(disk) == 10
    assert step_dirs_with_files(remote) == {4, 8, 10} and latest_pointer(remote) == 10


# -- 6. the full training state -------------------------------------------------------------------------------


class Sampler:
    """A user's Stateful sampler: a shuffled order per epoch and a position in it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def next_batch(self, size: int) -> list[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        out = []
        for _ in range(size):
            out.append(order[self.pos])
            self.pos += 1
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.pos, self.seed = sd["epoch"], sd["pos"], sd["seed"]


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def make_full_state(data: torch.Tensor) -> dict[str, Any]:
    """Model, AdamW, LR scheduler, a CPU GradScaler, a Stateful sampler, a step counter and user extras."""
    model, opt, sched = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "sampler": Sampler(len(data), seed=3),
            "step": 0, "extra": {"tokens_seen": 0, "ema": torch.zeros(3)}}


def run_steps(state: dict[str, Any], data: torch.Tensor, steps: Iterable[int], cp: Any = None) -> list[float]:
    model, opt, sched, scaler, sampler = (state[k] for k in ("model", "optim", "sched", "scaler", "sampler"))
    losses = []
    for step in steps:
        x = data[sampler.next_batch(8)] + 0.01 * torch.randn(8, 6) + random.random() * 0.01 \
            + float(np.random.rand()) * 0.01
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        state["extra"]["ema"].mul_(0.9).add_(model(x).detach().mean(0), alpha=0.1)
        state["extra"]["tokens_seen"] += 8
        state["step"] = step
        losses.append(float(loss.detach()))
        if cp is not None:
            cp.save(step, state)
    return losses


def snapshot_of(state: dict[str, Any]) -> dict[str, Any]:
    model, opt = state["model"], state["optim"]
    out = reference(model, opt, state["sched"])
    out["scaler"] = state["scaler"].state_dict()
    out["sampler"] = state["sampler"].state_dict()
    out["step"] = state["step"]
    out["tokens_seen"] = state["extra"]["tokens_seen"]
    out["ema"] = state["extra"]["ema"].clone()
    return out


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]


def test_full_training_state_restores_from_memory_and_from_disk(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(12)
    data = torch.randn(20, 6, generator=g)
    random.seed(5)
    np.random.seed(5)
    state = make_full_state(data)
    with ckpt.Checkpointer(tmp_path, disk_every=2, keep_last=None) as cp:
        run_steps(state, data, range(1, 5), cp)  # disk: 2, 4; memory: 4
        cp.wait()
        saved = snapshot_of(state)
        assert saved["scaler"]["scale"] != 2.0**10, "the GradScaler state moved (growth) before the save"
        generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
        after = draws()  # the random draws that follow step 4
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        continuing = run_steps(state, data, range(5, 8))  # no saves: training moves on
        assert diff(snapshot_of(state), saved), "training did not change the state"
        assert cp.steps("memory") == [4] and cp.steps("disk") == [2, 4]

        # From memory, in the same process.
        assert cp.restore(state) == 4
        from_memory = snapshot_of(state)
        assert not diff(from_memory, saved), diff(from_memory, saved)
        r, n, t = draws()
        assert (r, n) == after[:2] and torch.equal(t, after[2]), "the RNG streams were not restored from memory"
        assert cp.restore(state) == 4
        assert run_steps(state, data, range(5, 8)) == continuing, "training after a restore from memory diverged"

    # From disk, in a "new process": a new Checkpointer on the same root and a differently initialised state.
    random.seed(77)
    np.random.seed(77)
    torch.manual_seed(77)
    state2 = make_full_state(data)
    with torch.no_grad():
        for p in state2["model"].parameters():
            p.add_(1.0)
    with ckpt.Checkpointer(tmp_path, disk_every=2) as cp2:
        assert cp2.steps() == [2, 4] and cp2.latest_step() == 4
        assert cp2.restore(state2) == 4
        from_disk = snapshot_of(state2)
        assert not diff(from_disk, saved), diff(from_disk, saved)
        r, n, t = draws()
        assert (r, n) == after[:2] and torch.equal(t, after[2]), "the RNG streams were not restored from disk"
        assert cp2.restore(state2) == 4
        assert run_steps(state2, data, range(5, 8)) == continuing, "training after a restore from disk diverged"


def test_rng_restored_so_the_next_draws_match(tmp_path: Path) -> None:
    model, opt, sched = build()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # a cached gaussian is part of python's state
    with ckpt.Checkpointer(tmp_path, disk_every=1) as cp:
        cp.save(1, {"model": model, "optim": opt})
        expected = (random.gauss(0, 1), random.random(), np.random.randn(3).tolist(), torch.randn(5))
        for _ in range(3):
            draws()
        assert cp.restore({"model": model, "optim": opt}) == 1  # from memory
        got = (random.gauss(0, 1), random.random(), np.random.randn(3).tolist(), torch.randn(5))
        assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
        cp.wait()
    for _ in range(3):
        draws()
    with ckpt.Checkpointer(tmp_path, disk_every=1) as cp2:
        assert cp2.restore({"model": model, "optim": opt}) == 1  # from disk
    got = (random.gauss(0, 1), random.random(), np.random.randn(3).tolist(), torch.randn(5))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_memory_tier_has_its_own_cadence(tmp_path: Path) -> None:
    """``memory_every=1, disk_every=3``: the newest step lives in memory only, a new process sees disk's."""
    model, opt, sched = build()
    g = torch.Generator().manual_seed(13)
    refs = {}
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=3, keep_last=None) as cp:
        for step in range(1, 6):
            train_step(model, opt, sched, g)
            refs[step] = reference(model, opt, sched)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert cp.steps("memory") == [5] and cp.steps("disk") == [3] and cp.latest_step() == 5
        assert cp.steps() == [3, 5]
        train_step(model, opt, sched, g)
        state = state_of(model, opt, sched, 0)
        assert cp.restore(state) == 5 and state["step"] == 5
        assert not diff(reference(model, opt, sched), refs[5])
        assert cp.restore(state, step=3) == 3 and state["step"] == 3  # an older step: from disk
        assert not diff(reference(model, opt, sched), refs[3])
        with pytest.raises(ckpt.CheckpointNotFoundError, match="step 4"):
            cp.restore(state, step=4)
    with ckpt.Checkpointer(tmp_path, disk_every=3) as cp2:
        assert cp2.latest_step() == 3 and cp2.steps("memory") == []


def test_empty_root_has_nothing_to_restore(tmp_path: Path) -> None:
    model, opt, sched = build()
    with ckpt.Checkpointer(tmp_path / "nothing") as cp:
        assert cp.latest_step() is None and cp.steps() == []
        with pytest.raises(ckpt.CheckpointNotFoundError):
            cp.restore(state_of(model, opt, sched, 0))


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="disk_every"):
        ckpt.Checkpointer(tmp_path, disk_every=-1)
    with pytest.raises(ValueError, match="remote"):
        ckpt.Checkpointer(tmp_path, remote_every=5)


# -- metrics --------------------------------------------------------------------------------------------------


def _metrics(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / "metrics" / "rank_00000.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_metrics_per_snapshot(tmp_path: Path) -> None:
    model, opt, sched = build()
    g = torch.Generator().manual_seed(14)
    with ckpt.Checkpointer(tmp_path, memory_every=1, disk_every=2, keep_last=None) as cp:
        for step in range(1, 5):
            train_step(model, opt, sched, g)
            cp.save(step, state_of(model, opt, sched, step))
        cp.wait()
        assert [m.step for m in cp.metrics] == [1, 2, 3, 4]
        assert all(isinstance(m, ckpt.SnapshotMetrics) for m in cp.metrics)
    lines = _metrics(tmp_path)
    assert sorted(x["step"] for x in lines) == [1, 2, 3, 4]
    for x in lines:
        assert x["rank"] == 0 and x["staged_bytes"] > 0
        for k in ("request_secs", "backpressure_wait_secs", "lazy_wait_secs", "copy_secs", "eager_copy_secs"):
            assert x[k] >= 0, k
        if x["step"] % 2 == 0:
            assert x["tiers"]["disk"]["ok"] and x["tiers"]["disk"]["bytes"] > 0
        else:
            assert x["tiers"] == {}, "memory-only snapshots flush nowhere"


def test_copy_all_batches_copy_every_tensor_and_report_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched copies (one ``_foreach_copy_`` per batch): mixed dtypes, non-contiguous sources, empty tensors."""
    monkeypatch.setattr(ckpt.staging, "COPY_BATCH_BYTES", 4096)
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(40, 30, generator=g).t(), torch.randint(0, 9, (5000,), generator=g), torch.empty(0),
            torch.randn(3, generator=g).to(torch.bfloat16), torch.tensor(7.0), torch.randn(64, 64, generator=g)[::2]]
    dsts = [torch.zeros(s.shape, dtype=s.dtype) for s in srcs]
    seen: list[int] = []
    ckpt.staging.copy_all(list(zip(srcs, dsts)), seen.append)
    assert sum(seen) == len(srcs) and len(seen) > 1  # several batches, every copy counted once
    for s, d in zip(srcs, dsts):
        assert torch.equal(s, d)
