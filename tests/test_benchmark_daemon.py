"""Smoke test of ``benchmarks.daemon`` at a tiny size: every part runs (a trainer SIGKILLed, restores from the daemon
and from cold and warm disk, the save loops, the memory points), the report files are written, every restore is
bit-exact from the source it names, and the daemon is killed and its directory removed. No timing is asserted."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.timeout(60)

TINY = ["--params-m", "0.1", "--vocab-size", "256", "--seq-len", "16", "--steps", "5", "--warmup", "1", "--rounds",
        "1", "--restores", "1", "--copy-repeats", "2", "--no-drop-caches", "--allocator", "glibc"]


def test_the_daemon_benchmark_runs_at_a_tiny_size(tmp_path, capsys) -> None:
    from benchmarks import daemon as bench

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    result = bench.main(TINY + ["--dir", str(scratch), "--out", str(out)])
    capsys.readouterr()

    for ext in ("json", "md", "png"):
        assert (out / f"daemon.{ext}").stat().st_size > 0, ext
    doc = json.loads((out / "daemon.json").read_text())
    assert {"command", "git", "machine", "model", "snapshot_bytes", "daemon", "recovery", "copy_floor", "saves",
            "memory", "goals", "elapsed_secs"} <= set(doc)
    assert doc["command"] and doc["machine"]["usable_cores"] >= 1

    rec = doc["recovery"]
    assert set(rec["runs"]) == {"daemon", "cold disk", "warm disk"}
    want_source = {"daemon": "daemon", "cold disk": "disk", "warm disk": "disk"}
    for mode, runs in rec["runs"].items():
        assert runs, mode
        for r in runs:
            assert r["bit_exact"], (mode, r["mismatched"])
            assert r["model_tensors"] > 0 and r["optim_tensors"] > 0, r
            assert r["source"] == want_source[mode] and r["step"] == rec["step"] and r["rc"] == 0, r
            assert r["wall_secs"] > 0 and r["last_restore_secs"] > 0, r
    assert all(s["all_bit_exact"] for s in rec["summary"].values())
    assert "methods" in rec["runs"]["cold disk"][0]["eviction"]
    assert rec["step"] in rec["trainer"]["daemon_steps"] and rec["step"] in rec["trainer"]["disk_steps"]

    assert {"threads", "one_thread"} <= set(doc["copy_floor"])
    saves = doc["saves"]["summary"]
    assert set(saves) == {"no checkpointing", "own pool", "daemon"}
    for m in ("own pool", "daemon"):
        assert saves[m]["saves"] > 0 and saves[m]["first_save"], m
        for f in ("median_request_secs", "median_copy_secs", "median_iter_secs"):
            assert saves[m][f] > 0, (m, f)
    assert saves["daemon"]["tier_flushes"] > 0 and saves["daemon"]["tier_failures"] == 0

    points = doc["memory"]["points"]
    assert points[0]["segments"] == 0 and max(p["segments"] for p in points) >= 2
    assert all(p["VmRSS"] > 0 for p in points)
    assert {g["goal"].split(":")[0] for g in doc["goals"]} >= {"recovery", "iteration time"}

    daemon = doc["daemon"]
    assert daemon["killed"] and daemon["dir_removed"], daemon
    assert not os.path.exists(f"/proc/{daemon['pid']}")
    assert result["recovery"]["step"] == rec["step"]
    assert not any(scratch.iterdir()), "the benchmark's scratch directory was not removed"
