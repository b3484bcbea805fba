"""Megatron-LM / Megatron-DeepSpeed rank directories read as a ``Source`` of logical tensors, given a spec.

A Megatron checkpoint is a directory of rank directories, ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/`` (the pp part
only when ``pp > 1``, the ep part only when ``ep > 1``), each holding ``model_optim_rng.pt`` (written by the first
data-parallel rank of that position) and, with a distributed (ZeRO) optimizer, ``distrib_optim_{dp:03d}.pt`` per
data-parallel rank (docs/megatron-layout.md, "Files"). A Megatron-LM save root with
``latest_checkpointed_iteration.txt`` and ``iter_XXXXXXX/`` is accepted too (the iteration the tracker names).

The files say nothing of how their tensors cut the logical ones; a spec does (``spec_lang``). ``MegatronSource``
binds the spec to the model dims (from ``dims=``, else the files' ``args``) and to the parallel layout (from
``parallel=``, else the files' ``args``, else the directory names and files), rebuilds every rank's rank-local
state (``model/...``, ``optim/...``, ``iteration``) from the files, checks it against the spec (every local key and
shape), and offers the logical tensors of the spec through the ``formats.foreign.source.Source`` interface. So
every ``formats.foreign`` writer (universal, DCP, torch, safetensors) and ``ckpt diff`` work on it unchanged.

Memory: files are opened with ``torch.load(mmap=True, weights_only=True)``, so their tensors stay in the page cache
until a piece of one is copied; ``read(key)`` allocates the one logical tensor it returns (plus, only when the
spec's pieces overlap other than as identical replicas, a boolean mask of its size). Replicas are reconciled as
``resharding.offline.import_ranks`` does (the same code): copies the spec calls replicated must be bit-identical
(``ShardMismatchError`` naming the key, the ranks and their files), averaged ones are replaced by their mean.
Copies that are one and the same file entry (data-parallel ranks sharing ``model_optim_rng.pt``) are read once.

Registered as source format ``megatron`` (``formats.foreign.registry``) when this module is imported, so
``open_source(path, "megatron", spec=..., dims=..., source_layout=..., target=...)``, ``ckpt convert`` and
``ckpt diff`` read it as any other format (``open_megatron``). ``target`` presents the tensors chunked as every
rank of that layout would save them (``MegatronSource.retarget``): the generic universal writer then writes that
layout's checkpoint. ``resharding.megatron_import`` is the Python entry point for the whole conversion.

Nothing unpickles code: the files are loaded by ``resharding.megatron_files`` (inert stand-ins for the few classes
Megatron files hold; any other class raises ``UnsafeCheckpointError`` unless ``allow_pickle=True``), which also
finds the iteration, the rank directories and the layout.

Who calls it: ``ckpt convert --from megatron`` (``ckpt.cli_convert``) and scripts; one process. ``read`` is
thread-safe (converters read from one thread per output file).
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Mapping

import torch

from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, ShardMismatchError, SpecError
from formats import keys as K
from formats.dtypes import dtype_name
from formats.foreign.registry import SourceNotes
from formats.foreign.source import Source, TensorInfo, add_parents, flatten_into
from formats.box import Box, boxes_tile
from resharding.grid import Grid, layout_text as _text
from resharding.layout import LocalPiece, TensorLayout
from resharding.megatron_files import (MODEL_FILE, TRACKER_FILE, DirScan, args_dict, args_dims, args_parallel,
                                       dims_from_shapes, given_parallel, jsonable, load_megatron_file, local_keys,
                                       missing_dims_text as _missing_dims_text, rank_dir_name,
                                       resolve_checkpoint_dir, walk_payload)
from resharding.offline import _reconcile, target_boxes
from resharding.spec_apply import piece_view
from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec
from spec_lang.shipped import ALIASES, FAMILIES, match_shipped
from resharding.spec_layout import AVERAGED, REPLICATED, Piece

# ---------------------------------------------------------------------------------------------------------------
# The source.


class MegatronSource(Source):
    """Megatron rank directories as a ``Source`` of the spec's logical tensors (see the module docstring).

    ``spec``: a ``Spec``, a shipped name (``gpt``, ``llama``, ``mixtral``) or a YAML path. ``dims``: model dims;
    those not given come from the files' ``args``. ``parallel``: the layout the files were written under
    (``"tp=2,pp=2,dp=2,zero=1"`` or a mapping); settings not given come from ``args``, then from the directory.
    ``binding`` is the resulting ``SpecBinding`` (what a universal export records).
    """

    def __init__(self, path: str, spec: Any, *, dims: Mapping[str, Any] | None = None,
                 parallel: "str | Mapping[str, Any] | None" = None, allow_pickle: bool = False) -> None:
        super().__init__(path=str(path), format="megatron")
        self._lock = threading.Lock()
        self._allow_pickle = allow_pickle
        self._files: dict[str, Any] = {}
        root, tracked = resolve_checkpoint_dir(self.path)
        scan = DirScan(root)
        first = os.path.join(root, next(iter(scan.dirs.values())), MODEL_FILE)
        has_args = "args" in self._file(first)
        args = args_dict(self._file(first).get("args"))
        #: How the spec was chosen: None when used as given, else what detection found (``_notes`` reports it).
        self.detected: str | None = None
        spec_obj = self._choose_spec(spec, root)
        model_files = [os.path.join(root, d, MODEL_FILE) for d in scan.dirs.values()
                       if os.path.isfile(os.path.join(root, d, MODEL_FILE))]
        #: Whether the files hold optimizer state: model-only files (--no-save-optim, fine-tuning exports) bind
        #: the spec without its optimizer rules.
        self.has_optimizer = any(scan.optim.values()) or any("optimizer" in self._file(f) for f in model_files)
        if not self.has_optimizer:
            spec_obj = spec_obj.restricted_to({"model", "iteration"})
        declared = {d.name for d in spec_obj.dims}
        given_dims = dict(dims or {})
        found_dims = args_dims(args, declared)
        missing = sorted(d.name for d in spec_obj.dims
                         if d.default is None and d.name not in given_dims and d.name not in found_dims)
        known = {**args_parallel(args), **given_parallel(parallel)}
        model_empty = all(not self._file(f).get("model") for f in model_files)
        inferred = scan.infer(known, model_empty)
        if missing:
            raise SpecError(_missing_dims_text(first, spec_obj.name, missing, has_args, inferred, known,
                                               dims_from_shapes(self._file(first).get("model") or {}, inferred)))
        parallel_all = parse_parallel(inferred)
        self.binding = SpecBinding(spec_obj, {**found_dims, **given_dims}, parallel_all)
        self.root = root
        #: The layout the tensors are presented for, after ``retarget`` (None: the files' own).
        self.target: SpecBinding | None = None
        self._grid = Grid.of(self.binding.parallel)
        self.layout = {"world_size": self.binding.world_size, "dtensor_mesh_shapes": [],
                       "spec": self.binding.to_json_dict()}
        self._build(scan, tracked, args)

    # -- opening ---------------------------------------------------------------------------------------------------

    def _choose_spec(self, spec: Any, root: str) -> Any:
        """``spec`` resolved; ``"auto"`` or a family name (``llama``) is matched against the files' keys: ``auto``
        among every shipped spec, a family between its local and Transformer Engine namings."""
        if not (isinstance(spec, str) and (spec == "auto" or spec in FAMILIES or spec in ALIASES)):
            return resolve_spec(spec)
        family = ALIASES.get(spec, spec)
        candidates = None if spec == "auto" else (family, f"{family}-te")
        keys = local_keys(root, self._allow_pickle, load=self._file)
        name, reports = match_shipped(keys, candidates)
        if name is None:
            if spec != "auto":
                return resolve_spec(family)  # its check names every key it does not predict
            tried = "\n  ".join(f"{n}: {len(r.unmatched_keys)} key(s) match no rule, e.g. {r.unmatched_keys[0]}"
                                for n, r in reports.items())
            raise SpecError(f"{root}: no shipped spec describes these rank files; tried:\n  {tried}\nWrite a spec "
                            "for this model (docs/spec-language.md) and pass its path as --spec")
        if name != family:
            naming = "Transformer Engine" if name.endswith("-te") else "local"
            self.detected = f"{name} (the files use Megatron-Core's {naming} layer-spec naming)"
        return resolve_spec(name)

    def _file(self, path: str) -> Any:
        with self._lock:
            if path not in self._files:
                self._files[path] = load_megatron_file(path, self._allow_pickle)
            return self._files[path]

    def rank_files(self, rank: int) -> tuple[str, str | None]:
        """(model file, distrib_optim file or None) of global ``rank``, relative to the checkpoint directory."""
        c = self._grid.coords(rank)
        d = rank_dir_name(c.tp, c.pp, c.ep, self._grid)
        return f"{d}/{MODEL_FILE}", (f"{d}/distrib_optim_{c.dp:03d}.pt" if self._grid.zero >= 1 else None)

    def _rank_state(self, rank: int) -> tuple[dict[str, tuple[str, tuple[Any, ...]]], dict[str, Any]]:
        """Local tensor key -> (file, path inside it), and the nested non-tensor state of ``rank``."""
        model_rel, optim_rel = self.rank_files(rank)
        main = self._payload(model_rel)
        nested: dict[str, Any] = {}
        if "model" in main and main["model"] is not None:
            nested["model"] = (model_rel, ("model",))
        if optim_rel is None:
            if "optimizer" in main:
                nested["optim"] = (model_rel, ("optimizer",))
        else:
            nested["optim"] = (optim_rel, ("optimizer",))
        tensors: dict[str, tuple[str, tuple[Any, ...]]] = {}
        values: dict[str, Any] = {}
        for top, (rel, path) in nested.items():
            obj = self._payload(rel)[path[0]]
            walk_payload(obj, top, rel, path, tensors, values, f"{self.root}/{rel}")
        if "iteration" in main:
            values["iteration"] = main["iteration"]
        return tensors, values

    def _payload(self, rel: str) -> Any:
        obj = self._file(os.path.join(self.root, rel))
        if not isinstance(obj, Mapping):
            raise CorruptCheckpointError(f"{self.root}/{rel}: holds a {type(obj).__name__}, expected a dict")
        return obj

    def entry(self, rel: str, path: tuple[Any, ...]) -> torch.Tensor:
        """The tensor at ``path`` in file ``rel``, as stored (memory-mapped: no data is read yet)."""
        obj = self._payload(rel)
        for p in path:
            obj = obj[p]
        return obj

    def tensor_at(self, rel: str, path: tuple[Any, ...]) -> torch.Tensor:
        """``entry``, contiguous (spec pieces are strided views of a contiguous local tensor; a tensor saved
        non-contiguous is copied)."""
        t = self.entry(rel, path)
        return t if t.is_contiguous() else t.contiguous()

    def _build(self, scan: DirScan, tracked: int | None, args: dict[str, Any]) -> None:
        b, n = self.binding, self.binding.world_size
        expected = {f for r in range(n) for f in self.rank_files(r) if f is not None}
        missing = sorted(f for f in expected if not os.path.isfile(os.path.join(self.root, f)))
        if missing:
            raise IncompleteCheckpointError(
                f"{self.root}: {len(missing)} rank file(s) of layout {_text(b.parallel)} missing: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}. Copy them in, or pass the layout the "
                "files were written under (--source-layout).")
        present = {f"{d}/{MODEL_FILE}" for d in scan.dirs.values()
                   if os.path.isfile(os.path.join(self.root, d, MODEL_FILE))}
        present |= {f"{d}/distrib_optim_{i:03d}.pt" for d, ids in scan.optim.items() for i in ids}
        extra = sorted(present - expected)
        if extra:
            raise ShardMismatchError(f"{self.root}: file(s) that layout {_text(b.parallel)} does not account for: "
                                     f"{', '.join(extra[:8])}; pass the layout the files were written under "
                                     "(--source-layout tp=..,pp=..,dp=..,ep=..,zero=..)")
        self._where: dict[int, str] = {}
        self._holders: dict[str, list[tuple[int, str, tuple[Any, ...], Piece]]] = {}
        iterations: dict[str, Any] = {}
        for r in range(n):
            tensors, values = self._rank_state(r)
            files = [f for f in self.rank_files(r) if f is not None]
            self._where[r] = " + ".join(files)
            shapes = {k: tuple(self.entry(*loc).shape) for k, loc in tensors.items()}
            try:
                rl = b.rank_layout(r, shapes)
            except SpecError as e:
                raise SpecError(f"{self.root}: rank {r} ({self._where[r]}): {e}") from e
            for f in files:
                if "iteration" in self._payload(f):
                    iterations[f] = self._payload(f)["iteration"]
            if r == 0:
                self._values0 = values
            self._collect(r, rl, tensors)
        its = set(iterations.values())
        if len(its) > 1:
            raise ShardMismatchError(f"{self.root}: the rank files record different iterations: "
                                     + ", ".join(f"{f}: {v}" for f, v in sorted(iterations.items())[:8]))
        if tracked is not None and its and its != {tracked}:
            raise ShardMismatchError(f"{self.root}: {TRACKER_FILE} says iteration {tracked}, the files {its.pop()}")
        self._tables(args)

    def _collect(self, rank: int, rl: Any, tensors: Mapping[str, tuple[str, tuple[Any, ...]]]) -> None:
        """Record the pieces ``rank`` holds, as ``bind_tensors(for_save=True)`` offers them: ZeRO master pieces
        dropped where the rank also holds the key as an ordinary parameter, a box held twice (tied) offered once."""
        kinds = {s.match: s.kind for s in self.binding.spec.state}
        mine: dict[str, list[tuple[str, tuple[Any, ...], Piece, bool]]] = {}
        for lt in rl:
            flat = kinds.get(lt.rule) == "flat"
            rel, path = tensors[lt.key]
            for p in lt.pieces:
                mine.setdefault(p.logical_key, []).append((rel, path, p, flat))
        for key, items in mine.items():
            if not all(flat for *_, flat in items):
                items = [it for it in items if not it[3]]
            seen: set[Box] = set()
            for rel, path, p, _ in items:
                if p.box not in seen:
                    seen.add(p.box)
                    self._holders.setdefault(key, []).append((rank, rel, path, p))

    def _tables(self, args: dict[str, Any]) -> None:
        shapes = self.binding.logical_shapes()
        for key, holders in self._holders.items():
            dtypes = {self.entry(rel, path).dtype for _, rel, path, _ in holders}
            if len(dtypes) > 1:
                raise ShardMismatchError(f"{self.root}: logical key {key!r} is held by local tensors of dtypes "
                                         f"{sorted(str(d) for d in dtypes)}")
            self.tensors[key] = TensorInfo.whole(key, dtypes.pop(), tuple(shapes[key]))
        sink: dict[str, torch.Tensor] = {}
        for key, value in self._values0.items():
            flatten_into(value, key, self, f"{self.root}/{self.rank_files(0)[0]}", sink)
        for key in [*self.tensors, *self.values]:
            add_parents(key, self.containers)
        self.metadata["megatron"] = {"args": jsonable(args), "parallel": dict(self.binding.parallel),
                                     "spec": self.binding.spec.name, "dims": dict(self.binding.dims)}

    def retarget(self, binding: SpecBinding) -> None:
        """Present the tensors cut as every rank of ``binding`` would save them (the boxes ``reshard`` writes), and
        record ``binding`` as the layout: a universal copy is then that layout's checkpoint, written directly."""
        tables = {k: (dtype_name(info.dtype), info.shape) for k, info in self.tensors.items()}
        boxes = target_boxes(binding, tables, self.root)
        for key, bs in boxes.items():
            info = self.tensors[key]
            self.tensors[key] = TensorInfo(key, info.dtype, info.shape,
                                           tuple((tuple(b.offsets), tuple(b.sizes)) for b in bs))
        self.layout = {"world_size": binding.world_size, "dtensor_mesh_shapes": [], "spec": binding.to_json_dict()}
        self.target = binding

    # -- reading ---------------------------------------------------------------------------------------------------

    def read(self, key: str) -> torch.Tensor:
        """The logical tensor ``key``, gathered from the rank files (replicas checked or averaged)."""
        info = self.tensors[key]
        layouts: list[dict[str, TensorLayout]] = [{} for _ in range(self.binding.world_size)]
        policies: dict[tuple[str, Box], str] = {}
        sources: set[tuple[str, tuple[Any, ...], Box]] = set()
        for rank, rel, path, p in self._holders[key]:
            if (rel, path, p.box) in sources:
                continue  # the same entry of the same file (data-parallel ranks sharing model_optim_rng.pt)
            sources.add((rel, path, p.box))
            view = piece_view(self.tensor_at(rel, path), p)
            piece = LocalPiece(tuple(0 for _ in p.sizes), p.box, source=view)
            lay = layouts[rank].get(key)
            pieces = (*lay.pieces, piece) if lay is not None else (piece,)
            layouts[rank][key] = TensorLayout(info.shape, view, pieces, None)
            if p.policy in (REPLICATED, AVERAGED):
                policies[(key, p.box)] = p.policy
        try:
            _reconcile(layouts, policies, self.root)
        except ShardMismatchError as e:
            ranks = sorted({int(r) for pair in re.findall(r"ranks (\d+) and (\d+)", str(e)) for r in pair})
            files = "; ".join(f"rank {r}: {self._where[r]}" for r in ranks)
            raise ShardMismatchError(f"{e}\nRank files: {files}") from e
        return self._assemble(key, info, layouts)

    def _assemble(self, key: str, info: TensorInfo, layouts: list[dict[str, TensorLayout]]) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=info.dtype)
        placed = [(r, p) for r, lays in enumerate(layouts) if key in lays for p in lays[key].pieces]
        distinct = {p.global_box: p for _, p in placed}  # identical boxes were reconciled above
        if len(distinct) <= 256 and not boxes_tile(list(distinct), info.shape):
            for box, p in distinct.items():
                out[box.slices()] = p.local_view(p.source)  # type: ignore[arg-type]
            return out
        # Boxes that overlap without being equal (fragments of ZeRO buffers cut differently on each TP rank).
        filled = torch.zeros(info.shape, dtype=torch.bool)
        problems = []
        for r, p in placed:
            sl = p.global_box.slices()
            src, dst, done = p.local_view(p.source), out[sl], filled[sl]  # type: ignore[arg-type]
            if bool(done.any()) and not torch.equal(dst[done], src[done]):
                problems.append(f"rank {r} ({self._where[r]}): box offsets={list(p.global_box.offsets)} "
                                f"sizes={list(p.global_box.sizes)} differs from an overlapping copy")
            dst.copy_(src)
            done.fill_(True)
        if problems:
            raise ShardMismatchError(f"{self.root}: key {key!r}: replicas differ:\n  " + "\n  ".join(problems[:20]))
        if not bool(filled.all()):
            raise ShardMismatchError(f"{self.root}: key {key!r}: {int((~filled).sum())} of {filled.numel()} elements "
                                     f"are held by no rank under {_text(self.binding.parallel)}")
        return out

    def close(self) -> None:
        with self._lock:
            self._files = {}


# ---------------------------------------------------------------------------------------------------------------
# The source format ``megatron`` (formats.foreign.registry).


def target_binding(source: MegatronSource, target: "str | Mapping[str, Any]") -> SpecBinding:
    """The source's spec and dims under ``target``, checked (every rank laid out) before anything is written."""
    binding = source.binding.with_parallel(parse_parallel(target))
    for rank in range(binding.world_size):
        binding.rank_layout(rank)
    return binding


def open_megatron(path: str, *, spec: Any, dims: Mapping[str, Any] | None = None,
                  source_layout: "str | Mapping[str, Any] | None" = None,
                  target: "str | Mapping[str, Any] | None" = None, allow_pickle: bool = False) -> MegatronSource:
    """The opener of format ``megatron``: ``MegatronSource(path, spec, dims=, parallel=source_layout)``, retargeted
    to ``target`` when given (checked against the spec before anything is read)."""
    source = MegatronSource(path, spec, dims=dims, parallel=source_layout, allow_pickle=allow_pickle)
    if target is not None:
        try:
            source.retarget(target_binding(source, target))
        except BaseException:
            source.close()
            raise
    return source


def _notes(source: Source) -> SourceNotes:
    """What ``ckpt convert`` reports of a Megatron import: the spec, the files' layout and the target."""
    assert isinstance(source, MegatronSource)
    b, target = source.binding, None if source.target is None else source.target.parallel
    info = {"spec": b.spec.name, "source_layout": b.parallel, "dims": b.dims, "target": target,
            "detected": source.detected, "optimizer": source.has_optimizer}
    return SourceNotes(json={"megatron": info}, label=f" ({_text(b.parallel)}, spec '{b.spec.name}')",
                       written_as=f" as {_text(target)}" if target else "",
                       dry_run=(f"  read under {_text(b.parallel)} with spec '{b.spec.name}'"
                                + (f"; then resharded to {_text(target)}" if target else ""),
                                *([f"  spec detected from the keys: {source.detected}"] if source.detected else []),
                                *([] if source.has_optimizer else ["  model only: the files hold no optimizer state"])))


import resharding.megatron_register  # noqa: E402,F401 - importing the reader registers its format too
