"""The storage conformance suite: abstract test classes every backend must pass (STYLE 6, fsspec ``tests/abstract``).

``tests/storage/test_conformance.py`` combines ``AbstractStorageSuite`` with one fixtures mixin per backend; the
mixin provides the ``backend`` fixture (a ``Backend``). Nothing here is collected on its own (no ``Test``
prefix). Every test checks bytes or errors a broken backend would get wrong.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from formats.storage.base import Storage

MIB = 1 << 20


@dataclass
class Backend:
    """What a fixtures mixin tells the suite about one backend.

    ``open`` builds a fresh ``Storage`` rooted at a root no other test uses. ``snapshot`` returns every name
    stored under the root's *parent* (the root included), read around the code under test where possible,
    so a test can show that a refused path wrote nothing anywhere. ``abs_path`` is an absolute path that would
    land inside that parent if a backend forgot to refuse absolute paths.
    """

    name: str
    url: str
    open: Callable[[], Storage]
    snapshot: Callable[[], set[str]]
    abs_path: str = "/escaped.bin"
    #: bytes of the large-write test (s3 sets a small part size so that this needs about 3 parts)
    large_bytes: int = 12 * MIB
    #: the backend's upload part / block size, to read across part edges of the large write
    part_bytes: int = 1 * MIB
    #: commits of the atomic-replace race (fewer where each costs an HTTP request)
    commit_race_rounds: int = 200
    extra: dict[str, Any] = field(default_factory=dict)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic bytes that differ at every offset from a shifted copy (catches off-by-one reads)."""
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


class _BaseStorageTests:
    @pytest.fixture
    def storage(self, backend: Backend) -> Iterator[Storage]:
        s = backend.open()
        try:
            yield s
        finally:
            s.close()


class AbstractWriteReadTests(_BaseStorageTests):
    def test_write_many_buffer_kinds_round_trip(self, storage: Storage) -> None:
        floats = np.arange(1000, dtype=np.float32)
        tensor = torch.arange(300, dtype=torch.int64)
        raw = pattern(777, seed=1)
        buffers = [raw, bytearray(b"xyz"), memoryview(floats), b"", memoryview(tensor.numpy()),
                   memoryview(raw)[100:200], memoryview(np.zeros((3, 5), dtype=np.float64))]
        expected = (raw + b"xyz" + floats.tobytes() + tensor.numpy().tobytes() + raw[100:200]
                    + np.zeros((3, 5)).tobytes())
        assert storage.write("data/r0.bin", buffers) == len(expected)
        assert storage.read("data/r0.bin") == expected
        assert storage.size("data/r0.bin") == len(expected)

    def test_zero_length_files(self, storage: Storage) -> None:
        assert storage.write("empty-a", []) == 0
        assert storage.write("empty-b", [b"", memoryview(b"")]) == 0
        for name in ("empty-a", "empty-b"):
            assert storage.exists(name)
            assert storage.size(name) == 0
            assert storage.read(name) == b""
            assert storage.read(name, 0, 0) == b""
        assert storage.list() == ["empty-a", "empty-b"]

    def test_rewrite_replaces_whole_content(self, storage: Storage) -> None:
        storage.write("f.bin", [pattern(5000, seed=2)])
        storage.write("f.bin", [b"short"])
        assert storage.read("f.bin") == b"short"
        assert storage.size("f.bin") == 5

    def test_ranged_reads(self, storage: Storage) -> None:
        data = pattern(10_000, seed=3)
        storage.write("deep/er/f.bin", [data[:4000], data[4000:]])
        for offset, length in [(0, 1), (1, 10), (3999, 2), (4000, 4000), (9999, 1), (0, 10_000), (10_000, 0),
                               (123, 0)]:
            assert storage.read("deep/er/f.bin", offset, length) == data[offset:offset + length], (offset, length)
        assert storage.read("deep/er/f.bin", 9000) == data[9000:]
        assert storage.read("deep/er/f.bin", 10_000) == b""

    def test_readinto_fills_preallocated_view_in_place(self, storage: Storage) -> None:
        data = pattern(4096, seed=4)
        storage.write("f.bin", [data])
        target = bytearray(b"\xee" * 300)
        storage.readinto("f.bin", 1000, memoryview(target)[50:250])
        assert bytes(target[50:250]) == data[1000:1200]
        assert target[:50] == b"\xee" * 50 and target[250:] == b"\xee" * 50  # nothing outside the view touched
        floats = np.zeros(16, dtype=np.float32)
        storage.readinto("f.bin", 64, memoryview(floats))
        assert floats.tobytes() == data[64:128]

    def test_read_past_end_is_corrupt_and_names_the_file(self, storage: Storage) -> None:
        storage.write("dir/short.bin", [b"0123456789"])
        with pytest.raises(CorruptCheckpointError) as e:
            storage.read("dir/short.bin", 5, 100)
        message = str(e.value)
        assert "dir/short.bin" in message and "5" in message and "100" in message and "10 bytes" in message
        with pytest.raises(CorruptCheckpointError, match="dir/short.bin"):
            storage.read("dir/short.bin", 11)
        with pytest.raises(CorruptCheckpointError, match="dir/short.bin"):
            storage.read("dir/short.bin", 10, 1)
        out = bytearray(20)
        with pytest.raises(CorruptCheckpointError, match="dir/short.bin"):
            storage.readinto("dir/short.bin", 0, memoryview(out))

    def test_missing_file_raises_file_not_found_naming_it(self, storage: Storage) -> None:
        storage.write("present.bin", [b"x"])
        calls: list[Callable[[], object]] = [
            lambda: storage.read("no/such.bin"),
            lambda: storage.read("no/such.bin", 0, 4),
            lambda: storage.read("no/such.bin", 0, 0),
            lambda: storage.readinto("no/such.bin", 0, memoryview(bytearray(4))),
            lambda: storage.size("no/such.bin"),
        ]
        for call in calls:
            with pytest.raises(FileNotFoundError) as e:
                call()
            assert "no/such.bin" in str(e.value)
            assert not isinstance(e.value, CorruptCheckpointError)
        assert not storage.exists("no/such.bin")
        assert not storage.exists("present.bin/child")

    def test_non_contiguous_buffer_is_refused(self, storage: Storage) -> None:
        strided = np.arange(100, dtype=np.int32)[::2]
        with pytest.raises(TypeError, match="contiguous"):
            storage.write("f.bin", [memoryview(strided)])


class AbstractStreamWriteTests(_BaseStorageTests):
    def test_open_writer_streams_pieces_into_one_file(self, storage: Storage) -> None:
        rng = np.random.default_rng(3)
        pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 7, 3 * MIB + 5, 1, 17 * MIB)]
        w = storage.open_writer("data/streamed.bin")
        for p in pieces:
            w.write(memoryview(p))
        assert w.close() == sum(len(p) for p in pieces)
        whole = b"".join(pieces)
        assert storage.size("data/streamed.bin") == len(whole)
        assert hashlib.sha256(storage.read("data/streamed.bin")).digest() == hashlib.sha256(whole).digest()
        assert storage.read("data/streamed.bin", 3 * MIB + 10, 5) == whole[3 * MIB + 10 : 3 * MIB + 15]

    def test_open_writer_refuses_unsafe_paths(self, storage: Storage) -> None:
        with pytest.raises(UnsafeCheckpointError):
            storage.open_writer("../escape.bin")


class AbstractCommitTests(_BaseStorageTests):
    def test_commit_publishes_and_replaces(self, storage: Storage) -> None:
        assert not storage.exists("ckpt/manifest.json")
        storage.commit("ckpt/manifest.json", b'{"version": 1, "long": "' + b"x" * 500 + b'"}')
        storage.commit("ckpt/manifest.json", b'{"version": 2}')
        assert storage.read("ckpt/manifest.json") == b'{"version": 2}'
        assert storage.list() == ["ckpt/manifest.json"]  # no temporary left behind or listed

    def test_readers_see_one_whole_version_during_commits(self, storage: Storage, backend: Backend) -> None:
        versions = [b"a" * 1000, b"b" * 3000]
        storage.commit("m.json", versions[0])
        stop = threading.Event()
        seen: list[bytes] = []

        def reader() -> None:
            other = backend.open()  # a second handle, as another rank would have
            try:
                while not stop.is_set():
                    seen.append(other.read("m.json"))
            finally:
                other.close()

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(reader) for _ in range(2)]
            for i in range(backend.commit_race_rounds):
                storage.commit("m.json", versions[i % 2])
            stop.set()
            for f in futures:
                f.result()
        assert seen, "the readers never ran"
        torn = [s[:20] + b"..." for s in seen if s not in versions]
        assert not torn, f"readers saw {len(torn)} partial versions, e.g. {torn[:3]}"


class AbstractListTests(_BaseStorageTests):
    def test_fresh_root_is_empty(self, storage: Storage) -> None:
        assert storage.list() == []
        assert storage.list("anything") == []
        assert not storage.root_exists()
        storage.write("x", [b"1"])
        assert storage.root_exists()

    def test_list_is_sorted_relative_and_folder_scoped(self, storage: Storage) -> None:
        for name in ["b.bin", "a/y/z.bin", "a/x.bin", "ab/q.bin", "a0"]:
            storage.write(name, [name.encode()])
        assert storage.list() == ["a/x.bin", "a/y/z.bin", "a0", "ab/q.bin", "b.bin"]
        assert storage.list("a") == ["a/x.bin", "a/y/z.bin"]
        assert storage.list("a/") == ["a/x.bin", "a/y/z.bin"]
        assert storage.list("a/y") == ["a/y/z.bin"]
        assert storage.list("nope") == []

    def test_list_hides_commit_temporaries(self, storage: Storage) -> None:
        storage.write("manifest.json", [b"v1"])
        storage.write(f"manifest.json.tmp-{uuid.uuid4().hex}", [b"half-written v2"])
        storage.write("data/r0.bin.tmp-notours", [b"kept"])  # only our exact tmp pattern is hidden
        assert storage.list() == ["data/r0.bin.tmp-notours", "manifest.json"]

    def test_exists_size_delete(self, storage: Storage) -> None:
        storage.write("d/one", [b"1"])
        storage.write("d/two", [b"22"])
        storage.write("keep", [b"333"])
        assert [storage.size(p) for p in ("d/one", "d/two", "keep")] == [1, 2, 3]
        storage.delete(["d/one", "d/two", "d/never-existed"])
        assert not storage.exists("d/one") and not storage.exists("d/two")
        assert storage.list() == ["keep"]
        with pytest.raises(FileNotFoundError):
            storage.read("d/one")
        storage.delete([])
        assert storage.read("keep") == b"333"


UNSAFE_PATHS = ["../x", "a/../../x", "a/..", "/abs", "a//b", "a/./b", "./a", "a/", "a\\b", "..\\x", "", "a\x00b"]


class AbstractConfinementTests(_BaseStorageTests):
    @pytest.mark.parametrize("bad", UNSAFE_PATHS + ["<abs>"])
    def test_unsafe_paths_are_refused_before_any_io(self, storage: Storage, backend: Backend, bad: str) -> None:
        if bad == "<abs>":
            bad = backend.abs_path
        storage.write("inside.bin", [b"ok"])
        before = backend.snapshot()
        operations: list[Callable[[], object]] = [
            lambda: storage.write(bad, [b"escaped"]),
            lambda: storage.commit(bad, b"escaped"),
            lambda: storage.read(bad),
            lambda: storage.readinto(bad, 0, memoryview(bytearray(1))),
            lambda: storage.size(bad),
            lambda: storage.exists(bad),
            lambda: storage.delete(["inside.bin", bad]),
        ]
        for op in operations:
            with pytest.raises(UnsafeCheckpointError):
                op()
        assert backend.snapshot() == before
        assert storage.read("inside.bin") == b"ok"  # the batch delete refused the whole batch up front

    def test_list_refuses_escaping_prefix(self, storage: Storage) -> None:
        for bad in ("..", "../other", "a/../..", "/abs"):
            with pytest.raises(UnsafeCheckpointError):
                storage.list(bad)


class AbstractConcurrencyTests(_BaseStorageTests):
    def test_concurrent_writes_and_reads(self, storage: Storage) -> None:
        contents = {f"data/r{i:03d}.bin": pattern(20_000 + 97 * i, seed=i) for i in range(24)}

        def write(item: tuple[str, bytes]) -> int:
            name, data = item
            return storage.write(name, [data[:5000], memoryview(data)[5000:]])

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(write, contents.items())) == [len(d) for d in contents.values()]
        assert storage.list("data") == sorted(contents)

        jobs = [(name, (i * 977) % 15_000, 1 + (i * 131) % 4000) for i, name in enumerate(sorted(contents) * 4)]

        def read(job: tuple[str, int, int]) -> bool:
            name, offset, length = job
            if offset % 2:
                got = storage.read(name, offset, length)
            else:
                buf = bytearray(length)
                storage.readinto(name, offset, memoryview(buf))
                got = bytes(buf)
            return got == contents[name][offset:offset + length]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(read, jobs))
        assert all(results), f"{results.count(False)} of {len(results)} concurrent reads returned wrong bytes"


class AbstractLargeWriteTests(_BaseStorageTests):
    def test_multi_megabyte_write_from_several_buffers(self, storage: Storage, backend: Backend) -> None:
        n = backend.large_bytes
        data = pattern(n, seed=99)
        cut1, cut2 = n // 3 + 12_345, 2 * n // 3 - 777
        buffers = [memoryview(np.frombuffer(data[:cut1], dtype=np.uint8)), data[cut1:cut2], bytearray(data[cut2:])]
        assert storage.write("big/r0.bin", buffers) == n
        assert storage.size("big/r0.bin") == n
        assert hashlib.sha256(storage.read("big/r0.bin")).digest() == hashlib.sha256(data).digest()
        part_edges = [k * backend.part_bytes - 1 for k in (1, 2) if k * backend.part_bytes < n - 1]
        assert part_edges, "the large write must span at least two parts"
        for offset, length in [(cut1 - 10, 20), (cut2 - 3, 6), (n - 5, 5)] + [(e, 2) for e in part_edges]:
            assert storage.read("big/r0.bin", offset, length) == data[offset:offset + length]


class AbstractStorageSuite(
    AbstractStreamWriteTests,
    AbstractWriteReadTests,
    AbstractCommitTests,
    AbstractListTests,
    AbstractConfinementTests,
    AbstractConcurrencyTests,
    AbstractLargeWriteTests,
):
    """Everything a backend must do; ``test_conformance.py`` mixes in one backend's fixtures."""
