"""``LocalStorage`` beyond the shared conformance suite: crash safety of commits, the I/O fast paths, fd cache."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from ckpt.errors import CorruptCheckpointError, StorageError
from formats.storage import local as local_mod
from formats.storage.local import LocalStorage, is_tmp_name, tmp_name

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(str(tmp_path / "ckpt"))


def test_commit_interrupted_before_rename_leaves_old_content(storage: LocalStorage, tmp_path: Path) -> None:
    storage.commit("manifest.json", b'{"step": 1}')
    # A crash between "write tmp + fsync" and "rename": exactly the file commit would have left behind.
    leftover = Path(tmp_name(str(tmp_path / "ckpt" / "manifest.json")))
    leftover.write_bytes(b'{"step": 2, "trunc')
    assert is_tmp_name(leftover.name)
    assert storage.list() == ["manifest.json"]
    assert storage.read("manifest.json") == b'{"step": 1}'
    reopened = LocalStorage(str(tmp_path / "ckpt"))  # a restarted process sees the same
    assert reopened.read("manifest.json") == b'{"step": 1}' and reopened.list() == ["manifest.json"]
    reopened.commit("manifest.json", b'{"step": 3}')
    assert reopened.read("manifest.json") == b'{"step": 3}'
    assert reopened.list() == ["manifest.json"]


def test_failed_rename_keeps_old_content_and_cleans_up(storage: LocalStorage, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    storage.commit("manifest.json", b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StorageError, match="manifest.json") as e:
        storage.commit("manifest.json", b"new")
    assert isinstance(e.value.__cause__, OSError)
    monkeypatch.undo()
    assert storage.read("manifest.json") == b"old"
    assert os.listdir(tmp_path / "ckpt") == ["manifest.json"]  # the tmp file was removed


def test_write_and_commit_fsync(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    storage.write("a/data.bin", [b"x" * 10])
    assert len(synced) == 1
    storage.commit("a/manifest.json", b"{}")
    assert len(synced) == 3  # the tmp file, then its directory after the rename


def test_write_passes_caller_buffers_without_concatenating(storage: LocalStorage,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = [np.arange(1000, dtype=np.float32), np.arange(10, dtype=np.int64)]
    raw = b"header"
    seen: list[list[memoryview]] = []
    real_writev = os.writev

    def spying_writev(fd: int, buffers: list[memoryview]) -> int:
        seen.append(list(buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", spying_writev)
    storage.write("f.bin", [raw, memoryview(arrays[0]), memoryview(arrays[1])])
    assert len(seen) == 1 and len(seen[0]) == 3
    assert seen[0][0].obj is raw
    for view, array in zip(seen[0][1:], arrays):
        assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), array)  # a view, not a copy


def test_partial_writes_and_iov_batches(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    calls: list[int] = []

    def stingy_writev(fd: int, buffers: list[memoryview]) -> int:  # at most 7 bytes per call, like a slow pipe
        calls.append(len(buffers))
        budget, first = 7, []
        for b in buffers:
            take = b[:budget]
            first.append(take)
            budget -= len(take)
            if budget == 0:
                break
        return real_writev(fd, first)

    monkeypatch.setattr(os, "writev", stingy_writev)
    monkeypatch.setattr(local_mod, "_IOV_MAX", 3)
    parts = [bytes([65 + i]) * (i + 1) for i in range(10)]
    assert storage.write("f.bin", parts) == sum(len(p) for p in parts)
    monkeypatch.undo()
    assert storage.read("f.bin") == b"".join(parts)
    assert max(calls) <= 3 and len(calls) >= 55 // 7


def test_readinto_handles_short_reads(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 40
    storage.write("f.bin", [data])
    real_preadv = os.preadv

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        return real_preadv(fd, [buffers[0][:5]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    out = bytearray(1000)
    storage.readinto("f.bin", 17, memoryview(out))
    assert bytes(out) == data[17:1017]
    assert storage.read("f.bin", 3000, 100) == data[3000:3100]


def test_truncated_file_error_names_path_offset_length_and_size(storage: LocalStorage, tmp_path: Path) -> None:
    storage.write("d/r0.bin", [b"x" * 100])
    with pytest.raises(CorruptCheckpointError) as e:
        storage.read("d/r0.bin", 90, 50)
    message = str(e.value)
    assert str(tmp_path / "ckpt" / "d" / "r0.bin") in message
    assert "offset 90" in message and "50 bytes" in message and "100 bytes" in message


def test_read_fds_are_cached_and_revalidated(storage: LocalStorage, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    storage.write("f.bin", [b"version-1"])
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    for i in range(50):
        assert storage.read("f.bin", i % 9, 1) == b"version-1"[i % 9:i % 9 + 1]
    assert len(opened) == 1 and storage.open_fd_count == 1
    # Another process replaces the file (new inode): the cached descriptor must not serve the old bytes.
    path = tmp_path / "ckpt" / "f.bin"
    (tmp_path / "other").write_bytes(b"version-2!")
    os.replace(tmp_path / "other", path)
    assert storage.read("f.bin") == b"version-2!"
    path.unlink()
    with pytest.raises(FileNotFoundError, match="f.bin"):
        storage.read("f.bin")
    storage.close()
    assert storage.open_fd_count == 0
    storage.close()  # idempotent


def test_fd_cache_is_bounded(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path), {"max_open_fds": 4})
    for i in range(10):
        storage.write(f"f{i}", [bytes([i]) * 8])
    for _ in range(2):
        for i in range(10):
            assert storage.read(f"f{i}", 2, 3) == bytes([i]) * 3
    assert storage.open_fd_count == 4
    storage.close()


def test_root_is_created_lazily(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    storage = LocalStorage(str(root))
    assert storage.list() == [] and not storage.exists("x") and not storage.root_exists()
    with pytest.raises(FileNotFoundError):
        storage.read("x")
    assert not (tmp_path / "not").exists()
    storage.write("x", [b"1"])
    assert (root / "x").read_bytes() == b"1"


@pytest.mark.parametrize("prefix", ["file://", "FILE://", "file://localhost"])
def test_file_urls(tmp_path: Path, prefix: str) -> None:
    assert LocalStorage(prefix + str(tmp_path / "c")).root == str(tmp_path / "c")


def test_os_errors_become_storage_errors_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    storage = LocalStorage(str(tmp_path / "blocker"))
    with pytest.raises(StorageError, match="blocker") as e:
        storage.write("x.bin", [b"1"])
    assert isinstance(e.value.__cause__, OSError)
    with pytest.raises(StorageError, match="blocker"):
        storage.commit("m.json", b"{}")


def test_reading_a_folder_is_a_storage_error(storage: LocalStorage) -> None:
    storage.write("d/x", [b"1"])
    with pytest.raises(StorageError, match="directory"):
        storage.read("d")
    assert not storage.exists("d")


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_opn_fds"):
        LocalStorage(str(tmp_path), {"max_opn_fds": 3})
    with pytest.raises(ValueError, match="max_open_fds"):
        LocalStorage(str(tmp_path), {"max_open_fds": 0})


def test_readonly_output_is_refused(storage: LocalStorage) -> None:
    storage.write("f", [b"abc"])
    with pytest.raises(TypeError, match="read-only"):
        storage.readinto("f", 0, memoryview(b"xyz"))


def test_tmp_names_are_unique_and_recognised() -> None:
    names = {tmp_name("m.json") for _ in range(100)}
    assert len(names) == 100 and all(is_tmp_name(n) for n in names)
    assert not is_tmp_name("m.json") and not is_tmp_name(f"m.json.tmp-{uuid.uuid4().hex}.bak")


def test_huge_request_is_split_into_bounded_syscalls(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_mod, "_MAX_IO_BYTES", 1000)
    sizes: list[int] = []
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: (sizes.append(sum(map(len, bufs))), real_writev(fd, bufs))[1])
    data = os.urandom(4500)
    storage.write("f", [data[:10], data[10:]])
    assert max(sizes) <= 1000 and sum(sizes) == 4500
    out = bytearray(4500)
    storage.readinto("f", 0, memoryview(out))
    assert bytes(out) == data


def test_a_read_longer_than_the_file_is_refused_before_allocating(storage: LocalStorage) -> None:
    """A forged length (2^40 bytes of a 3-byte file) raises the truncation error without sizing a buffer by it:
    before, ``read`` allocated ``length`` bytes first and found the file short afterwards."""
    storage.write("data/small.bin", [b"abc"])
    with pytest.raises(CorruptCheckpointError, match=r"wanted 1099511627776 bytes at offset 1 but the file has 3"):
        storage.read("data/small.bin", 1, 1 << 40)
    assert storage.read("data/small.bin", 1, 2) == b"bc"
