"""The canonical numpy rebuild of a clustered row chunk (spec §5.5).

Every faster path (pair tables, torch, Triton) is tested bit-for-bit against `rebuild_chunk`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codecs.bitpack import unpack_labels
from ..dtypes import to_numpy

__all__ = ["centroids_as", "rebuild_chunk"]


def centroids_as(centroids_f16: np.ndarray, dtype: str) -> np.ndarray:
    """Convert an fp16 centroid table to ``dtype``'s storage form (spec §5.5).

    F16 is the table itself; F32 is exact; BF16 rounds to nearest, ties to even (via float32,
    which holds every fp16 value exactly).
    """
    c = np.asarray(centroids_f16, dtype="<f2")
    if dtype == "F16":
        return c.copy()
    if dtype == "F32":
        return c.astype("<f4")
    if dtype == "BF16":
        return to_numpy(torch.from_numpy(c.astype("<f4")).to(torch.bfloat16)).copy()
    raise ValueError(f"dtype {dtype} cannot be rebuilt from centroids")


def rebuild_chunk(packed: np.ndarray, label_bits: int, count: int, table: np.ndarray) -> np.ndarray:
    """Return ``count`` values ``table[label]`` from a packed label plane (storage form of the table)."""
    labels = unpack_labels(packed, label_bits, count)
    return np.take(table, labels)
