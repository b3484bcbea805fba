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

from ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from formats import keys as K
from formats.foreign.deepspeed_files import (OPTIM_STATE, add_engine_values, add_param_groups, load_ds_file,
                                             malformed_fields, model_key,
                                             zero_stage_of)
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
        mfile = next((os.path.join(tag_dir, f) for f in _MODEL_FILES if os.path.isfile(os.path.join(tag_dir, f))))
        main = self._load(mfile)
        shapes = main.get("param_shapes")
        if not isinstance(shapes, (list, tuple)):
            raise CorruptCheckpointError(f"{mfile}: param_shapes is {type(shapes).__name__}, expected a list of dicts")
        groups = [list(g) for g in shapes]
        shape_of = {n: tuple(int(s) for s in shp) for g in shapes for n, shp in g.items()}
        zero = os.path.join(tag_dir, ZERO_DIR)
        opt = self._load(os.path.join(zero, OPTIMIZER_STATE_FILE))
        group_steps = self._group_steps(opt)
        for g, names in enumerate(groups):
            for name in names:
                pdir = os.path.join(zero, name)
                self._put(model_key(name), self._param(pdir, "fp32", shape_of[name], name))
                for state in STATES:
                    if is_regular(os.path.join(pdir, f"{state}.pt"), "a DeepSpeed file"):
                        self._put(self._state_key(name, state), self._param(pdir, state, shape_of[name], name))
                step = os.path.join(pdir, "step.pt")
                if is_regular(step, "a DeepSpeed file"):
                    self._put(self._state_key(name, "step"), self._tensor(self._load(step), step))
                elif g < len(group_steps):
                    self._put(self._state_key(name, "step"), group_steps[g])
        module = main.get("module") or {}
        for name in sorted(os.listdir(zero)):  # frozen parameters and buffers: fp32.pt only
            if name in shape_of or not os.path.isdir(os.path.join(zero, name)):
                continue
            ref = module.get(name)
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) and ref.numel() else None
            self._put(model_key(name), self._param(os.path.join(zero, name), "fp32", shape, name))
        self._param_groups(opt, groups, os.path.join(zero, OPTIMIZER_STATE_FILE))
        self._values(main, opt, mfile)
        self.metadata["deepspeed"] = {"tag": tag, "universal": True}

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
        return K.join(K.join(OPTIM_STATE, K.escape(name)), state)

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
