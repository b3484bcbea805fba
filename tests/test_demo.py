"""``make demo`` runs: the sharded save and unsharded resume, then the SIGKILLed trainer resumed from the snapshot
daemon the demo starts (it fails unless the restore came from the daemon and the result is bit-exact), and the
daemon is stopped afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_demo_runs_and_resumes_from_the_daemon(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ckpt.demo", "--dir", str(tmp_path / "demo")], cwd=ROOT,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "from daemon in" in r.stdout and "no byte from storage" in r.stdout, r.stdout[-2000:]
    assert "snapshot daemon stopped" in r.stdout and "demo finished OK" in r.stdout
    assert not list(Path("/dev/shm").glob("ckpt-demo-daemon-*")) or all(
        not (p / "d" / "daemon.pid").exists() for p in Path("/dev/shm").glob("ckpt-demo-daemon-*"))
