"""Weight clustering: turn a torch weight into a `ClusteredTensor`, and decide which weights to cluster.

>>> import torch
>>> from wcfmt.cluster import cluster_tensor
>>> w = torch.tensor([[0.0, 0.1, 1.0, 1.1], [0.0, 0.0, 1.0, 1.0]], dtype=torch.bfloat16)
>>> ct = cluster_tensor(w, k=2)
>>> ct.ks, ct.labels.tolist()
([2], [[0, 0, 1, 1], [0, 0, 1, 1]])
>>> sorted(ct.quality)
['k_mean', 'label_entropy_bits', 'rel_error', 'sqnr_db']
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..constants import DEFAULT_STORAGE_CHUNK_ROWS
from ..dtypes import CLUSTERABLE, from_numpy, name_of, to_numpy
from ..errors import UsageError
from ..schema import chunk_row_ranges, rows_and_row_size
from .kmeans import (
    METHODS,
    ValueHistogram,
    assign_labels,
    cluster_values,
    label_bounds,
    lloyd_kmeans_1d,
    optimal_kmeans_1d,
    round_centroids,
    solve_centroids,
    value_histogram,
)
from .ecsq import (
    CELL_ENTRY_BITS,
    TABLE_ENTRY_BITS,
    dp_cells,
    ecsq_cells,
    equal_slope_scales,
    slope_of_step,
    step_for_bits,
    table_for_cells,
)
from .policy import DEFAULT_CHUNK_ROWS, DEFAULT_K, ClusterPolicy
from .report import ChunkStats, combine, quality

__all__ = [
    "cluster_tensor",
    "cluster_values",
    "ClusterPolicy",
    "DEFAULT_K",
    "DEFAULT_CHUNK_ROWS",
    "METHODS",
    "ECSQ_METHODS",
    "table_entry_bits",
    "quality",
    "optimal_kmeans_1d",
    "lloyd_kmeans_1d",
]

#: Methods of the entropy-constrained encoder (``bits=`` / ``step=``); the first is the default.
ECSQ_METHODS: tuple[str, ...] = ("uniform", "dp")

#: Most F32 elements whose histograms are held at once (about 400 MiB of them).
_F32_WAVE = 1 << 24

_T = TypeVar("_T")
_R = TypeVar("_R")


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _importance_array(importance: torch.Tensor | np.ndarray | None, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """Return (float64 importance, how it spreads: ``"full"``, ``"column"`` or ``"row"``) after
    checking its shape against the weight's."""
    if importance is None:
        return None, "full"
    imp = importance.detach().cpu().to(torch.float64).numpy() if isinstance(importance, torch.Tensor) else np.asarray(importance, dtype=np.float64)
    if tuple(imp.shape) == shape:
        spread = "full"
    elif len(shape) >= 1 and imp.ndim == 1 and imp.shape[0] == shape[-1]:
        spread = "column"
    elif len(shape) >= 2 and imp.shape == (shape[0],) + (1,) * (len(shape) - 1):
        spread = "row"
    else:
        want = (f"{shape}, ({shape[-1]},) or ({shape[0]}{', 1' * (len(shape) - 1)})" if len(shape) >= 2
                else f"{shape} or ({shape[-1]},)" if shape else f"{shape}")  # fmt: skip
        raise UsageError(f"importance has shape {tuple(imp.shape)}; need the weight's shape {want}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise UsageError("importance must be finite and >= 0")
    return imp, spread


def _run(threads: int, fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    if threads <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def cluster_tensor(
    t: torch.Tensor,
    k: int | None = None,
    chunk_rows: int | None = None,
    *,
    bits: float | None = None,
    step: float | None = None,
    importance: torch.Tensor | None = None,
    method: str | None = None,
    threads: int | None = None,
) -> ClusteredTensor:
    """Cluster a weight: every row chunk gets its own table of at most 256 fp16 centroids.

    Give exactly one of:

    - ``k``: at most ``k`` centroids per chunk, the least squared error (exact 1-D k-means);
    - ``bits``: entropy-constrained clustering (`wcfmt.cluster.ecsq`) to at most ``bits``
      stored bits per weight on average (labels after zstd, modelled at 1.011× their entropy,
      plus tables counted once per 256-row storage chunk, as `wcfmt pack` stores them): cells
      of one width over the whole tensor (equal slope), centroids their exact means;
    - ``step``: the same encoder at a given cell width (what `wcfmt pack`'s model-wide
      allocation hands each tensor).

    Other arguments:

    - ``t``: an F32/F16/BF16 tensor of any shape; rows are dimension 0 (a 1-D tensor has one
      element per row, a 0-d tensor one row).
    - ``chunk_rows``: rows per chunk; None means one table for the whole tensor.
    - ``importance``: optional weights ≥ 0 of the squared error, either of ``t``'s shape, one
      per input column (length ``t.shape[-1]``, broadcast over rows, e.g. E[x_j²] from
      calibration activations), or one per row (shape ``(rows, 1)``, broadcast along each row,
      e.g. token frequencies for an embedding, `wcfmt.cluster.token_weights`). With
      ``bits``/``step`` each chunk's cells are ``1/√ω`` as wide, ω its mean importance, so
      chunks of important rows get more bits. A chunk whose importance is all zero is
      clustered unweighted.
    - ``method``: with ``k``, ``"exact"`` (default, the optimal clustering) or ``"lloyd"`` (for
      comparisons); with ``bits``/``step``, ``"uniform"`` (default: uniform cells, then
      Lagrangian merges) or ``"dp"`` (the exact ECSQ programme at the same slope, O(M²) per
      chunk: the reference).
    - ``threads``: worker threads over chunks (numpy releases the GIL); None = all CPUs
      this process may use. The result does not depend on it.

    The result's ``quality`` holds ``rel_error``, ``sqnr_db``, ``label_entropy_bits`` and
    ``k_mean`` (see `wcfmt.cluster.report`), and with ``bits``/``step`` also ``step`` and
    ``lambda`` (the slope: weighted squared error per bit). Raises `UsageError` on bad
    arguments, NaN/inf values, or a centroid outside the fp16 range.

    >>> w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    >>> ct = cluster_tensor(w, bits=4.0)
    >>> 3.9 < ct.quality["label_entropy_bits"] < 4.0, ct.ks[0] <= 256
    (True, True)
    """
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"cluster_tensor needs a torch.Tensor, got {type(t).__name__}")
    try:
        dtype = name_of(t.dtype)
    except KeyError:
        dtype = str(t.dtype)
    if dtype not in CLUSTERABLE:
        raise UsageError(f"cannot cluster dtype {t.dtype}: need float32, float16 or bfloat16")
    given = [n for n, v in (("k", k), ("bits", bits), ("step", step)) if v is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of k, bits or step (got {', '.join(given) or 'none'})")
    ecsq_mode = k is None
    if not ecsq_mode and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 256):
        raise UsageError(f"k must be an integer in 1..256, got {k!r}")
    for what, v in (("bits", bits), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise UsageError(f"{what} must be a positive number, got {v!r}")
    if bits is not None and bits > 16:
        raise UsageError(f"bits must be at most 16 (labels are at most 8 bits, tables 16), got {bits!r}")
    methods = ECSQ_METHODS if ecsq_mode else METHODS
    if method is None:
        method = methods[0]
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise UsageError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    if method not in methods:
        raise UsageError(f"method must be one of {methods} with {given[0]}, got {method!r}")
    if threads is None:
        threads = _default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer or None, got {threads!r}")

    shape = tuple(t.shape)
    rows, row_size = rows_and_row_size(shape)
    cr = max(1, rows) if chunk_rows is None else chunk_rows
    imp, spread = _importance_array(importance, shape)
    values = to_numpy(t).reshape(-1)
    labels = np.empty(values.size, dtype=np.uint8)
    ranges = [] if values.size == 0 else chunk_row_ranges(rows, cr)

    def chunk_importance(a: int, b: int) -> np.ndarray | None:
        if imp is None:
            return None
        if spread == "column":  # one row's weights, repeated along the chunk by the histogram
            return np.tile(imp, row_size // imp.size)
        if spread == "row":  # one weight per row, repeated along the row
            return np.repeat(imp.reshape(-1)[a:b], row_size)
        return imp.reshape(-1)[a * row_size : b * row_size]

    def histogram(i: int) -> ValueHistogram:
        a, b = ranges[i]
        try:
            return value_histogram(values[a * row_size : b * row_size], dtype, chunk_importance(a, b))
        except UsageError as e:
            raise UsageError(f"chunk {i} (rows {a}..{b - 1}): {e}") from e

    def finish(i: int) -> tuple[torch.Tensor, ChunkStats]:
        a, b = ranges[i]
        try:
            table, rebuilt = round_centroids(centroids[i], dtype)
        except UsageError as e:
            raise UsageError(f"chunk {i} (rows {a}..{b - 1}): {e}") from e
        assign_labels(values[a * row_size : b * row_size], dtype, rebuilt, out=labels[a * row_size : b * row_size])
        h = hists[i]
        stats = ChunkStats.from_histogram(h.x, h.count, rebuilt, label_bounds(h, rebuilt))
        return from_numpy(table, "F16"), stats

    if ecsq_mode:
        hists = dict(enumerate(_run(threads, histogram, list(range(len(ranges))))))
        return _finish_ecsq(t, shape, cr, ranges, row_size, values, labels, hists, bits, step, method, threads)

    # Chunks go in waves: a 16-bit chunk's histogram is tiny, so one wave holds them all; an F32
    # one holds every distinct value (24 bytes each), so waves stop at _F32_WAVE elements.
    waves: list[list[int]] = []
    size = 0
    for i, (a, b) in enumerate(ranges):
        if not waves or (dtype == "F32" and size + (b - a) * row_size > _F32_WAVE):
            waves.append([])
            size = 0
        waves[-1].append(i)
        size += (b - a) * row_size
    hists: dict[int, ValueHistogram] = {}
    centroids: dict[int, np.ndarray] = {}
    done: list[tuple[torch.Tensor, ChunkStats]] = []
    for wave in waves:
        hists = dict(zip(wave, _run(threads, histogram, wave)))
        # One batched solve per worker: batching shares numpy's per-call cost across chunks,
        # and results do not depend on how chunks are grouped.
        groups = [wave[g::threads] for g in range(min(threads, len(wave)))]
        solved = _run(threads, lambda g: solve_centroids([hists[i] for i in g], k, method), groups)
        centroids = {i: c for g, cs in zip(groups, solved) for i, c in zip(g, cs)}
        done += _run(threads, finish, wave)
    return _assemble(t, shape, cr, labels, done)


def _assemble(
    t: torch.Tensor, shape: tuple[int, ...], cr: int, labels: np.ndarray, done: list[tuple[torch.Tensor, ChunkStats]],
    **extra_quality: float,
) -> ClusteredTensor:
    """The ClusteredTensor of finished chunks (table, stats), quality combined over them."""
    return ClusteredTensor(
        labels=from_numpy(labels, "U8").reshape(shape),
        centroids=[tbl for tbl, _ in done],
        chunk_rows=cr,
        dtype=t.dtype,
        shape=torch.Size(shape),
        quality={**combine([s for _, s in done]), **extra_quality},
    )


def table_entry_bits(codebook_rows: int, rows: int) -> float:
    """Stored bits of one table entry of a codebook of ``codebook_rows`` rows (of ``rows``): pack
    stores a codebook in storage chunks of at most DEFAULT_STORAGE_CHUNK_ROWS rows, each
    carrying a copy of its table (`wcfmt.convert.cluster_for_storage`)."""
    span = min(codebook_rows, max(rows, 1))
    return float(TABLE_ENTRY_BITS * max(1, -(-span // DEFAULT_STORAGE_CHUNK_ROWS)))


def _finish_ecsq(
    t: torch.Tensor, shape: tuple[int, ...], cr: int, ranges: list[tuple[int, int]], row_size: int,
    values: np.ndarray, labels: np.ndarray, hists: dict[int, ValueHistogram], bits: float | None,
    step: float | None, method: str, threads: int,
) -> ClusteredTensor:
    """The entropy-constrained path of `cluster_tensor`: one slope for every chunk."""
    dtype = name_of(t.dtype)
    rows = rows_and_row_size(shape)[0]
    entry = [table_entry_bits(b - a, rows) for a, b in ranges]
    scales = equal_slope_scales([hists[i] for i in range(len(ranges))])  # step_c = s/√ω_c
    if step is None:
        assert bits is not None
        from .allocate import coarse_histogram  # F32: bisect on ≤ 8,192 grid cells, not every value

        step = step_for_bits([coarse_histogram(hists[i]) for i in range(len(ranges))], float(bits), entry, scales)
    lam = slope_of_step(step)

    def finish(i: int) -> tuple[torch.Tensor, ChunkStats]:
        a, b = ranges[i]
        h = hists[i]
        if h.x.size == 0:
            raise UsageError(f"chunk {i} (rows {a}..{b - 1}) has no values of nonzero weight")
        if method == "dp":
            cells = dp_cells(h, lam, CELL_ENTRY_BITS)
        else:
            cells = ecsq_cells(h, step * scales[i], CELL_ENTRY_BITS)
        try:
            table, rebuilt, bounds, cuts = table_for_cells(h, cells, dtype)
        except UsageError as e:
            raise UsageError(f"chunk {i} (rows {a}..{b - 1}): {e}") from e
        part = slice(a * row_size, b * row_size)
        assign_labels(values[part], dtype, rebuilt, out=labels[part], cuts=cuts)
        return from_numpy(table, "F16"), ChunkStats.from_histogram(h.x, h.count, rebuilt, bounds)

    done = _run(threads, finish, list(range(len(ranges))))
    return _assemble(t, shape, cr, labels, done, step=float(step), **{"lambda": float(lam)})
