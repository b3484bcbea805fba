"""Key patterns: literal text with ``{name}`` placeholders, compiled to regular expressions.

A placeholder matches one of three classes: ``digits`` (a layer or expert index: ``[0-9]+``), ``segment`` (one
flattened-key component: ``[^/]+``; parameter names never hold a ``/``, the key escaping turns it into ``~1``), or
``rest`` (a trailing ``/**``: the key itself and everything nested under it). ``overlap`` decides exactly whether
two patterns can match one common key (a product of two small automata), which is how a key that two rules would
both claim is rejected when the spec is loaded rather than when a checkpoint is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z_0-9]*)\}")

DIGITS, SEGMENT = "digits", "segment"


class PatternSyntaxError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class Pattern:
    """A compiled key pattern; ``classes`` maps each placeholder to ``digits`` or ``segment``."""

    text: str
    classes: tuple[tuple[str, str], ...]

    @staticmethod
    def compile(text: str, classes: dict[str, str]) -> "Pattern":
        """Check ``text`` (placeholders must be in ``classes``) and build the pattern."""
        pos = 0
        used = []
        for m in _PLACEHOLDER.finditer(text):
            lit = text[pos:m.start()]
            for ch in "{}":
                if ch in lit:
                    raise PatternSyntaxError(f"stray {ch!r}; placeholders are written {{name}}", pos + lit.index(ch))
            if m.group(1) in used:
                raise PatternSyntaxError(f"placeholder {{{m.group(1)}}} appears twice; each may appear once", m.start())
            if m.group(1) not in classes:
                raise PatternSyntaxError(f"unknown placeholder {{{m.group(1)}}}; known here: "
                                         + ", ".join("{" + c + "}" for c in sorted(classes)), m.start())
            used.append(m.group(1))
            pos = m.end()
        tail = text[pos:]
        for ch in "{}":
            if ch in tail:
                raise PatternSyntaxError(f"stray {ch!r}; placeholders are written {{name}}", pos + tail.index(ch))
        if not text:
            raise PatternSyntaxError("empty pattern", 0)
        return Pattern(text, tuple(sorted((n, classes[n]) for n in set(used))))

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Placeholder names in order of first appearance."""
        seen: list[str] = []
        for m in _PLACEHOLDER.finditer(self.text):
            if m.group(1) not in seen:
                seen.append(m.group(1))
        return tuple(seen)

    def regex(self) -> re.Pattern[str]:
        return _regex(self.text, self.classes)

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex().fullmatch(key)
        return None if m is None else m.groupdict()

    def fill(self, values: dict[str, object]) -> str:
        """The key with each placeholder replaced by ``values[name]``."""
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.text)

    def prefixes(self) -> list[tuple[str, str]]:
        """``(text up to and including placeholder k, name k)`` for each placeholder occurrence, in order."""
        return [(self.text[:m.end()], m.group(1)) for m in _PLACEHOLDER.finditer(self.text)]


_REGEX_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], re.Pattern[str]] = {}


def _regex(text: str, classes: tuple[tuple[str, str], ...]) -> re.Pattern[str]:
    key = (text, classes)
    rx = _REGEX_CACHE.get(key)
    if rx is None:
        cls = dict(classes)
        out, pos, seen = [], 0, set()
        body = text[:-3] if text.endswith("/**") else text
        for m in _PLACEHOLDER.finditer(body):
            out.append(re.escape(body[pos:m.start()]))
            name = m.group(1)
            if name in seen:
                out.append(f"(?P={name})")
            else:
                seen.add(name)
                out.append(f"(?P<{name}>{'[0-9]+' if cls[name] == DIGITS else '[^/]+'})")
            pos = m.end()
        out.append(re.escape(body[pos:]))
        if body is not text:
            out.append("(?:/.*)?")
        rx = _REGEX_CACHE[key] = re.compile("".join(out), re.DOTALL)
    return rx


# ----------------------------------------------------------------------------- overlap of two patterns
# Each pattern becomes a list of items: a literal character, or a class with "one or more" repetition
# (digits / non-slash / anything). The intersection is non-empty iff the product automaton reaches
# (end, end); the alphabet is reduced to representatives (every literal character, one digit, one letter, '/'
# and one character no pattern uses) since the classes only distinguish those.


def _items(p: Pattern) -> list[tuple[str, str]]:
    cls = dict(p.classes)
    text = p.text
    rest = text.endswith("/**")
    body = text[:-3] if rest else text
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(body):
        items.extend(("lit", c) for c in body[pos:m.start()])
        items.append(("plus", "digit" if cls[m.group(1)] == DIGITS else "seg"))
        pos = m.end()
    items.extend(("lit", c) for c in body[pos:])
    if rest:
        items.append(("rest", ""))  # optional: "" or "/" followed by anything
    return items


def _accepts(kind: str, ch: str) -> bool:
    if kind == "digit":
        return ch.isdigit()
    if kind == "seg":
        return ch != "/"
    return True


def _step(items: list[tuple[str, str]], states: frozenset[tuple[int, int]], ch: str) -> frozenset[tuple[int, int]]:
    # State (i, phase): at item i; for 'plus' phase 1 means one char already consumed; for 'rest' phase 1 means
    # the '/' was consumed.
    out = set()
    for i, phase in states:
        if i >= len(items):
            continue
        kind, val = items[i]
        if kind == "lit":
            if val == ch:
                out.add((i + 1, 0))
        elif kind == "plus":
            if _accepts(val, ch):
                out.add((i, 1))
        elif kind == "rest":
            if phase == 0 and ch == "/":
                out.add((i, 1))
            elif phase == 1:
                out.add((i, 1))
    return _closure(items, out)


def _closure(items: list[tuple[str, str]], states: set[tuple[int, int]]) -> frozenset[tuple[int, int]]:
    out = set(states)
    for i, phase in list(states):
        if i < len(items) and items[i][0] == "plus" and phase == 1:
            out.add((i + 1, 0))
    return frozenset(out)


def _accepting(items: list[tuple[str, str]], states: frozenset[tuple[int, int]]) -> bool:
    for i, phase in states:
        if i == len(items):
            return True
        if items[i][0] == "rest" and i == len(items) - 1:
            return True
    return False


def overlap(a: Pattern, b: Pattern) -> str | None:
    """A key both patterns match, or None when no such key exists."""
    ia, ib = _items(a), _items(b)
    # Readable representatives first, so the witness in an error message is a plausible key.
    literals = sorted({c for it in (ia, ib) for k, c in it if k == "lit"} - {"x", "0", "/", "\x00"})
    alphabet = ["x", "0", *literals, "/", "\x00"]
    start = (_closure(ia, {(0, 0)}), _closure(ib, {(0, 0)}))
    seen = {start: ""}
    frontier = [start]
    while frontier:
        nxt = []
        for sa, sb in frontier:
            if _accepting(ia, sa) and _accepting(ib, sb):
                return seen[(sa, sb)]
            for ch in alphabet:
                na, nb = _step(ia, sa, ch), _step(ib, sb, ch)
                if na and nb and (na, nb) not in seen:
                    seen[(na, nb)] = seen[(sa, sb)] + ch
                    nxt.append((na, nb))
        frontier = nxt
    return None
