"""The specs shipped with the package (``spec_lang/specs/*.yaml``): Megatron-core naming, docs/megatron-layout.md."""

from __future__ import annotations

import functools
from importlib import resources

from ckpt.errors import SpecError
from spec_lang.loader import load_spec
from spec_lang.model import Spec

SHIPPED = ("gpt", "llama", "mixtral")


def shipped_spec_text(name: str) -> str:
    if name not in SHIPPED:
        raise SpecError(f"no shipped spec named {name!r}; shipped: {', '.join(SHIPPED)}")
    return resources.files("spec_lang").joinpath("specs", f"{name}.yaml").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def shipped_spec(name: str) -> Spec:
    """The compiled shipped spec ``name`` (``gpt``, ``llama`` or ``mixtral``); errors cite spec_lang/specs/NAME.yaml."""
    return load_spec(shipped_spec_text(name), name=f"spec_lang/specs/{name}.yaml")
