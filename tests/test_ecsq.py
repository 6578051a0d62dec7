"""The entropy-constrained encoder (wcfmt/cluster/ecsq.py and cluster_tensor(bits=...)).

Expectations come from brute force over every interval partition, from hand-worked cases, and
from measuring what the writer stores — never from the solver under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import wcfmt
from wcfmt.cluster import cluster_tensor
from wcfmt.cluster.ecsq import (
    cell_stats,
    ecsq_cells,
    ecsq_dp,
    lagrangian,
    merge_cells,
    uniform_cells,
)
from wcfmt.cluster.kmeans import ValueHistogram, value_histogram
from wcfmt.dtypes import to_numpy
from wcfmt.errors import UsageError


def j_direct(x: np.ndarray, n: np.ndarray, w: np.ndarray, bounds, lam: float, entry: float) -> float:
    """J = Σ_cells Σ w·(x − μ_w)² + λ·(n_c·log2(N/n_c) + entry) of the partition ``bounds``, from
    its definition (not the module's `lagrangian` or `cell_stats`)."""
    total = float(n.sum())
    j = 0.0
    for a, e in zip(bounds[:-1], bounds[1:]):
        xs, ws, ns = x[a:e], w[a:e], n[a:e]
        mu = float((ws * xs).sum() / ws.sum())
        j += float((ws * (xs - mu) ** 2).sum())
        nc = float(ns.sum())
        j += lam * (nc * -math.log2(nc / total) + entry)
    return j


def brute_force(x: np.ndarray, n: np.ndarray, w: np.ndarray, lam: float, entry: float, k_max: int | None) -> float:
    """Least J over all 2^(M-1) interval partitions, computed directly from its definition."""
    m = x.size
    best = math.inf
    for cuts in itertools.product([0, 1], repeat=m - 1):
        b = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [m]
        if k_max is not None and len(b) - 1 > k_max:
            continue
        best = min(best, j_direct(x, n, w, b, lam, entry))
    return best


def objective(x: np.ndarray, n: np.ndarray, w: np.ndarray, bounds: np.ndarray, lam: float, entry: float) -> float:
    return j_direct(x, n, w, bounds, lam, entry)


def j_of(h: ValueHistogram, bounds: np.ndarray, lam: float, entry: float) -> float:
    return j_direct(h.x.astype(np.float64), h.count.astype(np.float64), h.weight, bounds, lam, entry)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("k_max", [None, 2, 3])
def test_dp_matches_brute_force(seed: int, k_max: int | None) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 10))
    x = np.sort(rng.choice(np.linspace(-3, 3, 61), size=m, replace=False))
    n = rng.integers(1, 50, size=m).astype(np.float64)
    w = n * rng.uniform(0.2, 2.0, size=m) if seed % 2 else n.copy()
    lam = float(rng.choice([0.0, 0.003, 0.03, 0.3]))
    entry = float(rng.choice([0.0, 16.0]))
    bounds = ecsq_dp(x, n, w, lam, entry, k_max=k_max)
    assert bounds[0] == 0 and bounds[-1] == m and (np.diff(bounds) > 0).all()
    if k_max is not None:
        assert bounds.size - 1 <= k_max
    got = objective(x, n, w, bounds, lam, entry)
    assert got == pytest.approx(brute_force(x, n, w, lam, entry, k_max), rel=1e-9, abs=1e-12)


def test_dp_hand_worked() -> None:
    # Two tight pairs far apart: at a small slope two cells, at a huge slope one.
    x, n = np.array([0.0, 0.1, 5.0, 5.1]), np.ones(4)
    assert ecsq_dp(x, n, n, lam=0.01).tolist() == [0, 2, 4]
    assert ecsq_dp(x, n, n, lam=100.0).tolist() == [0, 4]
    # λ = 0: every value its own cell (zero error).
    assert ecsq_dp(x, n, n, lam=0.0).tolist() == [0, 1, 2, 3, 4]


def test_uniform_cells_are_mid_tread() -> None:
    h = ValueHistogram("F32", np.array([-0.51, -0.49, 0.0, 0.49, 0.51, 1.6]), np.ones(6, dtype=np.int64), np.ones(6))
    # cells floor(x + 1/2): -1 | 0 0 0 | 1 | 2
    assert uniform_cells(h, 1.0).tolist() == [0, 1, 4, 5, 6]
    with pytest.raises(UsageError):
        uniform_cells(h, 0.0)


def test_merge_respects_cap_and_only_lowers_j() -> None:
    rng = np.random.default_rng(3)
    v = rng.standard_t(3, size=200_000).astype(np.float32)
    h = value_histogram(v, "F32")
    stats = cell_stats(h, uniform_cells(h, 0.01))
    assert stats.n.size > 256
    lam = 1e-3
    capped = merge_cells(stats, lam, 16.0, k_max=256)
    assert capped.size - 1 <= 256
    # Without a binding cap a merge happens only when it lowers J.
    few = uniform_cells(h, 0.5)
    merged = merge_cells(cell_stats(h, few), lam, 16.0, k_max=256)
    assert merged.size < few.size and j_of(h, merged, lam, 16.0) <= j_of(h, few, lam, 16.0)


def test_fast_path_close_to_dp_optimum() -> None:
    # The uniform quantiser + merges is within 1% of the exact ECSQ optimum's J at equal slope.
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.standard_t(4, size=300_000).astype(np.float32) * 0.02).to(torch.bfloat16)
    h = value_histogram(to_numpy(v), "BF16")
    for step in (0.004, 0.002):
        fast = ecsq_cells(h, step, 16.0).bounds
        lam = step * step * math.log(2) / 6
        exact = ecsq_dp(h.x, h.count, h.weight, lam, 16.0)
        jf, je = j_of(h, fast, lam, 16.0), j_of(h, exact, lam, 16.0)
        assert je <= jf * (1 + 1e-12)
        assert jf <= je * 1.01


def stored_bits_per_weight(path, name: str) -> float:
    """Bits per weight of one clustered tensor as stored: its blobs' lengths, read from the header."""
    from wcfmt.reader import WclustReader

    r = WclustReader(path)
    try:
        entry = r.header.tensors[name]
    finally:
        r.close()
    return 8 * sum(c.labels.length + c.centroids.length for c in entry.chunks) / math.prod(entry.shape)


@pytest.mark.parametrize("bits", [2.5, 3.5, 4.5, 5.5, 6.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_achieved_bits_within_two_percent(tmp_path, bits: float, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(int(bits * 10))
    w = torch.from_numpy(rng.standard_t(4, size=(512, 1024)).astype(np.float32) * 0.02).to(dtype)
    ct = cluster_tensor(w, bits=bits, threads=1)
    from wcfmt.convert import cluster_for_storage  # what pack stores: 256-row storage chunks

    stored = cluster_for_storage(w, None, None, threads=1, bits=bits)
    assert torch.equal(stored.decode(), ct.decode())
    path = tmp_path / "w.wclust"
    wcfmt.save_file({"w": stored}, path)
    got = stored_bits_per_weight(path, "w")
    assert got == pytest.approx(bits, rel=0.02)
    assert max(ct.ks) <= 256


def test_cap_256_on_heavy_tails() -> None:
    # Many bits on a heavy-tailed matrix wants more than 256 cells: the cap holds.
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_t(1.5, size=(1024, 512)).astype(np.float32)).to(torch.bfloat16)
    ct = cluster_tensor(w, bits=9.0, threads=1)
    assert max(ct.ks) <= 256
    assert ct.ks[0] >= 200


def test_deterministic_bytes(tmp_path) -> None:
    w = (torch.randn(300, 700, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    a = cluster_tensor(w, bits=4.0, chunk_rows=128, threads=1)
    b = cluster_tensor(w, bits=4.0, chunk_rows=128, threads=3)
    wcfmt.save_file({"w": a}, tmp_path / "a.wclust")
    wcfmt.save_file({"w": b}, tmp_path / "b.wclust")
    assert (tmp_path / "a.wclust").read_bytes() == (tmp_path / "b.wclust").read_bytes()


def test_labels_decode_to_cell_means_and_tables_ascend() -> None:
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.laplace(size=(64, 256)).astype(np.float32))
    ct = cluster_tensor(w, bits=3.0, threads=1)
    table = ct.centroids[0].to(torch.float64)
    assert (table[1:] > table[:-1]).all()
    lab = ct.labels.reshape(-1).long()
    x = w.reshape(-1).to(torch.float64)
    # every label's values form an interval, in label order (a label is its centroid's rank)
    lo = torch.full((table.numel(),), math.inf, dtype=torch.float64).scatter_reduce(0, lab, x, "amin")
    hi = torch.full((table.numel(),), -math.inf, dtype=torch.float64).scatter_reduce(0, lab, x, "amax")
    assert (hi[:-1] < lo[1:]).all()
    # centroid = the cell's mean, rounded to fp16 (F32 tensor)
    mean = torch.zeros(table.numel(), dtype=torch.float64).index_add_(0, lab, x) / torch.bincount(lab).to(torch.float64)
    assert torch.equal(mean.to(torch.float16).to(torch.float64), table)


def test_ecsq_beats_kmeans_on_heavy_tails_at_equal_entropy() -> None:
    # The point of the encoder: at the same label entropy, a lower error than k-means.
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_t(3, size=(512, 1024)).astype(np.float32) * 0.02).to(torch.bfloat16)
    km = cluster_tensor(w, k=32, threads=1)
    target = km.quality["label_entropy_bits"]
    ec = cluster_tensor(w, bits=target, threads=1)
    assert ec.quality["label_entropy_bits"] <= target
    assert ec.quality["sqnr_db"] > km.quality["sqnr_db"] + 0.5


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"k": 16, "bits": 4.0}, {"bits": 0}, {"bits": -1.0}, {"bits": float("nan")}, {"bits": 17.0},
     {"step": 0.0}, {"bits": 4.0, "method": "exact"}, {"k": 16, "method": "dp"}, {"bits": True}],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        cluster_tensor(torch.randn(8, 8), **kwargs)


# -- weighted paths pinned by value (mutation audit 0.2: E2-E5; lagrangian itself checked) ---------
def test_lagrangian_is_j_from_its_definition() -> None:
    rng = np.random.default_rng(5)
    x = np.sort(rng.choice(np.linspace(-2, 2, 81), size=20, replace=False))
    n = rng.integers(1, 30, size=20).astype(np.float64)
    w = n * rng.uniform(0.3, 3.0, size=20)
    h = ValueHistogram("F32", x, n.astype(np.int64), w)
    b = np.array([0, 3, 4, 11, 20])
    for lam, entry in ((0.0, 0.0), (0.02, 0.0), (0.3, 16.0)):
        assert lagrangian(cell_stats(h, b), lam, entry) == pytest.approx(j_direct(x, n, w, b, lam, entry), rel=1e-12)


def test_rate_bits_hand_worked() -> None:
    """Counts 2, 1, 1: Huffman lengths 1, 2, 2 = 6 bits, times zstd's measured 1.012 (the
    module's constant, from tools/bench_format.py --labels), plus 3 entries × 16 bits."""
    from wcfmt.cluster.ecsq import rate_bits

    h = ValueHistogram("F32", np.array([0.0, 1.0, 2.0]), np.array([2, 1, 1]), np.ones(3))
    stats = cell_stats(h, np.array([0, 1, 2, 3]))
    assert rate_bits(stats, 16.0) == pytest.approx(6 * 1.012 + 48, rel=1e-12)
    assert rate_bits(stats, 0.0) == pytest.approx(6.072, rel=1e-12)


def test_equal_slope_scales_hand_worked() -> None:
    """ω = 4 → 1/√4 = 0.5, ω = 1/4 → 2: and the slope ω·(s·scale)²·ln2/6 is then the same for both."""
    from wcfmt.cluster.ecsq import equal_slope_scales, slope_of_step

    x = np.array([-1.0, 0.0, 1.0])
    heavy = ValueHistogram("F32", x, np.array([1, 2, 1]), np.array([4.0, 8.0, 4.0]))
    light = ValueHistogram("F32", x, np.array([1, 2, 1]), np.array([0.25, 0.5, 0.25]))
    assert equal_slope_scales([heavy, light]) == pytest.approx([0.5, 2.0], rel=1e-12)
    s = 0.1
    assert slope_of_step(s * 0.5, 4.0) == pytest.approx(slope_of_step(s * 2.0, 0.25), rel=1e-12)
    assert slope_of_step(s, 1.0) == pytest.approx(s * s * math.log(2) / 6, rel=1e-12)


@pytest.mark.parametrize("omega", [0.01, 100.0])
def test_ecsq_cells_do_not_depend_on_the_scale_of_importance(omega: float) -> None:
    """J = ω·SSE + λ·R at λ = ω·s²·ln2/6 is ω × (SSE + s²ln2/6·R): a constant importance ω
    scales J and so chooses the same cells as ω = 1. The step is small enough that cells merge."""
    rng = np.random.default_rng(1)
    h1 = value_histogram(rng.standard_t(3, size=50_000).astype(np.float32), "F32")
    hw = ValueHistogram("F32", h1.x, h1.count, h1.weight * omega)
    base = ecsq_cells(h1, 0.05, 16.0)
    assert base.n.size < uniform_cells(h1, 0.05).size - 1  # merges happened
    assert ecsq_cells(hw, 0.05, 16.0).bounds.tolist() == base.bounds.tolist()


def greedy_merge(x: np.ndarray, n: np.ndarray, w: np.ndarray, bounds: list[int], lam: float, entry: float,
                 k_max: int) -> list[int]:
    """`merge_cells`' rule by a second formula: every step, the adjacent pair whose merge changes J
    least (J's change from the points themselves: Σw(x−μ)² after minus before, not the
    w1·w2/(w1+w2)·(m1−m2)² identity), leftmost of ties; merge while it lowers J or cells > k_max."""

    def sse(a: int, e: int) -> float:
        mu = float((w[a:e] * x[a:e]).sum() / w[a:e].sum())
        return float((w[a:e] * (x[a:e] - mu) ** 2).sum())

    def xl(a: int, e: int) -> float:
        c = float(n[a:e].sum())
        return c * math.log2(c)

    b = list(bounds)
    while len(b) > 2:
        costs = [sse(b[i], b[i + 2]) - sse(b[i], b[i + 1]) - sse(b[i + 1], b[i + 2])
                 + lam * (xl(b[i], b[i + 1]) + xl(b[i + 1], b[i + 2]) - xl(b[i], b[i + 2]) - entry)
                 for i in range(len(b) - 2)]
        i = int(np.argmin(costs))
        if costs[i] >= 0 and len(b) - 1 <= k_max:
            break
        del b[i + 1]
    return b


@pytest.mark.parametrize("entry", [0.0, 16.0])
@pytest.mark.parametrize("seed", range(8))
def test_merge_cells_matches_the_greedy_rule_by_a_second_formula(seed: int, entry: float) -> None:
    rng = np.random.default_rng(seed)
    m = 40
    x = np.sort(rng.choice(np.linspace(-4, 4, 801), size=m, replace=False))
    n = rng.integers(1, 40, size=m).astype(np.float64)
    w = n * rng.uniform(0.2, 5.0, size=m)
    h = ValueHistogram("F32", x, n.astype(np.int64), w)
    start = uniform_cells(h, 0.25)
    lam, k_max = float(rng.choice([0.01, 0.05])), int(rng.integers(3, 6))
    got = merge_cells(cell_stats(h, start), lam, entry, k_max=k_max)
    assert got.tolist() == greedy_merge(x, n, w, start.tolist(), lam, entry, k_max)
    # two cells, one allowed: they merge
    two = np.array([0, 20, 40])
    assert merge_cells(cell_stats(h, two), 0.0, 0.0, k_max=1).tolist() == [0, 40]


@pytest.mark.parametrize("entry", [0.0, 16.0])
@pytest.mark.parametrize("seed", range(4))
def test_dp_cells_is_the_optimum_then_the_greedy_merge_under_the_cap(seed: int, entry: float) -> None:
    """Uncapped: the least J over every partition (brute force). Over the cap: the DP's cells
    merged by the greedy rule (the second formula above) down to k_max."""
    from wcfmt.cluster.ecsq import dp_cells

    rng = np.random.default_rng(seed)
    m = 9
    x = np.sort(rng.choice(np.linspace(-3, 3, 121), size=m, replace=False))
    n = rng.integers(1, 40, size=m).astype(np.float64)
    w = n * rng.uniform(0.3, 3.0, size=m)
    h = ValueHistogram("F32", x, n.astype(np.int64), w)
    lam = 0.3 if entry == 0 else 0.01
    free = dp_cells(h, lam, entry)
    assert j_direct(x, n, w, free.bounds, lam, entry) == pytest.approx(brute_force(x, n, w, lam, entry, None), rel=1e-9)
    assert free.n.size < m  # some values share a cell at this slope
    assert free.n.tolist() == [float(n[a:e].sum()) for a, e in zip(free.bounds[:-1], free.bounds[1:])]
    k = free.n.size
    assert k >= 3
    capped = dp_cells(h, lam, entry, k_max=k - 2)
    assert capped.bounds.tolist() == greedy_merge(x, n, w, free.bounds.tolist(), lam, entry, k - 2)
    mean = [float((w[a:e] * x[a:e]).sum() / w[a:e].sum()) for a, e in zip(capped.bounds[:-1], capped.bounds[1:])]
    assert capped.mean.tolist() == pytest.approx(mean, rel=1e-12)


# -- step_for_bits and ecsq_dp at their edges (mutants of tools/mutation.py on ecsq.py) ------------
def _normal_hist(seed: int = 0, n: int = 4_000) -> ValueHistogram:
    return value_histogram(np.random.default_rng(seed).normal(size=n).astype(np.float32), "F32")


def test_step_for_bits_scales_divide_the_common_step() -> None:
    """Cells are s·scale wide: scale 1 is the default, and scale 2 (or 0.1) gives the same cells
    at half (ten times) the common step."""
    from wcfmt.cluster.ecsq import step_for_bits

    h = _normal_hist()
    s1 = step_for_bits([h], 4.0, [16.0])
    assert step_for_bits([h], 4.0, [16.0], [1.0]) == s1
    assert step_for_bits([h], 4.0, [16.0], [2.0]) == pytest.approx(s1 / 2, rel=1e-5)
    assert step_for_bits([h], 4.0, [16.0], [0.1]) == pytest.approx(s1 * 10, rel=1e-5)


def test_step_for_bits_edges() -> None:
    """Budgets must be positive and finite (0.5 bits is one); no values: step 1; one value 0: a
    single cell can never spend the budget, so the step walks down to its lower bracket, a
    quarter of the 4 × 1.0 upper one; k_max = 4 caps the rate at 2 bits/label, so a 4-bit budget
    is never reached and the step walks down to a quarter of the smallest gap."""
    from wcfmt.cluster.ecsq import step_for_bits

    h = _normal_hist()
    assert step_for_bits([h], 0.5, [16.0]) > step_for_bits([h], 4.0, [16.0]) > 0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="bits must be a positive number"):
            step_for_bits([h], bad, [16.0])
    empty = ValueHistogram("F32", np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
    assert step_for_bits([empty], 4.0, [16.0]) == 1.0
    zeros = ValueHistogram("F32", np.zeros(1), np.array([1000]), np.full(1, 1000.0))
    assert step_for_bits([zeros], 4.0, [16.0]) == pytest.approx(1.0, rel=1e-6)
    threes = ValueHistogram("F32", np.full(1, 3.0), np.array([1000]), np.full(1, 1000.0))  # span |3|: 4·3/4
    assert step_for_bits([threes], 4.0, [16.0]) == pytest.approx(3.0, rel=1e-6)
    lo = 0.25 * float(np.diff(h.x).min())
    assert step_for_bits([h], 4.0, [16.0], k_max=4) == pytest.approx(lo, rel=1e-6)


def test_ecsq_dp_arguments() -> None:
    x, n = np.array([0.0, 1.0, 2.0]), np.ones(3)
    assert ecsq_dp(x, n, n, 1.0, k_max=1).tolist() == [0, 3]
    assert ecsq_dp(x.astype(np.float32), n.astype(np.int64), n, 0.0).tolist() == [0, 1, 2, 3]
    bad = [((np.zeros(0), np.zeros(0), np.zeros(0), 0.1), {}), ((x, n[:2], n, 0.1), {}), ((x, n, n[:2], 0.1), {}),
           ((x, n, n, -1.0), {}), ((x, n, n, math.inf), {}), ((x, n, n, math.nan), {}),
           ((x, n, n, 0.1), {"k_max": 0}), ((x, n, n, 0.1), {"k_max": True}), ((x, n, n, 0.1), {"k_max": 2.0})]
    for args, kw in bad:
        with pytest.raises(UsageError):
            ecsq_dp(*args, **kw)


def test_huffman_bits_edges_and_empty_scales() -> None:
    """Zero counts are no symbols; one symbol costs 1 bit each; two cost 1 bit each; an empty
    histogram's scale is 1."""
    from wcfmt.cluster.ecsq import equal_slope_scales, huffman_bits

    assert huffman_bits(np.array([2.0, 0.0, 1.0, 1.0, 0.0])) == 6.0
    assert huffman_bits(np.array([5.0])) == 5.0 and huffman_bits(np.array([0.0, 5.0])) == 5.0
    assert huffman_bits(np.array([3.0, 9.0])) == 12.0
    empty = ValueHistogram("F32", np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
    assert equal_slope_scales([empty]) == [1.0]


def test_table_for_cells_merges_cells_that_round_to_one_value() -> None:
    """Cells with means 0, 1, 1 + 2^-20 and 2: the two middle means are one fp16 value (1.0), so
    they share a label: label bounds 0 | 1 2 | 3, a table of three values, cuts midway."""
    from wcfmt.cluster.ecsq import table_for_cells

    x = np.array([0.0, 1.0, 1.0 + 2.0 ** -20, 2.0])
    h = ValueHistogram("F32", x, np.ones(4, dtype=np.int64), np.ones(4))
    table, rebuilt, bounds, cuts = table_for_cells(h, cell_stats(h, np.array([0, 1, 2, 3, 4])), "F32")
    assert rebuilt.tolist() == [0.0, 1.0, 2.0] and bounds.tolist() == [0, 1, 3, 4]
    assert cuts.tolist() == pytest.approx([0.5, (1.0 + 2.0 ** -20 + 2.0) / 2], rel=1e-12)


def huffman_reference(counts: list[float], cap: int = 11) -> float:
    """Σ count · min(code length, cap) of a Huffman code built with heapq (a second construction)."""
    import heapq

    c = [x for x in counts if x > 0]
    if len(c) == 1:
        return c[0]
    heap = [(x, i, [i]) for i, x in enumerate(c)]
    heapq.heapify(heap)
    depth, order = [0] * len(c), len(c)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for i in a[2] + b[2]:
            depth[i] += 1
        heapq.heappush(heap, (a[0] + b[0], order, a[2] + b[2]))
        order += 1
    return float(sum(x * min(d, cap) for x, d in zip(c, depth)))


def test_huffman_bits_against_a_heap_construction_and_the_cap() -> None:
    from wcfmt.cluster.ecsq import huffman_bits

    rng = np.random.default_rng(0)
    for _ in range(30):
        counts = rng.uniform(1, 1000, size=int(rng.integers(2, 40))) * rng.integers(1, 3)
        assert huffman_bits(counts) == pytest.approx(huffman_reference(counts.tolist()), rel=1e-12)
    # near-Fibonacci counts: a depth of 15 uncapped, so the 11-bit cap changes the total
    fib = [1.0, 1.3]
    while len(fib) < 16:
        fib.append(fib[-1] + fib[-2] + 0.1)
    assert huffman_reference(fib, cap=99) > huffman_reference(fib)
    assert huffman_bits(np.array(fib)) == pytest.approx(huffman_reference(fib), rel=1e-12)
