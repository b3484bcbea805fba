"""Where a daemon lives: its directory, and the files in it.

One daemon per node and user. Its directory (``--dir``, else ``$CKPT_DAEMON_DIR``, else ``/dev/shm/ckpt-daemon-<uid>``)
holds the socket, the pid file, the log and the segments. The directory is the daemon's boundary of trust: it must
be a real directory (not a link), owned by this user and closed to everyone else (0700); ``prepare_dir`` creates it
so, and refuses one that is not, saying how to fix it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ckpt.errors import DaemonError

ENV_DIR = "CKPT_DAEMON_DIR"
SOCKET = "daemon.sock"
PIDFILE = "daemon.pid"
LOG = "daemon.log"
SEGMENTS = "segments"


def default_dir() -> str:
    """``$CKPT_DAEMON_DIR``, else a per-user directory on ``/dev/shm`` (the system temp directory without one)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return env
    base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"ckpt-daemon-{os.getuid()}")


def resolve_dir(path: str | None) -> Path:
    return Path(os.path.abspath(path or default_dir()))


def check_private(path: Path, what: str = "daemon directory") -> None:
    """Raise ``DaemonError`` unless ``path`` is a directory (not a link) owned by this user with mode 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DaemonError(f"{what} {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"{what} {path} is not a directory (found {stat.filemode(st.st_mode)}); remove it or choose "
                          "another --dir")
    if st.st_uid != os.getuid():
        raise DaemonError(f"{what} {path} belongs to uid {st.st_uid}, expected this user ({os.getuid()}); choose "
                          "another --dir")
    if st.st_mode & 0o077:
        raise DaemonError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, expected 0700 (others could "
                          f"reach its snapshots); run chmod 700 {path} or choose another --dir")


def prepare_dir(path: Path) -> Path:
    """Create ``path`` (and its segments folder) with mode 0700 if missing; check it either way."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path)
    seg = path / SEGMENTS
    try:
        os.mkdir(seg, 0o700)
    except FileExistsError:
        pass
    check_private(seg, "segment directory")
    return path
