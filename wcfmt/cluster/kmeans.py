"""Weighted 1-D k-means over value histograms: the exact optimum and Lloyd's, in numpy.

A weight matrix holds few distinct values: a BF16 matrix a few thousand (7 mantissa bits), an
F16 one tens of thousands. Clustering therefore runs on a *weighted histogram of distinct
values* (sorted values ``x``, weights ``w``), never on the raw weights, and labels come from a
lookup table indexed by the 16-bit pattern. The histogram is exact, so the clustering is the
same as clustering every weight one by one.

`optimal_kmeans_1d` is the globally optimal clustering (least weighted within-cluster sum of
squares) that the Ckmeans.1d.dp dynamic programme computes (Wang & Song 2011). Its layers are
row-minima problems of a totally monotone matrix; each is solved by divide and conquer, all
segments of one recursion level at once, and several problems (row chunks) share one pass so
that numpy's per-call overhead is paid once per level rather than once per chunk.

Rounding rules (spec §5.4, §5.5), fixed here so every machine writes the same file:

- centroids round to nearest, ties to even: to fp16 for F16/F32 tensors; for BF16 tensors
  first to bf16 (so the rebuilt bf16 value is the bf16 value nearest the optimal centroid,
  not a double rounding through fp16), then to fp16, which holds it exactly in fp16's range;
- equal centroids after rounding are merged, as are centroids that rebuild to the same value,
  so a chunk may have fewer than ``k`` centroids;
- a value's label is its nearest *rebuilt* centroid; a value exactly half-way between two
  goes to the lower one (toward -inf).

All arithmetic is float64 elementwise, `cumsum` (sequential) or comparisons, with first-index
tie-breaking, so results are bit-identical on every platform and independent of threads and
of how chunks are batched.

Speed, one core (``tools/bench_cluster.py``, 4096 x 14336 Student-t matrix, K = 16..64):
BF16 with one table per tensor ~330-400 M weights/s (the histogram and the label gather are
most of it); with a table per 256 rows ~100-200 M/s, the DP of each chunk being most of it.
F16 chunks hold ~25,000 distinct values and their DP costs ~0.2 s at K = 64. F32 needs a sort
(`np.unique`) and is ~8-13 M weights/s, 2-3x the time of `numpy.sort` of the same data.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np

from ..constants import MAX_K
from ..errors import UsageError

__all__ = [
    "METHODS",
    "EXACT_MAX_POINTS",
    "ValueHistogram",
    "optimal_kmeans_1d",
    "lloyd_kmeans_1d",
    "wcss",
    "value_histogram",
    "solve_centroids",
    "round_centroids",
    "rebuilt_of_each",
    "assign_labels",
    "label_bounds",
    "cluster_values",
]

#: Clustering methods: the exact optimum, and Lloyd's algorithm kept for comparison tables.
METHODS: Final[tuple[str, ...]] = ("exact", "lloyd")

#: Most distinct values the exact DP takes as they are. Every F16/BF16 histogram fits (at most
#: 63,488 finite values); an F32 chunk may not: then the DP runs on a coarser grid and Lloyd's
#: algorithm polishes the result on the exact values (see `optimal_kmeans_1d`).
EXACT_MAX_POINTS: Final[int] = 1 << 16

#: Cells of the grid the DP runs on when a chunk has more than EXACT_MAX_POINTS distinct values.
#: Measured on 1M Student-t / normal float32 values at K = 4..64: grid optimum + Lloyd polish
#: within 2e-6 of the optimum's WCSS at 8,192 cells (5e-7 at 25,000, 6e-4 at 650), and the DP
#: then costs less than the sort that found the distinct values.
_GRID_CELLS: Final[int] = 1 << 13

#: Elements per block in histogram / label passes: a block of indices and its intp copy stay in
#: L2 cache (measured: 2^18 is 15% faster than one whole-array bincount, and lets it free memory).
_BLOCK: Final[int] = 1 << 18

#: Upper bound on the DP's back-pointer table per batch (int32 entries): 64 MiB.
_BATCH_CELLS: Final[int] = 1 << 24

_FP16_MAX: Final[float] = 65504.0

#: F32 labelling buckets hold 2^12 consecutive bit patterns: a 2 MiB table of 2^20 entries,
#: fine enough that few buckets straddle a midpoint.
_F32_LOW_BITS: Final[int] = 12


# -- value tables of the 16-bit dtypes -------------------------------------------------------
@functools.cache
def _pattern_values(dtype: str) -> np.ndarray:
    """float64 value of each of the 65,536 bit patterns of ``dtype`` (NaN/inf as they are)."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # NaN patterns stay NaN
        if dtype == "BF16":
            vals = (bits << 16).view(np.float32).astype(np.float64)
        elif dtype == "F16":
            vals = bits.astype(np.uint16).view(np.float16).astype(np.float64)
        else:
            raise AssertionError(dtype)
    vals.setflags(write=False)
    return vals


@functools.cache
def _sorted_patterns(dtype: str) -> np.ndarray:
    """The finite bit patterns of ``dtype`` in ascending value order, without -0 (folded into +0)."""
    vals = _pattern_values(dtype)
    pats = np.flatnonzero(np.isfinite(vals))
    pats = pats[pats != 0x8000]
    order = pats[np.argsort(vals[pats], kind="stable")]
    order.setflags(write=False)
    return order


@functools.cache
def _nonfinite_patterns(dtype: str) -> np.ndarray:
    out = np.flatnonzero(~np.isfinite(_pattern_values(dtype)))
    out.setflags(write=False)
    return out


# -- the exact dynamic programme ---------------------------------------------------------------
def _prefix_sums(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Prefix sums of w, w·(x−s), w·(x−s)² (length n+1) and the shift s (the weighted median).

    Shifting to the middle of the data keeps the within-cluster costs, computed as differences
    of prefix sums, accurate to ~1e-16 of the total sum of squares. (The median rather than the
    mean: it costs no extra pass, and a `dot` could sum in a machine-dependent order.)
    """
    p0 = np.zeros(x.size + 1)
    np.cumsum(w, out=p0[1:])
    shift = float(x[min(int(np.searchsorted(p0, p0[-1] / 2)), x.size - 1)])
    xs = x - shift
    wx = w * xs
    p1 = np.zeros(x.size + 1)
    np.cumsum(wx, out=p1[1:])
    p2 = np.zeros(x.size + 1)
    np.cumsum(wx * xs, out=p2[1:])
    return p0, p1, p2, shift


def _segment_argmin(v: np.ndarray, starts: np.ndarray, lens: np.ndarray, n: int, ar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum of each segment of ``v`` and the position of its first occurrence.

    `reduceat` costs ~14 ns per segment, `minimum.at` ~2 ns per element (measured): the cheaper
    one runs. Exact ties are rare, so the first occurrence is only searched for when some
    segment has two. ``ar`` is a long enough `arange`.
    """
    if starts.size * 5 > n:
        seg = np.repeat(ar[: starts.size], lens)
        vmin = np.full(starts.size, np.inf)
        np.minimum.at(vmin, seg, v)
        pos = np.flatnonzero(v == vmin.take(seg))
    else:
        vmin = np.minimum.reduceat(v, starts)
        pos = np.flatnonzero(v == np.repeat(vmin, lens))
    if pos.size == starts.size:  # every segment holds its minimum once
        return vmin, pos
    return vmin, pos.take(np.searchsorted(pos, starts))


#: A segment of the DP's divide and conquer splits into this many parts per level. Each level
#: costs ~25 numpy calls whatever its size; more parts mean fewer levels but more candidates.
#: Measured at K = 64, ms for 2 / 3 / 4 parts: 24.7 / 19.4 / 18.7 (2,400 distinct values, a
#: SmolLM2 bf16 chunk), 38.6 / 34.1 / 35.3 (4,559, bf16 Student-t), 178 / 186 / 198 (26,117, fp16).
_BRANCH: Final[int] = 3


def _split_tree(po: np.ndarray, ms: np.ndarray, total: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Levels of the divide-and-conquer over j: (nodes, slot of left neighbour, slot of right).

    Each segment of unsolved j, bounded by solved neighbours (or the problem's ends), gets
    up to _BRANCH - 1 evenly spaced nodes; the gaps between them are the next level's segments.
    """
    n_prob = ms.size
    out = []
    jlo, jhi, prob = po.copy(), po + ms - 1, np.arange(n_prob)
    jlo, jhi, prob = jlo[ms > 0], jhi[ms > 0], prob[ms > 0]
    b = _BRANCH
    while jlo.size:
        length = jhi - jlo + 1
        n_nodes = np.minimum(length, b - 1)
        seg = np.repeat(np.arange(jlo.size), n_nodes)
        t = np.arange(seg.size) - np.repeat(np.cumsum(n_nodes) - n_nodes, n_nodes) + 1  # 1..n_nodes
        few = length <= b - 1
        node = np.where(few[seg], jlo[seg] + t - 1, jlo[seg] + (t * (length[seg] + 1)) // b - 1)
        pr = prob[seg]
        pred = np.where(jlo[seg] > po[pr], jlo[seg] - 1, total + pr)
        succ = np.where(jhi[seg] < po[pr] + ms[pr] - 1, jhi[seg] + 1, total + n_prob + pr)
        out.append((node, pred, succ))
        # gaps: before each node (from the previous node or the segment start), and after the last
        first = np.concatenate(([True], seg[1:] != seg[:-1]))
        last = np.concatenate((seg[1:] != seg[:-1], [True]))
        gap_lo = np.where(first, jlo[seg], np.concatenate(([0], node[:-1])) + 1)
        gap_hi = node - 1
        tail_lo, tail_hi = node[last] + 1, jhi[seg[last]]
        lo = np.concatenate((gap_lo, tail_lo))
        hi = np.concatenate((gap_hi, tail_hi))
        pp = np.concatenate((pr, prob[seg[last]]))
        keep = lo <= hi
        order = np.argsort(lo[keep], kind="stable")
        jlo, jhi, prob = lo[keep][order], hi[keep][order], pp[keep][order]
    return out


def _dp_bounds(prefixes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> list[np.ndarray]:
    """Optimal cluster bounds of several problems at once, each given by its prefix sums.

    Problem ``p`` has ``m`` points (prefix arrays of length m+1, every weight > 0) and gets
    ``K = min(k, m)`` clusters; it returns ``bounds`` (length K+1, ``bounds[0] = 0``,
    ``bounds[K] = m``) with cluster ``c`` = points ``bounds[c]:bounds[c+1]``.

    ``D_c[j]`` (least cost of points 0..j in c+1 clusters) = min over ``i`` of
    ``D_{c-1}[i-1] + cost(i, j)``. The leftmost minimiser ``opt_c[j]`` is nondecreasing in
    ``j`` and in ``c`` (the cost is Monge), so each layer is solved by divide and conquer over
    ``j``: a node's candidates lie between the minimisers of its nearest solved neighbours,
    and above ``opt_{c-1}[j]``. The recursion tree over ``j`` is the same for every layer, so
    it is built once; every level of it, over all problems, is a handful of numpy calls.
    Points that cannot close ``c+1`` clusters (``j < c``) get ``D = inf`` and drop out.
    """
    ms = np.array([len(p[0]) - 1 for p in prefixes], dtype=np.int64)
    n_prob = ms.size
    ks = np.minimum(ms, k)
    po = np.zeros(n_prob, dtype=np.int64)
    np.cumsum(ms[:-1], out=po[1:])
    total = int(ms.sum())
    # Point-indexed prefix sums: l* = sums before point g, r* = through point g. (Separate 1-D
    # arrays: `take` on each is 5x faster than fancy-indexing rows of one 2-D array.)
    l0 = np.concatenate([p[0][:-1] for p in prefixes])
    l1 = np.concatenate([p[1][:-1] for p in prefixes])
    l2 = np.concatenate([p[2][:-1] for p in prefixes])
    r0 = np.concatenate([p[0][1:] for p in prefixes])
    r1 = np.concatenate([p[1][1:] for p in prefixes])
    r2 = np.concatenate([p[2][1:] for p in prefixes])
    kmax = int(ks.max())

    # The static recursion tree: per level, its nodes j, the slots of their nearest solved
    # neighbours (left, right; slots >= total are per-problem sentinels: the lowest valid start,
    # the last point) and the prefix sums through j.
    levels = [(node, pred, succ, r1[node], r0[node]) for node, pred, succ in _split_tree(po, ms, total)]

    opt = np.empty((kmax, total), dtype=np.int32 if total < 2**31 else np.int64)
    opt[0] = np.repeat(po, ms)
    d = r2 - r1 * r1 / r0  # layer 0: one cluster from point 0 to j
    a = np.empty(total)
    ext = np.empty(total + 2 * n_prob, dtype=np.int64)
    ext[total + n_prob :] = po + ms - 1
    ar = np.arange(2 * total + 2)
    vmin_of = np.empty(total)
    for c in range(1, kmax):
        a[1:] = d[:-1] - l2[1:]
        a[po] = np.inf
        ext[total : total + n_prob] = po + c
        prev = opt[c - 1]
        for node, pred, succ, r1n, r0n in levels:
            hi = np.minimum(ext.take(succ), node)
            lo = np.minimum(np.maximum(ext.take(pred), prev.take(node)), hi)
            lens = hi - lo + 1
            ends = np.cumsum(lens)
            n_cand = int(ends[-1])
            starts = ends - lens
            if n_cand > ar.size:
                ar = np.arange(2 * n_cand)
            i = np.repeat(lo - starts, lens)
            i += ar[:n_cand]
            d1 = np.repeat(r1n, lens)  # Σ w(x−s) and Σ w over the candidate cluster i..j
            d1 -= l1.take(i)
            dw = np.repeat(r0n, lens)
            dw -= l0.take(i)
            d1 *= d1
            d1 /= dw
            v = a.take(i)
            v -= d1
            vmin, first = _segment_argmin(v, starts, lens, n_cand, ar)
            ext[node] = i.take(first)
            vmin_of[node] = vmin
        opt[c] = ext[:total]
        d = vmin_of + r2

    table = np.zeros((n_prob, kmax + 1), dtype=np.int64)
    table[np.arange(n_prob), ks] = ms
    j = po + ms - 1
    for c in range(kmax - 1, -1, -1):
        act = np.flatnonzero(ks > c)
        s = opt[c][j[act]].astype(np.int64)
        table[act, c] = s - po[act]
        j[act] = s - 1
    return [table[p, : ks[p] + 1] for p in range(n_prob)]


def _centroids_of(bounds: np.ndarray, p0: np.ndarray, p1: np.ndarray, shift: float) -> np.ndarray:
    return shift + (p1[bounds[1:]] - p1[bounds[:-1]]) / (p0[bounds[1:]] - p0[bounds[:-1]])


def _lloyd_bounds(x: np.ndarray, p0: np.ndarray, p1: np.ndarray, shift: float, c: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd's iterations from centroids ``c`` until the assignment stops changing.

    On sorted values with prefix sums one iteration costs O(k log n): boundaries are where the
    midpoints fall (a value on a midpoint joins the lower cluster), means come from the sums.
    Clusters that empty are dropped.
    """
    n = x.size
    bounds = np.empty(0, dtype=np.int64)
    for _ in range(max_iter):
        cut = np.searchsorted(x, (c[1:] + c[:-1]) / 2, side="right")
        new = np.unique(np.concatenate(([0], cut, [n])))
        if np.array_equal(new, bounds):
            break
        bounds = new
        c = _centroids_of(bounds, p0, p1, shift)
    return bounds


def _check_points(x: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    _check_k(k)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if x.ndim != 1 or x.shape != w.shape or x.size == 0:
        raise UsageError(f"x and w must be non-empty 1-D arrays of one length, got {x.shape} and {w.shape}")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise UsageError("x and w must be finite")
    if x.size > 1 and not (x[1:] > x[:-1]).all():
        raise UsageError("x must be strictly ascending (distinct values)")
    if not (w > 0).all():
        raise UsageError("weights must be > 0 (drop values of zero weight first)")
    return x, w


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise UsageError(f"k must be an integer in 1..{MAX_K}, got {k!r}")


def _grid_cells(x: np.ndarray) -> np.ndarray:
    """Start index of each grid cell over sorted float32-representable ``x``: ≤ `_GRID_CELLS` cells.

    Cells are the values sharing the top bits of their float32 pattern (sign, exponent and as
    many leading mantissa bits as fit), so each is an interval of equal relative width: fine
    where the values are dense, and a lone outlier gets a cell of its own. One pass over ``x``
    finds the finest cells; coarser ones are merges of those.
    """
    bits = x.astype(np.float32).view(np.uint32) >> 10
    starts = np.concatenate(([0], np.flatnonzero(bits[1:] != bits[:-1]) + 1))
    keys = bits[starts]
    for shift in range(0, 23):
        k = keys >> shift
        keep = np.concatenate(([True], k[1:] != k[:-1]))
        if np.count_nonzero(keep) <= _GRID_CELLS:
            return starts[keep]
    raise AssertionError("unreachable: 1 key bit leaves 2 cells")


def _solve_many(points: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`optimal_kmeans_1d` for several (x, w) problems, batched through `_dp_bounds`."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    batch: list[tuple] = []  # (x, prefix sums of the DP's points, cell starts or None, p0, p1, shift)
    cells_in_batch = 0

    def flush() -> None:
        nonlocal batch, cells_in_batch
        if batch:
            for (x, _, at, p0, p1, shift), b in zip(batch, _dp_bounds([job[1] for job in batch], k)):
                if at is not None:  # polish the grid optimum on the exact values
                    b = _lloyd_bounds(x, p0, p1, shift, _centroids_of(at[b], p0, p1, shift), 1000)
                out.append((b, _centroids_of(b, p0, p1, shift)))
        batch, cells_in_batch = [], 0

    for x, w in points:
        p0, p1, p2, shift = _prefix_sums(x, w)
        at = None
        if x.size <= EXACT_MAX_POINTS:
            job = (x, (p0, p1, p2), None, p0, p1, shift)
        else:
            at = np.concatenate((_grid_cells(x), [x.size]))
            job = (x, (p0[at], p1[at], p2[at]), at, p0, p1, shift)
        m = len(job[1][0]) - 1
        if batch and cells_in_batch + m * min(k, m) > _BATCH_CELLS:
            flush()
        batch.append(job)
        cells_in_batch += m * min(k, m)
        if at is not None:  # keep at most one large F32 problem's prefix sums alive
            flush()
    flush()
    return out


def optimal_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the optimal weighted k-means of sorted distinct values: ``(centroids, bounds)``.

    ``x``: strictly ascending finite values; ``w``: their weights (> 0). The result has
    ``K = min(k, len(x))`` clusters minimising the weighted within-cluster sum of squares
    (`wcss`): ``centroids`` (float64, ascending) are the clusters' weighted means and
    ``bounds`` (length K+1) delimit them, cluster ``c`` being ``x[bounds[c]:bounds[c+1]]``.
    Ties between equally good partitions go to the one whose clusters start earliest, scanning
    from the last cluster back.

    Exact for up to `EXACT_MAX_POINTS` values (every 16-bit histogram). Above that (only F32
    chunks get there) the DP runs on a grid of ≤ 8,192 cells of equal relative width and
    Lloyd's algorithm polishes the result on the exact values: not proven optimal, but measured
    within 1e-5 of the optimal WCSS (tests hold it to 1e-4).

    Time O(K·n·log n) in numpy calls per recursion level, memory O(K·n).

    >>> c, b = optimal_kmeans_1d(np.array([0.0, 1.0, 10.0, 11.0]), np.ones(4), 2)
    >>> c.tolist(), b.tolist()
    ([0.5, 10.5], [0, 2, 4])
    """
    x, w = _check_points(x, w, k)
    b, c = _solve_many([(x, w)], int(k))[0]
    return c, b


def lloyd_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of sorted distinct values from a quantile start: ``(centroids, bounds)``.

    Starts from the weighted quantiles ``(c + 1/2) / k`` (duplicates merged) and iterates to a
    fixed point (or ``max_iter``). A local optimum only: kept to compare against
    `optimal_kmeans_1d`. May return fewer than ``min(k, len(x))`` clusters.

    >>> c, b = lloyd_kmeans_1d(np.array([0.0, 1.0, 10.0, 11.0]), np.ones(4), 2)
    >>> c.tolist(), b.tolist()
    ([0.5, 10.5], [0, 2, 4])
    """
    x, w = _check_points(x, w, k)
    p0, p1, _, shift = _prefix_sums(x, w)
    targets = (np.arange(k) + 0.5) / k * p0[-1]
    start = np.unique(x[np.minimum(np.searchsorted(p0[1:], targets), x.size - 1)])
    b = _lloyd_bounds(x, p0, p1, shift, start, max_iter)
    return _centroids_of(b, p0, p1, shift), b


def wcss(x: np.ndarray, w: np.ndarray, bounds: np.ndarray, centroids: np.ndarray | None = None) -> float:
    """Weighted within-cluster sum of squares of the clusters ``bounds`` (about their means,
    or about ``centroids`` when given).

    >>> wcss(np.array([0.0, 1.0, 10.0, 11.0]), np.ones(4), np.array([0, 2, 4]))
    1.0
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    total = 0.0
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        xs, ws = x[a:b], w[a:b]
        mu = float(np.dot(ws, xs) / ws.sum()) if centroids is None else float(centroids[c])
        total += float(np.dot(ws, (xs - mu) ** 2))
    return total


# -- histograms of stored values ---------------------------------------------------------------
@dataclass(frozen=True)
class ValueHistogram:
    """The distinct values of a row chunk with their counts and clustering weights.

    ``x``: distinct finite values, ascending, float64 (-0 folded into +0); ``count``: how often
    each occurs; ``weight``: its total importance (equal to ``count`` when unweighted).
    """

    dtype: str
    x: np.ndarray
    count: np.ndarray
    weight: np.ndarray


def _importance_blocks(importance: np.ndarray | None, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, float64 weights) blocks of ``n`` elements, or nothing if None.

    ``importance`` has ``n`` elements, or fewer and repeats (a per-position-in-row vector):
    then blocks hold whole periods and reuse one tiled buffer.
    """
    if importance is None:
        return
    imp = importance.reshape(-1)
    if imp.size == n:
        for s in range(0, n, _BLOCK):
            yield s, min(s + _BLOCK, n), imp[s : s + _BLOCK].astype(np.float64, copy=False)
        return
    per = imp.size
    block = per * max(1, _BLOCK // per)
    tiled = np.tile(imp.astype(np.float64), block // per)
    for s in range(0, n, block):
        e = min(s + block, n)
        yield s, e, tiled[: e - s]


def _check_importance(importance: np.ndarray | None, n: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.asarray(importance)
    if imp.dtype.kind not in "fiu":
        raise UsageError(f"importance must be a real array, got dtype {imp.dtype}")
    if imp.size == 0 or n % imp.size:
        raise UsageError(f"importance has {imp.size} elements; need {n} or a divisor repeated along the values")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise UsageError("importance must be finite and >= 0")
    return imp


def value_histogram(values: np.ndarray, dtype: str, importance: np.ndarray | None = None) -> ValueHistogram:
    """Return the distinct values of ``values`` (storage form of ``dtype``) with counts and weights.

    BF16/F16: a 65,536-bin histogram of the bit patterns (`np.bincount`, exact; with
    ``weights=importance`` when weighted). F32: a sort (`np.unique`). NaN or infinity →
    `UsageError`. When every importance is 0 the weights fall back to the counts: no value
    matters more than another, so the unweighted clustering is as good as any.

    >>> h = value_histogram(np.array([1.0, -0.0, 0.0, 1.0], dtype=np.float16), "F16")
    >>> h.x.tolist(), h.count.tolist()
    ([0.0, 1.0], [2, 2])
    """
    v = np.asarray(values).reshape(-1)
    if dtype not in ("BF16", "F16", "F32"):
        raise UsageError(f"cannot cluster dtype {dtype}: need one of BF16, F16, F32")
    want = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[dtype]
    if v.dtype != want:
        raise UsageError(f"{dtype} values must be stored as {np.dtype(want).name}, got {v.dtype}")
    imp = _check_importance(importance, v.size)
    if dtype in ("BF16", "F16"):
        bits = v.view(np.uint16)
        h = np.zeros(1 << 16, dtype=np.int64)
        for s in range(0, bits.size, _BLOCK):
            h += np.bincount(bits[s : s + _BLOCK], minlength=1 << 16)
        if h[_nonfinite_patterns(dtype)].any():
            raise UsageError(f"{dtype} values contain NaN or infinity")
        h[0] += h[0x8000]
        order = _sorted_patterns(dtype)
        hs = h[order]
        keep = np.flatnonzero(hs)
        x = _pattern_values(dtype)[order[keep]]
        count = hs[keep]
        if imp is None:
            weight = count.astype(np.float64)
        else:
            hw = np.zeros(1 << 16)
            for s, e, wb in _importance_blocks(imp, bits.size):
                hw += np.bincount(bits[s:e], weights=wb, minlength=1 << 16)
            hw[0] += hw[0x8000]
            weight = hw[order[keep]]
    else:
        if imp is None:
            xs, count = np.unique(v, return_counts=True)
            weight = count.astype(np.float64)
        else:
            perm = np.argsort(v, kind="stable")
            sv = v[perm]
            first = np.flatnonzero(np.concatenate(([True], sv[1:] != sv[:-1])))
            xs = sv[first]
            count = np.diff(np.concatenate((first, [v.size])))
            full = imp.reshape(-1) if imp.size == v.size else np.tile(imp.reshape(-1), v.size // imp.size)
            cw = np.cumsum(full.astype(np.float64, copy=False)[perm])
            weight = np.diff(np.concatenate(([0.0], cw[np.concatenate((first[1:], [v.size])) - 1])))
        if xs.size and not (np.isfinite(xs[0]) and np.isfinite(xs[-1])):  # sorting puts NaN last
            raise UsageError("F32 values contain NaN or infinity")
        x = xs.astype(np.float64) + 0.0  # + 0.0 turns -0 into +0
    if imp is not None and not (weight > 0).any():
        weight = count.astype(np.float64)
    return ValueHistogram(dtype, x, count, weight)


# -- from optimal centroids to a stored table and labels ---------------------------------------
def solve_centroids(hists: list[ValueHistogram], k: int, method: str = "exact") -> list[np.ndarray]:
    """Return each histogram's k-means centroids (float64, ascending), before any rounding.

    Values of zero weight take no part (they are labelled later, by nearest centroid). The
    exact method batches all histograms through one DP; results do not depend on the batching.
    """
    _check_k(k)
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    pts = []
    for h in hists:
        pos = h.weight > 0
        pts.append((h.x[pos], h.weight[pos]) if not pos.all() else (h.x, h.weight))
    if method == "lloyd":
        return [lloyd_kmeans_1d(x, w, k)[0] if x.size else np.zeros(0) for x, w in pts]
    live = [i for i, (x, _) in enumerate(pts) if x.size]
    out = [np.zeros(0)] * len(pts)
    for i, (_, c) in zip(live, _solve_many([pts[i] for i in live], int(k))):
        out[i] = c
    return out


def _round_sig(v: np.ndarray, bits: int) -> np.ndarray:
    """Round float64 ``v`` to ``bits`` significant bits, ties to even (bf16: 8, fp16 normals: 11)."""
    m, e = np.frexp(v)
    return np.ldexp(np.round(m * (1 << bits)), e - bits)


def _round_fp16(v: np.ndarray) -> np.ndarray:
    """Round float64 ``v`` to fp16, ties to even, in plain float64 arithmetic; ±inf beyond range.

    Spelled out rather than left to ``astype(float16)``, whose path (software, or a hardware
    conversion) is numpy's and the platform's choice: here every step is exact or an RNE
    `round`, so the table is the same everywhere.
    """
    r = np.where(np.abs(v) >= 2.0**-14, _round_sig(v, 11), np.round(v * 2.0**24) / 2.0**24)
    with np.errstate(over="ignore"):
        return np.where(np.abs(r) > _FP16_MAX, np.copysign(np.inf, r), r).astype(np.float16)


def round_centroids(centroids: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Round optimal centroids to the stored fp16 table: ``(table, rebuilt)`` (spec §5.4, §5.5).

    ``table`` is strictly ascending fp16 with duplicates merged; ``rebuilt`` is the float64 value
    each entry rebuilds to in ``dtype`` (also strictly ascending: entries rebuilding to a value
    already present are dropped). A centroid outside fp16's range → `UsageError`.

    >>> t, r = round_centroids(np.array([-0.0, 1e-9, 0.1, 0.1001]), "BF16")
    >>> t.tolist(), r.tolist()  # 1e-9 and -0 → 0; 0.1 and 0.1001 → the same bf16 value
    ([0.0, 0.10009765625], [0.0, 0.10009765625])
    """
    c = np.asarray(centroids, dtype=np.float64)
    if dtype == "BF16":
        c = _round_sig(c, 8)
    t16 = _round_fp16(c)
    _check_fp16_range(c, t16)
    t16 = np.unique(t16 + np.float16(0.0))  # merges duplicates and -0/+0
    rebuilt = _rebuilt_values(t16, dtype)
    keep = np.concatenate(([True], rebuilt[1:] != rebuilt[:-1]))
    return t16[keep], rebuilt[keep]


def rebuilt_of_each(centroids: np.ndarray, dtype: str) -> np.ndarray:
    """The value each centroid rebuilds to once rounded as `round_centroids` rounds it, without
    merging: element ``i`` is one of the ``rebuilt`` values `round_centroids` returns."""
    c = np.asarray(centroids, dtype=np.float64)
    if dtype == "BF16":
        c = _round_sig(c, 8)
    t16 = _round_fp16(c)
    _check_fp16_range(c, t16)
    return _rebuilt_values(t16 + np.float16(0.0), dtype)


def _check_fp16_range(c: np.ndarray, t16: np.ndarray) -> None:
    bad = ~np.isfinite(t16)
    if bad.any():
        raise UsageError(
            f"centroid {c[bad][0]:.7g} is outside the fp16 range ±{_FP16_MAX:g}: "
            f"this tensor cannot be clustered (store it lossless)"
        )


def _rebuilt_values(table: np.ndarray, dtype: str) -> np.ndarray:
    """float64 value of each fp16 table entry once rebuilt in ``dtype`` (the canonical rule)."""
    from ..rebuild.reference import centroids_as

    stored = centroids_as(table, dtype)
    if dtype == "BF16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


def _label_lut(dtype: str, mids: np.ndarray) -> np.ndarray:
    # Midpoints of fp16/bf16 values are exact in float64.
    vals = _pattern_values(dtype)
    lut = np.searchsorted(mids, vals, side="left")
    lut[~np.isfinite(vals)] = 0
    return lut.astype(np.uint8)


def _f32_floor(mids: np.ndarray) -> np.ndarray:
    """Each float64 midpoint rounded down to float32: for float32 ``v``, ``mid < v`` ⟺ ``floor < v``."""
    m32 = mids.astype(np.float32)
    return np.where(m32.astype(np.float64) > mids, np.nextafter(m32, np.float32(-np.inf)), m32)


def _f32_bucket_lut(m32: np.ndarray) -> np.ndarray:
    """Label of every float32 bucket of 2^_F32_LOW_BITS consecutive patterns, or 0xFFFF if a
    midpoint falls inside the bucket (its values are then searched one by one)."""
    keys = np.arange(1 << (32 - _F32_LOW_BITS), dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        first = (keys << _F32_LOW_BITS).view(np.float32)
        last = ((keys << _F32_LOW_BITS) | ((1 << _F32_LOW_BITS) - 1)).view(np.float32)
    lo = np.searchsorted(m32, first, side="left")
    hi = np.searchsorted(m32, last, side="left")
    return np.where(lo == hi, lo, 0xFFFF).astype(np.uint16)


def assign_labels(
    values: np.ndarray, dtype: str, rebuilt: np.ndarray, out: np.ndarray | None = None, cuts: np.ndarray | None = None
) -> np.ndarray:
    """Label every value with its nearest rebuilt centroid (ties → the lower); uint8, flat.

    ``cuts`` (strictly ascending float64, one fewer than the labels) replaces the midpoints of
    ``rebuilt`` as the decision thresholds: a value's label is the number of cuts below it.
    The entropy-constrained encoder uses it, whose cells are not nearest-centroid regions.

    BF16/F16: one 65,536-entry table indexed by the bit pattern. F32: a table indexed by the top
    20 bits of the pattern gives the label of every bucket no midpoint splits; the values of
    the few split buckets are binary-searched among the midpoints, each rounded down to
    float32 so the float32 comparison is exact. (Searching every value costs ~70 ns each.)
    """
    v = np.asarray(values).reshape(-1)
    if out is None:
        out = np.empty(v.size, dtype=np.uint8)
    mids = (rebuilt[1:] + rebuilt[:-1]) / 2 if cuts is None else np.asarray(cuts, dtype=np.float64)
    if dtype in ("BF16", "F16"):
        lut = _label_lut(dtype, mids)
        bits = v.view(np.uint16)
        for s in range(0, v.size, _BLOCK):
            np.take(lut, bits[s : s + _BLOCK], out=out[s : s + _BLOCK], mode="clip")
        return out
    m32 = _f32_floor(mids)
    lut = _f32_bucket_lut(m32)
    bits = v.view(np.uint32)
    for s in range(0, v.size, _BLOCK):
        lab = lut.take(bits[s : s + _BLOCK] >> _F32_LOW_BITS)
        split = np.flatnonzero(lab == 0xFFFF)
        if split.size:
            lab[split] = np.searchsorted(m32, v[s : s + _BLOCK].take(split), side="left")
        out[s : s + _BLOCK] = lab
    return out


def label_bounds(hist: ValueHistogram, rebuilt: np.ndarray) -> np.ndarray:
    """Bounds of each label among ``hist.x`` (the rule of `assign_labels`): label ``c`` holds
    ``x[b[c]:b[c+1]]`` (possibly none)."""
    cut = np.searchsorted(hist.x, (rebuilt[1:] + rebuilt[:-1]) / 2, side="right")
    return np.concatenate(([0], cut, [hist.x.size]))


def cluster_values(
    values: np.ndarray,
    dtype: str,
    k: int,
    importance: np.ndarray | None = None,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster one row chunk: return ``(labels, centroids)`` — flat uint8 labels and the fp16 table.

    ``values``: the chunk in storage form (BF16 as uint16 bits, F16 float16, F32 float32).
    ``importance`` (optional, ≥ 0): one weight per value, or a shorter vector repeated along
    the values (one weight per position in a row); the objective becomes the importance-weighted
    squared error. ``method``: ``"exact"`` (optimal) or ``"lloyd"``.

    The table has ``min(k, distinct values)`` entries or fewer (rounding merges); see the
    module docstring for the rounding and tie rules.

    >>> labels, table = cluster_values(np.array([0.0, 0.1, 1.0, 1.1], dtype=np.float32), "F32", 2)
    >>> labels.tolist(), table.tolist()
    ([0, 0, 1, 1], [0.04998779296875, 1.0498046875])
    """
    hist = value_histogram(values, dtype, importance)
    if hist.x.size == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(0, dtype=np.float16)
    (c,) = solve_centroids([hist], k, method)
    table, rebuilt = round_centroids(c, dtype)
    return assign_labels(values, dtype, rebuilt), table
