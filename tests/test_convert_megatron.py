"""Importing Megatron rank directories (``mp_rank_XX[_YYY][_ZZZ]/``) into the universal format, given a spec.

The producer is real: ``megatron_ref`` trains on gloo ranks (``run_distributed``) and writes its files with
``save_megatron``; the same ranks also ``ckpt.save`` their rank state with the spec. The importer under test
(``resharding.megatron_dirs`` / ``resharding.megatron_import``, ``ckpt convert --from megatron``) must give every
logical tensor of the oracle ``megatron_ref.to_logical`` bit for bit, the same keys and values as that
``ckpt.save`` checkpoint, and a checkpoint that loads under other layouts (``export_rank``, ``ckpt.load`` plus
``megatron_ref.load_rank_state``) bit-exactly. Megatron-LM itself needs CUDA; its file conventions (``iter_*/``,
``latest_checkpointed_iteration.txt``, an ``argparse.Namespace`` in ``args``, numpy RNG state) are imitated by
rewriting the reference model's files, as a unit test only.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import ckpt
import megatron_ref as M
from ckpt.cli import main as cli
from ckpt.errors import IncompleteCheckpointError, ShardMismatchError, SpecError, UnsafeCheckpointError
from formats.foreign import diff, open_source
from formats.reader import read_manifest
from formats.storage import open_storage
from megatron_ref.state import clone_state, flatten_state
from resharding.megatron_dirs import MegatronSource
from resharding.megatron_import import import_megatron
from resharding.offline import export_rank
from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec
from tests.distributed_utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS = 2
GLOBAL_BATCH = 4


def spec_dims(mc: M.ModelConfig) -> dict[str, Any]:
    names = {d.name for d in resolve_spec(mc.family).dims}
    return {k: v for k, v in asdict(mc).items() if k in names}


def layout_text(pc: M.ParallelConfig) -> str:
    return f"tp={pc.tp},pp={pc.pp},dp={pc.dp},ep={pc.ep},zero={pc.zero},order={pc.order}"


def _produce(rank: int, world: int, mc: M.ModelConfig, pc: M.ParallelConfig, root: str) -> dict[str, Any]:
    """One rank: train, write Megatron files and a ``ckpt.save`` checkpoint of the same state; return the state."""
    model = M.build_model(mc, pc, M.ParallelState.create(pc))
    opt = M.build_optimizer(model)
    for _ in range(STEPS):
        M.train_step(model, opt, GLOBAL_BATCH)
    M.save_megatron(f"{root}/megatron", model, opt)
    ckpt.save(M.rank_state(model, opt), f"{root}/saved", spec=mc.family, dims=spec_dims(mc), layout=layout_text(pc))
    return clone_state(M.rank_state(model, opt))


#: name -> (model, layout written, another layout to load into)
CASES: dict[str, tuple[M.ModelConfig, M.ParallelConfig, M.ParallelConfig]] = {
    "gpt tp2 pp2 zero0 (tied across stages)": (M.gpt_tiny(), M.ParallelConfig(tp=2, pp=2),
                                               M.ParallelConfig(pp=2, dp=2, zero=2)),
    "llama tp2 dp2 zero1 (GQA)": (M.llama_tiny(), M.ParallelConfig(tp=2, dp=2, zero=1), M.ParallelConfig(tp=4)),
    "mixtral dp2 ep2 zero3": (M.mixtral_tiny(), M.ParallelConfig(dp=2, ep=2, zero=3),
                              M.ParallelConfig(tp=2, pp=2)),
}
GPT = "gpt tp2 pp2 zero0 (tied across stages)"
LLAMA = "llama tp2 dp2 zero1 (GQA)"


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """Case name -> (its directory with ``megatron/`` and ``saved/``, the oracle's logical state); made once."""
    cache: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(name: str) -> tuple[Path, dict[str, Any]]:
        if name not in cache:
            mc, pc, _ = CASES[name]
            root = tmp_path_factory.mktemp("run")
            states = run_distributed(_produce, pc.world, mc, pc, str(root), timeout_secs=240)
            cache[name] = (root, M.to_logical(dict(enumerate(states)), mc, pc))
        return cache[name]

    return get


def _tensors(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_import_is_the_logical_state_and_loads_under_another_layout(produced: Any, tmp_path: Path, name: str) -> None:
    mc, pc, other = CASES[name]
    root, logical = produced(name)
    with MegatronSource(str(root / "megatron"), mc.family) as src:  # dims and layout from the files' args
        assert src.binding.parallel == parse_parallel(layout_text(pc))
        assert src.binding.dims == spec_dims(mc)
        want = _tensors(logical)
        assert sorted(src.tensors) == sorted(want)
        bad = [k for k in want if not _same(src.read(k), want[k])]
        assert not bad, f"{len(bad)} logical tensors differ from the oracle: {bad[:5]}"
        assert src.values["iteration"] == STEPS
        assert src.values["optim/param_groups/1/weight_decay"] == logical["optim/param_groups"][1]["weight_decay"]
    out = tmp_path / "universal"
    result = import_megatron(str(root / "megatron"), str(out), mc.family)
    assert result.plan.tensors == len(want)
    # The same keys, dtypes, shapes, values and bits as the ranks' own ckpt.save with the spec.
    with open_source(str(out)) as a, open_source(str(root / "saved")) as b:
        report = diff(a, b)
    assert report.equal, [d.detail for d in report.differences][:5]
    saved = read_manifest(open_storage(str(out))).layout["spec"]
    binding = SpecBinding.from_json_dict(saved, str(out))
    assert binding.parallel == parse_parallel(layout_text(pc)) and binding.spec.name == mc.family
    # Every rank of another layout gets exactly what the oracle lays out for it.
    storage = open_storage(str(out))
    manifest = read_manifest(storage)
    target = binding.with_parallel(layout_text(other))
    for r in range(other.world):
        got = export_rank(storage, target, r, manifest)
        expect = _tensors(flatten_state(M.to_local(logical, mc, other, r)))
        assert sorted(got) == sorted(expect), f"{other} rank {r}: keys differ"
        bad = [k for k in expect if not _same(got[k], expect[k])]
        assert not bad, f"{other} rank {r}: {bad[:5]} differ"


def test_cli_convert_target_and_resume(produced: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mc, pc, _ = CASES[GPT]
    root, logical = produced(GPT)
    src = str(root / "megatron")
    proc = subprocess.run([sys.executable, "-m", "ckpt.cli", "convert", src, str(tmp_path / "u"), "--from", "megatron",
                           "--spec", "gpt", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["src_format"] == "megatron" and doc["dst_format"] == "universal"
    assert doc["tensors"] == len(_tensors(logical)) and doc["megatron"]["source_layout"]["pp"] == 2
    with ckpt.open(str(tmp_path / "u")) as r:
        assert r.read("iteration") == STEPS
        assert torch.equal(r.read("model/embedding.word_embeddings.weight"),
                           logical["model/embedding.word_embeddings.weight"])

    # --from auto detects the directory; --target writes the universal checkpoint as a world-1 run would save it,
    # which the reference model then resumes from (ckpt.load into its rank state, then load_rank_state).
    assert cli(["convert", src, str(tmp_path / "t"), "--spec", "gpt", "--target", "tp=1,pp=1,dp=1",
                "--no-progress"]) == 0
    assert "as tp=1,pp=1,dp=1" in capsys.readouterr().out
    # A multi-rank target is written directly, chunked exactly as `ckpt reshard` of the plain import would be.
    assert cli(["convert", src, str(tmp_path / "t4"), "--spec", "gpt", "--target", "tp=2,pp=2,dp=1",
                "--no-progress"]) == 0
    assert cli(["reshard", str(tmp_path / "u"), str(tmp_path / "r4"), "--to", "tp=2,pp=2,dp=1", "--no-progress"]) == 0
    direct, via = (read_manifest(open_storage(str(tmp_path / d))) for d in ("t4", "r4"))
    assert direct.layout["spec"] == via.layout["spec"]
    assert {k: sorted((c.offsets, c.sizes) for c in e.chunks) for k, e in direct.tensors.items()} == \
        {k: sorted((c.offsets, c.sizes) for c in e.chunks) for k, e in via.tensors.items()}
    with open_source(str(tmp_path / "t4")) as a, open_source(str(tmp_path / "r4")) as b:
        assert diff(a, b).equal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r4", "t", "t4", "u"]  # no intermediate copy anywhere
    # ckpt diff reads Megatron directories through --spec too: equal to their import; without --spec, exit 2.
    assert cli(["diff", src, str(tmp_path / "u"), "--spec", "gpt", "--no-progress"]) == 0
    assert cli(["diff", str(tmp_path / "t4"), src, "--spec", "gpt", "--json"]) == 0
    capsys.readouterr()
    assert cli(["diff", src, str(tmp_path / "u")]) == 2 and "--spec" in capsys.readouterr().err
    one = M.ParallelConfig()
    model = M.build_model(mc, one, logical=M.logical_init(M.gpt_tiny(seed=99)))
    opt = M.build_optimizer(model)
    state = M.rank_state(model, opt)
    ckpt.load(state, str(tmp_path / "t"), layout="tp=1,pp=1,dp=1")
    M.load_rank_state(model, opt, state)
    got = flatten_state(M.rank_state(model, opt))
    expect = flatten_state(M.to_local(logical, mc, one, 0))
    assert sorted(got) == sorted(expect)
    for k, v in expect.items():
        assert (_same(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v), k
    M.train_step(model, opt, GLOBAL_BATCH)  # and trains on

    # Other targets go through the same writers as every other format.
    assert cli(["convert", src, str(tmp_path / "m.pt"), "--from", "megatron", "--spec", "gpt", "--to", "torch",
                "--no-progress"]) == 0
    exported = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(exported["model"]["decoder.layers.3.self_attention.linear_q.weight"],
                       logical["model/decoder.layers.3.self_attention.linear_q.weight"])
    assert exported["iteration"] == STEPS
    capsys.readouterr()
    assert cli(["convert", src, str(tmp_path / "dry"), "--spec", "gpt", "--target", "tp=2,pp=1,dp=2,zero=1",
                "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and dry["megatron"]["target"]["dp"] == 2 and not (tmp_path / "dry").exists()

    # Usage errors exit 2 and say what to do.
    for argv, needle in [
        (["convert", src, str(tmp_path / "x")], "--spec"),
        (["convert", src, str(tmp_path / "x"), "--spec", "gpt", "--target", "tp=2", "--to", "torch"], "--target"),
        (["convert", src, str(tmp_path / "x"), "--spec", "gpt", "--dims", "[1]"], "--dims"),
        (["convert", src, str(tmp_path / "x"), "--spec", "gpt", "--target", "tp=3,qq=1"], "qq"),
        (["convert", str(tmp_path / "m.pt"), str(tmp_path / "x"), "--spec", "gpt"], "--from megatron"),
        (["convert", src, str(tmp_path / "u"), "--spec", "gpt"], "--overwrite"),
    ]:
        assert cli(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv


class _Evil:
    """A class a forged checkpoint could smuggle into ``args``."""


def _resave(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def test_bad_input_is_named(produced: Any, tmp_path: Path) -> None:
    root, _ = produced(GPT)
    gpt = tmp_path / "gpt"
    shutil.copytree(root / "megatron", gpt)
    shutil.rmtree(gpt / "mp_rank_01_001")
    with pytest.raises(IncompleteCheckpointError, match=r"mp_rank_01_001/model_optim_rng\.pt"):
        MegatronSource(str(gpt), "gpt")
    shutil.copytree(root / "megatron" / "mp_rank_01_001", gpt / "mp_rank_01_001")
    # A spec of another family, or dims that do not fit: the error names the key.
    with pytest.raises(SpecError, match=r"input_layernorm\.bias: no rule of the spec predicts this key"):
        MegatronSource(str(gpt), "llama")
    with pytest.raises(SpecError, match=r"embedding\.word_embeddings\.weight: the spec expects shape \[40, 32\]"):
        MegatronSource(str(gpt), "gpt", dims={"vocab": 70})
    # TP replicas that disagree: the key, the ranks and their files.
    key = "decoder.layers.0.input_layernorm.weight"
    _resave(gpt / "mp_rank_01_000" / "model_optim_rng.pt", lambda p: p["model"][key].add_(1.0))
    with MegatronSource(str(gpt), "gpt") as src:
        with pytest.raises(ShardMismatchError, match=r"(?s)input_layernorm\.weight.*ranks 0 and 1 differ.*"
                                                     r"rank 1: mp_rank_01_000/model_optim_rng\.pt"):
            src.read("model/" + key)
        src.read("model/decoder.layers.1.input_layernorm.weight")  # the others are fine
    # A class beyond tensors, containers and Megatron's Namespace: refused before anything runs, unless trusted.
    _resave(gpt / "mp_rank_00_001" / "model_optim_rng.pt", lambda p: p["args"].update(evil=_Evil()))
    refused = r"mp_rank_00_001/model_optim_rng\.pt.*test_convert_megatron\._Evil"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        MegatronSource(str(gpt), "gpt")
    # A missing distrib_optim file of a ZeRO-1 run.
    root, _ = produced(LLAMA)
    llama = tmp_path / "llama"
    shutil.copytree(root / "megatron", llama)
    (llama / "mp_rank_01" / "distrib_optim_001.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"mp_rank_01/distrib_optim_001\.pt"):
        MegatronSource(str(llama), "llama")


def test_megatron_lm_file_conventions(produced: Any, tmp_path: Path) -> None:
    """``iter_*/`` with ``latest_checkpointed_iteration.txt``, ``args`` as an ``argparse.Namespace`` with
    Megatron-LM's names (the real vocabulary is not among them: ``--dims``), numpy RNG state, Transformer Engine's
    ``_extra_state``: read without unpickling any of their classes."""
    mc, pc, _ = CASES[GPT]
    root, logical = produced(GPT)
    ckdir = tmp_path / "run" / f"iter_{STEPS:07d}"
    shutil.copytree(root / "megatron", ckdir)
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text(f"{STEPS}\n")
    args = argparse.Namespace(
        num_layers=mc.layers, hidden_size=mc.hidden, num_attention_heads=mc.heads, group_query_attention=False,
        num_query_groups=1, kv_channels=mc.head_dim, ffn_hidden_size=mc.ffn, make_vocab_size_divisible_by=8,
        padded_vocab_size=mc.padded_vocab(pc.tp), untie_embeddings_and_output_weights=False,
        tensor_model_parallel_size=pc.tp, pipeline_model_parallel_size=pc.pp, use_distributed_optimizer=False,
        params_dtype=torch.float32, data_parallel_size=1)
    np.random.seed(0)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}]
    extra = {"decoder.layers.0.self_attention.linear_qkv._extra_state": io.BytesIO(b"fp8 scales"),
             "decoder.layers.0.mlp.linear_fc1._extra_state": None}  # Transformer Engine's, dropped
    for f in ckdir.glob("mp_rank_*/model_optim_rng.pt"):
        _resave(f, lambda p: (p.update(args=args, rng_state=rng), p["model"].update(extra)))
    with pytest.raises(SpecError, match=r"(?s)\['vocab'\].*--dims"):
        MegatronSource(str(tmp_path / "run"), "gpt")
    out = tmp_path / "u"
    assert cli(["convert", str(tmp_path / "run"), str(out), "--spec", "gpt", "--dims", json.dumps({"vocab": mc.vocab}),
                "--no-progress"]) == 0
    with open_source(str(out)) as a, open_source(str(root / "saved")) as b:
        report = diff(a, b)
    assert report.equal, [d.detail for d in report.differences][:5]
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(IncompleteCheckpointError, match="iter_0000007"):
        MegatronSource(str(tmp_path / "run"), "gpt", dims={"vocab": mc.vocab})
