"""``benchmarks.erasure`` runs end to end on tiny shards and writes its three outputs (timings are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import erasure

pytestmark = pytest.mark.timeout(300)


def test_erasure_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    erasure.main(["--shard-mib", "1", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "erasure.json").read_text())
    assert [(r["k"], r["m"]) for r in result["rows"]] == list(erasure.CODES)
    for r in result["rows"]:
        assert r["ours"]["encode_gbps"] > 0 and r["ours"]["decode_gbps"] > 0 and r["memcpy_gbps"] > 0
    md = (tmp_path / "erasure.md").read_text()
    assert "| (4, 2) | encode |" in md and "| (8, 3) | decode |" in md
    assert (tmp_path / "erasure.png").stat().st_size > 0
