"""#21 item 8, the save side: a tied embedding and LM head stored twice, and a save mixed into a directory of other
files without a word. Producers are real Hugging Face models built from configs (GPT-2 ties its LM head to the
token embedding; a vocabulary of 97 and width 30 that no degree divides); comparisons are ``torch.equal``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.tiers import step_dir
from tests.distributed_utils import run_distributed

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0, tie: bool = True) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=30, n_layer=2, n_head=3, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


def _data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "data").iterdir())


def _state_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def _manifest(path: Path) -> Any:
    from formats.reader import read_manifest
    from formats.storage import open_storage

    return read_manifest(open_storage(str(path)))


EMBED = "model/transformer.wte.weight"
HEAD = "model/lm_head.weight"


def test_a_tied_embedding_and_head_are_stored_once(tmp_path: Path) -> None:
    model = _gpt2()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()  # tied, as HF builds it
    ckpt.save({"model": model}, str(tmp_path / "tied"))
    tied_bytes = _data_bytes(tmp_path / "tied")
    once = _state_bytes(sd) - sd["lm_head.weight"].numel() * 4
    assert tied_bytes <= once, (tied_bytes, once, _state_bytes(sd))  # one copy of the 97 x 30 matrix
    tensors = _manifest(tmp_path / "tied").tensors
    assert tensors[HEAD].chunks == tensors[EMBED].chunks, "the head lists the embedding's bytes"

    # an untied model of the same sizes stores both
    untied = _gpt2(tie=False)
    ckpt.save({"model": untied}, str(tmp_path / "untied"))
    assert _data_bytes(tmp_path / "untied") > tied_bytes

    fresh = _gpt2(seed=5)
    report = ckpt.load({"model": fresh}, str(tmp_path / "tied"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()  # still tied
    assert HEAD in report.loaded_keys and EMBED in report.loaded_keys
    # into an untied model: both keys get the bytes
    other = _gpt2(seed=6, tie=False)
    ckpt.load({"model": other}, str(tmp_path / "tied"))
    assert torch.equal(other.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(other.transformer.wte.weight, sd["transformer.wte.weight"])
    from tests.cli_utils import run_cli  # the CLI verifies the shared bytes under both keys

    out = run_cli("verify", str(tmp_path / "tied"))
    assert out.returncode == 0, out.stderr


def test_the_checkpointer_restores_tied_weights_exactly(tmp_path: Path) -> None:
    """The Checkpointer writes tied tensors under each key (its plan is reused across saves and a tie can end
    between them; tests/test_checkpointer_sources.py replaces ``.data`` under one), and restores them exactly."""
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    root = tmp_path / "run"
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        cp.save(1, {"model": model, "optim": opt}).wait()
    tensors = _manifest(root / step_dir(1)).tensors
    assert HEAD in tensors and EMBED in tensors
    want = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _gpt2(seed=5)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with ckpt.Checkpointer(str(root), disk_every=1) as cp:
        assert cp.restore({"model": fresh, "optim": fopt}) == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    for (i, st), (_, st2) in zip(opt.state_dict()["state"].items(), fopt.state_dict()["state"].items()):
        for k in st:
            assert torch.equal(st[k], st2[k]), (i, k)


def _tied_two_ranks(rank: int, world: int, path: str) -> int:
    model = _gpt2()
    ckpt.save({"model": model}, path)
    fresh = _gpt2(seed=9)
    ckpt.load({"model": fresh}, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    return _data_bytes(Path(path))


def test_tied_weights_are_stored_once_across_ranks(tmp_path: Path) -> None:
    out = run_distributed(_tied_two_ranks, 2, str(tmp_path / "ck"), timeout_secs=180)
    sd = _gpt2().state_dict()
    assert out[0] == out[1] <= _state_bytes(sd) - sd["lm_head.weight"].numel() * 4, out


def test_saving_into_a_directory_of_other_files_says_so(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (busy / "results").mkdir()
    with pytest.warns(UserWarning, match=r"already holds 2 other entries \(notes.txt, results\)"):
        ckpt.save({"w": torch.arange(7.0)}, str(busy))
    assert (busy / "notes.txt").read_text() == "mine"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new directory, and a save over its own checkpoint, say nothing
        ckpt.save({"w": torch.arange(7.0)}, str(tmp_path / "new"))
        ckpt.save({"w": torch.arange(5.0)}, str(tmp_path / "new"), overwrite=True)
    got = {"w": torch.zeros(5)}
    ckpt.load(got, str(tmp_path / "new"))
    assert torch.equal(got["w"], torch.arange(5.0))


def test_the_checkpointer_records_the_model_config_for_the_export(tmp_path: Path) -> None:
    """``Checkpointer(model_config=model.config)``: every step's manifest records it, so ``ckpt convert STEP OUT
    --to safetensors`` writes the ``config.json`` that ``from_pretrained`` needs."""
    from tests.cli_utils import run_cli

    model = _gpt2()
    root = tmp_path / "run"
    with ckpt.Checkpointer(str(root), disk_every=1, model_config=model.config) as cp:
        cp.save(1, {"model": model}).wait()
    assert _manifest(root / step_dir(1)).metadata["hf_config"]["vocab_size"] == 97
    out = run_cli("convert", str(root / step_dir(1)), str(tmp_path / "hf"), "--to", "safetensors")
    assert out.returncode == 0, out.stderr
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ckpt.UnsupportedStateError):
        ckpt.Checkpointer(str(tmp_path / "bad"), model_config={"f": object()})
