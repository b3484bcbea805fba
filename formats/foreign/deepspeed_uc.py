"""DeepSpeed *universal* checkpoints read as a ``Source``: ``DeepSpeedUniversalSource``.

What ``ds_to_universal`` (and ``ckpt convert --to deepspeed-universal``) writes in a tag directory: ``zero/<name>/
fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` (``{"param": tensor, ...}`` dicts, or bare tensors, flattened under
ZeRO-3), ``step.pt`` (ZeRO-1/2), ``zero/optimizer_state.pt`` (the parameter groups; under ZeRO-3 also the
per-group steps) and the model-states files copied from the source (``param_shapes``, counters, client state).
``ds_to_universal`` merges tensor-parallel slices (by the patterns the run recorded in
``universal_checkpoint_info``), so its output is how tensor-parallel DeepSpeed runs, whose ZeRO files
``DeepSpeedSource`` refuses, come into this format.

The keys are those of ``DeepSpeedSource`` (``model/<name>``, ``optim/state/<name>/...``, ``optim/param_groups``,
``client_state/...``, ``deepspeed/...``), so both read the same run to the same checkpoint (tested with
``ckpt diff``). Files are loaded as ``DeepSpeedSource`` loads them: memory-mapped, DeepSpeed's classes as inert
stand-ins, nothing else unpickled.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, UnsupportedStateError
from formats import keys as K
from formats.foreign.deepspeed_files import (MODEL_FILE, OPTIM_STATE, add_engine_values, add_param_groups,
                                             load_ds_file, malformed_fields, model_key, zero_stage_of)
from formats.foreign.deepspeed_universal_plan import (MODEL_STATES_FILE, OPTIMIZER_STATE_FILE,
                                                       ZERO3_MODEL_STATES_FILE, ZERO_DIR)
from formats.foreign.files import is_regular
from formats.foreign.source import Source, TensorInfo, add_parents

_MODEL_FILES = (MODEL_STATES_FILE, ZERO3_MODEL_STATES_FILE)
STATES = ("exp_avg", "exp_avg_sq")


def is_universal_tag_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ZERO_DIR)) and any(
        os.path.isfile(os.path.join(path, f)) for f in _MODEL_FILES)


class DeepSpeedUniversalSource(Source):
    """A DeepSpeed universal checkpoint's tag directory (``zero/<name>/*.pt`` + model states)."""

    def __init__(self, tag_dir: str, tag: str, allow_pickle: bool = False) -> None:
        super().__init__(path=str(tag_dir), format="deepspeed")
        with malformed_fields(self.path):
            self._open(tag_dir, tag, allow_pickle)

    def _open(self, tag_dir: str, tag: str, allow_pickle: bool) -> None:
        self.tag = tag
        self._allow = allow_pickle
        self._reads: dict[str, torch.Tensor] = {}
        mfiles = self._model_files(tag_dir)
        mfile = mfiles[0]
        main = self._load(mfile)
        groups, shape_of = self._param_shapes(main, mfiles)
        zero = os.path.join(tag_dir, ZERO_DIR)
        opt = self._load(os.path.join(zero, OPTIMIZER_STATE_FILE))
        group_steps = self._group_steps(opt)
        for g, names in enumerate(groups):
            for name in names:
                pdir = os.path.join(zero, name)
                self._put(model_key(name), self._param(pdir, "fp32", shape_of[name], name))
                self._states(pdir, name, shape_of[name], group_steps[g] if g < len(group_steps) else None)
        module = main.get("module") or {}
        for name in sorted(os.listdir(zero)):  # frozen parameters and buffers, and what param_shapes does not list
            if name in shape_of or not os.path.isdir(os.path.join(zero, name)):
                continue
            ref = module.get(name)
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) and ref.numel() else None
            self._put(model_key(name), self._param(os.path.join(zero, name), "fp32", shape, name))
            self._states(os.path.join(zero, name), name, shape, None)
        self._param_groups(opt, groups, os.path.join(zero, OPTIMIZER_STATE_FILE))
        self._values(main, opt, mfile)
        self.metadata["deepspeed"] = {"tag": tag, "universal": True}

    def _model_files(self, tag_dir: str) -> list[str]:
        """Every stage's ``mp_rank_<m>_model_states.pt`` (``ds_to_universal`` copies one per model-parallel rank: a
        pipeline run's stages each list their own parameters), else ZeRO-3's model-states file."""
        names = sorted(os.listdir(tag_dir))
        mfiles = [os.path.join(tag_dir, n) for n in names if MODEL_FILE.match(n)]
        mfiles += [os.path.join(tag_dir, f) for f in _MODEL_FILES[1:] if not mfiles and f in names]
        return mfiles

    def _param_shapes(self, main: Mapping[str, Any], mfiles: list[str]) -> tuple[list[list[str]], dict[str, Any]]:
        """Parameter names per optimizer group (group ``g`` of every stage, in stage order) and their shapes. The
        shapes are the full ones only without tensor parallelism (each stage's file lists its own slices): then
        None, and the files' shapes are used."""
        dims = main.get("checkpoint_parallel_dimensions")
        tp = int(dims.get("tp_degree") or 1) if isinstance(dims, Mapping) else 1
        groups: list[list[str]] = []
        shape_of: dict[str, Any] = {}
        for i, f in enumerate(mfiles):
            shapes = (main if i == 0 else self._load(f)).get("param_shapes")
            if not isinstance(shapes, (list, tuple)):
                raise CorruptCheckpointError(f"{f}: param_shapes is {type(shapes).__name__}, expected a list of "
                                             "dicts")
            for g, names in enumerate(shapes):
                if g == len(groups):
                    groups.append([])
                for n, shp in names.items():
                    if n not in shape_of:
                        groups[g].append(n)
                        shape_of[n] = tuple(int(s) for s in shp) if tp == 1 else None
        return groups, shape_of

    def _states(self, pdir: str, name: str, shape: tuple[int, ...] | None, group_step: torch.Tensor | None) -> None:
        """The optimizer state files of parameter directory ``pdir``; any other file in it raises (a converter
        never drops what it was given)."""
        for f in sorted(os.listdir(pdir)):
            stem = f[:-3] if f.endswith(".pt") else None
            if stem == "fp32":
                continue
            if stem == "step":
                step = os.path.join(pdir, f)
                self._put(self._state_key(name, "step"), self._tensor(self._load(step), step))
            elif stem:  # exp_avg, exp_avg_sq (Adam), or any per-element state (ckpt's export writes them all)
                ref = self.tensors[model_key(name)].shape
                self._put(self._state_key(name, stem), self._param(pdir, stem, shape or ref, name))
            else:
                raise UnsupportedStateError(
                    f"{os.path.join(pdir, f)}: parameter {name!r} holds {f!r}, which is not a state file (fp32.pt, "
                    f"step.pt, <state>.pt such as {', '.join(s + '.pt' for s in STATES)}); refusing to drop it")
        if self._state_key(name, "step") not in self.tensors and group_step is not None:
            self._put(self._state_key(name, "step"), group_step)

    # -- files ----------------------------------------------------------------------------------------------------
    def _load(self, path: str) -> Any:
        return load_ds_file(path, self._allow, self.path)

    def _tensor(self, obj: Any, where: str) -> torch.Tensor:
        t = obj.get("param") if isinstance(obj, Mapping) else obj
        if not isinstance(t, torch.Tensor):
            raise CorruptCheckpointError(f"{where}: expected a tensor or a dict with 'param', found "
                                         f"{type(obj).__name__}")
        return t

    def _param(self, pdir: str, state: str, shape: tuple[int, ...] | None, name: str) -> torch.Tensor:
        """``state``'s tensor of parameter ``name``, checked against ``shape`` (reshaped if flat) when known."""
        path = os.path.join(pdir, f"{state}.pt")
        if not is_regular(path, "a DeepSpeed file"):
            raise IncompleteCheckpointError(f"{path}: missing (parameter {name!r}); the universal checkpoint is "
                                            "incomplete")
        t = self._tensor(self._load(path), path)
        if shape is not None and tuple(t.shape) != shape:
            if t.numel() != math.prod(shape):
                raise CorruptCheckpointError(f"{path}: holds {t.numel()} elements {list(t.shape)}; parameter "
                                             f"{name!r} has shape {list(shape)}")
            t = t.reshape(shape)  # ZeRO-3's universal files are flat
        return t

    @staticmethod
    def _group_steps(opt: Mapping[str, Any]) -> list[torch.Tensor]:
        inner = opt.get("optimizer_state_dict")
        state = inner.get("state") if isinstance(inner, Mapping) else None
        if not isinstance(state, Mapping):
            return []
        return [state[g]["step"] for g in sorted(state) if isinstance(state[g], Mapping) and "step" in state[g]]

    def _state_key(self, name: str, state: str) -> str:
        return K.join(K.join(OPTIM_STATE, K.escape(name)), K.escape(state))

    def _put(self, key: str, t: torch.Tensor) -> None:
        self.tensors[key] = TensorInfo.whole(key, t.dtype, tuple(t.shape))
        self._reads[key] = t
        add_parents(key, self.containers)

    # -- values ---------------------------------------------------------------------------------------------------
    def _param_groups(self, opt: Mapping[str, Any], groups: list[list[str]], where: str) -> None:
        pgs = opt.get("param_groups")
        if pgs is None and isinstance(opt.get("optimizer_state_dict"), Mapping):
            pgs = opt["optimizer_state_dict"].get("param_groups")
        if pgs is None:
            raise CorruptCheckpointError(f"{where}: no param_groups")
        add_param_groups(self, pgs, groups, where)

    def _values(self, main: Mapping[str, Any], opt: Mapping[str, Any], mfile: str) -> None:
        sink: dict[str, torch.Tensor] = {}
        add_engine_values(self, main, opt, mfile, sink, tag=self.tag, zero_stage=zero_stage_of(opt, main))
        self._reads.update(sink)

    def read(self, key: str) -> torch.Tensor:
        return self._reads[key]

    def close(self) -> None:
        self._reads = {}
