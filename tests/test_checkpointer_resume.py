"""Resume after SIGKILL continues bit-identically (``tests/resume_trainer.py`` runs as the subprocess).

1. A reference process trains 20 steps without interruption (losses, final parameters, optimizer and scheduler).
2. A crash process trains with a snapshot every step; once it reports that step 10 is committed it keeps training
   slowly and the test SIGKILLs it: at once, or after a random delay (mid-copy, mid-flush, mid-commit or between
   steps: wherever it lands).
3. A new process ``restore()``s the latest committed step and trains to 20.

The resumed run must match the reference bit for bit: every loss after the resume point (the crashed run's losses
before it too), every parameter and buffer, every optimizer moment and step counter, the scheduler's state.
Set ``CKPT_RESUME_SEED`` to replay a random kill; the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "tests" / "resume_trainer.py"
STEPS, COMMITTED = 20, 10
SEED = int(os.environ.get("CKPT_RESUME_SEED", str(random.SystemRandom().randrange(2**31))))
NOTE = f"CKPT_RESUME_SEED={SEED}"

pytestmark = pytest.mark.timeout(180)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_trainer(mode: str, root: Path, out: Path) -> str:
    """Run the trainer to completion; return its stdout."""
    res = subprocess.run([sys.executable, str(TRAINER), mode, "--root", str(root), "--out", str(out),
                          "--steps", str(STEPS)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "DONE" in res.stdout, f"{mode} trainer failed ({res.returncode}):\n{res.stderr[-4000:]}"
    return res.stdout


def crash_trainer(root: Path, out: Path, kill_after_secs: float) -> None:
    """Start a crash-mode trainer, wait for ``COMMITTED 10``, SIGKILL it ``kill_after_secs`` later."""
    err = open(out.parent / f"{out.name}.stderr", "w+")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(TRAINER), "crash", "--root", str(root), "--out", str(out),
                             "--steps", str(STEPS), "--commit-report", str(COMMITTED), "--slow-secs", "0.05"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the report (or EOF if the trainer dies); bounded by the timeout
        assert line.strip() == f"COMMITTED {COMMITTED}", f"crash trainer said {line!r}:\n{_tail(err)}"
        time.sleep(kill_after_secs)
        assert proc.poll() is None, f"the crash trainer finished before it was killed ({NOTE})"
        proc.send_signal(signal.SIGKILL)  # this test's own subprocess, by its handle
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


def _tail(f: Any) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-4000:]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def flat(o: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(o, dict):
        return {k2: v2 for k, v in o.items() for k2, v2 in flat(v, f"{prefix}{k}/").items()}
    if isinstance(o, (list, tuple)):
        return {k2: v2 for i, v in enumerate(o) for k2, v2 in flat(v, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): o}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = flat(a), flat(b)
    out = [f"{k}: only in one" for k in sorted(set(fa) ^ set(fb))]
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)) if isinstance(x, torch.Tensor) \
            else x == y
        if not same:
            out.append(f"{k}: {x!r} != {y!r}")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], dict[str, Any]]:
    out = tmp_path_factory.mktemp("reference")
    run_trainer("reference", out / "unused", out)
    ref_losses = losses(out)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    return ref_losses, torch.load(out / "final.pt", weights_only=True)


@pytest.mark.parametrize("kill", ["at_commit", "random"])
def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, reference: tuple[dict[int, float], dict[str, Any]],
                                               kill: str) -> None:
    ref_losses, ref_final = reference
    delay = 0.0 if kill == "at_commit" else random.Random(f"{SEED}-{kill}").uniform(0.0, 0.4)
    where = f"killed {delay:.3f} s after step {COMMITTED} was committed ({NOTE})"
    root = tmp_path / "run"
    crash_trainer(root, tmp_path / "crashed", delay)

    crashed = losses(tmp_path / "crashed")
    assert not (tmp_path / "crashed" / "final.pt").exists()
    for step, loss in crashed.items():  # checkpointing never changes the training itself
        assert loss == ref_losses[step], f"{where}: step {step} of the crashed run diverged from the reference"

    # What survived the kill: every committed step is complete and readable, ``latest`` names one of them.
    with ckpt.Checkpointer(root, disk_every=1) as cp:
        committed = cp.steps("disk")
    assert committed and committed[-1] >= COMMITTED and committed == list(range(1, committed[-1] + 1)), \
        f"{where}: committed steps {committed}"
    latest = int((root / "latest").read_text())
    assert latest in committed and latest >= committed[-1] - 1, f"{where}: latest={latest}, committed {committed}"
    for step in committed[-2:]:
        with ckpt.open(str(root / f"step_{step:09d}")) as r:
            assert r.read("step") == step

    out = run_trainer("resume", root, tmp_path / "resumed")
    restored = int(out.split("RESTORED ")[1].split()[0])
    assert restored == committed[-1], f"{where}: restored {restored}, newest commit {committed[-1]}"
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(restored + 1, STEPS + 1))
    bad = [f"step {s}: {resumed[s]!r} != {ref_losses[s]!r}" for s in resumed if resumed[s] != ref_losses[s]]
    assert not bad, f"{where}, resumed from {restored}: losses differ:\n  " + "\n  ".join(bad)
    final = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    bad = differences(final, ref_final)
    assert not bad, f"{where}, resumed from {restored}: final state differs:\n  " + "\n  ".join(bad[:20])
