"""Crash consistency, by crashing: SIGKILL a process that is saving, then check what a reader sees.

The writer (``tests/crash_writer.py``) commits an old checkpoint, then saves a new state and is killed with
SIGKILL at a chosen point: exactly at the n-th file-system event (every ``mkdir``/``open``/``writev``/``fsync``/
``replace``/``unlink`` of the backend, before and after the call, with short writes so data files are left half
written), or after a random delay while it runs freely. Kill points are stratified over the whole save, so they
land before, during and after the data writes and on both sides of the manifest commit.

After every kill:

* ``mode="fresh"`` (the new state goes to another directory): the old checkpoint loads bit-exactly; the new path
  either loads the new state bit-exactly (the commit happened), or raises ``IncompleteCheckpointError`` (data but
  no manifest) or ``CheckpointNotFoundError`` (nothing written), and nothing else.
* ``mode="overwrite"`` (``overwrite=True`` onto the committed path): the path loads either the old or the new
  state, bit-exactly, never a mixture; and the next save there succeeds and leaves no stale data file.

``ckpt.load`` and ``ckpt.open(...).state()`` must agree. Set ``CKPT_CRASH_SEED`` to replay a run; the seed is
in every failure message.
"""

from __future__ import annotations

import functools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckpt
from tests.crash_writer import SAVE_OPTIONS, make_state, paths

REPO = Path(__file__).resolve().parent.parent
WRITER = REPO / "tests" / "crash_writer.py"
LINE_TIMEOUT_SECS = 60.0
SEED = int(os.environ.get("CKPT_CRASH_SEED", str(random.SystemRandom().randrange(2**31))))
CKPT_SEED_NOTE = f"CKPT_CRASH_SEED={SEED}"


# -- talking to the writer ------------------------------------------------------------------------------------


class Writer:
    """A ``crash_writer.py`` subprocess and a line reader over its stdout with a deadline on every line."""

    def __init__(self, mode: str, log_dir: Path) -> None:
        self.stderr_path = log_dir / f"crash_writer_{mode}_{os.getpid()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), mode], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
        )
        self._buf = b""
        self.expect("READY")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def line(self) -> str | None:
        """The next line, or None once the writer closed its output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + LINE_TIMEOUT_SECS
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"crash writer said nothing for {LINE_TIMEOUT_SECS} s{self.stderr_tail()}")
            data = os.read(fd, 65536)
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str) -> str:
        line = self.line()
        if line is None:
            raise AssertionError(f"crash writer exited (code {self.proc.poll()}){self.stderr_tail()}")
        if line.startswith("ERR "):
            raise AssertionError(f"crash writer failed:\n{json.loads(line[4:])}")
        assert line.split(" ", 1)[0] == word, f"expected {word} from the crash writer, got {line!r}{self.stderr_tail()}"
        return line

    def stderr_tail(self) -> str:
        self._stderr.flush()
        try:
            text = self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""
        return f"\n--- crash writer stderr ---\n{text}" if text.strip() else ""

    def close(self) -> None:
        """End of input makes the server (and a child waiting for the test) exit; kill it only if it does not."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # this test's own subprocess, by its handle
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@dataclass
class Trial:
    mode: str
    root: Path
    seed_old: int
    seed_new: int
    #: Kill at this event (0: as soon as the save starts, before any file-system call); None: run freely.
    kill_at_event: int | None = None
    #: If set, ``kill_at_event`` counts from the first event of this name (which is 0) instead of from START.
    kill_anchor: str | None = None
    #: With ``kill_at_event`` None: kill this long after START (None: never kill).
    kill_after_secs: float | None = None
    sleep_secs: float = 0.0

    def command(self) -> str:
        return json.dumps({
            "root": str(self.root), "mode": self.mode, "seed_old": self.seed_old, "seed_new": self.seed_new,
            "handshake": self.kill_at_event is not None, "sleep_secs": self.sleep_secs,
        }) + "\n"

    def describe(self) -> str:
        after = f" after {self.kill_anchor}" if self.kill_anchor else ""
        how = (f"killed at event {self.kill_at_event}{after}" if self.kill_at_event is not None else
               f"killed {self.kill_after_secs:.4f} s after START" if self.kill_after_secs is not None else "not killed")
        return f"{self.mode} trial in {self.root} (seeds {self.seed_old}->{self.seed_new}, {how}, CKPT_CRASH_SEED={SEED})"


@dataclass
class Ran:
    """What happened to one trial's writer."""

    killed: bool
    events: int | None = None  # total events when the save finished
    save_secs: float | None = None
    last_event: str = "START"
    #: Names of the events seen, in order (complete only for a handshake trial that was not killed).
    names: list[str] = field(default_factory=list)


def run(writer: Writer, trial: Trial) -> Ran:
    """Run ``trial`` in ``writer``, kill the child as the trial says, and return once the child is gone.

    The child never exits on its own before the test lets it (it waits for a byte after ``DONE``), so its pid
    cannot have been reused by another process when the test kills it.
    """
    trial.root.mkdir(parents=True, exist_ok=True)
    writer.send(trial.command())
    pid = int(writer.expect("PID").split()[1])
    writer.expect("START")
    ran = Ran(killed=False)

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)  # only the trial's own child, by its pid
        ran.killed = True

    if trial.kill_after_secs is not None:
        time.sleep(trial.kill_after_secs)
        kill()
        ran.last_event = "timed"
    elif trial.kill_at_event == 0 and trial.kill_anchor is None:
        kill()
    target = None if trial.kill_anchor else trial.kill_at_event
    while True:
        line = writer.line()
        if line is None:  # a single-trial writer closes its output when it dies
            code = writer.proc.wait(timeout=LINE_TIMEOUT_SECS)
            break
        word = line.split(" ", 1)[0]
        if word == "EV":
            _, n, name = line.split()
            ran.last_event = name
            ran.names.append(name)
            if target is None and name == trial.kill_anchor:
                target = int(n) + (trial.kill_at_event or 0)
            if not ran.killed and int(n) == target:
                kill()
            elif not ran.killed:
                writer.send("c")
        elif word == "DONE":
            _, events, secs = line.split()
            ran.events, ran.save_secs = int(events), float(secs)
            ran.last_event = "timed, after DONE" if ran.killed else "DONE"
            if not ran.killed:
                writer.send("c")
        elif word == "ERR":
            raise AssertionError(f"crash writer failed in {trial.describe()}:\n{json.loads(line[4:])}")
        elif word == "EXIT":
            code = int(line.split()[1])
            break
        else:
            raise AssertionError(f"unexpected line from the crash writer: {line!r}")
    assert code == (-signal.SIGKILL if ran.killed else 0), f"writer child exited with {code}{writer.stderr_tail()}"
    return ran


# -- what a reader sees ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def expected_state(seed: int) -> dict[str, Any]:
    """``make_state(seed)``, built once per seed (never modified: loads go into blank copies)."""
    return make_state(seed)


def _blank_like(state: Any) -> Any:
    """Same structure, tensors filled with a sentinel, values replaced, so a load must write everything."""
    if isinstance(state, dict):
        return {k: _blank_like(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.full_like(state, 7)
    return None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def outcome(path: str, candidates: dict[str, Any]) -> str:
    """Which candidate state ``path`` holds, bit-exactly, through ``ckpt.load`` and ``ckpt.open``; or the error.

    Returns a candidate's name, or the name of the ``CheckpointError`` subclass both raised. Anything else
    (another exception, a state equal to no candidate, load and open disagreeing) fails the test.
    """
    like = next(iter(candidates.values()))
    results = []
    for how in ("load", "open"):
        try:
            if how == "load":
                got = _blank_like(like)
                ckpt.load(got, path)
            else:
                with ckpt.open(path) as reader:
                    got = reader.state()
        except (ckpt.IncompleteCheckpointError, ckpt.CheckpointNotFoundError) as e:
            assert isinstance(e, ckpt.CheckpointError)
            results.append(type(e).__name__)
            continue
        matches = [name for name, state in candidates.items() if _equal(state, got)]
        assert matches, f"{how} of {path} returned a state equal to none of {list(candidates)}: a partial state"
        results.append(matches[0])
    assert results[0] == results[1], f"ckpt.load says {results[0]}, ckpt.open says {results[1]} for {path}"
    return results[0]


def check_after_kill(trial: Trial, ran: Ran) -> str:
    """Check every guarantee after ``trial``; return the outcome of the path that the killed save wrote."""
    old_path, new_path = paths(str(trial.root), trial.mode)
    old, new = expected_state(trial.seed_old), expected_state(trial.seed_new)
    where = trial.describe() + f", last event {ran.last_event}"
    try:
        if trial.mode == "fresh":
            assert outcome(old_path, {"old": old}) == "old", "the committed checkpoint no longer loads"
            result = outcome(new_path, {"new": new})
            files = [p for p in Path(new_path).rglob("*") if p.is_file() and ".tmp-" not in p.name]
            if result == "CheckpointNotFoundError":
                assert not files, f"CheckpointNotFoundError although {files} exist"
            if result == "IncompleteCheckpointError":
                assert files and not (Path(new_path) / "manifest.json").exists()
            if not ran.killed:
                assert result == "new", "a save that returned is not loadable"
        else:
            result = outcome(new_path, {"old": old, "new": new})
            assert result in ("old", "new"), f"overwriting a committed checkpoint left {result}"
            if not ran.killed:
                assert result == "new", "a save that returned is not loadable"
            # Recovery: the next save onto the path works and removes every data file of the crashed one.
            recovery = expected_state(trial.seed_new + 100)
            ckpt.save(recovery, new_path, overwrite=True, options=ckpt.SaveOptions(**SAVE_OPTIONS))
            assert outcome(new_path, {"recovery": recovery}) == "recovery"
            with ckpt.open(new_path) as reader:
                listed = set(reader.manifest.files)
            on_disk = {p.relative_to(new_path).as_posix() for p in (Path(new_path) / "data").iterdir()}
            assert on_disk == listed, f"stale data files after the recovery save: {sorted(on_disk - listed)}"
    except Exception as e:  # any other exception (a CorruptCheckpointError, ...) is a failure too; say where
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
    return result


# -- the trials -----------------------------------------------------------------------------------------------


@dataclass
class Campaign:
    mode: str
    outcomes: Counter = field(default_factory=Counter)
    kill_events: Counter = field(default_factory=Counter)
    trials: int = 0


COMMIT_ANCHOR = "open-tmp:before"  # the coordinator opens the manifest's tmp file: the commit begins


def campaign(writer: Writer, tmp: Path, mode: str, n_stepped: int, n_commit: int | None, n_timed: int,
             budget_secs: float) -> Campaign:
    """Kills at ``n_stepped`` stratified events, at ``n_commit`` events of the commit (None: every one of them,
    always including both sides of the rename) and at ``n_timed`` random times; stops early at the budget."""
    rng = random.Random(f"{SEED}-{mode}")
    t_end = time.monotonic() + budget_secs
    result = Campaign(mode)
    counter = iter(range(10**9))

    def one(**kw: Any) -> Ran:
        i = next(counter)
        # A few distinct state pairs, reused (each trial has its own directory; building states costs time).
        seed_old = 1 + 2 * (i % 3)
        trial = Trial(mode, tmp / f"{mode}_{i}", seed_old=seed_old, seed_new=seed_old + 1, **kw)
        ran = run(writer, trial)
        o = check_after_kill(trial, ran)
        result.outcomes[o] += 1
        result.kill_events[ran.last_event if ran.killed else "not killed"] += 1
        result.trials += 1
        shutil.rmtree(trial.root)
        return ran

    # Calibration: one complete save in each style gives the number of events and the duration to aim at.
    stepped = one(kill_at_event=10**9)
    total_events = stepped.events
    assert total_events and total_events > 20, f"only {total_events} file-system events in a save"
    commit_events = stepped.names[stepped.names.index(COMMIT_ANCHOR):]
    assert "replace:before" in commit_events, commit_events
    sleep_secs = 0.001
    timed = one(kill_after_secs=None, sleep_secs=sleep_secs)
    assert timed.save_secs is not None
    window_secs = 1.3 * timed.save_secs
    one(kill_at_event=0)  # as soon as the save started: nothing on disk yet
    # Stratified kill points: trial k of n lands in the k-th slice of [0, total_events], so the first trials
    # kill before any data is written and the last ones after the commit.
    for k in range(n_stepped):
        if time.monotonic() > t_end:
            break
        one(kill_at_event=min(total_events, int((k + rng.random()) / n_stepped * (total_events + 1))))
    # Around the commit: tmp manifest opened, written, fsync'd, renamed (the commit point), directory fsync'd,
    # and in overwrite mode the old data files deleted.
    offsets = list(range(len(commit_events)))
    if n_commit is not None:
        rename = [commit_events.index("replace:before"), commit_events.index("replace:after")]
        others = [o for o in offsets if o not in rename]
        offsets = rename + rng.sample(others, max(0, min(len(others), n_commit - 2)))
    for offset in offsets:
        if time.monotonic() > t_end:
            break
        ran = one(kill_at_event=offset, kill_anchor=COMMIT_ANCHOR)
        assert ran.last_event == commit_events[offset], (ran.last_event, commit_events[offset], CKPT_SEED_NOTE)
    for k in range(n_timed):
        if time.monotonic() > t_end:
            break
        one(kill_after_secs=(k + rng.random()) / n_timed * window_secs, sleep_secs=sleep_secs)
    print(f"\n{mode}: {result.trials} trials, seed {SEED}, {total_events} events per save, "
          f"outcomes {dict(result.outcomes)}, killed at {dict(result.kill_events.most_common(8))}")
    return result


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Writer]:
    w = Writer("serve", tmp_path_factory.mktemp("crash_logs"))
    try:
        yield w
    finally:
        w.close()


def _check_coverage(c: Campaign) -> None:
    if c.mode == "fresh":
        expected = {"new", "IncompleteCheckpointError", "CheckpointNotFoundError"}
    else:
        expected = {"old", "new"}
    assert set(c.outcomes) == expected, (
        f"{c.mode}: kill points reached only {dict(c.outcomes)} (expected each of {sorted(expected)}); "
        f"CKPT_CRASH_SEED={SEED}"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fresh", "overwrite"])
def test_sigkill_during_save(writer: Writer, tmp_path: Path, mode: str) -> None:
    c = campaign(writer, tmp_path, mode, n_stepped=10, n_commit=4, n_timed=5, budget_secs=60)
    assert c.trials >= 20
    _check_coverage(c)


@pytest.mark.timeout(120)
def test_sigkill_fresh_interpreter(tmp_path: Path) -> None:
    """No fork server: a freshly started writer process is itself killed, once in each mode, mid-save."""
    for i, mode in enumerate(["fresh", "overwrite"]):
        w = Writer("once", tmp_path)
        try:
            # Kill in the middle of the data writes: neither the first nor the last events of a ~100-event save.
            trial = Trial(mode, tmp_path / f"{mode}_once", seed_old=11 + i, seed_new=12 + i, kill_at_event=40)
            ran = run(w, trial)
            assert ran.killed
            o = check_after_kill(trial, ran)
            assert o == ("IncompleteCheckpointError" if mode == "fresh" else "old"), trial.describe()
        finally:
            w.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["fresh", "overwrite"])
def test_sigkill_during_save_soak(writer: Writer, tmp_path: Path, mode: str) -> None:
    """About 100 kills per mode (every commit event among them), bounded to about 80 s each."""
    c = campaign(writer, tmp_path, mode, n_stepped=60, n_commit=None, n_timed=25, budget_secs=80)
    assert c.trials >= 40, f"only {c.trials} trials fitted in the time budget"
    _check_coverage(c)
