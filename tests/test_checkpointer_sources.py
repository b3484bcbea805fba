"""What ``Checkpointer.save`` reuses from one save to the next, and what makes it look again.

``save`` walks the state once (``flatten_state``) and keeps, per key, the tensor's layout, its local views and
whether its copy is lazy (``ckpt.snapshot_layout.Sources``), reusing them while the key's tensor is the same
memory. Each test changes the state between two saves of one Checkpointer in a way a training loop can (a
parameter's ``.data`` replaced, a buffer reassigned, optimizer state reloaded, a parameter dropped from the
optimizer, a tensor resized or re-pointed with ``set_``), holds the lazy copies, edits the state in place right
after ``save`` returns, and checks bit-exactly that the snapshot holds the values of its own step.
"""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.errors import UnsupportedStateError
from ckpt.rng import RNGState
from ckpt.state import flatten, flatten_state, resolve
from tests.test_checkpointer import Sampler, build, reference, state_of, step_path, train_step

pytestmark = pytest.mark.timeout(120)


def snapshot(cp: ckpt.Checkpointer, copier_gate: threading.Event, step: int, state: dict[str, Any],
             edit: Any = None) -> ckpt.SnapshotHandle:
    """Save with the lazy copies held, run ``edit`` (in-place changes that must not leak), release, wait."""
    copier_gate.clear()  # holds this snapshot's lazy copies until set again
    h = cp.save(step, state)
    if edit is not None:
        with torch.no_grad():
            edit()
    copier_gate.set()
    assert h.wait(60) and not h.errors, h.errors
    return h


def trained(seed: int) -> tuple[Any, torch.optim.Optimizer, Any, torch.Generator]:
    """The test model after one training step, and the generator of its batches."""
    model, opt, sched = build()
    g = torch.Generator().manual_seed(seed)
    train_step(model, opt, sched, g)
    return model, opt, sched, g


def read(root: Path, step: int, key: str) -> torch.Tensor:
    with ckpt.open(str(step_path(root, step))) as r:
        return r.read(key)


def test_unchanged_state_reuses_every_tensor_source(tmp_path: Path, copier_gate: threading.Event) -> None:
    model, opt, sched, g = trained(0)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state_of(model, opt, sched, 1))
        first = dict(cp.plans.sources.by_key)
        train_step(model, opt, sched, g)
        snapshot(cp, copier_gate, 2, state_of(model, opt, sched, 2))
        again = cp.plans.sources.by_key
        reused = {k for k in first if again[k] is first[k]}
        # Parameters, buffers and optimizer state are the same memory; RNG states are new tensors every save.
        assert reused == {k for k in first if not k.startswith("rng/")}
        assert {k for k, s in again.items() if s.lazy} == {k for k in again if k.startswith("optim/state/")} | {
            f"model/{n}" for n, _ in model.named_parameters()}


def test_replaced_parameter_data_is_snapshotted_and_stays_guarded(tmp_path: Path,
                                                                  copier_gate: threading.Event) -> None:
    """``.data`` of a parameter replaced between saves: the parameter is still copied lazily (guarded by the
    pre-step hook), and a user tensor that still views its old memory, lazy before, is now copied eagerly."""
    model, opt, sched, g = trained(1)
    alias = model.fc1.weight.detach()  # shares the parameter's memory until .data is replaced
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state_of(model, opt, sched, 1, alias=alias))
        lazy_before = cp.metrics[-1].lazy_bytes
        assert cp.plans.sources.by_key["alias"].lazy
        model.fc1.weight.data = torch.randn(16, 6, generator=g)  # new memory under the same Parameter
        train_step(model, opt, sched, g)
        ref = reference(model, opt, sched)
        alias_then = alias.clone()
        copier_gate.clear()
        h = cp.save(2, state_of(model, opt, sched, 2, alias=alias))
        with torch.no_grad():
            alias.add_(1.0)  # nothing guards it any more: it must have been copied before save returned
        set_later(copier_gate)
        train_step(model, opt, sched, g)  # its optimizer.step() waits for the held copies of step 2
        assert h.wait(60) and not h.errors
        m2 = cp.metrics[-1]
        cp.wait()
        assert m2.step == 2 and m2.lazy_bytes == lazy_before - alias.numel() * alias.element_size()
    assert torch.equal(read(tmp_path, 2, "alias"), alias_then)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(read(tmp_path, 2, k), v), k


def test_reassigned_buffer_is_snapshotted_and_copied_eagerly(tmp_path: Path, copier_gate: threading.Event) -> None:
    model, opt, sched, g = trained(2)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state_of(model, opt, sched, 1))
        model.bn.running_mean = torch.full((16,), 3.0)  # a new buffer tensor
        expected = model.bn.running_mean.clone()
        snapshot(cp, copier_gate, 2, state_of(model, opt, sched, 2), edit=lambda: model.bn.running_mean.add_(1.0))
        cp.wait()
    assert torch.equal(read(tmp_path, 2, "model/bn.running_mean"), expected)


def test_reloaded_optimizer_state_is_snapshotted(tmp_path: Path, copier_gate: threading.Event) -> None:
    model, opt, sched, g = trained(3)
    saved = opt.state_dict()
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state_of(model, opt, sched, 1))
        train_step(model, opt, sched, g)
        opt.load_state_dict(saved)  # new state tensors (copies of step 1's)
        ref = reference(model, opt, sched)
        snapshot(cp, copier_gate, 2, state_of(model, opt, sched, 2))
        cp.wait()
    for k, v in ref.items():
        if k.startswith("optim/state/"):
            assert torch.equal(read(tmp_path, 2, k), v), k


def test_parameter_dropped_from_the_optimizer_is_copied_eagerly(tmp_path: Path, copier_gate: threading.Event) -> None:
    """No key changes (the frozen parameter never had optimizer state), but once it leaves the optimizer's
    parameter groups nothing guards it any more: it must be copied before ``save`` returns."""
    model, opt, sched = build()
    model.fc1.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    train_step(model, opt, sched, g)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state_of(model, opt, sched, 1))
        keys = set(cp.plans.sources.by_key)
        assert cp.plans.sources.by_key["model/fc1.weight"].lazy
        group = opt.param_groups[0]
        group["params"] = [p for p in group["params"] if p is not model.fc1.weight]
        expected = model.fc1.weight.detach().clone()
        snapshot(cp, copier_gate, 2, state_of(model, opt, sched, 2), edit=lambda: model.fc1.weight.mul_(-2.0))
        assert set(cp.plans.sources.by_key) == keys and not cp.plans.sources.by_key["model/fc1.weight"].lazy
        cp.wait()
    assert torch.equal(read(tmp_path, 2, "model/fc1.weight"), expected)


@pytest.mark.parametrize("change", ["resize", "dtype", "set_"])
def test_extra_tensor_changed_in_shape_dtype_or_memory(tmp_path: Path, copier_gate: threading.Event, change: str) -> None:
    model, opt, sched, g = trained(5)
    extra = torch.arange(6, dtype=torch.float32)
    state = state_of(model, opt, sched, 1, extra=extra)
    with ckpt.Checkpointer(tmp_path, disk_every=1, keep_last=None) as cp:
        snapshot(cp, copier_gate, 1, state)
        if change == "resize":
            extra.resize_(2, 5).copy_(torch.arange(10).view(2, 5))
        elif change == "dtype":
            state["extra"] = extra = torch.arange(6, dtype=torch.float64) * 0.5
        else:
            extra.set_(torch.full((6,), 9.0))  # the same tensor object, other memory
        expected = extra.clone()
        state["step"] = 2
        snapshot(cp, copier_gate, 2, state, edit=lambda: extra.add_(100))
        cp.wait()
    got = read(tmp_path, 2, "extra")
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(read(tmp_path, 1, "extra"), torch.arange(6, dtype=torch.float32))


def set_later(ev: threading.Event, delay_secs: float = 0.2) -> None:
    t = threading.Timer(delay_secs, ev.set)
    t.daemon = True
    t.start()


# -- flatten_state: the one walk save uses equals resolve, then flatten ----------------------------------------


class Outer:
    """A Stateful whose state holds another Stateful and a non-dict mapping."""

    def __init__(self) -> None:
        self.inner = Sampler(10, seed=1)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner, "frozen": types.MappingProxyType({"a": 1, 2: torch.ones(2)}), "n": 3}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def test_flatten_state_equals_resolve_then_flatten() -> None:
    model, opt, sched = build()
    train_step(model, opt, sched, torch.Generator().manual_seed(6))
    state = {"model": model, "optim": opt, "sched": sched, "rng": RNGState(0), "outer": Outer(),
             "odd/key~": {7: (1.5, None, True, "s"), "l": [torch.zeros(1), {"x": torch.ones(3)}]}, "step": 4}
    a, b = flatten(resolve(state)[0]), flatten_state(state)
    assert list(a.tensors) == list(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.values == b.values and a.containers == b.containers
    assert "odd~1key~0/7/0" in b.values and b.values["outer/inner/epoch"] == 0
    assert torch.equal(b.tensors["outer/frozen/2"], torch.ones(2))


def test_flatten_state_names_the_key_of_an_unsupported_value() -> None:
    with pytest.raises(UnsupportedStateError, match="extra/when"):
        flatten_state({"extra": {"when": object()}})
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        deep: dict[str, Any] = {}
        deep["self"] = deep
        flatten_state(deep)
