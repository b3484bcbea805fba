"""Every storage backend passes the one conformance suite in ``tests/storage/abstract.py`` (STYLE 6).

One fixtures mixin per backend provides ``backend``; ``Test<Backend>`` = mixin + ``AbstractStorageSuite``:

* ``LocalPathFixtures``   - ``LocalStorage`` from a plain directory path;
* ``FileUrlFixtures``     - ``LocalStorage`` from a ``file://`` URL;
* ``MemoryFixtures``      - ``MemoryStorage`` (``memory://``);
* ``S3Fixtures``          - ``FsspecStorage`` on s3 through s3fs against moto's real server on 127.0.0.1
  (part size 5 MiB, so the 12 MiB write is a 3-part multipart upload);
* ``FsspecMemoryFixtures`` - ``FsspecStorage`` on fsspec's own in-memory file system, which covers the generic
  (non-s3) fsspec code path.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from formats.storage import open_storage
from formats.storage.fsspec_backend import FsspecStorage
from formats.storage.local import LocalStorage
from formats.storage.memory import _FILES, _LOCK, MemoryStorage
from tests.s3_fixture import S3Server
from tests.storage.abstract import MIB, AbstractStorageSuite, Backend

pytestmark = pytest.mark.timeout(120)


def _local_snapshot(parent: Path) -> set[str]:
    return {str(p.relative_to(parent)) for p in parent.rglob("*") if p.is_file()}


class LocalPathFixtures:
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        parent = tmp_path / "parent"
        parent.mkdir()
        root = parent / "root"  # not created: the first write must create it
        return Backend(
            name="local-path", url=str(root),
            open=lambda: open_storage(str(root)),
            snapshot=lambda: _local_snapshot(parent),
            abs_path=str(parent / "escaped.bin"),
            commit_race_rounds=40,  # each commit is two fsyncs
        )


class FileUrlFixtures:
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        parent = tmp_path / "parent"
        parent.mkdir()
        url = "file://" + str(parent / "root")
        return Backend(
            name="file-url", url=url,
            open=lambda: open_storage(url, None),
            snapshot=lambda: _local_snapshot(parent),
            abs_path=str(parent / "escaped.bin"),
            commit_race_rounds=40,  # each commit is two fsyncs
        )


class MemoryFixtures:
    @pytest.fixture
    def backend(self) -> Backend:
        parent = f"parent-{uuid.uuid4().hex}"
        url = f"memory://{parent}/root"

        def snapshot() -> set[str]:
            with _LOCK:
                keys = list(_FILES)
            # normalise, so that a key built as "parent/root/../x" would show up as the escape it is
            return {posixpath.normpath(k) for k in keys if posixpath.normpath(k).startswith(parent)}

        return Backend(name="memory", url=url, open=lambda: open_storage(url), snapshot=snapshot)


def _s3_snapshot(server: S3Server, parent: str) -> set[str]:
    """Every key under ``parent/``, listed with plain boto3 (around the code under test)."""
    client = server.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=parent):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    return keys


@pytest.mark.s3
class S3Fixtures:
    @pytest.fixture
    def backend(self, s3_server_running: S3Server) -> Backend:
        server = s3_server_running
        parent = server.url("parent").split("/", 3)[3]
        url = f"s3://{server.bucket}/{parent}/root"
        options: dict[str, Any] = {**server.storage_options, "part_size_bytes": 5 * MIB}
        return Backend(
            name="s3", url=url,
            open=lambda: open_storage(url, options),
            snapshot=lambda: _s3_snapshot(server, parent),
            commit_race_rounds=15,
            large_bytes=12 * MIB,
            part_bytes=5 * MIB,
        )


class FsspecMemoryFixtures:
    @pytest.fixture
    def backend(self) -> Backend:
        parent = f"parent-{uuid.uuid4().hex}"
        url = f"memory://{parent}/root"
        # A small part size so the large write streams through fs.open(..., "wb") in several blocks.
        options: dict[str, Any] = {"part_size_bytes": 1 * MIB}

        def snapshot() -> set[str]:
            fs = fsspec.filesystem("memory")
            return {posixpath.normpath(p) for p in fs.store if posixpath.normpath(p).startswith(f"/{parent}")}

        return Backend(name="fsspec-memory", url=url, open=lambda: FsspecStorage(url, options), snapshot=snapshot,
                       large_bytes=4 * MIB, commit_race_rounds=100)


class TestLocalPath(LocalPathFixtures, AbstractStorageSuite):
    pass


class TestFileUrl(FileUrlFixtures, AbstractStorageSuite):
    pass


class TestMemory(MemoryFixtures, AbstractStorageSuite):
    pass


class TestS3(S3Fixtures, AbstractStorageSuite):
    pass


class TestFsspecMemory(FsspecMemoryFixtures, AbstractStorageSuite):
    pass


# -- open_storage dispatch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make_url", "cls"),
    [
        (lambda tmp: str(tmp / "ckpt"), LocalStorage),
        (lambda tmp: "file://" + str(tmp / "ckpt"), LocalStorage),
        (lambda tmp: os.path.relpath(tmp / "ckpt"), LocalStorage),
        (lambda tmp: f"memory://dispatch-{uuid.uuid4().hex}", MemoryStorage),
        (lambda tmp: f"MEMORY://dispatch-{uuid.uuid4().hex}", MemoryStorage),
    ],
    ids=["path", "file-url", "relative-path", "memory", "memory-upper-case-scheme"],
)
def test_open_storage_picks_backend_by_scheme(tmp_path: Path, make_url: Any, cls: type) -> None:
    url = make_url(tmp_path)
    storage = open_storage(url)
    assert type(storage) is cls
    assert storage.url == url
    storage.write("probe", [b"1"])
    assert storage.read("probe") == b"1"
    if cls is LocalStorage:
        assert (tmp_path / "ckpt" / "probe").read_bytes() == b"1"


@pytest.mark.s3
def test_open_storage_picks_fsspec_for_s3(s3_server_running: S3Server) -> None:
    url = s3_server_running.url("dispatch")
    storage = open_storage(url, s3_server_running.storage_options)
    assert type(storage) is FsspecStorage
    storage.write("probe", [b"1"])
    bucket, key = url[len("s3://"):].split("/", 1)
    assert s3_server_running.client().get_object(Bucket=bucket, Key=f"{key}/probe")["Body"].read() == b"1"


def test_open_storage_returns_a_storage_unchanged(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    assert open_storage(storage) is storage
