"""Chunks stream to a tier as soon as their own copy is staged, not after the whole snapshot."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import ckpt
import ckpt.checkpointer  # binds its own copy_all before the test patches the copier's
import ckpt.staging
import formats.storage.local_stream as local_stream

pytestmark = pytest.mark.timeout(120)


def test_first_chunk_reaches_disk_before_staging_finishes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))  # first region the largest
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()

    gate = threading.Event()
    real_copy_all = ckpt.staging.copy_all

    def copy_first_then_hold(copies: list[Any], progress: Any = None) -> None:
        real_copy_all(copies[:1], progress)  # the first lazy copy lands ...
        assert gate.wait(60), "test never opened the gate"
        real_copy_all(copies[1:], progress)  # ... the rest only after the test looked at the disk

    monkeypatch.setattr(ckpt.staging, "copy_all", copy_first_then_hold)
    written: list[int] = []
    real_write = local_stream.LocalStreamWriter.append

    def recording_write(self: Any, data: Any) -> int:
        offset = real_write(self, data)
        written.append(len(memoryview(data)))
        return offset

    monkeypatch.setattr(local_stream.LocalStreamWriter, "append", recording_write)
    cp = ckpt.Checkpointer(tmp_path, disk_every=1, save_rng=False, save_options=ckpt.SaveOptions(files_per_rank=1))
    h = cp.save(1, {"model": model, "optim": opt})
    first_bytes = 512 * 512 * 4
    deadline = time.monotonic() + 30
    while sum(written) < first_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert sum(written) >= first_bytes, "the first staged chunk was not streamed while the rest was still copying"
        assert not h.done() and cp.steps("disk") == []  # nothing committed before every chunk is written
    finally:
        gate.set()
    assert h.wait(60) and not h.errors
    cp.close()
    with ckpt.open(tmp_path / "step_000000001") as r:
        assert torch.equal(r.read("model/0.weight"), model[0].weight.detach())
        assert torch.equal(r.read("model/1.bias"), model[1].bias.detach())
