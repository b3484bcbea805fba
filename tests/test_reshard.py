"""Resharding through the universal format, checked against the reference model's own layout code.

The producer is ``megatron_ref``: its ``to_local`` (an implementation of docs/megatron-layout.md independent of
the spec language) builds every rank's state of a layout from one logical state, with random Adam moments. The
engine under test is the spec-driven one: ``import_ranks`` (every rank's tensors -> universal), ``reshard``
(universal -> universal under another layout, what ``ckpt reshard`` runs) and ``export_rank`` (universal -> one
rank's tensors). Every comparison is ``torch.equal``: moving bytes between layouts does no arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
import megatron_ref as M
from ckpt.errors import ShardMismatchError, SpecError
from formats.reader import read_manifest
from formats.storage import open_storage
from resharding.offline import export_rank, import_ranks, reshard
from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec
from tests.test_megatron_ref import random_logical_state

pytestmark = pytest.mark.timeout(600)

FAMILIES = {"gpt": M.gpt_tiny, "llama": M.llama_tiny, "mixtral": M.mixtral_tiny}


def spec_dims(mc: M.ModelConfig) -> dict[str, Any]:
    names = {d.name for d in resolve_spec(mc.family).dims}
    return {k: v for k, v in asdict(mc).items() if k in names}


logical_state = random_logical_state


def pc_of(layout: dict[str, Any]) -> M.ParallelConfig:
    return M.ParallelConfig(**{k: v for k, v in layout.items() if k in ("tp", "pp", "dp", "ep", "zero", "order")})


def rank_tensors(logical: dict[str, Any], mc: M.ModelConfig, layout: dict[str, Any]) -> dict[int, dict[str, Any]]:
    pc = pc_of(layout)
    n = pc.tp * pc.pp * pc.dp
    out = {}
    for r in range(n):
        flat = M.flatten_state(M.to_local(logical, mc, pc, r))
        out[r] = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return out


def assert_ranks_equal(storage: Any, binding: SpecBinding, want: dict[int, dict[str, torch.Tensor]], what: str) -> None:
    manifest = read_manifest(storage)
    for r, tensors in want.items():
        got = export_rank(storage, binding, r, manifest)
        assert sorted(got) == sorted(tensors), f"{what}: rank {r} keys differ"
        bad = [k for k in tensors if not torch.equal(got[k], tensors[k])]
        assert not bad, f"{what}: rank {r}: {bad[:5]} differ"


def layouts_for(family: str) -> list[dict[str, Any]]:
    """The issue's matrix: tp in 1..4, pp in 1,2,4, (dp, zero) in (1,0),(2,1),(2,3),(4,2), ep in 1,2 (MoE only)."""
    out = []
    for tp in (1, 2, 3, 4):
        for pp in (1, 2, 4):
            for dp, zero in ((1, 0), (2, 1), (2, 3), (4, 2)):
                for ep in ((1, 2) if family == "mixtral" else (1,)):
                    if dp % ep:
                        continue
                    out.append(dict(tp=tp, pp=pp, dp=dp, ep=ep, zero=zero))
    return out


def _chain(family: str, stride: int, offset: int) -> list[dict[str, Any]]:
    """Every ``stride``-th layout of the matrix (so the whole matrix is covered across the ``offset`` shards)."""
    return layouts_for(family)[offset::stride]


SHARDS = 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shard", range(SHARDS))
def test_reshard_matrix_there_and_back(tmp_path: Path, family: str, shard: int) -> None:
    """Each layout of the matrix (a third of it per test) is resharded to, compared bit-exact with the oracle, and
    resharded on to the next one; the chain ends back at the first layout, which must come back bit-exact."""
    mc = FAMILIES[family]()
    logical = logical_state(mc, seed=shard)
    spec = resolve_spec(family)
    dims = spec_dims(mc)
    chain = _chain(family, SHARDS, shard)
    first = chain[0]
    b0 = SpecBinding(spec, dims, parse_parallel(first))
    src = open_storage(str(tmp_path / "0"))
    states0 = rank_tensors(logical, mc, first)
    import_ranks(states0, src, b0, values={"iteration": 3})
    with ckpt.open(str(tmp_path / "0")) as r:  # the universal checkpoint holds exactly the logical state
        for k, v in logical.items():
            assert torch.equal(r.read(k), v), k
        assert r.read("iteration") == 3
    prev = src
    for i, lay in enumerate(chain[1:] + [first]):
        dst = open_storage(str(tmp_path / str(i + 1)))
        reshard(prev, dst, lay)
        want = states0 if lay is first else rank_tensors(logical, mc, lay)
        assert_ranks_equal(dst, b0.with_parallel(lay), want, f"{family} {lay}")
        prev = dst


@pytest.mark.parametrize("case", [
    ("llama", dict(heads=4, kv_heads=1), dict(tp=3), "4 heads over TP=3 with 1 KV head"),
    ("gpt", dict(vocab=10, vocab_divisible_by=1), dict(tp=3), "a 10-row vocabulary over TP=3"),
    ("llama", dict(), dict(tp=4), "SwiGLU at TP 2 -> 4"),
    ("gpt", dict(tied=True), dict(pp=4), "tied embedding with PP 1 -> 4"),
    ("mixtral", dict(experts=4), dict(dp=4, ep=4), "experts 4 over EP 2 -> 4 with expert moments"),
    ("mixtral", dict(), dict(dp=4, ep=2, zero=2), "ZeRO fragments crossing parameter boundaries"),
], ids=lambda c: c[3])
def test_hard_cases(tmp_path: Path, case: tuple[str, dict[str, Any], dict[str, Any], str]) -> None:
    family, overrides, target, _ = case
    mc = FAMILIES[family](**overrides)
    logical = logical_state(mc, seed=1)
    source = {"tp": 2, "ep": 2, "dp": 2} if family == "mixtral" else ({"tp": 2} if target.get("tp") == 4 else {})
    b = SpecBinding(resolve_spec(family), spec_dims(mc), parse_parallel(source))
    src = open_storage(str(tmp_path / "src"))
    import_ranks(rank_tensors(logical, mc, parse_parallel(source)), src, b)
    dst = open_storage(str(tmp_path / "dst"))
    reshard(src, dst, target)
    assert_ranks_equal(dst, b.with_parallel(target), rank_tensors(logical, mc, parse_parallel(target)), str(target))


def test_tp_replicas_that_disagree(tmp_path: Path) -> None:
    """A layer norm that differs between TP ranks: the shipped spec says replicated, so the error names the key;
    a spec that says averaged writes the mean."""
    mc = M.gpt_tiny()
    logical = logical_state(mc)
    lay = parse_parallel("tp=2")
    states = rank_tensors(logical, mc, lay)
    key = "model/decoder.layers.1.input_layernorm.weight"
    states[1][key] = states[1][key] + 1.0
    b = SpecBinding(resolve_spec("gpt"), spec_dims(mc), lay)
    with pytest.raises(ShardMismatchError, match=r"decoder\.layers\.1\.input_layernorm\.weight.*ranks 0 and 1 differ"):
        import_ranks(states, open_storage(str(tmp_path / "a")), b)
    text = Path(resolve_spec("gpt").file if Path(resolve_spec("gpt").file).is_file() else
                Path(__file__).parents[1] / resolve_spec("gpt").file).read_text()
    averaged = text.replace("replicated: tp", "averaged: tp")
    assert averaged != text
    b2 = SpecBinding(resolve_spec(averaged), spec_dims(mc), lay)
    import_ranks(states, open_storage(str(tmp_path / "b")), b2)
    with ckpt.open(str(tmp_path / "b")) as r:
        got = r.read(key)
    # The mean of w and w + 1 is w + 0.5 up to one rounding of the float32 result (the mean is computed in float64).
    torch.testing.assert_close(got, logical[key] + 0.5, rtol=0, atol=1e-6)


def test_reshard_cli(tmp_path: Path) -> None:
    mc = M.llama_tiny()
    logical = logical_state(mc)
    b = SpecBinding(resolve_spec("llama"), spec_dims(mc), parse_parallel("tp=2,dp=2,zero=1"))
    import_ranks(rank_tensors(logical, mc, b.parallel), open_storage(str(tmp_path / "src")), b,
                 values={"iteration": 3, "optim/param_groups/0/lr": 1e-3})
    cmd = [sys.executable, "-m", "ckpt.cli"]
    out = subprocess.run(cmd + ["reshard", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "tp=1,pp=4,dp=1",
                                "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ranks"] == 4 and doc["spec"] == "llama" and doc["to"]["pp"] == 4
    assert_ranks_equal(open_storage(str(tmp_path / "dst")), b.with_parallel("tp=1,pp=4,dp=1"),
                       rank_tensors(logical, mc, parse_parallel("tp=1,pp=4,dp=1")), "cli")
    again = subprocess.run(cmd + ["reshard", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "tp=2"],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a committed checkpoint is never replaced silently
    bad = subprocess.run(cmd + ["reshard", str(tmp_path / "src"), str(tmp_path / "x"), "--to", "tp=2,qq=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "qq" in bad.stderr
    check = subprocess.run(cmd + ["spec", "check", "llama", "--against", str(tmp_path / "dst"), "--json"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["ok"] is True
    check = subprocess.run(cmd + ["spec", "check", "gpt", "--against", str(tmp_path / "dst")],
                           capture_output=True, text=True)
    assert check.returncode == 1  # the GPT spec does not describe a Llama checkpoint


def test_load_time_resharding_single_process(tmp_path: Path) -> None:
    """``ckpt.save(..., spec=, layout=)`` of a whole model, then ``ckpt.load(..., layout=)`` at the same layout
    after a wipe: the round trip through logical tensors is exact, padding rows included."""
    mc = M.gpt_tiny()
    logical = logical_state(mc)
    state = M.to_local(logical, mc, M.ParallelConfig(), 0)
    ckpt.save(state, str(tmp_path / "c"), spec="gpt", dims=spec_dims(mc), layout="tp=1")
    fresh = M.to_local(logical_state(mc, seed=5), mc, M.ParallelConfig(), 0)
    ckpt.load(fresh, str(tmp_path / "c"), layout="tp=1")
    a, b = M.flatten_state(state), M.flatten_state(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    with pytest.raises(SpecError, match="layout="):
        ckpt.load(fresh, str(tmp_path / "c"), spec="gpt")
