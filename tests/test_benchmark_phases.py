"""The training_stall benchmark's phase table times ckpt's functions by wrapping them in place. A renamed or
inlined function leaves its row at zero calls without any error, so these check that every row still names code
that a save runs, and that wrapping leaves static methods working and restores everything afterwards."""

import torch

from benchmarks._report import PhaseTimer
from benchmarks._stall_methods import ours_phase_targets
from ckpt import Checkpointer


class _Owner:
    @staticmethod
    def twice(x: int) -> int:
        return 2 * x

    def plus(self, x: int) -> int:
        return x + 1


def test_phase_timer_wraps_static_and_plain_methods_and_restores_them() -> None:
    before = dict(vars(_Owner))
    with PhaseTimer({"static": (_Owner, "twice"), "method": (_Owner, "plus")}) as t:
        assert _Owner().twice(3) == 6 and _Owner.twice(4) == 8
        assert _Owner().plus(1) == 2
    assert t.calls == {"static": 2, "method": 1}
    assert dict(vars(_Owner)) == before


def test_every_phase_of_ours_is_called_by_a_memory_and_disk_save(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    optim = torch.optim.AdamW(model.parameters())
    targets = ours_phase_targets()
    with PhaseTimer(targets) as timer, Checkpointer(tmp_path, memory_every=1, disk_every=1) as cp:
        for step in range(2):
            model(torch.randn(4, 8)).sum().backward()
            optim.step()
            optim.zero_grad()
            cp.save(step, {"model": model, "optim": optim})
        cp.wait()
    assert timer.missing == []
    assert {n for n, c in timer.calls.items() if c == 0} == set(), timer.calls
