"""A reference Megatron-style model: the producer of rank-local state for the project's tests and benchmarks.

It imitates Megatron-core's layout (docs/megatron-layout.md) with torch, numpy and the standard library only:
tensor, pipeline, data and expert parallelism, fused QKV (GQA, uneven head splits), SwiGLU, vocab padding, tied
embeddings across stages, ZeRO flat optimizer partitions, the rank-local state dict and Megatron-style files.
See docs/reference-model.md for how to run it.
"""

from megatron_ref.checkpoint import checkpoint_dir, load_megatron, save_megatron
from megatron_ref.config import (ConfigError, LayoutMismatchError, MegatronRefError, ModelConfig, OptimConfig,
                                 ParallelConfig, check_compatible, gpt_tiny, llama_tiny, mixtral_tiny, sized)
from megatron_ref.logical import logical_getter, logical_init, logical_specs, num_params
from megatron_ref.model import GPTModel, build_model
from megatron_ref.optimizer import DenseAdamW, FlatAdamW, build_optimizer
from megatron_ref.oracle import local_layout, to_local, to_logical
from megatron_ref.parallel import Coords, ParallelState, all_groups, coords, group_ranks, rank_of, split, split_range
from megatron_ref.state import clone_state, flatten_state, load_rank_state, rank_state, unflatten_state
from megatron_ref.train import batch, local_share, train_step

__all__ = [
    "ModelConfig", "ParallelConfig", "OptimConfig", "check_compatible", "gpt_tiny", "llama_tiny", "mixtral_tiny",
    "sized", "MegatronRefError", "ConfigError", "LayoutMismatchError",
    "split", "split_range", "Coords", "coords", "rank_of", "group_ranks", "all_groups", "ParallelState",
    "logical_specs", "logical_init", "logical_getter", "num_params",
    "GPTModel", "build_model", "DenseAdamW", "FlatAdamW", "build_optimizer",
    "batch", "local_share", "train_step",
    "rank_state", "load_rank_state", "flatten_state", "unflatten_state", "clone_state",
    "local_layout", "to_local", "to_logical",
    "save_megatron", "load_megatron", "checkpoint_dir",
]
