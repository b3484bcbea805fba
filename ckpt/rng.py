"""Per-rank random number generator state as a Stateful object (python, numpy, torch CPU, every CUDA device).

Every value is a tensor under a rank-specific key (``rank_00003/torch_cpu``), so ranks never look like replicas of
each other and the state travels through the ordinary tensor path (no pickle). On load a rank takes its own
entry; entries of ranks that no longer exist (a smaller world) are ignored, and a rank with no entry (a larger
world) keeps its current generators.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_key(rank: int) -> str:
    return f"rank_{rank:05d}"


class RNGState:
    """``state_dict()``/``load_state_dict()`` of this process's generators, keyed by its rank."""

    def __init__(self, rank: int | None = None) -> None:
        self.rank = _rank() if rank is None else rank

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        own: dict[str, Any] = {
            "python_mt": torch.tensor(internal, dtype=torch.int64),
            "python_meta": torch.tensor([version, 0 if gauss is None else 1], dtype=torch.int64),
            "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
            "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
            "torch_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                own[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
        return {rank_key(self.rank): own}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        own = sd.get(rank_key(self.rank))
        if own is None:
            return
        version, has_gauss = (int(x) for x in own["python_meta"].tolist())
        gauss = float(own["python_gauss"][0]) if has_gauss else None
        random.setstate((version, tuple(int(x) for x in own["python_mt"].tolist()), gauss))
        pos, np_has_gauss = (int(x) for x in own["numpy_meta"].tolist())
        keys = own["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, np_has_gauss, float(own["numpy_gauss"][0])))
        torch.set_rng_state(own["torch_cpu"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"torch_cuda_{i}" in own:
                    torch.cuda.set_rng_state(own[f"torch_cuda_{i}"], i)
