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

#: Elements merged per step in `from_planes`: 128K bf16 words (256 KiB) plus their planes and one
#: temporary word block (768 KiB in all) stay within the 1 MiB L2 of the test machine. Each step
#: is a handful of numpy calls, whose fixed cost is what smaller blocks pay: merging the SmolLM2
#: embedding's planes (28 M bf16, one core, best of 9) ran at 4.6 GB/s of output with 64K and
#: 5.9 with 128K (`python tools/bench_format.py`, codec rows).
_MERGE_BLOCK = 1 << 17


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


def from_planes(
    planes: list[np.ndarray], dtype: str, transform: str, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of `to_planes`: return storage-form values (in ``out``, if given: a contiguous
    1-D array of the planes' length in the storage dtype).

    Words are built in place, `_MERGE_BLOCK` elements at a time, while the block is in L1/L2:
    each plane is widened into the word block by a casting copy and or-ed in after the word is
    multiplied by 256 (a shift; numpy's multiply of unsigned words is vectorised, its shift by a
    scalar slower), and the float rotation is undone on the same block (``(w >> 1) | (w << bits-1)``
    with the left shift again as a multiply). Each output byte is written from cache, never
    re-read from memory, and nothing as large as the chunk is allocated.
    """
    size = itemsize(dtype)
    word = np.dtype(_UINT[size]).newbyteorder("<")
    n = planes[0].size if planes else 0
    if any(p.size != n for p in planes):
        raise ValueError(f"byte planes differ in length ({[p.size for p in planes]})")
    if out is None:
        out = np.empty(n, storage_dtype(dtype))
    elif out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable or out.dtype.itemsize != size:
        raise ValueError(f"out must be a writeable contiguous ({n},) array of {size}-byte elements")
    if len(planes) != size:
        raise ValueError(f"{dtype} needs {size} byte planes, got {len(planes)}")
    if n == 0:
        return out
    u = out.view(word)
    if size == 1:
        u[...] = planes[0]
        return out
    by_byte, to_top = word.type(256), word.type(1 << (8 * size - 1))
    rotate = transform == "float_planes"
    tmp = np.empty(min(n, _MERGE_BLOCK), word)
    for s in range(0, n, _MERGE_BLOCK):
        o = u[s : s + _MERGE_BLOCK]
        t = tmp[: o.size]
        np.copyto(o, planes[0][s : s + _MERGE_BLOCK], casting="unsafe")
        for plane in planes[1:]:
            np.multiply(o, by_byte, out=o)
            np.copyto(t, plane[s : s + _MERGE_BLOCK], casting="unsafe")
            np.bitwise_or(o, t, out=o)
        if rotate:  # rotate right by one bit: the sign goes back to the top
            np.right_shift(o, word.type(1), out=t)
            np.multiply(o, to_top, out=o)
            np.bitwise_or(o, t, out=o)
    return out


def encode_chunks(t: torch.Tensor, level: int | None = None) -> tuple[int, list[Callable[[], list[Payload]]]]:
    """Return (chunk_rows, one job per chunk returning its plane payloads)."""
    dtype = name_of(t.dtype)
    shape = list(t.shape)
    rows, row_size = rows_and_row_size(shape)
    chunk_rows = chunk_rows_for(shape, dtype)
    values = to_numpy(t).reshape(-1)
    transform = transform_for(dtype)
    kind = "float_planes" if transform == "float_planes" else "bytes"
    if rows * row_size == 0:
        return chunk_rows, []

    def job(part: np.ndarray) -> Callable[[], list[Payload]]:
        return lambda: [entropy.compress(p.tobytes(), level, kind) for p in to_planes(part, dtype, transform)]

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


def decode_chunk(
    entry: LosslessEntry,
    index: int,
    read: ReadBlob,
    out: np.ndarray | None = None,
    scratch: entropy.Scratch | None = None,
) -> np.ndarray:
    """Return chunk ``index``'s values in storage form, bit-exactly.

    ``out`` (a contiguous array of the chunk's size and storage dtype) receives them; with
    ``scratch``, zstd planes decode into its slots (``read`` must then accept ``out``) and raw
    planes are used where they lie, so nothing the size of the chunk is allocated."""
    rows, row_size = rows_and_row_size(entry.shape)
    a, b = chunk_row_ranges(rows, entry.chunk_rows)[index]
    count = (b - a) * row_size
    planes = []
    for p, blob in enumerate(entry.chunks[index].planes):
        if scratch is None:
            stored = read(blob, count, f"plane {p}")
        else:
            stored = read(blob, count, f"plane {p}", scratch.get(p, count))  # type: ignore[call-arg]
        planes.append(np.frombuffer(stored, dtype=np.uint8))
    if out is not None and out.dtype != storage_dtype(entry.dtype):
        raise ValueError(f"out has dtype {out.dtype}, expected {storage_dtype(entry.dtype)}")
    return from_planes(planes, entry.dtype, entry.transform, out)
