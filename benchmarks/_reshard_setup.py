"""Set-up of ``benchmarks.reshard``: the reference model's config and the source checkpoints (nothing here is timed).

Run by ``benchmarks.reshard`` in a child process (``python -m benchmarks._reshard_setup ...``), so the few GB of
logical state it generates are returned to the system before anything is measured. It draws one logical state
(weights as ``megatron_ref`` initialises them, random Adam moments), saves it once with ``ckpt.save`` (plain
logical tensors: the universal checkpoint of a tp=1,pp=1,dp=1 run) and ``reshard``\\ s that into each requested
source layout, so the 16 ranks' states of the source layout never exist in memory. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

import megatron_ref as M

FAMILIES_TINY = {"gpt": M.gpt_tiny, "llama": M.llama_tiny}


def model_config(family: str, millions: int, quick: bool) -> M.ModelConfig:
    """``sized(family, millions)``; ``quick``: a tiny model that still splits over tp=4 and pp=4."""
    if quick:
        return FAMILIES_TINY[family](hidden=128, heads=4, kv_heads=4 if family == "gpt" else 2, head_dim=32,
                                     ffn=512 if family == "gpt" else 384, vocab=1000, layers=4)
    return M.sized(family, millions)


def spec_dims(mc: M.ModelConfig) -> dict[str, Any]:
    """The model dimensions the shipped spec of ``mc.family`` asks for (as ``tests/test_reshard.py`` does)."""
    from resharding.spec_bind import resolve_spec

    names = {d.name for d in resolve_spec(mc.family).dims}
    return {k: v for k, v in asdict(mc).items() if k in names}


def logical_state(mc: M.ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Nested logical state: ``model/<name>``, ``optim/state/<name>/{exp_avg,exp_avg_sq,step}``, param groups and
    the iteration (the keys a spec-described save of the reference model writes)."""
    g = torch.Generator().manual_seed(seed)
    weights = M.logical_getter(mc)
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {}
    for name, shape in M.logical_specs(mc):
        model[name] = weights(name)
        optim[name] = {"exp_avg": torch.randn(shape, generator=g).mul_(1e-3),
                       "exp_avg_sq": torch.rand(shape, generator=g).mul_(1e-6),
                       "step": torch.tensor(1000.0)}
    return {"model": model, "optim": {"state": optim, "param_groups": M.OptimConfig().param_groups()},
            "iteration": 1000}


def build(family: str, millions: int, quick: bool, base: str, layouts: dict[str, str]) -> dict[str, Any]:
    """Write ``base/<name>`` as every rank of ``layouts[name]`` would have saved it; -> facts about the state."""
    import ckpt
    from formats.storage import open_storage
    from resharding.offline import reshard
    from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec

    mc = model_config(family, millions, quick)
    dims = spec_dims(mc)
    t0 = time.perf_counter()
    state = logical_state(mc)
    gen_secs = time.perf_counter() - t0
    shapes = dict(M.logical_specs(mc))
    logical_dir = os.path.join(base, "logical-tp1")
    t0 = time.perf_counter()
    ckpt.save(state, logical_dir)
    save_secs = time.perf_counter() - t0
    del state
    out: dict[str, Any] = {
        "model_config": asdict(mc), "dims": dims, "num_params": M.num_params(mc),
        "largest_tensor": max(shapes, key=lambda k: math.prod(shapes[k])),
        "largest_tensor_bytes": max(math.prod(s) for s in shapes.values()) * 4,
        "generate_secs": gen_secs, "save_tp1_secs": save_secs, "sources": {},
    }
    spec = resolve_spec(family)
    for name, layout in layouts.items():
        t0 = time.perf_counter()
        r = reshard(open_storage(logical_dir), open_storage(os.path.join(base, name)),
                    SpecBinding(spec, dims, parse_parallel(layout)))
        out["sources"][name] = {"layout": layout, "path": r.path, "bytes_written": r.bytes_written,
                                "secs": time.perf_counter() - t0}
    shutil.rmtree(logical_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._reshard_setup", description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="gpt", choices=sorted(FAMILIES_TINY))
    ap.add_argument("--millions", type=int, default=350)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", required=True, help="where the source checkpoints go")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=LAYOUT",
                    help="a source checkpoint to write, e.g. 'src=tp=4,pp=2,dp=2' (repeatable)")
    args = ap.parse_args(argv)
    layouts = dict(s.split("=", 1) for s in args.source)
    print(json.dumps(build(args.family, args.millions, args.quick, args.dir, layouts)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
