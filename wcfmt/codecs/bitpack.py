"""Label planes: packing labels at 1, 2, 4 or 8 bits (spec §5.3).

Label ``i`` of a chunk (row-major order) sits in byte ``i // (8 // bits)`` at bit offset
``(i % (8 // bits)) * bits``, least significant bits first. Padding bits in the last byte are
zero. Byte-aligned widths are a measured choice: zstd gains nothing on 5- or 6-bit packings.
"""

from __future__ import annotations

import numpy as np

__all__ = ["packed_size", "pack_labels", "unpack_labels", "max_label"]


def packed_size(count: int, bits: int) -> int:
    """Return the bytes that ``count`` labels of ``bits`` bits occupy.

    >>> packed_size(10, 4), packed_size(10, 1), packed_size(10, 0)
    (5, 2, 0)
    """
    if bits == 0:
        return 0
    per = 8 // bits
    return -(-count // per)


def pack_labels(labels: np.ndarray, bits: int) -> np.ndarray:
    """Pack a flat uint8 label array (each < 2**bits) into bytes."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1)
    if bits == 0:
        return np.zeros(0, np.uint8)
    if bits == 8:
        return labels
    per = 8 // bits
    n = labels.size
    padded = np.zeros(packed_size(n, bits) * per, np.uint8)
    padded[:n] = labels
    grid = padded.reshape(-1, per)
    out = grid[:, 0].copy()
    for j in range(1, per):
        out |= grid[:, j] << np.uint8(j * bits)
    return out


def unpack_labels(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Return ``count`` uint8 labels from packed bytes (the inverse of `pack_labels`)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 0:
        return np.zeros(count, np.uint8)
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((packed.size, per), np.uint8)
    for j in range(per):
        np.bitwise_and(packed >> np.uint8(j * bits), mask, out=out[:, j])
    return out.reshape(-1)[:count]


def max_label(packed: np.ndarray, bits: int, count: int) -> int:
    """Return the largest label in a packed plane and check its padding bits are zero.

    Returns -1 for an empty plane; raises ValueError if padding bits are set (spec §5.3).
    """
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 0 or count == 0:
        return -1
    if bits == 8:
        return int(packed.max())
    per = 8 // bits
    tail = count % per
    if tail:
        if int(packed[-1]) >> (tail * bits):
            raise ValueError("padding bits of the last label byte are not zero")
    mask = np.uint8((1 << bits) - 1)
    return max(int(((packed >> np.uint8(j * bits)) & mask).max()) for j in range(per))
