"""A tiny, safe arithmetic expression language for spec parameters (no ``eval``, no attribute access).

Grammar (Python-like precedence, lowest first)::

    expr   := or ['if' or 'else' expr]
    or     := and ('or' and)*            and := not ('and' not)*        not := 'not' not | cmp
    cmp    := sum [('=='|'!='|'<'|'<='|'>'|'>=') sum]
    sum    := term (('+'|'-') term)*     term := unary (('*'|'/'|'//'|'%') unary)*
    unary  := '-' unary | atom           atom := INT | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'

Values are exact rationals: ``/`` is exact division (``ceil(vocab / 8)`` works), ``//`` and ``%`` are integer
floor division and remainder. ``true``/``false`` are 1/0 and comparisons give 1/0. Functions: ``ceil``,
``floor``, ``min``, ``max``, ``abs``, ``split(n, parts, i)`` (the count of part ``i`` when ``n`` units are split
over ``parts``, the first ``n % parts`` parts getting one more) and ``split_start(n, parts, i)`` (where part ``i``
starts). An ``Expr`` is pure data (its source text and position); its syntax tree is a cached pure function of
the text.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, Union

from spec_lang.where import Where, spec_error

Number = Union[int, Fraction]
Lookup = Union[Mapping[str, Number], Callable[[str], "Number | None"]]

KEYWORDS = ("and", "or", "not", "if", "else", "true", "false")
_TOKEN = re.compile(r"\s*(?:(?P<int>\d+)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<op>//|==|!=|<=|>=|[-+*/%<>(),]))")


class ExprSyntaxError(ValueError):
    """A parse problem at character ``offset`` of the expression text (wrapped into ``SpecError`` by ``Expr``)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def split_count(n: int, parts: int, i: int) -> int:
    """Units in part ``i`` of ``n`` split over ``parts`` (the first ``n % parts`` parts get one more)."""
    return n // parts + (1 if i < n % parts else 0)


def split_start(n: int, parts: int, i: int) -> int:
    """First unit of part ``i`` of ``n`` split over ``parts``."""
    return i * (n // parts) + min(i, n % parts)


def _need_int(name: str, *xs: Number) -> tuple[int, ...]:
    for x in xs:
        if isinstance(x, Fraction) and x.denominator != 1:
            raise ArithmeticError(f"{name}() needs integers, got {x}")
    return tuple(int(x) for x in xs)


def _split(n: Number, parts: Number, i: Number) -> int:
    a, b, c = _need_int("split", n, parts, i)
    if b < 1 or not 0 <= c < b or a < 0:
        raise ArithmeticError(f"split({a}, {b}, {c}) needs n >= 0, parts >= 1 and 0 <= i < parts")
    return split_count(a, b, c)


def _split_start(n: Number, parts: Number, i: Number) -> int:
    a, b, c = _need_int("split_start", n, parts, i)
    if b < 1 or not 0 <= c <= b or a < 0:
        raise ArithmeticError(f"split_start({a}, {b}, {c}) needs n >= 0, parts >= 1 and 0 <= i <= parts")
    return split_start(a, b, c)


FUNCTIONS: dict[str, tuple[int, int, Callable[..., Number]]] = {
    # name: (min args, max args, implementation)
    "ceil": (1, 1, lambda x: math.ceil(x)),
    "floor": (1, 1, lambda x: math.floor(x)),
    "abs": (1, 1, lambda x: abs(x)),
    "min": (1, 99, lambda *xs: min(xs)),
    "max": (1, 99, lambda *xs: max(xs)),
    "split": (3, 3, _split),
    "split_start": (3, 3, _split_start),
}


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            skipped = len(text[pos:]) - len(text[pos:].lstrip())
            raise ExprSyntaxError(f"unexpected character {text[pos + skipped]!r}", pos + skipped)
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def take(self) -> tuple[str, str, int]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, *values: str) -> tuple[str, str, int] | None:
        kind, val, _ = self.peek()
        if kind in ("op", "name") and val in values:
            return self.take()
        return None

    def expect(self, value: str) -> None:
        if not self.accept(value):
            kind, val, off = self.peek()
            raise ExprSyntaxError(f"expected {value!r}, found {val or 'end of expression'!r}", off)

    def parse(self) -> tuple:
        node = self.expr()
        kind, val, off = self.peek()
        if kind != "end":
            raise ExprSyntaxError(f"unexpected {val!r} after a complete expression", off)
        return node

    def expr(self) -> tuple:
        node = self.or_()
        t = self.accept("if")
        if t:
            cond = self.or_()
            self.expect("else")
            return ("if", cond, node, self.expr(), t[2])
        return node

    def or_(self) -> tuple:
        node = self.and_()
        while t := self.accept("or"):
            node = ("or", node, self.and_(), t[2])
        return node

    def and_(self) -> tuple:
        node = self.not_()
        while t := self.accept("and"):
            node = ("and", node, self.not_(), t[2])
        return node

    def not_(self) -> tuple:
        t = self.accept("not")
        if t:
            return ("not", self.not_(), t[2])
        return self.cmp()

    def cmp(self) -> tuple:
        node = self.sum()
        t = self.accept("==", "!=", "<", "<=", ">", ">=")
        if t:
            node = ("bin", t[1], node, self.sum(), t[2])
            if self.accept("==", "!=", "<", "<=", ">", ">="):
                raise ExprSyntaxError("chained comparisons are not supported; join them with 'and'", self.toks[self.i - 1][2])
        return node

    def sum(self) -> tuple:
        node = self.term()
        while t := self.accept("+", "-"):
            node = ("bin", t[1], node, self.term(), t[2])
        return node

    def term(self) -> tuple:
        node = self.unary()
        while t := self.accept("*", "/", "//", "%"):
            node = ("bin", t[1], node, self.unary(), t[2])
        return node

    def unary(self) -> tuple:
        t = self.accept("-")
        if t:
            return ("neg", self.unary(), t[2])
        return self.atom()

    def atom(self) -> tuple:
        kind, val, off = self.take()
        if kind == "int":
            return ("num", int(val), off)
        if kind == "name":
            if val in ("true", "false"):
                return ("num", 1 if val == "true" else 0, off)
            if val in KEYWORDS:
                raise ExprSyntaxError(f"unexpected keyword {val!r}", off)
            if self.accept("("):
                args = [self.expr()]
                while self.accept(","):
                    args.append(self.expr())
                self.expect(")")
                if val not in FUNCTIONS:
                    raise ExprSyntaxError(f"unknown function {val!r}; known: {', '.join(sorted(FUNCTIONS))}", off)
                lo, hi, _ = FUNCTIONS[val]
                if not lo <= len(args) <= hi:
                    raise ExprSyntaxError(f"{val}() takes {lo if lo == hi else f'{lo} or more'} arguments, got {len(args)}", off)
                return ("call", val, tuple(args), off)
            return ("name", val, off)
        if kind == "op" and val == "(":
            node = self.expr()
            self.expect(")")
            return node
        raise ExprSyntaxError(f"expected a number, a name or '(', found {val or 'end of expression'!r}", off)


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> tuple:
    """The syntax tree of ``text`` (nested tuples); raises ``ExprSyntaxError``."""
    if not text.strip():
        raise ExprSyntaxError("empty expression", 0)
    return _Parser(text).parse()


def _names(node: tuple, out: list[tuple[str, int]]) -> None:
    tag = node[0]
    if tag == "name":
        out.append((node[1], node[2]))
    elif tag == "call":
        for a in node[2]:
            _names(a, out)
    else:
        for child in node[1:]:
            if isinstance(child, tuple):
                _names(child, out)


def _norm(x: Number) -> Number:
    if isinstance(x, Fraction) and x.denominator == 1:
        return int(x)
    return x


class _EvalError(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def _eval(node: tuple, get: Callable[[str, int], Number]) -> Number:
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag == "name":
        return get(node[1], node[2])
    if tag == "neg":
        return -_eval(node[1], get)
    if tag == "not":
        return 0 if _eval(node[1], get) else 1
    if tag == "and":
        a = _eval(node[1], get)
        return _eval(node[2], get) if a else a
    if tag == "or":
        a = _eval(node[1], get)
        return a if a else _eval(node[2], get)
    if tag == "if":
        return _eval(node[2], get) if _eval(node[1], get) else _eval(node[3], get)
    if tag == "call":
        args = [_eval(a, get) for a in node[2]]
        try:
            return _norm(FUNCTIONS[node[1]][2](*args))
        except ArithmeticError as e:
            raise _EvalError(str(e), node[3]) from None
    op, a, b, off = node[1], _eval(node[2], get), _eval(node[3], get), node[4]
    if op in ("/", "//", "%") and b == 0:
        raise _EvalError(f"division by zero ({a} {op} 0)", off)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return _norm(Fraction(a) * b)
    if op == "/":
        return _norm(Fraction(a) / b)
    if op == "//":
        return a // b  # type: ignore[operator]
    if op == "%":
        return _norm(Fraction(a) % b)
    return int({"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])


@dataclass(frozen=True)
class Expr:
    """An expression of a spec: its text and where the text starts in the spec file."""

    source: str
    where: Where | None = None

    @staticmethod
    def checked(source: str, where: Where | None, rule: str | None) -> "Expr":
        """Parse ``source`` now and raise a positioned ``SpecError`` if it is not a valid expression."""
        e = Expr(source, where)
        e.tree(rule)
        return e

    def at(self, offset: int) -> Where | None:
        return self.where.shifted(offset) if self.where is not None else None

    def tree(self, rule: str | None = None) -> tuple:
        try:
            return parse(self.source)
        except ExprSyntaxError as e:
            raise spec_error(self.at(e.offset), rule, f"invalid expression {self.source!r}: {e}",
                             fix="write arithmetic over model dims and parallel sizes, e.g. 'heads * head_dim'") from None

    def names(self) -> list[tuple[str, int]]:
        """Every ``(name, offset)`` the expression reads."""
        out: list[tuple[str, int]] = []
        _names(self.tree(), out)
        return out

    def check_names(self, allowed: set[str] | frozenset[str], rule: str | None, context: str) -> None:
        """Raise a positioned ``SpecError`` for the first name not in ``allowed``."""
        for name, off in self.names():
            if name not in allowed:
                raise spec_error(self.at(off), rule, f"unknown name {name!r} in {context} {self.source!r}",
                                 expected="one of " + ", ".join(sorted(allowed)), found=repr(name),
                                 fix="declare it under 'dims' or 'let', or fix the spelling")

    def evaluate(self, lookup: Lookup, rule: str | None = None) -> Number:
        """The value, with names from ``lookup``; errors (unknown name, division by zero) are positioned."""
        if callable(lookup):
            def get(name: str, off: int) -> Number:
                v = lookup(name)  # type: ignore[operator]
                if v is None:
                    raise _EvalError(f"no value for {name!r}", off)
                return v
        else:
            def get(name: str, off: int) -> Number:
                try:
                    return lookup[name]  # type: ignore[index]
                except KeyError:
                    raise _EvalError(f"no value for {name!r} here (known: {', '.join(sorted(lookup))})", off) from None
        try:
            return _norm(_eval(self.tree(rule), get))
        except _EvalError as e:
            raise spec_error(self.at(e.offset), rule, f"cannot evaluate {self.source!r}: {e}",
                             fix="check the model dims passed in and the names this expression may use") from None

    def evaluate_int(self, lookup: Lookup, rule: str | None = None, what: str = "value") -> int:
        """The value, which must be an integer."""
        v = self.evaluate(lookup, rule)
        if isinstance(v, Fraction):
            raise spec_error(self.where, rule, f"{what} {self.source!r} is not an integer", expected="an integer",
                             found=str(v), fix="use // or ceil()/floor() where a division may not be exact")
        return int(v)

    def constant(self) -> Number | None:
        """The value when the expression reads no names, else None."""
        if self.names():
            return None
        return self.evaluate({})
