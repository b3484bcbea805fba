"""Hostile input on the trainer's side of the daemon: replies from something that is not an honest daemon, and
sealed snapshots whose segment files were damaged after the seal.

* A fake daemon (a thread on a Unix socket, answering scripted replies) sends replies that are malformed, typed
  wrongly, or name paths: ``DaemonClient`` and the daemon tier raise a ``DaemonError`` subclass naming the
  directory, the op and the field, and never open a path a reply gave them (segment paths are made from the
  validated segment name, under the daemon's own directory).
* A real daemon holds a sealed step whose segment file is then flipped or truncated: ``cp.restore`` raises
  ``CorruptCheckpointError`` / ``StorageError`` naming the segment, and restores nothing half-way.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import ckpt
from ckpt.errors import CheckpointError, CorruptCheckpointError, DaemonError, DaemonProtocolError, StorageError
from snapshot_daemon import protocol
from snapshot_daemon.client import DaemonClient
from snapshot_daemon.paths import SEGMENTS, SOCKET
from tests.daemon_utils import daemon, daemon_dir, ddir  # noqa: F401

pytestmark = pytest.mark.timeout(120)

HELLO = {"ok": True, "daemon_pid": 1, "version": 1, "dir": "/x"}
SEG = "seg-0123456789abcdef"


class FakeDaemon:
    """Answers each request with ``respond(request)``: a dict (sent as a frame) or bytes (sent raw)."""

    def __init__(self, d: Path, respond: Callable[[dict[str, Any]], Any]) -> None:
        os.mkdir(d, 0o700)
        os.mkdir(d / SEGMENTS, 0o700)
        self.dir, self.respond = d, respond
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(d / SOCKET))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while True:
                    try:
                        msg = protocol.recv(conn)
                    except (OSError, protocol.DaemonProtocolError):
                        break
                    if msg is None:
                        break
                    out = HELLO if msg["op"] == "hello" else self.respond(msg)
                    try:
                        conn.sendall(out if isinstance(out, bytes) else protocol.encode(out))
                    except OSError:
                        break

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Callable[[dict[str, Any]], Any]], FakeDaemon]]:
    made: list[FakeDaemon] = []
    with daemon_dir() as d:
        def make(respond: Callable[[dict[str, Any]], Any]) -> FakeDaemon:
            made.append(FakeDaemon(d, respond))
            return made[-1]

        yield make
        for f in made:
            f.close()


@pytest.mark.parametrize("reply, error, words", [
    ({"nbytes": 5}, DaemonError, "malformed reply"),  # no "ok"
    ({"ok": "yes"}, DaemonProtocolError, "'ok' 'yes'"),
    ({"ok": True, "nbytes": 64}, DaemonProtocolError, "missing field 'segment'"),
    ({"ok": True, "segment": "../../../etc/passwd", "nbytes": 64}, DaemonProtocolError, "field 'segment'"),
    ({"ok": True, "segment": SEG, "nbytes": -1}, DaemonProtocolError, "field 'nbytes'"),
    ({"ok": True, "segment": SEG, "nbytes": "64"}, DaemonProtocolError, "field 'nbytes'"),
    ({"ok": False, "error": "no room", "kind": "budget"}, ckpt.errors.DaemonBudgetError, "no room"),
    (protocol.HEADER.pack(7) + b"\xff\xfe{]oops", DaemonProtocolError, "not UTF-8 JSON"),
    (protocol.HEADER.pack(protocol.MAX_MESSAGE_BYTES + 1), ckpt.errors.DaemonUnavailableError, "connection lost"),
])
def test_malformed_alloc_replies_raise_named_errors(fake: Any, reply: Any, error: type, words: str) -> None:
    f = fake(lambda msg: reply)
    with DaemonClient(f.dir) as c:
        with pytest.raises(error) as e:
            c.request("alloc", run="job", shard="0/1", nbytes=64)
    assert words in str(e.value) and str(f.dir) in str(e.value), str(e.value)
    assert isinstance(e.value, CheckpointError)


def test_a_reply_never_chooses_the_path_the_trainer_maps(fake: Any, tmp_path: Path) -> None:
    """An ``alloc`` reply naming a path outside the daemon's directory: the allocator maps DIR/segments/NAME (which
    does not exist) and fails there, never the file the reply pointed at."""
    from snapshot_daemon.segments import DaemonAllocator

    target = tmp_path / "victim"
    target.write_bytes(b"\x00" * 4096)
    f = fake(lambda msg: {"ok": True, "segment": SEG, "path": str(target), "nbytes": 4096})
    with DaemonClient(f.dir) as c:
        alloc = DaemonAllocator(c, "job", "0/1")
        with pytest.raises(FileNotFoundError) as e:
            alloc.allocate(4096, "slot")
        assert str(f.dir / SEGMENTS / SEG) in str(e.value)
        with pytest.raises(DaemonProtocolError, match="not a segment name"):
            c.segment_path("../victim")
    assert target.read_bytes() == b"\x00" * 4096


@pytest.mark.parametrize("steps, words", [
    ([1, 2], "must be a JSON object, found list"),
    ({"../3": {"complete": True, "shards": {}}}, "is not a decimal step number"),
    ({"3": {"complete": "yes", "shards": {}}}, "expected {'complete': bool"),
    ({"3": {"complete": True, "shards": {"0/1": "many"}}}, "steps/3/shards/0/1"),
    ({"3": {"complete": True, "shards": {"": 5}}}, "shards key"),
])
def test_malformed_list_replies_raise_named_errors(fake: Any, steps: Any, words: str) -> None:
    from snapshot_daemon.tier import DaemonTier
    from ckpt.policies import EveryNSteps, KeepLatestN

    f = fake(lambda msg: {"ok": True, "steps": steps})
    tier = DaemonTier("daemon", f"daemon://{f.dir}", EveryNSteps(1), KeepLatestN(2), None, {"run": "/job"})
    try:
        with pytest.raises(DaemonProtocolError) as e:
            tier.committed_steps()
        assert words in str(e.value) and "reply to 'list'" in str(e.value) and str(f.dir) in str(e.value)
    finally:
        tier.close()


def test_an_open_reply_with_a_bad_manifest_is_refused(fake: Any) -> None:
    from snapshot_daemon.tier import DaemonTier
    from ckpt.policies import EveryNSteps, KeepLatestN

    complete = {"4": {"world": 1, "complete": True, "shards": {"0/1": 64}}}
    metas: list[Any] = [{"manifest": 17}, {}]

    def respond(msg: dict[str, Any]) -> Any:
        if msg["op"] == "list":
            return {"ok": True, "steps": complete}
        return {"ok": True, "segment": SEG, "nbytes": 64, "world": 1, "meta": metas[0]}

    f = fake(respond)
    tier = DaemonTier("daemon", f"daemon://{f.dir}", EveryNSteps(1), KeepLatestN(2), None, {"run": "/job"})
    try:
        assert tier.committed_steps() == [4]
        with pytest.raises(DaemonProtocolError, match="manifest is int, expected JSON text"):
            tier.storage_for(4)
        metas.pop(0)
        with pytest.raises(DaemonError, match="has no manifest"):
            tier.storage_for(4)
    finally:
        tier.close()


# -- damaged segments of a real daemon -----------------------------------------------------------------------------
def _sealed_run(ddir: Path, root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(37, 11), torch.nn.LayerNorm(11), torch.nn.Linear(11, 7))
    cp = ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir))
    cp.save(1, {"model": model}).wait()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    cp.close()  # a clean end leaves the sealed step in the daemon for the next job
    return {"model": model}, want


def _segment_of(ddir: Path, root: Path) -> Path:
    with DaemonClient(ddir) as c:
        entry = c.request("list", run=str(root))["steps"]["1"]
        shard = next(iter(entry["shards"]))
        return c.segment_path(c.request("open", run=str(root), step=1, shard=shard)["segment"])


def _fresh_model() -> dict[str, Any]:
    torch.manual_seed(1)
    return {"model": torch.nn.Sequential(torch.nn.Embedding(37, 11), torch.nn.LayerNorm(11), torch.nn.Linear(11, 7))}


def test_a_cleanly_closed_job_leaves_its_sealed_step_to_the_next(daemon: dict, ddir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    _, want = _sealed_run(ddir, root)
    state = _fresh_model()
    with ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir)) as cp:
        assert cp.restore(state) == 1
        assert cp.last_restore["source"] == "daemon" and cp.last_restore["storage_bytes_read"] == 0
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_flipped_byte_in_a_sealed_segment_is_caught(daemon: dict, ddir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    _sealed_run(ddir, root)
    seg = _segment_of(ddir, root)
    with open(seg, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x10]))
    state = _fresh_model()
    cp = ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir))
    try:
        with pytest.raises(CorruptCheckpointError) as e:
            cp.restore(state)
        assert seg.name in str(e.value) and "model/" in str(e.value), str(e.value)
    finally:
        cp.close()


def test_a_restore_from_daemon_memory_verifies_everything_before_writing(daemon: dict, ddir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon segments are mapped, so ``ckpt.load`` verifies every region before its first write and needs no undo
    copy (``ckpt.loading.Undo.keep`` must never run): a flipped byte in the tensor read last leaves every tensor of
    the state as it was, and the intact step then restores exactly, still without an undo copy."""
    from ckpt.loading import Undo
    from formats.reader import read_manifest
    from snapshot_daemon.tier import DaemonTier
    from ckpt.policies import EveryNSteps, KeepLatestN

    root = tmp_path / "run"
    _, want = _sealed_run(ddir, root)
    seg = _segment_of(ddir, root)
    tier = DaemonTier("daemon", f"daemon://{ddir}", EveryNSteps(1), KeepLatestN(2), None, {"run": str(root)})
    try:
        manifest = read_manifest(tier.storage_for(1))
    finally:
        tier.close()
    last = manifest.tensors[max(manifest.tensors)].chunks[-1]  # planning order follows the keys: read last
    at = last.byte_offset + last.byte_length - 1
    with open(seg, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))

    def no_undo(self: Undo, dest: torch.Tensor) -> None:
        raise AssertionError("a load from daemon memory kept an undo copy")
    monkeypatch.setattr(Undo, "keep", no_undo)
    state = _fresh_model()
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir)) as cp:
        with pytest.raises(CorruptCheckpointError, match=max(manifest.tensors)):
            cp.restore(state)
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, before[k]), k
    with open(seg, "r+b") as f:  # repair it: the same restore now succeeds, verified first, no undo copy
        f.seek(at)
        f.write(b)
    with ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir)) as cp:
        assert cp.restore(state) == 1 and cp.last_restore["source"] == "daemon"
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_truncated_sealed_segment_is_caught(daemon: dict, ddir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    _sealed_run(ddir, root)
    seg = _segment_of(ddir, root)
    os.truncate(seg, 64)
    state = _fresh_model()
    cp = ckpt.Checkpointer(str(root), disk_every=0, daemon=str(ddir))
    try:
        with pytest.raises((StorageError, CorruptCheckpointError)) as e:
            cp.restore(state)
        assert seg.name in str(e.value), str(e.value)
    finally:
        cp.close()


def test_a_box_of_a_sealed_tensor_is_read_from_the_mapping_and_verified(daemon: dict, ddir: Path,
                                                                        tmp_path: Path) -> None:
    """Load-time resharding reads part of a chunk: from daemon memory that is a verified view of the mapped
    segment (no read into a buffer), exact, and a flipped byte inside the part is still caught."""
    from ckpt.policies import EveryNSteps, KeepLatestN
    from formats.box import Box
    from formats.reader import ChunkReader, read_manifest
    from snapshot_daemon.tier import DaemonTier

    root = tmp_path / "run"
    _, want = _sealed_run(ddir, root)
    tier = DaemonTier("daemon", f"daemon://{ddir}", EveryNSteps(1), KeepLatestN(2), None, {"run": str(root)})
    try:
        storage = tier.storage_for(1)
        manifest = read_manifest(storage)
        reader = ChunkReader(storage, manifest)
        entry = manifest.tensors["model/0.weight"]  # the embedding, 37 x 11
        out = torch.empty(5, 4)
        reader.read_box(entry, Box((30, 6), (5, 4)), out)
        assert torch.equal(out, want["0.weight"][30:35, 6:10])
        view = storage.view(entry.chunks[0].file, entry.chunks[0].byte_offset, 8)
        assert view is not None and len(view) == 8
        del view
        size = storage.size(entry.chunks[0].file)
        for offset, length in ((size - 4, 8), (-1, 4), (0, -1)):  # what a forged manifest could ask for
            with pytest.raises(StorageError, match="the manifest does not fit the segment"):
                storage.view(entry.chunks[0].file, offset, length)
        with pytest.raises(FileNotFoundError, match="not a segment of this sealed step"):
            storage.view("data/../../etc/passwd", 0, 1)
        seg = _segment_of(ddir, root)
        off = entry.chunks[0].byte_offset + (31 * 11 + 7) * 4  # a byte inside the box
        with open(seg, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x01]))
        fresh = tier.storage_for(1)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch in key 'model/0.weight'"):
            ChunkReader(fresh, manifest).read_box(entry, Box((30, 6), (5, 4)), out)
        storage.close()
        fresh.close()
    finally:
        tier.close()
