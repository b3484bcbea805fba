"""What every reader of DeepSpeed checkpoints shares (``deepspeed``: ZeRO files; ``deepspeed_uc``: the output of
``ds_to_universal``): loading a file without running code, finding the tag directory, the engine's own values and
client state, the ZeRO stage, and the optimizer's param groups by name.

Nothing is unpickled beyond torch's ``weights_only`` loader: the DeepSpeed classes these files hold (the loss scaler,
the ZeRO stage enum, the fragment address, the sub-parameter shape) are read into inert stand-ins, and any other
class is refused with ``UnsafeCheckpointError`` unless ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Mapping

import torch

from ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from formats import keys as K
from formats.foreign.files import check_confined, is_regular, read_small
from formats.foreign.source import MODEL_PREFIX, Source, flatten_into
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
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
#: ``layer_<idx>[-model_<tp>]-model_states.pt``: one pipeline layer's module state (of one tensor-parallel rank).
LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
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


def load_ds_file(path: str, allow_pickle: bool, root: str | None = None) -> Any:
    """``torch.load`` one DeepSpeed file, memory-mapped, with the DeepSpeed classes read as stand-ins.

    The file must be a regular file (a FIFO would block forever) and, given ``root`` (the tag directory), resolve
    inside it (``UnsafeCheckpointError`` for a link out)."""
    if not is_regular(path, "a DeepSpeed file"):
        raise IncompleteCheckpointError(f"{path}: missing; the DeepSpeed checkpoint is incomplete (every rank's "
                                        "file must be present)")
    if root is not None:
        check_confined(path, root)
    return load_restricted(path, allow_pickle=allow_pickle, what="DeepSpeed file", stand_ins=STAND_INS,
                           holds=" (and the DeepSpeed loss scaler, ZeRO stage and fragment address)")


@contextlib.contextmanager
def malformed_fields(where: str) -> Iterator[None]:
    """Turn what a field of the wrong type raises while a DeepSpeed checkpoint's tables are built (``int()`` of a
    list, ``.items()`` of None, a missing attribute of a stand-in) into ``CorruptCheckpointError`` naming the
    checkpoint: the files unpickled fine but do not hold what DeepSpeed writes."""
    try:
        yield
    except CheckpointError:  # already says what is wrong (UnsupportedStateError is also a TypeError)
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: a field of the DeepSpeed checkpoint has the wrong type or value "
                                     f"({type(e).__name__}: {str(e)[:300]}); the files are not what DeepSpeed "
                                     "writes (damaged, or another version)") from e


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
        if not is_regular(latest, "DeepSpeed's 'latest' file") and is_regular(
                os.path.join(path, "latest_universal"), "DeepSpeed's 'latest_universal' file"):
            latest = os.path.join(path, "latest_universal")  # a universal checkpoint's root
        if not is_regular(latest, "DeepSpeed's 'latest' file"):
            tags = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
            raise CheckpointNotFoundError(f"{path}: no 'latest' file and no *_model_states.pt; pass the tag directory "
                                          f"itself (found {tags[:10]})")
        try:
            tag = read_small(latest, "DeepSpeed's 'latest' file", 4096).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"{latest}: not UTF-8 text; it should hold the tag directory's name") from None
    if not _TAG_OK.match(tag) or tag in (".", ".."):
        raise CorruptCheckpointError(f"{path}: tag {tag!r} is not a plain directory name; refusing to read outside "
                                     "the checkpoint directory")
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise IncompleteCheckpointError(f"{path}: 'latest' names tag {tag!r}, but {tag_dir} does not exist")
    return tag_dir, tag


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


def zero_stage_of(optim: Mapping[str, Any], main: Mapping[str, Any]) -> int | None:
    """The ZeRO stage an optimizer file records, else the one of the run's config (DeepSpeed's BF16 optimizer, used
    for bf16 ZeRO-1 with fp32 gradient accumulation, records none), else None."""
    stage = optim.get("zero_stage")
    if stage is None:
        config = main.get("ds_config")
        zero = config.get("zero_optimization") if isinstance(config, Mapping) else None
        stage = zero.get("stage") if isinstance(zero, Mapping) else None
    return None if stage is None else int(stage)


def add_param_groups(source: Source, groups: Any, flat_names: list[list[str]], where: str) -> list[dict[str, Any]]:
    """``optim/param_groups`` of ``source``: each torch param group's hyperparameters and its parameters by name
    (returned as plain dicts).

    ``groups`` is the base optimizer's ``param_groups``, whose ``params`` index its flat tensors: one per group
    under ZeRO-1/2, one per sub-group (``sub_group_size``) under ZeRO-3; ``flat_names[i]`` names the parameters
    of flat tensor ``i`` (``param_shapes[i]``). ckpt's own export writes the names instead of indices."""
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise CorruptCheckpointError(f"{where}: param_groups is {type(groups).__name__}; expected a list of dicts")
    known = {n for names in flat_names for n in names}
    plain, seen = [], set()
    for g, group in enumerate(groups):
        subs = group.get("params", [g])
        if isinstance(subs, (list, tuple)) and subs and all(isinstance(n, str) and n in known for n in subs):
            names = list(subs)  # written by ckpt's own export (deepspeed_universal): the names themselves
        elif (isinstance(subs, (list, tuple)) and all(isinstance(i, int) and 0 <= i < len(flat_names)
                                                      and i not in seen for i in subs)):
            seen.update(subs)
            names = [n for i in subs for n in flat_names[i]]
        else:
            raise CorruptCheckpointError(f"{where}: param group {g} lists {subs!r}; expected distinct indices below "
                                         f"{len(flat_names)} (the entries of param_shapes) or parameter names")
        plain.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
    flatten_into(plain, "optim/param_groups", source, where, {})
    source.containers.setdefault("optim", ContainerEntry("optim", "dict"))
    return plain


def model_parallel_ranks(names: list[str]) -> list[str]:
    """The model-parallel ranks (``"00"``, ``"01"``, ...: pipeline stage x tensor-parallel degree + tensor-parallel
    rank) whose optimizer or model-states files a tag directory's ``names`` hold; ``["00"]`` if none."""
    found = {m.group(3) for n in names if (m := OPTIM_FILE.match(n))}
    found |= {m.group(1) for n in names if (m := MODEL_FILE.match(n))}
    found |= {m.group(2) for n in names if (m := ZERO3_MODEL_FILE.match(n))}
    return sorted(found) or ["00"]


def model_key(name: str) -> str:
    return MODEL_PREFIX + K.escape(name)
