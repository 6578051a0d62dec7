"""The CPU fast path of the clustered rebuild (spec §5.5): lookup tables over whole label bytes.

`rebuild_chunk_fast` returns exactly what `reference.rebuild_chunk` returns, bit for bit; the
tests compare the two over shapes, K and dtypes. Instead of unpacking labels and gathering one
value per label, it gathers one *group* of values per index:

===========  ==========================  ================  ==============================
label bits   index                       values per index  table
===========  ==========================  ================  ==============================
8            two label bytes as uint16   2                 K*256 entries (lo | hi << 8)
4, 2, 1      one label byte              2, 4, 8           256 entries
===========  ==========================  ================  ==============================

Entries are numpy void scalars (``V4`` ... ``V32``): ``np.take`` copies them with fixed-size
memcpy, so one call does the unpacking and the gather. Measured on one core of an AMD EPYC
(2 MiB L2), chunks of 1-4M labels into BF16: plain ``np.take`` of unpacked uint8 labels
1.45 ns/label; 8-bit labels 0.74 ns by byte, 0.31 ns (K=32) to 0.44 ns (K=256) by byte pair;
4-bit 0.33 ns, 2-bit 0.20 ns, 1-bit 0.13 ns. Byte-pair tables for 4- and 2-bit labels (65,536
entries of 4 or 8 values) were tried and lose at these chunk sizes: building 0.5-1 MiB costs
more than the gather saves. ``torch.index_select`` over the pair table is no faster once its
int32 index cast is counted (0.41 ns), so numpy it is. ``np.take`` casts its index to intp
internally; taking `_BLOCK` indices at a time keeps that copy in L2 and bounds its memory.

Label validity: a byte table has an entry for every byte, so an out-of-range label would
silently gather a neighbour's value (or zero padding) instead of failing. The check is
`bitpack.max_label` before the gather (one vectorised pass, ~0.015 ns/label for 8-bit labels),
which also rejects non-zero padding bits. Callers that already hold a checked plane (what
`WclustReader.read_labels` returns is checked) pass ``checked=True`` to skip the second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codecs.bitpack import max_label, packed_size, unpack_labels

__all__ = ["rebuild_chunk_fast", "gather_table", "GatherTable"]

#: Indices per np.take call: its intp copy of them (2 MiB) stays in L2; measured best of 2^12..2^20.
_BLOCK = 1 << 18

#: Use the byte-pair table for 8-bit labels when the chunk has at least this many labels per
#: entry to build (K*256 entries); measured to win from K=256 at 256K labels.
_LABELS_PER_ENTRY = 4


@dataclass(frozen=True)
class GatherTable:
    """A lookup table built for one (table, label_bits, count): entries of ``per_index`` values,
    indexed by ``index``-typed words of the packed plane."""

    lut: np.ndarray
    per_index: int
    index: type
    key: tuple[bytes, int, bool]


def gather_table(table: np.ndarray, label_bits: int, count: int) -> GatherTable:
    """Build the lookup table `rebuild_chunk_fast` would build for these arguments, so a caller
    that rebuilds many chunks with the same centroids (pack's default repeats one table per
    matrix) builds it once and passes it as ``lut=``."""
    table = np.ascontiguousarray(table).reshape(-1)
    if label_bits not in (1, 2, 4, 8):
        raise ValueError(f"label_bits must be 1, 2, 4 or 8 for a lookup table, got {label_bits}")
    k = min(table.size, 1 << label_bits)
    pairs = label_bits == 8 and count >= _LABELS_PER_ENTRY * k * 256
    key = (table[:k].tobytes(), label_bits, pairs)
    if pairs:
        return GatherTable(_byte_pair_table(table[:k]), 2, np.uint16, key)
    return GatherTable(_byte_table(table[:k], label_bits), 8 // label_bits, np.uint8, key)


def rebuild_chunk_fast(
    packed: np.ndarray,
    label_bits: int,
    count: int,
    table: np.ndarray,
    out: np.ndarray | None = None,
    *,
    checked: bool = False,
    lut: GatherTable | None = None,
) -> np.ndarray:
    """Return ``count`` values ``table[label]`` from a packed label plane, as `rebuild_chunk` does.

    ``table`` is the chunk's centroids in storage form (`reference.centroids_as`); ``out``, if
    given, is a contiguous 1-D array of ``count`` elements of ``table.dtype`` that receives the
    values (and is returned). Raises ValueError if a label is >= ``len(table)`` or padding bits
    are set, unless ``checked`` says the plane was checked already.

    >>> from wcfmt.codecs.bitpack import pack_labels
    >>> t = np.array([10, 20, 30], np.uint16)
    >>> rebuild_chunk_fast(pack_labels(np.array([2, 0, 1, 1, 2], np.uint8), 2), 2, 5, t)
    array([30, 10, 20, 20, 30], dtype=uint16)
    """
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    table = np.ascontiguousarray(table).reshape(-1)
    if label_bits not in (0, 1, 2, 4, 8):
        raise ValueError(f"label_bits must be 0, 1, 2, 4 or 8, got {label_bits}")
    if packed.size < packed_size(count, label_bits):
        raise ValueError(f"{packed.size} label bytes hold fewer than {count} labels of {label_bits} bits")
    if out is None:
        out = np.empty(count, table.dtype)
    elif out.dtype != table.dtype or out.shape != (count,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable contiguous ({count},) array of {table.dtype}")
    if count == 0:
        return out
    k = table.size
    if not checked:
        top = max_label(packed, label_bits, count)
        if top >= k:
            raise ValueError(f"label {top} is out of range for K={k}")
    elif k == 0:
        raise ValueError("empty centroid table")
    if label_bits == 0:
        out[...] = table[0]
        return out
    k = min(k, 1 << label_bits)  # wider tables cannot be addressed; labels were checked < K

    per_byte = 8 // label_bits
    if lut is None:
        lut = gather_table(table, label_bits, count)
    elif lut.key != (table[:k].tobytes(), label_bits, label_bits == 8 and count >= _LABELS_PER_ENTRY * k * 256):
        raise ValueError("lut was built for another table, label width or chunk size")
    lut, per_index, index = lut.lut, lut.per_index, lut.index

    n_idx = count // per_index
    main = n_idx * per_index
    if n_idx:
        idx = packed[: n_idx * (per_index // per_byte)].view(index)
        dst = out[:main].view(lut.dtype)
        for s in range(0, n_idx, _BLOCK):
            # mode="wrap" skips np.take's error path; indices are in range, checked above.
            np.take(lut, idx[s : s + _BLOCK], out=dst[s : s + _BLOCK], mode="wrap")
    if main < count:
        tail = unpack_labels(packed[main // per_byte :], label_bits, count - main)
        np.take(table, tail, out=out[main:])
    return out


def _byte_table(table: np.ndarray, bits: int) -> np.ndarray:
    """256 entries (K for 8-bit labels): the values of the ``8 // bits`` labels in each byte."""
    if bits == 8:
        return table
    per = 8 // bits
    full = np.zeros(1 << bits, table.dtype)
    full[: table.size] = table
    codes = np.arange(256, dtype=np.uint16)
    lut = np.empty((256, per), table.dtype)
    for j in range(per):
        lut[:, j] = full[(codes >> (j * bits)) & ((1 << bits) - 1)]
    return lut.reshape(-1).view(f"V{per * table.dtype.itemsize}")


def _byte_pair_table(table: np.ndarray) -> np.ndarray:
    """Entries for every uint16 index ``lo | hi << 8`` with ``hi < K``: the values of lo then hi.

    Entries whose low byte is >= K hold zeros; checked labels never reach them.
    """
    k = table.size
    single = np.zeros(256, table.dtype)
    single[:k] = table
    lut = np.empty((k, 256, 2), table.dtype)
    lut[:, :, 0] = single[None, :]
    lut[:, :, 1] = table[:, None]
    return lut.reshape(-1).view(f"V{2 * table.dtype.itemsize}")
