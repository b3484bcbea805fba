"""``FsspecStorage``: any fsspec URL (``s3://`` through s3fs, ``gs://``, ...), with manifest-last commits.

Chosen by ``open_storage`` for every scheme that is not a local path, ``file://`` or ``memory://``. The file
system comes from ``fsspec.core.url_to_fs(url, **storage_options)`` with ``skip_instance_cache=True``, so each
storage owns its client and nobody else's cached listings. On s3 the listings cache is off
(``use_listings_cache=False`` unless the caller says otherwise) and every write, commit and delete also
invalidates the touched paths: a coordinator that lists right after the ranks wrote must see their files.

Writing on s3 (``write``): data up to ``multipart_threshold_bytes`` goes in one PUT; larger data goes in a
multipart upload whose parts are cut from the caller's buffers and uploaded concurrently on s3fs's event loop,
at most ``upload_concurrency`` parts in flight. botocore takes only ``bytes``/``bytearray`` bodies, so each part
is copied once, when its upload starts: memory in flight stays below ``upload_concurrency * part_size_bytes``.
A failed part aborts the upload, so no half-written object ever becomes visible. Other file systems stream the
buffers through ``fs.open(path, "wb")``.

Committing (``commit``): object stores have no rename, so the manifest is simply PUT last, after every data
object exists; a reader treats its absence as "incomplete" (DESIGN.md, manifest-last protocol).

Reading: ranged GETs (``fs.cat_file(path, start, end)``) whose length is checked; a short answer is a
``CorruptCheckpointError`` naming the URL, offset, wanted length and object size.

``storage_options`` keys defined here (removed before the rest goes to fsspec unchanged):

* ``part_size_bytes`` (int, default 16 MiB, at least 5 MiB on s3): size of one multipart part. When left at the
  default it grows, for a file that would need more than 10,000 parts, to the smallest size that fits; a
  value the caller gave is never changed (such a file raises ``StorageError`` instead).
* ``multipart_threshold_bytes`` (int, default ``part_size_bytes``): files larger than this use multipart.
* ``upload_concurrency`` (int, default the file system's ``max_concurrency``, else 8): parts in flight per
  file. Raise botocore's pool too (``config_kwargs={"max_pool_connections": N}``) when going above 10.

Everything else (``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``, ``config_kwargs``, ...) passes
through to the fsspec file system untouched. Defaults added only where the caller gave no value:
``skip_instance_cache=True``; on s3 ``use_listings_cache=False`` and, unless ``session`` or ``profile`` is given,
one aiobotocore ``session`` shared by the process (each storage still has its own client).
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import fsspec
from fsspec.asyn import sync

from ckpt.errors import CheckpointError, StorageError
from formats.storage.base import Buffer, Storage, check_relpath
from formats.storage.util import (as_byte_views, check_range, flat_byte_view, is_tmp_name, not_found_error,
                                  truncated_error)

__all__ = ["FsspecStorage", "DEFAULT_PART_SIZE_BYTES"]

MIB: int = 1 << 20
DEFAULT_PART_SIZE_BYTES: int = 16 * MIB
DEFAULT_UPLOAD_CONCURRENCY: int = 8
S3_MIN_PART_SIZE_BYTES: int = 5 * MIB  # S3 rejects smaller parts (except the last) at completion
S3_MAX_PARTS: int = 10_000
S3_MAX_PUT_BYTES: int = 5 * (1 << 30)
_S3_DELETE_BATCH: int = 1000  # most keys one DeleteObjects request may carry
_OWN_OPTIONS: tuple[str, ...] = ("part_size_bytes", "multipart_threshold_bytes", "upload_concurrency")
#: Options that make s3fs build its own botocore session; with none of them, storages share one (see below).
_SESSION_KEYS: frozenset[str] = frozenset({"session", "profile", "session_vars", "event_hooks"})
_shared_session: Any = None
_shared_session_lock = threading.Lock()


def _shared_aio_session() -> Any:
    """One aiobotocore session for every s3 storage of the process that did not ask for its own.

    Each storage still gets its own client (and connection pool); sharing the session only means botocore's
    service model is parsed once instead of per storage, which cost 0.1-0.5 s per opened storage.
    """
    global _shared_session
    with _shared_session_lock:
        if _shared_session is None:
            from aiobotocore.session import AioSession

            _shared_session = AioSession()
        return _shared_session


class FsspecStorage(Storage):
    """A prefix of an fsspec file system; see the module docstring for options and protocols.

    Built by ``open_storage(url, storage_options)``; methods are thread-safe (the writer's and reader's thread
    pools call them concurrently; s3 calls all run on fsspec's one I/O event loop).
    """

    def __init__(self, url: str, storage_options: "dict[str, Any] | None" = None) -> None:
        opts = dict(storage_options or {})
        own = {k: opts.pop(k) for k in _OWN_OPTIONS if k in opts}
        self._part_size_given: bool = "part_size_bytes" in own
        self._part_size_bytes: int = int(own.get("part_size_bytes", DEFAULT_PART_SIZE_BYTES))
        self._multipart_threshold_bytes: int = int(own.get("multipart_threshold_bytes", self._part_size_bytes))
        self.url = url.rstrip("/")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        opts.setdefault("skip_instance_cache", True)
        if scheme in ("s3", "s3a"):
            opts.setdefault("use_listings_cache", False)
        try:
            if scheme in ("s3", "s3a") and not _SESSION_KEYS.intersection(opts):
                opts["session"] = _shared_aio_session()
            self.fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError, TypeError) as e:
            raise StorageError(f"cannot open {url!r} with fsspec: {e} (check the URL scheme, that its fsspec "
                               "backend is installed, and storage_options)") from e
        self._root: str = root.rstrip("/")
        if not self._root.strip("/"):
            raise ValueError(f"FsspecStorage({url!r}): the URL names no bucket or folder to root the checkpoint at")
        # s3fs exposes its raw client calls; that is what parallel multipart and bulk delete need.
        self._is_s3: bool = hasattr(self.fs, "_call_s3") and hasattr(self.fs, "split_path")
        self._upload_concurrency: int = int(
            own.get("upload_concurrency", getattr(self.fs, "max_concurrency", DEFAULT_UPLOAD_CONCURRENCY))
        )
        self._validate_options()

    def _validate_options(self) -> None:
        problems = []
        if self._part_size_bytes < 1:
            problems.append(f"part_size_bytes must be >= 1, got {self._part_size_bytes}")
        if self._is_s3 and self._part_size_bytes < S3_MIN_PART_SIZE_BYTES:
            problems.append(f"part_size_bytes must be >= {S3_MIN_PART_SIZE_BYTES} (5 MiB) on s3, "
                            f"got {self._part_size_bytes}")
        if self._multipart_threshold_bytes < 0:
            problems.append(f"multipart_threshold_bytes must be >= 0, got {self._multipart_threshold_bytes}")
        if self._is_s3 and self._multipart_threshold_bytes >= S3_MAX_PUT_BYTES:
            problems.append(f"multipart_threshold_bytes must be below 5 GiB on s3 (the largest single PUT), "
                            f"got {self._multipart_threshold_bytes}")
        if self._upload_concurrency < 1:
            problems.append(f"upload_concurrency must be >= 1, got {self._upload_concurrency}")
        if problems:
            raise ValueError(f"FsspecStorage({self.url!r}): invalid storage_options: " + "; ".join(problems))

    # -- naming --------------------------------------------------------------------------------------------------
    def _full(self, path: str) -> str:
        return f"{self._root}/{check_relpath(path)}"

    def _where(self, path: str) -> str:
        """The full URL of a relative path, for messages."""
        return f"{self.url}/{path}"

    @contextmanager
    def _translate(self, action: str, where: str) -> Iterator[None]:
        """Map a backend's exceptions to ours: missing -> ``FileNotFoundError(where)``, else ``StorageError``."""
        try:
            yield
        except FileNotFoundError as e:
            raise not_found_error(where, "object") from e
        except CheckpointError:
            raise
        except Exception as e:  # botocore/aiohttp/fsspec errors share no base class; keep the original chained
            raise StorageError(f"{action} {where}: {type(e).__name__}: {e}") from e

    # -- writing -------------------------------------------------------------------------------------------------
    def write(self, path: str, buffers: Sequence[Buffer]) -> int:
        """Write ``buffers`` as the object ``path``; see the module docstring for the multipart strategy.

        Called by ``formats.writer`` on every rank, from its write thread pool, once per data file.
        """
        full = self._full(path)
        views = as_byte_views(buffers)
        total_bytes = sum(len(v) for v in views)
        with self._translate("writing", self._where(path)):
            try:
                if total_bytes <= self._multipart_threshold_bytes:
                    self.fs.pipe_file(full, _join(views))
                elif self._is_s3:
                    part_bytes = self._part_size_for(total_bytes, path)
                    sync(self.fs.loop, self._s3_multipart_upload, full, views, total_bytes, part_bytes)
                else:
                    with self.fs.open(full, "wb", block_size=self._part_size_bytes) as f:
                        for view in views:
                            f.write(view)
            finally:
                self.fs.invalidate_cache(full)
        return total_bytes

    def commit(self, path: str, data: bytes) -> None:
        """PUT the manifest object last; its appearance is the commit (object stores have no rename).

        Called once per checkpoint by the coordinator, after every rank reported its data objects written.
        """
        full = self._full(path)
        with self._translate("committing", self._where(path)):
            try:
                self.fs.pipe_file(full, bytes(data))
            finally:
                self.fs.invalidate_cache(full)

    def _part_size_for(self, total_bytes: int, path: str) -> int:
        parts = -(-total_bytes // self._part_size_bytes)
        if parts <= S3_MAX_PARTS:
            return self._part_size_bytes
        if self._part_size_given:
            raise StorageError(
                f"writing {self._where(path)}: {total_bytes} bytes need {parts} parts of part_size_bytes="
                f"{self._part_size_bytes}, above the s3 limit of {S3_MAX_PARTS}; raise part_size_bytes to at "
                f"least {-(-total_bytes // S3_MAX_PARTS)}"
            )
        return -(-total_bytes // (S3_MAX_PARTS * MIB)) * MIB  # default only: the smallest whole MiB that fits

    async def _s3_multipart_upload(self, full: str, views: list[memoryview], total_bytes: int,
                                   part_bytes: int) -> None:
        """Upload ``views`` as ``full`` in parts of ``part_bytes``, ``upload_concurrency`` at a time.

        Runs on s3fs's event loop (via ``fsspec.asyn.sync`` from ``write``). Either completes the upload or
        aborts it and raises the first part's error.
        """
        fs = self.fs
        bucket, key, _ = fs.split_path(full)
        starts = [0]
        for view in views[:-1]:
            starts.append(starts[-1] + len(view))
        mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        gate = asyncio.Semaphore(self._upload_concurrency)

        async def upload_part(number: int, lo: int, hi: int) -> dict[str, Any]:
            async with gate:
                body = _slice_bytes(views, starts, lo, hi)  # the part's one copy, made only when it is sent
                out = await fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number, Body=body)
                return {"PartNumber": number, "ETag": out["ETag"]}

        ranges = [(lo, min(lo + part_bytes, total_bytes)) for lo in range(0, total_bytes, part_bytes)]
        results = await asyncio.gather(
            *(upload_part(i + 1, lo, hi) for i, (lo, hi) in enumerate(ranges)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        try:
            if failures:
                raise failures[0]
            await fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                              MultipartUpload={"Parts": results})
        except BaseException:
            try:
                await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # the store may be unreachable; the upload's own error is the one to report
                pass
            raise

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of ``path`` from ``offset`` with one GET (ranged unless reading a whole object)."""
        full = self._full(path)
        where = self._where(path)
        check_range(where, offset, length)
        with self._translate("reading", where):
            if length is None:
                return self._read_to_end(full, where, offset)
            if length == 0:
                size_bytes = self._info_size(full)  # still FileNotFoundError when missing
                if offset > size_bytes:
                    raise truncated_error(where, offset, 0, size_bytes)
                return b""
            try:
                data = self.fs.cat_file(full, start=offset, end=offset + length)
            except FileNotFoundError:
                raise
            except OSError as e:  # S3 answers 416 when the range starts at or past the end
                size_bytes = self._info_size(full)
                if offset + length > size_bytes:
                    raise truncated_error(where, offset, length, size_bytes) from e
                raise
            if len(data) != length:
                raise truncated_error(where, offset, length, self._info_size(full))
        return bytes(data)

    def _read_to_end(self, full: str, where: str, offset: int) -> bytes:
        """One GET from ``offset`` to the end: never size-then-read, which could mix two versions of a file that
        a commit replaces in between. Caller translates errors."""
        try:
            if self._is_s3:
                data = sync(self.fs.loop, self._s3_get_to_end, full, offset)
            else:
                data = self.fs.cat_file(full, start=offset or None)
        except FileNotFoundError:
            raise
        except OSError as e:  # S3 answers 416 for a range that starts at the end (or for any range of b"")
            size_bytes = self._info_size(full)
            if offset == size_bytes:
                return b""
            if offset > size_bytes:
                raise truncated_error(where, offset, None, size_bytes) from e
            raise
        if offset and not data:  # file systems that slice locally return b"" past the end
            size_bytes = self._info_size(full)
            if offset > size_bytes:
                raise truncated_error(where, offset, None, size_bytes)
        return bytes(data)

    async def _s3_get_to_end(self, full: str, offset: int) -> bytes:
        bucket, key, _ = self.fs.split_path(full)
        range_kw = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **range_kw)
        try:
            return await response["Body"].read()
        finally:
            response["Body"].close()

    def readinto(self, path: str, offset: int, out: memoryview) -> None:
        """Ranged GET, then one copy into ``out`` (the HTTP client hands back ``bytes``)."""
        view = flat_byte_view(out)
        view[:] = self.read(path, offset, len(view))

    def _info_size(self, full: str) -> int:
        """Size of the object ``full``; ``FileNotFoundError`` when missing or a folder. Caller translates errors."""
        self.fs.invalidate_cache(full)
        info = self.fs.info(full)
        if info.get("type") != "file":
            raise FileNotFoundError(full)
        return int(info["size"])

    def size(self, path: str) -> int:
        full = self._full(path)
        with self._translate("stat", self._where(path)):
            return self._info_size(full)

    def exists(self, path: str) -> bool:
        full = self._full(path)
        try:
            with self._translate("stat", self._where(path)):
                self._info_size(full)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths at or below the folder ``prefix`` (one listing; fresh, never cached)."""
        folder = prefix.rstrip("/")  # "data/" and "data" name the same folder
        base = self._full(folder) if folder else self._root
        with self._translate("listing", self._where(folder) if folder else self.url):
            self.fs.invalidate_cache(base)
            found = self.fs.find(base)
        head = self._root + "/"
        return sorted(
            p[len(head):] for p in found
            if p.startswith(head) and not p.endswith("/") and not is_tmp_name(p)
        )

    # -- removing ------------------------------------------------------------------------------------------------
    def delete(self, paths: Iterable[str]) -> None:
        """Delete objects (missing ones are ignored): one DeleteObjects request per 1000 keys on s3."""
        fulls = [self._full(p) for p in paths]  # validate every path before deleting any
        if not fulls:
            return
        with self._translate("deleting", self.url):
            try:
                if self._is_s3:
                    sync(self.fs.loop, self._s3_delete, fulls)
                else:
                    for full in fulls:
                        try:
                            self.fs.rm_file(full)
                        except FileNotFoundError:
                            pass
            finally:
                for full in fulls:
                    self.fs.invalidate_cache(full)

    async def _s3_delete(self, fulls: list[str]) -> None:
        bucket = self.fs.split_path(fulls[0])[0]
        keys = [self.fs.split_path(f)[1] for f in fulls]
        for i in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[i : i + _S3_DELETE_BATCH]
            out = await self.fs._call_s3("delete_objects", Bucket=bucket,
                                         Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise StorageError(f"deleting from {self.url}: the store refused {len(errors)} keys, first: "
                                   f"{errors[0].get('Key')}: {errors[0].get('Code')} {errors[0].get('Message')}")

    def close(self) -> None:
        """Drop cached listings and, on s3, close this storage's own client and its connection pool.

        Idempotent; called by readers and savers when they finish with the storage. A later call on the same
        storage opens a new client (s3fs creates one whenever it has none).
        """
        self.fs.invalidate_cache()
        client = getattr(self.fs, "_s3", None) if self._is_s3 else None
        if client is not None:
            self.fs._s3 = None
            type(self.fs).close_session(self.fs.loop, client)


def _join(views: list[memoryview]) -> bytes:
    """One ``bytes`` of all views; no copy when there is a single view of a ``bytes`` object."""
    if len(views) == 1 and isinstance(views[0].obj, bytes) and len(views[0]) == len(views[0].obj):
        return views[0].obj
    return b"".join(views)


def _slice_bytes(views: list[memoryview], starts: list[int], lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of the concatenation of ``views`` (``starts[i]`` = offset of ``views[i]``)."""
    pieces: list[memoryview] = []
    i = bisect.bisect_right(starts, lo) - 1
    while lo < hi:
        view, start = views[i], starts[i]
        take = min(hi, start + len(view)) - lo
        pieces.append(view[lo - start : lo - start + take])
        lo += take
        i += 1
    return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
