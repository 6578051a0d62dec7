"""The clustered codec: per-row-chunk fp16 centroid tables and packed labels (spec §5)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..clustered_tensor import ClusteredTensor
from ..constants import CODEC_CLUSTERED, ENCODING_RAW, label_bits_for_k
from ..dtypes import name_of, to_numpy
from ..rebuild.reference import centroids_as, rebuild_chunk
from ..schema import Blob, ClusteredChunk, ClusteredEntry, chunk_row_ranges, rows_and_row_size
from . import entropy
from .bitpack import max_label, pack_labels, packed_size

__all__ = ["CODEC_ID", "encode_chunks", "make_entry", "decode_chunk", "chunk_count"]

CODEC_ID = CODEC_CLUSTERED

Payload = tuple[bytes, str]
ReadBlob = Callable[[Blob, int, str], "bytes | memoryview"]


def encode_chunks(ct: ClusteredTensor, level: int | None = None) -> list[Callable[[], list[Payload]]]:
    """Return one job per row chunk; each job returns [centroid payload, label payload]."""
    _, row_size = rows_and_row_size(tuple(ct.shape))
    labels = to_numpy(ct.labels).reshape(-1)

    def job(table: np.ndarray, lab: np.ndarray) -> Callable[[], list[Payload]]:
        def run() -> list[Payload]:
            k = table.size
            bits = label_bits_for_k(k)
            packed = pack_labels(lab, bits)
            return [(table.astype("<f2").tobytes(), ENCODING_RAW), entropy.compress(packed.tobytes(), level, kind="labels")]

        return run

    return [
        job(to_numpy(t), labels[a * row_size : b * row_size]) for t, (a, b) in zip(ct.centroids, ct.row_ranges())
    ]


def make_entry(ct: ClusteredTensor, blobs: list[list[Blob]]) -> ClusteredEntry:
    """Build the header entry once every chunk's blobs are written."""
    chunks = [
        ClusteredChunk(k=t.numel(), label_bits=label_bits_for_k(t.numel()), centroids=c, labels=lab)
        for t, (c, lab) in zip(ct.centroids, blobs)
    ]
    return ClusteredEntry(
        dtype=name_of(ct.dtype),
        shape=list(ct.shape),
        codec=CODEC_ID,
        chunk_rows=ct.chunk_rows,
        chunks=chunks,
        quality=dict(ct.quality) if ct.quality else None,
    )


def chunk_count(entry: ClusteredEntry, index: int) -> int:
    """Number of values in chunk ``index``."""
    rows, row_size = rows_and_row_size(entry.shape)
    a, b = chunk_row_ranges(rows, entry.chunk_rows)[index]
    return (b - a) * row_size


def read_centroids(entry: ClusteredEntry, index: int, read: ReadBlob) -> np.ndarray:
    """Return chunk ``index``'s fp16 table, checked finite and strictly ascending (spec §5.4)."""
    chunk = entry.chunks[index]
    table = np.frombuffer(read(chunk.centroids, 2 * chunk.k, "centroids"), dtype="<f2")
    if not np.isfinite(table).all():
        raise ValueError("centroid table holds NaN or infinity")
    if chunk.k > 1 and not (table[1:] > table[:-1]).all():
        raise ValueError("centroid table is not strictly ascending")
    return table


def read_labels(
    entry: ClusteredEntry, index: int, read: ReadBlob, scratch: entropy.Scratch | None = None
) -> np.ndarray:
    """Return chunk ``index``'s packed label plane, checked: every label < K, padding zero.

    With ``scratch``, a zstd plane decodes into its slot 0 (``read`` must accept ``out``)."""
    chunk = entry.chunks[index]
    count = chunk_count(entry, index)
    size = packed_size(count, chunk.label_bits)
    if scratch is None:
        stored = read(chunk.labels, size, "labels")
    else:
        stored = read(chunk.labels, size, "labels", scratch.get(0, size))  # type: ignore[call-arg]
    packed = np.frombuffer(stored, dtype=np.uint8)
    top = max_label(packed, chunk.label_bits, count)
    if top >= chunk.k:
        raise ValueError(f"label {top} is out of range for K={chunk.k}")
    return packed


def decode_chunk(
    entry: ClusteredEntry,
    index: int,
    read: ReadBlob,
    out: np.ndarray | None = None,
    scratch: entropy.Scratch | None = None,
) -> np.ndarray:
    """Rebuild chunk ``index`` in the tensor's dtype (storage form), bit-exactly (spec §5.5).

    ``out``, if given, is a contiguous array of the chunk's size and storage dtype that receives
    the values; ``scratch`` holds the decoded label plane."""
    table = centroids_as(read_centroids(entry, index, read), entry.dtype)
    packed = read_labels(entry, index, read, scratch)
    values = rebuild_chunk(packed, entry.chunks[index].label_bits, chunk_count(entry, index), table)
    if out is None:
        return values
    out[...] = values
    return out
