"""``MemoryStorage`` beyond the conformance suite: one process-global namespace shared by every instance."""

from __future__ import annotations

import uuid

import pytest

from ckpt.errors import UnsafeCheckpointError
from formats.storage import open_storage
from formats.storage.memory import MemoryStorage, clear_memory_storage

pytestmark = pytest.mark.timeout(60)


def _name() -> str:
    return f"mem-{uuid.uuid4().hex}"


def test_instances_on_one_url_share_files() -> None:
    url = f"memory://{_name()}/ckpt"
    a, b = MemoryStorage(url), open_storage(url)
    a.write("x.bin", [b"abc"])
    assert b.read("x.bin") == b"abc" and b.list() == ["x.bin"]
    b.commit("m.json", b"{}")
    assert a.exists("m.json")
    a.delete(["x.bin"])
    assert not b.exists("x.bin")


def test_roots_are_isolated_and_nested_roots_see_their_subtree() -> None:
    name = _name()
    top, sub, other = MemoryStorage(f"memory://{name}"), MemoryStorage(f"memory://{name}/sub"), MemoryStorage(
        f"memory://{name}-2")
    sub.write("f", [b"1"])
    other.write("g", [b"2"])
    assert top.list() == ["sub/f"]
    assert top.read("sub/f") == b"1"
    assert other.list() == ["g"] and not other.exists("sub/f")


def test_clear_memory_storage_drops_one_root_only() -> None:
    keep, drop = MemoryStorage(f"memory://{_name()}"), MemoryStorage(f"memory://{_name()}")
    keep.write("a", [b"1"])
    drop.write("a", [b"2"])
    clear_memory_storage(drop.url)
    assert drop.list() == [] and keep.read("a") == b"1"


def test_stored_bytes_do_not_alias_the_callers_buffer() -> None:
    storage = MemoryStorage(f"memory://{_name()}")
    buf = bytearray(b"before")
    storage.write("f", [buf])
    buf[:] = b"AFTER!"
    assert storage.read("f") == b"before"


def test_missing_names_the_memory_url() -> None:
    url = f"memory://{_name()}/r"
    with pytest.raises(FileNotFoundError, match=f"{url}/nope"):
        MemoryStorage(url).read("nope")


@pytest.mark.parametrize("url", ["memory://", "memory:///", "s3://bucket"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="memory://"):
        MemoryStorage(url)


def test_escaping_root_is_refused() -> None:
    with pytest.raises(UnsafeCheckpointError):
        MemoryStorage("memory://a/../b")


def test_options_are_refused() -> None:
    with pytest.raises(ValueError, match="part_size_bytes"):
        MemoryStorage(f"memory://{_name()}", {"part_size_bytes": 1})
