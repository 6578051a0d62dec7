"""The clustered rebuild as one Triton kernel launch per batch of row chunks (spec §5.5).

Beside it, `torch_gather.rebuild_chunks_torch` is the same computation in plain torch and the
tests compare both, bit for bit, with the numpy reference (`TRITON_INTERPRET=1` on the CPU).

The kernel only unpacks and gathers bit patterns: centroid tables are converted to the output
dtype on the host (`reference.centroids_as`, a few hundred bytes per chunk) and gathered as
int16 / int32. Converting fp16 to bf16 inside the kernel would be cheaper to ship but is not
bit-safe everywhere: Triton's interpreter does not round fp16/fp32 -> bf16 as torch does.

Triton is optional (absent on non-x86 platforms): nothing here imports it until a kernel is
first launched, and `backend.triton_available()` says whether that can work.

Launch layout: grid axis 0 walks blocks of ``BLOCK`` values inside a chunk, axis 1 walks the
batch's chunks (CUDA allows 2**31 - 1 blocks on axis 0 but only 65,535 on axis 1, so batches
are split at `_MAX_CHUNKS_PER_LAUNCH`). Per-chunk metadata is one int64 row
``(label_offset, out_offset, count, label_bits, table_offset)``. When every chunk of a launch
has the same label width it is passed as a compile-time constant, so shifts and masks fold.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .backend import ChunkSpec
from .torch_gather import bits_view

__all__ = ["rebuild_chunks_triton"]

_MAX_CHUNKS_PER_LAUNCH = 65_535
_kernels: dict[bool, Any] = {}


def _kernel() -> Any:
    """Build (once per interpreter setting: it is read when the kernel is defined) the jitted kernel."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    k = _kernels.get(interpret)
    if k is not None:
        return k
    import triton
    import triton.language as tl

    @triton.jit
    def _rebuild(packed_ptr, tables_ptr, meta_ptr, out_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        chunk = tl.program_id(1)
        row = meta_ptr + chunk * 5
        count = tl.load(row + 2)
        start = tl.program_id(0) * BLOCK
        if start < count:
            label_offset = tl.load(row + 0)
            out_offset = tl.load(row + 1)
            table_offset = tl.load(row + 4)
            i = start + tl.arange(0, BLOCK)  # int32: one chunk holds < 2**31 values (checked on the host)
            m = i < count
            if BITS >= 0:
                bits = BITS
            else:
                bits = tl.load(row + 3).to(tl.int32)
            # label width 1, 2, 4, 8 -> log2 0..3; 8 // bits labels per byte = 2**(3 - log2)
            log_b = (bits >= 2).to(tl.int32) + (bits >= 4).to(tl.int32) + (bits >= 8).to(tl.int32)
            per_shift = 3 - log_b
            has_labels = m & ((i * 0 + bits) > 0)  # a tensor mask whether bits is constexpr or loaded
            byte = tl.load(packed_ptr + label_offset + (i >> per_shift), mask=has_labels, other=0)
            shift = (i & ((1 << per_shift) - 1)) << log_b
            label = (byte.to(tl.int32) >> shift) & ((1 << bits) - 1)  # bits = 0: K = 1, label 0
            value = tl.load(tables_ptr + table_offset + label, mask=m, other=0)
            tl.store(out_ptr + out_offset + i, value, mask=m)

    _kernels[interpret] = _rebuild
    return _rebuild


def rebuild_chunks_triton(
    packed: torch.Tensor,
    tables: torch.Tensor,
    chunks: Sequence[ChunkSpec],
    out: torch.Tensor,
    *,
    meta: torch.Tensor | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """Write every chunk's ``table[label]`` values into the flat tensor ``out``; return ``out``.

    Same contract as `torch_gather.rebuild_chunks_torch`: ``packed`` (uint8), ``tables`` (output
    dtype or same-width integers) and ``out`` on one device; labels already checked < K.
    ``meta``, if given, is ``chunks`` as an int64 (n, 5) tensor already on the device (the
    streaming loader ships it with the labels in one copy). The launch is asynchronous on the
    current CUDA stream.
    """
    flat = bits_view(out.reshape(-1))
    tab = bits_view(tables.reshape(-1))
    if tab.dtype != flat.dtype:
        raise ValueError(f"tables ({tables.dtype}) and out ({out.dtype}) differ in width")
    if max((c.count for c in chunks), default=0) >= 2**31:
        raise ValueError("a chunk of 2**31 or more values is too large for the Triton kernel; use the torch backend")
    if meta is not None:
        if tuple(meta.shape) != (len(chunks), 5) or meta.dtype != torch.int64:
            raise ValueError(f"meta must be an int64 ({len(chunks)}, 5) tensor, got {meta.dtype} {tuple(meta.shape)}")
    for s in range(0, len(chunks), _MAX_CHUNKS_PER_LAUNCH):
        part = chunks[s : s + _MAX_CHUNKS_PER_LAUNCH]
        longest = max(c.count for c in part)
        if longest == 0:
            continue
        if meta is not None:
            rows = meta[s : s + len(part)]
        else:
            rows = torch.tensor([list(c) for c in part], dtype=torch.int64)
            if packed.device.type == "cuda":
                rows = rows.pin_memory().to(packed.device, non_blocking=True)
            else:
                rows = rows.to(packed.device)
        widths = {c.label_bits for c in part}
        grid = (-(-longest // block), len(part))
        bits = widths.pop() if len(widths) == 1 else -1
        _kernel()[grid](packed.reshape(-1), tab, rows, flat, BITS=bits, BLOCK=block)
    return out
