"""``FsspecStorage`` on s3 beyond the conformance suite: parallel multipart, aborts, options, fresh listings,
and outages of the moto server (all against the real server on 127.0.0.1, never a mocked client)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Iterator

import pytest

from ckpt.errors import StorageError
from formats.storage import fsspec_backend
from formats.storage.fsspec_backend import FsspecStorage
from tests.s3_fixture import S3Server
from tests.storage.abstract import MIB, pattern

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]


class CallSpy:
    """Wraps one storage's ``fs._call_s3``: records every call and the most ``upload_part`` calls in flight."""

    def __init__(self, storage: FsspecStorage, fail_part: int | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._real = storage.fs._call_s3
        self._fail_part = fail_part
        storage.fs._call_s3 = self  # instance attribute: only this storage's client is spied on

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((method, {k: v for k, v in kwargs.items() if k != "Body"}))
        if method != "upload_part":
            return await self._real(method, *args, **kwargs)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # hold the slot a little so overlapping uploads are observable
            if kwargs["PartNumber"] == self._fail_part:
                raise OSError(5, "injected failure of one part")
            return await self._real(method, *args, **kwargs)
        finally:
            self.in_flight -= 1

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


def _key(server: S3Server, storage: FsspecStorage, path: str) -> str:
    return storage.url[len(f"s3://{server.bucket}/"):] + "/" + path


@pytest.fixture
def server(s3_server_running: S3Server) -> Iterator[S3Server]:
    yield s3_server_running


def _open(server: S3Server, **options: Any) -> FsspecStorage:
    return FsspecStorage(server.url("fs"), {**server.storage_options, **options})


def test_large_write_is_a_parallel_three_part_upload(server: S3Server) -> None:
    storage = _open(server, part_size_bytes=5 * MIB)
    spy = CallSpy(storage)
    data = pattern(12 * MIB, seed=7)
    storage.write("r0.bin", [data[:1000], memoryview(data)[1000:7 * MIB], data[7 * MIB:]])
    parts = [kw["PartNumber"] for m, kw in spy.calls if m == "upload_part"]
    assert sorted(parts) == [1, 2, 3]
    assert spy.max_in_flight >= 2, "parts were uploaded one after another"
    assert spy.methods().count("complete_multipart_upload") == 1 and "put_object" not in spy.methods()
    head = server.client().head_object(Bucket=server.bucket, Key=_key(server, storage, "r0.bin"))
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    body = server.client().get_object(Bucket=server.bucket, Key=_key(server, storage, "r0.bin"))["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_upload_concurrency_option_bounds_parts_in_flight(server: S3Server) -> None:
    storage = _open(server, part_size_bytes=5 * MIB, upload_concurrency=1)
    spy = CallSpy(storage)
    storage.write("r0.bin", [pattern(11 * MIB)])
    assert spy.methods().count("upload_part") == 3 and spy.max_in_flight == 1


def test_small_write_and_commit_are_single_puts(server: S3Server) -> None:
    storage = _open(server)
    spy = CallSpy(storage)
    storage.write("small.bin", [b"a" * 1000, b"b" * 1000])
    storage.commit("manifest.json", b'{"v": 1}')
    assert [m for m in spy.methods() if m != "head_object"] == ["put_object", "put_object"]
    assert storage.read("small.bin") == b"a" * 1000 + b"b" * 1000


def test_failed_part_aborts_and_leaves_no_object(server: S3Server) -> None:
    storage = _open(server, part_size_bytes=5 * MIB)
    spy = CallSpy(storage, fail_part=2)
    with pytest.raises(StorageError, match="r0.bin") as e:
        storage.write("r0.bin", [pattern(12 * MIB)])
    assert "injected failure" in str(e.value)
    assert "abort_multipart_upload" in spy.methods() and "complete_multipart_upload" not in spy.methods()
    assert not storage.exists("r0.bin")
    uploads = server.client().list_multipart_uploads(Bucket=server.bucket, Prefix=_key(server, storage, ""))
    assert uploads.get("Uploads", []) == []


def test_own_options_are_consumed_and_validated(server: S3Server) -> None:
    options = {**server.storage_options, "part_size_bytes": 6 * MIB, "multipart_threshold_bytes": 100,
               "upload_concurrency": 2}
    given = dict(options)
    storage = FsspecStorage(server.url("opts"), options)
    assert options == given  # the caller's dict is not modified
    spy = CallSpy(storage)
    storage.write("f.bin", [b"x" * 200])  # above the 100-byte threshold: multipart even though small
    assert spy.methods()[:1] == ["create_multipart_upload"] and storage.read("f.bin") == b"x" * 200
    with pytest.raises(ValueError, match="part_size_bytes"):
        FsspecStorage(server.url("opts"), {**server.storage_options, "part_size_bytes": MIB})
    with pytest.raises(ValueError, match="upload_concurrency"):
        FsspecStorage(server.url("opts"), {**server.storage_options, "upload_concurrency": 0})


def test_part_size_grows_only_when_left_at_default(server: S3Server) -> None:
    total_bytes = 20_000 * fsspec_backend.DEFAULT_PART_SIZE_BYTES
    grown = _open(server)._part_size_for(total_bytes, "x")
    assert grown * fsspec_backend.S3_MAX_PARTS >= total_bytes and grown % MIB == 0
    with pytest.raises(StorageError, match="part_size_bytes"):
        _open(server, part_size_bytes=16 * MIB)._part_size_for(total_bytes, "x")


def test_listings_are_never_stale(server: S3Server) -> None:
    url = server.url("fresh")
    reader, writer = FsspecStorage(url, server.storage_options), FsspecStorage(url, server.storage_options)
    assert reader.fs is not writer.fs  # no shared fsspec instance cache
    assert reader.list() == [] and not reader.exists("a/r0.bin")
    writer.write("a/r0.bin", [b"1"])
    writer.commit("manifest.json", b"{}")
    assert reader.list() == ["a/r0.bin", "manifest.json"] and reader.exists("a/r0.bin")
    assert reader.list("a") == ["a/r0.bin"]
    writer.delete(["a/r0.bin"])
    assert reader.list() == ["manifest.json"] and not reader.exists("a/r0.bin")
    reader.delete(["manifest.json"])
    assert writer.list() == []


def test_delete_goes_in_batches(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = _open(server)
    names = [f"d/{i}" for i in range(5)]
    for name in names:
        storage.write(name, [b"1"])
    monkeypatch.setattr(fsspec_backend, "_S3_DELETE_BATCH", 2)
    spy = CallSpy(storage)
    storage.delete(names + ["d/missing"])
    assert spy.methods().count("delete_objects") == 3
    assert storage.list() == []


def test_missing_object_names_the_full_url(server: S3Server) -> None:
    storage = _open(server)
    for call in (lambda: storage.read("no/such.bin", 0, 3), lambda: storage.read("no/such.bin"),
                 lambda: storage.size("no/such.bin")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert f"{storage.url}/no/such.bin" in str(e.value)


def test_outage_fails_fast_and_data_survives_restart(server: S3Server) -> None:
    options = {**server.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    storage = FsspecStorage(server.url("outage"), options)
    storage.write("before.bin", [b"kept"])
    with server.outage():  # pooled keep-alive connections are cut too
        with pytest.raises(StorageError, match="before.bin") as e:
            storage.read("before.bin", 0, 4)
        assert e.value.__cause__ is not None
        with pytest.raises(StorageError, match="during.bin"):
            storage.write("during.bin", [b"lost"])
    assert storage.read("before.bin") == b"kept"
    assert storage.list() == ["before.bin"]
    storage.write("after.bin", [b"ok"])
    assert storage.read("after.bin") == b"ok"


def test_close_releases_the_client_and_stays_usable(server: S3Server) -> None:
    storage = _open(server)
    storage.write("f", [b"1"])
    assert storage.fs._s3 is not None
    storage.close()
    assert storage.fs._s3 is None
    storage.close()  # idempotent
    assert storage.read("f") == b"1"  # a new client on demand
    storage.close()


def test_storages_share_one_botocore_session_unless_given_their_own(server: S3Server) -> None:
    from aiobotocore.session import AioSession

    a, b = _open(server), _open(server)
    assert a.fs.session is b.fs.session and a.fs is not b.fs
    own = AioSession()
    c = FsspecStorage(server.url("own"), {**server.storage_options, "session": own})
    assert c.fs.session is own
    c.write("f", [b"1"])
    assert a.fs.session is not own and c.read("f") == b"1"
