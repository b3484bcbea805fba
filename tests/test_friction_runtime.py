"""Issue 21, items 6 and 7: what a new user trips over at run time.

Item 7: a ckpt collective called on some ranks only (``if rank == 0: ckpt.save(...)``) used to hang forever; now the
ranks that arrived raise ``CollectiveTimeoutError`` naming the ranks that did not, and a later call of every rank
works. Item 6: the memory tier keeps what the retention options say (up to ``min(keep_last, memory_slots - 1)``
snapshots), not only the newest.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import ckpt
from ckpt.dist import TIMEOUT_ENV, _Arrivals, collective_timeout_secs
from tests.distributed_utils import run_distributed

#: The collective timeout of the multi-process test, in seconds: short, but far above a 2-rank gloo collective.
SHORT_TIMEOUT_SECS = 3.0


# -- item 7: the arrival protocol, in one process -------------------------------------------------------------------
def test_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout_secs() == 600.0
    assert collective_timeout_secs(7) == 7.0 and collective_timeout_secs(0) is None
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert collective_timeout_secs() == 12.5
    monkeypatch.setenv(TIMEOUT_ENV, "off")
    assert collective_timeout_secs() is None
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ckpt.CheckpointError, match=f"{TIMEOUT_ENV}='soon': expected a positive number"):
        collective_timeout_secs()


def _arrive_all(store: Any, key: str, world: int, timeout_secs: float, ranks: list[int], what: str,
                seqs: dict[int, dict[str, int]]) -> dict[int, BaseException | None]:
    """Rank ``r`` of ``ranks`` arrives at its next collective of group ``key`` (one thread each, each with its own
    sequence numbers ``seqs[r]``, as separate processes have); what each raised."""
    out: dict[int, BaseException | None] = {}

    def one(r: int) -> None:
        try:
            _Arrivals(store, key, r, world, timeout_secs, seqs.setdefault(r, {})).wait_for_all(what)
            out[r] = None
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[r] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_secs + 30)
    return out


def test_arrivals_name_the_missing_ranks_and_recover() -> None:
    """4 simulated ranks on one store: all arrive (passes at once); ranks 0 and 2 alone time out naming 1 and 3;
    then all four arrive again at the same collective and pass, and the next one too."""
    import torch.distributed as dist

    store, key, seqs = dist.HashStore(), "test-group", {}  # type: ignore[var-annotated]
    t0 = time.perf_counter()
    assert _arrive_all(store, key, 4, 5.0, [0, 1, 2, 3], "first", seqs) == {r: None for r in range(4)}
    assert time.perf_counter() - t0 < 2.0
    t0 = time.perf_counter()
    got = _arrive_all(store, key, 4, 1.0, [0, 2], "ckpt.save: checking the destination", seqs)
    assert 0.9 < time.perf_counter() - t0 < 10.0
    for r in (0, 2):
        e = got[r]
        assert isinstance(e, ckpt.CollectiveTimeoutError) and isinstance(e, TimeoutError), e
        assert e.missing_ranks == (1, 3) and e.arrived_ranks == (0, 2), str(e)
        assert "rank(s) [1, 3] never arrived" in str(e) and "ckpt.save: checking the destination" in str(e)
        assert "Every rank of the process group must call" in str(e) and TIMEOUT_ENV in str(e)
    # The ranks that timed out withdrew: every rank's next collective is the same one again, and it passes.
    assert seqs[0] == seqs[1] == seqs[2] == seqs[3] == {key: 1}
    for what in ("again", "and the next"):
        assert _arrive_all(store, key, 4, 5.0, [0, 1, 2, 3], what, seqs) == {r: None for r in range(4)}
    assert seqs[0] == {key: 3}
    # Keys of collectives two behind are deleted as the group moves on (the store does not grow with every save).
    assert not store.check(["ckpt/arrive/test-group/0/who"]) and store.check(["ckpt/arrive/test-group/2/who"])


# -- item 7: ranks really missing, under gloo --------------------------------------------------------------------
def _timed(fn: Any) -> tuple[str, float, tuple[int, ...]]:
    """Run ``fn``; the class name of what it raised ("" if nothing), seconds taken, and the missing ranks named."""
    t0 = time.perf_counter()
    try:
        fn()
        return "", time.perf_counter() - t0, ()
    except ckpt.CollectiveTimeoutError as e:
        return f"CollectiveTimeoutError: {e}", time.perf_counter() - t0, e.missing_ranks
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return f"{type(e).__name__}: {e}", time.perf_counter() - t0, ()


def _some_ranks_only(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Rank 0 alone calls ckpt.save, then ckpt.load, then Checkpointer.save; rank 1 calls none of them. Then both
    save and load together, which must work."""
    import torch.distributed as dist

    os.environ[TIMEOUT_ENV] = str(SHORT_TIMEOUT_SECS)
    # Plain tensors are replicas: every rank holds the same values (an odd-sized weight and bias).
    state = {"w": torch.arange(7, dtype=torch.float32) * 1.5, "b": torch.full((3,), -2.25)}
    out: dict[str, Any] = {}
    if rank == 0:
        out["save"] = _timed(lambda: ckpt.save(state, Path(root) / "alone"))
        out["load"] = _timed(lambda: ckpt.load(state, Path(root) / "nothing_here"))
    dist.barrier()  # a real gloo collective: after the timeouts the group is still usable
    cp = ckpt.Checkpointer(str(Path(root) / "cp"), disk_every=0, memory_every=1, metrics=False)
    if rank == 0:
        out["checkpointer"] = _timed(lambda: cp.save(1, {"model": state}))
    dist.barrier()
    # Every rank together: the numbering of collectives is in step again, saves and loads work.
    ckpt.save(state, str(Path(root) / "together"))
    back = {"w": torch.zeros(7), "b": torch.zeros(3)}
    cp.save(2, {"model": state})
    cp.wait()
    cp.close()
    ckpt.load(back, str(Path(root) / "together"))
    out["together_equal"] = torch.equal(back["w"], state["w"]) and torch.equal(back["b"], state["b"])
    return out


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_rank0_only_save_raises_naming_rank1(tmp_path: Path) -> None:
    """Before the fix rank 0 hung in all_gather_object until the process group's own timeout (run_distributed
    then fails the test): every collective now names the missing rank and the call within the ckpt timeout."""
    r0, r1 = run_distributed(_some_ranks_only, 2, str(tmp_path), timeout_secs=60)
    for op, api in (("save", "ckpt.save"), ("load", "ckpt.load"), ("checkpointer", "Checkpointer.save")):
        text, secs, missing = r0[op]
        assert text.startswith("CollectiveTimeoutError"), (op, text)
        assert missing == (1,), (op, text)
        assert "rank(s) [1] never arrived" in text and f"must call {api}" in text, (op, text)
        assert SHORT_TIMEOUT_SECS * 0.9 < secs < SHORT_TIMEOUT_SECS + 10, (op, secs)
    assert "save" not in r1
    assert r0["together_equal"] and r1["together_equal"]


# -- item 6: the memory tier keeps what the options say ---------------------------------------------------------
def _stage(pool: Any, step: int, tiers: set[str] | None = None) -> Any:
    slot, waited = pool.acquire(64, tiers, timeout_secs=2.0, step=step)
    pool.mark_staged(slot, step)
    return slot, waited


def test_pool_keeps_the_newest_staged_snapshots() -> None:
    from ckpt.pool import HostBufferPool

    pool = HostBufferPool(4, keep_staged=3)
    for step in range(1, 8):
        _stage(pool, step)
        assert pool.staged_steps() == list(range(max(1, step - 2), step + 1))
    assert pool.staged(5) is not None and pool.staged(5).step == 5 and pool.staged(4) is None
    assert pool.latest() is pool.staged(7)
    pool.close()
    with pytest.raises(ValueError, match=r"keep_staged=4\): expected 1 to 3 kept snapshots"):
        HostBufferPool(4, keep_staged=4)


def test_an_older_kept_snapshot_gives_way_instead_of_back_pressure() -> None:
    """3 slots keeping 2: with step 4 being copied and step 3 (the newest) still flushing, step 5 takes the slot of
    kept step 2 at once rather than wait for the flush."""
    from ckpt.pool import HostBufferPool

    pool = HostBufferPool(3, keep_staged=2)
    _stage(pool, 1)
    _stage(pool, 2)
    three, _ = _stage(pool, 3, {"disk"})
    assert pool.staged_steps() == [2, 3]
    four, _ = pool.acquire(64, set(), timeout_secs=2.0, step=4)  # still being copied
    five, waited = pool.acquire(64, set(), timeout_secs=2.0, step=5)
    assert waited < 0.5 and five not in (three, four)
    assert pool.staged_steps() == [3]  # step 2 gave its slot up; the newest stays
    with pytest.raises(TimeoutError):  # nothing else may go: 4 and 5 copying, 3 the newest
        pool.acquire(64, set(), timeout_secs=0.2, step=6)
    pool.close()


def test_memory_keep_rule() -> None:
    from ckpt.policies import memory_keep

    assert [memory_keep(k, 4) for k in (1, 2, 3, 5, None)] == [1, 2, 3, 3, 3]
    assert memory_keep(3, 2) == 1 and memory_keep(3, 1) == 1
    with pytest.raises(ValueError, match="memory_slots=0"):
        memory_keep(3, 0)


class _OddNet(nn.Module):
    """Odd sizes (7 and 3 wide) so that biases and the norm do not fill whole blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.down = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


def _copy_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim/{i}/{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def test_memory_tier_keeps_keep_last_snapshots(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _OddNet()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": optim}
    cp = ckpt.Checkpointer(str(tmp_path / "run"), keep_last=3, memory_slots=4, disk_every=0, metrics=False)
    at5: dict[str, torch.Tensor] = {}
    for step in range(1, 8):
        optim.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        optim.step()
        cp.save(step, state)
        if step == 5:
            at5 = _copy_state(model, optim)
    cp.wait()
    assert cp.steps("memory") == [5, 6, 7]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert cp.restore(state, step=5) == 5
    assert cp.last_restore is not None and cp.last_restore["source"] == "memory"
    now = _copy_state(model, optim)
    assert now.keys() == at5.keys()
    assert [k for k in at5 if not torch.equal(now[k], at5[k])] == []
    cp.close()
