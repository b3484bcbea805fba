"""The writer half of the crash-consistency tests (``tests/test_crash.py``): saves that the test SIGKILLs.

Run as a subprocess by the test, in one of two modes:

* ``python tests/crash_writer.py serve``: a fork server. It imports torch and ckpt once (1-2 s), prints
  ``READY``, then reads one JSON trial command per line on stdin. For each it forks a child that runs the trial
  and waits for it; when the child has exited (finished or killed) it prints ``EXIT <code>`` (``-9`` after a
  SIGKILL). Forking keeps a trial at tens of milliseconds, so the suite can afford many kill points.
* ``python tests/crash_writer.py once``: read one command and run the trial in this very process (no fork),
  so a freshly started interpreter is killed too.

A trial (``run_trial``): save ``make_state(seed_old)`` as the committed checkpoint, print ``START``, then save
``make_state(seed_new)``, either to a second path (``mode="fresh"``) or onto the same path with
``overwrite=True`` (``mode="overwrite"``), print ``DONE <events> <secs>`` and exit 0.

While the second save runs, the file-system calls the storage backend makes (``os.mkdir``, ``os.open``,
``os.writev``, ``os.fsync``, ``os.replace``, ``os.unlink``) are wrapped so that each one is an *event* before
and after the call. With ``handshake`` the child prints ``EV <n> <name>`` for each and blocks until the test
answers one byte on stdin, so the test can SIGKILL it exactly at the n-th event. Without it the child runs
freely (sleeping ``sleep_secs`` in each event, default from the ``CKPT_CRASH_SLEEP_SECS`` environment
variable) and the test kills it after a random delay. ``max_io_bytes`` caps the bytes of each ``writev`` (a
short write, which POSIX allows and the backend must loop over), so a data file is written in several steps and
a kill can leave it half written. Hooks and sleeps exist only in this test writer, never in the library.

Everything goes through raw file descriptors 0 and 1 (no Python buffering): the server and its child share
them, and the child must never read a byte meant for the server or the other way round.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import ckpt
import ckpt.loading  # noqa: F401  - import every heavy module before forking, not in each child
import ckpt.saving  # noqa: F401

#: The save options of every crash trial: small chunks, small checksum blocks and several files, so that one
#: save of a few MB makes about a hundred file-system calls to kill between.
SAVE_OPTIONS = dict(max_chunk_bytes=128 * 1024, block_bytes=16 * 1024, files_per_rank=4)
HOOKED = ("mkdir", "open", "writev", "fsync", "replace", "unlink")


def make_state(seed: int) -> dict[str, Any]:
    """A deterministic training-like state of about 3.5 MB: several dtypes, nested dicts, non-tensor values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w0": torch.randn(384, 1024, generator=g),
            "w1": torch.randn(512, 512, generator=g).to(torch.bfloat16),
            "emb": torch.randint(-(2**40), 2**40, (64, 1024), generator=g),
            "bias": torch.randn(1000, generator=g),
        },
        "optim": {"m": torch.randn(256, 1024, generator=g), "step": seed, "lr": 0.1 * seed},
        "name": f"state-{seed}",
    }


def paths(root: str, mode: str) -> tuple[str, str]:
    """(where the committed old checkpoint is, where the killed save writes) for a trial rooted at ``root``."""
    if mode == "overwrite":
        p = os.path.join(root, "ckpt")
        return p, p
    return os.path.join(root, "step_1"), os.path.join(root, "step_2")


def _write_line(text: str) -> None:
    data = (text + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def _read_line() -> str | None:
    """One line from fd 0, a byte at a time so nothing past the newline is consumed; None at end of input."""
    out = bytearray()
    while True:
        b = os.read(0, 1)
        if not b:
            return None
        if b == b"\n":
            return out.decode()
        out += b


class _Hooks:
    """Wraps the ``os`` functions the local storage backend calls; every call is an event before and after."""

    def __init__(self, handshake: bool, sleep_secs: float, max_io_bytes: int) -> None:
        self.handshake = handshake
        self.sleep_secs = sleep_secs
        self.max_io_bytes = max_io_bytes
        self.events = 0
        self._lock = threading.Lock()
        self._saved: dict[str, Callable[..., Any]] = {}

    def event(self, name: str) -> None:
        with self._lock:  # write threads report one at a time; the others wait here, mid-save
            self.events += 1
            if self.handshake:
                _write_line(f"EV {self.events} {name}")
                if os.read(0, 1) == b"":  # the test went away
                    os._exit(3)
        if self.sleep_secs > 0:
            time.sleep(self.sleep_secs)

    def install(self) -> None:
        for name in HOOKED:
            self._saved[name] = getattr(os, name)
            setattr(os, name, self._wrap(name, self._saved[name]))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(os, name, fn)
        self._saved.clear()

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            label = name
            if name == "open":
                label = "open-dir" if args[1] & getattr(os, "O_DIRECTORY", 0) else (
                    "open-tmp" if ".tmp-" in str(args[0]) else "open")
            elif name == "writev":
                args = (args[0], self._cap(args[1]))
            self.event(f"{label}:before")
            result = real(*args, **kwargs)
            self.event(f"{label}:after")
            return result

        return hooked

    def _cap(self, buffers: Any) -> list[memoryview]:
        """At most ``max_io_bytes`` of ``buffers``: a short write, which the backend must continue."""
        out: list[memoryview] = []
        left = self.max_io_bytes
        for b in buffers:
            v = memoryview(b)
            if left <= 0:
                break
            out.append(v[:left])
            left -= len(out[-1])
        return out


def run_trial(cmd: dict[str, Any]) -> None:
    """Save the old state (committed), then the new one, reporting and blocking at events as ``cmd`` says."""
    torch.set_num_threads(1)
    old_path, new_path = paths(cmd["root"], cmd["mode"])
    opts = ckpt.SaveOptions(**SAVE_OPTIONS)
    ckpt.save(make_state(cmd["seed_old"]), old_path, options=opts)
    new_state = make_state(cmd["seed_new"])  # built before START so the kill window is the save alone
    default_sleep = float(os.environ.get("CKPT_CRASH_SLEEP_SECS", "0"))
    hooks = _Hooks(bool(cmd.get("handshake")), float(cmd.get("sleep_secs", default_sleep)),
                   int(cmd.get("max_io_bytes", 128 * 1024)))
    hooks.install()
    _write_line("START")
    t0 = time.perf_counter()
    try:
        ckpt.save(new_state, new_path, options=opts, overwrite=cmd["mode"] == "overwrite")
    finally:
        hooks.uninstall()
    _write_line(f"DONE {hooks.events} {time.perf_counter() - t0:.6f}")


def _child(cmd: dict[str, Any]) -> int:
    """Run one trial; then wait for the test's byte before exiting, so the test never kills a reused pid."""
    _write_line(f"PID {os.getpid()}")
    code = 0
    try:
        run_trial(cmd)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        _write_line("ERR " + json.dumps(traceback.format_exc()))
        code = 1
    os.read(0, 1)
    return code


def serve() -> None:
    _write_line("READY")
    while True:
        line = _read_line()
        if line is None or line == "QUIT":
            return
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(cmd)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _write_line(f"EXIT {code}")


def once() -> int:
    _write_line("READY")
    line = _read_line()
    if line is None:
        return 2
    return _child(json.loads(line))


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    elif sys.argv[1:] == ["once"]:
        sys.exit(once())
    else:
        sys.exit("usage: crash_writer.py serve|once")
