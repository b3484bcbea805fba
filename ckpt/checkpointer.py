"""``ckpt.Checkpointer``: lazy asynchronous snapshots with a multi-level flush, for training loops.

Who calls what, on every rank, in the same order (each public method is collective over ``process_group``):
``Checkpointer(...)`` once; ``save(step, state)`` after ``optimizer.step()`` of that step; ``restore(state)`` at
start-up; ``wait()``/``close()`` at the end. Training threads never block on I/O: ``save`` copies what may change
before the next update (buffers, RNG, counters) and returns; parameters and optimizer state are copied in the
background while the next forward/backward run, and an optimizer pre-step hook holds the next update until that
copy is done (``wait_for_staging()`` serves loops that update by hand). Staged snapshots then flush to local disk
and a remote URL on their own cadence, each tier committing on its own gloo group.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ckpt.dist import DistWrapper
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.loading import load as load_checkpoint
from ckpt.options import SaveOptions
from ckpt.policies import EveryNSteps, retention_from
from ckpt import snapshot_layout
from ckpt.pool import HostBufferPool, SegmentAllocator, Slot
from ckpt.rng import RNGState
from ckpt.saving import write_and_commit
from ckpt.staging import BACKGROUND_PRIORITIES, Copier, StagingHandle, copy_all
from ckpt.state import assign, flatten, flatten_state, resolve, walk_objects
from ckpt.snapshot_layout import SnapshotLayout, Sources, storage_ptr
from ckpt.tiers import FlushJob, FlushResult, StorageTier
from formats.writer import ChunkWrite
from resharding.layout import tensor_layout

RNG_KEY = "rng"


class TierError(CheckpointError):
    """A background tier failed; raised on the next Checkpointer call on every rank, naming tier and step."""


@dataclass
class SnapshotMetrics:
    """Per-snapshot costs on this rank. Seconds unless named otherwise."""

    step: int
    rank: int
    request_secs: float = 0.0
    backpressure_wait_secs: float = 0.0
    lazy_wait_secs: float = 0.0
    copy_secs: float = 0.0
    eager_copy_secs: float = 0.0
    staged_bytes: int = 0
    lazy_bytes: int = 0
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)


class SnapshotHandle:
    """Returned by ``Checkpointer.save``: ``done()`` once staged and flushed to every due tier; ``wait()`` blocks."""

    def __init__(self, step: int, tiers: set[str]) -> None:
        self.step = step
        self._pending = set(tiers) | {"memory"}
        self._cond = threading.Condition()
        self.errors: list[BaseException] = []

    def _complete(self, part: str, error: BaseException | None = None) -> None:
        with self._cond:
            self._pending.discard(part)
            if error is not None:
                self.errors.append(error)
            self._cond.notify_all()

    def done(self) -> bool:
        with self._cond:
            return not self._pending

    def wait(self, timeout_secs: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout_secs)


class Checkpointer:
    """Snapshots every ``memory_every`` steps into host memory, persisted every ``disk_every`` steps under
    ``root`` and every ``remote_every`` steps under ``remote``. See README "Checkpointer" for every option."""

    def __init__(self, root: str, *, memory_every: int = 1, disk_every: int = 1, remote: str | None = None,
                 remote_every: int = 0, keep_last: int | None = 3, keep_every: int | None = None,
                 remote_keep_last: int | None = None, memory_slots: int = 2, process_group: Any = None,
                 storage_options: dict[str, Any] | None = None, disk_storage_options: dict[str, Any] | None = None,
                 save_options: SaveOptions | None = None,
                 save_rng: bool = True, lazy: bool = True, metrics: bool = True,
                 allocator: SegmentAllocator | None = None, background_priority: str = "normal") -> None:
        for name, v in (("memory_every", memory_every), ("disk_every", disk_every), ("remote_every", remote_every)):
            if v < 0:
                raise ValueError(f"Checkpointer({name}={v}): expected >= 0 (0 disables that tier)")
        if remote_every and not remote:
            raise ValueError("Checkpointer(remote_every>0) needs remote='scheme://...'")
        if background_priority not in BACKGROUND_PRIORITIES:
            raise ValueError(f"Checkpointer(background_priority={background_priority!r}): expected one of "
                             f"{list(BACKGROUND_PRIORITIES)}")
        self.background_priority = background_priority
        self.root = str(root)
        self.memory_every = memory_every
        self.save_rng = save_rng
        self.lazy = lazy
        self.save_options = save_options or SaveOptions()
        self.dw = DistWrapper(process_group)
        self.process_group = process_group
        self.pool = HostBufferPool(memory_slots, allocator)
        self.copier = Copier(background_priority)
        self.tiers: list[StorageTier] = []
        self.memory_cadence = EveryNSteps(memory_every)
        if disk_every:
            self.tiers.append(StorageTier("disk", self.root, EveryNSteps(disk_every),
                                          retention_from(keep_last, keep_every), self._new_group(),
                                          disk_storage_options, background_priority))
        if remote and remote_every:
            # The remote tier is the one whose bandwidth is scarce: save_options.codec applies there.
            self.tiers.append(StorageTier("remote", remote, EveryNSteps(remote_every),
                                          retention_from(remote_keep_last or keep_last, keep_every), self._new_group(),
                                          storage_options, background_priority, codec=self.save_options.codec))
        self._layout: SnapshotLayout | None = None
        self._sources = Sources()
        self._current: StagingHandle | None = None
        self._current_metrics: SnapshotMetrics | None = None
        self._hooks: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.metrics: list[SnapshotMetrics] = []
        self._metrics_path = self._metrics_file() if metrics else None
        self._handles: dict[int, SnapshotHandle] = {}
        self._unwritten: list[tuple[SnapshotHandle, SnapshotMetrics]] = []
        self._unlisted: dict[str, str] = {}  # tiers the last listing could not reach, and why

    # -- set-up helpers ------------------------------------------------------------------------------------------
    def _new_group(self) -> Any:
        """A gloo group of the same ranks, for one tier's background collectives (collective over the world)."""
        if self.dw.world_size == 1:
            return None
        ranks = dist.get_process_group_ranks(self.process_group) if self.process_group is not None else None
        return dist.new_group(ranks=ranks, backend="gloo")

    def _metrics_file(self) -> str | None:
        if "://" in self.root and not self.root.startswith("file://"):
            return None
        base = self.root.removeprefix("file://")
        return os.path.join(base, "metrics", f"rank_{self.dw.rank:05d}.jsonl")

    # -- errors --------------------------------------------------------------------------------------------------
    def _record_error(self, msg: str) -> None:
        with self._lock:
            self._errors.append(msg)

    def _raise_pending(self) -> None:
        """Raise background failures on every rank at the same call (one small collective when distributed)."""
        with self._lock:
            mine, self._errors = self._errors, []
        everyone = self.dw.all_gather(mine)
        lines = [f"rank {r}: {m}" for r, ms in enumerate(everyone) for m in ms]
        if lines:
            raise TierError(
                "background checkpointing failed (the last committed snapshot stays loadable; training may "
                "continue and later snapshots retry):\n  " + "\n  ".join(lines)
            )

    # -- planning ------------------------------------------------------------------------------------------------
    def _full_state(self, state: Any) -> Any:
        if self.save_rng and isinstance(state, dict) and RNG_KEY not in state:
            return {**state, RNG_KEY: RNGState(self.dw.rank)}
        return state

    def _layout_for(self, flat: Any, sig: tuple[Any, ...]) -> SnapshotLayout:
        """The cached layout while every rank's state structure is unchanged; else a new plan (collective)."""
        same = self._layout is not None and self._layout.signature == sig
        if all(self.dw.all_gather(same)):
            assert self._layout is not None
            return self._layout
        layouts = {k: s.layout for k, s in self._sources.by_key.items()}
        self._layout = snapshot_layout.build(self.dw, flat, layouts, sig, self.save_options.max_chunk_bytes)
        return self._layout

    @staticmethod
    def _optimizer_signature(optimizers: list[torch.optim.Optimizer]) -> tuple[Any, ...]:
        return tuple((id(o), tuple(id(p) for g in o.param_groups for p in g["params"])) for o in optimizers)

    @staticmethod
    def _optimizer_ptrs(optimizers: list[torch.optim.Optimizer]) -> set[int]:
        """Storage addresses of what only ``optimizer.step()`` changes: parameters and state tensors."""
        ptrs: set[int] = set()
        for o in optimizers:
            ptrs |= {storage_ptr(p) for g in o.param_groups for p in g["params"]}
            ptrs |= {storage_ptr(v) for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
        return ptrs

    def _install_hooks(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for o in optimizers:  # keyed weakly by the optimizer itself: a recycled id() must not skip a hook
            if o not in self._hooks:
                self._hooks[o] = o.register_step_pre_hook(self._pre_step_hook)

    def _pre_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Runs before every ``optimizer.step()``: the DataStates-LLM wait for this snapshot's lazy copies."""
        self.wait_for_staging()

    # -- the training-loop API -----------------------------------------------------------------------------------
    def wait_for_staging(self) -> float:
        """Block until this rank's background copies of the last snapshot finished; return seconds blocked.

        Installed as a pre-step hook on every optimizer found in the saved state; call it yourself before
        changing parameters outside ``optimizer.step()``.
        """
        h = self._current
        if h is None or h.done():
            return 0.0
        blocked = h.wait()
        if self._current_metrics is not None and self._current_metrics.step == h.step:
            self._current_metrics.lazy_wait_secs += blocked
        return blocked

    def save(self, step: int, state: Any) -> SnapshotHandle:
        """Snapshot ``state`` at ``step``; returns at once with a handle (collective)."""
        t0 = time.perf_counter()
        self._raise_pending()
        tiers_due = {t.name for t in self.tiers if t.due(step)}
        mem_due = self.memory_cadence.should_save(step)
        if not tiers_due and not mem_due:
            h = SnapshotHandle(step, set())
            h._complete("memory")
            return h
        self.wait_for_staging()  # the previous snapshot's lazy copies (normally done long ago)
        flat = flatten_state(self._full_state(state))
        optimizers = [o for o in walk_objects(state) if isinstance(o, torch.optim.Optimizer)]
        if self.lazy:  # what only optimizer.step() changes: its parameters and state tensors (the hook guards them)
            self._install_hooks(optimizers)
        else:
            optimizers = []
        sources = self._sources.update(flat.tensors, self._optimizer_signature(optimizers),
                                       lambda: self._optimizer_ptrs(optimizers))
        assert self._sources.signature is not None
        lay = self._layout_for(flat, self._sources.signature)
        m = SnapshotMetrics(step, self.dw.rank)
        slot, m.backpressure_wait_secs = self.pool.acquire(lay.total_bytes, tiers_due)
        eager, lazy = [], []
        lazy_index: dict[int, int] = {}  # region position -> index of its lazy copy (absent: copied eagerly)
        for i, (r, dst) in enumerate(zip(lay.regions, snapshot_layout.slot_views(slot, lay))):
            src = sources[r.key]
            if src.lazy:
                lazy_index[i] = len(lazy)
                lazy.append((src.views[r.piece_index], dst))
                m.lazy_bytes += r.nbytes
            else:
                eager.append((src.views[r.piece_index], dst))
        te = time.perf_counter()
        copy_all(eager)
        m.eager_copy_secs = time.perf_counter() - te
        m.staged_bytes = lay.staged_bytes
        slot.info = {"values": dict(flat.values), "containers": dict(flat.containers), "layout": lay}
        handle = SnapshotHandle(step, tiers_due)
        self._handles[step] = handle
        finished = self._finished_metrics()
        self._unwritten.append((handle, m))
        self.metrics.append(m)
        self._current_metrics = m

        def staged(h: StagingHandle) -> None:  # copier thread; the lines go out before this snapshot completes
            self._append_metrics(finished)
            self._staged(h, slot, handle, m)

        staging = self.copier.submit(step, lazy, staged, cuda=self._sources.lazy_cuda)
        self._current = staging
        # Tiers start now: each chunk streams out as soon as its own region is staged (ready() waits for it).
        for tier in self.tiers:
            if tier.name in tiers_due:
                tier.submit(FlushJob(step, lambda storage, dw, t=tier: self._flush(t, slot, lay, storage, dw, step,
                                                                                  staging, lazy_index),
                                     lambda res: self._flushed(res, slot, handle, m)))
        m.request_secs = time.perf_counter() - t0
        return handle

    # -- background: after staging, flush ------------------------------------------------------------------------
    def _staged(self, h: StagingHandle, slot: Slot, handle: SnapshotHandle, m: SnapshotMetrics) -> None:
        """All copies of ``h`` are in ``slot`` (copier thread): the memory tier commits."""
        m.copy_secs = h.copy_secs
        if h.error is not None:
            self.pool.abandon(slot)
            self._record_error(f"staging step {h.step}: {type(h.error).__name__}: {h.error}")
            handle._complete("memory", h.error)
            return
        self.pool.mark_staged(slot, h.step)
        handle._complete("memory")

    def _flush(self, tier: StorageTier, slot: Slot, lay: SnapshotLayout, storage: Any, dw: DistWrapper, step: int,
               staging: StagingHandle, lazy_index: dict[int, int]) -> int:
        """Write one snapshot to ``tier`` from its slot (tier thread), streaming chunks as they are staged."""
        plan = lay.plan
        regions = {(r.key, lay.piece_box(r)): (i, r) for i, r in enumerate(lay.regions)}
        items = []
        for a in plan.assignments:
            i, r = regions[(a.key, a.source)]
            view = snapshot_layout.slot_view(slot, r)[a.box.relative_to(a.source).slices()]
            # A lazy region streams out as soon as the copier has staged it; an eager one is staged already.
            until = (lambda n=lazy_index[i]: staging.wait_copied(n)) if i in lazy_index else None
            items.append(ChunkWrite(a.key, a.box.offsets, a.box.sizes, view, until))
        manifest = plan.manifest.with_state(slot.info["values"], slot.info["containers"]) \
            if plan.manifest is not None else None
        write_and_commit(dw, storage, f"{plan.save_id}-s{step}", items, manifest, tier.write_options(self.save_options),
                         step=f"ckpt tier {tier.name!r} step {step}", tool="ckpt.Checkpointer")
        return sum(i.nbytes for i in items)

    def _flushed(self, res: FlushResult, slot: Slot, handle: SnapshotHandle, m: SnapshotMetrics) -> None:
        self.pool.release(slot, res.tier)
        m.tiers[res.tier] = {"ok": res.ok, "flush_secs": res.flush_secs, "bytes": res.bytes_written}
        if not res.ok:
            m.tiers[res.tier]["error"] = f"{type(res.error).__name__}: {res.error}"
            self._record_error(f"tier {res.tier!r} step {res.step}: {type(res.error).__name__}: {res.error}")
        handle._complete(res.tier, res.error)

    def _finished_metrics(self, everything: bool = False) -> list[SnapshotMetrics]:
        """Take the metrics of snapshots whose numbers are final (all of them with ``everything``).

        A snapshot's line is written after a later ``save`` or at ``wait``: its lazy wait happens in the next
        ``optimizer.step()``, so only then are its numbers final.
        """
        done, keep = [], []
        for h, m in self._unwritten:
            if everything or h.done():
                done.append(m)
            else:
                keep.append((h, m))
        self._unwritten = keep
        return done

    def _append_metrics(self, done: list[SnapshotMetrics]) -> None:
        """Append ``done`` as JSON lines; ``save`` has the copier thread do it, off the training thread."""
        if not done or self._metrics_path is None:
            return
        try:
            os.makedirs(os.path.dirname(self._metrics_path), exist_ok=True)
            with open(self._metrics_path, "a") as f:
                for m in done:
                    f.write(json.dumps(asdict(m)) + "\n")
        except OSError:
            pass  # metrics are best effort; a full disk surfaces through the disk tier itself

    # -- queries and restore -------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every snapshot is staged and flushed to every due tier; raise background failures."""
        self.wait_for_staging()
        for h in list(self._handles.values()):
            h.wait()
        for t in self.tiers:
            t.drain()
        self._handles.clear()
        self._append_metrics(self._finished_metrics(everything=True))
        self._raise_pending()

    def _tier_steps(self, only: str | None = None) -> dict[str, list[int]]:
        """Committed steps per tier. With ``only``, lists that tier alone and a listing failure raises; without,
        a tier that cannot be listed (a remote store that is down) counts as empty, so the others stay usable,
        and the failure is kept in ``self._unlisted`` for messages."""
        local = self.pool.latest()
        mem = [local.step] if local is not None and local.step is not None else []
        everyone = self.dw.all_gather(mem)
        steps = {"memory": sorted(set.intersection(*[set(s) for s in everyone]))}

        def listing() -> tuple[dict[str, list[int]], dict[str, str]] | None:
            if not self.dw.is_coordinator:
                return None
            found, failed = {}, {}
            for t in self.tiers:
                if only is not None and t.name != only:
                    continue
                try:
                    found[t.name] = t.committed_steps()
                except Exception as e:  # noqa: BLE001 - see the docstring
                    if only is not None:
                        raise
                    found[t.name], failed[t.name] = [], f"{type(e).__name__}: {e}"
            return found, failed

        found, self._unlisted = self.dw.broadcast(self.dw.run("ckpt.Checkpointer: listing tiers", listing))
        steps.update(found)
        return steps

    def steps(self, tier: str | None = None) -> list[int]:
        """Committed steps on ``tier`` (``memory``, ``disk``, ``remote``), or on any tier that can be listed now
        (collective)."""
        per = self._tier_steps(tier)
        if tier is not None:
            return per.get(tier, [])
        return sorted(set().union(*per.values()))

    def latest_step(self) -> int | None:
        """The newest step committed on any tier, or None (collective)."""
        s = self.steps()
        return s[-1] if s else None

    def restore(self, state: Any, step: int | None = None) -> int:
        """Load the latest committed step (or ``step``) into ``state`` from the fastest tier that has it.

        Order: this process's memory snapshot, local disk, remote. Returns the step restored; raises
        ``CheckpointNotFoundError`` when no tier has it (collective).
        """
        self.wait()
        per = self._tier_steps()
        every = sorted(set().union(*per.values()))
        if not every or (step is not None and step not in every):
            unlisted = "".join(f"; tier {k!r} could not be listed: {v}" for k, v in self._unlisted.items())
            raise CheckpointNotFoundError(
                f"{self.root}: no committed snapshot" + (f" of step {step}" if step is not None else "")
                + f" on any tier (committed: {per}{unlisted}); start from scratch or pass another step"
            )
        want = every[-1] if step is None else step
        full = self._full_state(state)
        try:
            if want in per["memory"] and all(self.dw.all_gather(self._restore_from_memory(full, want, dry_run=True))):
                self._restore_from_memory(full, want)
                return want
            for tier in self.tiers:
                if want in per.get(tier.name, []):
                    load_checkpoint(full, tier.storage_for(want), process_group=self.process_group,
                                    lenient_prefixes=(RNG_KEY + "/",))
                    return want
        finally:
            if full is not state:  # values loaded into the top level of the copy that carries the RNG entry
                for k in state:
                    state[k] = full[k]
        raise CheckpointNotFoundError(f"{self.root}: step {want} vanished while restoring")  # pragma: no cover

    def _restore_from_memory(self, state: Any, step: int, dry_run: bool = False) -> bool:
        slot = self.pool.latest()
        if slot is None or slot.step != step:
            return False
        plain, bindings, ctx = resolve(state)
        flat = flatten(plain)
        layouts = {k: tensor_layout(t) for k, t in flat.tensors.items()}
        lay: SnapshotLayout = slot.info["layout"]
        if snapshot_layout.signature(flat, layouts) != lay.signature:
            return False
        if dry_run:
            return True
        with torch.no_grad():
            for r in lay.regions:
                dst = layouts[r.key].pieces[r.piece_index].local_view(layouts[r.key].local)
                dst.copy_(snapshot_layout.slot_view(slot, r))
        assign(state, slot.info["values"], bindings)
        for b in bindings:
            b.apply(ctx)
        return True

    def close(self) -> None:
        """Finish pending work, remove the optimizer hooks, free the pool. Raises pending failures."""
        try:
            self.wait()
        finally:
            for h in list(self._hooks.values()):
                h.remove()
            self._hooks.clear()
            self.copier.close()
            self._sources.clear()
            for t in self.tiers:
                t.close()
            self.pool.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

