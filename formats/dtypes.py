"""Names of tensor dtypes in the manifest, and their element sizes.

Names are torch's without the ``torch.`` prefix (``float32``, ``bfloat16``, ``float8_e4m3fn``). Reading an
unknown name raises ``CorruptCheckpointError``; a name this torch build lacks (an fp8 type on an old torch)
raises the same with a hint to upgrade.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ckpt.errors import CorruptCheckpointError, UnsupportedStateError

_CANDIDATES = [
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
]

NAME_TO_DTYPE: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _CANDIDATES if isinstance(getattr(torch, n, None), torch.dtype)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {d: n for n, d in NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of ``dtype``; ``TypeError`` for dtypes the format does not store (quantized types)."""
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise UnsupportedStateError(f"dtype {dtype} cannot be stored in a ckpt checkpoint; convert the tensor first") from None


def dtype_from_name(name: object, where: str) -> torch.dtype:
    """The torch dtype called ``name``; ``where`` names the manifest entry for the error message."""
    if isinstance(name, str) and name in NAME_TO_DTYPE:
        return NAME_TO_DTYPE[name]
    if isinstance(name, str) and name in _CANDIDATES:
        raise CorruptCheckpointError(
            f"{where}: dtype {name!r} is not available in torch {torch.__version__}; upgrade torch to read it"
        )
    raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}; expected one of {sorted(NAME_TO_DTYPE)}")


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=None)
def can_convert(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether torch's ``copy_`` converts ``src`` elements into a ``dst`` tensor on the CPU (``float4_e2m1fn_x2``
    converts to nothing but itself, some fp8 pairs lack kernels). Probed once per pair with a one-element copy."""
    if src == dst:
        return True
    one = torch.zeros(itemsize(src), dtype=torch.uint8).view(src)  # one element of bits 0, of any dtype
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex -> real warns that it drops the imaginary part
            torch.empty(1, dtype=dst).copy_(one)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return True
