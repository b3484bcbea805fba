"""#21 items 2 and 3, as a user meets them: restores that crash-loop a job, and loads that say nothing.

Producers are real: a Hugging Face GPT-2 built from a config with odd sizes (vocabulary 97, width 30, 3 heads of
10, biases and layer norms no degree divides) trained with AdamW, checkpointed by ``ckpt.Checkpointer`` on disk;
a 2-rank gloo job for the collective fallback. Every comparison is ``torch.equal``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.tiers import step_dir
from tests.distributed_utils import run_distributed

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=30, n_layer=2, n_head=3, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _train(model: Any, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _copy(model: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optim": copy.deepcopy(opt.state_dict())}


def _same(model: Any, opt: torch.optim.Optimizer, want: dict[str, Any]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, want["model"][k]), k
    got = opt.state_dict()["state"]
    assert set(got) == set(want["optim"]["state"])
    for i, st in want["optim"]["state"].items():
        for k, v in st.items():
            assert torch.equal(got[i][k], v), (i, k)  # the moments and the step counter


def _flip(step_path: Path) -> Path:
    """Flip one byte in the middle of the largest data file of a committed step."""
    data = max((p for p in (step_path / "data").iterdir()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    return data


def _run(root: Path, steps: int) -> dict[int, dict[str, Any]]:
    """Train ``steps`` steps with a Checkpointer persisting every step; the state after each step."""
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copies = {}
    with ckpt.Checkpointer(str(root), disk_every=1, keep_last=5) as cp:
        for step in range(1, steps + 1):
            _train(model, opt, step)
            cp.save(step, {"model": model, "optim": opt}).wait()
            copies[step] = _copy(model, opt)
    return copies


def _fresh() -> tuple[Any, torch.optim.Optimizer]:
    model = _gpt2(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 99)  # the AdamW state exists, with other values
    return model, opt


# -- item 2: a corrupt newest step must not crash-loop a restarted job ------------------------------------------
def test_restore_skips_a_corrupt_newest_step_and_says_which(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "run"
    copies = _run(root, 3)
    damaged = _flip(root / step_dir(3))
    model, opt = _fresh()
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        with ckpt.Checkpointer(str(root), disk_every=1) as cp:
            assert cp.restore({"model": model, "optim": opt}) == 2
            lr = cp.last_restore
    _same(model, opt, copies[2])
    assert lr["source"] == "disk" and lr["step"] == 2, lr
    assert [(s["step"], s["tier"]) for s in lr["skipped"]] == [(3, "disk")], lr
    assert "CorruptCheckpointError" in lr["skipped"][0]["error"] and damaged.name in lr["skipped"][0]["error"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "step 3" in said and "skipped" in said, said
    assert lr["storage_bytes_read"] and lr["storage_bytes_read"] > 0, lr  # a disk restore counts its bytes now


def test_restore_of_an_explicit_corrupt_step_raises_and_leaves_the_state(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _run(root, 2)
    _flip(root / step_dir(2))
    model, opt = _fresh()
    before = _copy(model, opt)
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        with pytest.raises(ckpt.CorruptCheckpointError, match="no sound copy of step 2"):
            cp.restore({"model": model, "optim": opt}, step=2)
    _same(model, opt, before)


def test_restore_raises_only_when_no_step_is_sound(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _run(root, 2)
    for s in (1, 2):
        _flip(root / step_dir(s))
    model, opt = _fresh()
    before = _copy(model, opt)
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        with pytest.raises(ckpt.CorruptCheckpointError) as e:
            cp.restore({"model": model, "optim": opt})
    msg = str(e.value)
    assert "no sound copy of any committed step" in msg and "step 2 on 'disk', step 1 on 'disk'" in msg, msg
    _same(model, opt, before)


def test_restore_does_not_skip_steps_for_a_mismatched_state(tmp_path: Path) -> None:
    """A state that does not fit is the caller's error, not a damaged step: raised at once, nothing skipped."""
    root = tmp_path / "run"
    _run(root, 2)
    other = torch.nn.Linear(3, 5)
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        with pytest.raises(ckpt.ShardMismatchError):
            cp.restore({"model": other})
        assert cp.last_restore is None


def test_restore_takes_strict_like_load(tmp_path: Path) -> None:
    root = tmp_path / "run"
    copies = _run(root, 2)
    model, opt = _fresh()
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        with pytest.raises(ckpt.ShardMismatchError):
            cp.restore({"model": model})  # the optimizer's keys are in the checkpoint
        assert cp.restore({"model": model}, strict=False) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, copies[2]["model"][k]), k


def test_plain_load_of_a_checkpointer_step_needs_no_strict_false(tmp_path: Path) -> None:
    """The Checkpointer adds its own ``rng/rank_NNNNN/...`` entries; a ``ckpt.load`` of the step with the state the
    user saved skips them by itself, and the report says so."""
    root = tmp_path / "run"
    copies = _run(root, 2)
    model, opt = _fresh()
    report = ckpt.load({"model": model, "optim": opt}, str(root / step_dir(2)))
    _same(model, opt, copies[2])
    assert report.unexpected_keys and all(k.startswith("rng/rank_00000/") for k in report.unexpected_keys), report
    assert not report.missing_keys and report.bytes_read > 0


def _fallback_worker(rank: int, world: int, root: str) -> dict[str, Any]:
    """2 gloo ranks: one byte of the newest step is flipped (by rank 1); both must restore the same older step."""
    torch.manual_seed(0)  # replicas, as under DDP: the checkpoint stores one copy
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Linear(13, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copies = {}
    with ckpt.Checkpointer(root, disk_every=1) as cp:
        for step in (1, 2):
            model(torch.randn(4, 7, generator=torch.Generator().manual_seed(step))).sum().backward()
            opt.step()
            opt.zero_grad()
            cp.save(step, {"model": model, "optim": opt}).wait()
            copies[step] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.distributed.barrier()
    if rank == 1:
        _flip(Path(root) / step_dir(2))
    torch.distributed.barrier()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    with ckpt.Checkpointer(root, disk_every=1) as cp:
        got = cp.restore({"model": model, "optim": opt})
        skipped = [(s["step"], s["tier"]) for s in cp.last_restore["skipped"]]
        why = cp.last_restore["skipped"][0]["error"]
    same = all(torch.equal(v, copies[got][k]) for k, v in model.state_dict().items())
    return {"step": got, "skipped": skipped, "same": same, "why": why}


def test_a_two_rank_restore_falls_back_together(tmp_path: Path) -> None:
    out = run_distributed(_fallback_worker, 2, str(tmp_path / "run"), timeout_secs=180)
    assert [o["step"] for o in out] == [1, 1], out
    assert all(o["skipped"] == [(2, "disk")] and o["same"] for o in out), out
    assert all("rank " in o["why"] and "checksum" in o["why"] for o in out), out  # which rank, and why


# -- item 3: loads that say nothing ----------------------------------------------------------------------------
def test_load_returns_a_report(tmp_path: Path) -> None:
    model = _gpt2()
    path = tmp_path / "ck"
    ckpt.save({"model": model, "extra": torch.arange(5)}, str(path))
    other = _gpt2(seed=3)
    report = ckpt.load({"model": other, "mine": torch.zeros(2)}, str(path), strict=False)
    assert isinstance(report, ckpt.LoadReport)
    assert set(report.loaded_keys) == {f"model/{k}" for k in model.state_dict()}
    assert report.missing_keys == ("mine",) and report.unexpected_keys == ("extra",)
    assert report.bytes_read >= sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert "loaded" in str(report)


def test_a_load_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    model = _gpt2()
    path = tmp_path / "ck"
    ckpt.save({"model": model}, str(path))
    net = _gpt2(seed=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ckpt.ShardMismatchError) as e:
        ckpt.load({"net": net}, str(path), strict=False)
    msg = str(e.value)
    assert "nothing to load" in msg and "the state has `net`" in msg and "the checkpoint has `model`" in msg, msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_mismatch_starts_with_one_line_that_diagnoses_it(tmp_path: Path) -> None:
    model = _gpt2()
    path = tmp_path / "ck"
    ckpt.save({"model": model}, str(path))
    with pytest.raises(ckpt.ShardMismatchError) as e:
        ckpt.load({"net": _gpt2(seed=3)}, str(path))
    first, *rest = str(e.value).splitlines()
    assert "top-level keys differ: the state has `net`, the checkpoint has `model`" in first, first
    assert "strict=False would load nothing" in rest[-1], rest[-1]  # not offered where it cannot help
    assert "Pass strict=False" not in str(e.value)


def test_strict_false_is_offered_only_where_it_helps(tmp_path: Path) -> None:
    model = _gpt2()
    path = tmp_path / "ck"
    ckpt.save({"model": model}, str(path))
    # only keys differ: strict=False would load the rest
    with pytest.raises(ckpt.ShardMismatchError) as e:
        ckpt.load({"model": _gpt2(seed=3), "sched": torch.zeros(1)}, str(path))
    first = str(e.value).splitlines()[0]
    assert "the state has `sched`" in first and "both have `model`" in first, first
    assert "Pass strict=False to load the" in str(e.value)
    # a shape differs (a vocabulary of 101 instead of 97): strict=False would not help, so it is not offered
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=30, n_layer=2, n_head=3, n_positions=32)
    with pytest.raises(ckpt.ShardMismatchError) as e:
        ckpt.load({"model": transformers.GPT2LMHeadModel(cfg)}, str(path))
    msg = str(e.value)
    assert "same top-level keys" in msg.splitlines()[0] and "shape [101, 30]" in msg, msg
    assert "Pass strict=False" not in msg and "strict=False does not skip" in msg, msg
