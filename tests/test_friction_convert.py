"""What a new user trips over in ``ckpt convert`` (issue #21, items 4 and 5 and two of item 8), run as a user would:
the public API and the CLI, with real producers (``transformers`` models built from odd-sized configs, no downloads;
AdamW trained two steps; ``torch.save``).

* A ``ckpt.save``d HF model exported to safetensors opens with ``from_pretrained`` (``model_config=`` /
  ``generation_config=`` recorded in the manifest, written as ``config.json`` / ``generation_config.json``); without a
  recorded config the OK line says how to add one; a recorded config is hostile input on read.
* A ``torch.save``d ``{"model": sd, "optim": opt.state_dict()}`` converts into FQN-keyed optimizer state that
  ``ckpt.load`` resumes bit-exactly; where the file cannot say which index is which parameter, convert says so and
  ``--model-keys`` fixes it.
* ``--dtype`` takes torch's names; an ``argparse.Namespace`` under ``--allow-pickle`` is stored as its dict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from formats.manifest import MANIFEST_NAME, seal
from tests.cli_utils import run_cli

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------------------------------------
# Item 4: Hugging Face exports that from_pretrained can open


def _hf(arch: str) -> Any:
    import transformers

    torch.manual_seed(1)
    if arch == "gpt2":  # odd sizes: 5 heads of 12, a vocabulary of 1001; tied embedding and LM head
        cfg = transformers.GPT2Config(n_layer=2, n_embd=60, n_head=5, vocab_size=1001, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    # grouped-query attention (6 query heads share 2 key/value heads), odd vocabulary and MLP width
    cfg = transformers.LlamaConfig(vocab_size=997, hidden_size=36, intermediate_size=52, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _comparable(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):  # set by the loader
        d.pop(k, None)
    return d


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ckpt_save_with_model_config_exports_what_from_pretrained_opens(arch: str, tmp_path: Path) -> None:
    model = _hf(arch)
    model.generation_config.max_new_tokens = 17  # a non-default generation setting that must survive
    step = tmp_path / "step_5"
    ckpt.save({"model": model, "step": 5}, step, model_config=model.config,
              generation_config=model.generation_config)
    out = tmp_path / "hf_out"
    rc = run_cli("convert", str(step), str(out), "--to", "safetensors")
    assert rc.returncode == 0, rc.stderr
    assert "wrote config.json, generation_config.json" in rc.stdout, rc.stdout
    assert json.loads((out / "config.json").read_text())["vocab_size"] == model.config.vocab_size

    loaded = type(model).from_pretrained(out).eval()
    assert _comparable(loaded.config) == _comparable(model.config)
    assert loaded.generation_config.max_new_tokens == 17
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

    # The configs travel on: back into a universal checkpoint and out again.
    rc = run_cli("convert", str(out), str(tmp_path / "again"))
    assert rc.returncode == 0, rc.stderr
    with ckpt.open(tmp_path / "again") as r:
        assert r.manifest.metadata["hf_config"]["vocab_size"] == model.config.vocab_size
        assert r.manifest.metadata["hf_generation_config"]["max_new_tokens"] == 17


def test_export_without_a_recorded_config_says_how_to_add_one(tmp_path: Path) -> None:
    model = _hf("gpt2")
    ckpt.save({"model": model}, tmp_path / "step_5")
    out = tmp_path / "hf_out"
    rc = run_cli("convert", str(tmp_path / "step_5"), str(out), "--to", "safetensors")
    assert rc.returncode == 0, rc.stderr
    ok = [ln for ln in rc.stdout.splitlines() if ln.startswith("OK:")]
    assert len(ok) == 1 and "no config.json" in ok[0] and "ckpt.save(..., model_config=model.config)" in ok[0], ok
    assert not (out / "config.json").exists()
    rc = run_cli("convert", str(tmp_path / "step_5"), str(tmp_path / "j"), "--to", "safetensors", "--json")
    assert rc.returncode == 0 and json.loads(rc.stdout)["missing_config"] is True


def test_model_config_is_checked_on_save_and_on_read(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0)}}
    with pytest.raises(ckpt.CheckpointError, match="model_config: expected a transformers PretrainedConfig"):
        ckpt.save(state, tmp_path / "a", model_config=object())
    with pytest.raises(ckpt.CheckpointError, match="generation_config: not representable as JSON"):
        ckpt.save(state, tmp_path / "a", generation_config={"x": float("nan")})
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()  # refused before anything was written

    ckpt.save(state, tmp_path / "ok", model_config={"model_type": "gpt2", "n_embd": 6})
    doc = json.loads((tmp_path / "ok" / MANIFEST_NAME).read_text())
    assert doc["metadata"]["hf_config"] == {"model_type": "gpt2", "n_embd": 6}
    for bad, found in (([1, 2], "found list"), ({"blob": "x" * (17 * 2**20)}, "bytes, more than")):
        doc["metadata"]["hf_config"] = bad
        (tmp_path / "ok" / MANIFEST_NAME).write_bytes(seal(doc))  # sealed: only the config check can refuse it
        with pytest.raises(ckpt.CorruptCheckpointError, match=f"metadata.hf_config .*{found}"):
            ckpt.open(tmp_path / "ok")
        rc = run_cli("convert", str(tmp_path / "ok"), str(tmp_path / "st"), "--to", "safetensors")
        assert rc.returncode == 2 and "hf_config" in rc.stderr and not (tmp_path / "st" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Item 5: index-keyed optimizer state from torch.save files


class _Net(torch.nn.Module):
    """Odd sizes, a bias and a norm; ``float_buffer`` adds a floating buffer (which a state dict cannot tell apart
    from a parameter) and an integer one."""

    def __init__(self, float_buffer: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(37, 13)
        self.norm = torch.nn.LayerNorm(13)
        self.fc = torch.nn.Linear(13, 7)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        if float_buffer:
            self.register_buffer("scale", torch.full((7,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(self.emb(x)))
        return y * self.scale if hasattr(self, "scale") else y


def _trained(model: torch.nn.Module, inputs: Any) -> torch.optim.AdamW:
    torch.manual_seed(2)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        (out.loss if hasattr(out, "loss") else out.float().pow(2).sum()).backward()
        optim.step()
        optim.zero_grad()
    return optim


def _assert_resumed(model: torch.nn.Module, optim: torch.optim.Optimizer, fresh: torch.nn.Module,
                    fresh_optim: torch.optim.Optimizer) -> None:
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        want, got = optim.state[p], fresh_optim.state[q]
        assert set(got) == set(want) == {"step", "exp_avg", "exp_avg_sq"}, name
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (name, k)
    for g, h in zip(optim.param_groups, fresh_optim.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}


def _convert_and_resume(path: Path, out: Path, make: Any, *extra: str) -> tuple[Any, Any, Any]:
    rc = run_cli("convert", str(path), str(out), "--from", "torch", *extra)
    fresh = make()
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    if rc.returncode == 0:
        ckpt.load({"model": fresh, "optim": fresh_optim, "step": 0}, out)
    return rc, fresh, fresh_optim


@pytest.mark.parametrize("arch", ["net", "gpt2"])
def test_torch_save_with_optimizer_converts_into_state_that_resumes(arch: str, tmp_path: Path) -> None:
    if arch == "net":
        def make() -> torch.nn.Module:
            torch.manual_seed(0)
            return _Net()
        inputs: Any = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 35])
    else:  # tied embedding and LM head: one parameter under two names in the state dict
        make = lambda: _hf("gpt2").train()  # noqa: E731
        ids = torch.randint(0, 1001, (2, 9), generator=torch.Generator().manual_seed(4))
        inputs = {"input_ids": ids, "labels": ids}
    model = make()
    optim = _trained(model, inputs)
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": 2}, tmp_path / "x.pt")
    rc, fresh, fresh_optim = _convert_and_resume(tmp_path / "x.pt", tmp_path / "out", make)
    assert rc.returncode == 0 and "warning" not in rc.stderr, rc.stderr
    _assert_resumed(model, optim, fresh, fresh_optim)
    with ckpt.open(tmp_path / "out") as r:
        assert r.read("optim/param_groups/0/params/0") == next(iter(model.named_parameters()))[0]


def test_ambiguous_optimizer_state_is_reported_and_model_keys_fix_it(tmp_path: Path) -> None:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return _Net(float_buffer=True)

    model = make()
    optim = _trained(model, torch.tensor([2, 7, 1, 8, 28, 18, 2]))
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": 2}, tmp_path / "x.pt")
    rc = run_cli("convert", str(tmp_path / "x.pt"), str(tmp_path / "plain"), "--from", "torch")
    assert rc.returncode == 0, rc.stderr
    assert "stays keyed by parameter index 0..4" in rc.stderr and "ckpt.load cannot restore an optimizer" in rc.stderr
    assert "model/ holds 7 tensors (6 floating" in rc.stderr and "--model-keys FILE" in rc.stderr, rc.stderr

    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(n for n, _ in model.named_parameters()) + "\n")
    rc, fresh, fresh_optim = _convert_and_resume(tmp_path / "x.pt", tmp_path / "out", make, "--model-keys", str(keys))
    assert rc.returncode == 0 and "warning" not in rc.stderr, rc.stderr
    _assert_resumed(model, optim, fresh, fresh_optim)

    keys.write_text("\n".join(n for n, _ in list(model.named_parameters())[:-1]))
    rc = run_cli("convert", str(tmp_path / "x.pt"), str(tmp_path / "bad"), "--from", "torch", "--model-keys", str(keys))
    assert rc.returncode == 2 and "lists 4 names" in rc.stderr and "has 5 parameters" in rc.stderr, rc.stderr
    names = [n for n, _ in model.named_parameters()]
    keys.write_text(json.dumps([names[1], names[0], *names[2:]]))  # emb.weight and norm.weight swapped
    rc = run_cli("convert", str(tmp_path / "x.pt"), str(tmp_path / "bad"), "--from", "torch", "--model-keys", str(keys))
    assert rc.returncode == 2 and "does not fit" in rc.stderr and "shape [37, 13]" in rc.stderr, rc.stderr


def test_optimizer_state_without_a_model_says_it_will_not_resume(tmp_path: Path) -> None:
    model = _Net()
    optim = _trained(model, torch.tensor([1, 2, 3]))
    torch.save({"optimizer": optim.state_dict(), "epoch": 3}, tmp_path / "opt.pt")
    rc = run_cli("convert", str(tmp_path / "opt.pt"), str(tmp_path / "out"), "--from", "torch")
    assert rc.returncode == 0
    assert "'optimizer' stays keyed by parameter index" in rc.stderr and "no model state dict" in rc.stderr
    rc = run_cli("convert", str(tmp_path / "opt.pt"), str(tmp_path / "out"), "--dry-run")
    assert "warning: optimizer state under 'optimizer'" in rc.stdout, rc.stdout
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(n for n, _ in model.named_parameters()))
    rc = run_cli("convert", str(tmp_path / "out"), str(tmp_path / "u2"), "--model-keys", str(keys))
    assert rc.returncode == 2 and "applies to torch.save files" in rc.stderr and "universal" in rc.stderr, rc.stderr
    rc = run_cli("convert", str(tmp_path / "opt.pt"), str(tmp_path / "u3"), "--model-keys", str(keys))
    assert rc.returncode == 0 and "warning" not in rc.stderr, rc.stderr
    with ckpt.open(tmp_path / "u3") as r:
        assert torch.equal(r.read("optimizer/state/fc.bias/exp_avg"), optim.state[model.fc.bias]["exp_avg"])


# ---------------------------------------------------------------------------------------------------------------
# Item 8: --dtype names, argparse.Namespace values


@pytest.mark.parametrize("name,want", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                       ("half", torch.float16), ("float", torch.float32), ("FP16", torch.float16)])
def test_dtype_takes_torch_names(name: str, want: torch.dtype, tmp_path: Path) -> None:
    sd = {"w": torch.randn(5, 3, dtype=torch.float64), "ids": torch.arange(4)}
    torch.save(sd, tmp_path / "m.pt")
    rc = run_cli("convert", str(tmp_path / "m.pt"), str(tmp_path / "st"), "--to", "safetensors", "--dtype", name)
    assert rc.returncode == 0, rc.stderr
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert got["w"].dtype == want and torch.equal(got["w"], sd["w"].to(want)) and torch.equal(got["ids"], sd["ids"])


def test_dtype_refuses_a_name_with_the_list(tmp_path: Path) -> None:
    rc = run_cli("convert", "x", "y", "--dtype", "int8")
    assert rc.returncode == 2 and "'int8'" in rc.stderr and "bfloat16" in rc.stderr and "half" in rc.stderr


def test_namespace_under_allow_pickle_is_stored_as_its_dict(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=0.25, name="run-7", layers=[3, 5], nested=argparse.Namespace(seed=11))
    torch.save({"model": {"w": torch.arange(5.0)}, "args": args}, tmp_path / "t.pt")
    rc = run_cli("convert", str(tmp_path / "t.pt"), str(tmp_path / "refused"))
    assert rc.returncode == 2 and "argparse.Namespace" in rc.stderr and "--allow-pickle" in rc.stderr
    assert "stored as the dict of its attributes" in rc.stderr, rc.stderr
    rc = run_cli("convert", str(tmp_path / "t.pt"), str(tmp_path / "u"), "--allow-pickle")
    assert rc.returncode == 0, rc.stderr
    assert "argparse.Namespace" in rc.stderr and "vars()" in rc.stderr
    with ckpt.open(tmp_path / "u") as r:
        assert r.read("args/lr") == 0.25 and r.read("args/name") == "run-7" and r.read("args/nested/seed") == 11
        assert torch.equal(r.read("model/w"), torch.arange(5.0))
        assert r.state()["args"]["layers"] == [3, 5]
