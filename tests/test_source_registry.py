"""The source registry (``formats.foreign.registry``): a registered format is read by ``open_source``,
``ckpt convert`` and ``ckpt diff`` with no special case anywhere, its options are checked against its declaration,
and ``formats`` knows Megatron only once ``resharding.megatron_dirs`` registered it.

The ``toy`` format here is a unit-test imitation (a JSON file of nested lists); real producers are in
``tests/test_convert*.py``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckpt
from ckpt.errors import CheckpointError, UnknownFormatError
from formats.foreign import detect_format, open_source
from formats.foreign.registry import (SourceOption, SourceOptionError, find_source, register_source, source_names,
                                      unregister_source)
from formats.foreign.source import Source, TensorInfo, add_parents
from tests.cli_utils import run_cli

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


class ToySource(Source):
    """``{"name": nested list}`` in a ``.toy`` JSON file: tensors ``model/<name>`` (float32), times ``scale``."""

    def __init__(self, path: str, scale: float) -> None:
        super().__init__(path=path, format="toy")
        with open(path) as f:
            self._data = {f"model/{k}": torch.tensor(v, dtype=torch.float32) * scale for k, v in json.load(f).items()}
        for k, t in self._data.items():
            self.tensors[k] = TensorInfo.whole(k, t.dtype, tuple(t.shape))
            add_parents(k, self.containers)

    def read(self, key: str) -> torch.Tensor:
        return self._data[key]


def _open_toy(path: str, *, dims: dict[str, Any] | None = None, target: str | None = None) -> Source:
    return ToySource(path, float((dims or {}).get("scale", 1.0)))


@pytest.fixture()
def toy(tmp_path: Path) -> Iterator[Path]:
    register_source("toy", _open_toy, description="toy files", detect=lambda p: p.endswith(".toy"),
                    options=(SourceOption("dims", from_text=json.loads),
                             SourceOption("target", targets=("universal",))))
    path = tmp_path / "w.toy"
    path.write_text(json.dumps({"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5]}))
    try:
        yield path
    finally:
        unregister_source("toy")


def _cli(*args: str) -> tuple[int, str, str]:
    r = run_cli(*args)
    return r.returncode, r.stdout, r.stderr


def test_a_registered_format_is_opened_and_detected(toy: Path) -> None:
    assert "toy" in source_names() and source_names()[:5] == ("universal", "dcp", "torch", "safetensors", "deepspeed")
    with open_source(str(toy), "toy") as src:
        assert torch.equal(src.read("model/w"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with open_source(str(toy), "toy", dims={"scale": 2}) as src:  # its own option reaches its opener
        assert torch.equal(src.read("model/b"), torch.tensor([1.0]))
    assert detect_format(str(toy)) == "toy"  # its detect hook, asked where no built-in rule applies
    with open_source(str(toy)) as src:
        assert src.format == "toy"
    with pytest.raises(ValueError, match="already registered"):
        register_source("toy", _open_toy, description="again")


def test_options_are_checked_against_the_declaration(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceOptionError, match=r"--bogus.*the source is toy") as e:
        open_source(str(toy), "toy", bogus=1)
    assert isinstance(e.value, CheckpointError)
    pt = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, pt)
    with pytest.raises(SourceOptionError, match=r"--dims applies to .*toy files \(--from toy\) only; the source is "
                                                r"torch"):
        open_source(str(pt), "torch", dims={"scale": 2})
    with pytest.raises(SourceOptionError, match="--target writes a universal checkpoint; it cannot be combined with "
                                                "--to torch"):
        find_source("toy").check_target({"target": "x"}, "torch")  # type: ignore[union-attr]
    register_source("needy", _open_toy, description="needy files",
                    options=(SourceOption("dims", required="needy files need --dims '{\"scale\": N}'"),))
    try:
        with pytest.raises(SourceOptionError, match=r"w\.toy: needy files need --dims"):
            open_source(str(toy), "needy")
    finally:
        unregister_source("needy")


def test_convert_and_diff_accept_a_registered_format(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    rc, stdout, err = _cli("convert", str(toy), str(out), "--from", "toy", "--no-progress")
    assert rc == 0, err
    assert stdout.startswith(f"OK: toy {toy} -> universal {out}: 2 tensors")
    with ckpt.open(str(out)) as r:
        assert torch.equal(r.read("model/w"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # Detected, with its option parsed by its own from_text.
    rc, stdout, err = _cli("convert", str(toy), str(tmp_path / "u2"), "--dims", '{"scale": 3}', "--json")
    assert rc == 0, err
    assert json.loads(stdout)["src_format"] == "toy"
    assert _cli("diff", str(toy), str(out), "--a-format", "toy", "--no-progress")[0] == 0
    rc, stdout, _ = _cli("diff", str(toy), str(tmp_path / "u2"), "--dims", '{"scale": 3}')  # both sides take it?
    assert rc == 0, stdout  # only the toy side does; the universal side reads as it is
    assert _cli("diff", str(toy), str(tmp_path / "u2"))[0] == 1
    # An option that restricts the target, and one the source does not take: exit 2, named.
    rc, _, err = _cli("convert", str(toy), str(tmp_path / "x.pt"), "--target", "tp=2", "--to", "torch")
    assert rc == 2 and "--target writes a universal checkpoint" in err
    rc, _, err = _cli("convert", str(toy), str(tmp_path / "x"), "--spec", "gpt")
    assert rc == 2 and "--spec applies to Megatron rank directories (--from megatron) only; the source is toy" in err
    unregister_source("toy")
    rc, _, err = _cli("convert", str(toy), str(tmp_path / "x"), "--from", "toy")
    assert rc == 2 and "invalid choice: 'toy'" in err


def test_megatron_registers_from_resharding(tmp_path: Path) -> None:
    import resharding.megatron_dirs  # noqa: F401 - registers "megatron"

    entry = find_source("megatron")
    assert entry is not None and [o.name for o in entry.options] == [
        "allow_pickle", "spec", "dims", "source_layout", "target"]
    (tmp_path / "mp_rank_00").mkdir()
    assert detect_format(str(tmp_path)) == "megatron"
    with pytest.raises(SourceOptionError, match=r"read through a spec.*--spec gpt\|llama\|mixtral"):
        open_source(str(tmp_path))
    rc, _, err = _cli("diff", str(tmp_path), str(tmp_path))
    assert rc == 2 and "--spec" in err
    rc, _, err = _cli("convert", str(tmp_path), str(tmp_path / "u"), "--spec", "gpt", "--dims", "[1]")
    assert rc == 2 and "--dims must be a JSON object" in err


def test_formats_knows_megatron_only_by_name() -> None:
    """``formats`` imports nothing of ``resharding`` (statically, and at run time): it recognises rank directories
    and says what to do, and reads them only once ``resharding.megatron_dirs`` registered the format."""
    for path in sorted((ROOT / "formats").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "resharding" for n in names), f"{path}:{node.lineno}"
    code = """
import sys, tempfile, os
from formats.foreign import detect_format, open_source
from formats.foreign.registry import source_names
from ckpt.errors import UnknownFormatError
d = tempfile.mkdtemp(); os.mkdir(os.path.join(d, "mp_rank_00"))
assert detect_format(d) == "megatron", detect_format(d)
assert "megatron" not in source_names()
try:
    open_source(d)
except UnknownFormatError as e:
    assert "--spec" in str(e) and "resharding.megatron_dirs" in str(e), e
else:
    raise AssertionError("opened")
bad = sorted(m for m in sys.modules if m.split(".")[0] == "resharding")
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr


def test_unknown_format_names_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match=r"unknown format 'nope'; expected auto or one of universal, dcp"):
        open_source(str(tmp_path), "nope")
