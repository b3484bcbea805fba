"""The per-node snapshot daemon (issue #16, first part): start/stop/status, the shared-memory store, sealing,
reclaiming what a killed trainer left unsealed, the budget, and the directory's and socket's security.

Every test that starts a daemon kills it by its pid and removes its directory and segments (tests/daemon_utils.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt.errors import DaemonBudgetError, DaemonError, DaemonUnavailableError
from snapshot_daemon import client, protocol
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.segments import DaemonAllocator, map_segment
from tests.cli_utils import run_cli
from tests.daemon_utils import daemon, daemon_dir, ddir, kill_pid  # noqa: F401

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _alive(pid: int) -> bool:
    return client._alive(pid)


# -- start / status / stop -----------------------------------------------------------------------------------------
def test_start_status_stop_through_the_cli(ddir: Path) -> None:
    r = run_cli("daemon", "start", "--dir", str(ddir), "--memory-budget", "64MiB", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    pid = doc["pid"]
    try:
        assert doc["started"] is True and doc["dir"] == str(ddir) and doc["socket"] == str(ddir / "daemon.sock")
        assert doc["memory_budget"] == 64 * MiB and _alive(pid)
        assert os.getsid(pid) != os.getsid(0), "the daemon must be detached from the starter's session"
        again = run_cli("daemon", "start", "--dir", str(ddir), "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["pid"] == pid
        assert json.loads(again.stdout)["started"] is False
        r = run_cli("daemon", "status", "--dir", str(ddir), "--json")
        st = json.loads(r.stdout)
        assert r.returncode == 0 and st["running"] and st["pid"] == pid and st["memory_used"] == 0
        assert st["uptime_secs"] >= 0 and st["runs"] == {} and "clients" in st
        text = run_cli("daemon", "status", "--dir", str(ddir)).stdout
        assert f"daemon pid {pid}" in text and "64.0 MiB" in text
        r = run_cli("daemon", "stop", "--dir", str(ddir))
        assert r.returncode == 0 and "freed" in r.stdout and "gone" in r.stdout
        assert not _alive(pid)
        assert not (ddir / "daemon.sock").exists() and not (ddir / "daemon.pid").exists()
        r = run_cli("daemon", "status", "--dir", str(ddir))
        assert r.returncode == 1 and "no snapshot daemon runs" in r.stdout and "ckpt daemon start" in r.stdout
        assert run_cli("daemon", "stop", "--dir", str(ddir)).returncode == 1
    finally:
        kill_pid(pid)


def test_the_default_directory_comes_from_the_environment(ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_DAEMON_DIR", str(ddir))
    doc = client.start(memory_budget=8 * MiB)
    try:
        assert doc["dir"] == str(ddir) and client.status()["pid"] == doc["pid"]
    finally:
        kill_pid(doc["pid"])


def test_two_starts_at_once_make_one_daemon(ddir: Path) -> None:
    code = (f"import json; from snapshot_daemon import client; "
            f"print(json.dumps(client.start({str(ddir)!r}, memory_budget=8*2**20)))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    docs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    try:
        assert len({d["pid"] for d in docs}) == 1, docs
    finally:
        for d in docs:
            kill_pid(d["pid"])


def test_the_daemon_outlives_a_sigkill_of_the_starters_process_group(ddir: Path) -> None:
    code = (f"import json, sys, time; from snapshot_daemon import client; "
            f"print(json.dumps(client.start({str(ddir)!r}, memory_budget=8*2**20)), flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    doc = json.loads(p.stdout.readline())
    try:
        os.killpg(p.pid, signal.SIGKILL)  # as torchrun's restart, or a kill of the trainer's job, would
        p.wait(timeout=30)
        time.sleep(0.2)
        assert _alive(doc["pid"]) and client.status(ddir)["pid"] == doc["pid"]
    finally:
        kill_pid(doc["pid"])


def test_a_killed_daemon_leaves_nothing_that_stops_a_new_one(daemon: dict, ddir: Path) -> None:
    with DaemonClient(ddir) as c:
        seg = c.request("alloc", run="r", shard="0", nbytes=MiB)
        os.kill(daemon["pid"], signal.SIGKILL)
        with pytest.raises(DaemonUnavailableError, match=str(ddir)):
            for _ in range(50):  # the connection breaks once the kernel has torn the process down
                c.request("status")
                time.sleep(0.02)
    kill_pid(daemon["pid"])
    assert Path(seg["path"]).exists()  # SIGKILL cleans nothing up ...
    doc = client.start(ddir, memory_budget=8 * MiB)
    try:
        assert doc["pid"] != daemon["pid"] and doc["started"]
        assert not Path(seg["path"]).exists()  # ... the next daemon removes what the dead one left
    finally:
        kill_pid(doc["pid"])


# -- security ------------------------------------------------------------------------------------------------------
def test_directory_socket_and_segments_are_private(daemon: dict, ddir: Path) -> None:
    assert stat.S_IMODE(os.stat(ddir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ddir / "daemon.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ddir / "daemon.log").st_mode) == 0o600
    with DaemonClient(ddir) as c:
        seg = c.request("alloc", run="r", shard="0", nbytes=4096)
        assert stat.S_IMODE(os.stat(seg["path"]).st_mode) == 0o600
        assert Path(seg["path"]).parent == ddir / "segments"


def test_a_directory_others_can_reach_is_refused(ddir: Path) -> None:
    os.mkdir(ddir, 0o755)
    os.chmod(ddir, 0o755)
    r = run_cli("daemon", "start", "--dir", str(ddir), "--memory-budget", "8MiB")
    assert r.returncode == 2 and "mode 0755, expected 0700" in r.stdout and f"chmod 700 {ddir}" in r.stdout
    link = ddir.parent / "link"
    os.chmod(ddir, 0o700)
    link.symlink_to(ddir)
    r = run_cli("daemon", "start", "--dir", str(link), "--memory-budget", "8MiB")
    assert r.returncode == 2 and "is not a directory" in r.stdout


@pytest.mark.skipif(os.getuid() != 0, reason="acting as another uid needs root (CI and the dev machine run as root)")
def test_another_uid_is_refused(daemon: dict, ddir: Path) -> None:
    os.chmod(ddir.parent, 0o711)  # loosen the first line of defence (paths and modes) so that the uid check
    os.chmod(ddir, 0o711)  # itself is what refuses
    os.chmod(ddir / "daemon.sock", 0o666)
    code = (f"import os, socket, json; from snapshot_daemon import protocol; os.setgid(65534); os.setuid(65534); "
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(ddir / 'daemon.sock')!r}); "
            f"protocol.send(s, {{'op': 'status'}}); print(json.dumps(protocol.recv(s)))")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(ddir, 0o700)
        os.chmod(ddir.parent, 0o700)
        os.chmod(ddir / "daemon.sock", 0o600)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and "uid 65534 may not use" in reply["error"]
    assert "refused pid" in (ddir / "daemon.log").read_text()
    assert client.status(ddir)["pid"] == daemon["pid"]  # and it still serves its own user


# -- the store -----------------------------------------------------------------------------------------------------
def _stage(c: DaemonClient, run: str, shard: str, step: int, data: torch.Tensor, world: int = 1) -> dict:
    seg = c.request("alloc", run=run, shard=shard, nbytes=data.numel())
    c.request("begin", segment=seg["segment"], step=step)
    buf, mm = map_segment(seg["path"], data.numel())
    buf.copy_(data)
    del buf
    mm.close()
    c.request("seal", segment=seg["segment"], step=step, world=world, meta={"bytes": data.numel()})
    return seg


def test_only_sealed_snapshots_are_visible_and_a_step_is_complete_with_every_rank(daemon: dict, ddir: Path) -> None:
    data = torch.randint(0, 255, (3 * MiB + 17,), dtype=torch.uint8)
    with DaemonClient(ddir) as a, DaemonClient(ddir) as b:
        seg = a.request("alloc", run="run", shard="tp0", nbytes=data.numel())
        a.request("begin", segment=seg["segment"], step=5)
        assert a.request("list", run="run")["steps"] == {}
        with pytest.raises(DaemonError, match="belongs to another client"):
            b.request("seal", segment=seg["segment"], step=5, world=2, meta={})
        with pytest.raises(DaemonError, match="staging step 5, not 6"):
            a.request("seal", segment=seg["segment"], step=6, world=2, meta={})
        buf, mm = map_segment(seg["path"], data.numel())
        buf.copy_(data)
        del buf
        mm.close()
        a.request("seal", segment=seg["segment"], step=5, world=2, meta={"k": [1, 2]})
        steps = b.request("list", run="run")["steps"]
        assert steps == {"5": {"world": 2, "shards": {"tp0": data.numel()}, "complete": False}}
        _stage(b, "run", "tp1", 5, data[:100], world=2)
        assert b.request("list", run="run")["steps"]["5"]["complete"] is True
        got = b.request("open", run="run", step=5, shard="tp0")
        assert got["meta"] == {"k": [1, 2]} and got["world"] == 2
        view, mm = map_segment(got["path"], got["nbytes"], writable=False)
        assert torch.equal(view, data)
        del view
        mm.close()
        with pytest.raises(DaemonError, match="no sealed snapshot of run 'run' step 4 shard 'tp0'"):
            b.request("open", run="run", step=4, shard="tp0")
        a.request("begin", segment=seg["segment"], step=7)  # the slot is overwritten: step 5 of tp0 is gone
        assert b.request("list", run="run")["steps"]["5"]["shards"] == {"tp1": 100}


_TRAINER = """
import os, signal, sys, torch
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.segments import map_segment
d, mode = sys.argv[1], sys.argv[2]
c = DaemonClient(d)
g = torch.Generator().manual_seed(0)
for step in (1, 2):
    data = torch.randint(0, 255, (2 * 2**20,), dtype=torch.uint8, generator=g)
    seg = c.request("alloc", run="job", shard="r0", nbytes=data.numel())
    c.request("begin", segment=seg["segment"], step=step)
    buf, mm = map_segment(seg["path"], data.numel())
    if step == 2 and mode == "mid-copy":
        buf[: 2**20].copy_(data[: 2**20])
        print(seg["path"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    buf.copy_(data)
    c.request("seal", segment=seg["segment"], step=step, world=1, meta={"step": step})
    print(seg["path"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["mid-copy", "after-seal"])
def test_a_sigkilled_trainer_leaves_its_sealed_snapshots_and_loses_the_unsealed_one(daemon: dict, ddir: Path,
                                                                                    mode: str) -> None:
    p = subprocess.run([sys.executable, "-c", _TRAINER, str(ddir), mode], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    paths = p.stdout.split()
    g = torch.Generator().manual_seed(0)
    want = [torch.randint(0, 255, (2 * 2**20,), dtype=torch.uint8, generator=g) for _ in range(2)]
    deadline = time.monotonic() + 10
    with DaemonClient(ddir) as c:
        while time.monotonic() < deadline and c.request("status")["clients"].__len__() > 1:
            time.sleep(0.02)  # until the daemon saw the trainer's connection close
        steps = c.request("list", run="job")["steps"]
        sealed = [1] if mode == "mid-copy" else [1, 2]
        assert sorted(int(s) for s in steps) == sealed and all(e["complete"] for e in steps.values())
        for step in sealed:
            got = c.request("open", run="job", step=step, shard="r0")
            view, mm = map_segment(got["path"], got["nbytes"], writable=False)
            assert torch.equal(view, want[step - 1]) and got["meta"] == {"step": step}
            del view
            mm.close()
        st = c.request("status")
        if mode == "mid-copy":
            assert not Path(paths[-1]).exists() and st["reclaimed"] == 1
        assert st["segments"] == len(sealed)


def test_keep_last_evicts_a_dead_trainers_older_steps(ddir: Path) -> None:
    doc = client.start(ddir, memory_budget=64 * MiB, keep_last=2)
    try:
        for step in (1, 2, 3):
            with DaemonClient(ddir) as c:  # each "trainer" exits after sealing one step
                _stage(c, "job", "r0", step, torch.full((1000,), step, dtype=torch.uint8))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(client.status(ddir)["clients"]) > 1:
                time.sleep(0.02)
        with DaemonClient(ddir) as c:
            _stage(c, "job", "r0", 4, torch.full((1000,), 4, dtype=torch.uint8))
            assert sorted(int(s) for s in c.request("list", run="job")["steps"]) == [3, 4]
            assert c.request("status")["evicted"] == 2
    finally:
        kill_pid(doc["pid"])


def test_a_snapshot_over_the_budget_is_refused_and_the_daemon_goes_on(daemon: dict, ddir: Path) -> None:
    with DaemonClient(ddir) as c:
        c.request("alloc", run="r", shard="0", nbytes=40 * MiB)
        with pytest.raises(DaemonBudgetError) as e:
            c.request("alloc", run="r", shard="1", nbytes=30 * MiB)
        msg = str(e.value)
        assert "30.0 MiB" in msg and "budget 64.0 MiB" in msg and "in use 40.0 MiB" in msg
        assert "--memory-budget" in msg and str(ddir) in msg
        assert c.request("alloc", run="r", shard="1", nbytes=20 * MiB)["nbytes"] == 20 * MiB


def test_a_budget_larger_than_dev_shm_is_refused_at_start_with_the_fix(ddir: Path) -> None:
    r = run_cli("daemon", "start", "--dir", str(ddir), "--memory-budget", "1000TiB")
    assert r.returncode == 2
    assert "less than the memory budget" in r.stdout and "--shm-size" in r.stdout and "--memory-budget below" in r.stdout
    assert not (ddir / "daemon.sock").exists()


def test_the_allocator_maps_daemon_segments_into_a_pool(daemon: dict, ddir: Path) -> None:
    from ckpt.pool import HostBufferPool

    with DaemonClient(ddir) as c:
        alloc = DaemonAllocator(c, run="job", shard="r0")
        pool = HostBufferPool(2, alloc)
        slot, _ = pool.acquire(10_000)
        slot.buffer.copy_(torch.arange(10_000, dtype=torch.int64).to(torch.uint8))
        name = alloc.segment_name(slot.buffer)
        assert pool._preparer is not None  # the other slot is sized in the background, ready for the next save
        pool._preparer.join()
        assert c.request("status")["segments"] == 2 and c.request("status")["memory_used"] == 20_000
        slot2, _ = pool.acquire(20_000)
        assert slot2 is not slot and c.request("status")["memory_used"] == 30_000
        pool.mark_staged(slot, 1)
        pool.mark_staged(slot2, 2)
        slot3, _ = pool.acquire(50_000)  # slot 1 is reused and grows: its old segment goes back to the daemon
        assert slot3 is slot and c.request("status")["memory_used"] == 70_000
        with pytest.raises(DaemonError, match="no segment"):
            c.request("begin", segment=name, step=3)
        pool.close()


# -- the protocol --------------------------------------------------------------------------------------------------
def test_validation_names_the_op_and_field() -> None:
    for msg, want in [
        ([], "must be a JSON object"),
        ({"op": "nope"}, "unknown op 'nope'"),
        ({"op": "alloc", "run": "r", "shard": "s"}, "missing field 'nbytes'"),
        ({"op": "alloc", "run": "r", "shard": "s", "nbytes": -1}, "field 'nbytes' must be an integer from 1"),
        ({"op": "alloc", "run": "r", "shard": "s", "nbytes": True}, "field 'nbytes'"),
        ({"op": "alloc", "run": "", "shard": "s", "nbytes": 1}, "field 'run' must be a non-empty string"),
        ({"op": "free", "segment": "../../etc/passwd"}, "segment name the daemon gave out"),
        ({"op": "free", "segment": "seg-0123456789abcdef", "x": 1}, "unknown fields ['x']"),
        ({"op": "seal", "segment": "seg-0123456789abcdef", "step": 1, "world": 1, "meta": []}, "a JSON object"),
        ({"op": "alloc", "run": "r", "shard": "s", "nbytes": 1, "reserve": 1}, "field 'reserve' must be true or"),
        ({"op": "alloc", "run": "r", "shard": "s", "nbytes": 1, "reserved": True}, "unknown fields ['reserved']"),
    ]:
        with pytest.raises(DaemonError, match=None) as e:
            protocol.validate(msg)
        assert want in str(e.value), (msg, str(e.value))


def test_an_unreserved_segment_is_reserved_by_its_client(daemon: dict, ddir: Path) -> None:
    """``alloc`` with ``reserve`` false gives a sparse segment (within the budget all the same); the allocator's
    ``reserve`` allocates its memory, a range or the whole."""
    with DaemonClient(ddir) as c:
        alloc = DaemonAllocator(c, run="job", shard="r0")
        seg = alloc.allocate(8 * MiB, "s")
        path = c.segment_path(alloc.segment_name(seg))
        assert os.stat(path).st_blocks * 512 < MiB and c.request("status")["memory_used"] == 8 * MiB
        alloc.reserve(seg, [(MiB, 2 * MiB)])
        assert 2 * MiB <= os.stat(path).st_blocks * 512 < 4 * MiB
        alloc.reserve(seg)
        assert os.stat(path).st_blocks * 512 >= 8 * MiB
        alloc.close()


_POST_AND_DIE = """
import os, signal, sys, torch
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.segments import map_segment
c = DaemonClient(sys.argv[1])
seg = c.request("alloc", run="job", shard="r0", nbytes=2**20)
buf, mm = map_segment(seg["path"], 2**20)
c.request("begin", segment=seg["segment"], step=1)
buf.fill_(1)
c.request("seal", segment=seg["segment"], step=1, world=1, meta={})
assert c.request("list", run="job")["steps"]["1"]["complete"]
c.post("begin", segment=seg["segment"], step=2)  # not awaited: the copy of step 2 starts at once
buf[:4096].fill_(2)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_posted_begin_takes_effect_though_the_trainer_dies_before_its_reply(daemon: dict, ddir: Path) -> None:
    """The pool posts ``begin`` without waiting: a trainer killed right after it, mid-copy, must not leave the
    overwritten segment sealed as the old step."""
    p = subprocess.run([sys.executable, "-c", _POST_AND_DIE, str(ddir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    deadline = time.monotonic() + 10
    with DaemonClient(ddir) as c:
        while time.monotonic() < deadline and len(c.request("status")["clients"]) > 1:
            time.sleep(0.02)
        st = c.request("status")
        assert c.request("list", run="job")["steps"] == {} and st["segments"] == 0 and st["reclaimed"] == 1


def test_a_posted_requests_error_comes_with_the_next_request(daemon: dict, ddir: Path) -> None:
    with DaemonClient(ddir) as c:
        c.post("begin", segment="seg-0123456789abcdef", step=3)
        c.post("begin", segment="seg-fedcba9876543210", step=3)
        with pytest.raises(DaemonError, match=r"begin \(posted before 'list'\): .*seg-0123456789abcdef"):
            c.request("list", run="job")
        assert c.request("list", run="job")["steps"] == {}  # every posted reply was read: the stream is in step


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _frame(m: dict) -> bytes:
    """``m`` framed as JSON, Infinity and NaN included (Python's json reads them; the daemon must refuse them)."""
    body = json.dumps(m, allow_nan=True).encode()
    return protocol.HEADER.pack(len(body)) + body


def _fuzz_frames(rng: "torch.Generator", n: int) -> list[tuple[bytes, str]]:
    """``n`` hostile frames: (bytes to send, what follows: ``reply`` (the daemon answers and reads on),
    ``oversized`` (it answers, then closes), ``cut`` (we close inside the frame))."""
    import random

    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    good = [{"op": "status"}, {"op": "list", "run": "job"}, {"op": "open", "run": "job", "step": 1, "shard": "r0"},
            {"op": "alloc", "run": "job", "shard": "r0", "nbytes": 4096}, {"op": "free", "segment": "seg-" + "0" * 16},
            {"op": "seal", "segment": "seg-" + "1" * 16, "step": 1, "world": 1, "meta": {}}]
    values = [None, True, -1, 0, 2**63, 1.5, float("inf"), "", "..", "../../etc/passwd", "/etc/shadow", "a" * 5000,
              "seg-../../x", [], {}, [[[[]]]], {"$": 1}, "\x00", "é" * 10]
    frames: list[tuple[bytes, str]] = []
    for _ in range(n):
        kind = r.randrange(8)
        if kind == 0:  # random bytes in a well-formed frame
            body = bytes(r.randrange(256) for _ in range(r.randrange(64)))
            frames.append((protocol.HEADER.pack(len(body)) + body, "reply"))
        elif kind == 1:  # a valid op with one field replaced by a hostile value
            m = dict(r.choice(good))
            m[r.choice(list(m))] = r.choice(values)
            frames.append((_frame(m), "reply"))
        elif kind == 2:  # an extra or a missing field
            m = dict(r.choice(good))
            if len(m) > 1 and r.random() < 0.5:
                del m[r.choice([k for k in m if k != "op"])]
            else:
                m["extra"] = r.choice(values[:10])
            frames.append((_frame(m), "reply"))
        elif kind == 3:  # not an object / deep nesting
            body = r.choice([b"[]", b"42", b'"x"', b"null", b"[" * 100_000 + b"]" * 100_000, b'{"op":'])
            frames.append((protocol.HEADER.pack(len(body)) + body, "reply"))
        elif kind == 4:  # an oversized length: the daemon cannot read past it
            frames.append((protocol.HEADER.pack(r.randrange(protocol.MAX_MESSAGE_BYTES + 1, 2**32)), "oversized"))
        elif kind == 5:  # a frame cut short, then the connection closed
            body = protocol.encode(r.choice(good))
            frames.append((body[: r.randrange(1, len(body))], "cut"))
        elif kind == 6:  # bit flips in a valid frame's body
            body = bytearray(protocol.encode(r.choice(good))[4:])
            for _ in range(r.randrange(1, 4)):
                body[r.randrange(len(body))] ^= 1 << r.randrange(8)
            frames.append((protocol.HEADER.pack(len(body)) + bytes(body), "reply"))
        else:  # a valid request on a segment that is not the client's
            frames.append((protocol.encode({"op": "begin", "segment": "seg-" + "f" * 16, "step": 3}), "reply"))
    return frames


def test_protocol_fuzz_the_daemon_keeps_serving_with_bounded_memory(daemon: dict, ddir: Path) -> None:
    frames = _fuzz_frames(torch.Generator().manual_seed(16), 10_000)
    rss0 = None
    sock = None
    replies = closes = 0
    for i, (data, mode) in enumerate(frames):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(str(ddir / "daemon.sock"))
        if i == 500:
            rss0 = _rss_kib(daemon["pid"])
        if mode != "reply":
            sock.sendall(data)
            if mode == "oversized":  # the daemon replies, then closes
                reply = protocol.recv(sock)
                assert reply["ok"] is False and "exceeds the limit" in reply["error"]
            sock.close()  # a cut frame: we close, the daemon sees the stream end inside it
            sock, closes = None, closes + 1
            continue
        sock.sendall(data)
        reply = protocol.recv(sock)
        assert isinstance(reply, dict) and "ok" in reply, (data[:80], reply)
        replies += 1
        if reply["ok"] and "segment" in reply:  # a fuzzed alloc that was valid: give it back
            sock.sendall(protocol.encode({"op": "free", "segment": reply["segment"]}))
            assert protocol.recv(sock)["ok"]
    if sock is not None:
        sock.close()
    assert replies > 5000 and closes > 500
    grown = _rss_kib(daemon["pid"]) - (rss0 or 0)
    assert grown < 64 * 1024, f"daemon RSS grew by {grown} KiB over the fuzz"
    data = torch.randint(0, 255, (MiB,), dtype=torch.uint8)
    with DaemonClient(ddir) as c:  # a real client still works
        _stage(c, "after", "r0", 1, data)
        got = c.request("open", run="after", step=1, shard="r0")
        view, mm = map_segment(got["path"], got["nbytes"], writable=False)
        assert torch.equal(view, data)
        del view
        mm.close()
        st = c.request("status")
        assert st["requests_refused"] > 4000 and st["segments"] == 1
    assert "unknown op" in (ddir / "daemon.log").read_text()
