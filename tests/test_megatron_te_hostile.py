"""Hostile and crashing cases of the Megatron TE import and the export to rank directories (issue #20).

A rank file whose ``_extra_state`` holds an arbitrary pickled object, a truncated rank file, an export SIGKILLed
between two ranks' files, and the temporary directory such a crash leaves: each raises a named
``ckpt.CheckpointError`` (the path in the message) or leaves the previous save as it was.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from resharding.megatron_dirs import MegatronSource
from resharding.megatron_export import export_megatron
from resharding.megatron_import import import_megatron
from tests.megatron_te_producer import make_llama, rank_states, write_megatron

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as a call of ``os.getpid``: any class other than the stand-ins must be refused before it runs."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.fixture(scope="module")
def llama():
    return make_llama(vocab=301, hidden=28, heads=4, kv_heads=2, head_dim=7, ffn=32, layers=2)


@pytest.fixture
def states(llama):
    """Fresh rank states at tp=2 (tests edit them)."""
    return rank_states(*llama, 2, 1)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_old_te_bytesio_extra_state_reads_as_inert(states, tmp_path):
    """Older Transformer Engine wrote ``_extra_state`` as an ``io.BytesIO``: a stand-in, and the import works."""
    for payload in states.values():
        for k in [k for k in payload["model"] if k.endswith("_extra_state")]:
            payload["model"][k] = io.BytesIO(b"fp8 scaling history")
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama")
    assert (tmp_path / "uni" / "manifest.json").is_file()


@pytest.mark.parametrize("spec", ["llama-te", "auto"])
def test_pickled_object_in_extra_state_is_refused(states, tmp_path, spec):
    key = next(k for k in states[(1, 0)]["model"] if k.endswith("_extra_state"))
    states[(1, 0)]["model"][key] = Payload()
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    with pytest.raises(UnsafeCheckpointError) as e:
        MegatronSource(str(tmp_path / "src"), spec)
    assert "mp_rank_01" in str(e.value) and "getpid" in str(e.value)


def test_truncated_rank_file_is_named(states, tmp_path):
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    f = tmp_path / "src" / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for spec in ("llama-te", "auto"):
        with pytest.raises(CheckpointError) as e:
            import_megatron(str(tmp_path / "src"), str(tmp_path / f"uni-{spec}"), spec)
        assert "mp_rank_01/model_optim_rng.pt" in str(e.value)
        assert not (tmp_path / f"uni-{spec}" / "manifest.json").exists()


_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from resharding.megatron_export import export_megatron
done = []
def progress(n):
    done.append(n)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
export_megatron({uni!r}, {dst!r}, target="tp=4,pp=1", iteration=10, progress=progress)
"""


def test_sigkilled_export_leaves_the_previous_save_intact(states, tmp_path):
    """SIGKILL after the second of four ranks' files: the earlier iteration, the tracker and no iter_0000010 are
    what a reader sees; a later export of that iteration succeeds and the hidden leftover confuses nothing."""
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama-te")
    dst = tmp_path / "dst"
    export_megatron(str(tmp_path / "uni"), str(dst), target="tp=2,pp=1", iteration=5)
    before = _tree(dst)
    code = _KILLER.format(root=str(ROOT), uni=str(tmp_path / "uni"), dst=str(dst))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    after = {k: v for k, v in _tree(dst).items() if not k.startswith(".")}
    assert after == before  # iter_0000005 and the tracker ("5") untouched; no iter_0000010
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert any(p.name.startswith(".iter_0000010.tmp-") for p in dst.iterdir())  # the crash was mid-write
    MegatronSource(str(dst), "llama").close()  # the save root still reads (iteration 5)
    export_megatron(str(tmp_path / "uni"), str(dst), target="tp=4,pp=1", iteration=10)
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "10"
    src = MegatronSource(str(dst), "llama")
    try:
        assert src.binding.parallel["tp"] == 4 and src.binding.spec.name == "llama-te"
        ref = MegatronSource(str(tmp_path / "src"), "llama-te")
        try:
            for key in ref.tensors:
                assert torch.equal(src.read(key), ref.read(key)), key
        finally:
            ref.close()
    finally:
        src.close()


def test_spec_check_against_a_truncated_rank_file_names_it(states, tmp_path):
    from tests.cli_utils import run_cli

    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    f = tmp_path / "src" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[:1000])
    for spec in ("auto", "llama-te"):
        r = run_cli("spec", "check", spec, "--against", str(tmp_path / "src"))
        assert r.returncode == 2 and "mp_rank_00/model_optim_rng.pt" in r.stderr, (r.returncode, r.stderr)


def test_export_of_a_corrupt_universal_checkpoint_installs_nothing(states, tmp_path):
    """A flipped byte in the universal source fails the export with a CorruptCheckpointError naming the file, and
    leaves the destination's earlier iteration current."""
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama-te")
    dst = tmp_path / "dst"
    export_megatron(str(tmp_path / "uni"), str(dst), target="tp=1,pp=1", iteration=5)
    before = _tree(dst)
    data = max((p for p in (tmp_path / "uni").rglob("*") if p.is_file() and p.name != "manifest.json"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError) as e:
        export_megatron(str(tmp_path / "uni"), str(dst), target="tp=2,pp=1", iteration=10)
    assert data.name in str(e.value)
    assert _tree(dst) == before  # no iter_0000010, no leftover temporary directory, tracker "5"


def test_uneven_target_is_written_with_warnings_and_reads_back(states, tmp_path):
    """tp=3 splits 4 heads, 2 KV groups and ffn 32 unevenly: Megatron-Core would refuse to build that model, so the
    export warns per broken rule, but the files hold the spec's uneven cut and import back bit for bit."""
    write_megatron(tmp_path / "src", states, tp=2, pp=1)
    import_megatron(str(tmp_path / "src"), str(tmp_path / "uni"), "llama-te")
    res = export_megatron(str(tmp_path / "uni"), str(tmp_path / "tp3"), target="tp=3,pp=1")
    assert {w.split(" ")[0] for w in res.warnings} == {"heads", "kv_heads", "ffn"}, res.warnings
    back = MegatronSource(str(tmp_path / "tp3"), "llama")
    ref = MegatronSource(str(tmp_path / "src"), "llama-te")
    try:
        assert back.binding.parallel["tp"] == 3 and set(back.tensors) == set(ref.tensors)
        for key in ref.tensors:
            assert torch.equal(back.read(key), ref.read(key)), key
    finally:
        back.close()
        ref.close()
