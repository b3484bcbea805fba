"""A snapshot daemon for a test: started in a fresh directory on /dev/shm, and always stopped by its pid (SIGKILL)
with its directory and segments removed, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def kill_daemon_in(d: Path) -> None:
    """SIGKILL whatever daemon runs in ``d`` (by the pid in its pid file), and wait until it is gone."""
    try:
        pid = int((d / "daemon.pid").read_text().strip() or 0)
    except (OSError, ValueError):
        return
    kill_pid(pid)


def kill_pid(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it is gone (reaped, if it is a child of this process)."""
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


@contextlib.contextmanager
def daemon_dir() -> Iterator[Path]:
    """A fresh, not yet existing daemon directory under /dev/shm; on exit any daemon there is killed and every
    file (segments included) removed."""
    parent = Path(tempfile.mkdtemp(prefix="ckpt-test-daemon-", dir=SHM))
    d = parent / "d"
    try:
        yield d
    finally:
        kill_daemon_in(d)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def ddir() -> Iterator[Path]:
    with daemon_dir() as d:
        yield d


@pytest.fixture
def daemon(ddir: Path) -> Iterator[dict]:
    """A running daemon (64 MiB budget) in ``ddir``: its start document."""
    from snapshot_daemon import client

    doc = client.start(ddir, memory_budget=64 * 2**20)
    try:
        yield doc
    finally:
        kill_pid(doc["pid"])
