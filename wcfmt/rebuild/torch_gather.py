"""The clustered rebuild in plain torch (spec §5.5): the device fallback and the Triton kernel's reference.

Same inputs as `triton_kernel.rebuild_chunks_triton`: one batch of row chunks whose packed label
planes are concatenated in ``packed`` (uint8) and whose centroid tables, already converted to
the output dtype on the host (`reference.centroids_as`), are concatenated in ``tables``. The
gather moves bit patterns (int16 / int32), never floats, so nothing rounds on the device.
Works on any device torch supports; used where Triton or CUDA is missing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backend import ChunkSpec

__all__ = ["rebuild_chunks_torch", "bits_view"]

#: Labels unpacked per step: bounds the int64 index temporary (8 bytes per label) to 32 MiB.
_STEP = 1 << 22

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` viewed as same-width integers (bf16/fp16 -> int16, fp32 -> int32, ...)."""
    want = _BITS[t.element_size()]
    return t if t.dtype == want else t.view(want)


def rebuild_chunks_torch(
    packed: torch.Tensor,
    tables: torch.Tensor,
    chunks: Sequence[ChunkSpec],
    out: torch.Tensor,
) -> torch.Tensor:
    """Write every chunk's ``table[label]`` values into the flat tensor ``out``; return ``out``.

    ``tables`` and ``out`` have the same element width (bf16/fp16 or int16: 2 bytes; fp32 or
    int32: 4; any width works) and live on ``packed``'s device. Labels must already be checked < K (as
    `WclustReader.read_labels` returns them): an out-of-range label raises IndexError here only
    when it falls outside the whole ``tables`` tensor.
    """
    flat = bits_view(out.reshape(-1))
    tab = bits_view(tables.reshape(-1))
    packed = packed.reshape(-1)
    for c in chunks:
        if c.count == 0:
            continue
        dst = flat[c.out_offset : c.out_offset + c.count]
        if c.label_bits == 0:
            dst.fill_(tab[c.table_offset])
            continue
        per = 8 // c.label_bits
        step = _STEP - _STEP % per
        shifts = torch.arange(0, 8, c.label_bits, dtype=torch.uint8, device=packed.device)
        mask = (1 << c.label_bits) - 1
        for s in range(0, c.count, step):
            n = min(step, c.count - s)
            first = c.label_offset + s // per
            raw = packed[first : first + -(-n // per)]
            if per == 1:
                labels = raw
            else:
                labels = ((raw[:, None] >> shifts) & mask).reshape(-1)[:n]
            idx = labels.to(torch.int64) + c.table_offset
            torch.index_select(tab, 0, idx, out=dst[s : s + n])
    return out
