"""What a new user trips over at the command line and in ``ckpt.load`` (issue #21, items 1 and 8), with the real
producers: a ``ckpt.Checkpointer`` run, a Hugging Face ``save_pretrained`` directory, a DCP ``save``, a
``torch.save`` file, and a save that really crashed.

Item 1: a path that is not one ckpt checkpoint is said to be what it is (a Checkpointer root with its steps, a folder
of checkpoints, a foreign format with the ``ckpt convert`` line that reads it, a single file); deletion is advised
only for a folder that holds nothing but a failed save's data files. Item 8: ``--json`` errors are JSON, a closed
pipe is quiet, a mistyped flag shows the sub-command's usage, ``--version``, keys and values in natural order, the
saved layout in words.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt
from tests.cli_utils import run_cli

pytestmark = pytest.mark.timeout(120)
CKPT = [sys.executable, "-m", "ckpt.cli"]
DELETE = re.compile(r"delet", re.IGNORECASE)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A Checkpointer root as training leaves it: ``latest`` and committed steps 10 and 25, in ``<tmp>/runs/exp``."""
    root = tmp_path_factory.mktemp("runs") / "exp"
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cp = ckpt.Checkpointer(str(root), keep_last=3)
    try:
        for step in range(1, 26):
            opt.zero_grad()
            model(torch.randn(3, 7)).square().sum().backward()
            opt.step()
            if step in (10, 25):
                cp.save(step, {"model": model, "optim": opt})
        cp.wait()
    finally:
        cp.close()
    assert (root / "latest").read_text().strip() == "25"
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=24, n_layer=1, n_head=3, vocab_size=37, n_positions=11, bos_token_id=0,
                                  eos_token_id=0)
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(out))
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    return out


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory) -> Path:
    import torch.distributed.checkpoint as dcp

    out = tmp_path_factory.mktemp("dcp") / "ckpt"
    dcp.save({"model": _model().state_dict()}, checkpoint_id=str(out), no_dist=True)  # one process, no group
    assert (out / ".metadata").exists()
    return out


def _state() -> dict:
    model = _model()
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-2)}


def _not_a_checkpoint(call) -> str:
    """The message of the error ``call()`` raises: a CheckpointError that claims neither a crash nor absence."""
    with pytest.raises(ckpt.CheckpointError) as info:
        call()
    e = info.value
    assert not isinstance(e, (ckpt.IncompleteCheckpointError, ckpt.CheckpointNotFoundError)), repr(e)
    msg = str(e)
    assert "never committed" not in msg and not DELETE.search(msg), msg
    return msg


# -- item 1: say what the directory is --------------------------------------------------------------------------
def test_load_of_a_checkpointer_root_names_its_steps_and_what_to_pass(run_root):
    msg = _not_a_checkpoint(lambda: ckpt.load(_state(), str(run_root)))
    assert "Checkpointer root" in msg and "10, 25" in msg and "latest: 25" in msg, msg
    assert f"ckpt.Checkpointer({str(run_root)!r}).restore(state)" in msg, msg
    advised = re.search(r"e\.g\. (\S+?);", msg).group(1)
    assert advised == str(run_root / "step_000000025"), msg
    assert run_cli("inspect", advised).returncode == 0  # the advice works as given
    assert _not_a_checkpoint(lambda: ckpt.open(str(run_root))) == msg


def test_inspect_and_verify_of_a_checkpointer_root_and_its_parent(run_root):
    for cmd in ("inspect", "verify"):
        out = run_cli(cmd, str(run_root))
        assert out.returncode == 2, (cmd, out)  # a wrong path, not a failed check
        assert "FAILED" not in out.stderr and not DELETE.search(out.stderr), out.stderr
        assert "Checkpointer root" in out.stderr and "step_000000025" in out.stderr, out.stderr
    for argv in (("convert", str(run_root), str(run_root.parent / "out")), ("diff", str(run_root), str(run_root))):
        out = run_cli(*argv)  # --from auto finds no format there: which folders to pass, all the same
        assert out.returncode == 2 and "Checkpointer root" in out.stderr and "10, 25" in out.stderr, (argv, out)
    assert not (run_root.parent / "out").exists()
    parent = run_cli("verify", str(run_root.parent))
    assert parent.returncode == 2 and "FAILED" not in parent.stderr and not DELETE.search(parent.stderr)
    assert f"{run_root}/step_000000010, {run_root}/step_000000025" in parent.stderr, parent.stderr
    assert f"{run_root}: a ckpt.Checkpointer root" in parent.stderr, parent.stderr


def test_hugging_face_directory_points_to_convert_and_the_advice_works(hf_dir, tmp_path):
    msg = _not_a_checkpoint(lambda: ckpt.load(_state(), str(hf_dir)))
    advice = f"ckpt convert {hf_dir} OUT --from safetensors"
    assert "Hugging Face safetensors directory" in msg and advice in msg, msg
    for cmd in ("inspect", "verify"):
        out = run_cli(cmd, str(hf_dir))
        assert out.returncode == 2 and advice in out.stderr and "FAILED" not in out.stderr, out
        assert not DELETE.search(out.stderr), out.stderr
    out_dir = str(tmp_path / "universal")
    assert run_cli(*advice.replace("OUT", out_dir).split()[1:]).returncode == 0
    shown = run_cli("inspect", out_dir)
    assert shown.returncode == 0 and "model/transformer.wte.weight" in shown.stdout, shown


def test_dcp_directory_points_to_convert_from_dcp(dcp_dir, tmp_path):
    msg = _not_a_checkpoint(lambda: ckpt.load(_state(), str(dcp_dir)))
    advice = f"ckpt convert {dcp_dir} OUT --from dcp"
    assert "Distributed Checkpoint" in msg and advice in msg, msg
    out = run_cli("verify", str(dcp_dir), "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["message"] == msg, out
    out_dir = str(tmp_path / "universal")
    assert run_cli(*advice.replace("OUT", out_dir).split()[1:]).returncode == 0
    assert run_cli("verify", out_dir).returncode == 0


def test_load_of_a_torch_save_file_points_to_convert_from_torch(tmp_path):
    ref = tmp_path / "ref.pt"
    torch.save(_model().state_dict(), ref)
    msg = _not_a_checkpoint(lambda: ckpt.load(_state(), str(ref)))
    assert "Not a directory" not in msg and "torch.save file" in msg, msg
    assert f"ckpt convert {ref} OUT --from torch" in msg, msg
    ckpt.save({"w": torch.ones(3)}, tmp_path / "c")
    manifest = run_cli("inspect", str(tmp_path / "c" / "manifest.json"))  # the file, not its checkpoint
    assert manifest.returncode == 2 and f"pass its directory, {tmp_path / 'c'}" in manifest.stderr, manifest


def test_deletion_is_advised_only_for_a_folder_of_a_failed_saves_data_files(tmp_path):
    failed = tmp_path / "failed"
    ckpt.save({"w": torch.randn(61, 37)}, failed)
    (failed / "manifest.json").unlink()  # what a save killed before its commit leaves
    out = run_cli("verify", str(failed))
    assert out.returncode == 1 and "never committed" in out.stderr and "can be deleted" in out.stderr, out
    (failed / "notes.txt").write_text("the user's own notes")
    out = run_cli("verify", str(failed))
    assert out.returncode == 1 and "never committed" in out.stderr, out
    assert "can be deleted" not in out.stderr and "Do not delete the directory" in out.stderr, out.stderr
    with pytest.raises(ckpt.IncompleteCheckpointError, match="Do not delete"):
        ckpt.load({"w": torch.zeros(61, 37)}, str(failed))


# -- item 8: the command line as scripts and shells use it -------------------------------------------------------
def test_inspect_json_into_a_closed_pipe_is_quiet(run_root):
    p = subprocess.Popen([*CKPT, "inspect", "--json", str(run_root / "step_000000025")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # `| head` that has already exited: every write fails with EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_json_errors_are_a_json_document_on_stdout(run_root):
    out = run_cli("inspect", str(run_root), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 2 and doc["ok"] is False and doc["exit_code"] == 2, out
    assert doc["error"]["type"] == "UnknownFormatError" and "Checkpointer root" in doc["error"]["message"], doc
    assert "Checkpointer root" in out.stderr  # people still read it on stderr
    missing = run_cli("verify", str(run_root / "nope"), "--json")
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"]["type"] == "CheckpointNotFoundError"
    usage = run_cli("inspect", str(run_root), "--json", "--jsn")
    doc = json.loads(usage.stdout)
    assert usage.returncode == 2 and doc["error"]["type"] == "UsageError" and "--jsn" in doc["error"]["message"]
    assert doc["command"] == "inspect", doc


def test_a_mistyped_flag_shows_the_subcommands_usage(run_root):
    out = run_cli("inspect", str(run_root), "--jsno")
    assert out.returncode == 2 and out.stderr.startswith("usage: ckpt inspect "), out.stderr
    assert "ckpt inspect: error: unrecognized arguments: --jsno" in out.stderr, out.stderr
    out = run_cli("convert", "a", "b", "--frm", "dcp")
    assert out.returncode == 2 and out.stderr.startswith("usage: ckpt convert "), out.stderr
    out = run_cli("spec", "check", "gpt", "--agianst", "x")
    assert out.returncode == 2 and out.stderr.startswith("usage: ckpt spec check "), out.stderr


def test_version_names_the_package_and_torch():
    from importlib.metadata import version

    out = subprocess.run([*CKPT, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert out.stdout.startswith(f"ckpt {version('ckpt')} (torch {torch.__version__}, python "), out.stdout


def test_inspect_lists_keys_and_values_in_natural_order(tmp_path):
    state = {"model": {f"layers.{i}.weight": torch.full((3, i + 1), float(i)) for i in (10, 2, 1, 0)},
             "params": [f"p{i}" for i in range(12)]}
    ckpt.save(state, tmp_path / "c")
    out = run_cli("inspect", str(tmp_path / "c"))
    assert out.returncode == 0, out
    keys = re.findall(r"^(model/\S+)", out.stdout, re.MULTILINE)
    assert keys == [f"model/layers.{i}.weight" for i in (0, 1, 2, 10)], out.stdout
    values = re.findall(r"^  (params/\d+) =", out.stdout, re.MULTILINE)
    assert values == [f"params/{i}" for i in range(12)], out.stdout
    doc = json.loads(run_cli("inspect", str(tmp_path / "c"), "--json").stdout)
    assert list(doc["values"]) == [f"params/{i}" for i in range(12)]
    assert [t["key"] for t in doc["tensors"]] == keys


def test_inspect_says_the_saved_layout_in_words(run_root):
    out = run_cli("inspect", str(run_root / "step_000000025"))
    assert out.returncode == 0 and "{'" not in out.stdout and "dtensor_mesh_shapes" not in out.stdout, out.stdout
    assert re.search(r"^layout +saved by 1 rank; no DTensor mesh", out.stdout, re.MULTILINE), out.stdout
    from ckpt.cli import layout_text

    want = "saved by 4 ranks; DTensor mesh [2, 2]"
    assert layout_text(4, {"world_size": 4, "dtensor_mesh_shapes": ["[2, 2]"]}) == want


def test_inspect_of_a_spec_saved_checkpoint_says_layout_and_dims_in_words(tmp_path):
    import megatron_ref as M
    from tests.test_reshard import logical_state, spec_dims

    mc = M.gpt_tiny()
    ckpt.save(M.to_local(logical_state(mc), mc, M.ParallelConfig(), 0), str(tmp_path / "c"), spec="gpt",
              dims=spec_dims(mc), layout="tp=1")
    out = run_cli("inspect", str(tmp_path / "c"))
    assert out.returncode == 0 and "{'" not in out.stdout, out.stdout
    assert re.search(r"^layout +saved by 1 rank; rank-local tensors cut as the spec below says$", out.stdout,
                     re.MULTILINE), out.stdout
    assert re.search(rf"^spec .*; dims hidden={mc.hidden}, heads=", out.stdout, re.MULTILINE), out.stdout


def test_an_option_value_that_does_not_parse_is_a_usage_error(run_root, tmp_path):
    step = str(run_root / "step_000000025")
    out = run_cli("reshard", step, str(tmp_path / "o"), "--to", "tp=2", "--spec", "gpt", "--dims", "{hidden", "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 2 and doc["error"]["type"] == "UsageError" and "--dims" in doc["error"]["message"], out
    assert "ckpt reshard: error: --dims must be a JSON object" in out.stderr, out.stderr
    out = run_cli("inspect", step, "--storage-options", "[1]")
    assert out.returncode == 2 and "--storage-options must be a JSON object, got list" in out.stderr, out
    assert not (tmp_path / "o").exists()


def test_a_checkpointer_root_on_an_object_store_url_is_named_too():
    url = "memory://friction-cli/exp"
    model = _model()
    cp = ckpt.Checkpointer(url, keep_last=3)
    try:
        for step in (3, 12):
            cp.save(step, {"model": model})
        cp.wait()
    finally:
        cp.close()
    msg = _not_a_checkpoint(lambda: ckpt.load({"model": _model()}, url))
    assert "Checkpointer root" in msg and "3, 12 (latest: 12)" in msg and f"{url}/step_000000012" in msg, msg
    out = run_cli("verify", url, "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["message"] == msg, out
