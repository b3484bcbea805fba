"""safetensors files, single or sharded as Hugging Face writes them: reading (``SafetensorsSource``) and writing
(``write_safetensors``).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the tensor bytes; offsets are relative to the
end of the header. The header is parsed and validated here, before any tensor is read: a truncated file, a header
longer than the file, invalid JSON, an unknown dtype, a byte range that does not match its shape or lies beyond the
file, or two overlapping tensors raise ``CorruptCheckpointError`` naming the file and the tensor. Tensors are then
read one at a time with positional reads (thread-safe).

A sharded checkpoint is a directory with ``model.safetensors.index.json`` (``{"metadata": {"total_size": n},
"weight_map": {name: shard file}}``) and its shards. Safetensors holds model weights only; their keys are
``model/<name>`` (see ``formats.foreign.source``). ``write_safetensors`` writes the tensors under ``model/`` as
``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` plus the
index (written last), streaming tensor by tensor, then the model's ``config.json`` and ``generation_config.json``
where the source records them (``metadata.hf_config`` / ``hf_generation_config``: ``ckpt.save(model_config=...,
generation_config=...)``, or imported from an HF directory), so ``from_pretrained`` opens the result.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError, CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError
from formats import keys as K
from formats.foreign.files import check_confined, exists, is_regular, read_json, regular_size
from formats.foreign.source import MODEL_PREFIX, Source, TensorInfo, add_parents, read_as
from formats.manifest import CONFIG_METADATA, MAX_CONFIG_BYTES, MAX_NDIM, reject_constant, unique_keys
from formats.storage.base import check_relpath
from formats.tensor_bytes import as_bytes, writable_bytes

Progress = Callable[[int], None]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: safetensors' own bound on the header size.
MAX_HEADER_BYTES = 100 * 1000 * 1000
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {
    k: getattr(torch, v) for k, v in _NAMES.items() if isinstance(getattr(torch, v, None), torch.dtype)}
DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_DTYPE.items()}


@dataclass(frozen=True)
class _Stored:
    file: str
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict[str, str]]:
    """Parse and validate the header of the safetensors file ``path``.

    Returns ({name: (dtype, shape, absolute start, byte length)}, __metadata__).
    """
    try:
        size = regular_size(path, "a safetensors file")  # a FIFO would block the open forever
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{path}: truncated safetensors file: {size} bytes, less than the 8-byte "
                                             "header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CorruptCheckpointError(f"{path}: header length {n} exceeds safetensors' limit of "
                                             f"{MAX_HEADER_BYTES} bytes; the file is damaged or not safetensors")
            if 8 + n > size:
                raise CorruptCheckpointError(f"{path}: truncated safetensors header: it declares {n} bytes but only "
                                             f"{size - 8} follow the length field")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{path}: safetensors file is missing") from e
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header must be a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings, found {meta!r}"[:500])
    data_start = 8 + n
    data_bytes = size - data_start
    out: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, e in doc.items():
        def bad(msg: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"{path}, key {name!r}: {msg}")

        if not isinstance(e, dict):
            raise bad("entry must be an object")
        st = e.get("dtype")
        if st not in ST_TO_DTYPE:
            raise bad(f"unknown dtype {st!r}; expected one of {sorted(ST_TO_DTYPE)}")
        shape = e.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62 for s in shape)):
            raise bad(f"shape must be a list of non-negative integers, found {shape!r}")
        offs = e.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or offs[0] > offs[1]):
            raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, found {offs!r}")
        dtype = ST_TO_DTYPE[st]
        need = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != need:
            raise bad(f"data_offsets {offs} hold {offs[1] - offs[0]} bytes, a {st} tensor of shape {shape} needs {need}")
        if offs[1] > data_bytes:
            raise bad(f"data_offsets {offs} lie beyond the end of the data ({data_bytes} bytes after the header): "
                      "the file is truncated or damaged")
        out[name] = (dtype, tuple(shape), data_start + offs[0], need)
        spans.append((offs[0], offs[1], name))
    end, owner = 0, ""
    for b, e, name in sorted(s for s in spans if s[1] > s[0]):
        if b < end:
            raise CorruptCheckpointError(f"{path}, key {name!r}: its bytes [{b}, {e}) overlap those of {owner!r}, "
                                         f"which end at {end}")
        end, owner = e, name
    return out, meta


class SafetensorsSource(Source):
    """One ``.safetensors`` file, a ``model.safetensors.index.json``, or a directory holding either."""

    def __init__(self, path: str) -> None:
        super().__init__(path=str(path), format="safetensors")
        self._weight_map: dict[str, str] | None = None
        files, directory = self._files(self.path)
        self._stored: dict[str, _Stored] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        names: dict[str, str] = {}
        st_meta: dict[str, dict[str, str]] = {}
        for fpath in files:
            header, meta = read_header(fpath)
            if meta:
                st_meta[os.path.basename(fpath)] = meta
            for name, (dtype, shape, start, nbytes) in header.items():
                if name in names:
                    raise CorruptCheckpointError(f"{fpath}, key {name!r}: also stored in {names[name]}")
                names[name] = fpath
                key = MODEL_PREFIX + K.escape(name)
                self.tensors[key] = TensorInfo.whole(key, dtype, shape)
                self._stored[key] = _Stored(fpath, start, nbytes)
        self._check_index(directory, names)
        for key in self.tensors:
            add_parents(key, self.containers)
        if st_meta:
            self.metadata["safetensors_metadata"] = st_meta
        if directory:
            self._read_configs(directory)
        self._index_path = os.path.join(directory, INDEX_NAME) if directory else None

    def _read_configs(self, directory: str) -> None:
        """``config.json`` and ``generation_config.json`` of an HF directory, kept in ``metadata`` (``hf_config``,
        ``hf_generation_config``) so that a universal copy records them and a safetensors export writes them back."""
        for name, file in CONFIG_METADATA.items():
            path = os.path.join(directory, file)
            if not exists(path):
                continue
            try:
                check_confined(path, directory)
                doc = read_json(path, file, limit=MAX_CONFIG_BYTES)
            except CorruptCheckpointError:
                continue  # informational only: a broken config.json (or a FIFO, a link outside) is not ours to judge
            if isinstance(doc, dict):  # what a manifest may record (formats.manifest_seal.check_config_metadata)
                self.metadata[name] = doc

    def _files(self, path: str) -> tuple[list[str], str | None]:
        # A file the user names is read wherever it lives; the files a directory (or an index) holds must lie
        # inside that directory, and every one must be a regular file (a FIFO would block forever).
        is_dir = os.path.isdir(path)
        if not is_dir and is_regular(path, "a safetensors file or index") and not path.endswith(INDEX_NAME):
            return [path], os.path.dirname(path) or "."
        directory = path if is_dir else (os.path.dirname(path) or ".")
        if not is_dir and not exists(path):
            raise CorruptCheckpointError(f"{path}: no such safetensors file or directory")
        index = os.path.join(directory, INDEX_NAME)
        if exists(index):
            if is_dir:
                check_confined(index, directory)
            self._weight_map = self._read_index(index)
            shards = sorted(set(self._weight_map.values()))
            return [os.path.join(directory, s) for s in shards], directory
        files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise CorruptCheckpointError(f"{path}: no *.safetensors file and no {INDEX_NAME}")
        for f in files:
            check_confined(f, directory)
        return files, directory

    def _read_index(self, index: str) -> dict[str, str]:
        doc = read_json(index, "the safetensors index")
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CorruptCheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for name, shard in wm.items():
            try:
                check_relpath(shard)
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(f"{index}, key {name!r}: shard {e}") from e
            full = os.path.join(os.path.dirname(index), shard)
            if not is_regular(full, f"shard {shard!r} of key {name!r}"):
                raise CorruptCheckpointError(f"{index}, key {name!r}: its shard {shard!r} is missing")
            check_confined(full, os.path.dirname(index) or ".")
        return wm

    def _check_index(self, directory: str | None, names: dict[str, str]) -> None:
        wm = self._weight_map
        if wm is None:
            return
        for name, shard in wm.items():
            where = names.get(name)
            if where is None or os.path.basename(where) != os.path.basename(shard):
                raise CorruptCheckpointError(f"{os.path.join(directory or '.', INDEX_NAME)}, key {name!r}: the index "
                                             f"places it in {shard!r}, but that shard's header does not hold it")

    def read(self, key: str) -> torch.Tensor:
        info, st = self.tensors[key], self._stored[key]
        with self._lock:
            fd = self._fds.get(st.file)
            if fd is None:
                fd = self._fds[st.file] = os.open(st.file, os.O_RDONLY)
        buf = torch.empty(st.nbytes, dtype=torch.uint8)
        view = writable_bytes(buf)
        done = 0
        while done < st.nbytes:
            n = os.preadv(fd, [view[done:]], st.start + done)
            if n <= 0:
                raise CorruptCheckpointError(f"{st.file}, key {K.unescape(key[len(MODEL_PREFIX):])!r}: file ends "
                                             f"at byte {st.start + done}, the header promised {st.start + st.nbytes}")
            done += n
        return buf.view(info.dtype).reshape(info.shape) if st.nbytes else torch.empty(info.shape, dtype=info.dtype)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Writing


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: "str | int") -> int:
    """Bytes in ``text``: ``5GB`` (10^9), ``500MiB`` (2^20), ``123`` (bytes). ``ValueError`` otherwise."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r}: expected a number of bytes or e.g. 500MB, 5GB, 2GiB")
    num, unit = float(m.group(1)), (m.group(2) or "b").lower()
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    base = 1024 if "i" in unit else 1000
    value = int(num * base**power)
    if value <= 0:
        raise ValueError(f"size {text!r}: must be positive")
    return value


def model_names(source: Source) -> dict[str, str]:
    """safetensors name of each tensor under ``model/`` (key -> name), in source order."""
    out: dict[str, str] = {}
    for key in source.tensors:
        if not key.startswith(MODEL_PREFIX):
            continue
        rest = key[len(MODEL_PREFIX):]
        if "/" in rest:
            raise UnsupportedStateError(f"{source.path}: key {key!r} is nested below model/; safetensors holds a flat "
                                        "name -> tensor map (model weights only)")
        out[key] = K.unescape(rest)
    return out


def plan_shards(names: dict[str, str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own), in order."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in names:
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_safetensors(source: Source, directory: str, *, dtypes: dict[str, torch.dtype],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, workers: int = 1, progress: Progress | None = None) -> list[str]:
    """Write the model weights of ``source`` (keys under ``model/``, prefix stripped) as safetensors in
    ``directory``; return the written paths. The index (for several shards) is written last."""
    names = model_names(source)
    if not names:
        raise UnsupportedStateError(f"{source.path}: no tensors under model/; safetensors export writes model weights "
                                    f"only (keys found: {sorted(source.tensors)[:5]})")
    for key in names:
        if dtypes[key] not in DTYPE_TO_ST:
            raise UnsupportedStateError(f"{source.path}: key {key!r} has dtype {dtypes[key]}, which safetensors cannot "
                                        "store; pass --dtype to cast it")
    existing = _existing(directory)
    if existing and not overwrite:
        raise CheckpointExistsError(f"{directory}: already holds safetensors files ({existing[:3]}); pass --overwrite "
                                    "(overwrite=True) to replace them, or choose another destination")
    os.makedirs(directory, exist_ok=True)
    nbytes = {k: source.tensors[k].numel * dtypes[k].itemsize for k in names}
    shards = plan_shards(names, nbytes, max_shard_bytes)
    files = shard_names(len(shards))

    def write(i: int) -> str:
        return _write_shard(source, os.path.join(directory, files[i]), shards[i], names, dtypes, progress)

    if workers > 1 and len(shards) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(shards)), thread_name_prefix="ckpt-st") as pool:
            written = list(pool.map(write, range(len(shards))))
    else:
        written = [write(i) for i in range(len(shards))]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {names[k]: files[i] for i, keys in enumerate(shards) for k in keys}}
        written.append(_atomic_write(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=2).encode()))
    for name in config_files(source, directory):
        doc = source.metadata[name]
        written.append(_atomic_write(os.path.join(directory, CONFIG_METADATA[name]),
                                     (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()))
    stale = [p for p in existing if os.path.join(directory, p) not in written]
    for p in stale:
        os.remove(os.path.join(directory, p))
    return written


def config_files(source: Source, directory: str) -> list[str]:
    """The config members of ``source.metadata`` (``hf_config``, ``hf_generation_config``) that a safetensors
    export into ``directory`` writes as files: those recorded as JSON objects, unless the directory already has that
    file (a config the user put there wins)."""
    return [name for name, file in CONFIG_METADATA.items()
            if isinstance(source.metadata.get(name), dict) and not os.path.exists(os.path.join(directory, file))]


def _existing(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") or n == INDEX_NAME)


def _write_shard(source: Source, path: str, keys: list[str], names: dict[str, str], dtypes: dict[str, torch.dtype],
                 progress: Progress | None) -> str:
    # Wider dtypes first keeps every tensor aligned to its element size, as safetensors' own writer does.
    order = sorted(keys, key=lambda k: (-dtypes[k].itemsize, names[k]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in order:
        n = source.tensors[k].numel * dtypes[k].itemsize
        header[names[k]] = {"dtype": DTYPE_TO_ST[dtypes[k]], "shape": list(source.tensors[k].shape),
                            "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k in order:
                t = read_as(source, k, dtypes[k]).contiguous()
                f.write(as_bytes(t))
                del t
                if progress is not None:
                    progress(source.tensors[k].numel * dtypes[k].itemsize)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _atomic_write(path: str, data: bytes) -> str:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
