"""Centroid transforms (wcfmt/transforms.py): every mode's promised relation on the decoded weights."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import wcfmt
from wcfmt.cli import main
from wcfmt.cluster import cluster_tensor
from wcfmt.errors import OutputExistsError, UsageError
from wcfmt.inspect import verify
from wcfmt.reader import WclustReader
from wcfmt.transforms import (
    MODES,
    RANK_BREAKING,
    RANK_PRESERVING,
    fp16_table,
    transform,
    transform_tensor,
    transform_values,
)

W = "layers.0.mlp.up_proj.weight"
Q = "layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file with two clustered matrices (one codebook each, stored in 8-row chunks), a lossless
    tensor and an alias."""
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("tf")
    w = (torch.randn(64, 48, generator=g) * 0.05).to(torch.bfloat16)
    q = (torch.randn(32, 40, generator=g) * 0.02 + 0.01).to(torch.bfloat16)
    tensors = {
        W: cluster_tensor(w, 16, None).rechunk(8),
        Q: cluster_tensor(q, 12, None),
        "norm.weight": torch.ones(48),
        "emb": torch.arange(6.0).reshape(2, 3),
    }
    path = d / "m.wclust"
    wcfmt.save_file(tensors, path)
    return path


def dense(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy().astype(np.float64) for k, v in wcfmt.load_file(path).items()}


def label_blobs(path: Path, name: str) -> list[bytes]:
    with WclustReader(path) as r:
        return [bytes(r._stored(c.labels)) for c in r.header.tensors[name].chunks]  # type: ignore[union-attr]


def same_order(x: np.ndarray, y: np.ndarray) -> bool:
    """True when every pair (i, j) has the same order (<, =, >) in x as in y."""
    o = np.argsort(x, kind="stable")
    xs, ys = x[o], y[o]
    dx, dy = np.sign(np.diff(xs)), np.sign(np.diff(ys))
    return bool(np.array_equal(dx, dy))


def out_path(tmp_path: Path, mode: str) -> Path:
    return tmp_path / f"{mode}.wclust"


# -- the rank relation of every mode -----------------------------------------------------------
@pytest.mark.parametrize("mode", RANK_PRESERVING)
def test_rank_preserving_modes_keep_every_pair_order_and_the_labels(src: Path, tmp_path: Path, mode: str) -> None:
    dst = out_path(tmp_path, mode)
    kw = {"a": 1.5, "b": 0.01} if mode == "affine" else {}
    rep = transform(src, dst, mode, seed=3, **kw)
    assert rep.relabelled == [] and sorted(rep.tensors) == sorted([W, Q])
    before, after = dense(src), dense(dst)
    for name in (W, Q):
        assert same_order(before[name].ravel(), after[name].ravel()), name
        assert label_blobs(src, name) == label_blobs(dst, name)
    np.testing.assert_array_equal(after["norm.weight"], before["norm.weight"])
    verify(dst)


@pytest.mark.parametrize("mode", [m for m in RANK_PRESERVING if m not in ("affine", "affine-correct")])
def test_rank_preserving_random_and_monotone_modes_change_the_values(src: Path, tmp_path: Path, mode: str) -> None:
    dst = out_path(tmp_path, mode)
    transform(src, dst, mode, seed=1)
    assert not np.array_equal(dense(src)[W], dense(dst)[W])


def test_affine_is_exactly_a_w_plus_b_in_fp16(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "affine")
    transform(src, dst, "affine", a=2.0, b=0.25)
    before, after = dense(src)[W], dense(dst)[W]
    # Independent path: float64 affine, rounded to bf16 (the tensor's dtype) by torch.
    want = torch.from_numpy(2.0 * before + 0.25).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(after, want)


def test_affine_correct_restores_the_files_weighted_mean_and_variance(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "chain")
    transform(src, dst, ["affine", "affine-correct"], a=3.0, b=0.5)
    before, after = dense(src)[W], dense(dst)[W]
    assert abs(after.mean() - before.mean()) < 2e-3 * before.std()
    assert after.std() == pytest.approx(before.std(), rel=5e-3)
    assert same_order(before.ravel(), after.ravel())


def test_sorted_gaussian_then_affine_correct_matches_mean_and_std(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "sg")
    transform(src, dst, ["sorted-gaussian", "affine-correct"], seed=5)
    before, after = dense(src)[Q], dense(dst)[Q]
    assert after.mean() == pytest.approx(before.mean(), abs=1e-2 * before.std())
    assert after.std() == pytest.approx(before.std(), rel=1e-2)


def test_monotone_freq_hand_worked() -> None:
    # counts 1, 2, 1 over [-1, 0, 1]: mean 0, std sqrt(1/2); CDF midpoints 1/8, 1/2, 7/8.
    v = transform_values("monotone-freq", np.array([-1.0, 0.0, 1.0]), np.array([1, 2, 1]), np.random.default_rng(0))
    z = 1.1503493803760079  # Phi^-1(7/8)
    np.testing.assert_allclose(v, [-math.sqrt(0.5) * z, 0.0, math.sqrt(0.5) * z], rtol=1e-12, atol=1e-15)


def test_power_and_tanh_hand_worked() -> None:
    rng = np.random.default_rng(0)
    t = np.array([-4.0, -1.0, 0.0, 1.0, 4.0])
    np.testing.assert_allclose(transform_values("power", t, np.ones(5), rng, p=0.5), [-4, -2, 0, 2, 4])
    # weighted std of t with counts (0, 1, 0, 1, 0) is 1: s = 2 * 1
    out = transform_values("tanh", t, np.array([0, 1, 0, 1, 0]), rng, scale=2.0)
    np.testing.assert_allclose(out, 2.0 * np.tanh(t / 2.0))


def test_sign_scramble_keeps_magnitudes_so_ranks_of_abs_w(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "ss")
    rep = transform(src, dst, "sign-scramble", seed=2)
    assert sorted(rep.relabelled) == sorted([W, Q])
    before, after = dense(src)[W], dense(dst)[W]
    np.testing.assert_array_equal(np.abs(after), np.abs(before))
    assert same_order(np.abs(before).ravel(), np.abs(after).ravel())
    assert (np.sign(after) != np.sign(before)).any()
    assert not same_order(before.ravel(), after.ravel())


def test_rank_break_keeps_every_sign_and_the_values(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "rb")
    transform(src, dst, "rank-break", seed=2)
    before, after = dense(src)[W], dense(dst)[W]
    np.testing.assert_array_equal(np.sign(after), np.sign(before))
    assert sorted(set(after.ravel())) == sorted(set(before.ravel()))
    assert not same_order(before.ravel(), after.ravel())


def test_gaussian_keeps_mean_and_variance_breaks_rank(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "g")
    transform(src, dst, "gaussian", seed=4)
    before, after = dense(src)[W], dense(dst)[W]
    assert after.mean() == pytest.approx(before.mean(), abs=1e-2 * before.std())
    assert after.std() == pytest.approx(before.std(), rel=1e-2)
    assert not same_order(before.ravel(), after.ravel())


def test_permute_is_a_bijection_of_the_table(src: Path, tmp_path: Path) -> None:
    dst = out_path(tmp_path, "p")
    transform(src, dst, "permute", seed=4)
    before, after = dense(src)[W].ravel(), dense(dst)[W].ravel()
    assert sorted(set(after)) == sorted(set(before))
    pairs = set(zip(before.tolist(), after.tolist()))
    assert len(pairs) == len(set(before))  # each old value goes to exactly one new value
    assert len({b for _, b in pairs}) == len(pairs)
    assert any(a != b for a, b in pairs)


@pytest.mark.parametrize("mode", MODES)
def test_a_codebook_repeated_over_storage_chunks_gets_one_table(src: Path, tmp_path: Path, mode: str) -> None:
    dst = out_path(tmp_path, mode)
    transform(src, dst, mode, seed=9, tensors=r"up_proj", a=1.1)
    with wcfmt.safe_open(dst) as f:
        ct = f.get_clustered(W)
        assert len(ct.centroids) == 8
        assert all(torch.equal(t, ct.centroids[0]) for t in ct.centroids)
    assert np.array_equal(dense(dst)[Q], dense(src)[Q])  # not chosen by the regex


def test_seed_decides_random_modes(src: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.wclust", tmp_path / "b.wclust", tmp_path / "c.wclust"
    transform(src, a, "permute", seed=1)
    transform(src, b, "permute", seed=1)
    transform(src, c, "permute", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(dense(a)[W], dense(c)[W])


def test_header_records_the_transform_and_source_is_untouched(src: Path, tmp_path: Path) -> None:
    before = src.read_bytes()
    dst = out_path(tmp_path, "rec")
    transform(src, dst, ["sorted-gaussian", "affine-correct"], seed=7)
    with wcfmt.safe_open(dst) as f:
        assert f.header.settings.extra["transform"].startswith("sorted-gaussian affine-correct seed=7")
        assert f.reader.header.tensors["emb"].codec == "lossless"
    assert src.read_bytes() == before


# -- rounding collisions -----------------------------------------------------------------------
def test_fp16_collisions_are_separated_by_one_step_in_order() -> None:
    table, new, bumps = fp16_table(np.array([1.0, 1.0 + 1e-6, 1.0 + 2e-6, 2.0]))
    step = float(np.spacing(np.float16(1.0)))
    assert table.tolist() == [1.0, 1.0 + step, 1.0 + 2 * step, 2.0]
    assert new.tolist() == [0, 1, 2, 3] and bumps == 2


def test_tanh_with_far_outliers_stays_strictly_ascending() -> None:
    # 1000 and 1100 both saturate tanh in fp16; the table must still be strictly ascending.
    t = torch.tensor([-1100.0, -1000.0, -0.01, 0.0, 0.01, 1000.0, 1100.0], dtype=torch.float16)
    ct = wcfmt.ClusteredTensor(labels=torch.tensor([[0, 1, 2, 3, 3, 3, 3, 4, 5, 6]], dtype=torch.uint8),
                               centroids=[t], chunk_rows=1, dtype=torch.float16)
    out, relabelled = transform_tensor(ct, "tanh", scale=0.05)
    assert not relabelled and out.labels is ct.labels
    v = out.centroids[0].float()
    assert bool((v[1:] > v[:-1]).all())


def test_fp16_overflow_is_an_error() -> None:
    with pytest.raises(UsageError, match="fp16 range"):
        fp16_table(np.array([0.0, 1e6]))


# -- errors ------------------------------------------------------------------------------------
def test_bad_arguments_are_usage_errors_and_write_nothing(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "bad.wclust"
    with pytest.raises(UsageError, match="unknown transform mode"):
        transform(src, dst, "shuffle")
    with pytest.raises(UsageError, match="a > 0"):
        transform(src, dst, "affine", a=-1.0)
    with pytest.raises(UsageError, match="no tensor matches"):
        transform(src, dst, "permute", tensors="nothing-like-this")
    with pytest.raises(UsageError, match="invalid regex"):
        transform(src, dst, "permute", tensors="(")
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    dst.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        transform(src, dst, "permute")
    assert dst.read_bytes() == b"keep"
    transform(src, dst, "permute", force=True)
    verify(dst)


# -- folders and the CLI -----------------------------------------------------------------------
def test_folder_transform_copies_other_files(tmp_path: Path) -> None:
    import safetensors.torch

    folder = tmp_path / "hf"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    safetensors.torch.save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
         "model.norm.weight": torch.ones(24)},
        folder / "model.safetensors", metadata={"format": "pt"},
    )  # fmt: skip
    (folder / "config.json").write_text("{}")
    packed = tmp_path / "packed"
    wcfmt.pack(folder, packed, k=8)
    out = tmp_path / "out"
    rep = transform(packed, out, "rank-break", seed=0)
    assert rep.relabelled == ["model.layers.0.mlp.down_proj.weight"]
    assert (out / "config.json").read_text() == "{}"
    assert (out / "model.wclust.index.json").is_file()
    a = wcfmt.load_state_dict(packed)["model.layers.0.mlp.down_proj.weight"].float()
    b = wcfmt.load_state_dict(out)["model.layers.0.mlp.down_proj.weight"].float()
    assert torch.equal(torch.sign(a), torch.sign(b))


def test_cli_transform(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "cli.wclust"
    assert main(["transform", str(src), "-o", str(dst), "--mode", "permute", "--seed", "3"]) == 0
    assert "labels permuted" in capsys.readouterr().out
    assert main(["transform", str(src), "-o", str(tmp_path / "aff.wclust"), "--mode", "affine", "--a", "2",
                 "--b", "0", "--tensors", "q_proj"]) == 0  # fmt: skip
    assert "labels untouched" in capsys.readouterr().out
    assert main(["transform", str(src), "-o", str(tmp_path / "x.wclust"), "--mode", "affine", "--a", "0"]) == 1
    assert "a > 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.wclust")


def test_cli_lists_every_mode() -> None:
    from wcfmt import cli

    assert cli._TRANSFORM_MODES == MODES


# -- side effects nobody observed (mutation audit 0.2: T2, T5) --------------------------------------
def test_rank_break_leaves_a_zero_value_where_it_is() -> None:
    """0.0 is neither negative nor positive: a cluster whose value is exactly zero keeps it (its
    weights keep their sign, 0), whatever the draw; the others move within their sign."""
    v = np.array([-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 1.0])
    moved = False
    for seed in range(20):
        out = transform_values("rank-break", v, np.ones(v.size), np.random.default_rng(seed))
        assert out[3] == 0.0 and np.signbit(out[3]) == np.signbit(v[3])
        assert sorted(out[:3]) == sorted(v[:3]) and sorted(out[4:]) == sorted(v[4:])
        moved |= not np.array_equal(out, v)
    assert moved


@pytest.mark.parametrize("mode", ["permute", "gaussian", "rank-break"])
def test_random_modes_draw_per_tensor_name(mode: str) -> None:
    """The draw is seeded by (seed, crc32(name), codebook): two tensors with the same table and
    labels but different names get different weights; the same name, the same weights. (Rank-
    breaking modes keep the table sorted and move labels: compared decoded.)"""
    ct = cluster_tensor(torch.from_numpy(np.random.default_rng(0).standard_t(4, (64, 32)).astype(np.float32)), k=16)
    tables = {n: transform_tensor(ct, mode, seed=3, name=n)[0].decode() for n in ("a.weight", "b.weight")}
    again = transform_tensor(ct, mode, seed=3, name="a.weight")[0].decode()
    assert torch.equal(tables["a.weight"], again)
    assert not torch.equal(tables["a.weight"], tables["b.weight"])
