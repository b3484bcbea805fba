"""The source formats ``formats.foreign`` reads itself, registered as any other source would be.

Loaded by ``formats.foreign.registry`` on its first look-up. Each opener imports its reader when it is called, so
opening a safetensors file does not import DCP's reader (nor torch.distributed.checkpoint). Which format a path
holds is ``formats.foreign.detect``'s built-in rules (they weigh the formats against each other: ambiguity, an
uncommitted universal checkpoint), so these register no ``detect`` hook.
"""

from __future__ import annotations

import os
from typing import Any

from ckpt.errors import UnknownFormatError
from formats.foreign.detect import torch_files
from formats.foreign.registry import register_source
from formats.foreign.source import Source


def _universal(path: str, *, storage_options: dict[str, Any] | None = None) -> Source:
    from formats.foreign.universal import UniversalSource

    return UniversalSource(path, storage_options)


def _dcp(path: str, *, allow_pickle: bool = False) -> Source:
    from formats.foreign.dcp import DcpSource

    return DcpSource(path, allow_pickle=allow_pickle)


def _torch(path: str, *, allow_pickle: bool = False) -> Source:
    """A ``torch.save`` file, or a directory holding exactly one."""
    from formats.foreign.torch_file import TorchSource

    if os.path.isdir(path):
        files = torch_files(path)
        if len(files) != 1:
            raise UnknownFormatError(f"{path}: expected one .pt/.pth/.bin file in the directory, found {files[:10]}")
        path = os.path.join(path, files[0])
    return TorchSource(path, allow_pickle=allow_pickle)


def _safetensors(path: str) -> Source:
    from formats.foreign.hf_safetensors import SafetensorsSource

    return SafetensorsSource(path)


def _deepspeed(path: str, *, allow_pickle: bool = False) -> Source:
    """A ZeRO ``save_checkpoint`` directory, or DeepSpeed's universal checkpoint layout (``ds_to_universal``)."""
    from formats.foreign.deepspeed import open_deepspeed

    return open_deepspeed(path, allow_pickle=allow_pickle)


register_source("universal", _universal, description="universal checkpoints", options=("storage_options",))
register_source("dcp", _dcp, description="PyTorch Distributed Checkpoint directories", options=("allow_pickle",))
register_source("torch", _torch, description="torch.save files", options=("allow_pickle",))
register_source("safetensors", _safetensors, description="safetensors files")
register_source("deepspeed", _deepspeed, description="DeepSpeed checkpoint directories", options=("allow_pickle",))
