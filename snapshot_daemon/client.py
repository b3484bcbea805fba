"""Talking to the daemon: ``DaemonClient`` (one connection), and ``start`` / ``stop`` / ``status`` of a daemon.

``start(dir)`` returns once the daemon accepts clients. It spawns ``python -m snapshot_daemon.server`` in a new
session (``setsid``), with stdin closed and its output appended to ``DIR/daemon.log``, so neither torchrun's
restart of its workers nor a SIGKILL of the trainer's process group reaches it. If a daemon already runs there it
reports that one (``started: false``); two starts racing are settled by the pid-file lock, not by the starters.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ckpt.errors import DaemonBudgetError, DaemonError, DaemonProtocolError, DaemonUnavailableError
from snapshot_daemon import protocol
from snapshot_daemon.paths import LOG, SEGMENTS, SOCKET, check_private, prepare_dir, resolve_dir

DEFAULT_BUDGET_FRACTION = 0.5
START_TIMEOUT_SECS = 30.0


class DaemonClient:
    """One connection to the daemon in ``dir``. Thread-safe: one request at a time."""

    def __init__(self, dir: "str | Path | None" = None, client: str = "ckpt", timeout_secs: float = 30.0) -> None:
        self.dir = resolve_dir(str(dir) if dir is not None else None)
        self.socket_path = self.dir / SOCKET
        self._lock = threading.Lock()
        self._posted: list[str] = []  # ops sent by ``post`` whose replies are still to be read
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_secs)
        try:
            sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise DaemonUnavailableError(f"no snapshot daemon runs in {self.dir} ({type(e).__name__}); start one "
                                         f"with: ckpt daemon start --dir {self.dir}") from None
        try:
            pid, uid = protocol.peer_uid(sock)
        except OSError as e:
            sock.close()
            raise DaemonProtocolError(f"{self.socket_path}: no peer credentials ({e}); not a snapshot daemon") from None
        if uid != os.getuid():  # a socket another user put there: never hand it our snapshots
            sock.close()
            raise DaemonProtocolError(f"{self.socket_path}: the process listening (pid {pid}) runs as uid {uid}, "
                                      f"not this user's ({os.getuid()}); remove the directory and start a daemon")
        self.sock = sock
        self.hello = self.request("hello", client=client, pid=os.getpid())

    def segment_path(self, name: str) -> Path:
        """Where segment ``name`` (validated: ``seg-<16 hex>``) lies: in this daemon's directory, never elsewhere."""
        if not protocol.SEGMENT_NAME.match(name):
            raise DaemonProtocolError(f"snapshot daemon {self.dir}: {name!r} is not a segment name")
        return self.dir / SEGMENTS / name

    def post(self, op: str, **fields: Any) -> None:
        """Send a request without waiting for its reply: the caller goes on at once. The daemon serves one
        connection's messages in order, and a message sent before this process dies is still read before the
        connection's end, so what ``op`` does happens before anything asked later. Its reply is read by the next
        ``request``, which raises the posted request's error, if it had one, before sending its own."""
        with self._lock:
            try:
                protocol.send(self.sock, {"op": op, **fields})
            except OSError as e:
                raise DaemonUnavailableError(f"snapshot daemon {self.dir}: connection lost during {op!r} "
                                             f"({type(e).__name__}: {e}); it may have died, see {self.dir / LOG}") from None
            self._posted.append(op)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; the reply's fields, or ``DaemonError`` with the daemon's message."""
        with self._lock:
            failed: DaemonError | None = None
            while self._posted:  # replies to posted requests come first, in order; all are read
                posted = self._posted.pop(0)
                try:
                    self._check(posted, self._receive(posted), f" (posted before {op!r})")
                except DaemonUnavailableError:
                    raise
                except DaemonError as e:
                    failed = failed or e
            if failed is not None:  # what was posted did not happen: say so before asking more
                raise failed
            try:
                protocol.send(self.sock, {"op": op, **fields})
            except OSError as e:
                raise DaemonUnavailableError(f"snapshot daemon {self.dir}: connection lost during {op!r} "
                                             f"({type(e).__name__}: {e}); it may have died, see {self.dir / LOG}") from None
            reply = self._receive(op)
        return self._check(op, reply)

    def _receive(self, op: str) -> dict[str, Any] | None:
        try:
            return protocol.recv(self.sock)
        except (OSError, protocol.FramingError) as e:
            raise DaemonUnavailableError(f"snapshot daemon {self.dir}: connection lost during {op!r} "
                                         f"({type(e).__name__}: {e}); it may have died, see {self.dir / LOG}") from None
        except DaemonProtocolError as e:  # a frame that is not a JSON object: the stream itself is still whole
            raise DaemonProtocolError(f"snapshot daemon {self.dir}: reply to {op!r}: {e}") from None

    def _check(self, op: str, reply: dict[str, Any] | None, posted: str = "") -> dict[str, Any]:
        """The fields of the reply to ``op``, or the error it carries."""
        if reply is None:
            raise DaemonUnavailableError(f"snapshot daemon {self.dir}: closed the connection during {op!r}; see "
                                         f"{self.dir / LOG}")
        if "ok" not in reply:
            raise DaemonError(f"snapshot daemon {self.dir}: malformed reply to {op!r}: {str(reply)[:200]}")
        if reply["ok"] is False:
            cls = {"budget": DaemonBudgetError, "protocol": DaemonProtocolError}.get(reply.get("kind"), DaemonError)
            raise cls(f"snapshot daemon {self.dir}: {op}{posted}: {reply.get('error')}")
        if reply["ok"] is not True:
            raise DaemonProtocolError(f"snapshot daemon {self.dir}: reply to {op!r} has 'ok' {reply['ok']!r}, "
                                      "expected true or false")
        try:
            protocol.validate_reply(op, reply)
        except DaemonProtocolError as e:
            raise DaemonProtocolError(f"snapshot daemon {self.dir}: {e}") from None
        return {k: v for k, v in reply.items() if k != "ok"}

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def status(dir: "str | Path | None" = None) -> dict[str, Any]:
    """The running daemon's status document; ``DaemonUnavailableError`` if none runs in ``dir``."""
    with DaemonClient(dir, client="ckpt-status") as c:
        return c.request("status")


def default_budget(dir: Path) -> int:
    """Half of what the directory's file system (``/dev/shm``) holds."""
    st = os.statvfs(dir if dir.exists() else dir.parent)
    return int(st.f_blocks * st.f_frsize * DEFAULT_BUDGET_FRACTION)


def start(dir: "str | Path | None" = None, memory_budget: int | None = None, keep_last: int = 2,
          timeout_secs: float = START_TIMEOUT_SECS) -> dict[str, Any]:
    """Start a daemon in ``dir`` unless one runs there; its status, with ``started`` saying which."""
    root = resolve_dir(str(dir) if dir is not None else None)
    try:
        return {**status(root), "started": False}
    except DaemonUnavailableError:
        pass
    prepare_dir(root)
    budget = memory_budget if memory_budget is not None else default_budget(root)
    with open(root / LOG, "ab") as logf:
        os.chmod(root / LOG, 0o600)
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapshot_daemon.server", "--dir", str(root), "--memory-budget", str(budget),
             "--keep-last", str(keep_last)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
            cwd="/", env={**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")})
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        try:
            return {**status(root), "started": proc.poll() is None}
        except DaemonUnavailableError:
            pass
        rc = proc.poll()
        if rc not in (None, 0):
            raise DaemonError(f"the snapshot daemon in {root} refused to start (exit {rc}): {_last_line(root)}")
        time.sleep(0.05)
    raise DaemonUnavailableError(f"the snapshot daemon in {root} did not accept clients within {timeout_secs:.0f} s; "
                                 f"see {root / LOG}")


def stop(dir: "str | Path | None" = None, timeout_secs: float = 30.0) -> dict[str, Any]:
    """Stop the daemon in ``dir``; what it freed. ``DaemonUnavailableError`` if none runs."""
    root = resolve_dir(str(dir) if dir is not None else None)
    with DaemonClient(root, client="ckpt-stop") as c:
        pid = c.hello["daemon_pid"]
        out = c.request("stop")
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return {"pid": pid, "dir": str(root), **out}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this process counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _last_line(root: Path) -> str:
    try:
        lines = (root / LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


__all__ = ["DaemonClient", "start", "stop", "status", "check_private"]
