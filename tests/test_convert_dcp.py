"""PyTorch DCP <-> universal conversion with checkpoints written by torch itself.

Producers (gloo ranks, ``run_distributed``): the ``TinyNet`` of ``tests/test_distributed.py`` trained a few AdamW
steps as FSDP2 over tensor parallelism on a (2, 2) mesh (4 ranks; ``_StridedShard`` placements), as FSDP2 on 2 ranks
and as native TP on 2 ranks, each saved by ``torch.distributed.checkpoint.save`` with ``get_model_state_dict`` /
``get_optimizer_state_dict``. Each is imported into the universal format here (compared bit-exactly with the
unsharded state the producer gathered), exported back to DCP, and loaded by ``torch.distributed.checkpoint.load``
under another mesh and world size (compared bit-exactly again).

A ``ShardedTensor`` checkpoint (FSDP1's sharded state dict on 2 ranks) is imported and exported the same way.

Bad input (single process, DCP checkpoints written with ``no_dist``): a missing data file, a ``.metadata`` whose
pickle would run code, and a value that needs pickle beyond torch's weights_only loader.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from formats.foreign import convert, diff, open_source
from tests.distributed_utils import run_distributed
from tests.test_distributed import LR, SAVED_STEP, build, compare, full_state, train

pytestmark = pytest.mark.timeout(180)


def _state_dicts(model: Any, optim: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim), "step": 0}


def _produce(rank: int, world_size: int, jobs: list[tuple[str, str]]) -> dict[str, Any]:
    """Train each (kind, path) model and save it with DCP; return the unsharded references (rank 0)."""
    import torch.distributed.checkpoint as dcp

    refs = {}
    for kind, path in jobs:
        model, optim = build(kind, world_size, seed=0)
        train(model, optim)
        state = _state_dicts(model, optim)
        state["step"] = SAVED_STEP
        dcp.save(state, checkpoint_id=path)
        ref, hyper = full_state(model, optim)
        placements = {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()}
        refs[path] = (ref, hyper, placements)
    return refs if rank == 0 else {}


def _consume(rank: int, world_size: int, jobs: list[tuple[str, str]],
             refs: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Load each exported DCP checkpoint into a differently initialised ``kind`` model with DCP's own loader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    problems: list[str] = []
    for path, kind in jobs:
        ref, ref_hyper = refs[path]
        model, optim = build(kind, world_size, seed=1, lr=0.5)
        before, _ = full_state(model, optim)
        if all(torch.equal(before[k], ref[k]) for k in ref if k.startswith("model/")):
            problems.append(f"{path} -> {kind}: target equals the reference before loading")
        if os.path.exists(os.path.join(path, "manifest.json")):  # an imported universal checkpoint: ckpt.load
            state = {"model": model, "optim": optim, "step": 0}
            ckpt.load(state, path)
        else:
            state = _state_dicts(model, optim)
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optim, state["optim"])
        what = f"{os.path.basename(path)} -> {kind}({world_size})"
        if state["step"] != SAVED_STEP:
            problems.append(f"{what}: step {state['step']!r}")
        got, hyper = full_state(model, optim)
        problems += compare(got, ref, what)
        if hyper != ref_hyper:
            problems.append(f"{what}: hyperparameters {hyper} != {ref_hyper}")
    return problems


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dcp")
    paths = {"fsdp_tp": str(root / "dcp_fsdp_tp4"), "fsdp": str(root / "dcp_fsdp2"), "tp": str(root / "dcp_tp2")}
    out = run_distributed(_produce, 4, [("fsdp_tp", paths["fsdp_tp"])], timeout_secs=150)[0]
    out.update(run_distributed(_produce, 2, [("fsdp", paths["fsdp"]), ("tp", paths["tp"])], timeout_secs=150)[0])
    return {"root": root, "paths": paths, "refs": {p: out[p] for p in paths.values()}}


def _check_universal(path: str, ref: dict[str, Any], hyper: dict[str, Any]) -> list[str]:
    problems = []
    with ckpt.open(path) as r:
        tensors = set(r.manifest.tensors)
        if tensors != set(ref):
            problems.append(f"{path}: keys {sorted(tensors ^ set(ref))} differ")
        for k in sorted(tensors & set(ref)):
            got = r.read(k)
            if got.dtype != ref[k].dtype or not torch.equal(got, ref[k]):
                problems.append(f"{path}: {k} differs from the model's full state")
        if r.read("step") != SAVED_STEP:
            problems.append(f"{path}: step {r.read('step')!r}")
        pg = r.state()["optim"]["param_groups"][0]
        for name, v in hyper["param_groups"][0].items():
            if pg[name] != v:
                problems.append(f"{path}: param_groups/0/{name} {pg[name]!r} != {v!r}")
    return problems


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_dcp_import_export_across_meshes(produced: dict[str, Any]) -> None:
    root, paths, refs = produced["root"], produced["paths"], produced["refs"]
    # The (2, 2) producer really used FSDP2 over TP with strided sharding.
    placements = refs[paths["fsdp_tp"]][2]
    assert "_StridedShard" in placements["up.weight"] and "Shard(dim=1)" in placements["down.weight"], placements
    exported: dict[str, str] = {}
    for kind, path in paths.items():
        ref, hyper, _ = refs[path]
        uni = str(root / f"universal_{kind}")
        res = convert(path, uni)  # no pickle needed: DCP's values load with torch's weights_only loader
        assert res.plan.src_format == "dcp" and res.plan.tensors == len(ref)
        problems = _check_universal(uni, ref, hyper)
        assert not problems, "\n".join(problems)
        with ckpt.open(uni) as r:  # DCP's shards became the chunks
            chunks = len(r.info("model/up.weight").chunks)
            assert chunks == {"fsdp_tp": 4, "fsdp": 2, "tp": 2}[kind], (kind, chunks)
        exported[kind] = str(root / f"export_{kind}")
        convert(uni, exported[kind], dst_format="dcp")
        with open_source(path) as a, open_source(exported[kind]) as b:
            report = diff(a, b)
            assert report.equal, report.differences
    back = {exported[k]: refs[paths[k]][:2] for k in exported}
    imported = str(root / "universal_fsdp_tp")
    back[imported] = refs[paths["fsdp_tp"]][:2]
    # (2, 2) FSDP+TP -> FSDP(2) and TP(2); FSDP(2) and TP(2) -> (2, 2) FSDP+TP; and the imported universal
    # checkpoint of the (2, 2) run resumed by ckpt.load under FSDP(2).
    results = run_distributed(_consume, 2, [(exported["fsdp_tp"], "fsdp"), (exported["fsdp_tp"], "tp"),
                                            (imported, "fsdp")], back, timeout_secs=150)
    results += run_distributed(_consume, 4, [(exported["fsdp"], "fsdp_tp"), (exported["tp"], "fsdp_tp")], back,
                               timeout_secs=150)
    problems = [p for ps in results for p in ps]
    assert not problems, "\n".join(problems)
    assert refs[paths["fsdp"]][1]["param_groups"][0]["lr"] == LR


def _produce_sharded_tensor(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """FSDP1 (``FullyShardedDataParallel``) whose sharded state dict is ``ShardedTensor``s, uneven across ranks
    (7 rows over 2 ranks); trained two AdamW steps and saved with ``dcp.save``. Returns the full state (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)),
                 device_id=torch.device("cpu"), use_orig_params=True)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    for i in range(2):
        g = torch.Generator().manual_seed(10 * i + rank)
        model(torch.randn(4, 5, generator=g)).pow(2).sum().backward()
        optim.step()
        optim.zero_grad()
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, optim)
    kinds = {type(v).__name__ for v in msd.values()}
    assert kinds == {"ShardedTensor"}, kinds
    dcp.save({"model": msd, "optim": osd, "step": 2}, checkpoint_id=path)
    full = StateDictOptions(full_state_dict=True)
    fm, fo = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optim, options=full)
    ref = {f"model/{k}": v.clone() for k, v in fm.items()}
    for fqn, st in fo["state"].items():
        ref.update({f"optim/state/{fqn}/{k}": v.clone() for k, v in st.items()})
    return ref if rank == 0 else {}


@pytest.mark.distributed
def test_sharded_tensor_dcp_import_export(tmp_path: Path) -> None:
    """ShardedTensor checkpoints (FSDP1's sharded state dict): import bit-exact, export, ``dcp.load`` unsharded."""
    import warnings

    import torch.distributed.checkpoint as dcp

    src = str(tmp_path / "dcp_fsdp1")
    ref = run_distributed(_produce_sharded_tensor, 2, src, timeout_secs=150)[0]
    with open_source(src) as s:
        assert len(s.tensors["model/0.weight"].boxes) == 2  # the two ranks' shards (4 + 3 rows)
    uni = str(tmp_path / "uni")
    convert(src, uni)
    with ckpt.open(uni) as r:
        assert set(r.manifest.tensors) == set(ref)
        for k, v in ref.items():
            got = r.read(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
        assert r.read("step") == 2
    back = str(tmp_path / "back")
    convert(uni, back, dst_format="dcp")
    target = {"model": {k[len("model/"):]: torch.zeros_like(v) for k, v in ref.items() if k.startswith("model/")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=back, no_dist=True)  # one process, unsharded
    for k, v in target["model"].items():
        assert torch.equal(v, ref[f"model/{k}"]), k


# ---------------------------------------------------------------------------------------------------------------
# Single process: DCP written with no_dist, bad input


def _dcp_save(state: dict[str, Any], path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_bare_dcp_state_dict_round_trip(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    sd = {"emb.weight": torch.randn(6, 4), "head.bias": torch.randn(3).to(torch.bfloat16)}
    _dcp_save(sd, tmp_path / "bare")
    convert(str(tmp_path / "bare"), str(tmp_path / "u"))
    with ckpt.open(tmp_path / "u") as r:  # a bare model state dict: weights under model/
        assert set(r.keys()) == {"model/emb.weight", "model/head.bias"}
        assert torch.equal(r.read("model/head.bias"), sd["head.bias"])
    convert(str(tmp_path / "u"), str(tmp_path / "back"), dst_format="dcp")
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(tmp_path / "back"), no_dist=True)  # bare again
    for k, v in sd.items():
        assert target[k].dtype == v.dtype and torch.equal(target[k], v), k


def _dcp_save_zstd(sd: dict[str, Any], path: Path) -> None:
    """DCP's own compression: ``FileSystemWriter(_extensions=[ZStandard()])`` (transform "stream.zstd/1")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(path), _extensions=[ZStandard()]), no_dist=True)


def test_compressed_dcp_imports_bit_exactly(tmp_path: Path) -> None:
    """A zstd-compressed DCP checkpoint stores far fewer bytes than its tensors hold (zeros: 714 bytes for 400,000):
    the size bound of #22 allows compressed ranges their largest possible ratio instead of refusing them."""
    sd = {"w": torch.zeros(1000, 100), "b": torch.randn(37).to(torch.bfloat16), "e": torch.arange(101)}
    _dcp_save_zstd(sd, tmp_path / "z")
    src = open_source(str(tmp_path / "z"))
    for k, v in sd.items():
        got = src.read(f"model/{k}")  # a bare state dict: weights under model/
        assert got.dtype == v.dtype and torch.equal(got, v), k
    convert(str(tmp_path / "z"), str(tmp_path / "u"))
    with ckpt.open(tmp_path / "u") as r:
        assert torch.equal(r.read("model/w"), sd["w"]) and torch.equal(r.read("model/b"), sd["b"])


def test_compressed_dcp_claiming_more_than_any_frame_holds_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from formats.codec import MAX_ZSTD_RATIO

    _dcp_save_zstd({"w": torch.zeros(1000, 100)}, tmp_path / "z")
    md_path = tmp_path / "z" / ".metadata"
    md = dcp.FileSystemReader(str(tmp_path / "z")).read_metadata()
    info = next(iter(md.storage_data.values()))
    n = info.length * MAX_ZSTD_RATIO // 4 + 1  # one float32 element more than the stored bytes can decode to
    tm = md.state_dict_metadata["w"]
    object.__setattr__(tm, "size", torch.Size([n]))
    object.__setattr__(tm.chunks[0], "sizes", torch.Size([n]))
    object.__setattr__(tm.chunks[0], "offsets", torch.Size([0]))
    md_path.write_bytes(pickle.dumps(md))
    with pytest.raises(ckpt.CorruptCheckpointError) as e:
        open_source(str(tmp_path / "z"))
    assert "'w'" in str(e.value) and "at most" in str(e.value) and str(MAX_ZSTD_RATIO) in str(e.value)


def test_dcp_missing_data_file(tmp_path: Path) -> None:
    _dcp_save({"a": torch.randn(4, 4), "b": torch.randn(8), "step": 3}, tmp_path / "c")
    data = sorted(p for p in os.listdir(tmp_path / "c") if p.endswith(".distcp"))
    assert data
    os.remove(tmp_path / "c" / data[0])
    with pytest.raises(ckpt.CorruptCheckpointError) as e:
        open_source(str(tmp_path / "c"))
    assert data[0] in str(e.value) and "missing" in str(e.value)
    from tests.test_convert import _run

    rc = _run("convert", str(tmp_path / "c"), str(tmp_path / "u"))
    assert rc.returncode == 2 and data[0] in rc.stderr and not (tmp_path / "u").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.marker,))


def test_dcp_malicious_metadata_is_not_unpickled(tmp_path: Path) -> None:
    _dcp_save({"a": torch.randn(4)}, tmp_path / "c")
    marker = tmp_path / "PWNED"
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ckpt.UnsafeCheckpointError) as e:
        open_source(str(tmp_path / "c"))
    assert "makedirs" in str(e.value) and "allow_pickle" in str(e.value) and ".metadata" in str(e.value)
    assert not marker.exists()


def test_dcp_metadata_is_read_once_and_unpickled_only_with_allowed_names(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes checked are the bytes unpickled (torch's reader, which would open the file again, is not used),
    and the unpickler resolves only DCP's metadata classes even for a stream the static check never saw."""
    from torch.distributed.checkpoint import FileSystemReader

    from formats.foreign import pickle_guard

    _dcp_save({"a": torch.arange(4.0)}, tmp_path / "c")

    def reread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the metadata was read a second time, after its check")

    monkeypatch.setattr(FileSystemReader, "read_metadata", reread)
    with open_source(str(tmp_path / "c")) as src:
        assert torch.equal(src.read("model/a"), torch.arange(4.0))  # a bare state dict: model weights
    marker = tmp_path / "PWNED"
    with pytest.raises(pickle.UnpicklingError, match="os.*makedirs|posix.*makedirs"):
        pickle_guard._CheckedUnpickler(io.BytesIO(pickle.dumps(_Payload(str(marker))))).load()
    assert not marker.exists()


def test_dcp_pickled_value_needs_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    _dcp_save({"w": torch.randn(3), "extra": {"obj": _Payload(str(marker))}}, tmp_path / "c")
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError) as e:
        open_source(str(tmp_path / "c"))
    assert "'extra/obj'" in str(e.value) and "allow_pickle=True" in str(e.value)
    assert not marker.exists()
    from tests.test_convert import _run

    rc = _run("convert", str(tmp_path / "c"), str(tmp_path / "u"))
    assert rc.returncode == 2 and "--allow-pickle" in rc.stderr and not marker.exists()
    # Opting in unpickles it (the payload runs: only for trusted checkpoints).
    with open_source(str(tmp_path / "c"), allow_pickle=True) as src:
        assert torch.equal(src.read("w"), src.read("w")) and marker.exists()
    shutil.rmtree(marker)
