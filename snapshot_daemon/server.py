"""The per-node snapshot daemon process: ``python -m snapshot_daemon.server --dir DIR --memory-budget BYTES``.

Started detached by ``ckpt daemon start`` (``snapshot_daemon.client.start``). One per directory: the pid file is
held with ``flock`` for the daemon's whole life, so a second daemon for the same directory sees the first and
exits 0 (the starter then reports the running one), and a daemon that was SIGKILLed leaves a lock that is free
again. At start it refuses a ``/dev/shm`` smaller than the budget, removes segments a killed predecessor left,
and listens on ``DIR/daemon.sock`` (0600).

Each connection gets a thread. The peer's uid (``SO_PEERCRED``) must be this user's; every frame is size-limited
(``protocol.MAX_MESSAGE_BYTES``) and every request validated (``protocol.validate``); a bad one gets an error
reply and a log line, and the daemon keeps serving. A frame it cannot read past (bad length, cut stream) closes
that connection only. ``stop`` (or SIGTERM) frees every segment and removes the socket and pid file.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ckpt.errors import DaemonError
from snapshot_daemon import protocol
from snapshot_daemon.paths import PIDFILE, SEGMENTS, SOCKET, prepare_dir
from snapshot_daemon.store import Store, _human

MAX_CLIENTS = 1024
EXIT_REFUSED = 3

log = logging.getLogger("ckpt.daemon")


def check_shm(root: Path, budget: int) -> None:
    st = os.statvfs(root)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    if free < budget:
        raise DaemonError(
            f"{root} is on a file system with {_human(free)} free ({_human(total)} in all), less than the memory "
            f"budget {_human(budget)}. Give it more (docker run --shm-size={budget // 2**20}m, or mount -o "
            f"remount,size={budget // 2**20}m /dev/shm) or start with --memory-budget below {_human(free)}")


class Client:
    def __init__(self, cid: int, conn: socket.socket, pid: int) -> None:
        self.id, self.conn, self.pid = cid, conn, pid
        self.name = "?"
        self.since = time.time()


class Daemon:
    def __init__(self, root: Path, budget: int, keep_last: int) -> None:
        self.root = root
        self.store = Store(root, budget, keep_last)
        self.started = time.time()
        self.stopping = threading.Event()
        self.clients: dict[int, Client] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self.errors = 0

    # -- requests --------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            clients = [{"id": c.id, "pid": c.pid, "client": c.name, "connected_secs": round(time.time() - c.since, 3)}
                       for c in self.clients.values()]
        return {"pid": os.getpid(), "dir": str(self.root), "socket": str(self.root / SOCKET),
                "version": protocol.VERSION, "started_at": self.started,
                "uptime_secs": round(time.time() - self.started, 3), "clients": clients,
                "requests_refused": self.errors, **self.store.status()}

    def handle(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        op, st = msg["op"], self.store
        if op == "hello":
            client.name = msg["client"]
            return {"daemon_pid": os.getpid(), "version": protocol.VERSION, "dir": str(self.root)}
        if op == "status":
            return self.status()
        if op == "alloc":
            seg = st.alloc(msg["run"], msg["shard"], msg["nbytes"], client.id, reserve=msg.get("reserve", True))
            return {"segment": seg.name, "path": str(seg.path), "nbytes": seg.nbytes}
        if op == "begin":
            st.begin(msg["segment"], msg["step"], client.id)
            return {}
        if op == "seal":
            st.seal(msg["segment"], msg["step"], msg["world"], msg["meta"], client.id)
            return {}
        if op == "free":
            st.free(msg["segment"], client.id)
            return {}
        if op == "list":
            return {"steps": {str(k): v for k, v in sorted(st.snapshots(msg["run"]).items())}}
        if op == "open":
            seg = st.open(msg["run"], msg["step"], msg["shard"])
            return {"segment": seg.name, "path": str(seg.path), "nbytes": seg.nbytes, "world": seg.world,
                    "meta": seg.meta}
        if op == "stop":
            self.stopping.set()
            return {"freed_bytes": st.used_bytes, "segments": len(st.segments)}
        raise AssertionError(op)  # pragma: no cover - validate() knows every op

    # -- connections -----------------------------------------------------------------------------------------------
    def serve_client(self, conn: socket.socket) -> None:
        with conn:
            try:
                pid, uid = protocol.peer_uid(conn)
            except OSError as e:
                log.warning("refused a connection: no peer credentials (%s)", e)
                return
            if uid != os.getuid():
                log.warning("refused pid %d: uid %d is not this daemon's user (%d)", pid, uid, os.getuid())
                self._reply(conn, {"ok": False, "error": f"uid {uid} may not use the snapshot daemon of uid "
                                                          f"{os.getuid()}"})
                return
            with self._lock:
                if len(self.clients) >= MAX_CLIENTS:
                    self._reply(conn, {"ok": False, "error": f"too many clients ({MAX_CLIENTS})"})
                    return
                client = Client(self._next_id, conn, pid)
                self._next_id += 1
                self.clients[client.id] = client
            try:
                self._loop(client)
            finally:
                with self._lock:
                    self.clients.pop(client.id, None)
                self.store.disconnect(client.id)

    def _loop(self, client: Client) -> None:
        conn = client.conn
        while not self.stopping.is_set():
            try:
                msg = protocol.recv(conn)
            except protocol.FramingError as e:
                self._refuse(client, e)
                return
            except protocol.DaemonProtocolError as e:
                self._refuse(client, e)
                continue
            except OSError:
                return
            if msg is None:
                return
            try:
                reply = {"ok": True, **self.handle(client, protocol.validate(msg))}
            except DaemonError as e:
                self._refuse(client, e)
                continue
            except Exception as e:  # noqa: BLE001 - a bug must not end the daemon; it is logged with its trace
                log.exception("internal error serving pid %d", client.pid)
                self._refuse(client, DaemonError(f"internal error: {type(e).__name__}: {e}"))
                continue
            if not self._reply(conn, reply):
                return

    def _refuse(self, client: Client, e: Exception) -> None:
        self.errors += 1
        log.warning("pid %d (%s): %s", client.pid, client.name, e)
        self._reply(client.conn, {"ok": False, "error": str(e), "kind": protocol.error_kind(e)})

    @staticmethod
    def _reply(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            protocol.send(conn, reply)
            return True
        except OSError:
            return False


def _lock_pidfile(root: Path) -> int | None:
    fd = os.open(root / PIDFILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _listen(root: Path) -> socket.socket:
    path = root / SOCKET
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.settimeout(0.2)
    return sock


def run(root: Path, budget: int, keep_last: int) -> int:
    prepare_dir(root)
    lock_fd = _lock_pidfile(root)
    if lock_fd is None:
        print(f"ckpt daemon: a daemon already runs in {root}", file=sys.stderr)
        return 0
    try:
        check_shm(root, budget)
    except DaemonError as e:
        print(f"ckpt daemon: {e}", file=sys.stderr)
        return EXIT_REFUSED
    stale = [p for p in (root / SEGMENTS).iterdir()]
    for p in stale:
        p.unlink()
    daemon = Daemon(root, budget, keep_last)
    sock = _listen(root)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stopping.set())
    log.info("pid %d serving %s, memory budget %s, keep_last %d (removed %d stale segments)", os.getpid(), root,
             _human(budget), keep_last, len(stale))
    try:
        while not daemon.stopping.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError as e:
                log.warning("accept failed: %s", e)
                continue
            conn.settimeout(None)
            threading.Thread(target=daemon.serve_client, args=(conn,), daemon=True, name="ckpt-daemon-client").start()
    finally:
        sock.close()
        freed = daemon.store.close()
        for name in (SOCKET, PIDFILE):
            try:
                os.unlink(root / name)
            except FileNotFoundError:
                pass
        log.info("stopped; freed %s", _human(freed))
        os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapshot_daemon.server", description="the per-node snapshot daemon")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--memory-budget", type=int, required=True, help="bytes")
    ap.add_argument("--keep-last", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s ckpt-daemon[%(process)d] %(levelname)s %(message)s")
    return run(Path(args.dir), args.memory_budget, args.keep_last)


if __name__ == "__main__":
    sys.exit(main())
