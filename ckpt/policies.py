"""Tiny pure policies: when to save on a tier, and which committed steps to keep (STYLE 12).

Unit-tested with plain data; the Checkpointer consults them after each commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class SavePolicy(Protocol):
    def should_save(self, step: int) -> bool: ...


class RetentionPolicy(Protocol):
    def keep(self, steps: Sequence[int]) -> set[int]:
        """Which of the committed ``steps`` (ascending) to keep; the rest may be deleted."""


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step % n == 0`` (n >= 1); ``n == 0`` never saves."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"EveryNSteps(n={self.n}): n must be >= 0 (0 disables the tier)")

    def should_save(self, step: int) -> bool:
        return self.n > 0 and step % self.n == 0


@dataclass(frozen=True)
class AnySave:
    """Save when any of ``policies`` says so."""

    policies: tuple[SavePolicy, ...]

    def should_save(self, step: int) -> bool:
        return any(p.should_save(step) for p in self.policies)


@dataclass(frozen=True)
class KeepLatestN:
    """Keep the ``n`` most recent committed steps (n >= 1: the latest is never deleted)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepLatestN(n={self.n}): n must be >= 1 so the latest commit is kept")

    def keep(self, steps: Sequence[int]) -> set[int]:
        return set(sorted(steps)[-self.n:])


@dataclass(frozen=True)
class KeepEveryN:
    """Keep every step that is a multiple of ``n`` (long-term milestones)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepEveryN(n={self.n}): n must be >= 1")

    def keep(self, steps: Sequence[int]) -> set[int]:
        return {s for s in steps if s % self.n == 0}


@dataclass(frozen=True)
class KeepAll:
    def keep(self, steps: Sequence[int]) -> set[int]:
        return set(steps)


@dataclass(frozen=True)
class AnyOf:
    """Keep a step if any of ``policies`` keeps it."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, steps: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(steps)
        return out


def retention_from(keep_last: int | None, keep_every: int | None) -> RetentionPolicy:
    """The retention a Checkpointer tier uses for ``keep_last``/``keep_every`` (None: not set)."""
    policies: list[RetentionPolicy] = []
    if keep_last:
        policies.append(KeepLatestN(keep_last))
    if keep_every:
        policies.append(KeepEveryN(keep_every))
    return AnyOf(tuple(policies)) if policies else KeepAll()


def memory_keep(keep_last: int | None, memory_slots: int) -> int:
    """How many staged snapshots the Checkpointer's memory tier keeps: ``keep_last`` (None: as many as fit), at
    most ``memory_slots - 1`` because one slot is always left for the snapshot being copied (a single slot keeps
    its one snapshot until the next copy starts)."""
    if memory_slots < 1:
        raise ValueError(f"Checkpointer(memory_slots={memory_slots}): expected at least 1 slot")
    most = max(1, memory_slots - 1)
    return most if not keep_last else max(1, min(keep_last, most))
