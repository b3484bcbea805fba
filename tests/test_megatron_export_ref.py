"""Exporting a universal checkpoint to Megatron rank directories (``resharding.megatron_export.export_megatron``),
checked against the reference model's own files.

The producer is real: ``megatron_ref`` trains on gloo ranks (``run_distributed``) and writes its rank directories
with ``save_megatron`` (zero 0, optimizer state after two steps, odd vocabularies). Those files are imported
(``import_megatron``), exported at other layouts, and every exported file must equal, bit for bit, what
``megatron_ref.save_megatron`` writes at that layout for the same logical state. The reference files at a target
layout come from the oracle only: every rank of the target is a simulated ``ParallelState`` whose model and
optimizer are loaded with ``megatron_ref.to_local`` of the trained logical state (``megatron_ref.to_logical`` of
the ranks' own states) and saved with ``save_megatron``; no project code is involved in making them.

Also: a ZeRO-1 target (``distrib_optim_DDD.pt``), Transformer Engine naming (``gpt-te``, ``mixtral-te``: renamed
norms and ``_extra_state`` entries, on import with the TE spec and by detection from a family name, and on
export), and Megatron-LM's default vocabulary padding (``make_vocab_size_divisible_by`` = 128).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckpt
import megatron_ref as M
from megatron_ref.state import clone_state
from resharding.megatron_export import export_megatron
from resharding.megatron_import import import_megatron
from resharding.spec_bind import resolve_spec
from spec_lang.shipped import SHIPPED, shipped_spec
from tests.distributed_utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS = 2
GLOBAL_BATCH = 4
MODEL_FILE = "model_optim_rng.pt"

#: family -> (model, layout the ranks train and save at, two other layouts to export to)
CASES: dict[str, tuple[M.ModelConfig, M.ParallelConfig, list[M.ParallelConfig]]] = {
    "gpt": (M.gpt_tiny(), M.ParallelConfig(tp=2, pp=2),
            [M.ParallelConfig(tp=1, pp=4), M.ParallelConfig(tp=4, pp=1, dp=2)]),
    "llama": (M.llama_tiny(), M.ParallelConfig(tp=2, dp=2),
              [M.ParallelConfig(tp=1, pp=2), M.ParallelConfig(tp=4, pp=2)]),
    "mixtral": (M.mixtral_tiny(), M.ParallelConfig(tp=2, dp=2, ep=2),
                [M.ParallelConfig(tp=1, pp=2, dp=4, ep=4), M.ParallelConfig(tp=4, pp=1, dp=1, ep=1)]),
}

#: family -> ZeRO-1 targets with dp = 2 (and 4), plus mixtral at zero 2 and 3
ZERO1: dict[str, list[M.ParallelConfig]] = {
    "gpt": [M.ParallelConfig(tp=1, pp=2, dp=2, zero=1)],
    "llama": [M.ParallelConfig(tp=2, pp=1, dp=2, zero=1)],
    "mixtral": [M.ParallelConfig(tp=1, pp=2, dp=2, ep=2, zero=1), M.ParallelConfig(tp=2, pp=1, dp=2, ep=1, zero=1),
                M.ParallelConfig(tp=1, pp=1, dp=4, ep=2, zero=1),  # expert-DP of 2: expert buckets over edp
                # beyond zero 1: zero 2 files are zero 1's; zero 3 keeps no model weights (simulated reference ranks
                # cannot re-gather over dp > 1, so zero 3 only with dp = 1)
                M.ParallelConfig(tp=1, pp=1, dp=2, ep=2, zero=2), M.ParallelConfig(tp=2, pp=2, dp=1, zero=3)],
}


def layout_text(pc: M.ParallelConfig) -> str:
    return f"tp={pc.tp},pp={pc.pp},dp={pc.dp},ep={pc.ep},zero={pc.zero}"


def spec_dims(mc: M.ModelConfig) -> dict[str, Any]:
    names = {d.name for d in resolve_spec(mc.family).dims}
    return {k: v for k, v in asdict(mc).items() if k in names}


def _produce(rank: int, world: int, mc: M.ModelConfig, pc: M.ParallelConfig, root: str) -> dict[str, Any]:
    """One gloo rank: train, write the Megatron files, return the rank state."""
    model = M.build_model(mc, pc, M.ParallelState.create(pc))
    opt = M.build_optimizer(model)
    for _ in range(STEPS):
        M.train_step(model, opt, GLOBAL_BATCH)
    M.save_megatron(root, model, opt)
    return clone_state(M.rank_state(model, opt))


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path, dict[str, Any]]]:
    """family -> (its megatron_ref rank directories, their universal import with the local spec, the oracle's
    logical state); made once per family."""
    cache: dict[str, tuple[Path, Path, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Path, Path, dict[str, Any]]:
        if family not in cache:
            mc, pc, _ = CASES[family]
            root = tmp_path_factory.mktemp(f"{family}-run")
            states = run_distributed(_produce, pc.world, mc, pc, str(root / "megatron"), timeout_secs=240)
            logical = M.to_logical(dict(enumerate(states)), mc, pc)
            assert logical["iteration"] == STEPS
            import_megatron(str(root / "megatron"), str(root / "universal"), family)
            cache[family] = (root / "megatron", root / "universal", logical)
        return cache[family]

    return get


def reference_files(logical: dict[str, Any], mc: M.ModelConfig, pc: M.ParallelConfig, root: Path) -> Path:
    """What ``megatron_ref.save_megatron`` writes at layout ``pc`` for ``logical``: every rank simulated in this
    process, loaded from the oracle's ``to_local``."""
    for r in range(pc.world):
        model = M.build_model(mc, pc, M.ParallelState.simulated(pc, r))
        opt = M.build_optimizer(model)
        M.load_rank_state(model, opt, M.to_local(logical, mc, pc, r))
        M.save_megatron(root, model, opt)
    return root


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def load(path: Path) -> dict[str, Any]:
    # Exports with argparse.Namespace args need the class; these are files this test wrote.
    return torch.load(path, weights_only=False)


def compare(got: Any, want: Any, where: str, bad: list[str]) -> None:
    """Bit-exact structural equality: same container types and keys, tensors with equal dtype, shape and bits,
    plain values of the same type and value."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            bad.append(f"{where}: {type(got).__name__}, expected a tensor")
        elif got.dtype != want.dtype or got.shape != want.shape:
            bad.append(f"{where}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
        elif not torch.equal(got, want):
            bad.append(f"{where}: values differ")
    elif isinstance(want, dict):
        if not isinstance(got, dict):
            bad.append(f"{where}: {type(got).__name__}, expected a dict")
            return
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        if extra or missing:
            bad.append(f"{where}: extra keys {extra[:6]}, missing keys {missing[:6]}")
        for k in want:
            if k in got:
                compare(got[k], want[k], f"{where}/{k}", bad)
    elif isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            bad.append(f"{where}: {got!r}, expected {want!r}")
            return
        for i, (a, b) in enumerate(zip(got, want)):
            compare(a, b, f"{where}/{i}", bad)
    elif type(got) is not type(want) or got != want:
        bad.append(f"{where}: {got!r}, expected {want!r}")


def compare_dirs(got_root: Path, want_root: Path) -> None:
    """Same set of files; in each, every entry (model, optimizer, param_groups, iteration, args, version) equal."""
    got_files, want_files = files_of(got_root), files_of(want_root)
    assert got_files == want_files, f"exported files {got_files} != megatron_ref's {want_files}"
    bad: list[str] = []
    for f in want_files:
        compare(load(got_root / f), load(want_root / f), f, bad)
    assert not bad, f"{len(bad)} difference(s): " + "\n".join(bad[:12])


def export_and_compare(universal: Path, logical: dict[str, Any], mc: M.ModelConfig, pc: M.ParallelConfig,
                       tmp: Path, **kw: Any) -> Path:
    dst = tmp / f"export-{layout_text(pc)}"
    result = export_megatron(str(universal), str(dst), target=layout_text(pc), **kw)
    assert result.iteration == STEPS
    assert (dst / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    assert sorted(p.name for p in dst.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    ref = reference_files(logical, mc, pc, tmp / f"ref-{layout_text(pc)}")
    compare_dirs(dst / "iter_0000002", ref)
    return dst


# ---------------------------------------------------------------- 1. round trip through export


@pytest.mark.parametrize("family", list(CASES))
def test_export_equals_megatron_ref_files_at_other_layouts(produced: Any, tmp_path: Path, family: str) -> None:
    mc, pc, targets = CASES[family]
    src, universal, logical = produced(family)
    # The oracle's reference at the source layout is the trained files themselves (sanity of the reference path).
    compare_dirs(src, reference_files(logical, mc, pc, tmp_path / "ref-source"))
    # Exporting at the source layout gives the files back.
    back = tmp_path / "back"
    export_megatron(str(universal), str(back), target=layout_text(pc))
    compare_dirs(back / "iter_0000002", src)
    for target in targets:
        dst = export_and_compare(universal, logical, mc, target, tmp_path)
        # ... and the export imports back to the same universal checkpoint.
        again = tmp_path / f"again-{layout_text(target)}"
        import_megatron(str(dst), str(again), family)
        assert_same_universal(again, universal)


# ---------------------------------------------------------------- 2. ZeRO-1 targets


@pytest.mark.parametrize("family", list(ZERO1))
def test_zero1_export_equals_megatron_ref_distrib_optim(produced: Any, tmp_path: Path, family: str) -> None:
    mc, _, _ = CASES[family]
    _, universal, logical = produced(family)
    for target in ZERO1[family]:
        dst = export_and_compare(universal, logical, mc, target, tmp_path)
        optim_files = [f for f in files_of(dst / "iter_0000002") if "distrib_optim_" in f]
        assert len(optim_files) == target.world, optim_files  # one per rank (every DP rank of every position)
        for f in optim_files:
            payload = load(dst / "iter_0000002" / f)
            assert sorted(payload) == ["args", "checkpoint_version", "iteration", "optimizer"], f
            assert "flat" in payload["optimizer"] and "param_groups" in payload["optimizer"], f
        for f in files_of(dst / "iter_0000002"):
            if f.endswith(MODEL_FILE):
                assert "optimizer" not in load(dst / "iter_0000002" / f), f


# ---------------------------------------------------------------- 3. Transformer Engine naming


def te_name(name: str, family: str) -> str:
    """The local-naming key ``name`` in TE naming (the norms fused into the next linear)."""
    parts = name.split(".")
    if len(parts) == 5 and parts[0] == "decoder" and parts[1] == "layers":
        i, module, leaf = parts[2], parts[3], parts[4]
        if module == "input_layernorm":
            return f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_{leaf}"
        if module == "pre_mlp_layernorm" and family != "mixtral":
            return f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_{leaf}"
    return name


def extra_state_keys(model: dict[str, Any], family: str) -> list[str]:
    """The TE ``_extra_state`` keys of a local-naming model dict (local layer and expert indices)."""
    keys = []
    for name in model:
        parts = name.split(".")
        if name.endswith(".self_attention.linear_qkv.weight"):
            base = ".".join(parts[:3])
            keys += [f"{base}.self_attention.core_attention._extra_state",
                     f"{base}.self_attention.linear_qkv._extra_state"]
        elif name.endswith(".self_attention.linear_proj.weight"):
            keys.append(name[: -len("weight")] + "_extra_state")
        elif family == "mixtral" and ".mlp.experts.local_experts." in name and name.endswith(
                (".linear_fc1.weight", ".linear_fc2.weight")):
            keys.append(name[: -len("weight")] + "_extra_state")
        elif family != "mixtral" and name.endswith((".mlp.linear_fc1.weight", ".mlp.linear_fc2.weight")):
            keys.append(name[: -len("weight")] + "_extra_state")
    return keys


def to_te(payload: dict[str, Any], family: str) -> dict[str, Any]:
    """A megatron_ref payload rewritten in TE naming: norm keys renamed in ``model`` and ``optimizer.state`` (key
    order kept), ``_extra_state`` entries added."""
    out = dict(payload)
    if "model" in payload:
        model = {te_name(k, family): v for k, v in payload["model"].items()}
        for k in extra_state_keys(payload["model"], family):
            model[k] = torch.empty(0, dtype=torch.uint8)
        out["model"] = model
    optim = payload.get("optimizer")
    if isinstance(optim, dict) and "state" in optim:
        out["optimizer"] = dict(optim, state={te_name(k, family): v for k, v in optim["state"].items()})
    return out


def rewrite_te(src: Path, dst: Path, family: str) -> Path:
    shutil.copytree(src, dst)
    for f in dst.rglob(MODEL_FILE):
        torch.save(to_te(torch.load(f, weights_only=True), family), f)
    return dst


def assert_same_universal(got: Path, want: Path) -> None:
    """Every tensor (dtype, shape, bits) and value of two universal checkpoints equal, the same keys."""
    with ckpt.open(str(got)) as a, ckpt.open(str(want)) as b:
        assert a.keys() == b.keys(), (sorted(set(a.keys()) ^ set(b.keys())))[:8]
        bad: list[str] = []
        for k in b.keys():
            compare(a.read(k), b.read(k), k, bad)
        assert not bad, bad[:8]


@pytest.mark.parametrize("family", ["gpt", "mixtral"])
def test_te_naming_import_and_export(produced: Any, tmp_path: Path, family: str) -> None:
    mc, pc, targets = CASES[family]
    src, universal, logical = produced(family)
    te = rewrite_te(src, tmp_path / "te", family)
    sample = load(next(te.rglob(MODEL_FILE)))
    assert any(k.endswith("._extra_state") for k in sample["model"])
    assert not any(".input_layernorm." in k for k in sample["model"])
    # The same universal checkpoint from the TE files, with the TE spec, by detection and with "auto".
    for spec in (f"{family}-te", family, "auto"):
        out = tmp_path / f"u-{spec}"
        import_megatron(str(te), str(out), spec)
        assert_same_universal(out, universal)

    # Export with the TE spec: at the source layout, the renamed originals (the _extra_state values aside).
    for layout, want_root in ((pc, te), (targets[0], None)):
        dst = tmp_path / f"te-export-{layout_text(layout)}"
        export_megatron(str(universal), str(dst), target=layout_text(layout), spec=f"{family}-te")
        if want_root is None:
            want_root = rewrite_te(reference_files(logical, mc, layout, tmp_path / f"ref-{layout_text(layout)}"),
                                   tmp_path / f"ref-te-{layout_text(layout)}", family)
        got_root = dst / "iter_0000002"
        assert files_of(got_root) == files_of(want_root)
        bad: list[str] = []
        for f in files_of(want_root):
            got, want = load(got_root / f), load(want_root / f)
            if f.endswith(MODEL_FILE):
                model = got["model"]
                assert not [k for k in model if ".input_layernorm." in k], f
                if family != "mixtral":
                    assert not [k for k in model if ".pre_mlp_layernorm." in k], f
                    assert [k for k in model if k.endswith(".mlp.linear_fc1.layer_norm_weight")], f
                    assert [k for k in model if k.endswith(".self_attention.linear_qkv.layer_norm_bias")], f
                else:
                    assert [k for k in model if k.endswith(".pre_mlp_layernorm.weight")], f
                assert [k for k in model if k.endswith(".self_attention.linear_qkv.layer_norm_weight")], f
                extra = sorted(k for k in want["model"] if k.endswith("._extra_state"))
                assert extra and sorted(k for k in model if k.endswith("._extra_state")) == extra, f
                for k in extra:
                    v = model[k]
                    assert isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1, (f, k)
                got = dict(got, model={k: v for k, v in model.items() if not k.endswith("._extra_state")})
                want = dict(want, model={k: v for k, v in want["model"].items() if not k.endswith("._extra_state")})
            compare(got, want, f, bad)
        assert not bad, f"{len(bad)} difference(s): " + "\n".join(bad[:12])
        # ... and it imports back, with either naming's family name, to the same universal checkpoint.
        again = tmp_path / f"te-again-{layout_text(layout)}"
        import_megatron(str(dst), str(again), family)
        assert_same_universal(again, universal)


# ---------------------------------------------------------------- 4. vocabulary padding default


def test_shipped_specs_default_vocab_divisible_by_is_128() -> None:
    assert sorted(SHIPPED) == sorted(["gpt", "llama", "mixtral", "gpt-te", "llama-te", "mixtral-te"])
    for name in SHIPPED:
        dims = {d.name: d.default for d in shipped_spec(name).dims}
        assert "vocab_divisible_by" in dims, name
        default = dims["vocab_divisible_by"]
        assert default is not None and str(getattr(default, "source", default)).strip() == "128", (name, default)


@pytest.mark.parametrize("tp", [1, 2])
def test_export_without_vocab_divisible_by_pads_to_128_tp(tmp_path: Path, tp: int) -> None:
    """A universal checkpoint whose recorded dims lack vocab_divisible_by (saved with ckpt.save and the gpt spec,
    dims without it): the export pads the vocabulary to a multiple of 128 * tp, exactly as megatron_ref does with
    vocab_divisible_by=128."""
    mc = M.gpt_tiny(vocab_divisible_by=128)
    one = M.ParallelConfig()
    model = M.build_model(mc, one)
    opt = M.build_optimizer(model)
    dims = {k: v for k, v in spec_dims(mc).items() if k != "vocab_divisible_by"}
    assert "vocab_divisible_by" not in dims
    ckpt.save(M.rank_state(model, opt), str(tmp_path / "u"), spec="gpt", dims=dims, layout="tp=1,pp=1,dp=1")
    logical = M.to_logical({0: M.rank_state(model, opt)}, mc, one)
    target = M.ParallelConfig(tp=tp, pp=2)
    dst = tmp_path / "out"
    export_megatron(str(tmp_path / "u"), str(dst), target=layout_text(target))
    ref = reference_files(logical, mc, target, tmp_path / "ref")
    it = "iter_0000000"
    assert files_of(dst / it) == files_of(ref)
    bad: list[str] = []
    for f in files_of(ref):
        got, want = load(dst / it / f), load(ref / f)
        compare(got["model"], want["model"], f + "/model", bad)
        compare(got.get("optimizer"), want.get("optimizer"), f + "/optimizer", bad)
        assert got["iteration"] == want["iteration"] == 0
        args = got["args"]
        assert isinstance(args, argparse.Namespace), f
        assert args.padded_vocab_size == 128 * tp and args.tensor_model_parallel_size == tp, vars(args)
        if "embedding.word_embeddings.weight" in got["model"]:
            assert got["model"]["embedding.word_embeddings.weight"].shape[0] == 128  # 128 * tp rows over tp ranks
    assert not bad, bad[:12]
    # Explicit dims that lack it too (the dims passed do not add it back).
    dst2 = tmp_path / "out2"
    export_megatron(str(tmp_path / "u"), str(dst2), target=layout_text(replace(target, pp=1)), spec="gpt-te",
                    dims=dims)
    emb = load(dst2 / it / "mp_rank_00" / MODEL_FILE)["model"]["embedding.word_embeddings.weight"]
    assert emb.shape == (128, mc.hidden)


# ---------------------------------------------------------------- the iteration recorded, and an existing save


def test_iteration_release_and_overwrite(produced: Any, tmp_path: Path) -> None:
    from ckpt.errors import CheckpointExistsError

    mc, pc, targets = CASES["gpt"]
    _, universal, logical = produced("gpt")
    dst = tmp_path / "run"
    target = layout_text(targets[0])
    export_megatron(str(universal), str(dst), target=target, iteration=5)
    assert (dst / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert all(load(dst / "iter_0000005" / f)["iteration"] == 5 for f in files_of(dst / "iter_0000005"))
    export_megatron(str(universal), str(dst), target=target, iteration="release")
    assert (dst / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert files_of(dst / "release") == files_of(dst / "iter_0000005")
    with pytest.raises(CheckpointExistsError):
        export_megatron(str(universal), str(dst), target=target, iteration=5)
    assert (dst / "latest_checkpointed_iteration.txt").read_text().strip() == "release"  # untouched
    # overwrite replaces the iteration with the new layout's files, exactly megatron_ref's.
    export_megatron(str(universal), str(dst), target=layout_text(pc), iteration=STEPS)
    export_megatron(str(universal), str(dst), target=layout_text(targets[1]), iteration=STEPS, overwrite=True)
    compare_dirs(dst / "iter_0000002", reference_files(logical, mc, targets[1], tmp_path / "ref"))
    assert sorted(p.name for p in dst.iterdir()) == ["iter_0000002", "iter_0000005",
                                                     "latest_checkpointed_iteration.txt", "release"]
