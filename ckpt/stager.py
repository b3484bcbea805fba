"""The Checkpointer's stager: copies a snapshot into a pool slot, and serves the memory tier from it.

``Stager.stage`` takes a slot from the ``HostBufferPool``, copies what may change before the next update (eager)
at once and hands the rest (parameters, optimizer state) to the background ``Copier``; an optimizer pre-step hook
(``install_hooks``) holds the next update until those lazy copies are done. The result is a ``StagedSnapshot``:
the unit every tier flushes (``items()``, ``manifest()``, ``save_id``), see docs/design.md "Tiers".
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ckpt import snapshot_layout
from ckpt.pool import HostBufferPool, Slot
from ckpt.saving import ManifestPlan
from ckpt.snapshot_handle import SnapshotMetrics
from ckpt.snapshot_layout import SnapshotLayout, SourceViews
from ckpt.staging import Copier, StagingHandle, copy_all
from ckpt.state import FlatState, assign, flatten, resolve
from formats.writer import ChunkWrite
from resharding.layout import tensor_layout


@dataclass
class StagedSnapshot:
    """One snapshot in its slot: where every tensor sits (``layout``), the non-tensor values, and the copier's
    progress. Tiers flush it with ``items()`` and ``manifest()`` and commit it as ``save_id``."""

    step: int
    slot: Slot
    layout: SnapshotLayout
    values: dict[str, Any]
    containers: dict[str, Any]
    #: Region position -> index of its lazy copy in ``staging`` (absent: copied before ``save`` returned).
    lazy_index: dict[int, int] = field(default_factory=dict)
    staging: StagingHandle | None = None
    #: The manifest's informational metadata (the Checkpointer's ``model_config``: ``formats.manifest.config_metadata``).
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def save_id(self) -> str:
        return f"{self.layout.plan.save_id}-s{self.step}"

    @property
    def buffer(self) -> torch.Tensor:
        """The host segment the snapshot's bytes live in (every item is a view of it)."""
        return self.slot.buffer

    def items(self) -> list[ChunkWrite]:
        """This rank's write items: every assigned box as a view of the slot. A lazily copied region streams out
        as soon as the copier has staged it (``until``); an eagerly copied one is final already."""
        lay = self.layout
        regions = {(r.key, lay.piece_box(r)): (i, r) for i, r in enumerate(lay.regions)}
        items = []
        for a in lay.plan.assignments:
            i, r = regions[(a.key, a.source)]
            view = snapshot_layout.slot_view(self.slot, r)[a.box.relative_to(a.source).slices()]
            until = self._until(self.lazy_index[i]) if i in self.lazy_index else None
            items.append(ChunkWrite(a.key, a.box.offsets, a.box.sizes, view, until))
        return items

    def _until(self, n: int) -> Callable[[], None]:
        staging = self.staging
        assert staging is not None, "a snapshot with lazy regions was submitted to the copier"
        return lambda: staging.wait_copied(n)

    def manifest(self) -> ManifestPlan | None:
        """The coordinator's manifest plan with this snapshot's values (None on other ranks)."""
        m = self.layout.plan.manifest
        if m is None:
            return None
        m = m.with_state(self.values, self.containers)
        return replace(m, metadata=dict(self.metadata)) if self.metadata else m


class Stager:
    """Copies snapshots into ``pool`` slots: eagerly on the calling thread, lazily on ``copier``'s."""

    def __init__(self, pool: HostBufferPool, copier: Copier) -> None:
        self.pool = pool
        self.copier = copier
        self.current: StagingHandle | None = None
        self.current_metrics: SnapshotMetrics | None = None
        #: Recorded in every snapshot's manifest (``StagedSnapshot.metadata``).
        self.metadata: dict[str, Any] = {}
        self._hooks: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()

    # -- the DataStates-LLM wait -------------------------------------------------------------------------------
    def install_hooks(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for o in optimizers:  # keyed weakly by the optimizer itself: a recycled id() must not skip a hook
            if o not in self._hooks:
                self._hooks[o] = o.register_step_pre_hook(self._pre_step_hook)

    def _pre_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Runs before every ``optimizer.step()``: the wait for this snapshot's lazy copies."""
        self.wait()

    def wait(self) -> float:
        """Block until the last snapshot's lazy copies finished; return the seconds blocked."""
        h = self.current
        if h is None or h.done():
            return 0.0
        blocked = h.wait()
        if self.current_metrics is not None and self.current_metrics.step == h.step:
            self.current_metrics.lazy_wait_secs += blocked
        return blocked

    # -- staging -----------------------------------------------------------------------------------------------
    def stage(self, step: int, flat: FlatState, sources: dict[str, SourceViews], lay: SnapshotLayout,
              tiers: set[str], m: SnapshotMetrics,
              on_staged: Callable[[StagedSnapshot, StagingHandle], None], cuda: bool) -> StagedSnapshot:
        """Copy ``flat`` into a free slot (waiting for one: back-pressure), the lazy part in the background;
        ``on_staged`` runs on the copier thread once every copy is done. ``tiers`` will flush from the slot."""
        slot, m.backpressure_wait_secs = self.pool.acquire(lay.total_bytes, tiers, step=step)
        snap = StagedSnapshot(step, slot, lay, dict(flat.values), dict(flat.containers), metadata=self.metadata)
        eager, lazy = [], []
        for i, (r, dst) in enumerate(zip(lay.regions, snapshot_layout.slot_views(slot, lay))):
            src = sources[r.key]
            if src.lazy:
                snap.lazy_index[i] = len(lazy)
                lazy.append((src.views[r.piece_index], dst))
                m.lazy_bytes += r.nbytes
            else:
                eager.append((src.views[r.piece_index], dst))
        te = time.perf_counter()
        if not slot.reserved and eager:  # only what the training thread writes now; the copier reserves the rest
            base = slot.buffer.data_ptr()
            self.pool.reserve(slot, [(d.data_ptr() - base, d.numel() * d.element_size()) for _, d in eager])
        copy_all(eager)
        m.eager_copy_secs = time.perf_counter() - te
        m.staged_bytes = lay.staged_bytes
        slot.snapshot = snap
        self.current_metrics = m
        snap.staging = self.current = self.copier.submit(step, lazy, lambda h: on_staged(snap, h), cuda=cuda,
                                                         before=None if slot.reserved else
                                                         lambda: self.pool.reserve(slot))
        return snap

    def staged(self, snap: StagedSnapshot, h: StagingHandle) -> None:
        """The copier finished ``snap`` (copier thread): it becomes the memory tier's snapshot, or is dropped."""
        if h.error is not None:
            self.pool.abandon(snap.slot)
        else:
            self.pool.mark_staged(snap.slot, h.step)

    def memory_steps(self) -> list[int]:
        """The steps of this process's kept staged snapshots (the memory tier), ascending."""
        return self.pool.staged_steps()

    def restore(self, state: Any, step: int, dry_run: bool = False) -> bool:
        """Copy the memory tier's snapshot of ``step`` back into ``state``; False when it is not there or the
        state's structure differs from the snapshot's (``dry_run``: only say whether it would work)."""
        slot = self.pool.staged(step)
        snap = slot.snapshot if slot is not None else None
        if snap is None:
            return False
        plain, bindings, ctx = resolve(state)
        flat = flatten(plain)
        layouts = {k: tensor_layout(t) for k, t in flat.tensors.items()}
        if snapshot_layout.signature(flat, layouts) != snap.layout.signature:
            return False
        if dry_run:
            return True
        with torch.no_grad():
            for r in snap.layout.regions:
                dst = layouts[r.key].pieces[r.piece_index].local_view(layouts[r.key].local)
                dst.copy_(snapshot_layout.slot_view(snap.slot, r))
        assign(state, snap.values, bindings)
        for b in bindings:
            b.apply(ctx)
        return True

    def close(self) -> None:
        for h in list(self._hooks.values()):
            h.remove()
        self._hooks.clear()
        self.copier.close()
        self.pool.close()
