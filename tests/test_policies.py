"""The pure save and retention policies of ``ckpt.policies``, tested with plain data (STYLE 12).

No Checkpointer, no storage: each policy is a function of step numbers. The Checkpointer-level behaviour
(what is left on disk after real commits) is in ``tests/test_checkpointer.py``.
"""

from __future__ import annotations

import pytest

import ckpt
from ckpt.policies import AnyOf, AnySave, EveryNSteps, KeepAll, KeepEveryN, KeepLatestN

pytestmark = pytest.mark.timeout(30)


def test_every_n_steps() -> None:
    assert [s for s in range(0, 13) if EveryNSteps(4).should_save(s)] == [0, 4, 8, 12]
    assert all(EveryNSteps(1).should_save(s) for s in range(10))
    assert not any(EveryNSteps(0).should_save(s) for s in range(10)), "n=0 disables the tier"


def test_any_save() -> None:
    p = AnySave((EveryNSteps(3), EveryNSteps(5)))
    assert [s for s in range(1, 16) if p.should_save(s)] == [3, 5, 6, 9, 10, 12, 15]
    assert not AnySave(()).should_save(3)


def test_keep_latest_n() -> None:
    assert KeepLatestN(3).keep([1, 2, 3, 4, 5]) == {3, 4, 5}
    assert KeepLatestN(3).keep([5, 1, 4]) == {1, 4, 5}, "fewer steps than n: keep them all"
    assert KeepLatestN(2).keep([9, 3, 7, 1]) == {7, 9}, "order of the input does not matter"
    assert KeepLatestN(1).keep([]) == set()


def test_keep_every_n() -> None:
    assert KeepEveryN(10).keep([5, 10, 15, 20, 25]) == {10, 20}
    assert KeepEveryN(1).keep([1, 2, 3]) == {1, 2, 3}


def test_keep_all_and_any_of() -> None:
    assert KeepAll().keep([1, 2, 3]) == {1, 2, 3}
    both = AnyOf((KeepLatestN(2), KeepEveryN(4)))
    assert both.keep(list(range(1, 11))) == {4, 8, 9, 10}
    assert AnyOf(()).keep([1, 2]) == set()


def test_latest_is_always_kept() -> None:
    for n in (1, 2, 5):
        for steps in ([1], [3, 7], list(range(0, 100, 7))):
            assert max(steps) in KeepLatestN(n).keep(steps)
            assert max(steps) in AnyOf((KeepEveryN(1000), KeepLatestN(n))).keep(steps)


@pytest.mark.parametrize("make", [lambda: EveryNSteps(-1), lambda: KeepLatestN(0), lambda: KeepLatestN(-2),
                                  lambda: KeepEveryN(0)])
def test_invalid_arguments_are_refused_at_construction(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="must be >="):
        make()


def test_policies_are_exported_and_frozen() -> None:
    assert ckpt.KeepLatestN is KeepLatestN and ckpt.EveryNSteps is EveryNSteps and ckpt.AnyOf is AnyOf
    p = KeepLatestN(3)
    with pytest.raises(Exception):
        p.n = 4  # type: ignore[misc]
    assert KeepLatestN(3) == p and hash(KeepLatestN(3)) == hash(p)
