"""The seal of a manifest: its JSON text, one line per file and per entry, ending in an xxh3-64 checksum of
everything before the checksum member (format v2; see ``formats.manifest`` and docs/format.md), and the size cap
a reader applies before reading one; and the model configs a manifest's ``metadata`` may record (``config_json``,
checked on read by ``check_config_metadata``). Split out of ``formats.manifest``, which re-exports every name here."""

from __future__ import annotations

import json
import re
from typing import Any

from ckpt.errors import CorruptCheckpointError, UnsupportedStateError
from formats import checksum

#: The last member of the manifest: xxh3-64 of every byte of the file before this key's opening quote.
CHECKSUM_FIELD = "manifest_checksum"
#: Largest manifest.json a reader accepts, checked before reading it (``check_manifest_size``). A manifest takes
#: about 250 bytes per chunk, so 1 GiB is some 4 million chunks, far above any real checkpoint.
MAX_MANIFEST_BYTES = 1 << 30

#: ``metadata`` members holding a model's configuration as JSON objects: an HF ``config.json`` and
#: ``generation_config.json`` (recorded by ``ckpt.save(model_config=, generation_config=)`` or imported from an HF
#: directory; a safetensors export writes them back as those files).
CONFIG_METADATA = {"hf_config": "config.json", "hf_generation_config": "generation_config.json"}
#: Largest encoded config a writer records and a reader accepts (a real config.json is a few KiB).
MAX_CONFIG_BYTES = 16 * 2**20

_ENCODER = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))


def _head(doc: dict[str, Any]) -> str:
    """The manifest's JSON text up to its checksum member: one line per file and per entry (readable, greppable,
    diffable), ending in ``,\\n `` so the seal follows. Each line is written by the C encoder:
    ``json.dumps(indent=...)`` runs in pure Python, about 30 ms per save for a model of a few hundred tensors, on
    the flush path of every tier."""
    enc = _ENCODER.encode
    parts = []
    for k, v in doc.items():
        if k == CHECKSUM_FIELD:
            continue
        if k in ("files", "entries") and isinstance(v, dict) and v:
            inner = ",\n".join(f"  {enc(ek)}: {enc(ev)}" for ek, ev in v.items())
            parts.append(f" {enc(k)}: {{\n{inner}\n }}")
        else:
            parts.append(f" {enc(k)}: {enc(v)}")
    return "{\n" + "".join(f"{part},\n" for part in parts) + " "


def seal(doc: dict[str, Any]) -> bytes:
    """The manifest text of ``doc`` (any ``manifest_checksum`` in it dropped) sealed with a fresh checksum.

    ``Manifest.to_json`` writes manifests with it; a tool (or test) that edits a manifest on purpose re-seals it
    with ``seal(json.loads(text))``; an edit that skips this is refused as damage."""
    head = _head(doc).encode("utf-8")
    return head + f'"{CHECKSUM_FIELD}": "{checksum.digest(head)}"\n}}'.encode()


def reseal(data: bytes) -> bytes:
    """``data`` with the checksum of its seal recomputed over its text (for text-level edits made on purpose, and
    tests of what lies behind the seal); unchanged when it has no seal."""
    at = data.rfind(b'"manifest_checksum"')
    m = _SEAL.fullmatch(data, at) if at >= 0 else None
    if m is None:
        return data
    return data[: m.start(1)] + checksum.digest(memoryview(data)[:at]).encode() + data[m.end(1):]


# The seal at the end of a manifest: the checksum member, then the closing brace of the top-level object (only
# JSON whitespace may follow). Matched from the last occurrence of the key, so no scan of the whole text.
_SEAL = re.compile(rb'"manifest_checksum"[ \t\n\r]*:[ \t\n\r]*"([0-9a-f]{16})"[ \t\n\r]*\}[ \t\n\r]*')


def check_manifest_size(size: int, where: str) -> None:
    """Refuse a manifest of ``size`` bytes above ``MAX_MANIFEST_BYTES``; call it before reading the file."""
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"{where}: manifest is {size} bytes, more than the {MAX_MANIFEST_BYTES} bytes (1 GiB, some 4 million "
            "chunks) a reader accepts; it is damaged or not a ckpt manifest")


def _check_seal(data: bytes, where: str) -> bool:
    """Whether ``data`` ends with a checksum member; raise when that checksum does not match."""
    at = data.rfind(b'"manifest_checksum"')
    if at < 0:
        return False
    m = _SEAL.fullmatch(data, at)
    if m is None:
        return False
    expected = m.group(1).decode()
    found = checksum.digest(memoryview(data)[:at])
    if found != expected:
        raise CorruptCheckpointError(
            f"{where}: manifest checksum mismatch: its {CHECKSUM_FIELD} says xxh3_64 {expected}, its text hashes "
            f"to {found}. The manifest was edited or damaged after it was written; restore it from another tier "
            "or use an earlier checkpoint (a tool that edits a manifest on purpose must re-seal it: "
            "formats.manifest.seal)")
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name} (NaN and Infinity are not JSON)")


def config_json(config: Any, what: str, where: str = "") -> dict[str, Any]:
    """A model configuration as the JSON object the manifest's ``metadata`` records (``CONFIG_METADATA``).

    ``config``: a Hugging Face ``PretrainedConfig`` / ``GenerationConfig`` (anything with ``to_json_string``, called
    with ``use_diff=False`` so every field is kept whatever defaults a later transformers version has; transformers is
    never imported here), an object with ``to_dict()``, or a dict of JSON values. ``what`` names the argument in
    messages. Raises ``UnsupportedStateError`` for anything else, for values JSON cannot hold, and above
    ``MAX_CONFIG_BYTES``."""
    at = f"{where}: " if where else ""
    try:
        if isinstance(config, dict):
            text = json.dumps(config, allow_nan=False)
        elif callable(getattr(config, "to_json_string", None)):
            text = config.to_json_string(use_diff=False)
        elif callable(getattr(config, "to_dict", None)):
            text = json.dumps(config.to_dict(), allow_nan=False)
        else:
            raise UnsupportedStateError(
                f"{at}{what}: expected a transformers PretrainedConfig/GenerationConfig or a dict of JSON values, "
                f"found {type(config).__name__}; pass model.config (or its to_dict())")
        doc = json.loads(text, parse_constant=_no_constant)
    except (TypeError, ValueError, RecursionError) as e:
        raise UnsupportedStateError(f"{at}{what}: not representable as JSON ({type(e).__name__}: {e}); pass a dict "
                                    "of str, int, float, bool, None, lists and dicts") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise UnsupportedStateError(f"{at}{what}: expected a JSON object (a dict with str keys), found "
                                    f"{type(doc).__name__}; pass model.config or a dict")
    if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
        raise UnsupportedStateError(f"{at}{what}: {len(text)} bytes as JSON, more than the {MAX_CONFIG_BYTES} bytes a "
                                    "checkpoint records; a model config is a few KiB: pass the config, not data")
    return doc


def config_metadata(model_config: Any = None, generation_config: Any = None, where: str = "") -> dict[str, Any]:
    """The manifest ``metadata`` members for ``ckpt.save(model_config=, generation_config=)``: ``hf_config`` and
    ``hf_generation_config`` (each left out when None). Called once, on the coordinator, before anything is
    written."""
    out: dict[str, Any] = {}
    for name, value, what in (("hf_config", model_config, "model_config"),
                              ("hf_generation_config", generation_config, "generation_config")):
        if value is not None:
            out[name] = config_json(value, what, where)
    return out


def check_config_metadata(metadata: dict[str, Any], where: str) -> None:
    """The configs a manifest records are hostile input like the rest: JSON objects of at most
    ``MAX_CONFIG_BYTES`` (a reader writes them back as files)."""
    for name, file in CONFIG_METADATA.items():
        if name not in metadata:
            continue
        doc = metadata[name]
        if not isinstance(doc, dict):
            raise CorruptCheckpointError(f"{where}: metadata.{name} (the model's {file}) must be a JSON object, found "
                                     f"{type(doc).__name__}; the manifest is damaged (re-save with "
                                     "ckpt.save(..., model_config=model.config), or delete the member and re-seal)")
        try:
            size = len(json.dumps(doc, allow_nan=False).encode("utf-8"))
        except (TypeError, ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}: metadata.{name} (the model's {file}) cannot be written back as "
                                         f"JSON ({type(e).__name__}); the manifest is damaged") from None
        if size > MAX_CONFIG_BYTES:
            raise CorruptCheckpointError(f"{where}: metadata.{name} (the model's {file}) is {size} bytes, more than the "
                                     f"{MAX_CONFIG_BYTES} bytes a model config may have; the manifest is damaged")
