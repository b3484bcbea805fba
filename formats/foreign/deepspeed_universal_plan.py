"""Planning an export to DeepSpeed's universal checkpoint layout (``plan_deepspeed_universal``, pure): which files,
which keys go where, and what is refused before anything is written. The layout and the writer are described in
``formats.foreign.deepspeed_universal``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from ckpt.errors import ShardMismatchError, UnsupportedStateError
from formats import keys as K
from formats.foreign.deepspeed_files import CLIENT_PREFIX, ENGINE_KEYS
from formats.foreign.deepspeed_files import DS_PREFIX as _DS_PREFIX
from formats.foreign.deepspeed_files import OPTIM_STATE as _OPTIM_STATE
from formats.foreign.source import MODEL_PREFIX, Source


ZERO_DIR = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
#: ZeRO-3 loads glob ``zero_pp_rank_0_mp_rank_*_model_states.pt`` instead of ``mp_rank_*_model_states.pt``.
ZERO3_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
LATEST_FILE = "latest_universal"
#: The DeepSpeed release whose layout this follows; written as ``ds_version`` unless the source carries one (ZeRO-1
#: loads require one, at least 0.3.17).
DS_LAYOUT_VERSION = "0.19.8"
OPTIM_STATE = _OPTIM_STATE + "/"
PARAM_GROUPS = "optim/param_groups"
DS_PREFIX = _DS_PREFIX + "/"
CLIENT = CLIENT_PREFIX
#: Top-level names of a model-states file that DeepSpeed owns (what the importer does not read as client state):
#: client state may not use them.
RESERVED = ENGINE_KEYS
#: ``deepspeed/<name>`` values carried into the model-states file, and into ``zero/optimizer_state.pt``.
_MODEL_STATE_VALUES = ("global_steps", "global_samples", "skipped_steps", "dp_world_size", "lr_scheduler",
                       "ds_config", "universal_checkpoint_info", "checkpoint_parallel_dimensions")
_OPTIM_VALUES = ("zero_stage", "dynamic_loss_scale", "overflow", "clip_grad")
#: ``deepspeed/<name>`` values used otherwise (``ds_version`` both places; the tag is DST's name; the tensor-parallel
#: size of an export is always 1).
_OTHER_DS_VALUES = ("ds_version", "tag", "mp_world_size")
_MAX_LISTED = 10


class MissingStateError(ShardMismatchError):
    """The source lacks state the DeepSpeed universal layout needs (the message lists the missing keys)."""


@dataclass(frozen=True)
class ParamExport:
    """One ``zero/<name>/`` directory: the weight, and for a parameter the optimizer owns its state and step."""

    name: str
    model_key: str
    group: int | None = None
    states: tuple[tuple[str, str], ...] = ()  # (file stem, source key)
    step_key: str | None = None


@dataclass(frozen=True)
class DeepSpeedUniversalPlan:
    """What ``write_deepspeed_universal`` writes for one source: built by ``plan_deepspeed_universal`` (pure)."""

    dst: str
    tag: str
    params: tuple[ParamExport, ...]
    #: Parameter names per optimizer group, in order (``param_shapes``; the groups' hyperparameters are matched to
    #: DeepSpeed's optimizer groups by position).
    groups: tuple[tuple[str, ...], ...]
    #: Source keys (tensors and values) written as client state, and those not written at all.
    client_keys: tuple[str, ...]
    skipped: tuple[str, ...]

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.dst))

    def tensor_keys(self, source: Source) -> list[str]:
        """Every source tensor the export reads."""
        out = [p.model_key for p in self.params]
        out += [k for p in self.params for _, k in p.states]
        out += [p.step_key for p in self.params if p.step_key is not None and p.step_key in source.tensors]
        out += [k for k in self.client_keys if k in source.tensors]
        out += [k for k in source.tensors if k.startswith(PARAM_GROUPS + "/") or k.startswith(DS_PREFIX)]
        return out

    def bytes_out(self, source: Source, dtypes: dict[str, torch.dtype]) -> int:
        """Tensor bytes written: each weight twice (``fp32.pt`` and the module), every other tensor once."""
        total = 0
        for k in self.tensor_keys(source):
            info = source.tensors[k]
            total += info.numel * dtypes.get(k, info.dtype).itemsize
        for p in self.params:
            info = source.tensors[p.model_key]
            total += info.numel * _fp32_dtype(info.dtype).itemsize
        return total

    def outputs(self) -> list[str]:
        with_state = sum(1 for p in self.params if p.group is not None)
        stems = sorted({s for p in self.params for s, _ in p.states} | {"fp32", "step"})
        return [f"{self.dst}/{ZERO_DIR}/<name>/{{{','.join(stems)}}}.pt ({with_state} parameters with optimizer "
                f"state; {len(self.params) - with_state} other tensors: fp32.pt only)",
                f"{self.dst}/{ZERO_DIR}/{OPTIMIZER_STATE_FILE} ({len(self.groups)} param groups)",
                f"{self.dst}/{MODEL_STATES_FILE} (and {ZERO3_MODEL_STATES_FILE}, a hard link)",
                f"{os.path.join(self.root, LATEST_FILE)} -> {self.tag}"]


def _fp32_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def _top(key: str) -> str:
    return key.split("/", 1)[0]


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _safe_name(name: str, key: str, where: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsupportedStateError(f"{where}: key {key!r}: parameter name {name!r} cannot be a directory name "
                                    f"under {ZERO_DIR}/ (DeepSpeed stores each parameter in zero/<name>/)")
    return name


def destination_exists(dst: str) -> bool:
    """Whether ``dst`` holds anything (a file, or a non-empty directory)."""
    return os.path.isfile(dst) or (os.path.isdir(dst) and bool(os.listdir(dst)))


def plan_deepspeed_universal(source: Source, dst: str) -> DeepSpeedUniversalPlan:
    """Map ``source``'s keys onto the DeepSpeed universal layout at ``dst``; no I/O.

    Raises ``MissingStateError`` when the optimizer state DeepSpeed needs is absent (a model-only checkpoint, a
    parameter of a group without state) and ``UnsupportedStateError`` for state the layout cannot hold (nested model
    keys, optimizer state that is not per-element, a client key DeepSpeed reserves).
    """
    dst = os.path.normpath(str(dst))
    tag = os.path.basename(dst)
    if tag in ("", ".", ".."):
        raise UnsupportedStateError(f"{dst}: the destination is the tag directory (e.g. out/global_step3); its "
                                    "name is the tag that latest_universal names")
    where = source.path
    all_keys = [*source.tensors, *source.values]
    model = _model_names(source, where)
    groups = _param_groups(source)
    _require_weights_and_state(model, groups, where)
    state_keys = _optimizer_state_keys(all_keys, where)
    grouped = {n: g for g, names in enumerate(groups) for n in names}
    _check_groups_complete(groups, model, state_keys, grouped, where)
    params = _param_exports(source, model, state_keys, grouped, where)
    client, skipped = _client_and_skipped(source, all_keys)
    _check_client(source, client)
    return DeepSpeedUniversalPlan(dst=dst, tag=tag, params=tuple(params), groups=tuple(tuple(n) for n in groups),
                                  client_keys=tuple(client), skipped=tuple(sorted(skipped)))


def _model_names(source: Source, where: str) -> dict[str, str]:
    """Parameter name -> source key of every ``model/<fqn>`` tensor (a flat module state dict, names checked)."""
    model: dict[str, str] = {}
    for key in source.tensors:
        if key.startswith(MODEL_PREFIX):
            comps = key[len(MODEL_PREFIX):].split("/")
            if len(comps) != 1:
                raise UnsupportedStateError(f"{where}: key {key!r}: DeepSpeed keeps a flat module state dict "
                                            "(model/<fqn>); nested model state cannot be exported")
            model[_safe_name(K.unescape(comps[0]), key, where)] = key
    return model


def _require_weights_and_state(model: dict[str, str], groups: list[list[str]], where: str) -> None:
    """``MissingStateError`` unless the source has both weights and optimizer parameter groups."""
    if groups and model:
        return
    missing = ([] if model else ["model/<fqn> (the weights)"]) + \
              ([] if groups else [f"{PARAM_GROUPS}/<i>/params", f"{OPTIM_STATE}<fqn>/<state>"])
    raise MissingStateError(
        f"{where}: DeepSpeed's universal checkpoint needs the weights and the optimizer state (optimizer_state.pt "
        f"and each parameter's exp_avg/exp_avg_sq/step files, which load_universal reads); missing: "
        f"{', '.join(missing)}. Export a checkpoint saved as ckpt.save({{'model': model, 'optim': optimizer}}), "
        "or convert to --to safetensors/torch for the weights alone.")


def _optimizer_state_keys(all_keys: list[str], where: str) -> dict[str, dict[str, str]]:
    """Parameter name -> {state name: source key} of every ``optim/state/<fqn>/<state>`` key."""
    state_keys: dict[str, dict[str, str]] = {}
    for key in all_keys:
        if key.startswith(OPTIM_STATE):
            parts = key[len(OPTIM_STATE):].split("/")
            if len(parts) != 2:
                raise UnsupportedStateError(f"{where}: key {key!r}: expected {OPTIM_STATE}<fqn>/<state> (per-parameter "
                                            "optimizer state keyed by name, as torch's get_optimizer_state_dict gives)")
            state_keys.setdefault(K.unescape(parts[0]), {})[K.unescape(parts[1])] = key
    return state_keys


def _check_groups_complete(groups: list[list[str]], model: dict[str, str], state_keys: dict[str, dict[str, str]],
                           grouped: dict[str, int], where: str) -> None:
    """Refuse optimizer state of no group, and a group whose parameters lack a weight or a state the others have
    (DeepSpeed loads every parameter of a group with the same state)."""
    strays = sorted(set(state_keys) - set(grouped))
    if strays:
        raise UnsupportedStateError(f"{where}: optimizer state for {_listing(strays)}, which no entry of "
                                    f"{PARAM_GROUPS} lists; the checkpoint is inconsistent")
    missing: list[str] = []
    for names in groups:
        stems = sorted({s for n in names for s in state_keys.get(n, {}) if s != "step"})
        has_step = any("step" in state_keys.get(n, {}) for n in names)
        for n in names:
            if n not in model:
                missing.append(f"{MODEL_PREFIX}{K.escape(n)}")
            st = state_keys.get(n, {})
            missing += [f"{OPTIM_STATE}{K.escape(n)}/{s}" for s in [*stems, *(["step"] if has_step else [])]
                        if s not in st]
    if missing:
        raise MissingStateError(
            f"{where}: DeepSpeed loads every parameter of an optimizer group with the same state, and this checkpoint "
            f"lacks: {_listing(missing)}. Convert a checkpoint saved after an optimizer step that covered every "
            "parameter.")


def _param_exports(source: Source, model: dict[str, str], state_keys: dict[str, dict[str, str]],
                   grouped: dict[str, int], where: str) -> list[ParamExport]:
    """One ``ParamExport`` per weight, in the source's order, with its per-element state files and step."""
    params: list[ParamExport] = []
    for name, key in model.items():
        g = grouped.get(name)
        if g is None:
            params.append(ParamExport(name, key))
            continue
        st = state_keys.get(name, {})
        states = []
        for stem, skey in sorted(st.items()):
            if stem == "step":
                continue
            info = source.tensors.get(skey)
            if info is None or info.numel != source.tensors[key].numel:
                found = f"{info.dtype}{list(info.shape)}" if info is not None else repr(source.values.get(skey))
                raise UnsupportedStateError(
                    f"{where}: key {skey!r} is {found}, not one value per element of {name} "
                    f"{list(source.tensors[key].shape)}: DeepSpeed's universal layout holds per-element optimizer "
                    "state (Adam's exp_avg, exp_avg_sq) and a step counter only")
            states.append((_safe_name(stem, skey, where), skey))
        params.append(ParamExport(name, key, g, tuple(states), st.get("step")))
    return params


def _client_and_skipped(source: Source, all_keys: list[str]) -> tuple[list[str], list[str]]:
    """The keys written as client state, and those not written at all (model values, optimizer and DeepSpeed
    entries the layout has no place for)."""
    skipped = [k for k in source.values if _top(k) == "model"]
    client: list[str] = []
    ds_used = {*_MODEL_STATE_VALUES, *_OPTIM_VALUES, *_OTHER_DS_VALUES}
    for key in all_keys:
        parts = key.split("/")
        if parts[0] == "model":
            continue  # tensors exported above, values skipped
        if parts[0] == "optim":
            if not (key.startswith(OPTIM_STATE) or key.startswith(PARAM_GROUPS + "/")):
                skipped.append(key)
        elif parts[0] == "deepspeed":
            if len(parts) < 2 or parts[1] not in ds_used:
                skipped.append(key)
        else:
            client.append(key)
    return client, skipped


def _param_groups(source: Source) -> list[list[str]]:
    """Parameter names per group, from ``optim/param_groups/<i>/params/<j>``."""
    out: dict[int, dict[int, str]] = {}
    prefix = PARAM_GROUPS + "/"
    for key, v in source.values.items():
        if key.startswith(prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) == 3 and parts[1] == "params" and parts[0].isdigit() and parts[2].isdigit():
                if not isinstance(v, str):
                    raise UnsupportedStateError(f"{source.path}: key {key!r} is {v!r}; parameters must be named by "
                                                "their FQN (torch's get_optimizer_state_dict)")
                out.setdefault(int(parts[0]), {})[int(parts[2])] = _safe_name(v, key, source.path)
    n = max(out, default=-1) + 1
    c = source.containers.get(PARAM_GROUPS)
    if c is not None and c.type != "dict":
        n = max(n, c.length)
    return [[names[j] for j in sorted(names)] for names in (out.get(g, {}) for g in range(n))]


def _check_client(source: Source, client: list[str]) -> None:
    tops: dict[str, str] = {}
    for key in client:
        comps = key.split("/")
        name = comps[1] if comps[0] == CLIENT and len(comps) > 1 else comps[0]
        name = K.unescape(name)
        if name in RESERVED:
            raise UnsupportedStateError(f"{source.path}: key {key!r}: client state named {name!r} would replace "
                                        "DeepSpeed's own entry of the model-states file; rename it")
        origin = comps[0] == CLIENT
        if tops.setdefault(name, str(origin)) != str(origin):
            raise UnsupportedStateError(f"{source.path}: client state {name!r} is both a top-level key and "
                                        f"{CLIENT}/{name}; DeepSpeed keeps one")
