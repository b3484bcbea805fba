"""Megatron-style checkpoint files: ``mp_rank_*/model_optim_rng.pt`` and ``distrib_optim_*.pt``.

Who calls it: every rank calls ``save_megatron`` / ``load_megatron`` together (both end or begin with the rank's
own files only; ``save_megatron`` ends with a barrier so the directory is complete when it returns).

Each file is a plain ``torch.save`` of dicts, lists, tensors, ints, floats and strings, so it loads with
``torch.load(weights_only=True)``. ``model_optim_rng.pt`` (written by DP rank 0 of each model-parallel position)
holds ``args`` (model and parallel configuration as plain dicts), ``iteration``, ``checkpoint_version``,
``model`` (local name -> tensor; empty with ``zero = 3``) and, with ``zero = 0``, ``optimizer``
(``{"state": {local name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...]}``). With ``zero >= 1`` every DP
rank writes ``distrib_optim_{dp:03d}.pt`` with ``args``, ``iteration`` and ``optimizer``
(``{"flat": {"<bucket>.<group>": {fp32_param, exp_avg, exp_avg_sq, step}}, "param_groups": [...]}``).

Expert parallelism (a deviation from the layout doc, as in Megatron-LM): with ``ep > 1`` the directory name gets
the expert rank, ``..._{ep:03d}``, and ``model_optim_rng.pt`` is written by the rank with expert-DP rank 0 of
each expert rank, since ranks with different ``ep_rank`` hold different experts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ref.config import LayoutMismatchError, ParallelConfig, config_dict
from megatron_ref.model import GPTModel
from megatron_ref.optimizer import DenseAdamW, FlatAdamW
from megatron_ref.parallel import coords
from megatron_ref.state import load_rank_state, rank_state

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"


def checkpoint_dir(root: str | os.PathLike[str], pc: ParallelConfig, rank: int) -> Path:
    """``root/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`` of ``rank`` (pp part only when ``pp > 1``, ep part only
    when ``ep > 1``)."""
    c = coords(rank, pc)
    name = f"mp_rank_{c.tp:02d}" if pc.pp == 1 else f"mp_rank_{c.tp:02d}_{c.pp:03d}"
    if pc.ep > 1:
        name += f"_{c.ep:03d}"
    return Path(root) / name


def optim_file(pc: ParallelConfig, rank: int) -> str:
    return f"distrib_optim_{coords(rank, pc).dp:03d}.pt"


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _args(model: GPTModel) -> dict[str, Any]:
    return {"model": config_dict(model.mc), "parallel": config_dict(model.pc)}


def save_megatron(root: str | os.PathLike[str], model: GPTModel, optimizer: DenseAdamW | FlatAdamW) -> Path:
    """Write this rank's files under ``root``; returns this rank's directory. Collective (ends in a barrier)."""
    pc, rank = model.pc, model.ps.rank
    state = rank_state(model, optimizer)
    d = checkpoint_dir(root, pc, rank)
    d.mkdir(parents=True, exist_ok=True)
    common = {"args": _args(model), "iteration": state["iteration"], "checkpoint_version": CHECKPOINT_VERSION}
    if coords(rank, pc).edp == 0:
        payload = dict(common, model=state.get("model", {}))
        if pc.zero == 0:
            payload["optimizer"] = state["optim"]
        _save_atomic(payload, d / MODEL_FILE)
    if pc.zero >= 1:
        _save_atomic(dict(common, optimizer=state["optim"]), d / optim_file(pc, rank))
    if pc.world > 1 and dist.is_initialized():
        dist.barrier()
    return d


def _load(path: Path, model: GPTModel) -> dict[str, Any]:
    payload = torch.load(path, weights_only=True)
    args = payload.get("args")
    if args != _args(model):
        raise LayoutMismatchError(f"{path}: written for {args!r}, this model is {_args(model)!r}; build the model "
                                  "with the checkpoint's configuration (or reshard the checkpoint)")
    return payload


def load_megatron(root: str | os.PathLike[str], model: GPTModel, optimizer: DenseAdamW | FlatAdamW) -> int:
    """Restore this rank's model and optimizer from ``root``; returns the iteration. Collective with ``zero = 3``
    (parameters are re-gathered from the flat partitions)."""
    pc, rank = model.pc, model.ps.rank
    d = checkpoint_dir(root, pc, rank)
    main = _load(d / MODEL_FILE, model)
    state: dict[str, Any] = {"iteration": main["iteration"]}
    if pc.zero < 3:
        state["model"] = main["model"]
    if pc.zero == 0:
        state["optim"] = main["optimizer"]
    else:
        state["optim"] = _load(d / optim_file(pc, rank), model)["optimizer"]
    load_rank_state(model, optimizer, state)
    return int(state["iteration"])
