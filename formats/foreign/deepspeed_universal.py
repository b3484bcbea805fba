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
from typing import Any, Callable

import torch

from ckpt.errors import CheckpointExistsError, UnsupportedStateError
from formats import keys as K
from formats.foreign.source import MODEL_PREFIX, Source, leaf_path, read_as
from formats.nesting import nest
from formats.foreign.deepspeed_universal_plan import (  # noqa: F401 - the plan's public names are re-exported
    CLIENT, DS_LAYOUT_VERSION, LATEST_FILE, MODEL_STATES_FILE, OPTIMIZER_STATE_FILE, PARAM_GROUPS,
    ZERO3_MODEL_STATES_FILE, ZERO_DIR, _MAX_LISTED, _OPTIM_VALUES, DeepSpeedUniversalPlan, MissingStateError,
    _fp32_dtype, _listing, _top, destination_exists, plan_deepspeed_universal)

Progress = Callable[[int], None]

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
        path = leaf_path(k, conts, source.path)
        paths[k] = path[1:] if path and path[0] == CLIENT else path
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
