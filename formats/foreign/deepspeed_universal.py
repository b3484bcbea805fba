"""Export to DeepSpeed's *universal checkpoint* layout, which ``engine.load_checkpoint`` reads with
``"checkpoint": {"load_universal": true}`` at any data-parallel size and ZeRO stage: ``write_deepspeed_universal``.

The destination ``DST`` is the tag directory (``out/global_step3``); ``latest_universal`` in its parent names it, so
``engine.load_checkpoint("out")`` finds it, as the output of DeepSpeed's own ``ds_to_universal`` is found. It holds
what DeepSpeed 0.19's loaders read (``runtime/engine.py``, ``runtime/base_optimizer.py``
``load_hp_checkpoint_state_from_checkpoint_dir``, ``checkpoint/universal_checkpoint.py``
``load_hp_checkpoint_state``, ``runtime/zero/stage3.py`` ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)::

    DST/zero/<fqn>/fp32.pt          {"param": fp32 weight (its shape), "cat_dim": 0}  every model/ tensor
    DST/zero/<fqn>/<state>.pt       {"param": tensor, "cat_dim": 0}   per-element optimizer state (exp_avg, ...)
    DST/zero/<fqn>/step.pt          the step counter (a tensor, as torch's AdamW keeps it)
    DST/zero/optimizer_state.pt     param_groups (ZeRO-1/2), optimizer_state_dict {state: {g: {step}},
                                    param_groups} (ZeRO-3), ds_version, and the loss-scale flags when known
    DST/mp_rank_00_model_states.pt  module (every model/ tensor), param_shapes, global_steps, skipped_steps,
                                    dp_world_size, mp_world_size, lr_scheduler, ds_config, ds_version, client state
    DST/zero_pp_rank_0_mp_rank_00_model_states.pt   the same file (a hard link): the name ZeRO-3 loads look for
    DST/../latest_universal         the tag (DST's base name)

The source is any ``Source`` holding what ``ckpt.save({"model": module, "optim": optimizer})`` writes for a torch
optimizer: ``model/<fqn>``, ``optim/state/<fqn>/<state>``, ``optim/param_groups``. ``deepspeed/...`` values (written
by the DeepSpeed importer) supply the step counters, LR scheduler, config and loss-scale flags; ``client_state/<k>``
and every other top-level key become client state (top-level keys of the model-states file, which
``load_checkpoint`` returns). Without ``deepspeed/global_steps`` the optimizer's step counter is the global step.

Writing streams: the model-states file is saved with data-less placeholders, memory-mapped and filled tensor by
tensor while each weight is also written as its ``fp32.pt``, so peak memory is about one tensor. Everything is
written into a temporary sibling directory that is renamed to ``DST`` at the end (``overwrite`` swaps it with the
old directory, then deletes that); ``latest_universal`` is replaced by a rename after that, so a reader never sees a
partial checkpoint. Only torch, the standard library and plain containers are pickled: no DeepSpeed class, and
DeepSpeed need not be installed.

Who calls it: ``formats.foreign.convert.plan_conversion`` (``plan_deepspeed_universal``, pure) and
``run_conversion`` (``write_deepspeed_universal``), single process, single thread.
"""

from __future__ import annotations

import mmap
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ckpt.errors import CheckpointExistsError, ShardMismatchError, UnsupportedStateError
from formats import keys as K
from formats.foreign.source import MODEL_PREFIX, Source, leaf_path, nest, read_as

Progress = Callable[[int], None]

ZERO_DIR = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
#: ZeRO-3 loads glob ``zero_pp_rank_0_mp_rank_*_model_states.pt`` instead of ``mp_rank_*_model_states.pt``.
ZERO3_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
LATEST_FILE = "latest_universal"
#: The DeepSpeed release whose layout this follows; written as ``ds_version`` unless the source carries one (ZeRO-1
#: loads require one, at least 0.3.17).
DS_LAYOUT_VERSION = "0.19.8"
OPTIM_STATE = "optim/state/"
PARAM_GROUPS = "optim/param_groups"
DS_PREFIX = "deepspeed/"
CLIENT = "client_state"
#: Top-level names of a model-states file that DeepSpeed owns: client state may not use them.
RESERVED = frozenset({
    "module", "optimizer", "param_shapes", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
    "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "universal_checkpoint_info", "checkpoint_parallel_dimensions", "buffer_names", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "sparse_tensor_module_names",
})
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
    model: dict[str, str] = {}  # name -> key
    skipped: list[str] = []
    for key in source.tensors:
        if key.startswith(MODEL_PREFIX):
            comps = key[len(MODEL_PREFIX):].split("/")
            if len(comps) != 1:
                raise UnsupportedStateError(f"{where}: key {key!r}: DeepSpeed keeps a flat module state dict "
                                            "(model/<fqn>); nested model state cannot be exported")
            model[_safe_name(K.unescape(comps[0]), key, where)] = key
    skipped += [k for k in source.values if _top(k) == "model"]
    groups = _param_groups(source)
    if not groups or not model:
        missing = ([] if model else ["model/<fqn> (the weights)"]) + \
                  ([] if groups else [f"{PARAM_GROUPS}/<i>/params", f"{OPTIM_STATE}<fqn>/<state>"])
        raise MissingStateError(
            f"{where}: DeepSpeed's universal checkpoint needs the weights and the optimizer state (optimizer_state.pt "
            f"and each parameter's exp_avg/exp_avg_sq/step files, which load_universal reads); missing: "
            f"{', '.join(missing)}. Export a checkpoint saved as ckpt.save({{'model': model, 'optim': optimizer}}), "
            "or convert to --to safetensors/torch for the weights alone.")
    state_keys: dict[str, dict[str, str]] = {}  # name -> {state: key}
    for key in all_keys:
        if key.startswith(OPTIM_STATE):
            parts = key[len(OPTIM_STATE):].split("/")
            if len(parts) != 2:
                raise UnsupportedStateError(f"{where}: key {key!r}: expected {OPTIM_STATE}<fqn>/<state> (per-parameter "
                                            "optimizer state keyed by name, as torch's get_optimizer_state_dict gives)")
            state_keys.setdefault(K.unescape(parts[0]), {})[K.unescape(parts[1])] = key
    grouped = {n: g for g, names in enumerate(groups) for n in names}
    missing: list[str] = []
    strays = sorted(set(state_keys) - set(grouped))
    if strays:
        raise UnsupportedStateError(f"{where}: optimizer state for {_listing(strays)}, which no entry of "
                                    f"{PARAM_GROUPS} lists; the checkpoint is inconsistent")
    params: list[ParamExport] = []
    for g, names in enumerate(groups):
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
    _check_client(source, client)
    return DeepSpeedUniversalPlan(dst=dst, tag=tag, params=tuple(params), groups=tuple(tuple(n) for n in groups),
                                  client_keys=tuple(client), skipped=tuple(sorted(skipped)))


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


# -----------------------------------------------------------------------------------------------------------------
# Writing


def _subtree(source: Source, prefix: str) -> Any:
    """The nested object under ``prefix`` (``"deepspeed"``), tensors read whole (small metadata only)."""
    keys = [k for k in [*source.tensors, *source.values] if k.startswith(prefix + "/")]
    leaves = {k: (source.read(k) if k in source.tensors else source.values[k]) for k in keys}
    conts = {k: c for k, c in source.containers.items() if k == "" or k == prefix or k.startswith(prefix + "/")}
    obj = nest(leaves, conts, source.path)
    for comp in prefix.split("/"):
        obj = obj.get(K.unescape(comp), {}) if isinstance(obj, dict) else {}
    return obj


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that owns exactly its bytes (``torch.save`` writes a view's whole storage)."""
    t = t.detach()
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: str) -> None:
    torch.save(obj, path)
    _fsync(path)


def _steps(source: Source, plan: DeepSpeedUniversalPlan) -> list[torch.Tensor | None]:
    """One step counter per group (DeepSpeed keeps one per group: every parameter's must agree)."""
    per_group: list[dict[str, torch.Tensor]] = [{} for _ in plan.groups]
    for p in plan.params:
        if p.group is not None and p.step_key is not None:
            v = source.read(p.step_key) if p.step_key in source.tensors else source.values[p.step_key]
            if not isinstance(v, torch.Tensor):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise UnsupportedStateError(f"{source.path}: key {p.step_key!r} is {v!r}, not a step counter")
                v = torch.tensor(float(v), dtype=torch.float32)  # what torch's Adam keeps
            if v.numel() != 1:
                raise UnsupportedStateError(f"{source.path}: key {p.step_key!r} has shape {list(v.shape)}; a step "
                                            "counter is one number")
            per_group[p.group][p.step_key] = _own(v)
    out: list[torch.Tensor | None] = []
    for g, steps in enumerate(per_group):
        values = {k: float(s.item()) for k, s in steps.items()}
        if len(set(values.values())) > 1:
            shown = dict(list(values.items())[:_MAX_LISTED])
            raise UnsupportedStateError(
                f"{source.path}: the parameters of optimizer group {g} have different step counters ({shown}); "
                "DeepSpeed keeps one step per group and asserts they agree")
        out.append(next(iter(steps.values())) if steps else None)
    return out


def _optimizer_state(source: Source, plan: DeepSpeedUniversalPlan, steps: list[torch.Tensor | None]) -> dict:
    groups = [dict(g) for g in _subtree(source, PARAM_GROUPS) or []]
    for g, names in zip(groups, plan.groups):
        g["params"] = list(names)
    ds = _subtree(source, "deepspeed")
    out: dict[str, Any] = {k: ds[k] for k in _OPTIM_VALUES if k in ds}
    out["ds_version"] = ds.get("ds_version") or DS_LAYOUT_VERSION
    out["param_groups"] = groups  # ZeRO-1/2 (stage_1_and_2 / bf16_optimizer via base_optimizer)
    # ZeRO-3 reads state[0]["step"] and param_groups[0] (applied to every group) from here.
    out["optimizer_state_dict"] = {"state": {g: {"step": s} for g, s in enumerate(steps) if s is not None},
                                   "param_groups": groups}
    return out


def _model_states(source: Source, plan: DeepSpeedUniversalPlan, steps: list[torch.Tensor | None],
                  dtypes: dict[str, torch.dtype]) -> tuple[dict, dict[str, tuple[Any, ...]]]:
    """The model-states object with data-less tensors, and the nested path of every source tensor in it."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # what skip_data(materialize_fake_tensors) expects

    ds = _subtree(source, "deepspeed")
    model_keys = {p.name: p.model_key for p in plan.params}
    paths: dict[str, tuple[Any, ...]] = {}
    with FakeTensorMode():
        module = {}
        for p in plan.params:
            info = source.tensors[p.model_key]
            module[p.name] = torch.empty(info.shape, dtype=dtypes.get(p.model_key, info.dtype))
            paths[p.model_key] = ("module", p.name)
        client_tensors = {k: torch.empty(source.tensors[k].shape, dtype=dtypes.get(k, source.tensors[k].dtype))
                          for k in plan.client_keys if k in source.tensors}
    client_values = {k: source.values[k] for k in plan.client_keys if k in source.values}
    conts = {k: c for k, c in source.containers.items() if k == "" or _top(k) not in ("model", "optim", "deepspeed")}
    client = nest({**client_tensors, **client_values}, conts, source.path) if plan.client_keys else {}
    client = {**{k: v for k, v in client.items() if k != CLIENT}, **client.get(CLIENT, {})}
    for k in client_tensors:
        path = leaf_path(k, conts)
        paths[k] = path[1:] if path[0] == CLIENT else path
    global_steps = ds.get("global_steps")
    if global_steps is None:
        global_steps = int(steps[0].item()) if steps and steps[0] is not None else 0
    state: dict[str, Any] = {
        "module": module,
        "optimizer": None,
        "param_shapes": [{n: torch.Size(source.tensors[model_keys[n]].shape) for n in names} for names in plan.groups],
        "lr_scheduler": ds.get("lr_scheduler"),
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": ds.get("skipped_steps", 0),
        "global_steps": global_steps,
        "dp_world_size": ds.get("dp_world_size", 1),
        "mp_world_size": 1,
        "ds_version": ds.get("ds_version") or DS_LAYOUT_VERSION,
    }
    for k in ("global_samples", "ds_config", "universal_checkpoint_info", "checkpoint_parallel_dimensions"):
        if ds.get(k) is not None:
            state[k] = ds[k]
    state.update(client)
    return state, paths


def _prepare_destination(dst: str, overwrite: bool) -> None:
    if os.path.isfile(dst):
        raise CheckpointExistsError(f"{dst}: is a file; the deepspeed-universal destination is a tag directory "
                                    "(e.g. out/global_step3)")
    if not destination_exists(dst):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{dst}: already holds files; pass --overwrite (overwrite=True) to replace it, "
                                    "or choose another destination")
    names = os.listdir(dst)
    if not (ZERO_DIR in names or any(n.endswith("_model_states.pt") for n in names)):
        raise CheckpointExistsError(f"{dst}: holds {_listing(names)}, which is not a DeepSpeed checkpoint; "
                                    "--overwrite replaces a whole tag directory, so it refuses this one")


def write_deepspeed_universal(source: Source, dst: str, *, dtypes: dict[str, torch.dtype] | None = None,
                              overwrite: bool = False, progress: Progress | None = None) -> list[str]:
    """Write ``source`` in DeepSpeed's universal layout at the tag directory ``dst``; return the written paths.

    ``dtypes`` (key -> dtype) casts the module copy of the weights in the model-states file; ``fp32.pt`` always
    holds fp32 and optimizer state keeps its dtype. ``progress(nbytes)`` after each tensor. Raises
    ``CheckpointExistsError`` when ``dst`` holds files and ``overwrite`` is false.
    """
    plan = plan_deepspeed_universal(source, dst)
    dst, dtypes = plan.dst, dict(dtypes or {})
    _prepare_destination(dst, overwrite)
    steps = _steps(source, plan)
    os.makedirs(plan.root, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp, old = f"{dst}.tmp-{token}", f"{dst}.old-{token}"
    written: list[str] = []
    try:
        os.makedirs(os.path.join(tmp, ZERO_DIR))
        _write_files(source, plan, steps, dtypes, tmp, written, progress)
        if os.path.exists(dst):
            os.rename(dst, old)
        os.rename(tmp, dst)
        _fsync(plan.root)
        latest = os.path.join(plan.root, LATEST_FILE)
        with open(f"{latest}.tmp-{token}", "w") as f:
            f.write(plan.tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{latest}.tmp-{token}", latest)
        _fsync(plan.root)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(dst):
            os.rename(old, dst)
        raise
    finally:
        for path in (tmp, old):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(os.path.join(plan.root, f"{LATEST_FILE}.tmp-{token}")):
            os.remove(os.path.join(plan.root, f"{LATEST_FILE}.tmp-{token}"))
    return [os.path.join(dst, p) for p in written] + [os.path.join(plan.root, LATEST_FILE)]


def _write_files(source: Source, plan: DeepSpeedUniversalPlan, steps: list[torch.Tensor | None],
                 dtypes: dict[str, torch.dtype], tmp: str, written: list[str], progress: Progress | None) -> None:
    """Every file of the tag directory, into ``tmp`` (relative paths appended to ``written``)."""
    states, paths = _model_states(source, plan, steps, dtypes)
    mfile = os.path.join(tmp, MODEL_STATES_FILE)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(states, mfile)
    del states
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(mfile, map_location="cpu", weights_only=True, mmap=True)

    def fill(key: str, t: torch.Tensor) -> None:
        dest = mapped
        for comp in paths[key]:
            dest = dest[comp]
        dest.copy_(t)
        if progress is not None:
            progress(dest.numel() * dest.element_size())

    def put(rel: str, obj: Any, nbytes: int) -> None:
        _save(obj, os.path.join(tmp, rel))
        written.append(rel)
        if progress is not None:
            progress(nbytes)

    for p in plan.params:
        pdir = os.path.join(ZERO_DIR, p.name)
        os.makedirs(os.path.join(tmp, pdir))
        t = read_as(source, p.model_key, source.tensors[p.model_key].dtype)
        fill(p.model_key, t)
        w = _own(t.to(_fp32_dtype(t.dtype)))
        del t
        put(os.path.join(pdir, "fp32.pt"), {"param": w, "cat_dim": 0}, w.numel() * w.element_size())
        del w
        for stem, skey in p.states:
            s = _own(read_as(source, skey, source.tensors[skey].dtype).reshape(source.tensors[p.model_key].shape))
            put(os.path.join(pdir, f"{stem}.pt"), {"param": s, "cat_dim": 0}, s.numel() * s.element_size())
            del s
        if p.group is not None and steps[p.group] is not None:
            step = steps[p.group]
            put(os.path.join(pdir, "step.pt"), step, step.numel() * step.element_size())
    for key in paths:
        if not key.startswith(MODEL_PREFIX):
            fill(key, read_as(source, key, source.tensors[key].dtype))
    del mapped  # unmaps; the pages are in the file
    _fsync(mfile)
    written.append(MODEL_STATES_FILE)
    z3 = os.path.join(tmp, ZERO3_MODEL_STATES_FILE)
    try:
        os.link(mfile, z3)
    except OSError:  # a file system without hard links
        shutil.copyfile(mfile, z3)
        _fsync(z3)
    written.append(ZERO3_MODEL_STATES_FILE)
    put(os.path.join(ZERO_DIR, OPTIMIZER_STATE_FILE), _optimizer_state(source, plan, steps), 0)
    _fsync(os.path.join(tmp, ZERO_DIR))
    _fsync(tmp)
