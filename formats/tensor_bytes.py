"""Zero-copy byte views of tensors, shared by the writer and the reader."""

from __future__ import annotations

import torch


def as_bytes(t: torch.Tensor) -> memoryview:
    """A read-only view of the raw row-major bytes of a contiguous CPU tensor (no copy)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable view of the bytes of a contiguous CPU tensor, for ``readinto``."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("writable_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")
