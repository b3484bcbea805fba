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

import logging
import os
import time
from typing import Any

import torch

from ckpt.dist import DistWrapper
from ckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError, DaemonError, IncompleteCheckpointError,
                         StorageError)
from ckpt.loading import load as load_checkpoint
from ckpt.options import SaveOptions
from formats.manifest import config_metadata
from ckpt.plan_cache import PlanCache
from ckpt.policies import EveryNSteps, memory_keep, retention_from
from ckpt.pool import HostBufferPool, SegmentAllocator
from ckpt.rng import RNGState
from ckpt.snapshot_handle import (MEMORY, BackgroundErrors, MetricsLog, SnapshotHandle, SnapshotMetrics,
                                  TierError)
from ckpt.stager import StagedSnapshot, Stager
from ckpt.staging import BACKGROUND_PRIORITIES, Copier, StagingHandle
from ckpt.state import flatten_state, walk_objects
from ckpt.tiers import CopyJob, FlushJob, FlushResult, Tier, open_tier, tier_group

__all__ = ["Checkpointer", "SnapshotHandle", "SnapshotMetrics", "TierError"]

RNG_KEY = "rng"
DAEMON = "daemon"
#: Errors that mean one stored copy of a step is unusable (restore tries the next); a mismatched state is not one.
UNSOUND = (CorruptCheckpointError, IncompleteCheckpointError, StorageError, DaemonError)
log = logging.getLogger("ckpt")


class Checkpointer:
    """Snapshots every ``memory_every`` steps into host memory, persisted every ``disk_every`` steps under
    ``root`` and every ``remote_every`` steps under ``remote``. See README "Checkpointer" for every option.

    It orchestrates three parts, each in its own module: the plan cache (``ckpt/plan_cache.py``), the stager
    (``ckpt/stager.py``: pool slots, eager and lazy copies, the optimizer pre-step hook, the memory tier) and the
    tiers (``ckpt/tiers.py``: one flush thread each, found by URL scheme)."""

    def __init__(self, root: str, *, memory_every: int = 1, disk_every: int = 1, remote: str | None = None,
                 remote_every: int = 0, keep_last: int | None = 3, keep_every: int | None = None,
                 remote_keep_last: int | None = None, memory_slots: int = 2, process_group: Any = None,
                 storage_options: dict[str, Any] | None = None, disk_storage_options: dict[str, Any] | None = None,
                 save_options: SaveOptions | None = None,
                 save_rng: bool = True, lazy: bool = True, metrics: bool = True,
                 allocator: SegmentAllocator | None = None, background_priority: str = "normal",
                 daemon: str | None = None, model_config: Any = None, generation_config: Any = None) -> None:
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
        self.memory_cadence = EveryNSteps(memory_every)
        self.plans = PlanCache(self.dw, self.save_options.max_chunk_bytes)
        self.tiers: list[Tier] = []
        if daemon is not None:  # the memory tier in the per-node daemon: the pool stages into its segments
            where = "auto" if daemon == "auto" else os.path.abspath(daemon)
            run = self.root if "://" in self.root else os.path.abspath(self.root)
            self.tiers.append(open_tier(DAEMON, f"daemon://{where}", self.memory_cadence, retention_from(keep_last, None),
                                        tier_group(self.dw, process_group),
                                        {"run": run, "rank": self.dw.rank, "world": self.dw.world_size},
                                        background_priority, save_options=self.save_options))
            allocator = getattr(self.tiers[0], "allocator", allocator)
        import torch.distributed.checkpoint.state_dict  # noqa: F401, PLC0415 - its import (~50 ms) not in the first save
        self.stager = Stager(HostBufferPool(memory_slots, allocator, keep_staged=memory_keep(keep_last, memory_slots)),
                             Copier(background_priority))
        # ckpt.save's model_config=/generation_config=: in every step's manifest, so `ckpt convert --to safetensors`
        # of a step writes config.json (checked here, before training starts)
        self.stager.metadata = config_metadata(model_config, generation_config, "ckpt.Checkpointer")
        self.pool, self.copier = self.stager.pool, self.stager.copier
        if disk_every:
            self.tiers.append(open_tier("disk", self.root, EveryNSteps(disk_every), retention_from(keep_last, keep_every),
                                        tier_group(self.dw, process_group), disk_storage_options, background_priority,
                                        save_options=self.save_options))
        if remote and remote_every:
            # The remote tier is the one whose bandwidth is scarce: save_options.codec applies there.
            self.tiers.append(open_tier("remote", remote, EveryNSteps(remote_every),
                                        retention_from(remote_keep_last or keep_last, keep_every),
                                        tier_group(self.dw, process_group), storage_options, background_priority,
                                        codec=self.save_options.codec, save_options=self.save_options))
        self.errors = BackgroundErrors(self.dw)
        self.log = MetricsLog(self.root, self.dw.rank, metrics)
        self.metrics: list[SnapshotMetrics] = self.log.all
        self._handles: dict[int, SnapshotHandle] = {}
        self._unlisted: dict[str, str] = {}  # tiers the last listing could not reach, and why
        #: What the last ``restore`` did: ``step``, ``source`` (``memory``, ``daemon``, ``disk``, ``remote``),
        #: ``secs``, ``storage_bytes_read`` (0 from memory and the daemon; what the load fetched from disk or remote)
        #: and ``skipped`` (the copies found unsound before it: ``step``, ``tier``, ``error``).
        self.last_restore: dict[str, Any] | None = None

    def _full_state(self, state: Any) -> Any:
        if self.save_rng and isinstance(state, dict) and RNG_KEY not in state:
            return {**state, RNG_KEY: RNGState(self.dw.rank)}
        return state

    # -- the training-loop API -----------------------------------------------------------------------------------
    def wait_for_staging(self) -> float:
        """Block until this rank's background copies of the last snapshot finished; return seconds blocked.

        Installed as a pre-step hook on every optimizer found in the saved state; call it yourself before
        changing parameters outside ``optimizer.step()``.
        """
        return self.stager.wait()

    def save(self, step: int, state: Any) -> SnapshotHandle:
        """Snapshot ``state`` at ``step``; returns at once with a handle (collective)."""
        t0 = time.perf_counter()
        self.errors.raise_pending()
        tiers_due = {t.name for t in self.tiers if t.due(step)}
        handle = SnapshotHandle(step, tiers_due)
        if not tiers_due and not self.memory_cadence.should_save(step):
            handle._complete(MEMORY)
            return handle
        self.wait_for_staging()  # the previous snapshot's lazy copies (normally done long ago)
        flat = flatten_state(self._full_state(state))
        optimizers = [o for o in walk_objects(state) if isinstance(o, torch.optim.Optimizer)]
        if self.lazy:  # what only optimizer.step() changes: its parameters and state tensors (the hook guards them)
            self.stager.install_hooks(optimizers)
        sources, lay = self.plans.plan(flat, optimizers if self.lazy else [])
        m = SnapshotMetrics(step, self.dw.rank)
        finished = self.log.finished()
        self._handles[step] = handle
        self.log.add(handle, m)

        def staged(snap: StagedSnapshot, h: StagingHandle) -> None:  # copier thread; lines go out before it completes
            self.log.append(finished)
            m.copy_secs = h.copy_secs
            self.stager.staged(snap, h)
            if h.error is not None:
                self.errors.record(f"staging step {h.step}: {type(h.error).__name__}: {h.error}")
            handle._complete(MEMORY, h.error)

        snap = self.stager.stage(step, flat, sources, lay, tiers_due, m, staged, self.plans.sources.lazy_cuda)
        # Tiers start now: each chunk streams out as soon as its own region is staged.
        for tier in self.tiers:
            if tier.name in tiers_due:
                tier.submit(FlushJob(snap, lambda res: self._flushed(res, snap, handle, m)))
        m.request_secs = time.perf_counter() - t0
        return handle

    def _flushed(self, res: FlushResult, snap: StagedSnapshot, handle: SnapshotHandle, m: SnapshotMetrics) -> None:
        """A tier finished ``snap`` (tier thread): free its hold on the slot, record the result.

        A tier whose committed steps are the slot's own bytes (``holds_slot``: the daemon) keeps its newest one
        from reuse before the slot is released, so a killed trainer always leaves a sealed step behind."""
        holder = next((t for t in self.tiers if t.name == res.tier), None)
        if getattr(holder, "holds_slot", False):
            self.pool.hold(snap.slot if res.ok else None, res.step)
        self.pool.release(snap.slot, res.tier)
        m.tiers[res.tier] = {"ok": res.ok, "flush_secs": res.flush_secs, "bytes": res.bytes_written}
        if not res.ok:
            m.tiers[res.tier]["error"] = f"{type(res.error).__name__}: {res.error}"
        if not res.ok and not res.quiet:
            self.errors.record(f"tier {res.tier!r} step {res.step}: {type(res.error).__name__}: {res.error}")
        handle._complete(res.tier, res.error)

    # -- queries and restore -------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every snapshot is staged and flushed to every due tier; raise background failures."""
        self.wait_for_staging()
        for h in list(self._handles.values()):
            h.wait()
        for t in self.tiers:
            t.drain()
        self._handles.clear()
        self.log.append(self.log.finished(everything=True))
        self.errors.raise_pending()

    def _tier_steps(self, only: str | None = None) -> dict[str, list[int]]:
        """Committed steps per tier. With ``only``, lists that tier alone and a listing failure raises; without,
        a tier that cannot be listed (a remote store that is down) counts as empty, so the others stay usable,
        and the failure is kept in ``self._unlisted`` for messages."""
        everyone = self.dw.all_gather(self.stager.memory_steps())
        steps = {MEMORY: sorted(set.intersection(*[set(s) for s in everyone]))}

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

    def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int:
        """Load the newest committed step (or ``step``) into ``state`` from the fastest tier that has it, and return
        the step restored (collective).

        Order: this process's memory snapshot, the snapshot daemon, local disk, remote. A copy that turns out
        damaged, truncated or unreadable (``CorruptCheckpointError``, ``IncompleteCheckpointError``,
        ``StorageError``, ``DaemonError``) is skipped with a warning naming the step, the tier and why, and the next
        copy is tried: the same step on a slower tier first, then (without ``step``) older steps, so a job restarted
        by its scheduler resumes from the newest sound step instead of failing forever. ``last_restore["skipped"]``
        lists what was skipped. Raises ``CheckpointNotFoundError`` when no tier has the step, and the last copy's
        error when no copy is sound; a state that does not match (``ShardMismatchError``) is raised at once.
        ``strict`` is ``ckpt.load``'s (the Checkpointer's own ``rng/`` entries are lenient either way).
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
        candidates = [step] if step is not None else every[::-1]
        full = self._full_state(state)
        t0 = time.perf_counter()
        skipped: list[dict[str, Any]] = []
        last_error: Exception | None = None
        try:
            for want in candidates:
                if (want in per[MEMORY]
                        and all(self.dw.all_gather(self.stager.restore(full, want, dry_run=True)))):
                    self.stager.restore(full, want)
                    self.last_restore = {"step": want, "source": MEMORY, "secs": time.perf_counter() - t0,
                                         "storage_bytes_read": 0, "skipped": skipped}
                    return want
                for tier in self.tiers:
                    if want not in per.get(tier.name, []):
                        continue
                    try:
                        report = load_checkpoint(full, tier.storage_for(want), process_group=self.process_group,
                                                 strict=strict, lenient_prefixes=(RNG_KEY + "/",))
                    except UNSOUND as e:  # raised alike on every rank (ckpt.load is collective)
                        last_error = e
                        lines = str(e).splitlines() or [""]
                        head = " ".join(x.strip() for x in lines[:2]) if lines[0].endswith(":") else lines[0]
                        why = f"{type(e).__name__}: {head}"
                        skipped.append({"step": want, "tier": tier.name, "error": why})
                        log.warning("ckpt.Checkpointer.restore %s: step %d on tier %r is not sound, skipped (%s)",
                                    self.root, want, tier.name, why)
                        continue
                    self.last_restore = {"step": want, "source": tier.name, "secs": time.perf_counter() - t0,
                                         "storage_bytes_read": 0 if tier.name == DAEMON else report.bytes_read,
                                         "skipped": skipped}
                    if skipped:
                        log.warning("ckpt.Checkpointer.restore %s: restored step %d from tier %r after skipping %s",
                                    self.root, want, tier.name,
                                    ", ".join(f"step {s['step']} on {s['tier']!r}" for s in skipped))
                    if tier.name == DAEMON:
                        self._persist_from(tier, want, per)
                    return want
        finally:
            if full is not state:  # values loaded into the top level of the copy that carries the RNG entry
                for k in state:
                    state[k] = full[k]
        if last_error is not None:
            tried = ", ".join(f"step {s['step']} on {s['tier']!r}" for s in skipped)
            raise type(last_error)(
                f"{self.root}: no sound copy of " + (f"step {step}" if step is not None else "any committed step")
                + f" (tried {tried}); the last error:\n{last_error}\nRestore another step (cp.steps() lists them) "
                "or start from scratch") from last_error
        want = candidates[0]
        if want in per[MEMORY]:  # only the in-process snapshot has it, and it does not fit this state
            raise CheckpointNotFoundError(
                f"{self.root}: step {want} is only in this process's memory snapshot, whose keys or shapes differ "
                "from the state passed to restore on at least one rank" + ("" if strict else " (or strict=False)")
                + "; pass the state the snapshot was taken of (same model and optimizer), or restore a step "
                "persisted on disk")
        raise CheckpointNotFoundError(f"{self.root}: step {want} vanished while restoring")  # pragma: no cover

    def _persist_from(self, source: Tier, step: int, per: dict[str, list[int]]) -> None:
        """``step`` was restored from the daemon: where it was due on a persistent tier that never committed it
        (the trainer died during that flush) and that has nothing newer, copy it there in the background."""
        for t in self.tiers:
            done = per.get(t.name, [])
            if t is source or not t.due(step) or step in done or (done and done[-1] > step):
                continue

            def copied(res: FlushResult) -> None:
                if not res.ok:
                    self.errors.record(f"tier {res.tier!r} step {res.step} (from the daemon): "
                                       f"{type(res.error).__name__}: {res.error}")

            t.submit(CopyJob(step, source.storage_for(step), copied))

    def close(self) -> None:
        """Finish pending work, remove the optimizer hooks, free the pool. Raises pending failures."""
        try:
            self.wait()
        finally:
            self.stager.close()
            self.plans.clear()
            for t in self.tiers:
                t.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

