"""The spec language (spec_lang): expressions, patterns, loading and validation, JSON round trip, check()."""

from __future__ import annotations

import ast
import itertools
import json
import operator
import textwrap

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ckpt.errors import SpecError
from spec_lang import SHIPPED, Expr, Spec, check, load_spec, shipped_spec, split_count, split_start
from spec_lang.expr import ExprSyntaxError, parse
from spec_lang.patterns import DIGITS, SEGMENT, Pattern, overlap

# ------------------------------------------------------------------------------------------------ expressions


def ev(text: str, **names: int):  # type: ignore[no-untyped-def]
    return Expr(text).evaluate(names)


@pytest.mark.parametrize("text,value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("2 - 3 - 4", -5),
    ("ceil(10 / 8) * 8", 16), ("floor(10 / 8)", 1), ("10 / 4 * 2", 5), ("min(3, 1, 2)", 1), ("max(3, 1, 2)", 3),
    ("abs(0 - 4)", 4), ("split(10, 3, 0)", 4), ("split(10, 3, 2)", 3), ("split_start(10, 3, 2)", 7),
    ("1 if 2 > 1 else 0", 1), ("5 if false else 6", 6), ("true and 3", 3), ("0 or 4", 4), ("not 0", 1),
    ("1 == 1 and 2 != 3", 1), ("3 <= 2", 0), ("--3", 3),
])
def test_expression_values(text: str, value: int) -> None:
    assert ev(text) == value


def test_expression_names_and_exact_division() -> None:
    assert ev("ceil(vocab / (div * tp)) * div * tp", vocab=10, div=8, tp=3) == 24
    assert ev("heads // kv_heads", heads=8, kv_heads=2) == 4
    with pytest.raises(SpecError, match="is not an integer"):
        Expr("hidden / 3").evaluate_int({"hidden": 8})
    assert Expr("a + b").names() == [("a", 0), ("b", 4)]
    assert Expr("2 * 3").constant() == 6 and Expr("2 * x").constant() is None


@pytest.mark.parametrize("text,offset,msg", [
    ("1 +", 3, "expected a number"), ("(1", 2, "expected ')'"), ("1 2", 2, "after a complete expression"),
    ("a $ b", 2, "unexpected character"), ("foo(1)", 0, "unknown function"), ("split(1, 2)", 0, "takes 3 arguments"),
    ("1 < 2 < 3", 6, "chained comparisons"), ("", 0, "empty expression"), ("a.b", 1, "unexpected character"),
])
def test_expression_syntax_errors(text: str, offset: int, msg: str) -> None:
    with pytest.raises(ExprSyntaxError) as e:
        parse(text)
    assert msg in str(e.value)
    assert e.value.offset == offset


def test_expression_errors_are_positioned() -> None:
    from spec_lang import Where
    e = Expr("hidden // (tp - tp)", Where("f.yaml", 3, 10))
    with pytest.raises(SpecError, match=r"^f\.yaml:3:17: rule 'r': cannot evaluate .*division by zero"):
        e.evaluate({"hidden": 4, "tp": 2}, "r")
    with pytest.raises(SpecError, match=r"^f\.yaml:3:21: .*no value for 'tp'"):
        e.evaluate({"hidden": 4}, "r")


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}


@st.composite
def int_exprs(draw, depth=3):  # type: ignore[no-untyped-def]
    if depth == 0 or draw(st.booleans()):
        return str(draw(st.integers(0, 50)))
    op = draw(st.sampled_from(sorted(_OPS)))
    return f"({draw(int_exprs(depth - 1))} {op} {draw(int_exprs(depth - 1))})"


@settings(max_examples=200, deadline=None)
@given(int_exprs())
def test_expression_matches_python_integer_semantics(text: str) -> None:
    try:
        expected = eval(compile(ast.parse(text, mode="eval"), "<expr>", "eval"))  # noqa: S307 - test oracle only
    except ZeroDivisionError:
        with pytest.raises(SpecError, match="division by zero"):
            Expr(text).evaluate({})
        return
    assert Expr(text).evaluate({}) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(1, 9))
def test_split_parts_are_contiguous_and_balanced(n: int, parts: int) -> None:
    counts = [split_count(n, parts, i) for i in range(parts)]
    assert sum(counts) == n and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    assert [split_start(n, parts, i) for i in range(parts + 1)] == list(itertools.accumulate([0] + counts))


# ------------------------------------------------------------------------------------------------ patterns


def test_pattern_match_and_fill() -> None:
    p = Pattern.compile("decoder.layers.{i}.mlp.experts.local_experts.{j}.w", {"i": DIGITS, "j": DIGITS})
    assert p.match("decoder.layers.12.mlp.experts.local_experts.3.w") == {"i": "12", "j": "3"}
    assert p.match("decoder.layers.x.mlp.experts.local_experts.3.w") is None
    assert p.fill({"i": 1, "j": 2}) == "decoder.layers.1.mlp.experts.local_experts.2.w"
    assert p.placeholders == ("i", "j")
    s = Pattern.compile("optim/state/{param}/exp_avg", {"param": SEGMENT})
    assert s.match("optim/state/a.b/exp_avg") == {"param": "a.b"} and s.match("optim/state/a/b/exp_avg") is None
    rest = Pattern.compile("optim/param_groups/**", {})
    assert rest.match("optim/param_groups") == {} and rest.match("optim/param_groups/0/lr") == {}
    assert rest.match("optim/param_groupsX") is None


@pytest.mark.parametrize("a,b,expect", [
    ("layers.{i}.w", "layers.{j}.w", True), ("layers.{i}.w", "layers.{i}.b", False), ("layers.{i}.w", "layers.3.w", True),
    ("layers.{i}.w", "layers.x.w", False), ("a.{i}{j}", "a.12", True), ("model/{p}", "model/a.b", True),
    ("model/{p}", "model/a/b", False), ("optim/state/{p}/exp_avg", "optim/state/{p}/exp_avg_sq", False),
    ("x/**", "x/{p}/y", True), ("x/**", "xy", False), ("x/**", "x", True),
])
def test_pattern_overlap_cases(a: str, b: str, expect: bool) -> None:
    cls = {"i": DIGITS, "j": DIGITS, "p": SEGMENT}
    pa, pb = (Pattern.compile(t, {k: v for k, v in cls.items() if "{" + k + "}" in t}) for t in (a, b))
    w = overlap(pa, pb)
    assert (w is not None) == expect
    if w is not None:
        assert pa.match(w) is not None and pb.match(w) is not None


_ALPHA = ["a", "1", ".", "/"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_ALPHA + ["{i}", "{p}"]), min_size=1, max_size=4),
       st.lists(st.sampled_from(_ALPHA + ["{j}", "{q}"]), min_size=1, max_size=4))
def test_pattern_overlap_is_exact(ta: list[str], tb: list[str]) -> None:
    assume(all(("".join(t)).count(p) <= 1 for t in (ta, tb) for p in ("{i}", "{p}", "{j}", "{q}")))
    pa = Pattern.compile("".join(ta), {n: DIGITS if n in "ij" else SEGMENT for n in "ijpq" if "{" + n + "}" in "".join(ta)})
    pb = Pattern.compile("".join(tb), {n: DIGITS if n in "ij" else SEGMENT for n in "ijpq" if "{" + n + "}" in "".join(tb)})
    w = overlap(pa, pb)
    if w is not None:
        assert pa.match(w) is not None and pb.match(w) is not None
    else:  # brute force: no short key over the relevant characters matches both
        for n in range(1, 7):
            for key in itertools.product(["a", "1", ".", "/", "b"], repeat=n):
                s = "".join(key)
                assert not (pa.match(s) is not None and pb.match(s) is not None), s


# ------------------------------------------------------------------------------------------------ loading


BASE = textwrap.dedent("""\
    spec: 1
    name: toy
    dims:
      hidden: required
      ffn: 4 * hidden
    indices:
      i: {count: 2, over: pp, as: L}
    params:
      - name: layers.{i}.fc1.weight
        shape: [ffn, hidden]
        shard: {dim: 0}
      - name: layers.{i}.norm.weight
        shape: [hidden]
        replicated: tp
    state:
      - {match: "model/{param}", to: "model/{logical}"}
    plain:
      - iteration
    """)


def test_shipped_specs_load_and_round_trip_through_json() -> None:
    for name in SHIPPED:
        spec = shipped_spec(name)
        assert spec.name == name and spec.file == f"spec_lang/specs/{name}.yaml"
        text = spec.to_json()
        json.loads(text)
        again = Spec.from_json(text)
        assert again == spec and hash(again) == hash(spec) and again.digest() == spec.digest()
    assert len({shipped_spec(n).digest() for n in SHIPPED}) == len(SHIPPED) == 6


def test_load_from_path_text_and_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "toy.yaml"
    path.write_text(BASE)
    a, b = load_spec(path), load_spec(str(path))
    assert a == b and a.file == str(path) and a.name == "toy"
    c = load_spec(BASE.replace("name: toy\n", ""), name="mine.yaml")
    assert c.name == "mine.yaml" and c.file == "mine.yaml"
    r = c.param_rule("layers.{i}.fc1.weight")
    assert r.logical == "layers.{L}.fc1.weight" and r.bucket == "dense" and [e.source for e in r.shape] == ["ffn", "hidden"]
    assert c.zero.buckets[0].name == "dense" and c.zero.groups[0].name == "0"


def test_spec_json_decoding_is_strict() -> None:
    data = json.loads(shipped_spec("gpt").to_json())
    data["version"] = 2
    with pytest.raises(SpecError, match="version 2"):
        Spec.from_json(json.dumps(data))
    data["version"] = 1
    data["params"][0]["construct"]["type"] = "Mystery"
    with pytest.raises(SpecError, match="unknown entry type 'Mystery'"):
        Spec.from_json(json.dumps(data))
    data = json.loads(shipped_spec("gpt").to_json())
    data["zero"]["extra"] = 1
    with pytest.raises(SpecError, match="ZeroSpec has fields"):
        Spec.from_json(json.dumps(data))
    with pytest.raises(SpecError, match="not valid JSON"):
        Spec.from_json("{")


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(text, name="t.yaml")
    return e.value


def test_bad_spec_unknown_construct() -> None:
    e = _error(BASE.replace("    shard: {dim: 0}", "    sharded: {dim: 0}"))
    assert str(e) == ("t.yaml:11:5: rule 'layers.{i}.fc1.weight': unknown construct or field 'sharded' in a parameter "
                      "rule; expected one of name, when, logical, shape, tied, bucket, replicated, averaged, shard, "
                      "fused; found 'sharded'. Did you mean 'shard'? Otherwise remove it or use a listed one.")
    assert (e.where.line, e.where.column, e.rule) == (11, 5, "layers.{i}.fc1.weight")  # type: ignore[attr-defined]


def test_bad_spec_widths_do_not_sum() -> None:
    e = _error(BASE.replace("shape: [ffn, hidden]\n    shard: {dim: 0}",
                            "shape: [10, hidden]\n    shard: {dim: 0, widths: [4, 4, 3]}"))
    assert str(e) == ("t.yaml:11:29: rule 'layers.{i}.fc1.weight': widths [4, 4, 3] sum to 11, not to the size of dim 0; "
                      "expected a sum of 10 units; found a sum of 11. Make the per-rank widths add up to the dim's size.")


def test_bad_spec_pattern_matching_two_rules() -> None:
    e = _error(BASE.replace("  - name: layers.{i}.norm.weight", "  - name: layers.1.fc1.weight"))
    assert str(e) == ("t.yaml:12:5: rule 'layers.1.fc1.weight': the pattern matches keys that parameter rule "
                      "'layers.{i}.fc1.weight' (at t.yaml:9:5) matches too, e.g. 'layers.1.fc1.weight'; expected every "
                      "key matched by one rule; found two rules. Make the patterns disjoint (more literal text) or "
                      "merge the two rules.")
    e = _error(BASE.replace("  - {match: \"model/{param}\", to: \"model/{logical}\"}",
                            "  - {match: \"model/{param}\", to: \"model/{logical}\"}\n"
                            "  - {match: \"model/layers.{param}\", to: \"x/{logical}\"}"))
    assert str(e).startswith("t.yaml:17:5: rule 'model/layers.{param}': the pattern matches keys that state rule "
                             "'model/{param}' (at t.yaml:16:5) matches too, e.g. 'model/layers.x'")


def test_bad_spec_dim_out_of_range() -> None:
    e = _error(BASE.replace("shard: {dim: 0}", "shard: {dim: 2}"))
    assert str(e) == ("t.yaml:11:18: rule 'layers.{i}.fc1.weight': dim 2 is out of range for a 2-d logical shape; "
                      "expected 0..1; found 2. Count dims from 0 in the logical shape.")


@pytest.mark.parametrize("old,new,where,fragment", [
    ("ffn: 4 * hidden", "ffn: 4 * hiden", "t.yaml:5:12: section 'dims'", "unknown name 'hiden'"),
    ("ffn: 4 * hidden", "ffn: 4 * (hidden", "t.yaml:5:19: section 'dims'", "expected ')'"),
    ("shape: [hidden]", "shape: [\"2 * hiden\"]", "t.yaml:13:18: rule 'layers.{i}.norm.weight'", "unknown name 'hiden'"),
    ("shape: [hidden]", "shape: [hidden * tp]", "t.yaml:13:22: rule 'layers.{i}.norm.weight'", "reads 'tp', which varies"),
    ("    replicated: tp\n", "", "t.yaml:12:11: rule 'layers.{i}.norm.weight'", "the rule has no construct"),
    ("    replicated: tp\n", "    replicated: tp\n    averaged: tp\n", "t.yaml:15:5: rule 'layers.{i}.norm.weight'",
     "the rule has two constructs"),
    ("    replicated: tp\n", "    replicated: tp\n    replicated: tp\n", "t.yaml:15:5", "duplicate key 'replicated'"),
    ("replicated: tp", "replicated: dp", "t.yaml:14:17: rule 'layers.{i}.norm.weight'", "expected tp"),
    ("layers.{i}.norm", "layers.{k}.norm", "t.yaml:12:18: rule 'layers.{k}.norm.weight'", "unknown placeholder {k}"),
    ("shard: {dim: 0}", "shard: {dim: 0", "t.yaml:12:9", "not valid YAML"),
    ("spec: 1", "spec: 2", "t.yaml:1:7", "unsupported spec version"),
    ("over: pp", "over: xp", "t.yaml:7:23: section 'indices'", "unknown axis"),
    ("[ffn, hidden]\n    shard: {dim: 0}", "[10, hidden]\n    shard: {dim: 0, unit: 3}", "t.yaml:11:27: rule "
     "'layers.{i}.fc1.weight'", "unit 3 does not divide the logical size 10"),
    ("\"model/{param}\", to", "\"model/{p}\", to", "t.yaml:16:20: rule 'model/{p}'", "unknown placeholder {p}"),
    ("\"model/{param}\", to", "\"model/{param}{param}\", to", "t.yaml:16:27: rule 'model/{param}{param}'",
     "appears twice"),
    ("to: \"model/{logical}\"", "to: \"model/x\"", "t.yaml:16:35: rule 'model/{param}'", "must use {logical}"),
    ("to: \"model/{logical}\"", "flat: \"model/{logical}\"", "t.yaml:16:20: rule 'model/{param}'",
     "unknown placeholder {param}; known here: {bucket}, {group}"),
    ("  hidden: required", "  hidden: required\n  tp: 2", "t.yaml:5:3: section 'dims'", "is reserved"),
    ("shape: [hidden]\n    replicated: tp", "shape: [hidden]\n    replicated: tp\n    bucket: expert",
     "t.yaml:15:13: rule 'layers.{i}.norm.weight'", "unknown bucket 'expert'"),
    ("shape: [hidden]\n    replicated: tp", "shape: [hidden]\n    replicated: tp\n    tied: {to: \"w.{i}\"}",
     "t.yaml:15:19: rule 'layers.{i}.norm.weight'", "unknown placeholder {i}; known here: {L}"),
])
def test_bad_spec_cases_are_positioned(old: str, new: str, where: str, fragment: str) -> None:
    assert old in BASE
    e = _error(BASE.replace(old, new, 1))
    assert str(e).startswith(where + ":"), str(e)
    assert fragment in str(e)
    assert str(e).count("t.yaml:") <= 2  # one position (plus the other rule's, for overlaps and duplicates)


def test_bad_spec_fused_and_let_cases() -> None:
    fused = BASE.replace("    shape: [ffn, hidden]\n    shard: {dim: 0}", textwrap.indent(textwrap.dedent("""\
        fused:
          dim: 0
          unit: 2
          groups: 3
          parts:
            - {logical: "a.{L}", shape: [12, hidden]}
            - {logical: "b.{L}", shape: [4, hidden]}
        """), "    ").rstrip("\n"))
    e = _error(fused)
    assert str(e).startswith("t.yaml:13:15: rule 'layers.{i}.fc1.weight': groups 3 do not divide the 2 units of part 'b.{L}'")
    e = _error(fused.replace("[4, hidden]", "[4]"))
    assert str(e).startswith("t.yaml:16:11: rule 'layers.{i}.fc1.weight': fused parts differ in rank")
    e = _error(BASE.replace("indices:", "let:\n  a: b + 1\n  b: a\nindices:"))
    assert str(e).startswith("t.yaml:7:6: section 'let': let values refer to each other in a cycle: a -> b -> a")


def test_layout_time_errors_keep_positions() -> None:
    from resharding.spec_layout import rank_layout
    # ffn is a dim, so the sum can only be checked once dims are known: at layout time, with the same position.
    spec = load_spec(BASE.replace("shard: {dim: 0}", "shard: {dim: 0, widths: [3, 3]}"), name="t.yaml")
    assert rank_layout(spec, {"hidden": 1, "ffn": 6}, {"tp": 2}, 1)["model/layers.0.fc1.weight"].shape == (3, 1)
    with pytest.raises(SpecError, match=r"^t\.yaml:11:29: rule 'layers.\{i\}.fc1.weight': widths \[3, 3\] over tp = 2 do "
                                        r"not sum to the 12 units of dim 0"):
        rank_layout(spec, {"hidden": 3}, {"tp": 2}, 0)
    with pytest.raises(SpecError, match=r"^t\.yaml:11:29: .*widths lists 2 ranks but tp = 3"):
        rank_layout(spec, {"hidden": 3}, {"tp": 3}, 0)
    with pytest.raises(SpecError, match=r"^t\.yaml:4:3: section 'dims': required model dims are missing: hidden"):
        rank_layout(spec, {}, {"tp": 1}, 0)
    spec = load_spec(BASE.replace("shard: {dim: 0}", "shard: {dim: 0, widths: \"2 * r + 2\"}"), name="t.yaml")
    lay = rank_layout(spec, {"hidden": 3}, {"tp": 3}, 2)  # widths 2, 4, 6 sum to ffn = 12
    t = lay["model/layers.0.fc1.weight"]
    assert t.shape == (6, 3) and t.pieces[0].logical_offsets == (6, 0)


# ------------------------------------------------------------------------------------------------ check


def _megatron_keys(zero: int) -> list[str]:
    params = ["embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
              "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_proj.weight",
              "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
              "decoder.layers.0.mlp.linear_fc2.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    keys = [f"model/{p}" for p in params] + ["optim/param_groups", "iteration"]
    if zero == 0:
        keys += [f"optim/state/{p}/{m}" for p in params for m in ("exp_avg", "exp_avg_sq", "step")]
    else:
        keys += [f"optim/flat/dense.{g}/{m}" for g in (0, 1) for m in ("fp32_param", "exp_avg", "exp_avg_sq", "step")]
    return keys


def test_check_reports_unmatched_rules_and_keys() -> None:
    spec = shipped_spec("llama")
    report = check(spec, _megatron_keys(0))
    assert report.unmatched_keys == ()
    assert [r.pattern for r in report.unmatched_rules] == [
        "optim/flat/{bucket}.{group}/fp32_param", "optim/flat/{bucket}.{group}/exp_avg",
        "optim/flat/{bucket}.{group}/exp_avg_sq", "optim/flat/{bucket}.{group}/step"]
    assert str(report.unmatched_rules[0]).startswith("spec_lang/specs/llama.yaml:")
    quiet = check(spec, _megatron_keys(0), settings={"zero": 0})
    assert quiet.ok and len(quiet.inactive_rules) == 4
    keys = _megatron_keys(1)
    keys.remove("model/decoder.layers.0.mlp.linear_fc2.weight")
    keys += ["model/decoder.layers.0.mlp.router.weight", "optim/flat/moe.0/exp_avg", "rng/state"]
    report = check(spec, keys, settings={"zero": 1})
    assert report.unmatched_keys == ("model/decoder.layers.0.mlp.router.weight", "optim/flat/moe.0/exp_avg", "rng/state")
    assert [r.pattern for r in report.unmatched_rules] == ["decoder.layers.{i}.mlp.linear_fc2.weight"]
    assert [r.pattern for r in report.inactive_rules] == ["optim/state/{param}/exp_avg", "optim/state/{param}/exp_avg_sq",
                                                          "optim/state/{param}/step"]
    assert "3 key(s) match no rule" in report.format() and not report.ok
