"""Megatron rank directories on disk: their files loaded safely, and which iteration, rank directories and
parallel layout a save root holds. ``resharding.megatron_dirs.MegatronSource`` reads the logical tensors from them.

Nothing here unpickles code: ``argparse.Namespace`` (Megatron-LM's ``args``), numpy arrays in ``rng_state``, the
few enums Megatron-LM puts in ``args`` and Transformer Engine's ``BytesIO`` extra state load as inert stand-ins
(``formats.foreign.torch_file.load_restricted``); any other class raises ``UnsafeCheckpointError`` naming the file
and the class, unless ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from formats import keys as K
from ckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError, FormatNotImplementedError,
                         IncompleteCheckpointError)
from formats.foreign.torch_file import load_restricted
from resharding.grid import Grid
from resharding.spec_bind import PARALLEL_KEYS, parse_parallel

MODEL_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?$")
_OPTIM_FILE = re.compile(r"^distrib_optim_(\d+)\.pt$")
_ITER_DIR = re.compile(r"^iter_(\d+)$")

#: Megatron-LM ``args`` names -> spec dims (``tied`` is the negation of untie_embeddings_and_output_weights).
ARGS_DIMS = {"hidden_size": "hidden", "num_attention_heads": "heads", "num_query_groups": "kv_heads",
              "kv_channels": "head_dim", "ffn_hidden_size": "ffn", "num_layers": "layers",
              "make_vocab_size_divisible_by": "vocab_divisible_by", "num_experts": "experts",
              "vocab_size": "vocab"}  # --vocab-size (the real, unpadded size; the export writes it)
_ARGS_PARALLEL = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                  "data_parallel_size": "dp", "expert_model_parallel_size": "ep"}


# ---------------------------------------------------------------------------------------------------------------
# Safe loading: inert stand-ins for the classes Megatron files hold besides tensors and containers.


class MegatronArgs:
    """Stand-in for ``argparse.Namespace``: keeps the pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _Inert:
    """Stand-in for a numpy array or dtype in ``rng_state``, an enum in ``args``, or Transformer Engine's ``BytesIO``
    extra state: keeps its arguments only."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


#: (stand-in, the global it replaces) for ``torch.serialization.safe_globals``.
STAND_INS: list[Any] = [
    (MegatronArgs, "argparse.Namespace"), _Inert,
    *[(_Inert, name) for name in (
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
        "megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
        "megatron.core.transformer.enums.AttnMaskType", "_io.BytesIO")],
]


def load_megatron_file(path: str, allow_pickle: bool = False) -> Any:
    """``torch.load`` one Megatron file, memory-mapped, with ``args``/``rng_state`` classes read as stand-ins."""
    if not os.path.isfile(path):
        raise IncompleteCheckpointError(f"{path}: missing; every rank's file must be present (is the directory "
                                        "complete, and is the parallel layout right?)")
    return load_restricted(path, allow_pickle=allow_pickle, what="Megatron file", stand_ins=STAND_INS,
                           holds=" (and argparse.Namespace, numpy RNG state, Megatron enums)")


def args_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (for the manifest's informational metadata); the rest as its repr."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, MegatronArgs):
        return jsonable(vars(obj))
    return repr(obj) if not isinstance(obj, _Inert) else "<opaque>"


# ---------------------------------------------------------------------------------------------------------------
# The directory: which iteration, which rank directories, which layout.


def resolve_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """The directory holding the ``mp_rank_*`` directories, and the iteration the tracker file names (if any).

    ``path`` is that directory, or a Megatron-LM save root (``latest_checkpointed_iteration.txt`` + ``iter_*/``).
    """
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such directory (expected Megatron rank directories mp_rank_*/)")
    names = os.listdir(path)
    if any(_RANK_DIR.match(n) for n in names):
        return path, None
    if TRACKER_FILE in names:
        with open(os.path.join(path, TRACKER_FILE), encoding="utf-8") as f:
            text = f.read().strip()
        if text == "release":
            return _need_dir(os.path.join(path, "release")), None
        if not text.isdigit():
            raise CorruptCheckpointError(f"{path}/{TRACKER_FILE}: expected an iteration number or 'release', found "
                                         f"{text[:50]!r}")
        return _need_dir(os.path.join(path, f"iter_{int(text):07d}")), int(text)
    iters = sorted(n for n in names if _ITER_DIR.match(n))
    if len(iters) == 1:
        return path + "/" + iters[0], int(_ITER_DIR.match(iters[0]).group(1))  # type: ignore[union-attr]
    if iters:
        raise CorruptCheckpointError(f"{path}: holds several iterations ({', '.join(iters[:10])}) and no "
                                     f"{TRACKER_FILE}; pass the iter_* directory to convert")
    one_rank = _RANK_DIR.match(os.path.basename(path.rstrip("/")))
    hint = "; this is one rank's directory: pass its parent" if one_rank else ""
    raise CheckpointNotFoundError(f"{path}: no Megatron rank directories (mp_rank_*/), {TRACKER_FILE} or iter_*/ "
                                  f"here{hint}")


def _need_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise IncompleteCheckpointError(f"{path}: missing; {TRACKER_FILE} names it, so the save did not complete")
    return path


def rank_dir_name(tp: int, pp: int, ep: int, grid: Grid) -> str:
    """Megatron's rank directory name: ``mp_rank_{tp:02d}``, then ``_{pp:03d}`` if ``pp > 1``, then ``_{ep:03d}``
    if ``ep > 1``."""
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if grid.pp > 1 else "") + (f"_{ep:03d}" if grid.ep > 1 else "")


def given_parallel(parallel: "str | Mapping[str, Any] | None") -> dict[str, Any]:
    """Only the settings a caller named in ``parallel`` (validated by ``parse_parallel``)."""
    if parallel is None:
        return {}
    full = parse_parallel(parallel)
    names = (set(parallel) if isinstance(parallel, Mapping)
             else {p.split("=")[0].strip() for p in parallel.split(",") if p.strip()})
    return {k: full[k] for k in names}


def args_parallel(args: dict[str, Any]) -> dict[str, Any]:
    """Parallel settings the files' ``args`` record: megatron_ref's ``args["parallel"]`` or Megatron-LM's names."""
    if isinstance(args.get("parallel"), Mapping):
        return {k: v for k, v in args["parallel"].items() if k in (*PARALLEL_KEYS, "order")}
    out = {name: int(args[a]) for a, name in _ARGS_PARALLEL.items() if isinstance(args.get(a), int)}
    if "use_distributed_optimizer" in args:
        out["zero"] = 1 if args["use_distributed_optimizer"] else 0
    return out


def args_dims(args: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    """Model dims the files' ``args`` record, limited to those the spec declares."""
    if isinstance(args.get("model"), Mapping):
        found = dict(args["model"])
    else:
        found = {name: args[a] for a, name in ARGS_DIMS.items() if args.get(a) is not None}
        if not args.get("group_query_attention", True):
            found.pop("kv_heads", None)
        if "untie_embeddings_and_output_weights" in args:
            found["tied"] = not args["untie_embeddings_and_output_weights"]
    return {k: v for k, v in found.items() if k in declared}


class DirScan:
    """What the directory holds: rank directory names by parsed numbers, and distrib_optim files per directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dirs: dict[tuple[int, ...], str] = {}
        for n in sorted(os.listdir(root)):
            m = _RANK_DIR.match(n)
            if m and os.path.isdir(os.path.join(root, n)):
                self.dirs[tuple(int(g) for g in m.groups() if g is not None)] = n
        if not self.dirs:
            raise CheckpointNotFoundError(f"{root}: no Megatron rank directories (mp_rank_*/)")
        widths = {len(k) for k in self.dirs}
        if len(widths) > 1:
            names = ", ".join(sorted(self.dirs.values())[:6])
            raise CorruptCheckpointError(f"{root}: rank directories of mixed forms ({names}); remove the ones of "
                                         "another save")
        self.width = widths.pop()
        self.optim: dict[str, list[int]] = {}
        for name in self.dirs.values():
            files = os.listdir(os.path.join(root, name))
            if "distrib_optim.pt" in files:
                raise FormatNotImplementedError(
                    f"{root}/{name}/distrib_optim.pt: Megatron-LM's gathered distributed-optimizer file is not "
                    "supported (its parameter-range format is not what the specs describe); only per-DP-rank "
                    "distrib_optim_XXX.pt files are read")
            self.optim[name] = sorted(int(m.group(1)) for f in files if (m := _OPTIM_FILE.match(f)))

    def infer(self, known: Mapping[str, Any], model_empty: bool) -> dict[str, Any]:
        """Parallel settings from the names (those in ``known`` win): tp, pp, ep from the directories, dp from the
        distrib_optim files, zero from their presence (3 when the model files hold no weights)."""
        out = dict(known)
        cols = list(zip(*self.dirs))
        out.setdefault("tp", max(cols[0]) + 1)
        if self.width == 3:
            out.setdefault("pp", max(cols[1]) + 1)
            out.setdefault("ep", max(cols[2]) + 1)
        elif self.width == 2:  # pp or ep: pp unless the known settings say pp == 1
            axis = "ep" if out.get("pp", 0) == 1 or out.get("ep", 1) > 1 else "pp"
            out.setdefault(axis, max(cols[1]) + 1)
        out.setdefault("pp", 1)
        out.setdefault("ep", 1)
        ranks = sorted({d for v in self.optim.values() for d in v})
        if "zero" not in out:
            out["zero"] = 0 if not ranks else (3 if model_empty else 1)
        out.setdefault("dp", len(ranks) if ranks else out["ep"])
        return out


def walk_payload(obj: Any, key: str, rel: str, path: tuple[Any, ...], tensors: dict[str, tuple[str, tuple[Any, ...]]],
                 values: dict[str, Any], where: str, keep_inert: bool = False) -> None:
    """Flatten a payload subtree into local keys: tensors -> (file, path), other leaves -> nested values.

    Transformer Engine's ``*._extra_state`` entries (FP8 scaling history: a byte tensor, a pickled ``BytesIO`` or
    None) are not model state a spec describes (the TE specs list them as ``inert``); they are dropped unless
    ``keep_inert`` (for listing keys)."""
    if key.endswith("_extra_state") and not keep_inert:
        return
    if isinstance(obj, torch.Tensor):
        tensors[key] = (rel, path)
    elif isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            comp, _ = K.component(k, f"{where}: key {key!r}")
            walk_payload(v, K.join(key, comp), rel, (*path, k), tensors, values, where, keep_inert)
    elif not (isinstance(obj, Mapping) and not obj):
        values[key] = obj


def local_keys(root: str, allow_pickle: bool = False, load: Any = None) -> list[str]:
    """Every rank file's flattened local keys (``model/...``, ``optim/...``, ``iteration``; ``_extra_state``
    entries included), as a spec sees them: what ``ckpt spec check --against`` and spec detection match."""
    root, _ = resolve_checkpoint_dir(root)
    scan = DirScan(root)
    keys: set[str] = set()
    for d in scan.dirs.values():
        files = [MODEL_FILE] if os.path.isfile(os.path.join(root, d, MODEL_FILE)) else []
        files += [f"distrib_optim_{i:03d}.pt" for i in scan.optim[d]]
        for name in files:
            rel = f"{d}/{name}"
            path = os.path.join(root, rel)
            payload = load(path) if load is not None else load_megatron_file(path, allow_pickle)
            if not isinstance(payload, Mapping):
                raise CorruptCheckpointError(f"{root}/{rel}: holds a {type(payload).__name__}, expected a dict")
            tensors: dict[str, tuple[str, tuple[Any, ...]]] = {}
            values: dict[str, Any] = {}
            for top, entry in (("model", "model"), ("optim", "optimizer")):
                if isinstance(payload.get(entry), Mapping):
                    walk_payload(payload[entry], top, rel, (entry,), tensors, values, f"{root}/{rel}", keep_inert=True)
            keys.update(tensors)
            keys.update(values)
            if "iteration" in payload:
                keys.add("iteration")
    return sorted(keys)


def dims_from_shapes(model: Mapping[str, Any], layout: Mapping[str, Any]) -> dict[str, str]:
    """What one rank's model tensors say about the model dims (shown when the files have no ``args``): dim ->
    value or a hint, for the Megatron-Core names of docs/megatron-layout.md. Only what the shapes determine."""
    tp = int(layout.get("tp", 1))
    shapes = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
    out: dict[str, str] = {}
    for k, shape in shapes.items():
        if k.endswith(("layernorm.weight", "layer_norm_weight")) and len(shape) == 1:
            out["hidden"] = str(shape[0])
        if k == "embedding.word_embeddings.weight" or k == "output_layer.weight":
            out["vocab"] = f"<the real vocabulary size, at most {shape[0] * tp}>"
            out["hidden"] = str(shape[1])
    layers = {m.group(1) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if layers and int(layout.get("pp", 1)) == 1:
        out["layers"] = str(len(layers))
    elif layers:
        out["layers"] = f"<all layers; this stage holds {len(layers)}>"
    for k, shape in shapes.items():
        if k.endswith("mlp.linear_fc2.weight") and ".experts." not in k:
            out["ffn"] = str(shape[1] * tp)
        if k.endswith("self_attention.linear_qkv.weight"):
            proj = next((s for n, s in shapes.items() if n == k.replace("linear_qkv", "linear_proj")), None)
            if proj is not None:
                q, kv2 = proj[1] * tp, (shape[0] - proj[1]) * tp
                out["heads"] = f"<H with H * head_dim = {q}>"
                out["kv_heads"] = f"<K with K * head_dim = {kv2 // 2} (if every TP rank holds its own KV heads)>"
    return out


def missing_dims_text(first: str, spec: str, missing: list[str], has_args: bool, inferred: Mapping[str, Any],
                      known: Mapping[str, Any], shapes: Mapping[str, str]) -> str:
    """The error for dims neither given nor in ``args``: which to pass, with what the tensor shapes say of each,
    and the layout to pass with them (from the directory names when ``args`` does not record it)."""
    why = "the files record no args" if not has_args else "the files' args do not record them"
    hint = ", ".join(f'"{d}": {shapes.get(d, "<?>")}' for d in missing)
    layout = ",".join(f"{k}={inferred[k]}" for k in ("tp", "pp", "dp", "ep", "zero") if k in inferred)
    from_where = "recorded in args" if all(k in known for k in ("tp", "pp")) else "read from the directory names"
    return (f"{first}: spec '{spec}' needs the model dims {missing}, and {why}. Pass them, for example\n"
            f"  --dims '{{{hint}}}' --source-layout {layout}\n"
            f"(values in <> are what the tensor shapes leave open; the layout is {from_where}: check it)")


def megatron_settings(root: str, allow_pickle: bool = False) -> dict[str, int]:
    """The layout settings of the rank directories (``args``, else the names and files), for ``check``."""
    root, _ = resolve_checkpoint_dir(root)
    scan = DirScan(root)
    first = load_megatron_file(os.path.join(root, next(iter(scan.dirs.values())), MODEL_FILE), allow_pickle)
    args = args_dict(first.get("args")) if isinstance(first, Mapping) else {}
    empty = not (isinstance(first, Mapping) and first.get("model"))
    return {k: int(v) for k, v in scan.infer(args_parallel(args), empty).items() if k != "order"}
