"""Spec-driven rank layouts (resharding.grid, spec_layout, spec_zero, spec_check, spec_apply), simulated ranks.

Box arithmetic and flat-fragment decomposition are property-tested; the three shipped specs are checked to tile
every logical tensor exactly under many layouts; the hard cases are checked by name with real tensors
(logical -> every rank's local tensors -> logical, compared with torch.equal), and against the reference model's
own layout oracle (megatron_ref.to_local) where that package is present.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.errors import ShardMismatchError, SpecError
from formats.box import Box, box_flat_start, flat_range_to_boxes, is_contiguous_box
from resharding.grid import Grid
from resharding.spec_apply import local_from_logical, logical_from_locals, piece_view
from resharding.spec_check import check_tiling
from resharding.spec_layout import logical_shapes, rank_layout
from resharding.spec_zero import partition_fragments
from spec_lang import load_spec, shipped_spec

DIMS = {
    "gpt": dict(hidden=8, heads=4, kv_heads=4, head_dim=2, ffn=6, vocab=10, layers=4, tied=True),
    "llama": dict(hidden=8, heads=4, kv_heads=2, head_dim=2, ffn=6, vocab=37, layers=4),
    "mixtral": dict(hidden=8, heads=4, kv_heads=2, head_dim=2, ffn=6, vocab=37, layers=4, experts=4),
}


def layouts(spec, dims, par):  # type: ignore[no-untyped-def]
    return [rank_layout(spec, dims, par, r) for r in range(Grid.of(par).world_size)]


def roundtrip(spec, dims, par, seed: int = 0):  # type: ignore[no-untyped-def]
    """Random logical state -> every rank's local tensors -> logical state; returns (logical, locals, layouts)."""
    shapes = logical_shapes(spec, dims)
    g = torch.Generator().manual_seed(seed)
    # Steps are one counter per training step: every replica of every parameter's step is equal.
    logical = {k: torch.full(s, 3.0) if k.endswith("/step") else torch.randn(s, generator=g) for k, s in shapes.items()}
    lays = layouts(spec, dims, par)
    locals_ = {(lay.rank, t.key): local_from_logical(t, logical) for lay in lays for t in lay.tensors}
    back = logical_from_locals([(t, locals_[lay.rank, t.key]) for lay in lays for t in lay.tensors], shapes)
    for key, value in logical.items():
        assert torch.equal(back[key], value), key
    return logical, locals_, lays


# ------------------------------------------------------------------------------------------------ box arithmetic

shapes_st = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None)
@given(shapes_st, st.data())
def test_flat_range_to_boxes_tiles_the_range(shape: tuple[int, ...], data) -> None:  # type: ignore[no-untyped-def]
    numel = math.prod(shape)
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    boxes = flat_range_to_boxes(shape, start, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    covered = []
    for b in boxes:
        assert not b.is_empty() and is_contiguous_box(shape, b) and Box.whole(shape).contains(b)
        first = box_flat_start(shape, b)
        covered.extend(range(first, first + b.numel))
    assert covered == list(range(start, stop))  # exactly the range, once, in flat order


def _elements(box: Box) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(o, o + s) for o, s in zip(box.offsets, box.sizes))))


boxes_st = st.integers(1, 3).flatmap(lambda n: st.tuples(
    st.tuples(*[st.integers(0, 4)] * n), st.tuples(*[st.integers(0, 4)] * n),
    st.tuples(*[st.integers(0, 4)] * n), st.tuples(*[st.integers(0, 4)] * n)))


@settings(max_examples=300, deadline=None)
@given(boxes_st)
def test_box_intersection_is_the_common_elements(t) -> None:  # type: ignore[no-untyped-def]
    a, b = Box(t[0], t[1]), Box(t[2], t[3])
    i = a.intersect(b)
    common = _elements(a) & _elements(b)
    assert (set() if i is None else _elements(i)) == common
    assert (b.intersect(a) is None) == (i is None)
    if i is not None:
        assert a.contains(i) and b.contains(i) and _elements(i.relative_to(a)) == {
            tuple(x - o for x, o in zip(e, a.offsets)) for e in common}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(1, 5), st.integers(1, 4))
def test_partition_fragments_tile_every_parameter(numels: list[int], n: int, align: int) -> None:
    total, size, per_rank = partition_fragments(numels, n, align * n)
    assert size * n >= total and (size * n) % (align * n) == 0 and size * n - total < align * n
    seen: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(numels))}
    for frags in per_rank:
        ends = 0
        for f in frags:
            assert 0 <= f.offset and f.offset >= ends and f.offset + f.stop - f.start <= size
            ends = f.offset + f.stop - f.start
            seen[f.index].append((f.start, f.stop))
    for i, k in enumerate(numels):
        runs = sorted(seen[i])
        assert [e for r in runs for e in range(*r)] == list(range(k))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.sampled_from([0, 1, 2, 3]), st.data())
def test_zero_flat_pieces_cover_parameters_exactly(tp: int, dp: int, hidden: int, zero: int, data) -> None:  # type: ignore[no-untyped-def]
    """Random sizes, including ones where fragments cut rows and cross parameter boundaries."""
    ffn = data.draw(st.integers(tp, 9))
    spec = load_spec(TOY, name="toy.yaml")
    dims = dict(hidden=hidden, ffn=ffn, vocab=data.draw(st.integers(1, 13)))
    par = dict(tp=tp, dp=dp, zero=zero)
    assert check_tiling(layouts(spec, dims, par), logical_shapes(spec, dims)) == []


TOY = """
spec: 1
dims: {hidden: required, ffn: required, vocab: required}
let: {v_pad: ceil(vocab / (4 * tp)) * 4 * tp}
zero:
  multiple: 3 * n
  groups: [{name: big, when: numel > 6}, {name: small, when: true}]
  buckets: [{name: dense, over: dp}]
params:
  - {name: emb, shape: [vocab, hidden], shard: {dim: 0, pad_to: v_pad}}
  - {name: norm, shape: [hidden], replicated: tp}
  - name: fc1
    fused:
      dim: 0
      parts: [{logical: gate, shape: [ffn, hidden]}, {logical: up, shape: [ffn, hidden]}]
  - {name: fc2, shape: [hidden, ffn], shard: {dim: 1}}
state:
  - {match: "model/{param}", when: zero < 3, to: "model/{logical}"}
  - {match: "optim/state/{param}/m", when: zero == 0, to: "optim/state/{logical}/m"}
  - {match: "optim/flat/{bucket}.{group}/w", when: zero >= 1, flat: "model/{logical}"}
  - {match: "optim/flat/{bucket}.{group}/m", when: zero >= 1, flat: "optim/state/{logical}/m"}
"""

# ------------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("tp,pp,dp,ep,order", [(2, 2, 4, 2, "tp-ep-dp-pp"), (3, 2, 2, 1, "tp-dp-pp"),
                                               (2, 3, 4, 4, "pp-tp-ep-dp"), (1, 1, 1, 1, "dp-pp-tp")])
def test_grid_coordinates_and_groups(tp: int, pp: int, dp: int, ep: int, order: str) -> None:
    g = Grid(tp=tp, pp=pp, dp=dp, ep=ep, order=order)
    assert g.world_size == tp * pp * dp
    for r in range(g.world_size):
        c = g.coords(r)
        assert g.rank(c.tp, c.pp, c.dp) == r and c.ep == c.dp % ep and c.edp == c.dp // ep
        assert r in g.group("tp", r) and len(g.group("ep", r)) == ep and len(g.group("edp", r)) == dp // ep
        assert [g.coords(x).ep for x in g.group("ep", r)] == list(range(ep))
    for kind, size in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("edp", dp // ep), ("mp", tp * pp)):
        groups = g.groups(kind)
        assert all(len(x) == size for x in groups) and sorted(itertools.chain(*groups)) == list(range(g.world_size))
    if order.startswith("tp"):
        assert g.group("tp", 0) == tuple(range(tp))


def test_grid_validation() -> None:
    with pytest.raises(SpecError, match="ep=3 must divide dp=4"):
        Grid(dp=4, ep=3)
    with pytest.raises(SpecError, match="'ep' may appear once, directly before 'dp'"):
        Grid(order="ep-tp-dp-pp")
    with pytest.raises(SpecError, match="unknown parallel settings"):
        Grid.of({"tp": 2, "sp": 2})
    assert Grid.of({"tp": 2, "dp": 2, "zero": 1}) == Grid(tp=2, dp=2, zero=1)


# ------------------------------------------------------------------------------------------------ shipped specs tile


def _configs(name: str, tp: int):  # type: ignore[no-untyped-def]
    for pp in (1, 2, 4):
        for dp, zero in ((1, 0), (2, 1), (2, 3), (4, 2)):
            for ep in (1, 2):
                if dp % ep == 0 and (ep == 1 or name == "mixtral"):
                    yield dict(tp=tp, pp=pp, dp=dp, ep=ep, zero=zero)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["gpt", "llama", "mixtral"])
def test_shipped_specs_tile_every_logical_tensor(name: str, tp: int) -> None:
    spec, dims = shipped_spec(name), DIMS[name]
    shapes = logical_shapes(spec, dims)
    for par in _configs(name, tp):
        problems = check_tiling(layouts(spec, dims, par), shapes)
        assert problems == [], (par, problems[:5])


@pytest.mark.parametrize("name,par", [
    ("gpt", dict(tp=3, pp=2, dp=2, zero=1)), ("gpt", dict(tp=2, pp=4, dp=1, zero=0)),
    ("llama", dict(tp=4, pp=2, dp=2, zero=3)), ("llama", dict(tp=3, pp=1, dp=4, zero=2)),
    ("mixtral", dict(tp=2, pp=2, dp=4, ep=2, zero=2)), ("mixtral", dict(tp=3, pp=1, dp=2, ep=2, zero=0)),
])
def test_shipped_specs_round_trip_real_tensors(name: str, par: dict) -> None:  # type: ignore[type-arg]
    roundtrip(shipped_spec(name), DIMS[name], par)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 40), st.integers(1, 4),
       st.sampled_from([(1, 0), (2, 1), (3, 2), (2, 3)]), st.integers(1, 4))
def test_llama_tiles_for_random_dims(kv: int, group: int, tp: int, vocab: int, layers: int, dz, ffn_extra: int) -> None:  # type: ignore[no-untyped-def]
    heads = kv * group
    dims = dict(hidden=4, heads=heads, kv_heads=kv, head_dim=1, ffn=tp + ffn_extra, vocab=vocab, layers=layers,
                vocab_divisible_by=2)
    par = dict(tp=min(tp, heads), pp=min(2, layers), dp=dz[0], zero=dz[1])
    spec = shipped_spec("llama")
    assert check_tiling(layouts(spec, dims, par), logical_shapes(spec, dims)) == []


# ------------------------------------------------------------------------------------------------ hard cases by name


def test_four_heads_over_tp3_with_one_kv_head() -> None:
    spec = shipped_spec("llama")
    dims = dict(hidden=2, heads=4, kv_heads=1, head_dim=2, ffn=3, vocab=5, layers=1)
    _, locals_, lays = roundtrip(spec, dims, dict(tp=3))
    # Hand-computed from the doc: split(4, 3) = [2, 1, 1] query heads; the single KV group spans all three ranks.
    q = torch.arange(8.0).repeat_interleave(2).view(8, 2)  # row r of linear_q holds r
    k, v = q[:2] + 100, q[:2] + 200
    expect = {0: [0, 1, 2, 3, 100, 101, 200, 201], 1: [4, 5, 100, 101, 200, 201], 2: [6, 7, 100, 101, 200, 201]}
    for lay in lays:
        t = lay["model/decoder.layers.0.self_attention.linear_qkv.weight"]
        logical = {"model/decoder.layers.0.self_attention.linear_q.weight": q,
                   "model/decoder.layers.0.self_attention.linear_k.weight": k,
                   "model/decoder.layers.0.self_attention.linear_v.weight": v}
        local = local_from_logical(t, logical)
        assert local[:, 0].tolist() == expect[lay.rank]
        assert [p.policy for p in t.pieces] == ["unique", "replicated", "replicated"]


def test_grouped_qkv_order_gqa() -> None:
    spec = shipped_spec("llama")
    dims = dict(hidden=1, heads=4, kv_heads=2, head_dim=1, ffn=2, vocab=3, layers=1)
    pre = "model/decoder.layers.0.self_attention.linear_"
    logical = {pre + "q.weight": torch.arange(4.0).view(4, 1), pre + "k.weight": torch.tensor([[10.0], [11.0]]),
               pre + "v.weight": torch.tensor([[20.0], [21.0]])}
    t = rank_layout(spec, dims, dict(tp=1), 0)[pre + "qkv.weight"]
    assert local_from_logical(t, logical).view(-1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # q0 q1 k0 v0 q2 q3 k1 v1
    t = rank_layout(spec, dims, dict(tp=2), 1)[pre + "qkv.weight"]
    assert local_from_logical(t, logical).view(-1).tolist() == [2, 3, 11, 21]


def test_ten_row_vocabulary_over_tp3_and_repadding() -> None:
    spec = shipped_spec("gpt")
    dims = dict(DIMS["gpt"], vocab=10, tied=False, vocab_divisible_by=8)  # Megatron-LM's default is 128
    key = "model/embedding.word_embeddings.weight"
    lays = layouts(spec, dims, dict(tp=3))
    # V_pad = ceil(10 / 24) * 24 = 24: 8 rows per rank; rows 10..23 are padding.
    assert [lay[key].shape for lay in lays] == [(8, 8)] * 3
    assert [[(p.logical_offsets, p.sizes) for p in lay[key].pieces] for lay in lays] == [
        [((0, 0), (8, 8))], [((8, 0), (2, 8))], []]
    logical, locals_, _ = roundtrip(spec, dims, dict(tp=3))
    assert torch.equal(locals_[1, key][2:], torch.zeros(6, 8)) and torch.equal(locals_[2, key], torch.zeros(8, 8))
    # Re-pad for TP = 2 (V_pad = 16) through the logical tensors, weights and moments alike.
    shapes = logical_shapes(spec, dims)
    back = logical_from_locals([(t, locals_[lay.rank, t.key]) for lay in layouts(spec, dims, dict(tp=3)) for t in lay],
                               shapes)
    for lay in layouts(spec, dims, dict(tp=2, zero=0)):
        for k in (key, "optim/state/embedding.word_embeddings.weight/exp_avg"):
            t = lay[k]
            local = local_from_logical(t, back)
            assert local.shape == (8, 8)
            rows = logical[k][lay.coords.tp * 8:lay.coords.tp * 8 + 8]
            assert torch.equal(local[:rows.shape[0]], rows) and not local[rows.shape[0]:].any()
    bad = dict(locals_)
    bad[2, key] = bad[2, key].clone()
    bad[2, key][0, 0] = 1.0
    with pytest.raises(ShardMismatchError, match="padding elements are not zero"):
        logical_from_locals([(t, bad[lay.rank, t.key]) for lay in layouts(spec, dims, dict(tp=3)) for t in lay], shapes)


@pytest.mark.parametrize("tp,widths", [(2, [3, 3]), (4, [2, 2, 1, 1])])
def test_swiglu_gate_then_up(tp: int, widths: list[int]) -> None:
    spec = shipped_spec("llama")
    dims = DIMS["llama"]
    pre = "model/decoder.layers.0.mlp.linear_fc1"
    starts = list(itertools.accumulate([0] + widths))
    for lay in layouts(spec, dims, dict(tp=tp)):
        t, r = lay[pre + ".weight"], lay.coords.tp
        assert t.shape == (2 * widths[r], 8)
        assert [(p.logical_key, p.logical_offsets[0], p.sizes[0], p.storage_offset) for p in t.pieces] == [
            (pre + "_gate.weight", starts[r], widths[r], 0), (pre + "_up.weight", starts[r], widths[r], widths[r] * 8)]
    roundtrip(spec, dims, dict(tp=tp, dp=2, zero=1))


@pytest.mark.parametrize("pp", [1, 4])
def test_tied_embedding(pp: int) -> None:
    spec = shipped_spec("gpt")
    dims = DIMS["gpt"]
    assert "model/output_layer.weight" not in logical_shapes(spec, dims)
    lays = layouts(spec, dims, dict(pp=pp))
    holders = [(lay.rank, t.key) for lay in lays for t in lay if any(
        p.logical_key == "model/embedding.word_embeddings.weight" for p in t.pieces)]
    if pp == 1:
        assert holders == [(0, "model/embedding.word_embeddings.weight")]
        assert lays[0]["model/embedding.word_embeddings.weight"].pieces[0].policy == "unique"
    else:
        assert holders == [(0, "model/embedding.word_embeddings.weight"), (3, "model/output_layer.weight")]
        assert {lay[k].pieces[0].policy for lay, k in ((lays[0], holders[0][1]), (lays[3], holders[1][1]))} == {"replicated"}
    logical, locals_, lays = roundtrip(spec, dims, dict(pp=pp, dp=2, zero=1))
    if pp == 4:  # the output layer's copy is the embedding, so a diverged copy is caught
        shapes = logical_shapes(spec, dims)
        bad = dict(locals_)
        last = Grid(pp=4, dp=2).rank(0, 3, 1)
        bad[last, "model/output_layer.weight"] = bad[last, "model/output_layer.weight"] + 1
        with pytest.raises(ShardMismatchError, match="replica differs"):
            logical_from_locals([(t, bad[lay.rank, t.key]) for lay in lays for t in lay], shapes)


@pytest.mark.parametrize("ep", [2, 4])
def test_experts_over_ep(ep: int) -> None:
    spec = shipped_spec("mixtral")
    dims = DIMS["mixtral"]
    par = dict(tp=1, dp=4, ep=ep, zero=1)
    per = 4 // ep
    for lay in layouts(spec, dims, par):
        local = [k for k in lay.keys() if k.startswith("model/decoder.layers.0.mlp.experts.") and k.endswith("fc2.weight")]
        assert len(local) == per
        for j in range(per):
            t = lay[f"model/decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight"]
            assert t.pieces[0].logical_key == f"model/decoder.layers.0.mlp.experts.{lay.coords.ep * per + j}.linear_fc2.weight"
            # under ZeRO-1 the fp32 master in the flat buffer is a second copy of every weight
            assert t.pieces[0].policy == "replicated"
        flat = lay["optim/flat/expert.0/exp_avg"]
        assert {p.logical_key.split(".")[5] for p in flat.pieces} <= {str(lay.coords.ep * per + j) for j in range(per)}
    # Without ZeRO the expert-DP replicas (dp / ep of them) are the only copies: unique when there is one.
    t = rank_layout(spec, dims, dict(par, zero=0), 3)["model/decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert t.pieces[0].policy == ("replicated" if 4 // ep > 1 else "unique")
    roundtrip(spec, dims, par)
    roundtrip(spec, dims, dict(par, zero=3, tp=2))


def test_zero_fragments_cross_parameter_boundaries() -> None:
    spec = shipped_spec("llama")
    dims = DIMS["llama"]
    par = dict(tp=1, dp=4, zero=2)
    lays = layouts(spec, dims, par)
    crossing = cut = 0
    for lay in lays:
        t = lay["optim/flat/dense.0/exp_avg"]
        params = {p.logical_key.rsplit("/", 1)[0] for p in t.pieces}
        crossing += len(params) > 1
        for p in t.pieces:  # a piece that is not whole rows of its parameter: a fragment cut mid-row
            cut += p.sizes[-1] != logical_shapes(spec, dims)[p.logical_key][-1]
            assert p.strides[-1] == 1 and p.storage_offset + sum((s - 1) * d for s, d in zip(p.sizes, p.strides)) < t.shape[0]
    assert crossing >= 2
    # The flat partitions of the 4 DP ranks concatenate to the flattened parameters: check one concretely.
    logical, locals_, _ = roundtrip(spec, dims, par)
    buf = torch.cat([locals_[lay.rank, "optim/flat/dense.0/fp32_param"] for lay in lays])
    emb = logical["model/embedding.word_embeddings.weight"]
    assert torch.equal(buf[:emb.numel()].view(-1, 8)[:37], emb)
    for lay in lays:
        for p in lay["optim/flat/dense.0/fp32_param"].pieces:
            view = piece_view(locals_[lay.rank, "optim/flat/dense.0/fp32_param"], p)
            sl = tuple(slice(o, o + s) for o, s in zip(p.logical_offsets, p.sizes))
            assert torch.equal(view, logical[p.logical_key][sl])
    cut_dims = dict(dims, hidden=5)  # odd widths: fragments must cut rows
    for lay in layouts(spec, cut_dims, par):
        for p in lay["optim/flat/dense.0/exp_avg"].pieces:
            cut += p.sizes[-1] != 5
    assert cut > 0
    roundtrip(spec, cut_dims, par)


def test_check_tiling_finds_every_kind_of_mistake() -> None:
    from resharding.spec_layout import LocalTensor, Piece, RankLayout

    def lay(rank: int, *pieces: Piece, shape: tuple[int, ...] = (4, 2)) -> RankLayout:
        return RankLayout(rank, Grid(dp=2).coords(rank), Grid(dp=2), (LocalTensor("x", shape, pieces, "r", ("x",)),))

    def piece(rows: int, start: int, policy: str = "unique", at: int = 0) -> Piece:
        return Piece("w", (start, 0), (rows, 2), at, (2, 1), policy)

    shapes = {"w": (4, 2)}
    assert check_tiling([lay(0, piece(2, 0)), lay(1, piece(2, 2))], shapes) == []
    assert "held by no piece" in check_tiling([lay(0, piece(2, 0)), lay(1, piece(1, 2))], shapes)[0]
    assert "marked unique and by others" in check_tiling([lay(0, piece(3, 0)), lay(1, piece(2, 2))], shapes)[0]
    assert "has no other holder" in check_tiling([lay(0, piece(2, 0, "replicated")), lay(1, piece(2, 2))], shapes)[0]
    assert check_tiling([lay(0, piece(4, 0, "replicated")), lay(1, piece(4, 0, "averaged"))], shapes) == []
    assert "share local elements [2, 4)" in check_tiling([lay(0, piece(2, 0), piece(2, 2, at=2))], shapes)[0]
    assert "reaches outside" in check_tiling([lay(0, piece(2, 0), piece(2, 2, at=6))], shapes)[0]
    assert "lies outside" in check_tiling([lay(0, piece(2, 3))], shapes)[0]
    assert "unknown logical key" in check_tiling([lay(0, Piece("v", (0,), (1,), 0, (1,), "unique"))], shapes)[0]


def test_averaged_replicas_are_averaged() -> None:
    spec = load_spec("""
spec: 1
dims: {hidden: required}
params:
  - {name: norm, shape: [hidden], averaged: tp}
state:
  - {match: "model/{param}", to: "model/{logical}"}
""", name="avg.yaml")
    lays = layouts(spec, {"hidden": 3}, dict(tp=2))
    assert [t.pieces[0].policy for lay in lays for t in lay] == ["averaged", "averaged"]
    out = logical_from_locals([(lays[0]["model/norm"], torch.tensor([1.0, 2, 3])),
                               (lays[1]["model/norm"], torch.tensor([3.0, 2, 1]))], {"model/norm": (3,)})
    assert torch.equal(out["model/norm"], torch.tensor([2.0, 2, 2]))


def test_rank_layout_checks_the_actual_state() -> None:
    spec, dims, par = shipped_spec("gpt"), DIMS["gpt"], dict(tp=2, dp=2, zero=1)
    lay = rank_layout(spec, dims, par, 1)
    state = {t.key: t.shape for t in lay}
    state["optim/param_groups"] = ()
    state["iteration"] = ()
    rank_layout(spec, dims, par, 1, local_shapes=state)
    bad = dict(state)
    bad["model/decoder.layers.0.mlp.linear_fc1.weight"] = (4, 8)
    del bad["optim/flat/dense.1/step"]
    bad["model/extra.weight"] = (2,)
    with pytest.raises(SpecError) as e:
        rank_layout(spec, dims, par, 1, local_shapes=bad)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "expects shape [3, 8] (rule 'model/{param}'), the state has [4, 8]" in msg
    assert "optim/flat/dense.1/step: the spec expects a local tensor" in msg and "model/extra.weight: no rule" in msg


def test_layout_accepts_megatron_configs_and_objects() -> None:
    mr = pytest.importorskip("megatron_ref", reason="megatron_ref (the reference model) is not in this checkout")
    mc, pc = mr.llama_tiny(), mr.ParallelConfig(tp=2, pp=2, dp=2, zero=1)
    a = rank_layout(shipped_spec("llama"), mc, pc, 5)
    b = rank_layout(shipped_spec("llama"), {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "ffn": 48,
                                            "vocab": 37, "layers": 4, "vocab_divisible_by": mc.vocab_divisible_by},
                 dict(tp=2, pp=2, dp=2, zero=1), 5)
    assert a == b


@pytest.mark.parametrize("family,par", [
    ("gpt", dict(tp=2, pp=2, dp=2, zero=1)), ("gpt", dict(tp=3, pp=1, dp=2, zero=2)),
    ("llama", dict(tp=4, pp=2, dp=1, zero=0)), ("llama", dict(tp=2, pp=4, dp=2, zero=3)),
    ("mixtral", dict(tp=2, pp=2, dp=4, ep=2, zero=1)), ("mixtral", dict(tp=1, pp=1, dp=4, ep=4, zero=3)),
])
def test_pieces_match_the_reference_model(family: str, par: dict) -> None:  # type: ignore[type-arg]
    mr = pytest.importorskip("megatron_ref", reason="megatron_ref (the reference model) is not in this checkout")
    from megatron_ref.state import flatten_state
    mc = {"gpt": mr.gpt_tiny, "llama": mr.llama_tiny, "mixtral": mr.mixtral_tiny}[family](
        **({"vocab": 10, "heads": 4, "kv_heads": 1} if par["tp"] == 3 else {}))
    pc = mr.ParallelConfig(**par)
    spec = shipped_spec(family)
    shapes = logical_shapes(spec, mc)
    g = torch.Generator().manual_seed(1)
    logical = {k: torch.full(s, 7.0) if k.endswith("/step") else torch.randn(s, generator=g) for k, s in shapes.items()}
    for rank in range(pc.world):
        ref = {k: v for k, v in flatten_state(mr.to_local(logical, mc, pc, rank)).items() if isinstance(v, torch.Tensor)}
        lay = rank_layout(spec, mc, pc, rank, local_shapes={k: tuple(v.shape) for k, v in ref.items()})
        assert sorted(lay.keys()) == sorted(ref)
        for t in lay:
            assert torch.equal(local_from_logical(t, logical), ref[t.key]), (rank, t.key)
