"""The specs shipped with the package (``spec_lang/specs/*.yaml``): Megatron-core naming, docs/megatron-layout.md."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Iterable

from ckpt.errors import SpecError
from spec_lang.check import CheckReport, check
from spec_lang.loader import load_spec
from spec_lang.model import Spec

#: The shipped specs: each family in Megatron-Core's "local" layer-spec naming (``gpt``) and in its Transformer
#: Engine naming (``gpt-te``: norms fused into the next linear, ``_extra_state`` entries), plus ``-local`` aliases.
FAMILIES = ("gpt", "llama", "mixtral")
ALIASES = {f"{f}-local": f for f in FAMILIES}
SHIPPED = (*FAMILIES, *(f"{f}-te" for f in FAMILIES))


def shipped_spec_text(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in SHIPPED:
        raise SpecError(f"no shipped spec named {name!r}; shipped: {', '.join(SHIPPED)} (and {', '.join(ALIASES)})")
    return resources.files("spec_lang").joinpath("specs", f"{name}.yaml").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def shipped_spec(name: str) -> Spec:
    """The compiled shipped spec ``name`` (one of ``SHIPPED``); errors cite spec_lang/specs/NAME.yaml."""
    name = ALIASES.get(name, name)
    return load_spec(shipped_spec_text(name), name=f"spec_lang/specs/{name}.yaml")


def match_shipped(keys: Iterable[str], candidates: Iterable[str] | None = None
                  ) -> tuple[str | None, dict[str, CheckReport]]:
    """Which shipped spec describes ``keys`` (rank-local flattened keys, e.g. every rank file's): the candidate
    that leaves no key unmatched and the fewest parameter rules unused (a Llama state also fits the GPT spec, whose
    bias rules then go unused). Returns (its name or None, every candidate's ``check`` report). Pure: keys only."""
    keys = list(keys)
    reports = {name: check(shipped_spec(name), keys) for name in (candidates or SHIPPED)}
    fits = [(sum(r.section == "params" for r in rep.unmatched_rules), name) for name, rep in reports.items()
            if not rep.unmatched_keys]
    return (min(fits)[1] if fits else None), reports
