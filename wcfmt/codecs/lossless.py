"""The lossless codec: byte planes, zstd per plane (spec §6).

Floats first rotate each element left by one bit, so the sign joins the mantissa and the top
plane holds the exponent alone (bf16: 8 exponent bits in one byte); zstd's Huffman stage then
codes the exponent plane near its entropy while mantissa planes stay near raw, as ZipNN does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..constants import CODEC_LOSSLESS, DEFAULT_LOSSLESS_CHUNK_BYTES
from ..dtypes import FLOAT_PLANES, itemsize, name_of, storage_dtype, to_numpy
from ..schema import Blob, LosslessChunk, LosslessEntry, chunk_row_ranges, rows_and_row_size
from . import entropy

__all__ = ["CODEC_ID", "encode_chunks", "make_entry", "decode_chunk", "chunk_rows_for", "to_planes", "from_planes"]

CODEC_ID = CODEC_LOSSLESS

Payload = tuple[bytes, str]
ReadBlob = Callable[[Blob, int, str], "bytes | memoryview"]
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transform_for(dtype: str) -> str:
    return "float_planes" if dtype in FLOAT_PLANES else "byte_planes"


def chunk_rows_for(shape: list[int], dtype: str) -> int:
    """Rows per chunk so that a chunk holds about DEFAULT_LOSSLESS_CHUNK_BYTES (at least one row)."""
    _, row_size = rows_and_row_size(shape)
    row_bytes = max(1, row_size * itemsize(dtype))
    return max(1, DEFAULT_LOSSLESS_CHUNK_BYTES // row_bytes)


def to_planes(values: np.ndarray, dtype: str, transform: str) -> list[np.ndarray]:
    """Split storage-form values into byte planes, most significant byte first (spec §6.2)."""
    size = itemsize(dtype)
    u = np.ascontiguousarray(values).reshape(-1).view(_UINT[size])
    if transform == "float_planes":
        bits = 8 * size
        u = (u << _UINT[size](1)) | (u >> _UINT[size](bits - 1))
    b = u.astype(u.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1, size)
    return [np.ascontiguousarray(b[:, size - 1 - p]) for p in range(size)]


def from_planes(planes: list[np.ndarray], dtype: str, transform: str) -> np.ndarray:
    """Inverse of `to_planes`: return storage-form values."""
    size = itemsize(dtype)
    word = np.dtype(_UINT[size]).newbyteorder("<")
    if not planes:
        return np.zeros(0, storage_dtype(dtype))
    # Shift-and-or into whole words: about twice as fast as scattering bytes into an (n, size) array.
    u = planes[0].astype(word)
    for plane in planes[1:]:
        u <<= word.type(8)
        u |= plane
    if transform == "float_planes":
        r = u >> word.type(1)
        u <<= word.type(8 * size - 1)
        r |= u
        u = r
    return u.view(storage_dtype(dtype))


def encode_chunks(t: torch.Tensor, level: int | None = None) -> tuple[int, list[Callable[[], list[Payload]]]]:
    """Return (chunk_rows, one job per chunk returning its plane payloads)."""
    dtype = name_of(t.dtype)
    shape = list(t.shape)
    rows, row_size = rows_and_row_size(shape)
    chunk_rows = chunk_rows_for(shape, dtype)
    values = to_numpy(t).reshape(-1)
    transform = transform_for(dtype)
    if rows * row_size == 0:
        return chunk_rows, []

    def job(part: np.ndarray) -> Callable[[], list[Payload]]:
        return lambda: [entropy.compress(p.tobytes(), level) for p in to_planes(part, dtype, transform)]

    return chunk_rows, [job(values[a * row_size : b * row_size]) for a, b in chunk_row_ranges(rows, chunk_rows)]


def make_entry(t: torch.Tensor, chunk_rows: int, blobs: list[list[Blob]]) -> LosslessEntry:
    dtype = name_of(t.dtype)
    return LosslessEntry(
        dtype=dtype,
        shape=list(t.shape),
        codec=CODEC_ID,
        transform=transform_for(dtype),
        chunk_rows=chunk_rows,
        chunks=[LosslessChunk(planes=b) for b in blobs],
    )


def decode_chunk(entry: LosslessEntry, index: int, read: ReadBlob) -> np.ndarray:
    """Return chunk ``index``'s values in storage form, bit-exactly."""
    rows, row_size = rows_and_row_size(entry.shape)
    a, b = chunk_row_ranges(rows, entry.chunk_rows)[index]
    count = (b - a) * row_size
    planes = [
        np.frombuffer(read(blob, count, f"plane {p}"), dtype=np.uint8)
        for p, blob in enumerate(entry.chunks[index].planes)
    ]
    return from_planes(planes, entry.dtype, entry.transform)
