"""Registers source format ``megatron`` (``formats.foreign.registry``) without importing its reader.

``ckpt convert`` and ``ckpt diff`` import this module to offer the format; ``resharding.megatron_dirs`` (the reader,
with the whole resharding stack behind it: about 0.7 s of imports) loads only when a Megatron source is opened or
described. Importing ``resharding.megatron_dirs`` registers the format too.
"""

from __future__ import annotations

import json
from typing import Any

from formats.foreign.registry import SourceNotes, SourceOption, SourceOptionError, find_source, register_source


def _open(path: str, **options: Any) -> Any:
    from resharding.megatron_dirs import open_megatron  # noqa: PLC0415

    return open_megatron(path, **options)


def _describe(source: Any) -> SourceNotes:
    from resharding.megatron_dirs import _notes  # noqa: PLC0415

    return _notes(source)


def _dims_from_text(text: str) -> dict[str, Any]:
    try:
        dims = json.loads(text)
    except json.JSONDecodeError as e:
        dims = e
    if not isinstance(dims, dict):
        raise SourceOptionError(f"--dims must be a JSON object such as '{{\"vocab\": 50257}}' (got {text!r})")
    return dims


if find_source("megatron") is None:
    register_source(
        "megatron", _open, description="Megatron rank directories", describe=_describe,
        misuse_hint="To reshard a universal checkpoint use ckpt reshard SRC DST --to LAYOUT.",
        options=(
            "allow_pickle",
            SourceOption("spec", help="how the ranks cut each tensor: a shipped spec (gpt, llama, mixtral; gpt-te, "
                                      "llama-te, mixtral-te for Transformer Engine naming; a family name picks the "
                                      "naming from the keys, auto the family too) or a YAML path",
                         required="Megatron rank directories are read through a spec that says how the ranks cut each "
                                  "tensor: pass --spec gpt|llama|mixtral (the naming is read from the keys), --spec "
                                  "auto, or a YAML path (and --dims JSON, --source-layout LAYOUT for what the files' "
                                  "args do not record)"),
            SourceOption("dims", help="model dims for the spec (default: from the files' args)", from_text=_dims_from_text),
            SourceOption("source_layout", help="the layout the files were written under (default: the files' args, else "
                                               "the directory names and files)"),
            SourceOption("target", help="present the tensors as this layout's ranks would save them",
                         targets=("universal",)),
        ))
