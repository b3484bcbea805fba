"""Saves never write or delete through a link inside the checkpoint (#22 item 1).

Before the fix, ``ckpt.save`` into a checkpoint whose ``data`` was a link wrote its data file through the link,
then its clean-up of unlisted files deleted everything else in the linked folder, and committed a checkpoint that
could not be loaded. Each case here plants a link somewhere inside the checkpoint, points it at a folder of files
that are not the checkpoint's, and checks that the save (or flush, or retention) is refused with
``UnsafeCheckpointError`` naming the link, and that the link's target is byte for byte and file for file as it
was. Where a committed checkpoint was there before, it still loads bit-exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.tiers import step_dir
from formats.commit import is_data_file_name

pytestmark = pytest.mark.timeout(60)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and mtime (so a rewrite with equal bytes is still seen)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder outside any checkpoint holding files a careless clean-up would delete, one named like ours."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "notes.txt").write_text("keep me\n")
    (v / "1700000000-0123456789ab-r00000-0.bin").write_bytes(b"looks like a data file")
    (v / "sub").mkdir()
    (v / "sub" / "deep.bin").write_bytes(os.urandom(64))
    return v


def test_save_through_a_linked_data_folder_is_refused_and_touches_nothing(tmp_path: Path, victim: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "data").symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    with pytest.raises(ckpt.UnsafeCheckpointError) as ei:
        ckpt.save({"x": torch.ones(4)}, str(ck))
    msg = str(ei.value)
    assert str(ck / "data") in msg and "symbolic link" in msg and "Remove the link" in msg
    assert _snapshot(victim) == before
    assert not (ck / "manifest.json").exists(), "nothing may be committed"


def test_overwrite_after_data_was_replaced_by_a_link_keeps_the_victim(tmp_path: Path, victim: Path) -> None:
    """A committed checkpoint whose ``data`` a user then swapped for a link: the overwrite is refused."""
    ck = tmp_path / "ck"
    ckpt.save({"x": torch.arange(6.0)}, str(ck))
    for f in (ck / "data").iterdir():
        os.replace(f, victim / f.name)  # the user moved the data elsewhere and linked it back
    (ck / "data").rmdir()
    (ck / "data").symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    with pytest.raises(ckpt.UnsafeCheckpointError):
        ckpt.save({"x": torch.zeros(6)}, str(ck), overwrite=True)
    assert _snapshot(victim) == before


def test_a_linked_stale_data_file_is_refused_before_the_commit(tmp_path: Path, victim: Path) -> None:
    """A stale data file that is a link: the clean-up would only unlink the link, but it is not a file this
    format wrote, so the save is refused before its manifest is committed and the old checkpoint stays."""
    ck = tmp_path / "ck"
    old = {"x": torch.arange(10, dtype=torch.int32), "step": 3}
    ckpt.save(old, str(ck))
    target = victim / "1700000000-0123456789ab-r00000-0.bin"
    (ck / "data" / "1700000001-ffffffffffff-r00000-0.bin").symlink_to(target)
    before, manifest_before = _snapshot(victim), (ck / "manifest.json").read_bytes()
    with pytest.raises(ckpt.UnsafeCheckpointError) as ei:
        ckpt.save({"x": torch.zeros(10, dtype=torch.int32), "step": 4}, str(ck), overwrite=True)
    assert "1700000001-ffffffffffff-r00000-0.bin" in str(ei.value)
    assert _snapshot(victim) == before
    assert (ck / "manifest.json").read_bytes() == manifest_before
    got = {"x": torch.empty(10, dtype=torch.int32), "step": 0}
    ckpt.load(got, str(ck))
    assert torch.equal(got["x"], old["x"]) and got["step"] == 3


def test_clean_up_removes_only_files_this_format_wrote(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckpt.save({"x": torch.ones(3)}, str(ck))
    first = sorted(p.name for p in (ck / "data").iterdir())
    assert first and all(is_data_file_name(f"data/{n}") for n in first)
    (ck / "data" / "README.txt").write_text("a user's note\n")
    (ck / "data" / "sub").mkdir()
    (ck / "data" / "sub" / "1700000000-0123456789ab-r00000-0.bin").write_bytes(b"not directly in data/")
    ckpt.save({"x": torch.zeros(3)}, str(ck), overwrite=True)
    left = sorted(p.name for p in (ck / "data").iterdir())
    assert "README.txt" in left and "sub" in left
    assert not set(first) & set(left), "the earlier save's data files are cleaned up"
    got = {"x": torch.empty(3)}
    ckpt.load(got, str(ck))
    assert torch.equal(got["x"], torch.zeros(3))


@pytest.mark.parametrize("name, expected", [
    ("data/1796623870-1b714e72960e-r00000-0.bin", True),
    ("data/1796623870-1b714e72960e-r00123-17.bin", True),
    ("data/notes.txt", False),
    ("data/sub/1796623870-1b714e72960e-r00000-0.bin", False),
    ("data/1796623870-1b714e72960e-r00000-0.bin.tmp", False),
    ("manifest.json", False),
])
def test_data_file_names(name: str, expected: bool) -> None:
    assert is_data_file_name(name) is expected


def test_checkpointer_refuses_a_linked_step_folder(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / step_dir(2)).symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    cp = ckpt.Checkpointer(str(root), disk_every=1)
    try:
        cp.save(1, {"x": torch.ones(5)})
        cp.wait()
        cp.save(2, {"x": torch.full((5,), 2.0)})
        with pytest.raises(ckpt.TierError) as ei:
            cp.wait()
        assert step_dir(2) in str(ei.value) and "symbolic link" in str(ei.value)
    finally:
        try:
            cp.close()
        except ckpt.CheckpointError:
            pass
    assert _snapshot(victim) == before
    assert (root / step_dir(1) / "manifest.json").exists()


def test_retention_never_deletes_through_a_linked_step_folder(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / step_dir(0)).symlink_to(victim, target_is_directory=True)  # looks like the oldest step
    before = _snapshot(victim)
    with ckpt.Checkpointer(str(root), disk_every=1, keep_last=1) as cp:
        for step in (1, 2, 3):
            cp.save(step, {"x": torch.full((4,), float(step))})
            cp.wait()
    assert _snapshot(victim) == before
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and not p.is_symlink()) == [step_dir(3)]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("which", ["manifest", "data"])
def test_a_fifo_in_a_checkpoint_is_refused_without_blocking(tmp_path: Path, which: str) -> None:
    """A FIFO in place of ``manifest.json`` blocked ``ckpt.open`` forever (#22 item 3): open only regular files."""
    ck = tmp_path / "ck"
    ckpt.save({"x": torch.ones(3)}, str(ck))
    path = ck / "manifest.json" if which == "manifest" else next((ck / "data").iterdir())
    path.unlink()
    os.mkfifo(path)
    for attempt in (lambda: ckpt.open(str(ck)).read("x"), lambda: ckpt.load({"x": torch.empty(3)}, str(ck))):
        with pytest.raises(ckpt.CorruptCheckpointError, match="is a FIFO, expected a regular file") as ei:
            attempt()
        assert str(path) in str(ei.value)
