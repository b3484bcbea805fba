"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) read as a ``Source``: ``DeepSpeedSource``.

What ``engine.save_checkpoint(dir, tag)`` writes, for one model-parallel rank (``mp_rank_00``: data parallel only):

* ZeRO-1/2: ``<tag>/mp_rank_00_model_states.pt`` (the module state dict in the training dtype, ``param_shapes``:
  one ordered ``{name: shape}`` per parameter group, frozen parameters, buffers, the LR scheduler, step counters,
  the config and the client state) and one ``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` per DP rank.
  Each parameter group is flattened and cut into one equal partition per rank; a rank's file holds its partition
  of the fp32 master weights (``single_partition_of_fp32_groups``) and of each optimizer state, with
  ``param_slice_mappings`` giving, per parameter name, the (start, numel) fragment it holds. A parameter's
  fragments, in rank order, are its flattened values. A group is padded to a multiple of ``2 x dp`` elements
  (``nccl_start_alignment_factor``), the padding falling in the last partitions; each rank records its share in
  ``group_paddings``. The ZeRO optimizer saves its fp32 partition without that padding and the moments with it;
  DeepSpeed's BF16 optimizer keeps it in both. ``parameter_alignment`` also leaves gaps between parameters, which
  only the fragments show. So the importer reads positions from the fragments and checks lengths against
  ``group_paddings``; it assumes no size.
* ZeRO-3: one ``zero_pp_rank_<dp>_mp_rank_00_model_states.pt`` per rank (parameters are empty there; frozen
  parameters as per-rank fragments) and one optimizer file per rank whose flat groups hold, for each parameter in
  ``param_shapes`` order, ``ceil(numel / dp)`` elements: rank ``r`` holds elements ``[r*n, (r+1)*n)`` of it, the
  last rank's tail zero-padded. A flat group is a sub-group of at most ``sub_group_size`` elements per rank, so
  one parameter group may span several; ``param_shapes`` has one entry per sub-group and the optimizer's
  ``param_groups`` list their indices.

The universal keys: ``model/<name>`` the fp32 master weights of trainable parameters (frozen parameters from the
module state cast to fp32 as ``ds_to_universal`` does, buffers as stored), ``optim/state/<name>/<state>``
(``exp_avg``, ``exp_avg_sq``, ``step`` for Adam; any per-element state another optimizer keeps), ``optim/
param_groups`` (hyperparameters, ``params`` by name), which is what ``ckpt.save({"model": m, "optim": opt})``
writes for a torch module and optimizer, so ``ckpt.load`` restores it into one; ``client_state/<key>`` the
client state; ``deepspeed/...`` the step counters, ZeRO stage, DP size, loss scaler, LR scheduler and config.

Nothing is unpickled beyond torch's ``weights_only`` loader (``deepspeed_files.load_ds_file``): the DeepSpeed classes
these files hold are read into inert stand-ins, and any other class is refused with ``UnsafeCheckpointError`` unless
``allow_pickle=True`` (which needs DeepSpeed installed to import it). Elastic checkpoints
(``elastic_checkpoint: true``) keep no optimizer hyperparameters and are refused with what to do. Files
are memory-mapped, so converting reads one tensor at a time. Pipeline- and tensor-parallel DeepSpeed checkpoints
(``mp_rank_01``..., ``layer_*-model_states.pt``) are read by ``formats.foreign.deepspeed_mp``, one ``DeepSpeedSource``
per model-parallel rank (``mp_rank=``); ``ds_to_universal``'s output by ``formats.foreign.deepspeed_uc``
(``open_deepspeed`` picks the reader).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, UnsupportedStateError
from formats import keys as K
from formats.foreign.deepspeed_files import (LAYER_FILE, OPTIM_FILE, OPTIM_STATE, add_engine_values,
                                             add_param_groups, model_parallel_ranks,
                                             load_ds_file, malformed_fields, model_key, resolve_tag_dir,
                                             zero_stage_of)
from formats.foreign.source import Source, TensorInfo, add_parents


@dataclass(frozen=True)
class _Piece:
    """Elements ``[start, start + numel)`` of rank ``rank``'s flat tensor of parameter group ``group``."""

    rank: int
    group: int
    start: int
    numel: int


def open_deepspeed(path: str, allow_pickle: bool = False, tag: str | None = None) -> Source:
    """A ZeRO checkpoint (``DeepSpeedSource``) or a universal one (``DeepSpeedUniversalSource``) at ``path``: the
    root passed to ``save_checkpoint`` / ``ds_to_universal``'s parent, or a tag directory."""
    from formats.foreign.deepspeed_uc import DeepSpeedUniversalSource, is_universal_tag_dir

    tag_dir, tag = resolve_tag_dir(path, tag)
    names = os.listdir(tag_dir)
    if is_universal_tag_dir(tag_dir) and not any(OPTIM_FILE.match(n) for n in names):
        return DeepSpeedUniversalSource(tag_dir, tag, allow_pickle)
    if model_parallel_ranks(names) != ["00"] or any(LAYER_FILE.match(n) for n in names):
        from formats.foreign.deepspeed_mp import DeepSpeedModelParallelSource

        return DeepSpeedModelParallelSource(tag_dir, allow_pickle)
    return DeepSpeedSource(tag_dir, allow_pickle)


class DeepSpeedSource(Source):
    """A DeepSpeed ZeRO-1/2/3 checkpoint (data parallel only), keyed as ``ckpt.save`` keys a module + optimizer.

    ``mp_rank`` reads the files of one model-parallel rank (a pipeline stage or a tensor-parallel slice) of a
    larger checkpoint instead: ``formats.foreign.deepspeed_mp`` combines them."""

    def __init__(self, path: str, allow_pickle: bool = False, tag: str | None = None,
                 mp_rank: int | None = None) -> None:
        super().__init__(path=str(path), format="deepspeed")
        self.mp_rank = mp_rank
        self._mp = f"{mp_rank or 0:02d}"
        with malformed_fields(self.path):
            self._open(allow_pickle, tag)

    def _open(self, allow_pickle: bool, tag: str | None) -> None:
        self.tag_dir, self.tag = resolve_tag_dir(self.path, tag)
        self._allow = allow_pickle
        names = sorted(os.listdir(self.tag_dir))
        if self.mp_rank is None:
            self._check_supported(names)
        else:
            names = [n for n in names if (m := OPTIM_FILE.match(n)) is None or m.group(3) == self._mp]
            if not any(OPTIM_FILE.match(n) for n in names):
                raise IncompleteCheckpointError(f"{self.tag_dir}: no *_mp_rank_{self._mp}_optim_states.pt file; every "
                                                "model-parallel rank's optimizer files must be present")
        self._optim_files = self._rank_files(names)
        self.dp = len(self._optim_files)
        loaded = self._first_optim  # rank 0's, read while counting the ranks
        self._optim = [loaded[1] if f == loaded[0] else self._field(self._load(f), "optimizer_state_dict", f)
                       for f in self._optim_files]
        recorded = self._optim[0].get("zero_stage")  # ZeRO-3 always records it; the BF16 optimizer never does
        if recorded is not None and int(recorded) == 3:
            self._model_files = [os.path.join(self.tag_dir, f"zero_pp_rank_{r}_mp_rank_{self._mp}_model_states.pt")
                                 for r in range(self.dp)]
        else:
            self._model_files = [os.path.join(self.tag_dir, f"mp_rank_{self._mp}_model_states.pt")]
        self._models = [self._load(f) for f in self._model_files]
        self.stage = zero_stage_of(self._optim[0], self._models[0]) or 1
        self._reads: dict[str, Any] = {}
        self._build()

    # -- files ------------------------------------------------------------------------------------------------
    def _check_supported(self, names: list[str]) -> None:
        mp = model_parallel_ranks(names)
        layer_files = [n for n in names if LAYER_FILE.match(n)]
        if len(mp) > 1 or layer_files:
            raise UnsupportedStateError(
                f"{self.tag_dir}: a tensor- or pipeline-parallel DeepSpeed checkpoint (model-parallel ranks {mp}, "
                f"{len(layer_files)} layer files): open it with open_deepspeed (ckpt convert --from deepspeed), "
                "which reads every model-parallel rank")
        if any(n.startswith("expp_rank_") for n in names):
            raise UnsupportedStateError(
                f"{self.tag_dir}: an expert-parallel DeepSpeed checkpoint (expp_rank_* files): not read directly. "
                "Run DeepSpeed's ds_to_universal on it, then convert its output (--from deepspeed reads that layout).")
        if not any(OPTIM_FILE.match(n) for n in names):
            raise UnsupportedStateError(
                f"{self.tag_dir}: no *_optim_states.pt files: not a ZeRO checkpoint (DeepSpeed without ZeRO keeps "
                "the optimizer in mp_rank_00_model_states.pt; convert that file with --from torch --allow-pickle)")

    def _rank_files(self, names: list[str]) -> list[str]:
        by_rank: dict[int, str] = {}
        prefixes = set()
        for n in names:
            m = OPTIM_FILE.match(n)
            if m:
                by_rank[int(m.group(2))] = n
                prefixes.add(m.group(1) or "")
        path = os.path.join(self.tag_dir, by_rank[min(by_rank)])
        first = self._field(self._load(path), "optimizer_state_dict", path)
        self._first_optim = (path, first)
        count = first.get("partition_count")
        expected = max(count) if isinstance(count, (list, tuple)) else int(count or len(by_rank))
        expected = max(expected, max(by_rank) + 1)
        prefix = prefixes.pop() if len(prefixes) == 1 else ""
        missing = [f"{prefix}zero_pp_rank_{r}_mp_rank_{self._mp}_optim_states.pt" for r in range(expected) if r not in by_rank]
        if missing:
            raise IncompleteCheckpointError(
                f"{self.tag_dir}: missing {', '.join(missing)} (the checkpoint was saved by {expected} data-parallel "
                f"ranks; found the files of ranks {sorted(by_rank)}). Copy the missing file(s) or use another tag.")
        return [os.path.join(self.tag_dir, by_rank[r]) for r in range(expected)]

    def _load(self, path: str) -> Any:
        obj = load_ds_file(path, self._allow, self.tag_dir)
        if not isinstance(obj, dict):
            raise CorruptCheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
        return obj

    def _field(self, obj: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise CorruptCheckpointError(f"{where}: key {key!r} is missing (found {sorted(map(str, obj))[:12]}); "
                                         "not a DeepSpeed ZeRO checkpoint of a supported version")
        return obj[key]

    # -- the table ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        main, mfile = self._models[0], self._model_files[0]
        shapes = self._field(main, "param_shapes", mfile)
        if not isinstance(shapes, (list, tuple)):
            raise CorruptCheckpointError(f"{mfile}: param_shapes is {type(shapes).__name__}, expected a list of dicts")
        group_names = [list(g.keys()) for g in shapes]
        self._shapes = {n: tuple(int(s) for s in shp) for g in shapes for n, shp in g.items()}
        opt_states, fp32 = self._optimizer_tables()
        if len(group_names) != len(fp32[0]):
            raise CorruptCheckpointError(f"{self._optim_files[0]}: {len(fp32[0])} flat parameter groups, but "
                                         f"{mfile} lists {len(group_names)} groups in param_shapes")
        pieces = self._pieces(group_names)
        for name, shape in self._shapes.items():
            self._add(model_key(name), torch.float32, shape, ("flat", "fp32", pieces[name]))
        for g, gnames in enumerate(group_names):
            for skey, kind in opt_states[g].items():
                for name in gnames:
                    key = K.join(K.join(OPTIM_STATE, K.escape(name)), K.escape(str(skey)))
                    if kind[0] == "flat":
                        self._add(key, kind[1], self._shapes[name], ("flat", skey, pieces[name]))
                    else:
                        self._add(key, kind[1].dtype, tuple(kind[1].shape), ("whole", kind[1]))
        self._frozen_and_buffers(main, mfile)
        self._param_groups(group_names)
        self._metadata(main, mfile)

    def _add(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], how: Any) -> None:
        self.tensors[key] = TensorInfo.whole(key, dtype, shape)
        self._reads[key] = how
        add_parents(key, self.containers)

    def _optimizer_tables(self) -> tuple[list[dict[str, Any]], list[list[torch.Tensor]]]:
        """Per flat group: state name -> ("flat", dtype) or ("whole", tensor shared by the group); fp32 partitions.

        A flat group is a parameter group under ZeRO-1/2 and a sub-group (``sub_group_size``) under ZeRO-3. How
        long each rank's flat state is comes from the rank's own records: ZeRO-1/2 pad every group to
        ``nccl_start_alignment_factor x dp`` elements, the padding falling in the last partitions, and record it per
        rank in ``group_paddings``; the ZeRO optimizer saves its fp32 partition without that padding and the base
        optimizer's state with it, the BF16 optimizer both with it.
        Which elements hold a parameter is read from ``param_slice_mappings`` (``_pieces``), never assumed."""
        states, fp32 = [], []
        self._flat: list[dict[str, list[torch.Tensor]]] = []  # per rank: state name -> per group flat tensor
        for osd, f in zip(self._optim, self._optim_files):
            groups = list(self._field(osd, "fp32_flat_groups" if self.stage == 3 else
                                      "single_partition_of_fp32_groups", f))
            base = self._base_states(osd, f, len(groups))
            paddings = self._group_paddings(osd, f, len(groups))
            fp32.append(groups)
            flat: dict[str, list[Any]] = {"fp32": groups}
            rank_states = []
            for g, (st, pad) in enumerate(zip(base, paddings)):
                have = groups[g].numel()
                kinds: dict[str, Any] = {}
                for skey, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() in (have, have + pad):
                        kinds[skey] = ("flat", v.dtype)
                        flat.setdefault(skey, [None] * len(groups))[g] = v
                    elif isinstance(v, torch.Tensor) and v.dim() == 0:
                        kinds[skey] = ("whole", v)
                    elif isinstance(v, torch.Tensor) and v.dim() == 1:  # a flat state of the wrong length
                        padded = f" or {have + pad} (with the padding of {pad} its group_paddings records)" \
                            if pad else ""
                        raise CorruptCheckpointError(
                            f"{f}: optimizer state {skey!r} of group {g} holds {v.numel()} elements; expected "
                            f"{have} (the rank's fp32 partition){padded}. The file is inconsistent: was it written "
                            "by another run or cut?")
                    else:
                        raise UnsupportedStateError(
                            f"{f}: optimizer state {skey!r} of group {g} is {type(v).__name__} "
                            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}; expected a flat partition of "
                            f"{have} elements or a scalar tensor")
                rank_states.append(kinds)
            self._flat.append(flat)
            states.append(rank_states)
        self._check_ranks_agree(states)
        return states[0], fp32

    def _base_states(self, osd: Mapping[str, Any], f: str, n_groups: int) -> list[Mapping[str, Any]]:
        """The base optimizer's state of each flat group of one rank's file, from torch's ``state_dict()["state"]``
        (keyed by group index; a group without state yet maps to ``{}``)."""
        if self.stage == 3:
            base = self._field(self._field(osd, "optimizer_state_dict", f), "state", f)
        else:
            base = self._field(osd, "base_optimizer_state", f)
            if isinstance(base, (list, tuple)):
                raise UnsupportedStateError(
                    f"{f}: an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint: true) keeps one lean "
                    "state per group and no param_groups, so its hyperparameters are lost (ds_to_universal refuses "
                    "it too). Load it in DeepSpeed and save it again with elastic_checkpoint false, then convert.")
            base = self._field(base, "state", f)
        if not isinstance(base, Mapping):
            raise CorruptCheckpointError(f"{f}: the base optimizer state is {type(base).__name__}; expected torch's "
                                         "optimizer state dict (a dict keyed by group index)")
        return [base.get(g, {}) for g in range(n_groups)]

    def _group_paddings(self, osd: Mapping[str, Any], f: str, n_groups: int) -> list[int]:
        """``group_paddings`` of one rank (ZeRO-1/2): the padding elements at the end of its partition of each group.
        ZeRO-3 pads each parameter instead (``_pieces``): zeros."""
        pads = osd.get("group_paddings") if self.stage < 3 else None
        if pads is None:
            return [0] * n_groups
        if (not isinstance(pads, (list, tuple)) or len(pads) != n_groups
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pads)):
            raise CorruptCheckpointError(f"{f}: group_paddings is {pads!r}; expected {n_groups} non-negative "
                                         "integers, one per parameter group")
        return list(pads)

    def _check_ranks_agree(self, states: list[list[dict[str, Any]]]) -> None:
        """Every rank holds the same state names per group, and the same scalars (the step)."""
        for r in range(1, len(states)):
            if len(states[r]) != len(states[0]):
                raise CorruptCheckpointError(f"{self._optim_files[r]}: {len(states[r])} flat groups, rank 0 holds "
                                             f"{len(states[0])}")
            for g, (a, b) in enumerate(zip(states[0], states[r])):
                if set(a) != set(b):
                    raise CorruptCheckpointError(f"{self._optim_files[r]}: group {g} holds optimizer states "
                                                 f"{sorted(b)}, rank 0 holds {sorted(a)}")
                for skey, kind in a.items():
                    if kind[0] == "whole" and not torch.equal(kind[1], b[skey][1]):
                        raise CorruptCheckpointError(
                            f"{self._optim_files[r]}: group {g} {skey!r} is {b[skey][1].item()}, rank 0 has "
                            f"{kind[1].item()}; the ranks were saved at different steps")

    def _pieces(self, group_names: list[list[str]]) -> dict[str, list[_Piece]]:
        out = self._pieces_zero3(group_names) if self.stage == 3 else self._pieces_zero12()
        for name, shape in self._shapes.items():
            got = sum(p.numel for p in out.get(name, []))
            if got != math.prod(shape):
                raise CorruptCheckpointError(
                    f"{self.tag_dir}: parameter {name!r} of shape {list(shape)} needs {math.prod(shape)} elements; "
                    f"the {self.dp} optimizer files hold {got}")
        return out

    def _pieces_zero3(self, group_names: list[list[str]]) -> dict[str, list[_Piece]]:
        """ZeRO-3: each parameter of a sub-group takes ``ceil(numel / dp)`` elements of every rank's flat
        partition, in ``param_shapes`` order; the last ranks' share is zero padding."""
        out: dict[str, list[_Piece]] = {}
        for g, gnames in enumerate(group_names):
            offset = 0
            for name in gnames:
                numel = math.prod(self._shapes[name])
                per = math.ceil(numel / self.dp)
                out[name] = [_Piece(r, g, offset, max(0, min(per, numel - r * per))) for r in range(self.dp)]
                offset += per
            for r in range(self.dp):
                have = self._flat[r]["fp32"][g].numel()
                if have < offset:
                    raise CorruptCheckpointError(f"{self._optim_files[r]}: flat group {g} holds {have} elements; "
                                                 f"its parameters {gnames} need {offset} (ceil(numel / {self.dp}) "
                                                 "each)")
        return out

    def _pieces_zero12(self) -> dict[str, list[_Piece]]:
        """ZeRO-1/2: the fragments ``param_slice_mappings`` records, each checked to lie inside its rank's flat
        tensors and not to overlap another (``parameter_alignment`` leaves gaps between them, which is fine)."""
        out: dict[str, list[_Piece]] = {}
        for r, (osd, f) in enumerate(zip(self._optim, self._optim_files)):
            mappings = self._field(osd, "param_slice_mappings", f)
            if not isinstance(mappings, (list, tuple)) or len(mappings) != len(self._flat[r]["fp32"]):
                raise CorruptCheckpointError(f"{f}: param_slice_mappings holds "
                                             f"{len(mappings) if isinstance(mappings, (list, tuple)) else '?'} groups;"
                                             f" the file has {len(self._flat[r]['fp32'])} flat groups")
            for g, mapping in enumerate(mappings):
                limit = min(t[g].numel() for t in self._flat[r].values() if t[g] is not None)
                end = 0
                for name, addr in sorted(mapping.items(), key=lambda kv: int(kv[1].start)):
                    if name not in self._shapes:
                        raise CorruptCheckpointError(f"{f}: parameter {name!r} has a fragment but no shape in "
                                                     f"{self._model_files[0]}")
                    piece = _Piece(r, g, int(addr.start), int(addr.numel))
                    if piece.start < end or piece.numel < 0 or piece.start + piece.numel > limit:
                        raise CorruptCheckpointError(
                            f"{f}: the fragment of {name!r} in group {g} is elements [{piece.start}, "
                            f"{piece.start + piece.numel}); expected inside [{end}, {limit}) (after the previous "
                            f"fragment, within the rank's flat partition of {limit} elements)")
                    end = piece.start + piece.numel
                    out.setdefault(name, []).append(piece)
        return out

    def _frozen_and_buffers(self, main: Mapping[str, Any], mfile: str) -> None:
        module = self._field(main, "module", mfile) or {}
        buffers = set(main.get("buffer_names") or [])
        frozen_shapes = dict(main.get("frozen_param_shapes") or {})
        for name, t in module.items():
            key = model_key(name)
            if key in self.tensors or not isinstance(t, torch.Tensor):
                continue
            if name in buffers:
                self._add(key, t.dtype, tuple(t.shape), ("whole", t))
            elif self.stage == 3 and name in frozen_shapes:
                continue  # below, from the per-rank fragments
            else:  # a frozen parameter, whole in the module state: fp32 like the master weights
                dt = torch.float32 if t.is_floating_point() else t.dtype
                self._add(key, dt, tuple(t.shape), ("whole", t))
        if self.stage == 3:
            for name, shape in frozen_shapes.items():
                frags = [m.get("frozen_param_fragments", {}).get(name) for m in self._models]
                if any(f is None for f in frags):
                    raise CorruptCheckpointError(f"{self.tag_dir}: frozen parameter {name!r} has no fragment in every "
                                                 "zero_pp_rank_*_model_states.pt")
                shape = tuple(int(s) for s in shape)
                dt = torch.float32 if frags[0].is_floating_point() else frags[0].dtype
                self._add(model_key(name), dt, shape, ("frozen3", frags))
        for alias, target in (main.get("shared_params") or {}).items():
            tkey, akey = model_key(target), model_key(alias)
            if akey not in self.tensors and tkey in self.tensors:
                info = self.tensors[tkey]
                self._add(akey, info.dtype, info.shape, ("alias", tkey))

    def _param_groups(self, group_names: list[list[str]]) -> None:
        osd, f = self._optim[0], self._optim_files[0]
        inner = osd["optimizer_state_dict"] if self.stage == 3 else osd["base_optimizer_state"]
        self.param_group_dicts = add_param_groups(self, self._field(inner, "param_groups", f), group_names, f)

    def _metadata(self, main: Mapping[str, Any], mfile: str) -> None:
        add_engine_values(self, main, self._optim[0], mfile, _WholeTensors(self._reads),
                          tag=self.tag, zero_stage=self.stage, dp_world_size=self.dp)
        self.metadata["deepspeed"] = {"tag": self.tag, "zero_stage": self.stage, "dp_world_size": self.dp}

    # -- reading ------------------------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        how = self._reads[key]
        info = self.tensors[key]
        if how[0] == "whole":
            t = how[1]
            return t if t.dtype == info.dtype else t.to(info.dtype)
        if how[0] == "alias":
            return self.read(how[1])
        if how[0] == "frozen3":
            flat = torch.cat([f.reshape(-1) for f in how[1]])[:info.numel]
            return flat.view(info.shape).to(info.dtype)
        _, skey, pieces = how
        parts = [self._flat[p.rank][skey][p.group].narrow(0, p.start, p.numel) for p in pieces if p.numel]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, dtype=info.dtype)
        return flat.view(info.shape)

    def close(self) -> None:
        self._optim, self._models, self._flat, self._reads = [], [], [], {}


class _WholeTensors(dict):
    """The ``tensors`` sink of ``flatten_into`` for client state and metadata: records how to read each tensor."""

    def __init__(self, reads: dict[str, Any]) -> None:
        super().__init__()
        self._reads = reads

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._reads[key] = ("whole", value)

