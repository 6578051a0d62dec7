"""Entropy-constrained scalar quantisation (ECSQ) of value histograms: clustering to a bit budget.

wcfmt entropy-codes its label planes (spec §5.3, §7), so what a clustered weight costs on disk is
its label's *information*, not ``log2 K``. The objective that matches the format is therefore the
entropy-constrained one, over interval partitions ("cells") of a sorted value histogram::

    J = Σ_cells Σ_{x in cell} w(x)·(x − c)²  +  λ · ( Σ_cells n_c·(−log2 n_c/N) + β·#cells )

with ``c`` the cell's weighted mean, ``n_c`` its element count (label frequency), ``N`` the total,
``β`` the stored bits of one table entry (16 × the number of storage chunks that repeat the
table) and at most 256 cells (8-bit labels).

Two solvers live here:

- `ecsq_dp`: the exact minimiser of ``J`` for a given λ (optionally with a cap on the number of
  cells), a dynamic programme over the histogram, O(M²) (O(K·M²) with a cap). It is the
  reference: tests check it against brute force, and `tools/bench_cluster.py` against the fast
  path.
- `uniform_cells` + `merge_cells`: the fast path. A uniform mid-tread quantiser (cells of width
  ``step`` centred on multiples of ``step``) is within a small fraction of a dB of the ECSQ
  optimum at these rates (measured on SmolLM2's matrices, and by `tools/bench_cluster.py
  --ecsq-vs-dp`); the centroid of each cell is its exact weighted mean. Adjacent cells are then
  merged greedily, cheapest Lagrangian increase first, while a merge lowers ``J`` (a rare value
  whose table entry costs more than it saves) or while there are more than ``k_max`` cells: the
  cap is part of the optimisation, not a clip of the tails.

For uniform cells the slope of the distortion-rate curve is ``λ = ω·step²·ln2/6`` (high-rate
theory, ``ω`` the mean importance), so one λ for many tensors (the equal-slope condition that
minimises total weighted error for a total number of bits) is one step for all of them, scaled by
``1/√ω``: that is how `wcfmt.cluster.allocate` spreads a model-wide bit budget.

Rate model. The Lagrangian ``J`` charges a label its information (−log2 p), but what the budget
pays is what zstd stores: its Huffman literal coder, whose code lengths are whole bits. Stored
label bits are therefore modelled as ``ZSTD_OVERHEAD`` × the length of an ideal Huffman code
(`huffman_bits`, lengths capped at zstd's 11): at 2.5 bits/label the Huffman code alone is 2.3%
over the entropy, at 4.5 bits 0.7%, and zstd lands 1.0–1.6% over the Huffman code
(``tools/bench_format.py --labels``). Tables are raw fp16.

Everything is float64 elementwise, `cumsum` or `reduceat` in a fixed order, so results are
bit-identical across machines, thread counts and batching.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from ..constants import MAX_K
from ..errors import UsageError
from .kmeans import ValueHistogram, rebuilt_of_each, round_centroids

__all__ = [
    "ZSTD_OVERHEAD",
    "TABLE_ENTRY_BITS",
    "CELL_ENTRY_BITS",
    "CellStats",
    "cell_stats",
    "uniform_cells",
    "merge_cells",
    "ecsq_cells",
    "lagrangian",
    "rate_bits",
    "huffman_bits",
    "slope_of_step",
    "equal_slope_scales",
    "step_for_bits",
    "ecsq_dp",
    "dp_cells",
    "table_for_cells",
]

#: Stored label bits per bit of an ideal Huffman code of the labels (measured 1.010–1.016 at 2.5–6.5
#: bits/label by tools/bench_format.py --labels: zstd's four streams, block headers, 11-bit cap).
ZSTD_OVERHEAD: Final[float] = 1.012

#: Table-entry bits charged in the cell choice (``J``'s β term) by the encoder. The exact optimum
#: charges each entry what it costs on disk (16 bits × the storage chunks that repeat the table),
#: and then merges the rare tail cells into their neighbours: the least squared error per bit,
#: but it clips exactly the few large weights small LLMs depend on. Measured on SmolLM2-135M
#: (tools/eval_smollm2.py, projections at 5.5 bits): 1.041× bf16 perplexity charging entries,
#: 1.028× not charging them, for 0.02 more bits/weight. So the encoder does not charge them (the
#: rate model that meets the budget still counts every table byte); `ecsq_dp` and `merge_cells`
#: keep the parameter for the exact objective and its tests.
CELL_ENTRY_BITS: Final[float] = 0.0

#: zstd's longest Huffman code for literals (HUF_TABLELOG_MAX at its default).
_HUF_MAX_BITS: Final[int] = 11

#: Bits of one centroid table entry (raw fp16, spec §5.4).
TABLE_ENTRY_BITS: Final[int] = 16

#: Bisection of `step_for_bits` stops when the step is known to this relative precision (the cells,
#: and so the bytes, stop changing long before: tools/bench_cluster.py --profile), or after
#: `_BISECT_STEPS` halvings.
_STEP_RTOL: Final[float] = 1e-7
_BISECT_STEPS: Final[int] = 48


@dataclass(frozen=True)
class CellStats:
    """Per-cell sums over a histogram partition ``bounds`` (cell c = points bounds[c]:bounds[c+1]).

    ``n``: element counts (label frequencies); ``w``: total importance; ``mean``: weighted mean
    (the cell's centroid before rounding); ``sse``: weighted squared error about the mean.
    """

    bounds: np.ndarray
    n: np.ndarray
    w: np.ndarray
    mean: np.ndarray
    sse: np.ndarray


def _shift(h: ValueHistogram) -> float:
    # Centre the values before squaring, as the k-means DP does, so sums of squares stay accurate.
    return float(h.x[h.x.size // 2]) if h.x.size else 0.0


def cell_stats(h: ValueHistogram, bounds: np.ndarray) -> CellStats:
    """Counts, weights, weighted means and squared errors of the cells ``bounds`` over ``h``."""
    bounds = np.asarray(bounds, dtype=np.int64)
    s = _shift(h)
    xs = h.x - s
    starts = bounds[:-1]
    n = np.add.reduceat(h.count.astype(np.float64), starts)
    w = np.add.reduceat(h.weight, starts)
    wx = np.add.reduceat(h.weight * xs, starts)
    wxx = np.add.reduceat(h.weight * xs * xs, starts)
    mean_s = wx / w
    sse = np.maximum(wxx - wx * mean_s, 0.0)
    return CellStats(bounds, n, w, mean_s + s, sse)


def _label_bits(n: np.ndarray, total: float) -> float:
    """Σ n·(−log2 n/N): the order-0 entropy of the labels, in bits, for all N elements."""
    return float(np.dot(n, np.log2(total) - np.log2(n)))


def huffman_bits(n: np.ndarray) -> float:
    """Σ n·len: the bits of an ideal Huffman code of symbols with counts ``n``, every length capped
    at zstd's 11 bits (one symbol: 1 bit each).

    >>> huffman_bits(np.array([2.0, 1.0, 1.0]))   # lengths 1, 2, 2
    6.0
    """
    a = np.asarray(n, dtype=np.float64).ravel()
    counts = a[a > 0].tolist()
    m = len(counts)
    if m <= 1:
        return float(sum(counts))
    # Called ~30 times per tensor by `step_for_bits` (most of a pack's allocation time): the
    # two-queue construction, not a heap. Leaves sorted by (count, index) and merged nodes, made
    # in order of weight and numbered m, m+1, …, are each already in (count, index) order, so
    # the smaller of the two heads is what a heap of (count, index) would pop: the same tree,
    # the same capped lengths, at a third of the time.
    order = np.argsort(np.asarray(counts), kind="stable").tolist()
    leaf_w = [counts[i] for i in order]
    merged_w: list[float] = []
    parent = [-1] * (2 * m - 1)
    p = q = 0
    for node in range(m, 2 * m - 1):
        pair = 0.0
        for _ in range(2):
            # a merged node wins only when strictly lighter: on equal counts the leaf's index is smaller
            if q < len(merged_w) and (p >= m or merged_w[q] < leaf_w[p]):
                pair += merged_w[q]
                parent[m + q] = node
                q += 1
            else:
                pair += leaf_w[p]
                parent[order[p]] = node
                p += 1
        merged_w.append(pair)
    depth = [0] * (2 * m - 1)
    for v in range(2 * m - 3, -1, -1):  # parents are numbered after their children
        depth[v] = depth[parent[v]] + 1
    cap = _HUF_MAX_BITS
    return float(sum([c * (d if d < cap else cap) for c, d in zip(counts, depth)]))


def rate_bits(stats: CellStats, entry_bits: float) -> float:
    """Modelled stored bits of labels (`huffman_bits` × `ZSTD_OVERHEAD`) plus tables (``entry_bits``
    per cell)."""
    return ZSTD_OVERHEAD * huffman_bits(stats.n) + entry_bits * stats.n.size


def lagrangian(stats: CellStats, lam: float, entry_bits: float) -> float:
    """``J = D + λ·R`` of a partition, with the rate as `ecsq_dp` counts it (entropy, no overhead)."""
    total = float(stats.n.sum())
    return float(stats.sse.sum()) + lam * (_label_bits(stats.n, total) + entry_bits * stats.n.size)


def equal_slope_scales(hists: list[ValueHistogram]) -> list[float]:
    """Per histogram the factor ``1/√ω`` (ω its mean importance) that puts cells of width
    ``s/√ω`` at one slope λ for a common ``s`` (`slope_of_step`); 1 for an empty histogram."""
    return [1.0 / math.sqrt(float(h.weight.sum() / h.count.sum())) if h.x.size else 1.0 for h in hists]


def slope_of_step(step: float, mean_weight: float = 1.0) -> float:
    """λ (weighted squared error per bit) at which a uniform quantiser of ``step`` is optimal."""
    return mean_weight * step * step * math.log(2.0) / 6.0


def uniform_cells(h: ValueHistogram, step: float) -> np.ndarray:
    """Bounds of the occupied cells of a mid-tread uniform quantiser of width ``step`` over ``h``.

    A value ``x`` falls in cell ``floor(x/step + 1/2)``: cells are centred on multiples of
    ``step``, so 0 sits in the middle of a cell (the common value of a weight matrix).

    >>> from wcfmt.cluster.kmeans import ValueHistogram
    >>> h = ValueHistogram("F32", np.array([-1.0, -0.1, 0.0, 0.2, 0.9]), np.ones(5, dtype=np.int64), np.ones(5))
    >>> uniform_cells(h, 1.0).tolist()
    [0, 1, 4, 5]
    """
    if not (step > 0 and math.isfinite(step)):
        raise UsageError(f"step must be a positive finite number, got {step!r}")
    q = np.floor(h.x / step + 0.5)
    cut = np.flatnonzero(q[1:] != q[:-1]) + 1
    return np.concatenate(([0], cut, [h.x.size])).astype(np.int64)


def merge_cells(stats: CellStats, lam: float, entry_bits: float, k_max: int = MAX_K) -> np.ndarray:
    """Merge adjacent cells, cheapest first, while a merge lowers J or there are over ``k_max``.

    Merging cells 1 and 2 changes J by ``w1·w2/(w1+w2)·(m1−m2)² + λ·(n1·log2 n1 + n2·log2 n2 −
    (n1+n2)·log2(n1+n2) − entry_bits)`` (≤ 0: the merge pays). Returns the new bounds. Ties go to the leftmost pair; the result is deterministic.
    """
    k = stats.n.size
    if k <= 1:
        return stats.bounds
    n, w, m = stats.n, stats.w, stats.mean
    # Vectorised check first: most partitions need no merge at all.
    dd = w[:-1] * w[1:] / (w[:-1] + w[1:]) * (m[:-1] - m[1:]) ** 2
    nn = n[:-1] + n[1:]
    dl = n[:-1] * np.log2(n[:-1]) + n[1:] * np.log2(n[1:]) - nn * np.log2(nn)
    cost = dd + lam * (dl - entry_bits)
    if k <= k_max and not (cost < 0).any():
        return stats.bounds
    # Greedy merging over a doubly linked list of cells with a heap of pair costs. This loop is
    # most of `step_for_bits`' time (its small trial steps leave thousands of cells to merge to
    # k_max), so the pair cost above is computed inline with each cell's n·log2(n) kept (`xl`): the same
    # float operations in the same order, so the same merges (tools/bench_cluster.py --bits).
    log2, heappush, heappop = math.log2, heapq.heappush, heapq.heappop
    nl, wl, ml = n.tolist(), w.tolist(), m.tolist()
    xl = [v * log2(v) for v in nl]
    start = stats.bounds[:-1].tolist()
    nxt = list(range(1, k)) + [-1]
    prv = [-1] + list(range(k - 1))
    alive = [True] * k
    version = [0] * k
    heap = [(c, i, 0, 0) for i, c in enumerate(cost.tolist())]
    heapq.heapify(heap)
    live = k
    while heap:
        c, i, vi, vj = heappop(heap)
        if not alive[i]:
            continue
        j = nxt[i]
        if j < 0 or version[i] != vi or version[j] != vj:
            continue
        if c >= 0 and live <= k_max:
            break
        # merge j into i
        wi, wj = wl[i], wl[j]
        ww = wi + wj
        mi = ml[i] = (wi * ml[i] + wj * ml[j]) / ww
        wl[i] = ww
        ni = nl[i] = nl[i] + nl[j]
        xi = xl[i] = ni * log2(ni)
        alive[j] = False
        q = nxt[i] = nxt[j]
        if q >= 0:
            prv[q] = i
        vi = version[i] = vi + 1
        live -= 1
        p = prv[i]
        if p >= 0:  # the pair cost of cells p and i
            wp, nn = wl[p], nl[p] + ni
            c = wp * ww / (wp + ww) * (ml[p] - mi) ** 2 + lam * ((xl[p] + xi - nn * log2(nn)) - entry_bits)
            heappush(heap, (c, p, version[p], vi))
        if q >= 0:  # the pair cost of cells i and q
            wq, nn = wl[q], ni + nl[q]
            c = ww * wq / (ww + wq) * (mi - ml[q]) ** 2 + lam * ((xi + xl[q] - nn * log2(nn)) - entry_bits)
            heappush(heap, (c, i, vi, version[q]))
    starts = [start[i] for i in range(k) if alive[i]]
    return np.array(starts + [int(stats.bounds[-1])], dtype=np.int64)


def ecsq_cells(h: ValueHistogram, step: float, entry_bits: float, k_max: int = MAX_K) -> CellStats:
    """The fast ECSQ partition of ``h`` at ``step``: uniform cells, then `merge_cells` at the
    slope λ of that step (``slope_of_step`` with the histogram's mean importance)."""
    stats = cell_stats(h, uniform_cells(h, step))
    lam = slope_of_step(step, float(h.weight.sum() / h.count.sum()))
    bounds = merge_cells(stats, lam, entry_bits, k_max)
    return stats if bounds is stats.bounds else cell_stats(h, bounds)


def step_for_bits(
    hists: list[ValueHistogram], bits_per_weight: float, entry_bits: list[float], scales: list[float] | None = None,
    k_max: int = MAX_K,
) -> float:
    """The common step ``s`` at which histograms clustered at steps ``s·scales[i]`` (by
    `ecsq_cells`) spend, in all, at most ``bits_per_weight`` × their elements (`rate_bits`), as
    close to it as bisection on log(step) gets (the rate falls as the step grows).

    One histogram: the step of one tensor or row chunk. Several: the equal-slope allocation of
    one budget over them (``scales[i] = 1/√ω_i`` for mean importances ω_i).
    """
    if scales is None:
        scales = [1.0] * len(hists)
    if not (bits_per_weight > 0 and math.isfinite(bits_per_weight)):
        raise UsageError(f"bits must be a positive number, got {bits_per_weight!r}")
    live = [(h, e, sc) for h, e, sc in zip(hists, entry_bits, scales) if h.x.size]
    n_total = float(sum(int(h.count.sum()) for h, _, _ in live))
    if not live:
        return 1.0
    target = bits_per_weight * n_total

    def bits_at(s: float) -> float:
        return sum(rate_bits(ecsq_cells(h, s * sc, CELL_ENTRY_BITS, k_max), e) for h, e, sc in live)

    spans = [(float(h.x[-1] - h.x[0]) or abs(float(h.x[0])) or 1.0) / sc for h, _, sc in live]
    hi = 4.0 * max(spans)  # one cell per histogram: the fewest bits there are
    gaps = [float(np.diff(h.x).min()) / sc for h, _, sc in live if h.x.size > 1]
    lo = 0.25 * min(gaps) if gaps else hi / 4.0  # every value in a cell of its own: the most
    if bits_at(hi) >= target:
        return hi
    # No test at ``lo`` (the costliest point: every value a cell, merged down to the cap): if the
    # budget is never exceeded, ``lhi`` walks down to ``lo`` and is returned, as it would be.
    llo, lhi = math.log(lo), math.log(hi)
    for _ in range(_BISECT_STEPS):
        if lhi - llo <= _STEP_RTOL:
            break
        mid = 0.5 * (llo + lhi)
        if bits_at(math.exp(mid)) > target:
            llo = mid
        else:
            lhi = mid
    # The upper end spends at most the budget: the budget is a cap, met from below.
    return math.exp(lhi)


def ecsq_dp(
    x: np.ndarray, count: np.ndarray, weight: np.ndarray, lam: float, entry_bits: float = 0.0, k_max: int | None = None
) -> np.ndarray:
    """Exact minimiser of ``J = Σ SSE_w + λ·(Σ n_c·(−log2 n_c/N) + entry_bits·#cells)`` over interval
    partitions of sorted distinct values ``x`` (counts ``count``, importance ``weight``), with at
    most ``k_max`` cells when given. Returns the bounds (cell c = points bounds[c]:bounds[c+1]).

    The entropy term is concave in a cell's count, so the cost is not Monge and the k-means DP's
    monotone-argmin speed-ups do not apply: this is the plain O(M²) (O(k_max·M²)) programme, the
    reference the fast path is measured against. Ties go to the partition whose last cell starts
    earliest, scanning back.

    >>> ecsq_dp(np.array([0.0, 0.1, 5.0, 5.1]), np.ones(4), np.ones(4), lam=0.01).tolist()
    [0, 2, 4]
    """
    x = np.asarray(x, dtype=np.float64)
    cnt = np.asarray(count, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    m = x.size
    if m == 0 or x.shape != cnt.shape or x.shape != w.shape:
        raise UsageError("x, count and weight must be non-empty 1-D arrays of one length")
    if not (lam >= 0 and math.isfinite(lam)):
        raise UsageError(f"lam must be a finite number >= 0, got {lam!r}")
    s = float(x[m // 2])
    xs = x - s
    c0 = np.concatenate(([0.0], np.cumsum(cnt)))
    p0 = np.concatenate(([0.0], np.cumsum(w)))
    p1 = np.concatenate(([0.0], np.cumsum(w * xs)))
    p2 = np.concatenate(([0.0], np.cumsum(w * xs * xs)))
    total = c0[-1]
    log_total = math.log2(total)

    def cost_to(j: int) -> np.ndarray:
        """Cost of each cell i..j (i = 0..j), one array over i."""
        dw = p0[j + 1] - p0[: j + 1]
        d1 = p1[j + 1] - p1[: j + 1]
        sse = np.maximum((p2[j + 1] - p2[: j + 1]) - d1 * d1 / dw, 0.0)
        n = c0[j + 1] - c0[: j + 1]
        return sse + lam * (n * (log_total - np.log2(n)) + entry_bits)

    if k_max is None:
        best = np.empty(m + 1)
        best[0] = 0.0
        arg = np.empty(m + 1, dtype=np.int64)
        for j in range(m):
            v = best[: j + 1] + cost_to(j)
            i = int(np.argmin(v))
            best[j + 1], arg[j + 1] = v[i], i
        cuts = [m]
        while cuts[-1] > 0:
            cuts.append(int(arg[cuts[-1]]))
        return np.array(cuts[::-1], dtype=np.int64)
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise UsageError(f"k_max must be a positive integer, got {k_max!r}")
    kk = min(int(k_max), m)
    costs = [cost_to(j) for j in range(m)]
    layer = np.full(m + 1, np.inf)  # layer[j]: best J of points 0..j-1 in exactly c cells
    layer[0] = 0.0
    args = np.zeros((kk + 1, m + 1), dtype=np.int64)
    best_total, best_c = np.inf, 0
    layers = [layer]
    for c in range(1, kk + 1):
        new = np.full(m + 1, np.inf)
        for j in range(m):
            v = layer[: j + 1] + costs[j]
            i = int(np.argmin(v))
            new[j + 1], args[c, j + 1] = v[i], i
        layer = new
        layers.append(layer)
        if layer[m] < best_total:
            best_total, best_c = float(layer[m]), c
    cuts = [m]
    for c in range(best_c, 0, -1):
        cuts.append(int(args[c, cuts[-1]]))
    return np.array(cuts[::-1], dtype=np.int64)


def dp_cells(h: ValueHistogram, lam: float, entry_bits: float, k_max: int = MAX_K) -> CellStats:
    """The exact ECSQ partition of ``h`` at slope ``lam`` (`ecsq_dp`, uncapped); if it has more than
    ``k_max`` cells, `merge_cells` brings it under the cap (the capped DP is O(k·M²): too slow
    for whole matrices, kept for tests)."""
    stats = cell_stats(h, ecsq_dp(h.x, h.count, h.weight, lam, entry_bits))
    bounds = merge_cells(stats, lam, entry_bits, k_max)
    return stats if bounds is stats.bounds else cell_stats(h, bounds)


def table_for_cells(h: ValueHistogram, stats: CellStats, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From cells to what is stored: ``(table, rebuilt, label_bounds, cuts)``.

    Each cell's mean is rounded by the spec's rules (`round_centroids`); cells whose means round
    to the same stored value share a label. ``label_bounds`` delimit each label's values in
    ``h.x``; ``cuts`` are the decision thresholds between labels (midway between the last value
    of one label and the first of the next), for `assign_labels`.
    """
    table, rebuilt = round_centroids(stats.mean, dtype)
    lab = np.searchsorted(rebuilt, rebuilt_of_each(stats.mean, dtype))
    keep = np.concatenate(([True], lab[1:] != lab[:-1]))
    bounds = np.concatenate((stats.bounds[:-1][keep], stats.bounds[-1:]))
    inner = bounds[1:-1]
    cuts = (h.x[inner - 1] + h.x[inner]) / 2
    return table, rebuilt, bounds, cuts
