"""Calibration (wcfmt/cluster/calibrate.py): GPTQ labels onto a fixed grid, and the Hessians it needs.

Expectations come from independent computations: nearest rounding by argmin in numpy, the
output error ‖(W − Ŵ)Xᵀ‖ from the activations themselves, a second, unblocked GPTQ that updates
H⁻¹ explicitly (the OBQ form) instead of using its Cholesky factor, and, for the Hessians, the
model's own final hidden states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wcfmt import UsageError
from wcfmt.cluster import cluster_tensor
from wcfmt.cluster.calibrate import (
    _diagonal, _diagonal_16bit, _gptq, calibrate_clustered, collect_hessians, collect_random_diagonals, column_weights,
    gptq_labels, inverse_cholesky, random_windows,
)
from wcfmt.clustered_tensor import ClusteredTensor


def correlated_inputs(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Activations with strongly correlated columns (as a transformer's are) and unequal scales."""
    z = rng.standard_normal((n, cols))
    mix = np.eye(cols) + 0.8 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    return (z @ mix) * rng.uniform(0.3, 3.0, cols)


def nearest(w: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Nearest grid value by brute force; ties to the lower one (argmin takes the first)."""
    return np.argmin(np.abs(w[..., None] - grid), axis=-1)


def reference_gptq(w: np.ndarray, h: np.ndarray, grid: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """GPTQ without Cholesky or blocks: after each column, H⁻¹ loses that row/column (OBQ update)."""
    h = h / np.mean(np.diag(h)) + damp * np.eye(len(h))
    hinv = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    labels = np.zeros(w.shape, dtype=np.int64)
    for j in range(w.shape[1]):
        labels[:, j] = nearest(w[:, j], grid)
        err = (w[:, j] - grid[labels[:, j]]) / hinv[j, j]
        w[:, j + 1 :] -= np.outer(err, hinv[j, j + 1 :])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return labels


def output_error(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((w - w_hat) @ x.T))


def test_gptq_lowers_output_error_against_nearest() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        rows, cols = 24, 40
        w = rng.standard_normal((rows, cols))
        x = correlated_inputs(rng, 400, cols)
        grid = np.linspace(-2.5, 2.5, 8)
        near = nearest(w, grid)
        g = gptq_labels(w, x.T @ x, grid)
        assert g.dtype == np.uint8 and g.shape == w.shape
        e_near, e_gptq = output_error(w, grid[near], x), output_error(w, grid[g], x)
        assert e_gptq < 0.9 * e_near, (e_gptq, e_near)
        # ... while the weights themselves move further from the originals.
        assert np.linalg.norm(w - grid[g]) > np.linalg.norm(w - grid[near])


def test_gptq_matches_unblocked_reference() -> None:
    rng = np.random.default_rng(1)
    rows, cols = 6, 300  # more columns than one block of 128: the lazy block updates are used
    w = rng.standard_normal((rows, cols))
    x = correlated_inputs(rng, 1000, cols)
    grid = np.sort(rng.uniform(-3, 3, 16))
    assert np.array_equal(gptq_labels(w, x.T @ x, grid), reference_gptq(w, x.T @ x, grid))


@pytest.mark.parametrize("h", [np.eye(7), np.diag([0.1, 5.0, 1.0, 2.0, 0.0, 3.0, 1.0])])
def test_diagonal_h_is_nearest_rounding(h: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, (9, 7))
    w[0, 0] = 0.25  # exactly between 0.0 and 0.5: ties go to the lower, as assign_labels does
    grid = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert np.array_equal(gptq_labels(w, h, grid), nearest(w, grid))
    assert gptq_labels(w, h, grid)[0, 0] == 2


def test_labels_below_k_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 64)) * 3  # many weights beyond the grid's ends
    x = correlated_inputs(rng, 200, 64)
    grid = np.array([-0.5, 0.0, 0.7])
    a = gptq_labels(w, x.T @ x, grid)
    assert a.max() < 3
    assert np.array_equal(a, gptq_labels(w.copy(), (x.T @ x).copy(), grid.copy()))
    assert np.array_equal(a, gptq_labels(w, 17.0 * (x.T @ x), grid))  # H's scale does not matter


def test_entropy_term_hand_worked() -> None:
    # H = I (+1% damp): U_jj² = 1/1.01. w = 0.6 on grid {0, 1}, code lengths 0.1 and 5 bits:
    # λ = 0: 0.16 < 0.36 → label 1. λ = 1: 1.01·0.36 + 0.1 = 0.464 < 1.01·0.16 + 5 → label 0.
    w, grid, bits = np.array([[0.6]]), np.array([0.0, 1.0]), np.array([0.1, 5.0])
    assert gptq_labels(w, np.eye(1), grid).tolist() == [[1]]
    assert gptq_labels(w, np.eye(1), grid, lam=1.0, code_bits=bits).tolist() == [[0]]
    # λ = 0.04: 0.3636 + 0.004 = 0.3676 > 0.1616 + 0.2 = 0.3616 → still label 1.
    assert gptq_labels(w, np.eye(1), grid, lam=0.04, code_bits=bits).tolist() == [[1]]


def test_entropy_term_lowers_label_entropy() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 48))
    x = correlated_inputs(rng, 300, 48)
    grid = np.linspace(-3, 3, 13)
    counts = np.bincount(nearest(w, grid).reshape(-1), minlength=13) + 1.0
    bits = -np.log2(counts / counts.sum())

    def entropy(lab: np.ndarray) -> float:
        p = np.bincount(lab.reshape(-1), minlength=13) / lab.size
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    h = x.T @ x
    assert entropy(gptq_labels(w, h, grid, lam=0.3, code_bits=bits)) < entropy(gptq_labels(w, h, grid)) - 0.1


def test_inverse_cholesky_is_the_factor_of_the_dampened_inverse() -> None:
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 50, 10)
    h = x.T @ x
    u = inverse_cholesky(h, 0.05)
    assert np.allclose(u, np.triu(u))
    want = np.linalg.inv(h / np.mean(np.diag(h)) + 0.05 * np.eye(10))
    assert np.allclose(u.T @ u, want, rtol=1e-9, atol=1e-12)


def test_bad_arguments_are_usage_errors() -> None:
    w, grid = np.zeros((2, 3)), np.array([0.0, 1.0])
    with pytest.raises(UsageError, match="columns"):
        gptq_labels(w, np.eye(4), grid)
    with pytest.raises(UsageError, match="ascending"):
        gptq_labels(w, np.eye(3), np.array([1.0, 0.0]))
    with pytest.raises(UsageError, match="NaN"):
        gptq_labels(np.full((2, 3), np.nan), np.eye(3), grid)
    with pytest.raises(UsageError, match="code_bits"):
        gptq_labels(w, np.eye(3), grid, lam=1.0)
    with pytest.raises(UsageError, match="square"):
        inverse_cholesky(np.zeros((2, 3)))
    with pytest.raises(ValueError):  # UsageError is also a ValueError
        gptq_labels(np.zeros(3), np.eye(3), grid)


# -- ClusteredTensor ---------------------------------------------------------------------------
def _clustered_problem(seed: int = 6) -> tuple[torch.Tensor, np.ndarray, np.ndarray, ClusteredTensor]:
    rng = np.random.default_rng(seed)
    rows, cols = 64, 48
    w = torch.tensor(rng.standard_normal((rows, cols)) * 0.05, dtype=torch.bfloat16)
    x = correlated_inputs(rng, 500, cols)
    ct = cluster_tensor(w, k=8).rechunk(16)  # one codebook stored in 4 chunks
    return w, x, x.T @ x / len(x), ct


def test_calibrate_clustered_keeps_tables_and_lowers_output_error() -> None:
    w, x, h, ct = _clustered_problem()
    out = calibrate_clustered(ct, w, h, name="layer.weight")
    assert out.chunk_rows == ct.chunk_rows and out.shape == ct.shape and out.dtype == ct.dtype
    assert all(torch.equal(a, b) for a, b in zip(out.centroids, ct.centroids))
    w64 = w.double().numpy()
    e_before = output_error(w64, ct.decode().double().numpy(), x)
    e_after = output_error(w64, out.decode().double().numpy(), x)
    assert e_after < 0.85 * e_before, (e_after, e_before)
    # Recomputed quality agrees with an independent computation of the relative error.
    rel = np.linalg.norm(w64 - out.decode().double().numpy()) / np.linalg.norm(w64)
    assert out.quality is not None and out.quality["rel_error"] == pytest.approx(rel, rel=1e-12)
    # The same grid as the table: identical to gptq_labels on the table's rebuilt values.
    grid = ct.centroids[0].to(torch.bfloat16).double().numpy()
    assert np.array_equal(out.labels.numpy(), gptq_labels(w64, h, grid))


def test_calibrate_clustered_refit_tables_are_valid_and_help() -> None:
    w, x, h, ct = _clustered_problem(7)
    out = calibrate_clustered(ct, w, h, refit=True)
    out.validate()  # strictly ascending finite fp16 tables, labels < K
    assert len({tuple(t.tolist()) for t in out.centroids}) == 1  # one codebook, still shared
    w64 = w.double().numpy()
    e_grid = output_error(w64, calibrate_clustered(ct, w, h).decode().double().numpy(), x)
    e_near = output_error(w64, ct.decode().double().numpy(), x)
    assert output_error(w64, out.decode().double().numpy(), x) < e_near
    assert e_grid < e_near


def test_calibrate_clustered_per_chunk_tables_and_determinism() -> None:
    rng = np.random.default_rng(8)
    w = torch.tensor(rng.standard_normal((40, 24)), dtype=torch.float32)
    x = correlated_inputs(rng, 300, 24)
    h = x.T @ x
    ct = cluster_tensor(w, k=6, chunk_rows=10)  # four different tables
    a, b = calibrate_clustered(ct, w, h), calibrate_clustered(ct, w.clone(), h.copy())
    assert torch.equal(a.labels, b.labels)
    for i, (lo, hi) in enumerate(ct.row_ranges()):
        grid = ct.centroids[i].double().numpy()
        assert np.array_equal(a.labels[lo:hi].numpy(), gptq_labels(w[lo:hi].double().numpy(), h, grid))


def test_calibrate_clustered_errors_name_the_tensor() -> None:
    w, _, h, ct = _clustered_problem()
    with pytest.raises(UsageError, match="'blk.0': H has shape"):
        calibrate_clustered(ct, w, h[:5, :5], name="blk.0")
    with pytest.raises(UsageError, match="shape"):
        calibrate_clustered(ct, w[:10], h)
    v = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="matrix"):
        calibrate_clustered(cluster_tensor(v, k=2), v, np.eye(8))


# -- a diagonal H: column weights without the GPTQ loop ------------------------------------------
def _weighted_problem(seed: int, rows: int = 90, cols: int = 70):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(rows, cols)) * 0.02
    grid = np.unique(np.round(rng.standard_t(4, size=40) * 0.03, 4))
    omega = column_weights(rng.lognormal(0.0, 2.0, size=cols))
    counts = np.bincount(nearest(w, grid).reshape(-1), minlength=grid.size)
    code_bits = -np.log2(np.maximum(counts, 1) / counts.sum())
    return w, grid, omega, code_bits


def windowed_choice(w: np.ndarray, omega: np.ndarray, grid: np.ndarray, lam: float, bits: np.ndarray | None) -> np.ndarray:
    """The documented rule by brute force, weight by weight: among the grid values at most two
    steps from the nearest (ties to the lower), the least ω_j·(w − c)² + λ·bits(c), the lowest
    of ties. Nothing shared with the module (no padded grid, no candidate window array)."""
    near = nearest(w, grid)
    if not lam:
        return near
    out = np.empty_like(near)
    for (r, c), x in np.ndenumerate(w):
        best, arg = np.inf, -1
        for i in range(max(0, near[r, c] - 2), min(grid.size, near[r, c] + 3)):
            cost = omega[c] * (x - grid[i]) ** 2 + lam * bits[i]
            if cost < best:
                best, arg = cost, i
        out[r, c] = arg
    return out


@pytest.mark.parametrize("lam", [0.0, 1e-5, 3e-4, 3e-3])
def test_diagonal_and_the_gptq_loop_follow_the_windowed_rule(lam: float) -> None:
    for seed in range(3):
        w, grid, omega, bits = _weighted_problem(seed, rows=40)
        want = windowed_choice(w, omega, grid, lam, bits)
        got = _diagonal(w, omega, grid, lam, bits if lam else None)
        assert np.array_equal(got, want)
        loop = _gptq(w, np.diag(1 / np.sqrt(omega)), grid, lam, bits if lam else None)  # U_jj = 1/√ω, nothing fed on
        assert np.array_equal(loop, want)
        if lam:  # the entropy term moves labels, more where ω is small
            moved = got != nearest(w, grid)
            assert moved.any() and moved[:, omega < 0.5].mean() > moved[:, omega > 2].mean()
        if lam == 3e-3:  # and at this slope some labels move two steps: the window is ±2, not ±1
            assert (np.abs(got.astype(int) - nearest(w, grid)) == 2).any()


def test_diagonal_ties_go_to_the_lower_value() -> None:
    """w = 0.75 on {0, 1}, ω = 1, λ = 1, code lengths 0 and 0.5 bits: 0.5625 + 0 = 0.0625 + 0.5
    exactly (binary fractions), so the lower value wins, on every path."""
    w, grid, bits, omega = np.array([[0.75]]), np.array([0.0, 1.0]), np.array([0.0, 0.5]), np.ones(1)
    assert _diagonal(w, omega, grid, 1.0, bits).tolist() == [[0]]
    assert _gptq(w, np.eye(1), grid, 1.0, bits).tolist() == [[0]]
    pattern = np.array([[0x3A00]], dtype=np.uint16)  # 0.75 in fp16
    assert _diagonal_16bit(pattern, "F16", omega, grid, 1.0, bits).tolist() == [[0]]
    # just off the tie, the cheaper side wins
    assert _diagonal(np.array([[0.76]]), omega, grid, 1.0, bits).tolist() == [[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diagonal_by_tables_equals_diagonal(dtype: torch.dtype) -> None:
    from wcfmt.dtypes import name_of, to_numpy

    w, grid, omega, bits = _weighted_problem(4, rows=200, cols=64)
    t = torch.tensor(w).to(dtype)
    patterns = to_numpy(t).view(np.uint16)
    for lam in (0.0, 2e-4):
        want = _diagonal(t.double().numpy(), omega, grid, lam, bits)
        assert np.array_equal(_diagonal_16bit(patterns, name_of(dtype), omega, grid, lam, bits), want)


def test_column_weights_hand_worked() -> None:
    """d over the mean of the positive d, + 1% damp, at least 1/4, rounded to quarter octaves
    (2^(k/4)). The positive d below average 1 (× 7, any scale): 1.085 + 0.01 = 1.095 crosses
    the rounding boundary 2^(1/8) = 1.0905 → 2^(1/4), and 0.915 + 0.01 crosses 2^(-1/8) = 0.9170
    → 1 (without the damp: 1 and 2^(-1/4)); a dead column (0) is 1 + damp → 1; 1e-4 → the floor
    1/4; 1.9999 → 2."""
    d = np.array([1.085, 0.915, 0.0, 1e-4, 1.9999]) * 7.0
    assert column_weights(d).tolist() == pytest.approx([2 ** 0.25, 1.0, 1.0, 0.25, 2.0], rel=1e-12)
    assert 1.085 < 2 ** 0.125 < 1.095 and 0.915 < 2 ** -0.125 < 0.925
    with pytest.raises(UsageError, match="3 entries but the weight has 6"):
        column_weights(d[:3], cols=6)
    with pytest.raises(UsageError, match="NaN"):
        column_weights(np.array([1.0, np.nan]))


def _entropy_by_chunk(c: ClusteredTensor) -> float:
    """Each chunk's empirical label entropy weighted by its share of the labels (report.quality's
    definition), from the labels."""
    lab = c.labels.numpy()
    total, h = lab.size, 0.0
    for a, b in c.row_ranges():
        n = np.bincount(lab[a:b].reshape(-1)).astype(np.float64)
        p = n[n > 0] / n.sum()
        h += float(-(p * np.log2(p)).sum()) * lab[a:b].size / total
    return h


def test_calibrated_bits_per_weight_move_with_the_label_entropy() -> None:
    rng = np.random.default_rng(12)
    w = torch.tensor(rng.standard_t(4, size=(64, 48)) * 0.02, dtype=torch.float32)
    c0 = cluster_tensor(w, bits=4.0)
    ct = ClusteredTensor(labels=c0.labels, centroids=c0.centroids, chunk_rows=c0.chunk_rows, dtype=c0.dtype,
                         shape=c0.shape, quality={**c0.quality, "bits_per_weight": 4.25})  # as pack records it
    out = calibrate_clustered(ct, w, rng.lognormal(0.0, 2.0, size=48), lam=ct.quality["lambda"] * 3)
    moved = _entropy_by_chunk(out) - _entropy_by_chunk(ct)
    assert moved < -0.01  # the entropy term lowered it
    assert out.quality["bits_per_weight"] - ct.quality["bits_per_weight"] == pytest.approx(moved, abs=1e-9)


def test_calibrate_clustered_with_a_diagonal_lowers_the_weighted_error() -> None:
    rng = np.random.default_rng(11)
    w = torch.tensor(rng.standard_t(4, size=(96, 64)) * 0.02, dtype=torch.bfloat16)
    d = rng.lognormal(0.0, 2.0, size=64)
    ct = cluster_tensor(w, bits=4.0).rechunk(32)
    lam = ct.quality["lambda"]
    # scored with the inputs' plain importance d/mean(d) (+1%), not the module's rounded ω
    w64, omega = w.double().numpy(), d / d.mean() + 0.01
    counts = np.bincount(ct.labels.numpy().reshape(-1), minlength=ct.ks[0])
    code_bits = -np.log2(np.maximum(counts, 1) / counts.sum())

    def cost(c: ClusteredTensor) -> tuple[float, float]:  # what the labels minimise: ω-weighted error + λ · bits
        err = float(((w64 - c.decode().double().numpy()) ** 2 * omega).sum())
        return err, err + lam * float(code_bits[c.labels.numpy()].sum())

    out = calibrate_clustered(ct, w, d, lam=lam, name="m.weight")  # same table: the same code lengths apply
    assert torch.equal(out.centroids[0], ct.centroids[0])
    assert cost(out)[1] < cost(ct)[1]  # each label is the cheapest of a window that holds the old one
    # heavy columns: at most the error nearest rounding gives; light ones: cheaper labels
    heavy, light = omega > 2, omega < 0.3
    err_cols = lambda c: ((w64 - c.decode().double().numpy()) ** 2).sum(0)  # noqa: E731
    assert (err_cols(out)[heavy] <= err_cols(ct)[heavy] + 1e-12).all()
    assert code_bits[out.labels.numpy()[:, light]].sum() < code_bits[ct.labels.numpy()[:, light]].sum()
    refit = calibrate_clustered(ct, w, d, lam=lam, refit=True)
    refit.validate()
    assert cost(refit)[0] <= cost(out)[0] * 1.001  # ω-weighted means: no worse
    # equal weights: the labels the encoder chose (the same slope, the same code lengths) mostly stay
    same = calibrate_clustered(ct, w, np.ones(64), lam=lam)
    assert (same.labels == ct.labels).float().mean() > 0.95
    with pytest.raises(UsageError, match=r"m.weight.*need \(64, 64\) or \(64,\)"):
        calibrate_clustered(ct, w, d[:10], name="m.weight")


# -- collect_hessians --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from common import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_collect_hessians_matches_the_models_hidden_states(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "to be or not to be that is the question the king is dead long live the queen " * 3
    hs = collect_hessians(tiny_llama, text, n_tokens=40, window=20)
    assert "model.layers.1.mlp.down_proj.weight" in hs and hs["model.layers.1.mlp.down_proj.weight"].shape == (32, 32)
    # q, k and v read the same input.
    q, k = hs["model.layers.0.self_attn.q_proj.weight"], hs["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(q, k)
    # The LM head's input is the final (normed) hidden state: H = its mean outer product.
    ids = torch.tensor(AutoTokenizer.from_pretrained(tiny_llama).encode(text, add_special_tokens=False)[:40])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        last = model(input_ids=ids.reshape(2, 20), output_hidden_states=True).hidden_states[-1]
    z = last.reshape(-1, 16).double().numpy()
    assert np.allclose(hs["lm_head.weight"], z.T @ z / 40, rtol=1e-5, atol=1e-7)


def test_collect_hessians_without_the_head_skips_logits_and_keeps_the_layers(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the quality of mercy is not strained it droppeth as the gentle rain from heaven " * 4
    layers = lambda n: "layers" in n  # noqa: E731  - no LM head: its logits are skipped
    hs = collect_hessians(tiny_llama, text, n_tokens=32, window=16, names=layers)
    assert "lm_head.weight" not in hs and len(hs) == 14
    # An independent path: the inputs of down_proj and v_proj, captured by hooks of this test
    ids = torch.tensor(AutoTokenizer.from_pretrained(tiny_llama).encode(text, add_special_tokens=False)[:32])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        mod = model.get_submodule(name)
        mod.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0].double()))
    with torch.no_grad():
        model(input_ids=ids.reshape(2, 16))
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).numpy()
        assert np.allclose(hs[f"{name}.weight"], x.T @ x / 32, rtol=1e-5, atol=1e-7), name


def test_collect_hessians_filters_and_errors(tiny_llama, tmp_path) -> None:
    text = "the king is dead " * 10
    want = {"model.layers.0.mlp.up_proj.weight"}
    assert set(collect_hessians(tiny_llama, text, 16, names=want)) == want
    assert set(collect_hessians(tiny_llama, text, 16, names=lambda n: "o_proj" in n)) == {
        "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight",
    }
    with pytest.raises(UsageError, match="config.json"):
        collect_hessians(tmp_path, text)
    with pytest.raises(UsageError, match="tokens"):
        collect_hessians(tiny_llama, "king", 16)


def test_random_windows_from_the_config(tiny_llama) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 3, [4, 5], None
    ids = random_windows(config, sequences=3, tokens=40, seed=1)
    assert ids.shape == (3, 40) and (ids[:, 0] == 3).all()
    assert not torch.isin(ids[:, 1:], torch.tensor([3, 4, 5])).any() and int(ids.max()) < config.vocab_size
    assert torch.equal(ids, random_windows(config, sequences=3, tokens=40, seed=1))
    assert not torch.equal(ids, random_windows(config, sequences=3, tokens=40, seed=2))
    config.max_position_embeddings = 24  # a short model: rows fit its positions
    assert random_windows(config, sequences=2, tokens=40).shape == (2, 24)
    from types import SimpleNamespace

    from wcfmt.cluster.calibrate import _row_length

    assert _row_length(SimpleNamespace(n_positions=32), 128) == 32
    assert _row_length(SimpleNamespace(n_positions=True), 128) == 128
    assert _row_length(SimpleNamespace(), 128) == 128
    assert _row_length(SimpleNamespace(max_position_embeddings=8192), 128) == 128


def test_collect_random_diagonals_is_the_diagonal_on_random_tokens(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM

    d, shape = collect_random_diagonals(tiny_llama, sequences=2, tokens=16, names=lambda n: "layers.1" in n)
    assert shape == (2, 16)
    assert sorted(d) == sorted(f"model.layers.1.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))  # fmt: skip
    # q/k/v read layer 1's normed input: E[x²] of it, on the same random ids, by the model's own hidden states
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = random_windows(model.config, sequences=2, tokens=16)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        x = model.model.layers[1].input_layernorm(h).reshape(-1, h.shape[-1]).double()
    assert np.allclose(d["model.layers.1.self_attn.q_proj.weight"], (x * x).mean(0).numpy(), rtol=1e-5, atol=1e-9)


# -- mutation-guided checks (tools/mutation.py on calibrate.py): limits, defaults, by-hand moments --
def test_inverse_cholesky_dead_columns_integer_h_and_damp() -> None:
    """Dead columns (H_jj = 0) are left out of the scale and get a unit diagonal; H may be integer;
    ``damp`` must be > 0. Expectations: the docstring's formula with numpy's inverse."""
    import warnings

    rng = np.random.default_rng(20)
    x = correlated_inputs(rng, 60, 6)
    x[:, 2] = 0.0  # an input that never fires
    h = x.T @ x
    hs = h / np.mean(np.diag(h)[[0, 1, 3, 4, 5]])
    hs[2, 2] = 1.0
    u = inverse_cholesky(h, 0.05)
    assert np.allclose(u, np.triu(u)) and np.allclose(u.T @ u, np.linalg.inv(hs + 0.05 * np.eye(6)), rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on the way
        assert np.allclose(inverse_cholesky(np.zeros((3, 3)), 0.5), np.eye(3) / np.sqrt(1.5))
        assert np.allclose(column_weights(np.zeros(3)), 1.0)  # 1 + damp, rounded to 1
    ui = inverse_cholesky(np.array([[2, 1], [1, 2]]), 0.01)  # integers: scale 2 → [[1, .5], [.5, 1]]
    assert np.allclose(ui.T @ ui, np.linalg.inv(np.array([[1.01, 0.5], [0.5, 1.01]])))
    for bad in (0, -1.0, "0.1"):
        with pytest.raises(UsageError, match="damp"):
            inverse_cholesky(np.eye(2), bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="damp"):
            column_weights(np.ones(2), bad)  # type: ignore[arg-type]


def test_column_weights_without_dead_columns_are_relative_to_the_mean() -> None:
    # d = (2, 6): mean 4 → 0.5 and 1.5, + 1% → 0.51 → 2^(-4/4) = 0.5 and 1.51 → 2^(2/4) = √2
    assert column_weights(np.array([2.0, 6.0])).tolist() == pytest.approx([0.5, 2 ** 0.5], rel=1e-12)


def test_grid_lam_and_code_bits_limits() -> None:
    w = np.array([[0.1, 0.7, -3.0]])
    one = np.array([0.5])
    assert gptq_labels(w, np.eye(3), one).tolist() == [[0, 0, 0]]  # a grid of one value
    assert gptq_labels(w, np.eye(3), one, lam=1.0, code_bits=np.array([2.0])).tolist() == [[0, 0, 0]]
    assert gptq_labels(w, np.ones(3), one, lam=1.0, code_bits=np.array([2.0])).tolist() == [[0, 0, 0]]
    g256 = np.linspace(-1.0, 1.0, 256)
    assert np.array_equal(gptq_labels(w, np.eye(3), g256), nearest(w, g256))  # 256 values: allowed
    assert np.array_equal(gptq_labels(w, np.eye(3), g256.reshape(16, 16)), nearest(w, g256))  # any shape, flattened
    g8 = np.array([0, 200, 250], dtype=np.uint8)  # integer grids: midpoints 100 and 225, not uint8 sums
    assert gptq_labels(np.array([[99.0, 101.0, 224.0, 226.0]]), np.eye(4), g8).tolist() == [[0, 1, 1, 2]]
    for bad in (np.linspace(0, 1, 257), np.array([]), np.array([0.0, np.nan, 1.0]), np.array([0.0, 0.0, 1.0])):
        with pytest.raises(UsageError, match="grid"):
            gptq_labels(w, np.eye(3), bad)
    grid = np.array([0.0, 1.0])
    for lam in (-1.0, np.inf, np.nan):
        with pytest.raises(UsageError, match="lam"):
            gptq_labels(w, np.eye(3), grid, lam=lam, code_bits=np.zeros(2))
    for bits in (np.zeros(3), np.array([0.0, np.nan])):
        with pytest.raises(UsageError, match="code_bits"):
            gptq_labels(w, np.eye(3), grid, lam=1.0, code_bits=bits)
    # code lengths as a column are flattened: w = 0.6 with bits (0.1, 5), λ = 1 → 0 (test_entropy_term_hand_worked)
    assert gptq_labels(np.array([[0.6]]), np.eye(1), grid, lam=1.0, code_bits=np.array([[0.1], [5.0]])).tolist() == [[0]]
    with pytest.raises(UsageError, match="4 entries but the weight has 3"):
        gptq_labels(w, np.ones(4), grid)  # a diagonal of the wrong length
    lab = gptq_labels(w, np.ones(3), grid)
    assert lab.dtype == np.uint8 and lab.tolist() == nearest(w, grid).tolist()


def test_lam_zero_is_nearest_whatever_the_code_bits() -> None:
    """λ = 0 is no entropy term, even with code lengths at hand (they would be ∞ past the ends)."""
    w, grid, omega, bits = _weighted_problem(5, rows=30)
    assert np.array_equal(_diagonal(w, omega, grid, 0.0, bits), nearest(w, grid))
    assert np.array_equal(_gptq(w, np.diag(1 / np.sqrt(omega)), grid, 0.0, bits), nearest(w, grid))


def test_gptq_damp_is_used() -> None:
    rng = np.random.default_rng(21)
    w = rng.standard_normal((6, 40))
    x = correlated_inputs(rng, 30, 40)  # fewer samples than columns: H is singular, damp matters
    grid = np.sort(rng.uniform(-3, 3, 8))
    want = reference_gptq(w, x.T @ x, grid, damp=0.5)
    assert not np.array_equal(want, reference_gptq(w, x.T @ x, grid))
    assert np.array_equal(gptq_labels(w, x.T @ x, grid, damp=0.5), want)
    ct = ClusteredTensor(labels=torch.tensor(nearest(w, grid), dtype=torch.uint8),
                         centroids=[torch.tensor(grid, dtype=torch.float16)], chunk_rows=6, dtype=torch.float32)
    w32 = torch.tensor(w, dtype=torch.float32)
    g16 = ct.centroids[0].double().numpy()
    out = calibrate_clustered(ct, w32, x.T @ x, damp=0.5)
    assert np.array_equal(out.labels.numpy(), reference_gptq(w32.double().numpy(), x.T @ x, g16, damp=0.5))


def test_diagonal_choice_over_many_row_blocks() -> None:
    """Rows are labelled in blocks of 2^16 weights (`_diagonal`) or 2^20 (`_diagonal_16bit`): rows in
    later blocks, checked by brute force, follow the same rule as the first."""
    from wcfmt.dtypes import to_numpy

    w, grid, omega, bits = _weighted_problem(6, rows=300, cols=1024)  # blocks of 64 rows
    got = _diagonal(w, omega, grid, 3e-4, bits)
    rows = [0, 63, 64, 200, 299]  # (their first 256 columns, which keeps the brute force short)
    assert np.array_equal(got[rows, :256], windowed_choice(w[rows, :256], omega[:256], grid, 3e-4, bits))
    w2, grid2, omega2, bits2 = _weighted_problem(7, rows=300, cols=8192)  # blocks of 128 rows
    t = torch.tensor(w2, dtype=torch.bfloat16)
    got2 = _diagonal_16bit(to_numpy(t).view(np.uint16), "BF16", omega2, grid2, 3e-4, bits2)
    rows = [0, 255, 256, 299]
    want = windowed_choice(t.double().numpy()[rows, :256], omega2[:256], grid2, 3e-4, bits2)
    assert np.array_equal(got2[rows, :256], want)


def test_counts_over_several_blocks() -> None:
    from wcfmt.cluster.calibrate import _counts

    v = (np.arange(5_000_003) % 3).astype(np.uint8)  # more than one block of 2^22
    assert _counts(v, 4).tolist() == [1_666_668, 1_666_668, 1_666_667, 0]


def _hand_clustered(w: np.ndarray, grids: list[np.ndarray], chunk_rows: int) -> ClusteredTensor:
    """A float32 ClusteredTensor with the given fp16 tables (one per chunk), nearest labels."""
    tables = [torch.tensor(g, dtype=torch.float16) for g in grids]
    labels = np.concatenate([nearest(w[a : a + chunk_rows], t.double().numpy())
                             for a, t in zip(range(0, len(w), chunk_rows), tables)])
    return ClusteredTensor(labels=torch.tensor(labels, dtype=torch.uint8), centroids=tables, chunk_rows=chunk_rows,
                           dtype=torch.float32)


def _weighted_cell_means(w: np.ndarray, lab: np.ndarray, d: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per weight, the fp16 value of its cell's mean weighted by its column's d (a cell of no weight:
    its grid value), as float64: what a refit table rebuilds a float32 weight to."""
    wt = np.broadcast_to(d, w.shape)
    mass = np.bincount(lab.ravel(), weights=wt.ravel(), minlength=grid.size)
    sums = np.bincount(lab.ravel(), weights=(wt * w).ravel(), minlength=grid.size)
    means = np.array([sums[k] / mass[k] if mass[k] > 0 else grid[k] for k in range(grid.size)])
    return means.astype(np.float16).astype(np.float64)[lab]


def test_refit_hand_worked() -> None:
    """Refit on a diagonal H: cells of the nearest labels, means weighted by d; a cell whose weights
    all sit in a dead column keeps its grid value; an unused cell is dropped."""
    import warnings

    w = np.array([[2.0, 0.1, 0.9, 1.2],
                  [-7.0, 0.3, 0.8, 0.2],
                  [0.5, -0.1, 1.1, 0.0]])
    grid = np.array([0.0, 1.0, 2.0, 4.0])  # cell 3 unused
    ct = _hand_clustered(w, [grid], 3)
    d = np.array([0.0, 0.2, 0.5, 0.3])  # small weights (< 1), column 0 dead
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the empty cell 3: no 0/0 on the way
        out = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), d, refit=True)
    # cell 0: 0.1·.2 + 0.3·.2 + 0.2·.3 - 0.1·.2 + 0·.3 (and -7, 0.5 in the dead column) → 0.12 / 1.2 = 0.1
    # cell 1: (0.9 + 0.8 + 1.1)·.5 + 1.2·.3 → 1.76 / 1.8; cell 2: only 2.0 in the dead column → 2.0
    assert out.dtype == torch.float32 and out.shape == ct.shape
    assert out.centroids[0].tolist() == [np.float16(0.1), np.float16(1.76 / 1.8), 2.0]
    assert np.array_equal(out.decode().double().numpy(), _weighted_cell_means(w, nearest(w, grid), d, grid))
    tenth = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), d / 10, refit=True)  # cells of mass < 1
    assert np.array_equal(tenth.decode().double().numpy(), out.decode().double().numpy())  # the same means
    # no column weighs anything: plain cell means (cell 0: six weights, -7 among them)
    flat = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), np.zeros(4), refit=True)
    assert np.array_equal(flat.decode().double().numpy(), _weighted_cell_means(w, nearest(w, grid), np.ones(4), grid))


def test_refit_over_groups_and_row_blocks() -> None:
    """Two tables (two groups), each refitted over several row blocks (2^20 weights / 16384 columns
    = 64 rows): every weight decodes to its own group's weighted cell mean."""
    rng = np.random.default_rng(22)
    w = rng.standard_normal((200, 16384)).astype(np.float32).astype(np.float64)
    d = rng.lognormal(0.0, 1.0, 16384)
    grids = [np.array([-1.5, -0.5, 0.5, 1.5, 3.0]), np.array([-1.0, 0.0, 1.0])]
    ct = _hand_clustered(w, grids, 100)
    out = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), d, refit=True)
    got = out.decode().double().numpy()
    for i, g in enumerate(ct.centroids):
        g64 = g.double().numpy()
        part = w[100 * i : 100 * (i + 1)]
        assert np.array_equal(got[100 * i : 100 * (i + 1)], _weighted_cell_means(part, nearest(part, g64), d, g64)), i


def test_entropy_code_lengths_count_a_lone_label_once() -> None:
    """λ > 0: code lengths from the old labels, −log2(max(count, 1)/n). Old labels 0×6, 1×1, 2×1 of
    n = 8: 0.415, 3 and 3 bits; ω = 1 (d = 1, + 1%, rounded). w = 0.9 at λ = 0.4: label 1 costs
    0.01 + 1.2 = 1.21, label 0 costs 0.81 + 0.166 = 0.976 → 0 (were a lone label 2 bits, 1 would win)."""
    w = np.array([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0]])
    grid = np.array([0.0, 1.0, 2.0])
    ct = _hand_clustered(w, [grid], 1)
    assert ct.labels.tolist() == [[1, 0, 0, 0, 0, 0, 2, 1]]
    ct = ClusteredTensor(labels=torch.tensor([[0, 0, 0, 0, 0, 0, 2, 1]], dtype=torch.uint8), centroids=ct.centroids,
                         chunk_rows=1, dtype=torch.float32)
    out = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), np.ones(8), lam=0.4)
    bits = -np.log2(np.array([6, 1, 1]) / 8)
    assert out.labels.numpy().tolist() == windowed_choice(w, np.ones(8), grid, 0.4, bits).tolist()
    assert out.labels[0, 0] == 0


def test_calibrate_clustered_bf16_table_with_a_float32_original() -> None:
    """A bf16 ClusteredTensor given its weight as float32: labels by nearest rounding (diagonal
    H, λ = 0); the error names no tensor when no name is given."""
    rng = np.random.default_rng(23)
    w = torch.tensor(rng.standard_normal((8, 6)), dtype=torch.bfloat16)
    ct = cluster_tensor(w, k=4)
    out = calibrate_clustered(ct, w.float(), np.ones(6))
    grid = ct.centroids[0].to(torch.bfloat16).double().numpy()
    assert np.array_equal(out.labels.numpy(), nearest(w.double().numpy(), grid))
    with pytest.raises(UsageError, match=r"^H has shape"):
        calibrate_clustered(ct, w, np.ones(5))


def test_random_windows_edge_cases() -> None:
    from types import SimpleNamespace as NS

    from wcfmt.cluster.calibrate import _row_length

    for cfg in (NS(), NS(vocab_size=0), NS(vocab_size=2, bos_token_id=0, eos_token_id=1)):
        with pytest.raises(UsageError, match="no ordinary tokens"):
            random_windows(cfg, 2, 4)
    assert random_windows(NS(vocab_size=3, bos_token_id=0, eos_token_id=1), 2, 5).tolist() == [[0, 2, 2, 2, 2]] * 2
    assert set(random_windows(NS(vocab_size=5), 1, 400).flatten().tolist()) == {0, 1, 2, 3, 4}  # every id drawn
    assert set(random_windows(NS(vocab_size=6, pad_token_id=[5, 4]), 2, 300).flatten().tolist()) == {0, 1, 2, 3}
    ids = random_windows(NS(vocab_size=5, bos_token_id=0), 2, 50)
    assert (ids[:, 0] == 0).all() and not (ids[:, 1:] == 0).any()
    assert int(random_windows(NS(vocab_size=5, bos_token_id=5), 2, 50).max()) < 5  # a BOS past the vocabulary: not written
    assert _row_length(NS(n_positions=2), 128) == 2
    assert _row_length(NS(max_position_embeddings=100, n_positions=50), 128) == 50


def test_statistics_dtype_from_the_config(tmp_path) -> None:
    from wcfmt.cluster.calibrate import _statistics_dtype

    for i, (text, want) in enumerate([('{"dtype": "bfloat16"}', torch.bfloat16), ('{"torch_dtype": "float16"}', torch.bfloat16),
                                      ('{"dtype": "float32"}', torch.float32), ("[1, 2]", torch.float32),
                                      ("not json", torch.float32), (None, torch.float32)]):
        folder = tmp_path / str(i)
        folder.mkdir()
        if text is not None:
            (folder / "config.json").write_text(text)
        assert _statistics_dtype(folder) == want, text


# -- the model-running side: _load_model, _second_moments, sample_text, the collectors' arguments --
def _copy_model(src, dst):  # type: ignore[no-untyped-def]
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def missing_llama(tiny_llama, tmp_path_factory: pytest.TempPathFactory):
    """tiny_llama without one of its weights."""
    from safetensors.torch import load_file, save_file

    folder = _copy_model(tiny_llama, tmp_path_factory.mktemp("missing") / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_load_model_tokenizer_dtype_and_log_level(tiny_llama, tmp_path) -> None:
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from wcfmt.cluster.calibrate import _load_model

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        tok, model = _load_model(Path(tiny_llama), "probe")
        assert hf_logging.get_verbosity() == hf_logging.INFO  # the caller's level, restored
    finally:
        hf_logging.set_verbosity(before)
    assert tok.encode("the king", add_special_tokens=False) == [1, 2]  # the folder's own word-level tokenizer
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    tok, model = _load_model(Path(tiny_llama), "probe", tokenizer=False, dtype=torch.bfloat16)
    assert tok is None and model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="probe needs a Hugging Face model folder"):
        _load_model(tmp_path, "probe")


def test_load_model_refuses_missing_and_reinitialised_weights(tiny_llama, missing_llama, monkeypatch) -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from wcfmt.cluster.calibrate import _load_model

    with pytest.raises(UsageError, match=r"for probe \(missing weights: model\.layers\.1\.mlp\.down_proj\.weight\)"):
        _load_model(Path(missing_llama), "probe")
    real = AutoModelForCausalLM.from_pretrained

    def reinitialised(*args, **kwargs):  # type: ignore[no-untyped-def]
        # what a transformers that re-initialises a weight of the wrong shape reports (tuples or names)
        model, info = real(*args, **kwargs)
        return model, {**info, "mismatched_keys": [("model.norm.weight", (8,), (16,)), "lm_head.weight"]}

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", reinitialised)
    with pytest.raises(UsageError, match=r"\(weights that do not fit its config: model\.norm\.weight, lm_head\.weight\)$"):
        _load_model(Path(tiny_llama), "probe")


def _no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bars without tqdm's monitor thread: a process forked after one started (mutmut's) would
    wait forever on closing its last bar for a thread it does not have."""
    monkeypatch.setattr("tqdm.std.tqdm.monitor_interval", 0)


def test_second_moments_of_the_whole_model_by_hand(tiny_llama, capsys, monkeypatch) -> None:
    """`_second_moments` against inputs captured by this test's own hooks in one forward pass of all
    windows; batches of 2 of 3 windows; the LM head's product: all positions when its H is wanted,
    the last one only otherwise (``logits_to_keep``); hooks gone afterwards; a bar when asked."""
    from pathlib import Path

    from wcfmt.cluster.calibrate import _load_model, _second_moments

    _no_tqdm_monitor(monkeypatch)
    _, model = _load_model(Path(tiny_llama), "probe", tokenizer=False)
    windows = torch.randint(0, 15, (3, 10), generator=torch.Generator().manual_seed(3))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    seen: dict[str, list[torch.Tensor]] = {}
    own = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].double())) for n in names]
    with torch.no_grad():
        model(input_ids=windows)
    for h in own:
        h.remove()
    want = {f"{n}.weight": (lambda x: x.T @ x / 30)(seen[n][0].reshape(30, -1).numpy()) for n in names}
    head_rows: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda m, a: head_rows.append(a[0].shape[1]))
    keep = set(want).__contains__
    full = _second_moments(model, windows, keep, batch=2, progress=False, diagonal=False)
    assert sorted(full) == sorted(want) and head_rows == [10, 10]
    for n, h in want.items():
        assert np.allclose(full[n], h, rtol=1e-5, atol=1e-7), n
    assert capsys.readouterr().err == ""
    diag = _second_moments(model, windows, keep, batch=2, progress=True, diagonal=True)
    for n, h in want.items():
        assert np.allclose(diag[n], np.diag(h), rtol=1e-5, atol=1e-7), n
    err = capsys.readouterr().err
    assert "calibrate" in err and "3/3" in err and "window" in err
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    head_rows.clear()
    part = _second_moments(model, windows, lambda n: "layers.1.mlp" in n, batch=2, progress=False, diagonal=False)
    assert head_rows == [1, 1]  # no LM head wanted: its logits of one position per row
    assert sorted(part) == [f"model.layers.1.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")]
    assert np.allclose(part["model.layers.1.mlp.down_proj.weight"], want["model.layers.1.mlp.down_proj.weight"], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def sampling_llama(tiny_llama, tmp_path_factory: pytest.TempPathFactory):
    """tiny_llama with a BOS ("to") and an EOS ("[UNK]") token, sharper logits (LM head × 8, so that
    the temperature shows), and a generation_config.json whose defaults are all wrong for
    `sample_text` (greedy, 3 tokens, top-k 1...): every setting must be passed explicitly."""
    import json

    from safetensors.torch import load_file, save_file

    folder = _copy_model(tiny_llama, tmp_path_factory.mktemp("sampling") / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "to", "eos_token": "[UNK]"}))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(do_sample=False, temperature=0.25, top_k=1, top_p=0.25, max_new_tokens=3, min_new_tokens=1)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] * 8
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_sample_text_is_the_documented_sampling(sampling_llama, tiny_llama) -> None:
    """Against transformers' own sampler with the docstring's settings (temperature 1, no top-k/p,
    from BOS, torch seed), decoded by hand: the words, special tokens left out, blank lines between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wcfmt.cluster.calibrate import sample_text

    text = sample_text(sampling_llama, sequences=3, tokens=8, seed=5)
    tok = AutoTokenizer.from_pretrained(sampling_llama)
    model = AutoModelForCausalLM.from_pretrained(sampling_llama, dtype=torch.float32).eval()
    bos, eos = tok.convert_tokens_to_ids("to"), tok.convert_tokens_to_ids("[UNK]")
    torch.manual_seed(5)
    with torch.no_grad():
        out = model.generate(torch.full((3, 1), bos), attention_mask=torch.ones(3, 1, dtype=torch.long), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, min_new_tokens=8, pad_token_id=eos)
    words = {i: w for w, i in tok.get_vocab().items()}
    rows = [r[1:].tolist() for r in out]
    assert all(len(r) == 8 for r in rows) and any(bos in r or eos in r for r in rows)  # special tokens were sampled
    assert text == "\n\n".join(" ".join(words[i] for i in r if i not in (bos, eos)) for r in rows)
    with pytest.raises(UsageError, match="no BOS or EOS token"):
        sample_text(tiny_llama, sequences=1, tokens=2)


def test_collectors_defaults_and_arguments(tiny_llama, missing_llama, tmp_path, capsys, monkeypatch) -> None:
    """The documented defaults (windows of 512 tokens, a matrix, no bar), the limits on n_tokens and
    on the text, and that diagonal, progress, path and names reach the pass. Expectation of H: this
    test's own hooks over the first 1,024 tokens in two rows of 512."""
    from transformers import AutoModelForCausalLM

    from wcfmt.cluster.calibrate import collect_random_statistics, collect_text_statistics

    _no_tqdm_monitor(monkeypatch)
    words = "the king is dead long live queen and to be or not that question".split()
    ids = [1 + i % 14 for i in range(1100)]  # word i of the 15-word vocabulary is id i
    text = " ".join(words[i - 1] for i in ids)
    name = "model.layers.1.mlp.down_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(name[:-7]).register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    with torch.no_grad():
        model(input_ids=torch.tensor(ids[:1024]).reshape(2, 512))
    x = seen[0].reshape(1024, -1).numpy()
    capsys.readouterr()  # transformers' own loading bar, if this test runs first
    s = collect_text_statistics(tiny_llama, text, 1100, names={name})
    assert s.windows == (2, 512) and s.moments[name].shape == (32, 32)
    assert np.allclose(s.moments[name], x.T @ x / 1024, rtol=1e-5, atol=1e-7)
    assert np.allclose(collect_hessians(tiny_llama, text, 1100, names={name})[name], x.T @ x / 1024, rtol=1e-5, atol=1e-7)
    assert capsys.readouterr().err == ""
    two = collect_text_statistics(tiny_llama, "king queen", 2, names={name})  # the least: 2 tokens
    assert two.windows == (1, 2)
    for bad in (1, 2.5, True):
        with pytest.raises(UsageError, match="n_tokens"):
            collect_text_statistics(tiny_llama, text, bad, names={name})  # type: ignore[arg-type]
    d = collect_hessians(tiny_llama, text, 64, names={name}, window=32, diagonal=True, progress=True)
    assert capsys.readouterr().err != ""
    assert np.allclose(d[name], np.diag(collect_hessians(tiny_llama, text, 64, names={name}, window=32)[name]), rtol=1e-6)
    assert collect_text_statistics(tiny_llama, text, 64, names={name}, path="whole-model").path == "whole-model"
    assert collect_random_statistics(tiny_llama, names={name}, sequences=2, tokens=8, path="whole-model").path == "whole-model"
    collect_random_diagonals(tiny_llama, names={name}, sequences=2, tokens=8)
    assert capsys.readouterr().err == ""  # no bar unless asked
    collect_random_diagonals(tiny_llama, names={name}, sequences=2, tokens=8, progress=True)
    assert capsys.readouterr().err != ""
    for call in (lambda: collect_hessians(tiny_llama, text, 64, path="sideways"),
                 lambda: collect_random_diagonals(tiny_llama, path="sideways")):
        with pytest.raises(UsageError, match="path must be"):
            call()
    with pytest.raises(UsageError, match="calibration needs a Hugging Face model folder"):
        collect_text_statistics(tmp_path, text)
    with pytest.raises(UsageError, match="calib='random' needs a Hugging Face model folder"):
        collect_random_diagonals(tmp_path)
    with pytest.raises(UsageError, match=r"for calibration \(missing weights"):
        collect_hessians(missing_llama, text, 64, path="whole-model")
    with pytest.raises(UsageError, match=r"for calib='random' \(missing weights"):
        collect_random_diagonals(missing_llama, sequences=2, tokens=8, path="whole-model")
    assert capsys.readouterr().err == ""


def test_random_diagonals_of_a_bf16_model_by_hand(tmp_path) -> None:
    """A bf16 checkpoint runs in bfloat16, its inputs squared in float32 or wider: against this test's
    own hooks on the bf16 model, squares in float64; and the seed reaches the random ids."""
    from common import write_tiny_llama
    from transformers import AutoModelForCausalLM

    folder = write_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    name = "model.layers.1.self_attn.q_proj.weight"
    d, shape = collect_random_diagonals(folder, names={name}, sequences=2, tokens=16, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(name[:-7]).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=random_windows(model.config, sequences=2, tokens=16, seed=1))
    x = seen[0].reshape(32, -1).double()
    assert shape == (2, 16) and np.allclose(d[name], (x * x).mean(0).numpy(), rtol=1e-6, atol=1e-9)


# -- mutation-guided checks, second round: what only another model, tokenizer or dtype shows -------
@pytest.fixture(scope="module")
def gpt2_sampler(tmp_path_factory: pytest.TempPathFactory):
    """A 1-layer GPT-2 (learned absolute positions, unlike Llama's relative RoPE) with the 15-word
    tokenizer, BOS "to" and EOS "[UNK]" (also the config's EOS, so a sampled one would end a row),
    attention × 3 (so that what came before a token, and where, changes what follows) and a
    sharper LM head (× 8)."""
    pytest.importorskip("transformers")
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("gpt2") / "m"
    words = ["[UNK]"] + "the king is dead long live queen and to be or not that question".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="to",
                                         eos_token="[UNK]").save_pretrained(folder)
    config = transformers.GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                     bos_token_id=9, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        model.transformer.h[0].attn.c_attn.weight.mul_(3)
        model.transformer.h[0].attn.c_proj.weight.mul_(3)
    model.save_pretrained(folder)
    return folder


def test_sample_text_of_a_model_with_absolute_positions(gpt2_sampler) -> None:
    """`sample_text` on a GPT-2, against transformers' own sampler given one BOS token at position 0
    per row (mask of one column), every row `tokens` long (the EOS is held back until then, so none ends
    a row early), decoded by hand. Where a Llama's RoPE hides a shifted position and its weak attention a
    second BOS token, this model samples other words."""
    from transformers import AutoModelForCausalLM

    from wcfmt.cluster.calibrate import sample_text

    model = AutoModelForCausalLM.from_pretrained(gpt2_sampler, dtype=torch.float32).eval()
    words = "[UNK] the king is dead long live queen and to be or not that question".split()
    for seed in (0, 1):
        text = sample_text(gpt2_sampler, sequences=3, tokens=24, seed=seed)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.full((3, 1), 9), attention_mask=torch.ones(3, 1, dtype=torch.long),
                                 position_ids=torch.zeros(3, 1, dtype=torch.long), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
        rows = [r[1:].tolist() for r in out]
        assert all(len(r) == 24 for r in rows)
        assert text == "\n\n".join(" ".join(words[i] for i in r if i not in (0, 9)) for r in rows), seed


_H_TEXT = "the king is dead long live the queen " * 4


def _down_proj_h_by_hooks(folder: Path) -> tuple[str, np.ndarray]:
    """(name, H) of layer 1's down_proj input over the first 16 words of `_H_TEXT` in two windows
    of 8, by this test's own forward pre-hook on the model loaded in float32 (ids from the tiny
    model's word list, no special tokens)."""
    from transformers import AutoModelForCausalLM

    words = "[UNK] the king is dead long live queen and to be or not that question".split()
    ids = torch.tensor([words.index(w) for w in _H_TEXT.split()][:16])
    name = "model.layers.1.mlp.down_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(name[:-7]).register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    with torch.no_grad():
        model(input_ids=ids.reshape(2, 8))
    x = seen[0].reshape(16, -1).numpy()
    return name, x.T @ x / 16


def test_collect_text_statistics_adds_no_special_tokens(tiny_llama, tmp_path) -> None:
    """A tokenizer that puts BOS before every text (a post-processor, as Llama's do): the statistics
    are of the text's own words, ids by this test's word list, H by this test's hooks."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from wcfmt.cluster.calibrate import collect_text_statistics

    folder = _copy_model(tiny_llama, tmp_path / "bos")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="to $A", special_tokens=[("to", 9)])
    tok.save(str(folder / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(folder).encode(_H_TEXT)[:2] == [9, 1]  # the BOS the tokenizer would add
    name, want = _down_proj_h_by_hooks(folder)
    s = collect_text_statistics(folder, _H_TEXT, 16, names={name}, window=8)
    assert s.windows == (2, 8) and np.allclose(s.moments[name], want, rtol=1e-5, atol=1e-7)


def test_collect_text_statistics_of_a_bf16_model_run_in_float32(tmp_path) -> None:
    """Text statistics run the model in float32 whatever the checkpoint's dtype (unlike random
    diagonals): a bf16 checkpoint against this test's hooks on it loaded as float32, both paths."""
    from common import write_tiny_llama

    from wcfmt.cluster.calibrate import collect_text_statistics

    folder = write_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    name, want = _down_proj_h_by_hooks(folder)
    for path in ("layerwise", "whole-model"):
        s = collect_text_statistics(folder, _H_TEXT, 16, names={name}, window=8, path=path)
        assert s.path == path and np.allclose(s.moments[name], want, rtol=1e-5, atol=1e-7), path


def test_refit_keeps_a_cell_used_only_in_an_earlier_row_block() -> None:
    """Refit reads rows in blocks of 2^20 weights: with 2^19 + 1 columns, one row a block. Cell 3
    (4.0) is used in row 0 only, and must stay a cell: every weight decodes to its own cell's
    weighted mean (by hand, `_weighted_cell_means`)."""
    rng = np.random.default_rng(24)
    cols = (1 << 19) + 1
    w = np.stack([rng.uniform(-0.4, 4.4, cols), rng.uniform(-0.4, 2.4, cols)]).astype(np.float32).astype(np.float64)
    grid = np.array([0.0, 1.0, 2.0, 4.0])
    d = rng.uniform(0.5, 2.0, cols)
    ct = _hand_clustered(w, [grid], 2)
    lab = nearest(w, grid)
    assert (lab[0] == 3).any() and not (lab[1] == 3).any()
    out = calibrate_clustered(ct, torch.tensor(w, dtype=torch.float32), d, refit=True)
    assert out.centroids[0].numel() == 4
    assert np.array_equal(out.decode().double().numpy(), _weighted_cell_means(w, lab, d, grid))


def test_column_weights_of_a_diagonal_kept_as_a_row() -> None:
    """H's diagonal as a 1 × cols row (a ``mean(0, keepdims=True)``): the same flat vector of ω."""
    d = np.array([1.0, 3.0, 0.0, 8.0])
    got = column_weights(d[None], cols=4)
    assert got.shape == (4,) and got.tolist() == column_weights(d).tolist()
