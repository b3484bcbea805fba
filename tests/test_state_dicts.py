"""``ckpt.state_dicts`` replays DCP's key mapping: its results must equal DCP's own, call after call."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from ckpt import state_dicts as sd


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor under two keys
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(x)) + self.frozen(self.emb(x)))


def _train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 1) -> None:
    for i in range(steps):
        x = torch.randint(0, 16, (4,), generator=torch.Generator().manual_seed(i))
        optim.zero_grad()
        model(x).square().mean().backward()
        optim.step()


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                and a.stride() == b.stride() and a.dtype == b.dtype)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _assert_model_equal(model: nn.Module) -> None:
    ours, theirs = sd.model_state_dict(model), get_model_state_dict(model)
    assert list(ours) == list(theirs)  # same keys, same order
    for k in theirs:
        assert _same_value(ours[k], theirs[k]), k


def _assert_optim_equal(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    ours, theirs = sd.optimizer_state_dict(model, optim), get_optimizer_state_dict(model, optim)
    assert _same_value(ours, theirs)


def _make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optim = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    return model, optim


def test_replay_equals_dcp_across_calls_and_changes():
    model, optim = _make()
    _assert_optim_equal(model, optim)  # no state yet: DCP's own path (it initialises the state)
    _train(model, optim)
    for _ in range(3):  # the first call fills the cache, the next ones replay it
        _assert_model_equal(model)
        _assert_optim_equal(model, optim)
        _train(model, optim)
    assert model in sd._MODULES and sd._MODULES[model].order is not None
    assert optim in sd._OPTIMS

    # New tensors behind the same keys: p.data swapped, the optimizer state replaced by load_state_dict.
    model.body[0].weight.data = model.body[0].weight.data.clone()
    optim.load_state_dict(optim.state_dict())
    _assert_model_equal(model)
    _assert_optim_equal(model, optim)
    ours = sd.optimizer_state_dict(model, optim)
    assert ours["state"]["body.0.weight"]["exp_avg"] is optim.state[model.body[0].weight]["exp_avg"]
    # Hyperparameters are read at each call (an LR scheduler changes them between saves).
    optim.param_groups[1]["lr"] = 0.125
    assert sd.optimizer_state_dict(model, optim)["param_groups"][1]["lr"] == 0.125

    # A structural change: a new buffer (new key), a new parameter group.
    model.register_buffer("extra", torch.arange(3.0))
    _assert_model_equal(model)
    assert "extra" in sd.model_state_dict(model)
    new = nn.Parameter(torch.ones(2))
    model.new = new
    optim.add_param_group({"params": [new]})
    _train(model, optim)
    new.grad = torch.ones(2)
    optim.step()
    _assert_optim_equal(model, optim)
    assert "new" in sd.optimizer_state_dict(model, optim)["state"]


@pytest.mark.parametrize("wrap", ["compile", "activation_checkpoint"])
def test_wrapper_prefixes_are_renamed_like_dcp(wrap):
    model, optim = _make()
    if wrap == "compile":
        wrapped = torch.compile(model)  # never run: only its _orig_mod. prefix matters here
    else:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.body = checkpoint_wrapper(model.body)
        wrapped = model
    if wrap == "compile":  # (the checkpoint wrapper strips its prefix in its own state_dict hook)
        assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    _train(model, optim)
    for _ in range(2):
        _assert_model_equal(wrapped)
        _assert_optim_equal(wrapped, optim)
    assert all("_orig_mod" not in k and "_checkpoint_wrapped" not in k for k in sd.model_state_dict(wrapped))
    assert sd._MODULES[wrapped].order is not None  # the renaming is replayed, not recomputed


def test_values_dcp_builds_itself_are_never_replayed():
    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.calls = 0

        def get_extra_state(self):
            self.calls += 1
            return {"calls": self.calls}  # a new object per call: there is nothing to replay

        def set_extra_state(self, state) -> None:
            pass

    m = WithExtra()
    first = sd.model_state_dict(m)
    assert sd._MODULES[m].order is None
    second = sd.model_state_dict(m)
    assert second["_extra_state"] != first["_extra_state"]  # fresh from DCP each time, not a stale copy
    assert list(second) == list(get_model_state_dict(m))


def test_cache_does_not_keep_objects_alive():
    model, optim = _make()
    _train(model, optim)
    sd.model_state_dict(model)
    sd.optimizer_state_dict(model, optim)
    assert model in sd._MODULES and optim in sd._OPTIMS
    refs = [weakref.ref(model), weakref.ref(optim)]
    del model, optim
    gc.collect()
    assert [r() for r in refs] == [None, None]
