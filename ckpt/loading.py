"""``ckpt.load``: in-place, collective load with load-time resharding.

Every rank: resolve its state into destination tensors, intersect each local box with the stored chunks (pure
planning), read only those byte ranges in parallel threads, verify checksums, copy in place, then hand Stateful
objects their loaded state. The coordinator reads the manifest once and broadcasts it. Any rank's failure is
raised on every rank.
"""

from __future__ import annotations

import math
import mmap
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ckpt.dist import DistWrapper
from ckpt.errors import ShardMismatchError, SpecError
from ckpt.options import LoadOptions
from ckpt.state import FlatState, assign, flatten, resolve
from formats.dtypes import can_convert, dtype_from_name
from formats.manifest import Manifest
from formats.reader import ChunkReader, read_manifest
from formats.storage import Storage, open_storage
from resharding.layout import TensorLayout
from resharding.planner import ReadItem, plan_reads
from resharding.spec_bind import SpecBinding, local_layouts, parse_parallel, resolve_spec


def _names(keys: "list[str] | set[str]", limit: int = 4) -> str:
    items = sorted(keys, key=natural_key)
    shown = ", ".join(f"`{k}`" for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def natural_key(key: str) -> tuple[Any, ...]:
    """Sort key that orders ``params/2`` before ``params/10`` (digit runs compare as numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def diagnose(state_keys: "set[str]", ckpt_keys: "set[str]") -> str:
    """One line that says why two key sets differ: the top-level names where those differ (``model`` against
    ``net``), else how many keys each side lacks."""
    top_s = {k.split("/", 1)[0] for k in state_keys}
    top_c = {k.split("/", 1)[0] for k in ckpt_keys}
    if top_s != top_c:
        parts = []
        if top_s - top_c:
            parts.append(f"the state has {_names(top_s - top_c)}")
        if top_c - top_s:
            parts.append(f"the checkpoint has {_names(top_c - top_s)}")
        common = top_s & top_c
        return ("top-level keys differ: " + ", ".join(parts)
                + (f" (both have {_names(common)})" if common else " (none in common)"))
    missing, unexpected = state_keys - ckpt_keys, ckpt_keys - state_keys
    return (f"same top-level keys; {len(missing)} key(s) of the state missing from the checkpoint"
            + (f" (e.g. {_names(missing, 2)})" if missing else "")
            + f", {len(unexpected)} key(s) of the checkpoint not in the state"
            + (f" (e.g. {_names(unexpected, 2)})" if unexpected else ""))


def checkpointer_prefixes(flat: FlatState, manifest: Manifest) -> tuple[str, ...]:
    """``("rng/",)`` when the checkpoint holds a Checkpointer's own per-rank RNG entries (``rng/rank_NNNNN/...``)
    and the state has no ``rng`` entry: a plain ``ckpt.load`` of a Checkpointer step then skips them without
    ``strict=False``."""
    keys = [k for k in manifest.keys() if k.startswith("rng/")]
    if not keys or any(k == "rng" or k.startswith("rng/") for k in (*flat.tensors, *flat.values)):
        return ()
    return ("rng/",) if all(_RNG_ENTRY.fullmatch(k) for k in keys) else ()


_RNG_ENTRY = re.compile(r"rng/rank_\d{5}/[A-Za-z0-9_]+")


def check_compatible(flat: FlatState, layouts: dict[str, TensorLayout], manifest: Manifest, where: str,
                     strict: bool, allow_dtype_cast: bool, lenient_prefixes: tuple[str, ...] = (),
                     other_ranks_keys: "set[str] | frozenset[str]" = frozenset()) -> None:
    """Raise one ``ShardMismatchError`` listing every mismatch between the state and the checkpoint, after a first
    line that diagnoses it (``diagnose``); it offers ``strict=False`` only where that would load something.

    Keys under ``lenient_prefixes`` may be missing on either side (per-rank state such as RNG streams, whose
    keys depend on the world size). Checkpoint keys in ``other_ranks_keys`` (logical tensors a spec layout gives
    to other ranks, such as another pipeline stage's layers) are not reported as unexpected.
    """
    problems: list[str] = []
    only_keys = True  # every problem is a key on one side only (strict=False would load the rest)
    strict_for = (lambda k: strict and not k.startswith(lenient_prefixes)) if lenient_prefixes else (lambda k: strict)
    for key, lay in layouts.items():
        entry = manifest.tensors.get(key)
        if entry is None:
            if key in manifest.values:
                only_keys = False
                problems.append(f"key {key!r}: the state holds a tensor, the checkpoint a {type(manifest.values[key].value).__name__}")
            elif strict_for(key):
                problems.append(f"key {key!r}: in the state, missing from the checkpoint")
            continue
        if tuple(entry.shape) != tuple(lay.global_shape):
            only_keys = False
            problems.append(f"key {key!r}: shape {list(lay.global_shape)} in the state, {list(entry.shape)} in the checkpoint")
        stored = dtype_from_name(entry.dtype, key)
        if not allow_dtype_cast and stored != lay.local.dtype:
            only_keys = False
            problems.append(f"key {key!r}: dtype {lay.local.dtype} in the state, {entry.dtype} in the checkpoint")
        elif not can_convert(stored, lay.local.dtype):
            only_keys = False
            problems.append(f"key {key!r}: dtype {lay.local.dtype} in the state, {entry.dtype} in the checkpoint, "
                            f"and torch cannot convert {entry.dtype} to {str(lay.local.dtype).replace('torch.', '')} "
                            f"(load it into a {entry.dtype} tensor)")
    for key in flat.values:
        if key in manifest.tensors:
            only_keys = False
            problems.append(f"key {key!r}: the state holds a {type(flat.values[key]).__name__}, the checkpoint a tensor")
        elif strict_for(key) and key not in manifest.values:
            problems.append(f"key {key!r}: in the state, missing from the checkpoint")
    wanted = set(layouts) | set(flat.values)
    if strict:
        for key in manifest.keys():
            if key not in wanted and key not in other_ranks_keys and strict_for(key):
                problems.append(f"key {key!r}: in the checkpoint, not in the state")
    if problems:
        ckpt_keys = {k for k in manifest.keys()
                     if k not in other_ranks_keys and not (lenient_prefixes and k.startswith(lenient_prefixes))}
        common = len(wanted & ckpt_keys)
        if only_keys and common:
            hint = (f"Pass strict=False to load the {common} key(s) both have (the others stay as they are), or fix "
                    "the model/optimizer definition.")
        elif only_keys:
            hint = ("The state and the checkpoint have no key in common: strict=False would load nothing. Check that "
                    "the state's top-level names match the ones it was saved with (for example {'model': ...}).")
        else:
            hint = ("Fix the model/optimizer definition (shapes and dtypes must match; strict=False does not skip "
                    "them), or pass options=LoadOptions(allow_dtype_cast=True) where only dtypes differ.")
        raise ShardMismatchError(
            f"{where}: the state does not match the checkpoint: {diagnose(wanted, ckpt_keys)}\n"
            f"{len(problems)} problem(s):\n  "
            + "\n  ".join(problems)
            + "\n" + hint
        )


@dataclass(frozen=True)
class LoadReport:
    """What ``ckpt.load`` did on this rank (its return value), in the spirit of ``nn.Module.load_state_dict``'s
    missing and unexpected keys.

    ``loaded_keys``: flattened keys of the state filled from the checkpoint. ``missing_keys``: keys of the state
    the checkpoint lacks, left as they were (only with ``strict=False`` or under lenient prefixes such as the
    Checkpointer's ``rng/``). ``unexpected_keys``: keys of the checkpoint the state has no place for, not read
    (other ranks' logical tensors under a spec layout are not counted). ``bytes_read``: bytes this rank fetched
    from storage, checking passes included."""

    path: str
    loaded_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    bytes_read: int

    def __str__(self) -> str:
        return (f"{self.path}: loaded {len(self.loaded_keys)} key(s), {len(self.missing_keys)} missing from the "
                f"checkpoint, {len(self.unexpected_keys)} in the checkpoint not loaded, {self.bytes_read} bytes read")


_HUGE = 2 << 20


def _host_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; a large one on fresh anonymous memory asking for transparent huge pages.

    Touching fresh pages costs more than the copy into them (4 KiB faults: about 4 GB/s here, 2 MiB ones about
    9 GB/s), so the copies a load keeps aside use huge pages where the kernel grants them."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < 4 * _HUGE or advise is None:
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(advise)
    except OSError:
        pass
    raw = torch.frombuffer(m, dtype=torch.uint8)  # keeps ``m`` mapped as long as a view of it lives
    skip = (-raw.data_ptr()) % _HUGE
    return raw[skip : skip + nbytes].view(dtype).view(shape)


class Undo:
    """What a load overwrote, to put back if it fails: a failed ``ckpt.load`` leaves the caller's tensors as they
    were (docs/loading.md). ``keep(dest)`` copies ``dest`` aside just before it is written (on the CPU, so a GPU
    state needs no second copy of itself on the device); ``restore()`` copies everything back, newest first.
    Thread-safe; costs one memory copy of the state and that much CPU memory until the load ends."""

    def __init__(self) -> None:
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._lock = threading.Lock()

    def keep(self, dest: torch.Tensor) -> None:
        if dest.numel() == 0:
            return
        saved = _host_empty(dest.shape, dest.dtype)
        saved.copy_(dest)
        with self._lock:
            self._kept.append((dest, saved))

    def restore(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, []
        with torch.no_grad():
            for dest, saved in reversed(kept):
                dest.copy_(saved)

    def discard(self) -> None:
        with self._lock:
            self._kept = []


Job = tuple[ReadItem, TensorLayout]


def plan_jobs(reader: ChunkReader, manifest: Manifest, layouts: dict[str, TensorLayout]) -> list[Job]:
    """Every region read of ``layouts`` (tensors absent from the manifest are skipped), in planning order."""
    jobs: list[Job] = []
    for key, lay in layouts.items():
        entry = manifest.tensors.get(key)
        if entry is None:
            continue
        boxes = [_box(c) for c in entry.chunks]
        for item in plan_reads(key, boxes, lay.pieces, f"{reader.storage.url}: "):
            jobs.append((item, lay))
    return jobs


def _region(manifest: Manifest, job: Job) -> tuple[Any, Any, torch.Tensor]:
    """The tensor entry, the chunk and the destination view of one job."""
    item, lay = job
    entry = manifest.tensors[item.key]
    piece = lay.pieces[item.piece_index]
    local = piece.source if piece.source is not None else lay.local
    dest = local[tuple(slice(o, o + s) for o, s in zip(item.dest_offsets, item.rel.sizes))]
    return entry, entry.chunks[item.chunk_index], dest


def _each(fn: Callable[[Job], Any], jobs: list[Job], num_threads: int) -> list[Any]:
    """``fn`` of every job (results in job order), in ``num_threads`` threads, each running its share of the jobs in
    a loop (balanced by elements; one future per job cost more than the copies of small tensors). On a failure the
    jobs not started yet are skipped and the running ones finish before it is raised, so nothing runs after this
    returns."""
    if num_threads <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    shares: list[list[int]] = [[] for _ in range(min(num_threads, len(jobs)))]
    loads = [0] * len(shares)
    for i in sorted(range(len(jobs)), key=lambda i: -math.prod(jobs[i][0].rel.sizes)):
        t = loads.index(min(loads))
        shares[t].append(i)
        loads[t] += math.prod(jobs[i][0].rel.sizes)
    results: list[Any] = [None] * len(jobs)
    failed = threading.Event()

    def work(share: list[int]) -> None:
        for i in share:
            if failed.is_set():
                return
            try:
                results[i] = fn(jobs[i])
            except BaseException:
                failed.set()
                raise

    pool = ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="ckpt-read")
    try:
        for f in [pool.submit(work, share) for share in shares]:
            f.result()
    finally:
        failed.set()
        pool.shutdown(wait=True)
    return results


def verify_in_place(reader: ChunkReader, manifest: Manifest, jobs: list[Job], num_threads: int) -> bool:
    """Verify every job's stored bytes before anything is written (``ChunkReader.verify_in_place``: mapped daemon
    segments in place, local files and memory by a first read); True when all were, False (having verified at
    most the first) for other storages or when a chunk is compressed. Raises ``CorruptCheckpointError`` on
    damage."""
    def check(job: Job) -> bool:
        entry, chunk, dest = _region(manifest, job)
        return reader.verify_in_place(entry, chunk, job[0].rel.offsets, job[0].rel.sizes, dest)

    if not jobs or not check(jobs[0]):
        return not jobs
    return all(_each(check, jobs[1:], num_threads))


def read_into(reader: ChunkReader, manifest: Manifest, layouts: dict[str, TensorLayout], num_threads: int,
              undo: Undo | None = None, jobs: list[Job] | None = None, verified: bool = False) -> None:
    """Execute every read of ``layouts`` (or the planned ``jobs``). With ``undo``, every destination region is
    kept there before it is written; on failure no read is left running when this returns, so
    ``undo.restore()`` puts back everything. ``verified``: ``verify_in_place`` returned True for ``jobs``."""
    def run(job: Job) -> None:
        entry, chunk, dest = _region(manifest, job)
        if undo is not None:
            undo.keep(dest)
        reader.read_region(entry, chunk, job[0].rel.offsets, job[0].rel.sizes, dest, verified)

    _each(run, plan_jobs(reader, manifest, layouts) if jobs is None else jobs, num_threads)


def load_binding(manifest: Manifest, spec: Any, dims: dict[str, Any] | None, layout: Any,
                 where: str) -> SpecBinding | None:
    """The spec binding a load uses: the arguments, completed from the spec and dims the checkpoint recorded."""
    saved = manifest.layout.get("spec") if isinstance(manifest.layout, dict) else None
    if layout is None:
        if spec is not None or dims is not None:
            raise SpecError(f"ckpt.load {where}: spec=/dims= need layout= (this rank's parallel layout, "
                            "e.g. 'tp=2,pp=1,dp=2')")
        return None
    base = SpecBinding.from_json_dict(saved, where) if saved is not None else None
    if spec is None and base is None:
        raise SpecError(f"ckpt.load {where}: layout= needs a spec, and this checkpoint was saved without one; "
                        "pass spec= (a shipped name such as 'llama', or a YAML path) and dims=")
    return SpecBinding(resolve_spec(spec) if spec is not None else base.spec,  # type: ignore[union-attr]
                       dict(dims) if dims is not None else dict(base.dims),  # type: ignore[union-attr]
                       parse_parallel(layout))


def _box(chunk: Any) -> Any:
    from formats.box import Box

    return Box(chunk.offsets, chunk.sizes)


def load(state: Any, path: "str | Storage", *, process_group: Any = None, strict: bool = True,
         storage_options: dict[str, Any] | None = None, options: LoadOptions | None = None,
         lenient_prefixes: tuple[str, ...] = (), spec: Any = None, dims: dict[str, Any] | None = None,
         layout: Any = None) -> LoadReport:
    """Load the checkpoint at ``path`` into ``state`` in place (collective over ``process_group``); returns this
    rank's ``LoadReport`` (keys loaded, keys skipped on each side, bytes read).

    Tensors (plain or DTensor) are filled in place whatever layout they were saved under: this is load-time
    resharding, reading only the byte ranges each rank needs. Non-tensor values are replaced inside their dicts
    and lists; Stateful objects (modules, optimizers, schedulers, ...) get ``load_state_dict``. ``strict=True``
    raises one ``ShardMismatchError`` listing every missing, unexpected or mis-shaped key; keys under
    ``lenient_prefixes`` may be missing on either side (the Checkpointer passes its per-rank RNG prefix; a plain
    load of a Checkpointer step into a state without ``rng`` skips those entries by itself). A load that would
    fill nothing (no key in common, even with ``strict=False``) raises ``ShardMismatchError``.

    ``layout`` (``"tp=2,pp=4,dp=1"`` or a mapping) loads into rank-local tensors laid out as a spec describes
    (Megatron-style state, ZeRO flat buffers): this rank's tensors are filled from the logical tensors, padding
    with zeros. ``spec`` and ``dims`` default to those the checkpoint was saved with.
    """
    storage = open_storage(path, storage_options)
    try:
        return _load(state, storage, process_group, strict, options, lenient_prefixes, spec, dims, layout)
    finally:
        if not isinstance(path, Storage):  # opened here: its cached file descriptors go now (3 per load leaked)
            storage.close()


def _load(state: Any, storage: Storage, process_group: Any, strict: bool, options: LoadOptions | None,
          lenient_prefixes: tuple[str, ...], spec: Any, dims: dict[str, Any] | None, layout: Any) -> LoadReport:
    opts = options or LoadOptions()
    dw = DistWrapper(process_group)
    manifest = dw.run("ckpt.load: reading the manifest", lambda: read_manifest(storage) if dw.is_coordinator else None)
    manifest = dw.broadcast(manifest)
    binding = load_binding(manifest, spec, dims, layout, storage.url)
    if binding is not None and binding.world_size != dw.world_size:
        raise ShardMismatchError(f"ckpt.load: the parallel layout {binding.parallel} has {binding.world_size} ranks, "
                                 f"the process group {dw.world_size}")

    undo = Undo()
    prepared: dict[str, Any] = {}

    def prepare() -> bool:
        plain, bindings, ctx = resolve(state)
        flat = flatten(plain)
        layouts, rl = local_layouts(flat.tensors, binding, dw.rank, for_save=False)
        others = frozenset(binding.logical_shapes()) if binding is not None else frozenset()
        lenient = lenient_prefixes + checkpointer_prefixes(flat, manifest)
        check_compatible(flat, layouts, manifest, storage.url, strict, opts.allow_dtype_cast, lenient, others)
        loaded = [k for k in layouts if k in manifest.tensors] + [k for k in flat.values if k in manifest.values]
        wanted = set(layouts) | set(flat.values)
        if not loaded:
            ckpt_keys = set(manifest.keys()) - others
            raise ShardMismatchError(
                f"{storage.url}: nothing to load on rank {dw.rank}: the state and the checkpoint have no key in "
                f"common ({diagnose(wanted, ckpt_keys) if wanted else 'the state is empty'}); pass the state it was "
                "saved with (for example {'model': model, 'optim': optim}), or see `ckpt inspect " + storage.url + "`")
        reader = ChunkReader(storage, manifest)
        jobs = plan_jobs(reader, manifest, layouts)
        prepared.update(bindings=bindings, ctx=ctx, flat=flat, rl=rl, reader=reader, jobs=jobs, loaded=loaded,
                        missing=sorted(wanted - set(manifest.keys()), key=natural_key),
                        unexpected=sorted((k for k in manifest.keys() if k not in wanted and k not in others),
                                          key=natural_key))
        return verify_in_place(reader, manifest, jobs, opts.num_threads)

    def load_local(verified: bool) -> None:
        flat, rl, reader, jobs = prepared["flat"], prepared["rl"], prepared["reader"], prepared["jobs"]
        keep = None if verified else undo
        with torch.no_grad():
            if rl is not None:  # padding (vocabulary rows, ZeRO alignment) is not in the checkpoint: zeros
                for lt in rl:
                    if keep is not None:
                        keep.keep(flat.tensors[lt.key])
                    flat.tensors[lt.key].zero_()
            read_into(reader, manifest, {}, opts.num_threads, keep, jobs, verified)
        assign(state, {k: v.value for k, v in manifest.values.items() if k in flat.values}, prepared["bindings"])
        for b in prepared["bindings"]:
            b.apply(prepared["ctx"])

    # Daemon segments, local files and memory: every rank verifies all it will copy before anything is written,
    # so a damaged checkpoint never reaches the tensors. Object stores and compressed chunks: reads go straight
    # into the caller's tensors and are verified there; what they overwrite is kept until every rank has loaded,
    # and put back if any rank failed. Either way a failed load leaves the state as it was (docs/loading.md).
    verified = all(dw.all_gather(dw.run("ckpt.load: checking", prepare)))
    try:
        dw.run("ckpt.load", lambda: load_local(verified))
    except BaseException:
        undo.restore()
        raise
    finally:
        undo.discard()
    reader = prepared["reader"]
    return LoadReport(storage.url, tuple(prepared["loaded"]), tuple(prepared["missing"]),
                      tuple(prepared["unexpected"]), reader.bytes_read + reader.bytes_checked)
