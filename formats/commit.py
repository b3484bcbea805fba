"""The last steps of the universal format's one write pipeline: the save id, the manifest, the commit.

plan (pure; ``resharding.planner``, ``formats.foreign.universal.plan_files``) -> items (``formats.writer.WriteItem``)
-> execute (``formats.writer.write_items`` / ``write_groups``, on every rank) -> commit (here, once, by the
coordinator after every rank succeeded). ``ckpt.save``, the Checkpointer's tiers, ``ckpt reshard`` and the Megatron
import, and ``ckpt convert --to universal`` all end here, so a checkpoint is committed and cleaned up by one rule
whoever wrote it:

* ``new_save_id()`` names a save's data files (``data/<save id>-r<rank>-<i>.bin``), unique across saves.
* ``build_manifest(...)`` turns the ranks' write results and the tensors' metadata into the ``Manifest``,
  checking that the chunks written tile every tensor.
* ``commit(storage, manifest)`` writes it (the commit: tmp + fsync + rename, or the object written last), then
  deletes every data file the new manifest does not list: the checkpoint it replaced (``overwrite``) and any save
  that crashed before committing there. Before the commit nothing is deleted, so a committed checkpoint stays
  loadable until its replacement is committed.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ckpt.errors import CorruptCheckpointError
from formats.manifest import (DATA_DIR, MANIFEST_NAME, ChunkEntry, ContainerEntry, Manifest, TensorEntry, ValueEntry,
                              files_and_chunks)
from formats.storage.base import Storage

#: What one rank's executor returns: ({data file: size in bytes}, [(key, chunk entry)]).
RankResult = tuple[dict[str, int], list[tuple[str, ChunkEntry]]]


def new_save_id() -> str:
    """A save's id: its creation second and 48 random bits, so two saves never share a data file name."""
    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


def writer_info(tool: str) -> dict[str, str]:
    """The manifest's informational ``writer`` record: the library and its version, torch's, and which tool wrote
    it (``ckpt.save``, ``ckpt.Checkpointer``, ``ckpt reshard``, ``ckpt convert``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ckpt")
    except PackageNotFoundError:
        ours = "unknown"
    return {"library": "ckpt", "version": ours, "torch": torch.__version__, "tool": tool}


@dataclass(frozen=True)
class TensorMeta:
    """What the manifest records of one logical tensor besides its chunks: dtype name, global shape and, for a
    DTensor, its placements (``description``)."""

    dtype: str
    shape: tuple[int, ...]
    description: dict[str, Any] | None = None


def build_manifest(*, save_id: str, results: list[RankResult], tensors: Mapping[str, TensorMeta],
                   values: Mapping[str, Any], containers: Mapping[str, ContainerEntry], layout: dict[str, Any],
                   tool: str, metadata: Mapping[str, Any] | None = None, where: str = "",
                   tied: Mapping[str, str] | None = None) -> Manifest:
    """The manifest of a save whose ranks returned ``results`` (rank = position). ``values`` are plain JSON values.
    ``tied`` (key -> key) lists tensors stored once: a key with no chunks of its own gets the chunks of the key it
    is tied to (the same bytes, listed under both keys; every reader handles that as two entries).

    Raises ``CorruptCheckpointError`` (naming ``where`` and the key) when the chunks written do not cover a tensor
    exactly: a planner bug must never commit."""
    files, chunks = files_and_chunks(results)
    for key, first in (tied or {}).items():
        if key not in chunks and first in chunks and key in tensors and first in tensors \
                and tuple(tensors[key].shape) == tuple(tensors[first].shape) and tensors[key].dtype == tensors[first].dtype:
            chunks[key] = list(chunks[first])
    entries = {k: TensorEntry(k, m.dtype, tuple(m.shape), tuple(sorted(chunks.get(k, []), key=lambda c: c.offsets)),
                              m.description)
               for k, m in tensors.items()}
    for k, t in entries.items():
        covered = sum(c.numel for c in t.chunks)
        if covered != t.numel:
            raise CorruptCheckpointError(f"{where}: key {k!r}: the chunks written cover {covered} of {t.numel} "
                                         "elements; nothing was committed")
    stray = sorted(set(chunks) - set(tensors))
    if stray:
        raise CorruptCheckpointError(f"{where}: chunks were written for keys the plan has no metadata of: "
                                     f"{stray[:5]}; nothing was committed")
    return Manifest(save_id=save_id, world_size=len(results), files=files, tensors=entries,
                    values={k: v if isinstance(v, ValueEntry) else ValueEntry(k, v) for k, v in values.items()},
                    containers=dict(containers), writer=writer_info(tool), created_unix_secs=time.time(), layout=layout,
                    metadata=dict(metadata or {}))


#: The data files a save writes (``write_items``): ``data/<save_id>-r<rank>-<i>.bin``, directly in ``data/``.
DATA_FILE_RE = re.compile(rf"{DATA_DIR}/[0-9]+-[0-9a-f]+-r[0-9]+-[0-9]+\.bin")


def is_data_file_name(path: str) -> bool:
    """Whether ``path`` is named as this format names the data files it writes (what a clean-up may remove)."""
    return DATA_FILE_RE.fullmatch(path) is not None


def commit(storage: Storage, manifest: Manifest) -> None:
    """Write ``manifest`` (the commit), then delete the data files of earlier saves it does not list. Coordinator
    only, once every rank's data files are written.

    The clean-up removes only files named as this format names its data files (``DATA_FILE_RE``); anything else a
    user put in ``data/`` stays. The storage refuses writes and deletes through links (``LocalStorage.write_path``),
    so neither can reach outside the checkpoint."""
    stale = sorted(p for p in storage.list(DATA_DIR) if p not in manifest.files and is_data_file_name(p))
    for p in stale:  # a link among them is refused before the commit, so a save never commits and then fails
        storage.check_write_path(p)
    storage.commit(MANIFEST_NAME, manifest.to_json())
    if stale:
        storage.delete(stale)
