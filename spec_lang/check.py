"""``check``: which rules of a spec match none of a set of keys, and which keys no rule matches.

Used by ``ckpt spec check SPEC.yaml [--against CHECKPOINT]`` (the keys come from the checkpoint's manifest or from
a live state dict) and by tests. Pure: patterns only, no dims needed. With ``settings`` (e.g. ``{"zero": 0}``),
rules whose ``when`` is false under them are reported as inactive instead of unmatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ckpt.errors import SpecError
from spec_lang.expr import Expr
from spec_lang.model import Spec
from spec_lang.where import Where


@dataclass(frozen=True)
class RuleRef:
    """One rule of a spec: its section (``params``, ``state``, ``plain``, ``inert``), pattern and position."""

    section: str
    pattern: str
    where: Where

    def __str__(self) -> str:
        return f"{self.where}: {self.section} rule '{self.pattern}'"


@dataclass(frozen=True)
class CheckReport:
    unmatched_rules: tuple[RuleRef, ...]
    unmatched_keys: tuple[str, ...]
    #: Rules that matched nothing and whose ``when`` is false under the given settings, and inert rules that matched
    #: nothing (expected to be unused).
    inactive_rules: tuple[RuleRef, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.unmatched_rules and not self.unmatched_keys

    def format(self) -> str:
        lines = []
        if self.unmatched_rules:
            lines.append(f"{len(self.unmatched_rules)} rule(s) match no key:")
            lines += [f"  {r}" for r in self.unmatched_rules]
        if self.unmatched_keys:
            lines.append(f"{len(self.unmatched_keys)} key(s) match no rule:")
            lines += [f"  {k}" for k in self.unmatched_keys]
        if self.inactive_rules:
            lines.append(f"{len(self.inactive_rules)} rule(s) inactive under the given settings:")
            lines += [f"  {r}" for r in self.inactive_rules]
        return "\n".join(lines) if lines else "every rule matches a key and every key matches a rule"


def check(spec: Spec, keys: Iterable[str], *, settings: Mapping[str, int] | None = None) -> CheckReport:
    """Match ``keys`` (rank-local flattened keys) against ``spec``; see the module docstring."""
    used: set[tuple[str, int]] = set()
    unmatched_keys = []
    buckets = {b.name for b in spec.zero.buckets}
    groups = {g.name for g in spec.zero.groups}
    for key in keys:
        hit = False
        for i, p in enumerate(spec.plain):
            if p.pattern.match(key) is not None:
                used.add(("plain", i))
                hit = True
        for i, s in enumerate(spec.state):
            m = s.pattern.match(key)
            if m is None:
                continue
            if s.kind == "flat":
                if m["bucket"] in buckets and m["group"] in groups:
                    used.add(("state", i))
                    hit = True
                continue
            for j, r in enumerate(spec.params):
                if r.pattern.match(m["param"]) is not None:
                    used.update({("state", i), ("params", j)})
                    hit = True
            for j, n in enumerate(spec.inert):
                if n.pattern.match(m["param"]) is not None:
                    used.update({("state", i), ("inert", j)})
                    hit = True
        if not hit:
            unmatched_keys.append(key)
    rules: list[tuple[str, int, str, Where, Expr | None]] = (
        [("params", i, r.name, r.where, r.when) for i, r in enumerate(spec.params)]
        + [("state", i, s.match, s.where, s.when) for i, s in enumerate(spec.state)]
        + [("plain", i, p.match, p.where, None) for i, p in enumerate(spec.plain)]
        + [("inert", i, n.name, n.where, None) for i, n in enumerate(spec.inert)])
    unmatched, inactive = [], []
    for section, i, pattern, where, when in rules:
        if (section, i) in used:
            continue
        ref = RuleRef(section, pattern, where)
        optional = section == "inert"  # entries a framework may or may not write: never required
        (inactive if optional or (settings is not None and when is not None and _false(when, settings))
         else unmatched).append(ref)
    return CheckReport(tuple(unmatched), tuple(unmatched_keys), tuple(inactive))


def _false(when: Expr, settings: Mapping[str, int]) -> bool:
    try:
        return not when.evaluate({k: int(v) for k, v in settings.items()})
    except SpecError:  # reads a name the settings do not give: it may be active
        return False
