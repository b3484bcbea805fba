"""Child processes of ``benchmarks.convert``: the source checkpoints, and torch's own DCP -> safetensors routes.

``python -m benchmarks._convert_setup deepspeed --dir D --stage 2 [--bf16] [--params-m 350] [--quick]`` trains a
``benchmarks.gpt`` decoder for ``--steps`` steps under DeepSpeed ZeRO on 2 gloo ranks (the approach of
``tests/deepspeed_producer.py``: a torch ``AdamW`` with two parameter groups that DeepSpeed wraps, untested
optimizer allowed) and saves it with ``engine.save_checkpoint``. ``dcp --dir D`` builds a ``transformers`` Llama
from a config (random init, nothing downloaded), shards it with FSDP2 (``fully_shard`` per decoder layer and at the
root) on 2 gloo ranks and saves its model state dict with ``torch.distributed.checkpoint.save``: a model-only
export, as torchtitan writes for conversion. Both build into ``D.partial`` and rename it to ``D`` when done, so an
interrupted build is never taken for a cached one; then both write facts about the checkpoint to ``D.json`` (a
cached source is one with both) and print them as one JSON line. Nothing of the set-up is timed by the benchmark.

``torch-route pt|hf SRC DST`` is a *measured* peer: DCP to safetensors through torch's own APIs only, timed by the
parent like ``ckpt convert`` (a fresh process each run). ``pt``: ``format_utils.dcp_to_torch_save`` to
``DST/consolidated.pt``, ``torch.load`` it, ``safetensors.torch.save_file`` to ``DST/model.safetensors``, delete the
``.pt``. ``hf``: load the DCP checkpoint into memory the way ``dcp_to_torch_save`` does (``_load_state_dict`` with
``_EmptyStateDictLoadPlanner``) and save it with DCP's ``HuggingFaceStorageWriter`` (safetensors shards and
``model.safetensors.index.json``). ``_consolidate_hf_safetensors`` is no third route: it merges the shards that
``HuggingFaceStorageWriter(save_distributed=True)`` writes, not ``.distcp`` files. Prints its phases as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.gpt import GPTConfig

DP = 2


# -- DeepSpeed ZeRO source ---------------------------------------------------------------------------------------
def gpt_config(params_m: float, quick: bool) -> GPTConfig:
    """``GPTConfig.for_params`` (``--quick``: about 5 M parameters)."""
    return GPTConfig.for_params(5 if quick else params_m)


@dataclass(frozen=True)
class DsGptJob:
    out: str
    stage: int
    bf16: bool
    steps: int
    gpt: dict[str, int]


def ds_rank(rank: int, world_size: int, job: DsGptJob) -> dict[str, Any]:
    """One DeepSpeed rank (spawned by ``run_distributed``, already in a gloo group): train ``job.steps``, save."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed  # noqa: PLC0415 - in the rank process only
    from torch.nn import functional as F

    from benchmarks.gpt import GPT, synthetic_batch
    from tests.deepspeed_producer import CLIENT_STATE, DsJob, ds_config, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = GPTConfig(**job.gpt)
    torch.manual_seed(0)
    model = GPT(cfg)
    optim = torch.optim.AdamW(param_groups(model), lr=1e-3, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim,
                                           config=ds_config(DsJob(out=job.out, stage=job.stage, bf16=job.bf16)))
    losses = []
    for step in range(job.steps):
        tokens = synthetic_batch(cfg, 2, step, seed=rank)
        logits = engine(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.save_checkpoint(job.out, client_state=dict(CLIENT_STATE))
    return {"losses": losses, "global_steps": engine.global_steps}


# -- DCP (FSDP2) source ------------------------------------------------------------------------------------------
def llama_config(quick: bool) -> dict[str, Any]:
    """About 271 M parameters (``--quick``: about 3 M); untied head, as in most sharded training setups."""
    if quick:
        return dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)


def dcp_rank(rank: int, world_size: int, out: str, config: dict[str, Any]) -> dict[str, Any]:
    """One FSDP2 rank: build the Llama (the same seed on every rank), shard it, ``dcp.save`` its model state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save(get_model_state_dict(model), checkpoint_id=out)
    return {"num_params": sum(p.numel() for p in model.parameters())}


# -- building ----------------------------------------------------------------------------------------------------
def tree_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, n)) for dp, _d, names in os.walk(root) for n in names)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Build ``args.dir`` (through ``args.dir + '.partial'``); -> facts about the checkpoint."""
    from tests.distributed_utils import run_distributed

    partial = args.dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    if args.kind == "deepspeed":
        cfg = gpt_config(args.params_m, args.quick)
        job = DsGptJob(out=partial, stage=args.stage, bf16=args.bf16, steps=args.steps, gpt=asdict(cfg))
        ranks = run_distributed(ds_rank, DP, job, timeout_secs=1800)
        with open(os.path.join(partial, "latest"), encoding="utf-8") as f:
            tag = f.read().strip()
        facts: dict[str, Any] = {"model": "benchmarks.gpt.GPT", "config": asdict(cfg), "num_params": cfg.num_params,
                                 "stage": args.stage, "bf16": args.bf16, "dp": DP, "steps": args.steps,
                                 "tag": tag, "losses": [r["losses"] for r in ranks]}
    else:
        config = llama_config(args.quick)
        ranks = run_distributed(dcp_rank, DP, partial, config, timeout_secs=1800)
        facts = {"model": "transformers LlamaForCausalLM (FSDP2, model state only)", "config": config,
                 "num_params": ranks[0]["num_params"], "dp": DP}
    facts["build_secs"] = time.perf_counter() - t0
    facts["bytes"] = tree_bytes(partial)
    os.replace(partial, args.dir)
    with open(args.dir + ".json", "w", encoding="utf-8") as f:  # beside it, so the tools never see it
        json.dump(facts, f)
    return facts


# -- torch's routes (measured) -----------------------------------------------------------------------------------
def torch_route(route: str, src: str, dst: str) -> dict[str, Any]:
    """DCP ``src`` -> safetensors under ``dst`` with torch's APIs only; -> seconds per phase."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    os.makedirs(dst, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    if route == "pt":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        tmp = os.path.join(dst, "consolidated.pt")
        dcp_to_torch_save(src, tmp)
        phases["dcp_to_torch_save"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        state = torch.load(tmp, weights_only=True)
        phases["torch.load"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        save_file(state, os.path.join(dst, "model.safetensors"))
        phases["save_file"] = time.perf_counter() - t1
        os.remove(tmp)
    else:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # What dcp_to_torch_save does (dcp.load returns at once for an empty state dict).
        state: dict[str, Any] = {}  # type: ignore[no-redef]
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(src), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        phases["_load_state_dict (_EmptyStateDictLoadPlanner)"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(dst), no_dist=True)
        phases["dcp.save (HuggingFaceStorageWriter)"] = time.perf_counter() - t1
    return {"route": route, "phases_secs": phases, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._convert_setup", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    ds = sub.add_parser("deepspeed", help="train and save a DeepSpeed ZeRO checkpoint")
    ds.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    ds.add_argument("--bf16", action="store_true")
    ds.add_argument("--params-m", type=float, default=350.0)
    ds.add_argument("--steps", type=int, default=2)
    d = sub.add_parser("dcp", help="save an FSDP2-sharded Llama with DCP")
    for p in (ds, d):
        p.add_argument("--dir", required=True)
        p.add_argument("--quick", action="store_true")
    tr = sub.add_parser("torch-route", help="DCP -> safetensors with torch's APIs (measured)")
    tr.add_argument("route", choices=("pt", "hf"))
    tr.add_argument("src")
    tr.add_argument("dst")
    args = ap.parse_args(argv)
    out = torch_route(args.route, args.src, args.dst) if args.kind == "torch-route" else build(args)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
