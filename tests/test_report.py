"""Tests for `wcfmt.cluster.report`: the quality figures stored with a clustered tensor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wcfmt import ClusteredTensor, UsageError, safe_open, save_file
from wcfmt.cluster import cluster_tensor, quality
from wcfmt.cluster.report import SQNR_CAP_DB, ChunkStats, combine

from common import CLUSTER_DTYPES

KEYS = {"rel_error", "sqnr_db", "label_entropy_bits", "k_mean"}


def weights(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_histogram_figures_equal_direct_figures(dtype: torch.dtype, chunk_rows: int | None) -> None:
    """cluster_tensor's figures (from histograms) = quality() (from the rebuilt tensor)."""
    t = weights((23, 40)).to(dtype)
    t[0, 0] = 1.5  # an outlier
    ct = cluster_tensor(t, 8, chunk_rows)
    direct = quality(t, ct)
    assert set(ct.quality) == set(direct) == KEYS
    for key in KEYS:
        assert ct.quality[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key


def test_figures_by_hand() -> None:
    # one chunk, W = [0, 1, 1, 3] rebuilt as [0, 1, 1, 2]: error 1, signal 11
    ct = ClusteredTensor(
        labels=torch.tensor([[0, 1], [1, 2]], dtype=torch.uint8),
        centroids=[torch.tensor([0.0, 1.0, 2.0], dtype=torch.float16)],
        chunk_rows=2,
        dtype=torch.float32,
    )
    q = quality(torch.tensor([[0.0, 1.0], [1.0, 3.0]]), ct)
    assert q["rel_error"] == pytest.approx(math.sqrt(1 / 11))
    assert q["sqnr_db"] == pytest.approx(10 * math.log10(11))
    assert q["label_entropy_bits"] == pytest.approx(1.5)  # p = 1/4, 1/2, 1/4
    assert q["k_mean"] == 3.0


def test_entropy_is_weighted_per_chunk() -> None:
    # chunk 0 (2 rows x 2): labels 0,1,0,1 -> 1 bit; chunk 1 (1 row x 2): one label -> 0 bits
    ct = ClusteredTensor(
        labels=torch.tensor([[0, 1], [0, 1], [0, 0]], dtype=torch.uint8),
        centroids=[torch.tensor([0.0, 1.0], dtype=torch.float16), torch.tensor([5.0], dtype=torch.float16)],
        chunk_rows=2,
        dtype=torch.float32,
    )
    q = quality(torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 5.0]]), ct)
    assert q["label_entropy_bits"] == pytest.approx(4 / 6)  # pooled labels would give 1.46 bits
    assert q["k_mean"] == 1.5
    assert q["rel_error"] == 0.0 and q["sqnr_db"] == SQNR_CAP_DB


def test_exact_and_all_zero_tensors_stay_finite() -> None:
    for t in (torch.zeros(4, 4), torch.tensor([[1.0, 2.0], [2.0, 1.0]])):
        q = cluster_tensor(t, 4).quality
        assert q["rel_error"] == 0.0 and q["sqnr_db"] == SQNR_CAP_DB
        json.dumps(q, allow_nan=False)  # strict JSON, as the header is
    assert combine([]) == {"rel_error": 0.0, "sqnr_db": SQNR_CAP_DB, "label_entropy_bits": 0.0, "k_mean": 0.0}


def test_more_centroids_mean_less_error_and_more_entropy() -> None:
    t = weights((64, 64), 1)
    qs = [cluster_tensor(t, k).quality for k in (2, 8, 32)]
    assert qs[0]["rel_error"] > qs[1]["rel_error"] > qs[2]["rel_error"]
    assert qs[0]["sqnr_db"] < qs[1]["sqnr_db"] < qs[2]["sqnr_db"]
    assert qs[0]["label_entropy_bits"] < qs[1]["label_entropy_bits"] < qs[2]["label_entropy_bits"] <= 5.0
    assert qs[0]["sqnr_db"] == pytest.approx(-20 * math.log10(qs[0]["rel_error"]))


def test_bf16_error_is_measured_after_rebuild() -> None:
    """The figures compare against the bf16 tensor a reader rebuilds, not the fp16 table."""
    t = weights((8, 300), 2).to(torch.bfloat16)
    ct = cluster_tensor(t, 16)
    rebuilt = ct.decode().double()
    err = ((t.double() - rebuilt) ** 2).sum() / (t.double() ** 2).sum()
    assert ct.quality["rel_error"] == pytest.approx(math.sqrt(float(err)), rel=1e-9)


def test_chunk_stats_from_histogram() -> None:
    s = ChunkStats.from_histogram(
        np.array([-1.0, 0.0, 2.0]), np.array([2, 1, 3]), np.array([-0.5, 2.0]), np.array([0, 2, 3])
    )
    assert s.n == 6 and s.sum_sq == 14.0
    assert s.err_sq == pytest.approx(2 * 0.25 + 0.25)
    assert s.label_counts.tolist() == [3.0, 3.0]


def test_quality_rejects_mismatched_shapes() -> None:
    ct = cluster_tensor(torch.zeros(2, 3), 2)
    with pytest.raises(UsageError, match="shapes differ"):
        quality(torch.zeros(3, 2), ct)


def test_quality_survives_a_file_round_trip(tmp_path) -> None:
    ct = cluster_tensor(weights((16, 32), 3).to(torch.bfloat16), 8, 4)
    save_file({"w": ct}, tmp_path / "m.wclust")
    with safe_open(tmp_path / "m.wclust") as f:
        assert f.get_clustered("w").quality == pytest.approx(ct.quality)
