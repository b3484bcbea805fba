"""Sanity of the independent Megatron-Core rank-file producer (tests/megatron_te_producer.py) on its own.

The rank tensors are reassembled here by a second, tiny inverse (unpad, unfuse, concatenate) and compared bit for
bit with the Hugging Face weights and AdamW moments they were cut from.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from tests.megatron_te_producer import expected_logical, make_llama, rank_states, write_megatron

LAYOUTS = [(1, 1), (2, 2), (4, 1), (1, 4), (2, 1), (4, 2)]


@pytest.fixture(scope="module")
def llama():
    return make_llama()


def _cfg(model):
    c = model.config
    return (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.num_hidden_layers)


def _v_pad(vocab, tp, div):
    unit = div * tp
    return -(-vocab // unit) * unit


def _norm_names(naming, i):
    if naming == "te":
        return (f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
                f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight")
    return f"decoder.layers.{i}.input_layernorm.weight", f"decoder.layers.{i}.pre_mlp_layernorm.weight"


def _expected_shapes(model, tp, pp, p, naming, div):
    vocab, hidden, heads, kv, hd, ffn, layers = _cfg(model)
    vp = _v_pad(vocab, tp, div)
    shapes = {}
    if p == 0:
        shapes["embedding.word_embeddings.weight"] = (vp // tp, hidden)
    for i in range(layers // pp):
        n1, n2 = _norm_names(naming, i)
        a, m = f"decoder.layers.{i}.self_attention.", f"decoder.layers.{i}.mlp."
        x = (0,)
        layer = [(n1, (hidden,)), (a + "core_attention._extra_state", x),
                 (a + "linear_qkv.weight", ((heads + 2 * kv) // tp * hd, hidden)), (a + "linear_qkv._extra_state", x),
                 (a + "linear_proj.weight", (hidden, heads // tp * hd)), (a + "linear_proj._extra_state", x),
                 (n2, (hidden,)), (m + "linear_fc1.weight", (2 * ffn // tp, hidden)),
                 (m + "linear_fc1._extra_state", x),
                 (m + "linear_fc2.weight", (hidden, ffn // tp)), (m + "linear_fc2._extra_state", x)]
        shapes.update((k, v) for k, v in layer if naming == "te" or not k.endswith("_extra_state"))
    if p == pp - 1:
        shapes["decoder.final_layernorm.weight"] = (hidden,)
        shapes["output_layer.weight"] = (vp // tp, hidden)
    return shapes


def _reassemble(model, states, tp, pp, naming, get):
    """Inverse of the layout: HF name -> full tensor, ``get(payload, local name)`` picks weight or moment."""
    vocab, hidden, heads, kv, hd, ffn, layers = _cfg(model)
    per, G, kv_t, f = layers // pp, heads // kv, kv // tp, ffn // tp
    out = {}

    def vocab_cat(p, name):
        full = torch.cat([get(states[(t, p)], name) for t in range(tp)], dim=0)
        assert torch.count_nonzero(full[vocab:]) == 0, f"padding rows of {name} are not zero"
        return full[:vocab]

    out["model.embed_tokens.weight"] = vocab_cat(0, "embedding.word_embeddings.weight")
    out["lm_head.weight"] = vocab_cat(pp - 1, "output_layer.weight")
    out["model.norm.weight"] = get(states[(0, pp - 1)], "decoder.final_layernorm.weight")
    for L in range(layers):
        p, i = L // per, L % per
        h, a, m = f"model.layers.{L}.", f"decoder.layers.{i}.self_attention.", f"decoder.layers.{i}.mlp."
        n1, n2 = _norm_names(naming, i)
        for name, hf_name in ((n1, "input_layernorm.weight"), (n2, "post_attention_layernorm.weight")):
            copies = [get(states[(t, p)], name) for t in range(tp)]
            assert all(torch.equal(c, copies[0]) for c in copies)
            out[h + hf_name] = copies[0]
        qs, ks, vs = [], [], []
        for t in range(tp):
            chunks = get(states[(t, p)], a + "linear_qkv.weight").split((G + 2) * hd, dim=0)
            assert len(chunks) == kv_t
            for c in chunks:
                qs.append(c[: G * hd])
                ks.append(c[G * hd:(G + 1) * hd])
                vs.append(c[(G + 1) * hd:])
        out[h + "self_attn.q_proj.weight"] = torch.cat(qs)
        out[h + "self_attn.k_proj.weight"] = torch.cat(ks)
        out[h + "self_attn.v_proj.weight"] = torch.cat(vs)
        out[h + "self_attn.o_proj.weight"] = torch.cat(
            [get(states[(t, p)], a + "linear_proj.weight") for t in range(tp)], dim=1)
        fc1 = [get(states[(t, p)], m + "linear_fc1.weight") for t in range(tp)]
        out[h + "mlp.gate_proj.weight"] = torch.cat([x[:f] for x in fc1])
        out[h + "mlp.up_proj.weight"] = torch.cat([x[f:] for x in fc1])
        out[h + "mlp.down_proj.weight"] = torch.cat(
            [get(states[(t, p)], m + "linear_fc2.weight") for t in range(tp)], dim=1)
    return out


@pytest.mark.parametrize("naming", ["te", "local"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_shapes_and_roundtrip(llama, tp, pp, naming):
    model, opt = llama
    div = 128 if tp != 4 else 1  # with 1: V_pad = 1000, so the last shard is part real, part padding
    states = rank_states(model, opt, tp, pp, naming=naming, vocab_divisible_by=div)
    assert set(states) == {(t, p) for t in range(tp) for p in range(pp)}
    for (t, p), payload in states.items():
        shapes = {k: tuple(v.shape) for k, v in payload["model"].items()}
        assert shapes == _expected_shapes(model, tp, pp, p, naming, div)
        assert list(shapes) == list(_expected_shapes(model, tp, pp, p, naming, div))  # module order
        for name, v in payload["model"].items():
            assert v.is_contiguous()
            assert v.dtype == (torch.uint8 if name.endswith("_extra_state") else torch.float32)
        params = [k for k in payload["model"] if not k.endswith("_extra_state")]
        assert list(payload["optimizer"]["state"]) == params
        assert payload["checkpoint_version"] == 3.0 and payload["iteration"] == 10
        assert payload["args"].padded_vocab_size == _v_pad(model.config.vocab_size, tp, div)
        assert "rng_state" not in payload

    hf = dict(model.named_parameters())
    weights = _reassemble(model, states, tp, pp, naming, lambda pl, n: pl["model"][n])
    assert set(weights) == set(hf)
    for name, w in weights.items():
        assert torch.equal(w, hf[name].detach()), name
    for k in ("exp_avg", "exp_avg_sq"):
        moments = _reassemble(model, states, tp, pp, naming, lambda pl, n: pl["optimizer"]["state"][n][k])
        for name, w in moments.items():
            assert torch.equal(w, opt.state[hf[name]][k]), (k, name)
    hf_step = opt.state[hf["lm_head.weight"]]["step"]
    for payload in states.values():
        for st in payload["optimizer"]["state"].values():
            assert st["step"].dim() == 0 and st["step"].dtype == torch.float32 and torch.equal(st["step"], hf_step)


def test_qkv_group_order_by_hand(llama):
    """tp=2, 8 heads, 4 groups: rank 1 owns groups 2 and 3, i.e. query heads 4-7, laid out q q k v q q k v."""
    model, opt = llama
    hd = model.config.head_dim
    attn = model.model.layers[3].self_attn
    q, k, v = attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
    local = rank_states(model, opt, 2, 2)[(1, 1)]["model"]["decoder.layers.1.self_attention.linear_qkv.weight"]
    want = torch.cat([q[4 * hd:6 * hd], k[2 * hd:3 * hd], v[2 * hd:3 * hd],
                      q[6 * hd:8 * hd], k[3 * hd:4 * hd], v[3 * hd:4 * hd]])
    assert torch.equal(local, want)


def test_optimizer_payload(llama):
    model, opt = llama
    payload = rank_states(model, opt, 2, 1)[(0, 0)]
    assert payload["optimizer"]["param_groups"] == [
        {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.1},
        {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.0}]
    emb = payload["optimizer"]["state"]["embedding.word_embeddings.weight"]
    assert torch.count_nonzero(emb["exp_avg_sq"]) > 0  # the step really produced moments
    assert "optimizer" not in rank_states(model, opt, 2, 1, with_optim=False)[(0, 0)]
    m0, o0 = make_llama(layers=2, train_steps=0)
    assert o0 is None
    assert "optimizer" not in rank_states(m0, o0, 1, 2)[(0, 1)]
    assert not any(k.startswith("optim/") for k in expected_logical(m0, o0))


def test_expected_logical(llama):
    model, opt = llama
    vocab, hidden, heads, kv, hd, ffn, layers = _cfg(model)
    logical = expected_logical(model, opt)
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden), "output_layer.weight": (vocab, hidden),
              "decoder.final_layernorm.weight": (hidden,)}
    for L in range(layers):
        g = f"decoder.layers.{L}."
        shapes.update({g + "input_layernorm.weight": (hidden,), g + "pre_mlp_layernorm.weight": (hidden,),
                       g + "self_attention.linear_q.weight": (heads * hd, hidden),
                       g + "self_attention.linear_k.weight": (kv * hd, hidden),
                       g + "self_attention.linear_v.weight": (kv * hd, hidden),
                       g + "self_attention.linear_proj.weight": (hidden, heads * hd),
                       g + "mlp.linear_fc1_gate.weight": (ffn, hidden), g + "mlp.linear_fc1_up.weight": (ffn, hidden),
                       g + "mlp.linear_fc2.weight": (hidden, ffn)})
    want = {f"model/{n}": s for n, s in shapes.items()}
    for n in shapes:
        want.update({f"optim/state/{n}/exp_avg": shapes[n], f"optim/state/{n}/exp_avg_sq": shapes[n],
                     f"optim/state/{n}/step": ()})
    assert {k: tuple(v.shape) for k, v in logical.items()} == want
    hf = dict(model.named_parameters())
    assert torch.equal(logical["model/decoder.layers.2.self_attention.linear_k.weight"],
                       hf["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(logical["optim/state/decoder.layers.1.mlp.linear_fc1_up.weight/exp_avg"],
                       opt.state[hf["model.layers.1.mlp.up_proj.weight"]]["exp_avg"])
    assert torch.equal(logical["model/decoder.layers.0.pre_mlp_layernorm.weight"],
                       hf["model.layers.0.post_attention_layernorm.weight"])


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (1, 4)])
def test_write_megatron(llama, tmp_path, tp, pp):
    model, opt = llama
    states = rank_states(model, opt, tp, pp, iteration=7)
    root = tmp_path / "ckpt"
    write_megatron(root, states, tp=tp, pp=pp, iteration=7)
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "7"
    dirs = sorted(os.listdir(root / "iter_0000007"))
    names = [f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)]
    assert dirs == sorted(names)
    for (t, p), payload in states.items():
        name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
        loaded = torch.load(root / "iter_0000007" / name / "model_optim_rng.pt", weights_only=False)
        assert isinstance(loaded["args"], argparse.Namespace)
        a = loaded["args"]
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.num_query_groups) == (tp, pp, 4)
        assert a.vocab_size == 997 and a.padded_vocab_size == 1024 and a.make_vocab_size_divisible_by == 128
        assert loaded["iteration"] == 7
        assert list(loaded["model"]) == list(payload["model"])
        assert all(torch.equal(loaded["model"][k], v) for k, v in payload["model"].items())

    bare = tmp_path / "bare"
    write_megatron(bare, states, tp=tp, pp=pp, iteration=7, args=None)
    assert (bare / "latest_checkpointed_iteration.txt").read_text() == "7"
    name = "mp_rank_00" if pp == 1 else "mp_rank_00_000"
    loaded = torch.load(bare / "iter_0000007" / name / "model_optim_rng.pt", weights_only=True)
    assert "args" not in loaded and "model" in loaded and "optimizer" in loaded
    assert "args" in states[(0, 0)]  # the caller's payloads are left as they were


def test_make_llama_is_deterministic():
    (m1, o1), (m2, o2) = make_llama(layers=1), make_llama(layers=1)
    l1, l2 = expected_logical(m1, o1), expected_logical(m2, o2)
    assert list(l1) == list(l2) and all(torch.equal(l1[k], l2[k]) for k in l1)
    assert not torch.equal(l1["model/output_layer.weight"], expected_logical(*make_llama(layers=1, seed=1))[
        "model/output_layer.weight"])
