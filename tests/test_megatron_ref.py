"""The reference Megatron-style model (``megatron_ref``): grid math, layout oracles, training equivalence, files.

Pure tests simulate every rank of a layout in this process: each rank's model is built with a simulated
``ParallelState`` (no process group), and its initial ``rank_state`` must equal the oracle's ``to_local`` of the
logical init bit for bit; ``to_logical`` must invert ``to_local`` exactly. The model slices with its own code
(``layers.py``), the oracle with its own (``oracle.py``), both from docs/megatron-layout.md.

Distributed tests spawn gloo ranks: 3 training steps in several layouts must give the losses and the final
logical state of the unsharded run (world 1, in this process), and the Megatron files must round-trip.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import megatron_ref as M
from megatron_ref.config import ConfigError, LayoutMismatchError
from megatron_ref.state import clone_state, flatten_state
from tests.distributed_utils import run_distributed

STEPS = 3
#: 5 rows: uneven DP shares at dp=2 (3 and 2), so EP gathers and loss scaling see unequal token counts.
GLOBAL_BATCH = 5
#: A sharded run differs from the unsharded one only by float reassociation (TP partial sums, DP/EP/TP gradient
#: sums in another order, split matmuls): fp32 rounding, ~1e-7 relative per op. Measured over the layouts below:
#: losses agree to 5e-7 absolute, and every final weight and Adam moment to 3e-5 of its tensor's largest
#: magnitude. The bounds leave about 10x room. A layout mistake is far larger: a wrong slice moves the loss in the
#: 3rd digit, and a missing or doubled gradient sum (which Adam's normalization hides in the weights) changes
#: the moments by tens of percent.
LOSS_ATOL = 5e-6
STATE_RTOL = 3e-4


def random_logical_state(mc: M.ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Random weights and Adam moments (every element distinct in practice) and one shared step count."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, shape in M.logical_specs(mc):
        out[f"model/{name}"] = torch.randn(shape, generator=g)
        out[f"optim/state/{name}/exp_avg"] = torch.randn(shape, generator=g)
        out[f"optim/state/{name}/exp_avg_sq"] = torch.rand(shape, generator=g)
        out[f"optim/state/{name}/step"] = torch.tensor(7.0)
    return out


def _mqa(**kw: Any) -> M.ModelConfig:
    """4 query heads, 1 KV head, vocab 10: over TP=3 the heads split 2/1/1, the KV group is on every rank, and the
    padded vocabulary is 24 rows (8 per rank: 8 real, 2 real, none)."""
    return M.llama_tiny(kv_heads=1, vocab=10, **kw)


def _equal_report(got: dict[str, Any], want: dict[str, Any], where: str) -> list[str]:
    """Bit-exact comparison of two flat states; a list of differences (empty when equal)."""
    problems = [f"{where}: key {k!r} only in one side" for k in sorted(set(got) ^ set(want))]
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                problems.append(f"{where}: {k} differs ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})")
        elif a != b:
            problems.append(f"{where}: {k}: {a!r} != {b!r}")
    return problems


def _check_initial_states(mc: M.ModelConfig, pc: M.ParallelConfig) -> dict[int, dict[str, Any]]:
    """Build every rank (simulated), compare with the oracle, return the oracle states."""
    logical = M.logical_init(mc)
    states, problems = {}, []
    for r in range(pc.world):
        model = M.build_model(mc, pc, M.ParallelState.simulated(pc, r))
        got = flatten_state(M.rank_state(model, M.build_optimizer(model)))
        states[r] = M.to_local(logical, mc, pc, r)
        problems += _equal_report(got, flatten_state(states[r]), f"{pc} rank {r}")
    assert not problems, "\n".join(problems[:20])
    return states


# ---------------------------------------------------------------- pure: split, grid, configs


def test_split_uneven_and_ranges() -> None:
    assert M.split(10, 3) == [4, 3, 3]
    assert M.split(4, 3) == [2, 1, 1]
    assert M.split(2, 4) == [1, 1, 0, 0]
    assert [M.split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 3), (7, 3)]
    for n, parts in itertools.product(range(0, 13), range(1, 6)):
        counts = M.split(n, parts)
        assert sum(counts) == n and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_grid_default_order() -> None:
    pc = M.ParallelConfig(tp=2, pp=2, dp=4, ep=2)  # order tp-ep-dp-pp: tp fastest, then dp, then pp
    assert M.coords(0, pc) == M.Coords(tp=0, pp=0, dp=0, ep=0, edp=0)
    assert M.coords(1, pc) == M.Coords(tp=1, pp=0, dp=0, ep=0, edp=0)
    assert M.coords(2, pc) == M.Coords(tp=0, pp=0, dp=1, ep=1, edp=0)
    assert M.coords(4, pc) == M.Coords(tp=0, pp=0, dp=2, ep=0, edp=1)
    assert M.coords(9, pc) == M.Coords(tp=1, pp=1, dp=0, ep=0, edp=0)
    assert M.group_ranks(pc, "tp", 5) == [4, 5]
    assert M.group_ranks(pc, "dp", 1) == [1, 3, 5, 7]
    assert M.group_ranks(pc, "ep", 5) == [5, 7]  # dp 2, 3: same edp 1
    assert M.group_ranks(pc, "edp", 3) == [3, 7]  # dp 1, 3: same ep 1
    assert M.group_ranks(pc, "pp", 3) == [3, 11]
    assert M.group_ranks(pc, "embedding", 11) == [3, 11]


@pytest.mark.parametrize("order", ["tp-ep-dp-pp", "tp-dp-pp", "pp-tp-dp", "ep-dp-tp-pp", "dp-pp-tp", "pp-ep-dp-tp"])
def test_grid_orders_are_bijective_and_groups_partition(order: str) -> None:
    pc = M.ParallelConfig(tp=2, pp=3, dp=2, ep=2, order=order)
    seen = {(c.tp, c.pp, c.dp) for c in (M.coords(r, pc) for r in range(pc.world))}
    assert len(seen) == pc.world
    for r in range(pc.world):
        c = M.coords(r, pc)
        assert M.rank_of(pc, c.tp, c.pp, c.dp) == r and (c.ep, c.edp) == (c.dp % 2, c.dp // 2)
    fastest = pc.axes()[0]
    assert getattr(M.coords(1, pc), fastest) == 1
    for kind, size in (("tp", 2), ("pp", 3), ("dp", 2), ("ep", 2), ("edp", 1)):
        groups = M.all_groups(pc, kind)
        assert sorted(r for g in groups for r in g) == list(range(pc.world))
        assert all(len(g) == size for g in groups)
        for g in groups:
            for r in g:
                assert M.group_ranks(pc, kind, r) == g
    for g in M.all_groups(pc, "embedding"):
        stages = {M.coords(r, pc).pp for r in g}
        assert stages in ({0, 2}, {1})


def test_config_validation() -> None:
    for bad in ("tp-pp", "tp-dp-pp-ep", "ep-tp-dp-pp", "tp-dp-dp", "tp-ep-ep-dp-pp"):
        with pytest.raises(ConfigError):
            M.ParallelConfig(order=bad)
    with pytest.raises(ConfigError, match="ep=3 must divide dp=4"):
        M.ParallelConfig(dp=4, ep=3)
    with pytest.raises(ConfigError):
        M.ParallelConfig(zero=4)
    with pytest.raises(ConfigError, match="kv_heads"):
        M.ModelConfig(heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="mixtral"):
        M.ModelConfig(family="mixtral", experts=0)
    with pytest.raises(ConfigError, match="ep=2 needs a MoE"):
        M.local_layout(M.gpt_tiny(), M.ParallelConfig(dp=2, ep=2), 0)
    big = M.sized("gpt", 125)
    assert 100e6 < M.num_params(big) < 200e6
    assert 1.0e9 < M.num_params(M.sized("llama", 1300)) < 1.8e9


# ---------------------------------------------------------------- pure: layout facts and oracles

def test_layout_facts_uneven_heads_and_vocab() -> None:
    mc, pc = _mqa(), M.ParallelConfig(tp=3)
    hd, h = mc.head_dim, mc.hidden
    assert mc.padded_vocab(3) == 24
    states = _check_initial_states(mc, pc)
    for t, q_t in enumerate((2, 1, 1)):
        model = flatten_state(states[t])
        assert model["model/decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((q_t + 2) * hd, h)
        assert model["model/decoder.layers.0.self_attention.linear_proj.weight"].shape == (h, q_t * hd)
        emb = model["model/embedding.word_embeddings.weight"]
        assert emb.shape == (8, h) and int((emb.abs().sum(1) != 0).sum()) == (8, 2, 0)[t]
    logical = M.logical_init(mc)
    k = logical["decoder.layers.1.self_attention.linear_k.weight"]
    for t in range(3):  # the single KV group is a replica on every TP rank, after this rank's query heads
        qkv = flatten_state(states[t])["model/decoder.layers.1.self_attention.linear_qkv.weight"]
        q_t = (2, 1, 1)[t]
        assert torch.equal(qkv[q_t * hd:(q_t + 1) * hd], k)


def test_fused_qkv_grouped_order() -> None:
    mc, pc = M.llama_tiny(heads=4, kv_heads=2), M.ParallelConfig(tp=1)
    hd = mc.head_dim
    lg = M.logical_init(mc)
    qkv = M.to_local(lg, mc, pc, 0)["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    a = "decoder.layers.0.self_attention."
    q, k, v = (lg[a + f"linear_{x}.weight"] for x in "qkv")
    want = torch.cat([q[0:2 * hd], k[0:hd], v[0:hd], q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
    assert torch.equal(qkv, want)


LAYOUTS = [
    (M.gpt_tiny(), dict(tp=2)), (M.gpt_tiny(), dict(tp=3, pp=2, zero=1)), (M.gpt_tiny(), dict(pp=3, dp=2, zero=3)),
    (M.gpt_tiny(vocab=10), dict(tp=3, dp=2, zero=2)), (M.llama_tiny(), dict(tp=2, pp=2, dp=2, zero=1)),
    (M.llama_tiny(), dict(tp=3, pp=4, order="pp-tp-dp")), (_mqa(), dict(tp=3)), (_mqa(), dict(tp=4, dp=2, zero=3)),
    (_mqa(tied=True), dict(tp=3, pp=2, zero=2, order="dp-pp-tp")), (M.mixtral_tiny(), dict(dp=4, ep=4, zero=1)),
    (M.mixtral_tiny(), dict(tp=2, dp=4, ep=2, zero=3)), (M.mixtral_tiny(), dict(tp=3, pp=2, dp=3, ep=3)),
    (M.mixtral_tiny(experts=5), dict(dp=2, ep=2, zero=2, order="ep-dp-tp-pp")),
]


@pytest.mark.parametrize("mc,kw", LAYOUTS, ids=[f"{mc.family}-{kw}" for mc, kw in LAYOUTS])
def test_model_matches_oracle_and_round_trips(mc: M.ModelConfig, kw: dict[str, Any]) -> None:
    pc = M.ParallelConfig(**kw)
    _check_initial_states(mc, pc)
    # A logical state with non-trivial moments and steps: to_logical(to_local(x)) must give x back bit for bit.
    logical: dict[str, Any] = random_logical_state(mc, seed=7)
    logical["optim/param_groups"] = M.OptimConfig(lr=3e-4).param_groups()
    logical["iteration"] = 7
    states = {r: M.to_local(logical, mc, pc, r) for r in range(pc.world)}
    for r, s in states.items():
        flat = flatten_state(s)
        assert ("model/embedding.word_embeddings.weight" in flat) == (pc.zero < 3 and M.coords(r, pc).pp == 0)
        for key, t in flat.items():
            if key.startswith("optim/flat/") and key.endswith(("fp32_param", "exp_avg", "exp_avg_sq")):
                assert t.shape[0] % 8 == 0
    back = M.to_logical(states, mc, pc)
    assert _equal_report(back, logical, str(pc)) == []


def test_to_logical_rejects_broken_replicas_and_padding() -> None:
    mc, pc = _mqa(), M.ParallelConfig(tp=3)
    states = {r: M.to_local(M.logical_init(mc), mc, pc, r) for r in range(3)}
    qkv = states[2]["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    original = qkv[-1, 0].item()
    qkv[-1, 0] = original + 1.0  # rank 2's copy of V no longer equals ranks 0 and 1's
    with pytest.raises(LayoutMismatchError, match="linear_v.weight: replica"):
        M.to_logical(states, mc, pc)
    qkv[-1, 0] = original
    M.to_logical(states, mc, pc)
    states[2]["model"]["embedding.word_embeddings.weight"][3, 0] = 1.0
    with pytest.raises(LayoutMismatchError, match="padding rows are not zero"):
        M.to_logical(states, mc, pc)
    del states[1]
    with pytest.raises(LayoutMismatchError, match="no state for ranks"):
        M.to_logical(states, mc, pc)


def test_batch_is_layout_independent() -> None:
    tokens, labels = M.batch(3, 5, 8, 37, 11)
    again, _ = M.batch(3, 5, 8, 37, 11)
    assert torch.equal(tokens, again) and tokens.shape == (5, 8) and int(tokens.max()) < 37
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert not torch.equal(tokens, M.batch(4, 5, 8, 37, 11)[0])
    shares = [M.local_share(tokens, 2, d) for d in range(2)]
    assert [s.shape[0] for s in shares] == [3, 2] and torch.equal(torch.cat(shares), tokens)


# ---------------------------------------------------------------- world 1, in this process


@functools.lru_cache(maxsize=None)
def _reference(mc: M.ModelConfig) -> tuple[list[float], dict[str, Any]]:
    """The unsharded run: losses of ``STEPS`` steps and the final logical state (world 1, no process group)."""
    pc = M.ParallelConfig()
    model = M.build_model(mc, pc)
    opt = M.build_optimizer(model)
    losses = [M.train_step(model, opt, GLOBAL_BATCH) for _ in range(STEPS)]
    return losses, M.to_logical({0: M.rank_state(model, opt)}, mc, pc)


def test_world1_training_state_and_files_round_trip(tmp_path: Path) -> None:
    for mc in (M.gpt_tiny(), M.mixtral_tiny()):
        losses, _ = _reference(mc)
        assert all(math.isfinite(x) for x in losses) and abs(losses[0] - math.log(mc.vocab)) < 0.2
    mc, pc = M.llama_tiny(), M.ParallelConfig(zero=1)
    model = M.build_model(mc, pc)
    opt = M.build_optimizer(model)
    M.train_step(model, opt, GLOBAL_BATCH)
    saved = clone_state(M.rank_state(model, opt))
    M.save_megatron(tmp_path, model, opt)
    after = M.train_step(model, opt, GLOBAL_BATCH)
    M.load_rank_state(model, opt, saved)
    assert _equal_report(flatten_state(M.rank_state(model, opt)), flatten_state(saved), "reload") == []
    assert M.train_step(model, opt, GLOBAL_BATCH) == after  # resumed bit-exactly, data stream included
    assert M.load_megatron(tmp_path, model, opt) == 1
    assert _equal_report(flatten_state(M.rank_state(model, opt)), flatten_state(saved), "files") == []
    assert sorted(p.name for p in (tmp_path / "mp_rank_00").iterdir()) == ["distrib_optim_000.pt", "model_optim_rng.pt"]
    # A bad state is rejected as a whole, naming every problem, and changes nothing.
    bad = flatten_state(clone_state(saved))
    del bad["model/decoder.final_layernorm.weight"]
    bad["optim/flat/dense.0/exp_avg"] = torch.zeros(3)
    with pytest.raises(LayoutMismatchError, match=r"(?s)final_layernorm.weight: missing.*dense.0/exp_avg: expected"):
        M.load_rank_state(model, opt, bad)
    assert _equal_report(flatten_state(M.rank_state(model, opt)), flatten_state(saved), "after bad load") == []


# ---------------------------------------------------------------- distributed (gloo)


def _train_worker(rank: int, world: int, mc: M.ModelConfig, pc: M.ParallelConfig, save_dir: str | None) -> dict:
    """One rank: initial state vs oracle, STEPS steps, optionally save/load/resume; returns plain results."""
    ps = M.ParallelState.create(pc)
    model = M.build_model(mc, pc, ps)
    opt = M.build_optimizer(model)
    problems = _equal_report(flatten_state(M.rank_state(model, opt)),
                             flatten_state(M.to_local(M.logical_init(mc), mc, pc, rank)), f"initial rank {rank}")
    losses = [M.train_step(model, opt, GLOBAL_BATCH) for _ in range(STEPS)]
    final = clone_state(M.rank_state(model, opt))
    if save_dir is not None:
        M.save_megatron(save_dir, model, opt)
        other = M.build_model(mc, pc, ps)  # a fresh model and optimizer, to load into
        other_opt = M.build_optimizer(other)
        if M.load_megatron(save_dir, other, other_opt) != STEPS:
            problems.append(f"rank {rank}: load_megatron returned the wrong iteration")
        problems += _equal_report(flatten_state(M.rank_state(other, other_opt)), flatten_state(final),
                                  f"reloaded rank {rank}")
        if M.train_step(model, opt, GLOBAL_BATCH) != M.train_step(other, other_opt, GLOBAL_BATCH):
            problems.append(f"rank {rank}: resumed step differs from the original")
    return {"problems": problems, "losses": losses, "final": final}


DIST_LAYOUTS = [
    ("gpt tp2", M.gpt_tiny(), M.ParallelConfig(tp=2), True),
    ("gpt pp2 dp2 zero1 tied", M.gpt_tiny(), M.ParallelConfig(pp=2, dp=2, zero=1), True),
    ("llama tp2 pp2", M.llama_tiny(), M.ParallelConfig(tp=2, pp=2), False),
    ("mixtral dp2 ep2 zero3", M.mixtral_tiny(), M.ParallelConfig(dp=2, ep=2, zero=3), True),
    ("llama mqa tp3 zero2", _mqa(), M.ParallelConfig(tp=3, zero=2), False),
    ("mixtral tp2 dp2 ep2 zero2", M.mixtral_tiny(), M.ParallelConfig(tp=2, dp=2, ep=2, zero=2, order="ep-dp-tp-pp"),
     False),
    ("mixtral dp4 ep2 zero1", M.mixtral_tiny(), M.ParallelConfig(dp=4, ep=2, zero=1), False),
]


@pytest.mark.distributed
@pytest.mark.parametrize("name,mc,pc,save", DIST_LAYOUTS, ids=[d[0] for d in DIST_LAYOUTS])
def test_sharded_training_matches_unsharded(name: str, mc: M.ModelConfig, pc: M.ParallelConfig, save: bool,
                                            tmp_path: Path) -> None:
    results = run_distributed(_train_worker, pc.world, mc, pc, str(tmp_path) if save else None, timeout_secs=120)
    problems = [p for r in results for p in r["problems"]]
    assert not problems, "\n".join(problems[:20])
    ref_losses, ref_state = _reference(mc)
    for r in results:  # every rank reports the same global loss
        assert r["losses"] == results[0]["losses"]
    assert results[0]["losses"] == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    got = M.to_logical({r: res["final"] for r, res in enumerate(results)}, mc, pc)
    assert set(got) == set(ref_state)
    for key, want in ref_state.items():
        if isinstance(want, torch.Tensor) and key.endswith("/step"):
            assert torch.equal(got[key], want), key
        elif isinstance(want, torch.Tensor):
            diff, scale = (got[key] - want).abs().max().item(), want.abs().max().item()
            assert diff <= STATE_RTOL * scale + 1e-12, f"{key}: max abs diff {diff:.3g}, largest magnitude {scale:.3g}"
        else:
            assert got[key] == want, key
    if save:
        files = sorted(tmp_path.rglob("*.pt"))
        n_model = pc.world // pc.dp * pc.ep
        assert len([f for f in files if f.name == "model_optim_rng.pt"]) == n_model
        assert len(files) == n_model + (pc.world if pc.zero else 0)
        for f in files:
            payload = torch.load(f, weights_only=True)
            assert payload["iteration"] == STEPS and payload["args"]["parallel"]["zero"] == pc.zero
