"""``benchmarks.hostile_costs`` runs end to end (a snapshot daemon included, killed by its pid) on a tiny state and writes its three outputs (timings unchecked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import hostile_costs

pytestmark = pytest.mark.timeout(300)


def test_hostile_costs_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    hostile_costs.main(["--gib", "0.002", "--repeats", "1", "--chunks", "301", "--dir", str(tmp_path),
                        "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "hostile_costs.json").read_text())
    assert set(result["load"]["modes"]) == set(hostile_costs.LOAD_MODES)
    assert all(v > 0 for m in result["load"]["modes"].values() for v in m.values())
    assert set(result["daemon"]["modes"]) == {"as shipped (verified before writing)",
                                              "undo copy (as from an object store)"}
    assert "from snapshot daemon memory" in (tmp_path / "out" / "hostile_costs.md").read_text()
    assert result["verify"]["chunks"] == 301 and result["verify"]["verify_over_load"] > 0
    assert "| verify / load |" in (tmp_path / "out" / "hostile_costs.md").read_text()
    assert (tmp_path / "out" / "hostile_costs.png").stat().st_size > 0
