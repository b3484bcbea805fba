"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) read as a ``Source``: ``DeepSpeedSource``.

What ``engine.save_checkpoint(dir, tag)`` writes, for one model-parallel rank (``mp_rank_00``: data parallel only):

* ZeRO-1/2: ``<tag>/mp_rank_00_model_states.pt`` (the module state dict in the training dtype, ``param_shapes``:
  one ordered ``{name: shape}`` per parameter group, frozen parameters, buffers, the LR scheduler, step counters,
  the config and the client state) and one ``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` per DP rank.
  Each parameter group is flattened and cut into one equal partition per rank; a rank's file holds its partition
  of the fp32 master weights (``single_partition_of_fp32_groups``) and of each optimizer state, with
  ``param_slice_mappings`` giving, per parameter name, the (start, numel) fragment it holds. A parameter's
  fragments, in rank order, are its flattened values.
* ZeRO-3: one ``zero_pp_rank_<dp>_mp_rank_00_model_states.pt`` per rank (parameters are empty there; frozen
  parameters as per-rank fragments) and one optimizer file per rank whose flat groups hold, for each parameter in
  ``param_shapes`` order, ``ceil(numel / dp)`` elements: rank ``r`` holds elements ``[r*n, (r+1)*n)`` of it, the
  last rank's tail zero-padded.

The universal keys: ``model/<name>`` the fp32 master weights of trainable parameters (frozen parameters from the
module state cast to fp32 as ``ds_to_universal`` does, buffers as stored), ``optim/state/<name>/<state>``
(``exp_avg``, ``exp_avg_sq``, ``step`` for Adam; any per-element state another optimizer keeps), ``optim/
param_groups`` (hyperparameters, ``params`` by name), which is what ``ckpt.save({"model": m, "optim": opt})``
writes for a torch module and optimizer, so ``ckpt.load`` restores it into one; ``client_state/<key>`` the
client state; ``deepspeed/...`` the step counters, ZeRO stage, DP size, loss scaler, LR scheduler and config.

Nothing is unpickled beyond torch's ``weights_only`` loader: the three DeepSpeed classes these files hold (the loss
scaler, the ZeRO stage enum, the fragment address) are read into inert stand-ins, and any other class is refused
with ``UnsafeCheckpointError`` unless ``allow_pickle=True`` (which needs DeepSpeed installed to import it). Files
are memory-mapped, so converting reads one tensor at a time. Tensor- and pipeline-parallel DeepSpeed checkpoints
(``mp_rank_01``..., ``layer_*-model_states.pt``) are refused: ``ds_to_universal``'s output of them is read by
``formats.foreign.deepspeed_uc`` (``open_deepspeed`` picks the reader).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError,
                         UnsupportedStateError)
from formats import keys as K
from formats.foreign.source import MODEL_PREFIX, Source, TensorInfo, add_parents, flatten_into
from formats.foreign.torch_file import load_restricted
from formats.manifest import ContainerEntry

#: Keys DeepSpeed itself writes at the top of a model-states file; every other key is client state.
ENGINE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "universal_checkpoint_info", "checkpoint_parallel_dimensions", "ds_autoep_layers", "num_experts",
})
#: Plain values of the model-states file carried into ``deepspeed/``.
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "dp_world_size", "mp_world_size", "ds_version")
CLIENT_PREFIX = "client_state"
DS_PREFIX = "deepspeed"
OPTIM_STATE = "optim/state"
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_TAG_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _Opaque:
    """Stand-in for a DeepSpeed object (loss scaler, fragment address): keeps its pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def _zero_stage(value: Any) -> int:
    """Stand-in for ``ZeroStageEnum(value)``: the stage number."""
    return int(value)


#: The DeepSpeed globals found in ZeRO checkpoints and what stands in for them when reading.
STAND_INS: list[tuple[Any, str]] = [
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Opaque, "deepspeed.utils.tensor_fragment.fragment_address"),  # a dataclass (numel, start)
    (_Opaque, "deepspeed.checkpoint.universal_checkpoint.SubparamShape"),  # in ds_to_universal's fp32.pt
]


def load_ds_file(path: str, allow_pickle: bool) -> Any:
    """``torch.load`` one DeepSpeed file, memory-mapped, with the DeepSpeed classes read as stand-ins."""
    if not os.path.isfile(path):
        raise IncompleteCheckpointError(f"{path}: missing; the DeepSpeed checkpoint is incomplete (every rank's "
                                        "file must be present)")
    return load_restricted(path, allow_pickle=allow_pickle, what="DeepSpeed file", stand_ins=STAND_INS,
                           holds=" (and the DeepSpeed loss scaler, ZeRO stage and fragment address)")


def resolve_tag_dir(path: str, tag: str | None = None) -> tuple[str, str]:
    """(tag directory, tag) of a DeepSpeed checkpoint given its root (with ``latest``) or a tag directory."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: not a directory; a DeepSpeed checkpoint is the directory passed to "
                                      "save_checkpoint (with a 'latest' file) or one of its tag directories")
    if tag is None and any(n.endswith("_model_states.pt") for n in os.listdir(path)):
        return path, os.path.basename(path)
    if tag is None:
        latest = os.path.join(path, "latest")
        if not os.path.isfile(latest) and os.path.isfile(os.path.join(path, "latest_universal")):
            latest = os.path.join(path, "latest_universal")  # a universal checkpoint's root
        if not os.path.isfile(latest):
            tags = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
            raise CheckpointNotFoundError(f"{path}: no 'latest' file and no *_model_states.pt; pass the tag directory "
                                          f"itself (found {tags[:10]})")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    if not _TAG_OK.match(tag) or tag in (".", ".."):
        raise CorruptCheckpointError(f"{path}: tag {tag!r} is not a plain directory name; refusing to read outside "
                                     "the checkpoint directory")
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise IncompleteCheckpointError(f"{path}: 'latest' names tag {tag!r}, but {tag_dir} does not exist")
    return tag_dir, tag


@dataclass(frozen=True)
class _Piece:
    """Elements ``[start, start + numel)`` of rank ``rank``'s flat tensor of parameter group ``group``."""

    rank: int
    group: int
    start: int
    numel: int


def add_engine_values(source: Source, main: Mapping[str, Any], optim: Mapping[str, Any], where: str,
                      sink: dict[str, torch.Tensor], **facts: Any) -> None:
    """Flatten into ``source`` the client state (``client_state/...``) and DeepSpeed's own facts (``deepspeed/...``:
    counters, loss scaler, LR scheduler, config) of a model-states file ``main`` and an optimizer state ``optim``;
    ``facts`` override (tag, ZeRO stage, DP size). Tensors among them go to ``sink``."""
    client = {k: v for k, v in main.items() if k not in ENGINE_KEYS}
    if client:
        flatten_into(client, CLIENT_PREFIX, source, where, sink)
    ds: dict[str, Any] = {k: main[k] for k in _COUNTERS if k in main}
    ds.update(facts)
    scaler = optim.get("loss_scaler")
    if isinstance(scaler, _Opaque):
        ds["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                             if v is None or isinstance(v, (bool, int, float, str))}
    for k in ("dynamic_loss_scale", "overflow", "clip_grad"):
        if isinstance(optim.get(k), (bool, int, float)):
            ds[k] = optim[k]
    for k in ("lr_scheduler", "ds_config", "universal_checkpoint_info", "checkpoint_parallel_dimensions"):
        if main.get(k) is not None:
            ds[k] = main[k]
    flatten_into(ds, DS_PREFIX, source, where, sink)


def _model_key(name: str) -> str:
    return MODEL_PREFIX + K.escape(name)


def open_deepspeed(path: str, allow_pickle: bool = False, tag: str | None = None) -> Source:
    """A ZeRO checkpoint (``DeepSpeedSource``) or a universal one (``DeepSpeedUniversalSource``) at ``path``: the
    root passed to ``save_checkpoint`` / ``ds_to_universal``'s parent, or a tag directory."""
    from formats.foreign.deepspeed_uc import DeepSpeedUniversalSource, is_universal_tag_dir

    tag_dir, tag = resolve_tag_dir(path, tag)
    if is_universal_tag_dir(tag_dir) and not any(_OPTIM_FILE.match(n) for n in os.listdir(tag_dir)):
        return DeepSpeedUniversalSource(tag_dir, tag, allow_pickle)
    return DeepSpeedSource(tag_dir, allow_pickle)


class DeepSpeedSource(Source):
    """A DeepSpeed ZeRO-1/2/3 checkpoint (data parallel only), keyed as ``ckpt.save`` keys a module + optimizer."""

    def __init__(self, path: str, allow_pickle: bool = False, tag: str | None = None) -> None:
        super().__init__(path=str(path), format="deepspeed")
        self.tag_dir, self.tag = resolve_tag_dir(self.path, tag)
        self._allow = allow_pickle
        names = sorted(os.listdir(self.tag_dir))
        self._check_supported(names)
        self._optim_files = self._rank_files(names)
        self.dp = len(self._optim_files)
        loaded = self._first_optim  # rank 0's, read while counting the ranks
        self._optim = [loaded[1] if f == loaded[0] else self._field(self._load(f), "optimizer_state_dict", f)
                       for f in self._optim_files]
        stage = self._optim[0].get("zero_stage")
        self.stage = int(stage) if stage is not None else 1
        if self.stage == 3:
            self._model_files = [os.path.join(self.tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                                 for r in range(self.dp)]
        else:
            self._model_files = [os.path.join(self.tag_dir, "mp_rank_00_model_states.pt")]
        self._models = [self._load(f) for f in self._model_files]
        self._reads: dict[str, Any] = {}
        self._build()

    # -- files ------------------------------------------------------------------------------------------------
    def _check_supported(self, names: list[str]) -> None:
        mp = sorted({m.group(3) for n in names if (m := _OPTIM_FILE.match(n))} |
                    {n[len("mp_rank_"):len("mp_rank_") + 2] for n in names if n.startswith("mp_rank_")})
        layer_files = [n for n in names if n.startswith("layer_") and n.endswith("model_states.pt")]
        if len(mp) > 1 or layer_files or any(n.startswith("expp_rank_") for n in names):
            raise UnsupportedStateError(
                f"{self.tag_dir}: a tensor-, pipeline- or expert-parallel DeepSpeed checkpoint (model-parallel ranks "
                f"{mp}, {len(layer_files)} layer files): only data-parallel ZeRO checkpoints are read directly. Run "
                "DeepSpeed's ds_to_universal on it (it merges tensor-parallel slices by the patterns the run recorded "
                "in universal_checkpoint_info), then convert its output (--from deepspeed reads that layout).")
        if not any(_OPTIM_FILE.match(n) for n in names):
            raise UnsupportedStateError(
                f"{self.tag_dir}: no *_optim_states.pt files: not a ZeRO checkpoint (DeepSpeed without ZeRO keeps "
                "the optimizer in mp_rank_00_model_states.pt; convert that file with --from torch --allow-pickle)")

    def _rank_files(self, names: list[str]) -> list[str]:
        by_rank: dict[int, str] = {}
        prefixes = set()
        for n in names:
            m = _OPTIM_FILE.match(n)
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
        missing = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(expected) if r not in by_rank]
        if missing:
            raise IncompleteCheckpointError(
                f"{self.tag_dir}: missing {', '.join(missing)} (the checkpoint was saved by {expected} data-parallel "
                f"ranks; found the files of ranks {sorted(by_rank)}). Copy the missing file(s) or use another tag.")
        return [os.path.join(self.tag_dir, by_rank[r]) for r in range(expected)]

    def _load(self, path: str) -> Any:
        obj = load_ds_file(path, self._allow)
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
            self._add(_model_key(name), torch.float32, shape, ("flat", "fp32", pieces[name]))
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
        """Per group: state name -> ("flat", dtype) or ("whole", tensor shared by the group); fp32 partitions."""
        states, fp32 = [], []
        self._flat: list[dict[str, list[torch.Tensor]]] = []  # per rank: state name -> per group flat tensor
        for r, (osd, f) in enumerate(zip(self._optim, self._optim_files)):
            if self.stage == 3:
                base = self._field(self._field(osd, "optimizer_state_dict", f), "state", f)
                groups = self._field(osd, "fp32_flat_groups", f)
            else:
                base = self._field(self._field(osd, "base_optimizer_state", f), "state", f)
                groups = self._field(osd, "single_partition_of_fp32_groups", f)
            fp32.append(list(groups))
            flat: dict[str, list[Any]] = {"fp32": list(groups)}
            rank_states = []
            for g in range(len(groups)):
                st = base.get(g, {}) if isinstance(base, Mapping) else base[g]
                kinds: dict[str, Any] = {}
                for skey, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == groups[g].numel():
                        kinds[skey] = ("flat", v.dtype)
                        flat.setdefault(skey, [None] * len(groups))[g] = v
                    elif isinstance(v, torch.Tensor) and v.dim() == 0:
                        kinds[skey] = ("whole", v)
                    else:
                        raise UnsupportedStateError(
                            f"{f}: optimizer state {skey!r} of group {g} is {type(v).__name__} "
                            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}; expected a flat partition of "
                            f"{groups[g].numel()} elements or a scalar tensor")
                rank_states.append(kinds)
            self._flat.append(flat)
            states.append(rank_states)
        for r in range(1, len(states)):  # same state names; scalars (the step) equal on every rank
            for g, (a, b) in enumerate(zip(states[0], states[r])):
                if set(a) != set(b):
                    raise CorruptCheckpointError(f"{self._optim_files[r]}: group {g} holds optimizer states "
                                                 f"{sorted(b)}, rank 0 holds {sorted(a)}")
                for skey, kind in a.items():
                    if kind[0] == "whole" and not torch.equal(kind[1], b[skey][1]):
                        raise CorruptCheckpointError(
                            f"{self._optim_files[r]}: group {g} {skey!r} is {b[skey][1].item()}, rank 0 has "
                            f"{kind[1].item()}; the ranks were saved at different steps")
        return states[0], fp32

    def _pieces(self, group_names: list[list[str]]) -> dict[str, list[_Piece]]:
        out: dict[str, list[_Piece]] = {}
        if self.stage == 3:
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
                                                     f"its parameters need {offset}")
        else:
            for r, (osd, f) in enumerate(zip(self._optim, self._optim_files)):
                for g, mapping in enumerate(self._field(osd, "param_slice_mappings", f)):
                    for name, addr in mapping.items():
                        if name not in self._shapes:
                            raise CorruptCheckpointError(f"{f}: parameter {name!r} has a fragment but no shape in "
                                                         f"{self._model_files[0]}")
                        out.setdefault(name, []).append(_Piece(r, g, int(addr.start), int(addr.numel)))
        for name, shape in self._shapes.items():
            got = sum(p.numel for p in out.get(name, []))
            if got != math.prod(shape):
                raise CorruptCheckpointError(
                    f"{self.tag_dir}: parameter {name!r} of shape {list(shape)} needs {math.prod(shape)} elements; "
                    f"the {self.dp} optimizer files hold {got}")
        return out

    def _frozen_and_buffers(self, main: Mapping[str, Any], mfile: str) -> None:
        module = self._field(main, "module", mfile) or {}
        buffers = set(main.get("buffer_names") or [])
        frozen_shapes = dict(main.get("frozen_param_shapes") or {})
        for name, t in module.items():
            key = _model_key(name)
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
                self._add(_model_key(name), dt, shape, ("frozen3", frags))
        for alias, target in (main.get("shared_params") or {}).items():
            tkey, akey = _model_key(target), _model_key(alias)
            if akey not in self.tensors and tkey in self.tensors:
                info = self.tensors[tkey]
                self._add(akey, info.dtype, info.shape, ("alias", tkey))

    def _param_groups(self, group_names: list[list[str]]) -> None:
        osd, f = self._optim[0], self._optim_files[0]
        inner = osd["optimizer_state_dict"] if self.stage == 3 else osd["base_optimizer_state"]
        groups = self._field(inner, "param_groups", f)
        plain = []
        for g, group in enumerate(groups):
            hp = {k: v for k, v in group.items() if k != "params"}
            hp["params"] = list(group_names[g]) if g < len(group_names) else []
            plain.append(hp)
        flatten_into(plain, "optim/param_groups", self, f, {})
        self.containers.setdefault("optim", ContainerEntry("optim", "dict"))

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

