"""Tests for `wcfmt.cluster.kmeans` and `wcfmt.cluster.cluster_tensor`.

The exact DP is checked against the `ckmeans` package (an independent C implementation of
Ckmeans.1d.dp) and, with weights, against brute force over every contiguous partition.
"""

from __future__ import annotations

import itertools

import ckmeans
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wcfmt.cluster as wc
from wcfmt import ClusteredTensor, UsageError
from wcfmt.cluster import cluster_tensor, cluster_values, lloyd_kmeans_1d, optimal_kmeans_1d
from wcfmt.cluster.kmeans import (
    EXACT_MAX_POINTS,
    _pattern_values,
    assign_labels,
    round_centroids,
    solve_centroids,
    value_histogram,
    wcss,
)
from wcfmt.dtypes import name_of, to_numpy

from common import CLUSTER_DTYPES, hypothesis_settings


# -- helpers ------------------------------------------------------------------------------------
def heavy_tailed(n: int, seed: int, outliers: tuple[float, ...] = (9.0, -6.5, 14.0)) -> np.ndarray:
    """Student-t(3) weights at scale 0.02 with a few "super weights"."""
    rng = np.random.default_rng(seed)
    v = rng.standard_t(3, size=n) * 0.02
    v[: len(outliers)] = outliers
    return v


def ckmeans_optimum(data: np.ndarray, k: int) -> float:
    clusters = ckmeans.ckmeans(np.asarray(data, dtype=np.float64), k)
    return sum(float(((c - c.mean()) ** 2).sum()) for c in clusters)


def brute_force(x: np.ndarray, w: np.ndarray, k: int) -> float:
    n = x.size
    return min(
        wcss(x, w, np.array((0, *cuts, n)))
        for cuts in itertools.combinations(range(1, n), min(k, n) - 1)
    )


def nearest_lower(values: np.ndarray, rebuilt: np.ndarray) -> np.ndarray:
    """Reference labels: nearest rebuilt centroid, a tie going to the lower one."""
    d = np.abs(values.astype(np.float64)[:, None] - rebuilt[None, :])
    return d.argmin(axis=1)  # argmin returns the first (lower) of equal distances


def as_float64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy().reshape(-1)


# -- the exact DP -------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "student_t_outliers"])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 64, 255])
def test_exact_matches_ckmeans(dist: str, k: int) -> None:
    rng = np.random.default_rng(k)
    data = rng.normal(size=6000) * 0.02 if dist == "normal" else heavy_tailed(6000, k)
    x, count = np.unique(data, return_counts=True)
    centroids, bounds = optimal_kmeans_1d(x, count.astype(np.float64), k)
    mine = wcss(x, count, bounds)
    opt = ckmeans_optimum(data, k)
    assert mine <= opt * 1.001 + 1e-15
    assert mine >= opt * (1 - 1e-9) - 1e-15  # and not below the optimum: the WCSS is honest
    assert centroids.size == bounds.size - 1 == k
    assert (np.diff(centroids) > 0).all()


def test_exact_is_exact_on_bf16_histogram() -> None:
    """On a real 16-bit histogram (counts as weights) the DP reaches ckmeans' optimum to 1e-9."""
    data = torch.from_numpy(heavy_tailed(40000, 1)).to(torch.bfloat16).double().numpy()
    x, count = np.unique(data, return_counts=True)
    for k in (8, 48):
        _, b = optimal_kmeans_1d(x, count.astype(np.float64), k)
        assert wcss(x, count, b) == pytest.approx(ckmeans_optimum(data, k), rel=1e-9)


def test_weighted_dp_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        x = np.unique(np.round(rng.normal(size=rng.integers(1, 9)), 2))
        w = rng.uniform(0.01, 5.0, size=x.size)
        k = int(rng.integers(1, 6))
        c, b = optimal_kmeans_1d(x, w, k)
        assert wcss(x, w, b) == pytest.approx(brute_force(x, w, k), rel=1e-9, abs=1e-12)
        assert b[0] == 0 and b[-1] == x.size and (np.diff(b) > 0).all()
        # centroids are the weighted means of their clusters
        for ci, (lo, hi) in zip(c, zip(b[:-1], b[1:])):
            assert ci == pytest.approx(np.average(x[lo:hi], weights=w[lo:hi]))


def test_weights_change_the_optimum() -> None:
    x = np.array([0.0, 1.0, 3.0, 4.0])
    heavy = np.array([1.0, 1.0, 1.0, 1000.0])
    _, even = optimal_kmeans_1d(x, np.ones(4), 3)
    _, weighted = optimal_kmeans_1d(x, heavy, 3)
    assert even.tolist() == [0, 1, 2, 4]  # ties go to the partition whose clusters start earliest
    assert weighted.tolist() == [0, 2, 3, 4]  # 4.0 weighs 1000: alone, it costs nothing
    assert wcss(x, heavy, weighted) < wcss(x, heavy, even)


def test_k_at_least_number_of_points() -> None:
    x = np.array([-1.0, 0.5, 3.0])
    c, b = optimal_kmeans_1d(x, np.ones(3), 200)
    assert c.tolist() == x.tolist() and b.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "x, w, k",
    [
        (np.array([1.0, 0.0]), np.ones(2), 2),  # not ascending
        (np.array([0.0, 0.0]), np.ones(2), 2),  # not distinct
        (np.array([0.0, 1.0]), np.array([1.0, 0.0]), 2),  # zero weight
        (np.array([0.0, np.nan]), np.ones(2), 2),
        (np.array([0.0, 1.0]), np.ones(2), 0),
        (np.array([0.0, 1.0]), np.ones(2), 257),
        (np.zeros(0), np.zeros(0), 2),
    ],
)
def test_optimal_kmeans_rejects_bad_input(x: np.ndarray, w: np.ndarray, k: int) -> None:
    with pytest.raises(UsageError):
        optimal_kmeans_1d(x, w, k)


def test_large_f32_grid_path_is_near_optimal() -> None:
    """More distinct values than EXACT_MAX_POINTS: grid DP + Lloyd polish stays within 1e-4."""
    data = heavy_tailed(EXACT_MAX_POINTS * 3, 5).astype(np.float32)
    hist = value_histogram(data, "F32")
    assert hist.x.size > EXACT_MAX_POINTS
    for k in (4, 64):
        (c,) = solve_centroids([hist], k)
        mids = (c[1:] + c[:-1]) / 2
        b = np.concatenate(([0], np.searchsorted(hist.x, mids, side="right"), [hist.x.size]))
        assert wcss(hist.x, hist.count, b) <= ckmeans_optimum(data.astype(np.float64), k) * (1 + 1e-4)


def test_lloyd_is_a_local_optimum_no_better_than_exact() -> None:
    data = heavy_tailed(5000, 3)
    x, count = np.unique(data, return_counts=True)
    w = count.astype(np.float64)
    for k in (2, 8, 32):
        cl, bl = lloyd_kmeans_1d(x, w, k)
        ce, be = optimal_kmeans_1d(x, w, k)
        assert wcss(x, w, bl) >= wcss(x, w, be) * (1 - 1e-12)
        # a fixed point: every value is nearest its own centroid (ties to the lower)
        labels = np.repeat(np.arange(cl.size), np.diff(bl))
        assert (nearest_lower(x, cl) == labels).all()
    # quantile start ignores the super weights: Lloyd is much worse there, which is the point
    assert wcss(x, w, lloyd_kmeans_1d(x, w, 8)[1]) > 2 * wcss(x, w, optimal_kmeans_1d(x, w, 8)[1])


# -- histograms, rounding, labels ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
def test_histogram_path_equals_direct_path(dtype: torch.dtype) -> None:
    name = name_of(dtype)
    t = torch.from_numpy(heavy_tailed(30000, 2)).to(dtype)
    t[5] = -0.0
    t[6] = 0.0
    stored = to_numpy(t)
    imp = np.random.default_rng(0).uniform(0, 2, size=t.numel())
    for importance in (None, imp):
        h = value_histogram(stored, name, importance)
        direct = as_float64(t)
        x, inv, count = np.unique(direct, return_inverse=True, return_counts=True)
        assert h.x.tolist() == x.tolist()  # -0 and +0 are one value
        assert h.count.tolist() == count.tolist()
        want_w = count if importance is None else np.bincount(inv, weights=importance)
        assert np.allclose(h.weight, want_w, rtol=1e-12)
        # clustering the histogram = clustering the raw values one by one
        (c,) = solve_centroids([h], 12)
        c_direct, _ = optimal_kmeans_1d(x, want_w.astype(np.float64), 12)
        assert np.allclose(c, c_direct, rtol=1e-9, atol=1e-12)
    labels, table = cluster_values(stored, name, 12)
    rebuilt = round_centroids(optimal_kmeans_1d(x, count.astype(np.float64), 12)[0], name)[1]
    assert (labels == nearest_lower(as_float64(t), rebuilt)).all()
    assert table.dtype == np.float16 and (np.diff(table.astype(np.float64)) > 0).all()


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
def test_label_ties_go_to_the_lower_centroid(dtype: torch.dtype) -> None:
    name = name_of(dtype)
    # centroids 0 and 1 (k=2 on {0, 0, 1, 1}); 0.5 lies exactly half-way
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.25, 0.75], dtype=dtype)
    h = value_histogram(to_numpy(t), name, np.array([1, 1, 1, 1, 0, 0, 0], dtype=np.float64))
    (c,) = solve_centroids([h], 2)
    table, rebuilt = round_centroids(c, name)
    assert table.tolist() == [0.0, 1.0]
    assert assign_labels(to_numpy(t), name, rebuilt).tolist() == [0, 0, 1, 1, 0, 0, 1]


def test_f32_labels_exact_near_midpoints() -> None:
    """The F32 bucket table + float32-floored midpoints agree with float64 comparisons."""
    rng = np.random.default_rng(4)
    rebuilt = np.unique(rng.normal(size=40).astype(np.float16)).astype(np.float64)
    mids = (rebuilt[1:] + rebuilt[:-1]) / 2
    near = np.concatenate([mids.astype(np.float32), np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
                           rng.normal(size=20000).astype(np.float32), np.float32([0.0, -0.0, 1e-30, -1e-30])])
    got = assign_labels(near, "F32", rebuilt)
    want = np.searchsorted(mids, near.astype(np.float64), side="left")
    assert (got == want).all()


def test_rounding_merges_duplicate_centroids() -> None:
    # optimal centroids 1.0 and 1.0000001 are one fp16 value: the chunk ends with K = 2, not 3
    v = np.array([1.0, 1.0000001, 5.0], dtype=np.float32)
    labels, table = cluster_values(v, "F32", 3)
    assert table.tolist() == [1.0, 5.0]
    assert labels.tolist() == [0, 0, 1]
    # BF16: centroids that differ in fp16 but not in bf16 merge too
    t, r = round_centroids(np.array([0.1, 0.1001]), "BF16")
    assert t.size == r.size == 1


def test_bf16_centroids_round_once_to_bf16() -> None:
    """A BF16 tensor's centroid is the bf16 value nearest the optimal mean (no fp16 detour)."""
    rng = np.random.default_rng(9)
    c = np.sort(rng.normal(size=2000))
    table, rebuilt = round_centroids(c, "BF16")
    want = np.unique(torch.from_numpy(c).to(torch.float32).to(torch.bfloat16).double().numpy())
    # torch rounds float64 -> float32 -> bf16; tie cases of that double rounding are rare enough
    # in 2000 normals that the sets agree, and every table entry rebuilds to itself.
    assert np.array_equal(rebuilt, want)
    assert np.array_equal(table.astype(np.float64), rebuilt)


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_raise(dtype: torch.dtype, bad: float) -> None:
    t = torch.tensor([0.0, 1.0, bad, 2.0], dtype=dtype)
    with pytest.raises(UsageError, match="NaN or infinity"):
        cluster_values(to_numpy(t), name_of(dtype), 2)
    with pytest.raises(UsageError, match="chunk 0"):
        cluster_tensor(t, 2)


def test_centroid_outside_fp16_range_raises() -> None:
    t = torch.tensor([[0.0, 1.0], [1e6, 2.0]], dtype=torch.float32)
    with pytest.raises(UsageError, match="outside the fp16 range"):
        cluster_tensor(t, 4, 1)
    # values beyond fp16 that average into range are fine
    ok = cluster_tensor(torch.tensor([70000.0, 60000.0, 0.0]), 2)
    assert ok.centroids[0].tolist() == [0.0, 64992.0]  # 65000 rounded to fp16


def test_outliers_get_their_own_tail_clusters() -> None:
    t = torch.from_numpy(heavy_tailed(100_000, 11, outliers=(9.0, -6.5, 14.0, 14.0))).to(torch.bfloat16)
    for k in (8, 16):
        labels, table = cluster_values(to_numpy(t), "BF16", k)
        for pos in (0, 1, 2):
            same = labels == labels[pos]
            assert same.sum() == (2 if pos == 2 else 1), "a super weight shares its cluster"
            assert float(table[labels[pos]]) == float(t[pos])  # rebuilt exactly


def test_importance_weighting() -> None:
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(-1, 0.1, 5000), rng.normal(1, 0.1, 5000)]).astype(np.float32)
    imp = np.where(v > 0, 100.0, 1.0)
    _, plain = cluster_values(v, "F32", 8)
    _, weighted = cluster_values(v, "F32", 8, importance=imp)
    assert (plain > 0).sum() == 4
    assert (weighted > 0).sum() > 4  # the important half gets more centroids
    # all-zero importance falls back to the unweighted clustering
    a = cluster_values(v, "F32", 8, importance=np.zeros(v.size))
    assert np.array_equal(a[1], plain)
    # a per-position vector repeats along the values
    rows = v.reshape(100, 100)
    col_imp = np.linspace(0, 1, 100)
    b = cluster_values(rows, "F32", 8, importance=col_imp)
    c = cluster_values(rows, "F32", 8, importance=np.tile(col_imp, 100))
    assert np.array_equal(b[0], c[0]) and np.array_equal(b[1], c[1])
    for bad in (np.full(v.size, -1.0), np.full(7, 1.0), np.full(v.size, np.nan)):
        with pytest.raises(UsageError):
            cluster_values(v, "F32", 8, importance=bad)


def test_cluster_values_rejects_wrong_storage_and_method() -> None:
    with pytest.raises(UsageError, match="stored as uint16"):
        cluster_values(np.zeros(4, np.float32), "BF16", 2)
    with pytest.raises(UsageError, match="cannot cluster dtype"):
        cluster_values(np.zeros(4, np.int8), "I8", 2)
    with pytest.raises(UsageError, match="method"):
        cluster_values(np.zeros(4, np.float32), "F32", 2, method="kmeans++")


# -- cluster_tensor -----------------------------------------------------------------------------
def check_clustered(t: torch.Tensor, ct: ClusteredTensor, k: int, chunk_rows: int | None) -> None:
    """Invariants: shape, chunking, K per chunk, labels = nearest rebuilt centroid."""
    assert isinstance(ct, ClusteredTensor)
    assert tuple(ct.shape) == tuple(t.shape) and ct.dtype == t.dtype
    rows = t.shape[0] if t.dim() else 1
    assert ct.chunk_rows == (max(rows, 1) if chunk_rows is None else chunk_rows)
    flat = as_float64(t).reshape(rows, -1) if t.numel() else None
    labels = ct.labels.numpy().reshape(rows, -1) if t.numel() else None
    for table, (a, b) in zip(ct.centroids, ct.row_ranges()):
        vals = flat[a:b].reshape(-1)
        assert 1 <= table.numel() <= min(k, np.unique(vals).size)
        rebuilt = as_float64(table.to(t.dtype))
        assert (labels[a:b].reshape(-1) == nearest_lower(vals, rebuilt)).all()


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
@pytest.mark.parametrize(
    "shape, chunk_rows",
    [((37, 19), 8), ((37, 19), None), ((50,), 7), ((4, 3, 5), 3), ((), None), ((1, 1), 4), ((6, 0), 2)],
)
def test_cluster_tensor_shapes(dtype: torch.dtype, shape: tuple[int, ...], chunk_rows: int | None) -> None:
    t = torch.from_numpy(heavy_tailed(int(np.prod(shape)), 1, outliers=())).reshape(shape).to(dtype)
    ct = cluster_tensor(t, 6, chunk_rows)
    check_clustered(t, ct, 6, chunk_rows)
    if t.numel():
        assert len(ct.centroids) == -(-(t.shape[0] if t.dim() else 1) // ct.chunk_rows)
        assert (ct.decode().double() - t.double()).abs().max() < 0.1
    else:
        assert ct.centroids == []


def test_cluster_tensor_per_chunk_k() -> None:
    # chunk 0 holds 2 distinct values, chunk 1 many, chunk 2 (the ragged last one) one
    t = torch.cat([torch.tensor([[0.5, -0.5]] * 4), torch.randn(4, 2, generator=torch.Generator().manual_seed(0)),
                   torch.full((1, 2), 3.0)])
    ct = cluster_tensor(t, 4, 4)
    assert ct.ks == [2, 4, 1]
    assert ct.quality["k_mean"] == pytest.approx(7 / 3)
    assert torch.equal(ct.decode()[:4], t[:4]) and torch.equal(ct.decode()[8:], t[8:])


@pytest.mark.parametrize("k", [1, 2])
def test_k_one_and_two(k: int) -> None:
    t = torch.tensor([[-1.0, -1.0], [2.0, 2.0], [2.0, 8.0]], dtype=torch.float16)
    ct = cluster_tensor(t, k)
    if k == 1:
        assert ct.centroids[0].tolist() == [2.0] and ct.labels.max() == 0
    else:
        # {-1,-1,2,2,2} | {8} (WCSS 10.8) beats {-1,-1} | {2,2,2,8} (WCSS 27)
        assert ct.centroids[0].tolist() == [float(np.float16(0.8)), 8.0]
        assert ct.labels.tolist() == [[0, 0], [0, 0], [0, 1]]


def test_k_larger_than_distinct_values_is_lossless() -> None:
    t = torch.tensor([[0.125, -3.0, 7.5], [0.125, 0.125, -3.0]], dtype=torch.bfloat16)
    ct = cluster_tensor(t, 256)
    assert ct.ks == [3] and torch.equal(ct.decode(), t)
    assert ct.quality["rel_error"] == 0.0


def test_importance_shapes() -> None:
    t = torch.randn(16, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    col = torch.rand(12, generator=torch.Generator().manual_seed(2))
    a = cluster_tensor(t, 8, 4, importance=col)
    b = cluster_tensor(t, 8, 4, importance=col.expand(16, 12))
    assert torch.equal(a.labels, b.labels) and all(torch.equal(x, y) for x, y in zip(a.centroids, b.centroids))
    with pytest.raises(UsageError, match="importance has shape"):
        cluster_tensor(t, 8, 4, importance=torch.rand(16))
    with pytest.raises(UsageError, match="finite"):
        cluster_tensor(t, 8, 4, importance=-col)
    z = cluster_tensor(t, 8, 4, importance=torch.zeros(12))  # all zero: unweighted
    u = cluster_tensor(t, 8, 4)
    assert torch.equal(z.labels, u.labels)


def test_cluster_tensor_is_deterministic_across_threads_and_batching() -> None:
    t = torch.from_numpy(heavy_tailed(64 * 300, 6)).reshape(64, 300).to(torch.float16)
    runs = [cluster_tensor(t, 16, 8, threads=n) for n in (1, 2, 3, 1)]
    for r in runs[1:]:
        assert torch.equal(r.labels, runs[0].labels)
        assert all(torch.equal(a, b) for a, b in zip(r.centroids, runs[0].centroids))
        assert r.quality == runs[0].quality
    # batching several chunks through one DP gives each the result it gets alone
    hs = [value_histogram(to_numpy(t[i : i + 8]), "F16") for i in range(0, 64, 8)]
    together = solve_centroids(hs, 16)
    alone = [solve_centroids([h], 16)[0] for h in hs]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))


def test_lloyd_method_through_cluster_tensor() -> None:
    t = torch.from_numpy(heavy_tailed(5000, 8)).reshape(50, 100).float()
    exact = cluster_tensor(t, 8, method="exact")
    lloyd = cluster_tensor(t, 8, method="lloyd")
    assert lloyd.quality["rel_error"] > exact.quality["rel_error"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(k=0), dict(k=257), dict(k=True), dict(k=4, chunk_rows=0), dict(k=4, method="x"), dict(k=4, threads=0)],
)
def test_cluster_tensor_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        cluster_tensor(torch.zeros(4, 4), **kwargs)


def test_cluster_tensor_rejects_other_dtypes() -> None:
    with pytest.raises(UsageError, match="cannot cluster dtype"):
        cluster_tensor(torch.zeros(4, 4, dtype=torch.float64), 4)
    with pytest.raises(UsageError, match="cannot cluster dtype"):
        cluster_tensor(torch.zeros(4, 4, dtype=torch.int32), 4)


@hypothesis_settings(25)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    k=st.integers(1, 256),
    chunk_rows=st.one_of(st.none(), st.integers(1, 5)),
    dtype=st.sampled_from(CLUSTER_DTYPES),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_cluster_tensor_property(shape, k, chunk_rows, dtype, seed, scale) -> None:
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    ct = cluster_tensor(t, k, chunk_rows, threads=1)
    check_clustered(t, ct, k, chunk_rows)
    assert all(np.isfinite(v) for v in ct.quality.values())


def test_public_names() -> None:
    assert sorted(wc.__all__) == sorted(
        ["cluster_tensor", "cluster_values", "ClusterPolicy", "DEFAULT_K", "DEFAULT_CHUNK_ROWS", "METHODS",
         "ECSQ_METHODS", "table_entry_bits", "quality", "optimal_kmeans_1d", "lloyd_kmeans_1d"]
    )
    for name in wc.__all__:
        assert hasattr(wc, name)
    assert wc.DEFAULT_CHUNK_ROWS is None  # one codebook per matrix (tools/RESULTS-smollm2.md)


def test_pattern_tables() -> None:
    bf = _pattern_values("BF16")
    assert bf[0x3F80] == 1.0 and bf[0xBF80] == -1.0 and np.isnan(bf[0x7FC0]) and np.isinf(bf[0x7F80])
    f16 = _pattern_values("F16")
    assert f16[0x3C00] == 1.0 and f16[0x7BFF] == 65504.0


def test_fp16_rounding_is_ieee_round_to_nearest_even() -> None:
    from wcfmt.cluster.kmeans import _round_fp16

    rng = np.random.default_rng(12)
    v = rng.normal(size=50_000) * 10.0 ** rng.integers(-9, 5, 50_000)
    edges = [65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14 - 2.0**-25, 1 + 2.0**-11]
    v = np.concatenate([v, edges])
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    assert np.array_equal(_round_fp16(v), want)
    assert _round_fp16(np.array([1 + 2.0**-11]))[0] == 1.0  # a tie goes to the even neighbour


def test_row_importance_is_a_full_importance_repeated_along_rows() -> None:
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    rows = torch.rand(64, 1, generator=torch.Generator().manual_seed(4)) + 0.01
    for kw in ({"k": 8}, {"bits": 3.0}, {"step": 0.3}):
        a = cluster_tensor(t, chunk_rows=16, importance=rows, **kw)
        b = cluster_tensor(t, chunk_rows=16, importance=rows.expand(64, 48), **kw)
        assert torch.equal(a.labels, b.labels) and all(torch.equal(x, y) for x, y in zip(a.centroids, b.centroids))
    # with the bit-budget encoder, row chunks that matter more get finer cells, so more of them
    w = torch.ones(64, 1)
    w[:16] = 100.0
    ct = cluster_tensor(t, chunk_rows=16, step=0.3, importance=w)
    k = [int(c.numel()) for c in ct.centroids]
    assert k[0] > max(k[1:]), k
    with pytest.raises(UsageError, match=r"\(64, 1\)"):
        cluster_tensor(t, 8, 16, importance=torch.rand(64, 2))
