"""Pipeline- and tensor-parallel DeepSpeed checkpoints read as one ``Source``: ``DeepSpeedModelParallelSource``.

What ``engine.save_checkpoint`` writes for a run of ``pp`` pipeline stages x ``tp`` tensor-parallel ranks x ``dp``
data-parallel ranks (a ``PipelineModule``, or a module whose engine got an ``mpu``):

* one ZeRO-1/2 layout per *model-parallel rank* ``m = stage * tp + tp_rank`` (pipeline-stage major, as DeepSpeed's
  own ``ds_to_universal`` reads it): ``mp_rank_<m>_model_states.pt`` and ``zero_pp_rank_<d>_mp_rank_<m>_optim_
  states.pt``, each exactly what a data-parallel run writes, over the parameters that rank holds. ZeRO-3 (with an
  ``mpu``, no pipeline) writes ``zero_pp_rank_<d>_mp_rank_<m>_model_states.pt`` instead. Each is read by
  ``DeepSpeedSource(..., mp_rank=m)``.
* a pipeline run's module weights live in ``layer_<idx>[-model_<tp>]-model_states.pt``, one file per layer (of one
  tensor-parallel rank), keyed by the layer's own names (``l.weight``); the model-states files hold
  ``module: None``. Parameters are named by the ``PipelineModule``: ``<idx>.<name>`` (``3.l.weight``, global layer
  numbers) and ``tied_modules.<key>.<name>`` for a ``TiedLayerSpec`` (stored by every stage that uses it, once
  in each stage's optimizer; its first layer's file holds it, the later uses write no file).
* ``checkpoint_parallel_dimensions`` in the model-states files records ``pp_degree`` and ``tp_degree``.

How they become one checkpoint (the keys are ``DeepSpeedSource``'s: ``model/<name>``, ``optim/state/<name>/...``,
``optim/param_groups``, ``client_state/...``, ``deepspeed/...``):

* The stages' parameters are disjoint except tied ones. A tied parameter's copies (weights and moments) must be
  bit-identical, which DeepSpeed keeps by all-reducing their gradients; each read checks it and raises
  ``CorruptCheckpointError`` naming both files otherwise.
* Tensor-parallel slices merge by the patterns the run recorded in ``universal_checkpoint_info`` (Megatron-
  DeepSpeed records them; so may any model), with the meaning ``ds_to_universal`` gives them:
  ``tp_replicated_parameter_patterns`` (one copy, checked equal), ``parameter_to_average_patterns`` (the mean),
  ``parameter_with_row_parallelism_patterns`` (concatenated on dim 1), ``parameter_with_2_sub_params_cat_dim_0``
  (two halves, each concatenated on dim 0: SwiGLU), ``vocabulary_parameter_patterns`` (concatenated on dim 0, the
  padding rows past ``original_vocab_size`` dropped), anything else concatenated on dim 0 (column parallel).
  Fused sub-parameters (``parameter_with_sub_params``) and affine maps are refused with what to do. A
  tensor-parallel checkpoint without ``universal_checkpoint_info`` is refused: nothing in its files says which
  dimension each parameter was split on.
* Parameter groups: group ``g`` of the result is group ``g`` of every stage, its parameters in stage order;
  hyperparameters must agree across stages. Step counters, client state and DeepSpeed's counters come from stage 0
  and must agree across stages.
* Frozen parameters and buffers of a pipeline run come from the layer files (``ds_to_universal`` leaves them out);
  a layer file entry that maps to no parameter or buffer the run recorded raises ``UnsupportedStateError``, so
  nothing is dropped silently.

Reading is lazy and streams like ``DeepSpeedSource``: every file is memory-mapped, and a tensor is assembled from its
slices when it is read.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, UnsupportedStateError
from formats import keys as K
from formats.foreign.deepspeed import DeepSpeedSource
from formats.foreign.deepspeed_files import (LAYER_FILE, OPTIM_STATE, load_ds_file, malformed_fields, model_key,
                                             model_parallel_ranks, resolve_tag_dir)
from formats.foreign.source import MODEL_PREFIX, Source, TensorInfo, add_parents, flatten_into

_REPLICATED = "tp_replicated_parameter_patterns"
_AVERAGE = "parameter_to_average_patterns"
_ROW = "parameter_with_row_parallelism_patterns"
_VOCAB = "vocabulary_parameter_patterns"
_TWO_SUB = "parameter_with_2_sub_params_cat_dim_0"
_SUB_PARAMS = "parameter_with_sub_params"
_AFFINE = "affine_map"
UC_INFO = "universal_checkpoint_info"
PARAM_GROUPS = "optim/param_groups"


def _name_of(key: str) -> tuple[str, str | None]:
    """(parameter name, optimizer state name or None) of a ``model/...`` or ``optim/state/...`` key."""
    if key.startswith(MODEL_PREFIX):
        return K.unescape(key[len(MODEL_PREFIX):]), None
    name, state = key[len(OPTIM_STATE) + 1:].split("/")
    return K.unescape(name), K.unescape(state)


class DeepSpeedModelParallelSource(Source):
    """A pipeline- and/or tensor-parallel DeepSpeed ZeRO checkpoint (with data parallelism on top) as one logical
    checkpoint; see the module docstring."""

    def __init__(self, path: str, allow_pickle: bool = False, tag: str | None = None) -> None:
        super().__init__(path=str(path), format="deepspeed")
        with malformed_fields(self.path):
            self._open(allow_pickle, tag)

    # -- opening --------------------------------------------------------------------------------------------------
    def _open(self, allow_pickle: bool, tag: str | None) -> None:
        self.tag_dir, self.tag = resolve_tag_dir(self.path, tag)
        self._allow = allow_pickle
        names = sorted(os.listdir(self.tag_dir))
        if any(n.startswith("expp_rank_") for n in names):
            raise UnsupportedStateError(
                f"{self.tag_dir}: an expert-parallel DeepSpeed checkpoint (expp_rank_* files): not read directly. "
                "Run DeepSpeed's ds_to_universal on it, then convert its output (--from deepspeed reads that layout).")
        mps = [int(m) for m in model_parallel_ranks(names)]
        if mps != list(range(len(mps))):
            missing = sorted(set(range(max(mps) + 1)) - set(mps))
            raise IncompleteCheckpointError(f"{self.tag_dir}: the files of model-parallel rank(s) {missing} are "
                                            f"missing (found ranks {mps}); every stage's files must be present")
        self.ranks = [DeepSpeedSource(self.tag_dir, allow_pickle, mp_rank=m) for m in mps]
        self.pp, self.tp = self._degrees(len(mps), names)
        main = self.ranks[0]._models[0]
        self.uc_info = main.get(UC_INFO) if isinstance(main.get(UC_INFO), Mapping) else {}
        if self.tp > 1 and not self.uc_info:
            raise UnsupportedStateError(
                f"{self.tag_dir}: a tensor-parallel DeepSpeed checkpoint (tp_degree {self.tp}) without "
                f"{UC_INFO}: nothing in its files says which dimension each parameter was split on. Record it on "
                "the model before deepspeed.initialize (Megatron-DeepSpeed does: model.universal_checkpoint_info = "
                "{...patterns...}), as ds_to_universal needs too")
        self._layer_files = self._index_layer_files(names)
        self._reads: dict[str, Any] = {}
        self._layer_tensors: dict[tuple[str, str], torch.Tensor] = {}
        self._check_stages_agree()
        self._parameters()
        self._frozen_and_buffers()
        self._values()
        self.metadata["deepspeed"] = {"tag": self.tag, "zero_stage": self.ranks[0].stage, "dp_world_size":
                                      self.ranks[0].dp, "pp_degree": self.pp, "tp_degree": self.tp}

    def _degrees(self, n: int, names: list[str]) -> tuple[int, int]:
        """(pipeline, tensor-parallel) degree: what the files record, else pipeline if there are layer files."""
        dims = self.ranks[0]._models[0].get("checkpoint_parallel_dimensions")
        if isinstance(dims, Mapping) and isinstance(dims.get("pp_degree"), int) and isinstance(
                dims.get("tp_degree"), int):
            pp, tp = int(dims["pp_degree"]), int(dims["tp_degree"])
        elif any(LAYER_FILE.match(f) for f in names):
            tps = {int(m.group(2) or 0) for f in names if (m := LAYER_FILE.match(f))}
            tp = len(tps)
            pp = n // tp
        else:
            pp, tp = 1, n
        if pp < 1 or tp < 1 or pp * tp != n:
            raise CorruptCheckpointError(f"{self.tag_dir}: {n} model-parallel ranks, but the files record "
                                         f"pp_degree {pp} x tp_degree {tp}")
        return pp, tp

    def _index_layer_files(self, names: list[str]) -> dict[tuple[int, int], str]:
        out: dict[tuple[int, int], str] = {}
        for n in names:
            m = LAYER_FILE.match(n)
            if m:
                out[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(self.tag_dir, n)
        return out

    def _rank(self, stage: int, t: int) -> DeepSpeedSource:
        return self.ranks[stage * self.tp + t]

    def _check_stages_agree(self) -> None:
        """Every rank was saved at the same step, with the same ZeRO stage and data-parallel size."""
        first = self.ranks[0]
        steps0 = first.values.get("deepspeed/global_steps")
        for r in self.ranks[1:]:
            for what, a, b in (("ZeRO stage", first.stage, r.stage), ("data-parallel size", first.dp, r.dp),
                               ("global_steps", steps0, r.values.get("deepspeed/global_steps"))):
                if a != b:
                    raise CorruptCheckpointError(
                        f"{r._model_files[0]}: {what} is {b}; {first._model_files[0]} records {a}. The files come "
                        "from different saves; use one tag directory as save_checkpoint wrote it")

    # -- parameters and optimizer state ---------------------------------------------------------------------------
    def _parameters(self) -> None:
        for stage in range(self.pp):
            slices = [self._rank(stage, t) for t in range(self.tp)]
            keys = [k for k in slices[0].tensors if k.startswith(MODEL_PREFIX) or k.startswith(OPTIM_STATE + "/")]
            for t, r in enumerate(slices[1:], 1):
                theirs = {k for k in r.tensors if k.startswith(MODEL_PREFIX) or k.startswith(OPTIM_STATE + "/")}
                if theirs != set(keys):
                    diff = sorted(set(keys) ^ theirs)[:8]
                    raise CorruptCheckpointError(
                        f"{r._model_files[0]}: tensor-parallel rank {t} of stage {stage} holds other parameters "
                        f"than rank 0 ({diff}); the ranks of one stage hold slices of the same parameters")
            for key in keys:
                how = self._merge_plan(key, slices) if self.tp > 1 else ("one", slices[0], key)
                info = self._merged_info(key, how)
                if key in self._reads:  # a tied parameter: every stage that uses it holds a copy
                    have = self.tensors[key]
                    if (have.shape, have.dtype) != (info.shape, info.dtype):
                        raise CorruptCheckpointError(
                            f"{self.tag_dir}: {key!r} is {info.dtype}{list(info.shape)} in stage {stage} and "
                            f"{have.dtype}{list(have.shape)} in an earlier stage; tied copies must be the same")
                    self._reads[key] = ("tied", [*self._copies(self._reads[key]), how])
                    continue
                self._reads[key] = how
                self.tensors[key] = info
                add_parents(key, self.containers)

    @staticmethod
    def _copies(how: Any) -> list[Any]:
        return how[1] if how[0] == "tied" else [how]

    def _category(self, name: str) -> str:
        """How tensor-parallel slices of parameter ``name`` merge, by the first ``universal_checkpoint_info``
        pattern family that matches it (``re.match``, as ``ds_to_universal``)."""
        info = self.uc_info
        for key in (_AFFINE,):
            params = info.get(key, {}).get("params", {}) if isinstance(info.get(key), Mapping) else {}
            if any(re.match(p, name) for p in params):
                raise UnsupportedStateError(
                    f"{self.tag_dir}: parameter {name!r} is described by an affine map in {UC_INFO}; not read "
                    "directly. Run ds_to_universal on the checkpoint, then convert its output")
        for sub in info.get(_SUB_PARAMS, []) or []:
            pats = sub.get("patterns", []) if isinstance(sub, Mapping) else getattr(sub, "patterns", [])
            if any(re.match(p, name) for p in pats):
                raise UnsupportedStateError(
                    f"{self.tag_dir}: parameter {name!r} holds fused sub-parameters ({_SUB_PARAMS} in {UC_INFO}); "
                    "not read directly. Run ds_to_universal on the checkpoint, then convert its output")
        for key, cat in ((_REPLICATED, "replicated"), (_AVERAGE, "average"), (_TWO_SUB, "two_sub"), (_ROW, "row")):
            if any(re.match(p, name) for p in info.get(key, []) or []):
                return cat
        return "cat0"

    def _merge_plan(self, key: str, slices: list[DeepSpeedSource]) -> tuple[Any, ...]:
        name, state = _name_of(key)
        if state is not None and slices[0].tensors[key].shape == ():
            return ("tp", "scalar", False, [(s, key) for s in slices])
        vocab = any(re.match(p, name) for p in self.uc_info.get(_VOCAB, []) or [])
        return ("tp", self._category(name), vocab, [(s, key) for s in slices])

    def _merged_info(self, key: str, how: tuple[Any, ...]) -> TensorInfo:
        if how[0] == "one":
            return how[1].tensors[how[2]]
        _, cat, vocab, parts = how
        infos = [s.tensors[k] for s, k in parts]
        shape = list(infos[0].shape)
        if cat in ("replicated", "average", "scalar"):
            if any(i.shape != infos[0].shape for i in infos):
                raise CorruptCheckpointError(
                    f"{self.tag_dir}: {key!r} is replicated over tensor-parallel ranks ({cat}), but the ranks hold "
                    f"shapes {[list(i.shape) for i in infos]}")
        else:
            dim = 1 if cat == "row" else 0
            if len(shape) <= dim or any(len(i.shape) != len(shape) for i in infos):
                raise CorruptCheckpointError(f"{self.tag_dir}: {key!r}: slices {[list(i.shape) for i in infos]} "
                                             f"cannot be concatenated on dim {dim}")
            shape[dim] = sum(i.shape[dim] for i in infos)
        if vocab:
            rows = self.uc_info.get("original_vocab_size")
            if not isinstance(rows, int) or rows > shape[0]:
                raise CorruptCheckpointError(
                    f"{self.tag_dir}: {key!r} matches {_VOCAB}, but {UC_INFO}['original_vocab_size'] is {rows!r}; "
                    f"expected the real vocabulary size, at most the {shape[0]} rows the ranks hold")
            shape[0] = rows
        return TensorInfo.whole(key, infos[0].dtype, tuple(shape))

    # -- frozen parameters and buffers (pipeline runs: from the layer files) --------------------------------------
    def _frozen_and_buffers(self) -> None:
        """Layer-file entries the optimizer does not hold: buffers (``buffer_names``) as stored, frozen parameters
        (DeepSpeed records them nowhere else under a pipeline) as fp32, like the master weights. An entry is
        named ``<idx>.<key>``, or ``tied_modules.<tie>.<key>`` in a tied layer's file."""
        if not self._layer_files:
            return
        trainable: set[str] = set()
        buffers: set[str] = set()
        for r in self.ranks:
            main = r._models[0]
            for g in main.get("param_shapes") or []:
                trainable.update(g)
            trainable.update(main.get("frozen_param_shapes") or {})  # (ZeRO-1/2 keep frozen ones in the module)
            buffers.update(main.get("buffer_names") or [])
        known = trainable | buffers
        numbered = {n.split(".", 1)[0] for n in known if n.split(".", 1)[0].isdigit()}
        ties = sorted({n.split(".")[1] for n in known if n.startswith("tied_modules.") and n.count(".") >= 2})
        found: dict[str, dict[int, tuple[str, str]]] = {}  # name -> tp rank -> (file, entry)
        for (idx, t), path in sorted(self._layer_files.items()):
            layer = load_ds_file(path, self._allow, self.tag_dir)
            if not isinstance(layer, Mapping):
                raise CorruptCheckpointError(f"{path}: expected a layer's state dict, found {type(layer).__name__}")
            for k, v in layer.items():
                if not isinstance(v, torch.Tensor):
                    raise UnsupportedStateError(f"{path}: entry {k!r} is {type(v).__name__}; a layer file holds "
                                                "tensors only")
                name = self._layer_entry_name(idx, k, known, numbered, ties, path)
                if name in trainable:
                    continue  # the optimizer's fp32 copy is the weight
                found.setdefault(name, {}).setdefault(t, (path, k))
                self._layer_tensors[(path, k)] = v
        for name, by_tp in found.items():
            key = model_key(name)
            if key in self.tensors:
                continue
            if sorted(by_tp) != list(range(self.tp)):
                raise IncompleteCheckpointError(f"{self.tag_dir}: {name!r} is in the layer files of tensor-parallel "
                                                f"ranks {sorted(by_tp)}; expected all {self.tp}")
            parts = [by_tp[t] for t in range(self.tp)]
            t0 = self._layer_tensors[parts[0]]
            dtype = torch.float32 if name not in buffers and t0.is_floating_point() else t0.dtype
            cat = self._category(name) if self.tp > 1 else "replicated"
            shapes = [tuple(self._layer_tensors[p].shape) for p in parts]
            shape = list(shapes[0])
            if cat in ("cat0", "row", "two_sub"):
                dim = 1 if cat == "row" else 0
                shape[dim] = sum(s[dim] for s in shapes)
            self._reads[key] = ("layer", cat, dtype, parts)
            self.tensors[key] = TensorInfo.whole(key, dtype, tuple(shape))
            add_parents(key, self.containers)
        missing = sorted(n for n in buffers if model_key(n) not in self.tensors)
        if missing:
            raise IncompleteCheckpointError(f"{self.tag_dir}: buffers {missing[:8]} are recorded in the model-states "
                                            "files, but no layer file holds them")

    @staticmethod
    def _layer_entry_name(idx: int, k: str, known: set[str], numbered: set[str], ties: list[str],
                          path: str) -> str:
        if str(idx) in numbered or f"{idx}.{k}" in known:
            return f"{idx}.{k}"
        cands = [n for n in known if n.startswith("tied_modules.") and n.split(".", 2)[-1] == k]
        if len(cands) == 1:
            return cands[0]
        if not cands and len(ties) == 1:
            return f"tied_modules.{ties[0]}.{k}"
        if not cands and not ties:
            return f"{idx}.{k}"  # a layer whose every entry is frozen
        raise UnsupportedStateError(
            f"{path}: entry {k!r} of layer {idx} cannot be named: the layer is tied (no parameter '{idx}.*' is "
            f"recorded) and {cands or ties} all fit; refusing to guess or drop it")

    # -- values ---------------------------------------------------------------------------------------------------
    def _values(self) -> None:
        first = self.ranks[0]
        for k, v in first.values.items():
            if not k.startswith(PARAM_GROUPS + "/"):
                self.values[k] = v
        for k, c in first.containers.items():
            if not (k == PARAM_GROUPS or k.startswith(PARAM_GROUPS + "/")):
                self.containers.setdefault(k, c)
        for k, info in first.tensors.items():  # client state and DeepSpeed's own tensors: stage 0's
            if k not in self.tensors and not (k.startswith(MODEL_PREFIX) or k.startswith(OPTIM_STATE + "/")):
                self.tensors[k] = info
                self._reads[k] = ("one", first, k)
        groups: list[dict[str, Any]] = []
        for stage in range(self.pp):
            r = self._rank(stage, 0)
            for g, group in enumerate(r.param_group_dicts):
                hyper = {k: v for k, v in group.items() if k != "params"}
                if g == len(groups):
                    groups.append({**hyper, "params": []})
                elif {k: v for k, v in groups[g].items() if k != "params"} != hyper:
                    raise UnsupportedStateError(
                        f"{r._optim_files[0]}: parameter group {g} of stage {stage} has hyperparameters {hyper}, "
                        f"stage 0 has { {k: v for k, v in groups[g].items() if k != 'params'} }; one checkpoint "
                        "keeps one set per group")
                groups[g]["params"] += [n for n in group["params"] if n not in groups[g]["params"]]
        flatten_into(groups, PARAM_GROUPS, self, self.tag_dir, {})

    # -- reading --------------------------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        how = self._reads[key]
        if how[0] == "tied":
            copies = [self._read_how(key, h) for h in how[1]]
            for h, c in zip(how[1][1:], copies[1:]):
                if not torch.equal(copies[0], c):
                    raise CorruptCheckpointError(
                        f"{self.tag_dir}: {key!r} is tied across pipeline stages, but the copy in "
                        f"{self._where(h)} differs from the one in {self._where(how[1][0])}; DeepSpeed keeps tied "
                        "copies identical, so the files are damaged or from different saves")
            return copies[0]
        return self._read_how(key, how)

    def _where(self, how: tuple[Any, ...]) -> str:
        r = how[1] if how[0] == "one" else how[3][0][0]
        return os.path.basename(r._optim_files[0])

    def _read_how(self, key: str, how: tuple[Any, ...]) -> torch.Tensor:
        if how[0] == "one":
            return how[1].read(how[2])
        if how[0] == "layer":
            _, cat, dtype, parts = how
            slices = [self._layer_tensors[p].to(dtype) for p in parts]
            return self._merge(key, cat, False, slices)
        _, cat, vocab, parts = how
        return self._merge(key, cat, vocab, [s.read(k) for s, k in parts])

    def _merge(self, key: str, cat: str, vocab: bool, slices: list[torch.Tensor]) -> torch.Tensor:
        if cat in ("replicated", "scalar"):
            for t, s in enumerate(slices[1:], 1):
                if not torch.equal(slices[0], s):
                    raise CorruptCheckpointError(
                        f"{self.tag_dir}: {key!r} is replicated over tensor-parallel ranks, but rank {t}'s copy "
                        "differs from rank 0's; the files are damaged or from different saves")
            out = slices[0]
        elif cat == "average":  # a mean: the one merge that is arithmetic, as ds_to_universal does it
            out = sum(slices[1:], slices[0].clone()) / len(slices)
        elif cat == "two_sub":
            halves = [torch.chunk(s, 2, dim=0) for s in slices]
            out = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out = torch.cat(slices, dim=1 if cat == "row" else 0)
        if vocab:
            out = out[:self.tensors[key].shape[0]]
        if tuple(out.shape) != self.tensors[key].shape:
            raise CorruptCheckpointError(f"{self.tag_dir}: {key!r} merged to {list(out.shape)}; expected "
                                         f"{list(self.tensors[key].shape)}")
        return out

    def close(self) -> None:
        for r in self.ranks:
            r.close()
        self._reads, self._layer_tensors = {}, {}

