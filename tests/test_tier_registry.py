"""Tiers are found by URL scheme (``ckpt.tiers.register_tier``): the Checkpointer builds whatever class is
registered for its ``remote=`` URL, flushes to it through the same ``Tier`` interface, and restores from it.

This is how the snapshot daemon's tier plugs in without ``ckpt`` importing it (DESIGN.md, docs/design.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckpt
from ckpt import tiers
from ckpt.policies import EveryNSteps, KeepLatestN


class RecordingTier(tiers.StorageTier):
    """A tier for ``rec://<dir>``: a local directory, recording every snapshot it flushed."""

    flushed: list[tuple[str, int, int]] = []

    def __init__(self, name: str, url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(name, url.removeprefix("rec://"), *args, **kwargs)

    def flush(self, snapshot: tiers.Snapshot, storage: Any) -> int:
        n = super().flush(snapshot, storage)
        RecordingTier.flushed.append((self.name, snapshot.step, n))
        return n


@pytest.fixture
def rec_scheme() -> Iterator[None]:
    RecordingTier.flushed = []
    tiers.register_tier("rec", RecordingTier)
    yield
    tiers._TIERS.pop("rec", None)


def test_a_registered_scheme_builds_its_tier_and_restores_from_it(tmp_path: Path, rec_scheme: None) -> None:
    w = torch.arange(37 * 5, dtype=torch.float32).reshape(37, 5)
    state = {"w": w.clone(), "step": 0}
    with ckpt.Checkpointer(tmp_path / "disk", disk_every=0, remote=f"rec://{tmp_path / 'rec'}", remote_every=2,
                           memory_every=0, save_rng=False) as cp:
        assert [type(t) for t in cp.tiers] == [RecordingTier]
        for step in (1, 2, 3, 4):
            state["w"].add_(1.0)
            state["step"] = step
            cp.save(step, state)
        cp.wait()
        assert [(n, s) for n, s, _ in RecordingTier.flushed] == [("remote", 2), ("remote", 4)]
        assert all(nbytes >= w.numel() * 4 for _, _, nbytes in RecordingTier.flushed)
        assert cp.steps("remote") == [2, 4]
    target = {"w": torch.zeros_like(w), "step": -1}
    with ckpt.Checkpointer(tmp_path / "disk", disk_every=0, remote=f"rec://{tmp_path / 'rec'}", remote_every=2,
                           save_rng=False) as cp:
        assert cp.restore(target) == 4
    assert torch.equal(target["w"], w + 4) and target["step"] == 4


def test_unregistered_schemes_are_storage_tiers(tmp_path: Path) -> None:
    t = tiers.open_tier("disk", str(tmp_path), EveryNSteps(3), KeepLatestN(1))
    try:
        assert type(t) is tiers.StorageTier and t.due(3) and not t.due(4)
    finally:
        t.close()


@pytest.mark.parametrize("scheme", ["", "Daemon", "1x", "a b", "x://"])
def test_register_tier_refuses_what_is_not_a_scheme(scheme: str) -> None:
    with pytest.raises(ValueError, match="URL scheme"):
        tiers.register_tier(scheme, tiers.StorageTier)
