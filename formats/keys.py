"""Flat logical keys for nested state.

Nested containers are joined with ``/``. Inside one dict key, ``~`` is written ``~0`` and ``/`` is written ``~1``
(the escaping of RFC 6901, JSON Pointer), so ``{"a/b": {"c": t}}`` becomes ``a~1b/c`` and splits back exactly.
List and tuple items use their decimal index as the component. The root container has the key ``""``.
"""

from __future__ import annotations

__all__ = ["escape", "unescape", "join", "split", "component", "MAX_DEPTH"]

#: Deepest nesting of containers stored or rebuilt (``formats.nesting``); the manifest refuses keys of more than
#: ``MAX_DEPTH + 1`` components. Deeper state is almost surely a reference cycle, and recursion must stay bounded.
MAX_DEPTH = 64


def escape(component: str) -> str:
    """Escape one dict key so that it contains no ``/``."""
    return component.replace("~", "~0").replace("/", "~1")


def unescape(component: str) -> str:
    """Invert ``escape``."""
    return component.replace("~1", "/").replace("~0", "~")


def join(parent: str, component: str) -> str:
    """The flat key of ``component`` (already escaped) inside the container whose key is ``parent``."""
    return component if parent == "" else f"{parent}/{component}"


def split(key: str) -> list[str]:
    """Unescaped components of a flat key (``""`` -> ``[]``)."""
    return [] if key == "" else [unescape(c) for c in key.split("/")]


def component(k: object, where: str) -> tuple[str, bool]:
    """The escaped key component of dict key ``k``, and whether it was an int (``where`` names it in errors)."""
    if isinstance(k, str):
        return escape(k), False
    if isinstance(k, int) and not isinstance(k, bool):
        return str(k), True
    from ckpt.errors import UnsupportedStateError  # noqa: PLC0415 - the leaf every layer may import

    raise UnsupportedStateError(f"{where}: dict keys must be str or int, found {type(k).__name__} {k!r}")
