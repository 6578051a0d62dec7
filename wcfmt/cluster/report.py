"""Quality figures of a clustered tensor (spec §5.6): relative error, SQNR, label entropy, mean K.

The figures are informative only. They are computed in float64 against the tensor *as it
rebuilds* (in its own dtype, spec §5.5), so they measure what a reader gets back.

`cluster_tensor` fills them from the value histograms it already holds (per distinct value:
count, value and rebuilt value), which costs O(distinct values) rather than a pass over the
weights; `quality` computes the same figures from two tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..dtypes import from_numpy, name_of, to_numpy
from ..errors import UsageError
from ..schema import rows_and_row_size

__all__ = ["ChunkStats", "SQNR_CAP_DB", "quality", "combine"]

#: SQNR reported for an exact rebuild (no error): the header is strict JSON, which has no
#: infinity, and float64 cannot resolve error powers below ~1e-32 of the signal anyway.
SQNR_CAP_DB: Final[float] = 300.0


@dataclass(frozen=True)
class ChunkStats:
    """What one row chunk contributes: element count, Σ w², Σ (w − ŵ)², and label counts."""

    n: int
    sum_sq: float
    err_sq: float
    label_counts: np.ndarray

    @classmethod
    def from_histogram(cls, x: np.ndarray, count: np.ndarray, rebuilt: np.ndarray, bounds: np.ndarray) -> "ChunkStats":
        """Stats from sorted distinct values ``x`` occurring ``count`` times, where
        ``x[bounds[c]:bounds[c+1]]`` rebuild as ``rebuilt[c]``."""
        cnt = count.astype(np.float64)
        d = x - np.repeat(rebuilt, np.diff(bounds))
        cum = np.concatenate(([0], np.cumsum(count)))
        return cls(
            n=int(cum[-1]),
            sum_sq=float(np.dot(cnt, x * x)),
            err_sq=float(np.dot(cnt, d * d)),
            label_counts=np.diff(cum[bounds]).astype(np.float64),
        )


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0" for a single label


def combine(stats: list[ChunkStats]) -> dict[str, float]:
    """Combine per-chunk stats into the header's quality figures.

    ``rel_error`` = ‖W−Ŵ‖/‖W‖ (0 for an all-zero W); ``sqnr_db`` = 10·log10(‖W‖²/‖W−Ŵ‖²), at most
    `SQNR_CAP_DB`; ``label_entropy_bits`` = each chunk's empirical label entropy weighted by its
    element count; ``k_mean`` = mean K over chunks.

    >>> s = ChunkStats(4, 4.0, 0.04, np.array([2.0, 2.0]))
    >>> combine([s])
    {'rel_error': 0.1, 'sqnr_db': 20.0, 'label_entropy_bits': 1.0, 'k_mean': 2.0}
    """
    if not stats:
        return {"rel_error": 0.0, "sqnr_db": SQNR_CAP_DB, "label_entropy_bits": 0.0, "k_mean": 0.0}
    n = sum(s.n for s in stats)
    sum_sq = math.fsum(s.sum_sq for s in stats)
    err_sq = math.fsum(s.err_sq for s in stats)
    rel = math.sqrt(err_sq / sum_sq) if sum_sq > 0 else 0.0
    sqnr = SQNR_CAP_DB if err_sq == 0 or sum_sq == 0 else min(SQNR_CAP_DB, 10 * math.log10(sum_sq / err_sq))
    entropy = math.fsum(s.n * _entropy_bits(s.label_counts) for s in stats) / n if n else 0.0
    return {
        "rel_error": rel,
        "sqnr_db": sqnr,
        "label_entropy_bits": entropy,
        "k_mean": sum(s.label_counts.size for s in stats) / len(stats),
    }


def quality(original: torch.Tensor, clustered: ClusteredTensor) -> dict[str, float]:
    """Return ``rel_error``, ``sqnr_db``, ``label_entropy_bits`` and ``k_mean`` of ``clustered`` against ``original``.

    >>> ct = ClusteredTensor(labels=torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8),
    ...                      centroids=[torch.tensor([0.0, 1.0], dtype=torch.float16)],
    ...                      chunk_rows=2, dtype=torch.float32)
    >>> quality(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), ct)["rel_error"]
    0.0
    """
    if tuple(original.shape) != tuple(clustered.shape):
        raise UsageError(f"shapes differ: original {tuple(original.shape)}, clustered {tuple(clustered.shape)}")
    # Chunk by chunk (`ClusteredTensor.chunk_values`): memory is a chunk's float64 copies, not
    # the whole matrix's (an 8B model's embedding: 4 GB each).
    flat = original.detach().cpu().reshape(-1)
    name = name_of(clustered.dtype)
    labels = to_numpy(clustered.labels).reshape(-1)
    _, row_size = rows_and_row_size(tuple(clustered.shape))
    stats = []
    for i, (table, (a, b)) in enumerate(zip(clustered.centroids, clustered.row_ranges())):
        s = slice(a * row_size, b * row_size)
        w = flat[s].to(torch.float64).numpy()
        w_hat = from_numpy(clustered.chunk_values(i), name).to(torch.float64).numpy()
        stats.append(
            ChunkStats(
                n=s.stop - s.start,
                sum_sq=float(np.dot(w, w)),
                err_sq=float(np.dot(w - w_hat, w - w_hat)),
                label_counts=np.bincount(labels[s], minlength=table.numel()).astype(np.float64),
            )
        )
    return combine(stats)
