"""The manifest: the single source of truth of a checkpoint (format v2; v1 is read as legacy).

Plain data, JSON, never pickle, sealed by an xxh3-64 checksum of its own text (``seal``), so that any edit or
damage is detected. ``Manifest.from_json`` checks the seal first, then validates everything it reads and raises
``CorruptCheckpointError`` (``UnsafeCheckpointError`` for paths that escape the checkpoint) naming the manifest
path and the key; unknown versions and entry kinds raise, nothing is skipped. Every check is O(n log n) or
linear in the manifest. See ``docs/format.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError
from formats.box import tiling_fault
from formats.dtypes import dtype_from_name, itemsize
from formats.codec import CODECS
from formats.keys import MAX_DEPTH
from formats.manifest_seal import (CHECKSUM_FIELD, CONFIG_METADATA, MAX_CONFIG_BYTES,  # noqa: F401
                                   MAX_MANIFEST_BYTES, _check_seal, check_config_metadata, check_manifest_size,
                                   config_json, config_metadata, reseal, seal)
from formats.storage.base import check_relpath

FORMAT_NAME = "ckpt-universal"
#: What this library writes: v2 = v1 plus the ``manifest_checksum`` seal, which a v2 manifest must have.
FORMAT_VERSION = 2
#: Versions read without a seal: manifests written before it existed (still on users' disks).
LEGACY_VERSIONS = (1,)
#: Most ``/``-separated components of one key (the nesting that ``formats.nesting`` writes and rebuilds, plus one
#: for a leaf below the deepest container).
MAX_KEY_COMPONENTS = MAX_DEPTH + 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
CONTAINER_TYPES = ("dict", "list", "tuple")
VALUE_TYPES = ("none", "bool", "int", "float", "str")
# Bounds that keep a malicious manifest from making a reader allocate or loop absurdly.
MAX_NDIM = 64
MAX_INT = 2**62


@dataclass(frozen=True)
class ChunkEntry:
    """One n-d box of a logical tensor stored at ``[byte_offset, byte_offset + byte_length)`` of ``file``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int
    codec: str
    raw_byte_length: int
    block_bytes: int
    checksums: tuple[str, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets), "sizes": list(self.sizes), "file": self.file,
            "byte_offset": self.byte_offset, "byte_length": self.byte_length, "codec": self.codec,
            "raw_byte_length": self.raw_byte_length, "block_bytes": self.block_bytes,
            "checksums": list(self.checksums),
        }


@dataclass(frozen=True)
class TensorEntry:
    """A logical tensor: dtype, global shape and the chunks that tile it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...]
    #: How the tensor was sharded when saved (DTensor mesh and placements), for ``inspect``; informational.
    saved_layout: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "tensor", "dtype": self.dtype, "shape": list(self.shape),
                             "chunks": [c.to_json() for c in self.chunks]}
        if self.saved_layout is not None:
            d["saved_layout"] = self.saved_layout
        return d


@dataclass(frozen=True)
class ValueEntry:
    """A non-tensor leaf: None, bool, int, float (non-finite ones too) or str."""

    key: str
    value: Any

    def to_json(self) -> dict[str, Any]:
        return {"kind": "value", **encode_value(self.value, self.key)}


@dataclass(frozen=True)
class ContainerEntry:
    """A dict, list or tuple of the nested state; ``int_keys`` lists dict keys that were ints."""

    key: str
    type: str
    length: int = 0
    int_keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "container", "type": self.type}
        if self.type != "dict":
            d["length"] = self.length
        if self.int_keys:
            d["int_keys"] = list(self.int_keys)
        return d


@dataclass(frozen=True)
class FileEntry:
    size_bytes: int
    rank: int


@dataclass
class Manifest:
    """Everything a reader needs; written last, by the coordinator, as the commit."""

    save_id: str
    world_size: int
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    values: dict[str, ValueEntry]
    containers: dict[str, ContainerEntry]
    writer: dict[str, Any] = field(default_factory=dict)
    created_unix_secs: float = 0.0
    layout: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def keys(self) -> list[str]:
        """Every leaf key (tensors and values), sorted."""
        return sorted([*self.tensors, *self.values])

    def to_json(self) -> bytes:
        """The sealed manifest text, always in the current ``FORMAT_VERSION`` (whatever version was read)."""
        entries: dict[str, Any] = {}
        for k, c in self.containers.items():
            entries[k] = c.to_json()
        for k, t in self.tensors.items():
            entries[k] = t.to_json()
        for k, v in self.values.items():
            entries[k] = v.to_json()
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "writer": self.writer,
            "save_id": self.save_id,
            "created_unix_secs": self.created_unix_secs,
            "world_size": self.world_size,
            "checksum_algorithm": "xxh3_64",
            "files": {p: {"size_bytes": f.size_bytes, "rank": f.rank} for p, f in sorted(self.files.items())},
            "entries": dict(sorted(entries.items())),
            "layout": self.layout,
            "metadata": self.metadata,
        }
        return seal(doc)

    @staticmethod
    def from_json(data: bytes, where: str) -> "Manifest":
        """Check the seal of, parse and validate a manifest; ``where`` is its path or URL, named in every
        error."""
        return _parse(data, where)


def encode_value(value: Any, key: str) -> dict[str, Any]:
    """JSON form of a non-tensor leaf; ``TypeError`` naming the key for types the format does not store."""
    if value is None:
        return {"type": "none", "value": None}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": int(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value if math.isfinite(value) else repr(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    raise UnsupportedStateError(
        f"state key {key!r}: cannot store a value of type {type(value).__name__}; ckpt stores tensors, "
        "None, bool, int, float, str and dicts/lists/tuples of them (no pickle). Convert it, or wrap it in an "
        "object with state_dict()/load_state_dict()."
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation. Every check names the manifest and the key; nothing is skipped.


def _fail(where: str, key: str | None, msg: str) -> CorruptCheckpointError:
    at = f"{where}" + (f", key {key!r}" if key is not None else "")
    return CorruptCheckpointError(f"{at}: {msg}")


def _int(v: Any, where: str, key: str | None, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > MAX_INT:
        raise _fail(where, key, f"{what} must be an integer in [{lo}, 2**62], found {v!r}")
    return v


def _int_list(v: Any, where: str, key: str, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise _fail(where, key, f"{what} must be a list of at most {MAX_NDIM} integers, found {v!r}")
    return tuple(_int(x, where, key, what) for x in v)


def _parse(data: bytes, where: str) -> Manifest:
    data = bytes(data)
    check_manifest_size(len(data), where)
    sealed = _check_seal(data, where)
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=reject_constant, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        # RecursionError: absurdly deep nesting ("[[[[..."), which no manifest has.
        raise _fail(where, None, f"manifest is not valid JSON ({type(e).__name__}: {e}); the checkpoint is damaged") from e
    if not isinstance(doc, dict):
        raise _fail(where, None, f"manifest must be a JSON object, found {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise _fail(where, None, f"'format' must be {FORMAT_NAME!r}, found {doc.get('format')!r}")
    version = doc.get("format_version")
    if type(version) is not int or (version != FORMAT_VERSION and version not in LEGACY_VERSIONS):  # True, 1.0 == 1
        raise _fail(
            where, None,
            f"unsupported format_version {version!r}; this reader supports {FORMAT_VERSION} (and "
            f"{', '.join(map(str, LEGACY_VERSIONS))} as legacy). Upgrade ckpt to read checkpoints written by a "
            "newer version.",
        )
    if not sealed and (CHECKSUM_FIELD in doc or version not in LEGACY_VERSIONS):
        found = "is not its last member holding 16 lowercase hex digits" if CHECKSUM_FIELD in doc else "is missing"
        raise _fail(
            where, None,
            f"the {CHECKSUM_FIELD!r} seal {found}: a format {version} manifest always ends with it, so it was "
            "edited or damaged after it was written; restore it from another tier or use an earlier checkpoint")
    files_doc = doc.get("files")
    if not isinstance(files_doc, dict):
        raise _fail(where, None, "'files' must be an object")
    files: dict[str, FileEntry] = {}
    for p, f in files_doc.items():
        try:
            check_relpath(p)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{where}: data file {e}") from e
        if not isinstance(f, dict):
            raise _fail(where, None, f"files[{p!r}] must be an object")
        files[p] = FileEntry(_int(f.get("size_bytes"), where, None, f"files[{p!r}].size_bytes"),
                             _int(f.get("rank"), where, None, f"files[{p!r}].rank"))
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise _fail(where, None, "'entries' must be an object")
    tensors: dict[str, TensorEntry] = {}
    values: dict[str, ValueEntry] = {}
    containers: dict[str, ContainerEntry] = {}
    for key, e in entries.items():
        if not isinstance(e, dict):
            raise _fail(where, key, "entry must be an object")
        kind = e.get("kind")
        if kind == "tensor":
            tensors[key] = _parse_tensor(key, e, files, where)
        elif kind == "value":
            values[key] = ValueEntry(key, _parse_value(key, e, where))
        elif kind == "container":
            containers[key] = _parse_container(key, e, where)
        else:
            raise _fail(where, key, f"unknown entry kind {kind!r}; expected 'tensor', 'value' or 'container'")
    _check_tree(entries, containers, where)
    for name in ("writer", "layout", "metadata"):
        if not isinstance(doc.get(name, {}), dict):
            raise _fail(where, None, f"{name!r} must be an object")
    check_config_metadata(doc.get("metadata", {}), where)
    created = doc.get("created_unix_secs", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise _fail(where, None, f"'created_unix_secs' must be a number, found {created!r}")
    return Manifest(
        save_id=str(doc.get("save_id", "")),
        world_size=_int(doc.get("world_size"), where, None, "world_size", lo=1),
        files=files, tensors=tensors, values=values, containers=containers,
        writer=doc.get("writer", {}), created_unix_secs=float(created),
        layout=doc.get("layout", {}), metadata=doc.get("metadata", {}), format_version=version,
    )


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a repeated key (two entries for one tensor) would silently drop one."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {dup!r} appears twice in one object")
    return d


def reject_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_tensor(key: str, e: dict[str, Any], files: dict[str, FileEntry], where: str) -> TensorEntry:
    dtype = dtype_from_name(e.get("dtype"), f"{where}, key {key!r}")
    shape = _int_list(e.get("shape"), where, key, "shape")
    numel = math.prod(shape)
    if numel > MAX_INT:
        raise _fail(where, key, f"shape {list(shape)} has {numel} elements, more than any real checkpoint")
    esize = itemsize(dtype)
    chunks_doc = e.get("chunks")
    if not isinstance(chunks_doc, list):
        raise _fail(where, key, "'chunks' must be a list")
    chunks = []
    covered = 0
    for i, c in enumerate(chunks_doc):
        chunk = _parse_chunk(key, i, c, shape, esize, files, where)
        covered += chunk.numel
        chunks.append(chunk)
    if covered != numel:
        raise _fail(where, key, f"chunks cover {covered} elements, shape {list(shape)} has {numel}")
    # Equal volume is not enough: two overlapping chunks leave a hole of the same size, which a reader would
    # return uninitialised. Exact tiling, checked in O(n log n) whatever the arrangement (formats.box.tiling_fault).
    if len(chunks) > 1:
        fault = tiling_fault([(c.offsets, c.sizes) for c in chunks], shape)
        if fault is not None:
            labels = [f"{i} (offsets {list(c.offsets)} sizes {list(c.sizes)})" for i, c in enumerate(chunks)]
            raise _fail(where, key, fault.describe(labels, "chunk", "chunks"))
    return TensorEntry(key, e["dtype"], shape, tuple(chunks), _parse_layout(e.get("saved_layout"), where, key))


def _parse_layout(layout: Any, where: str, key: str) -> dict[str, Any] | None:
    """``saved_layout``: informational, but read by ``ckpt inspect``, so its shape is checked like any field."""
    if layout is None:
        return None
    if not isinstance(layout, dict):
        raise _fail(where, key, f"'saved_layout' must be an object, found {type(layout).__name__}")
    mesh = layout.get("mesh_shape")
    if not isinstance(mesh, list) or not 1 <= len(mesh) <= MAX_NDIM:
        raise _fail(where, key, f"saved_layout.mesh_shape must be a list of 1 to {MAX_NDIM} integers, found {mesh!r}")
    for x in mesh:
        _int(x, where, key, "saved_layout.mesh_shape", lo=1)
    for name, nullable in (("placements", False), ("mesh_dim_names", True)):
        v = layout.get(name)
        if v is None and nullable:
            continue
        if not isinstance(v, list) or len(v) != len(mesh) or not all(isinstance(x, str) for x in v):
            raise _fail(where, key, f"saved_layout.{name} must be a list of {len(mesh)} strings (one per mesh dim)"
                                    f"{' or null' if nullable else ''}, found {v!r}")
    return layout


def _parse_chunk(key: str, i: int, c: Any, shape: tuple[int, ...], esize: int,
                 files: dict[str, FileEntry], where: str) -> ChunkEntry:
    what = f"chunk {i}"
    if not isinstance(c, dict):
        raise _fail(where, key, f"{what} must be an object")
    offsets = _int_list(c.get("offsets"), where, key, f"{what} offsets")
    sizes = _int_list(c.get("sizes"), where, key, f"{what} sizes")
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise _fail(where, key, f"{what} has {len(offsets)}-d offsets / {len(sizes)}-d sizes for a {len(shape)}-d tensor")
    for d, (o, s, n) in enumerate(zip(offsets, sizes, shape)):
        if o + s > n:
            raise _fail(where, key, f"{what} covers [{o}, {o + s}) of dim {d}, which has size {n}")
    file = c.get("file")
    try:
        check_relpath(file)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{where}, key {key!r}: {what} file {e}") from e
    if file not in files:
        raise _fail(where, key, f"{what} refers to file {file!r}, which the manifest does not list")
    codec = c.get("codec")
    if codec not in CODECS:
        raise _fail(where, key, f"{what} has unknown codec {codec!r}; expected one of {list(CODECS)}")
    byte_offset = _int(c.get("byte_offset"), where, key, f"{what} byte_offset")
    byte_length = _int(c.get("byte_length"), where, key, f"{what} byte_length")
    raw = _int(c.get("raw_byte_length"), where, key, f"{what} raw_byte_length")
    block = _int(c.get("block_bytes"), where, key, f"{what} block_bytes", lo=1)
    if raw != math.prod(sizes) * esize:
        raise _fail(where, key, f"{what} raw_byte_length is {raw}, its box of {list(sizes)} needs {math.prod(sizes) * esize}")
    if codec == "raw" and byte_length != raw:
        raise _fail(where, key, f"{what} is raw but stores {byte_length} bytes for {raw} raw bytes")
    if codec == "raw" and block % esize:
        raise _fail(where, key, f"{what} block_bytes {block} is not a multiple of the element size {esize}")
    if byte_offset + byte_length > files[file].size_bytes:
        raise _fail(where, key, f"{what} bytes [{byte_offset}, {byte_offset + byte_length}) lie beyond the end of "
                                f"{file!r} ({files[file].size_bytes} bytes)")
    checks = c.get("checksums")
    expected_blocks = 1 if (codec != "raw" or byte_length == 0) else -(-byte_length // block)
    if codec != "raw" and block < byte_length:
        raise _fail(where, key, f"{what}: a {codec} chunk is one checksum block; block_bytes must be >= byte_length")
    if (not isinstance(checks, list) or len(checks) != expected_blocks
            or not all(isinstance(x, str) and len(x) == 16 for x in checks)):
        raise _fail(where, key, f"{what} must have {expected_blocks} 16-hex-digit checksums, found {checks!r}")
    return ChunkEntry(offsets, sizes, file, byte_offset, byte_length, codec, raw, block, tuple(checks))


def _parse_value(key: str, e: dict[str, Any], where: str) -> Any:
    t, v = e.get("type"), e.get("value")
    if t == "none" and v is None:
        return None
    if t == "bool" and isinstance(v, bool):
        return v
    if t == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t == "float":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if v in ("nan", "inf", "-inf"):
            return float(v)
    if t == "str" and isinstance(v, str):
        return v
    raise _fail(where, key, f"value of type {t!r} holds {v!r}; expected one of {list(VALUE_TYPES)} with a matching value")


def _parse_container(key: str, e: dict[str, Any], where: str) -> ContainerEntry:
    t = e.get("type")
    if t not in CONTAINER_TYPES:
        raise _fail(where, key, f"unknown container type {t!r}; expected one of {list(CONTAINER_TYPES)}")
    length = _int(e.get("length", 0), where, key, "container length")
    if t == "dict" and length:
        raise _fail(where, key, f"a dict container has no length, found {length}")
    int_keys = e.get("int_keys", [])
    if (not isinstance(int_keys, list) or (int_keys and t != "dict")
            or not all(isinstance(k, str) and _is_int_text(k) for k in int_keys)):
        raise _fail(where, key, f"'int_keys' must be a list of decimal integers as strings (dicts only), found "
                                f"{int_keys!r}"[:300])
    return ContainerEntry(key, t, length, tuple(int_keys))


def _is_int_text(k: str) -> bool:
    """Whether ``k`` is how ``str(int)`` writes an int (what ``formats.keys.component`` records)."""
    digits = k[1:] if k.startswith("-") else k
    return digits.isascii() and digits.isdigit() and (digits == "0" or not digits.startswith("0")) and k != "-0"


def _check_tree(entries: dict[str, Any], containers: dict[str, ContainerEntry], where: str) -> None:
    """The keys form the tree that ``formats.nesting.nest`` rebuilds, checked in one pass over the keys.

    No key starts with ``/`` (the root's child ``""`` would have the root's own key) or has more than
    ``MAX_KEY_COMPONENTS`` components; no key lies below a tensor or value; the items of each list or tuple are
    exactly ``0 .. length - 1``, so a length is bounded by the entries that really exist under it. Parents that no
    container records are dicts."""
    children: dict[str, int] = {}  # list/tuple container key -> items seen
    seen: set[str] = set()  # implicit parents already walked up from
    for key in entries:
        if key == "":
            continue
        if key[0] == "/":
            raise _fail(where, key, "key starts with '/': its first component is empty, which no writer produces "
                                    "(the root's own key is '')")
        if key.count("/") >= MAX_KEY_COMPONENTS:
            raise _fail(where, key[:200] + "...", f"key has more than {MAX_KEY_COMPONENTS} '/'-separated components "
                                                 "(nesting that deep is refused)")
        k = key
        while True:
            parent, _, comp = k.rpartition("/")
            c = containers.get(parent)
            if parent in entries and c is None:
                raise _fail(where, key, f"key lies below {parent!r}, which is a tensor or value, not a container")
            if c is not None and c.type != "dict":
                if not (comp.isascii() and comp.isdigit() and (comp == "0" or comp[0] != "0")
                        and int(comp) < c.length):
                    raise _fail(where, key, f"{c.type} {parent!r} of length {c.length} has an item {comp!r}; its "
                                            f"items must be 0 .. {c.length - 1}")
                children[parent] = children.get(parent, 0) + 1  # k is a key, or an implicit parent met first now
            if parent == "" or parent in entries or parent in seen:
                break
            seen.add(parent)  # an implicit dict: walk up once, however many keys lie below it
            k = parent
    for key, c in containers.items():
        if c.type != "dict" and children.get(key, 0) != c.length:
            raise _fail(where, key, f"{c.type} of length {c.length} has {children.get(key, 0)} items; "
                                    "the manifest's containers do not match its keys")


def files_and_chunks(results: "list[tuple[dict[str, int], list[tuple[str, ChunkEntry]]]]"
                     ) -> tuple[dict[str, FileEntry], dict[str, list[ChunkEntry]]]:
    """Per-rank write results ``[(file sizes, [(key, chunk)])]`` (rank = position) -> the manifest's files and each
    key's chunks. Shared by ``ckpt.save`` and the offline converters."""
    files: dict[str, FileEntry] = {}
    chunks: dict[str, list[ChunkEntry]] = {}
    for rank, (sizes, entries) in enumerate(results):
        for p, n in sizes.items():
            files[p] = FileEntry(n, rank)
        for key, c in entries:
            chunks.setdefault(key, []).append(c)
    return files, chunks
