"""Tensor dtype names (safetensors' spelling) and their numpy / torch counterparts (spec §4.2).

numpy has no bfloat16: the numpy core carries BF16 data as its uint16 bit pattern, and torch
enters and leaves only at the public API.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch

#: name -> (element size in bytes, numpy storage dtype, torch dtype)
DTYPES: Final[dict[str, tuple[int, np.dtype, torch.dtype]]] = {
    "F64": (8, np.dtype("<f8"), torch.float64),
    "F32": (4, np.dtype("<f4"), torch.float32),
    "F16": (2, np.dtype("<f2"), torch.float16),
    "BF16": (2, np.dtype("<u2"), torch.bfloat16),
    "I64": (8, np.dtype("<i8"), torch.int64),
    "I32": (4, np.dtype("<i4"), torch.int32),
    "I16": (2, np.dtype("<i2"), torch.int16),
    "I8": (1, np.dtype("i1"), torch.int8),
    "U8": (1, np.dtype("u1"), torch.uint8),
    "BOOL": (1, np.dtype("?"), torch.bool),
    "F8_E4M3": (1, np.dtype("u1"), torch.float8_e4m3fn),
    "F8_E5M2": (1, np.dtype("u1"), torch.float8_e5m2),
}
if hasattr(torch, "uint16"):
    DTYPES["U16"] = (2, np.dtype("<u2"), torch.uint16)
    DTYPES["U32"] = (4, np.dtype("<u4"), torch.uint32)
    DTYPES["U64"] = (8, np.dtype("<u8"), torch.uint64)

#: dtypes the clustered codec may rebuild into (spec §5.5).
CLUSTERABLE: Final[frozenset[str]] = frozenset({"F32", "F16", "BF16"})

#: Floating dtypes whose lossless planes rotate the sign bit next to the mantissa (spec §6.2).
FLOAT_PLANES: Final[frozenset[str]] = frozenset({"F64", "F32", "F16", "BF16"})

_FROM_TORCH: Final[dict[torch.dtype, str]] = {v[2]: k for k, v in DTYPES.items()}


def itemsize(name: str) -> int:
    return DTYPES[name][0]


def storage_dtype(name: str) -> np.dtype:
    """Return the numpy dtype that holds this dtype's bytes (BF16 -> uint16)."""
    return DTYPES[name][1]


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][2]


def name_of(dtype: torch.dtype) -> str:
    """Return the format's name of a torch dtype; raise KeyError if it has none."""
    return _FROM_TORCH[dtype]


_INT_TORCH: Final[dict[int, torch.dtype]] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT_NUMPY: Final[dict[int, type]] = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Return ``t``'s bytes as a numpy array in storage form (a view when ``t`` is contiguous on CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = name_of(t.dtype)
    bits = t.contiguous().view(_INT_TORCH[itemsize(name)])
    return bits.numpy().view(storage_dtype(name))


def from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    """Return a torch tensor of dtype ``name`` sharing ``a``'s bytes (``a`` in storage form)."""
    if a.size == 0:
        return torch.empty(a.shape, dtype=torch_dtype(name))  # numpy may give zero strides here
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = a.copy(order="C")  # not ascontiguousarray: it turns a 0-d array into 1-d
    bits = torch.from_numpy(a.view(_INT_NUMPY[itemsize(name)]))
    return bits.view(torch_dtype(name))


#: Names ``--dtype`` / ``dtype=`` accept (safetensors', torch's and the usual short ones).
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "f64": torch.float64, "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "f32": torch.float32, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "f16": torch.float16, "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


#: dtypes ``dtype=`` casts (as ``from_pretrained(torch_dtype=...)`` casts float weights); float8 and
#: integer tensors keep their dtype.
CASTABLE: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})


def torch_dtype_of(dtype: torch.dtype | str) -> torch.dtype:
    """Return the floating torch dtype named by ``dtype`` (``"bf16"``, ``"F32"``, ``torch.float16`` …).

    >>> torch_dtype_of("BF16"), torch_dtype_of("torch.float16"), torch_dtype_of(torch.float32)
    (torch.bfloat16, torch.float16, torch.float32)
    """
    from .errors import UsageError

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UsageError(f"dtype must be a floating-point dtype (it casts float tensors only), got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise UsageError(f"dtype {dtype!r} is not one of {', '.join(sorted(set(_DTYPE_NAMES)))}")
