"""Model-wide bit allocation (wcfmt/cluster/allocate.py) and pack's bits mode (wcfmt/convert.py).

Expectations come from what the writer stores (blob lengths read back from the header), from
the equal-slope condition checked on the recorded steps, and from hand-set cases — not from the
allocator's own predictions.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as st_save

import wcfmt
from wcfmt.cluster.allocate import TensorRate, allocate, coarse_histogram
from wcfmt.cluster import cluster_tensor
from wcfmt.cluster.kmeans import EXACT_MAX_POINTS, ValueHistogram, value_histogram
from wcfmt.errors import UsageError
from wcfmt.packing import DEFAULT_EMBED_WEIGHT
from wcfmt.reader import WclustReader
from wcfmt.schema import AliasEntry, ClusteredEntry


def stored(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (stored label+table bytes, elements) of every clustered tensor of a file or folder."""
    out = {}
    for p in [path] if path.is_file() else sorted(path.glob("*.wclust")):
        with WclustReader(p) as r:
            for name, e in r.header.tensors.items():
                if isinstance(e, ClusteredEntry):
                    out[name] = (sum(c.labels.length + c.centroids.length for c in e.chunks), math.prod(e.shape))
    return out


def avg_bits(s: dict[str, tuple[int, int]], names=None) -> float:
    keep = [v for n, v in s.items() if names is None or n in names]
    return 8 * sum(b for b, _ in keep) / sum(n for _, n in keep)


@pytest.fixture(scope="module")
def three_matrices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file with a narrow, a Gaussian and a heavy-tailed projection of different sizes."""
    g = np.random.default_rng(0)
    t = {
        "model.layers.0.mlp.up_proj.weight": g.normal(0, 0.01, (256, 512)),
        "model.layers.0.mlp.down_proj.weight": g.standard_t(3, (512, 256)) * 0.02,
        "model.layers.0.self_attn.q_proj.weight": g.normal(0, 0.03, (300, 256)),
        "model.norm.weight": np.ones(256),
    }
    path = tmp_path_factory.mktemp("alloc") / "m.safetensors"
    st_save({k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in t.items()}, str(path))
    return path


@pytest.mark.parametrize("bits", [3.0, 4.5, 6.0])
def test_model_average_within_two_percent(tmp_path: Path, three_matrices: Path, bits: float) -> None:
    out = tmp_path / "m.wclust"
    wcfmt.pack(three_matrices, out, bits=bits)
    s = stored(out)
    assert len(s) == 3
    assert avg_bits(s) == pytest.approx(bits, rel=0.02)
    # One slope: tensors of different spread get different bits (the heavy tail the most).
    per = {n: 8 * b / k for n, (b, k) in s.items()}
    assert per["model.layers.0.mlp.down_proj.weight"] > per["model.layers.0.mlp.up_proj.weight"] + 0.2


def test_equal_slope_recorded(tmp_path: Path, three_matrices: Path) -> None:
    out = tmp_path / "m.wclust"
    wcfmt.pack(three_matrices, out, bits=4.0)
    with WclustReader(out) as r:
        h = r.header
    extra = h.settings.extra
    assert h.settings.method == "ecsq" and extra["bits"] == "4"
    lam = float(extra["lambda"])
    step = float(extra["step"])
    assert lam == pytest.approx(step * step * math.log(2) / 6, rel=1e-5)
    for name, e in h.tensors.items():
        if isinstance(e, ClusteredEntry):
            # every tensor at the model's slope (unweighted: mean importance 1)
            assert e.quality["lambda"] == pytest.approx(lam, rel=1e-5), name
            assert e.quality["step"] == pytest.approx(step, rel=1e-5), name
    from wcfmt.inspect import format_table, info

    table = format_table(info(out))
    assert "ecsq" in table and "λ" in table


def test_overrides_get_their_own_budget(tmp_path: Path, three_matrices: Path) -> None:
    out = tmp_path / "m.wclust"
    wcfmt.pack(three_matrices, out, bits=4.0, bits_overrides={r"q_proj": 6.0})
    s = stored(out)
    assert avg_bits(s, {"model.layers.0.self_attn.q_proj.weight"}) == pytest.approx(6.0, rel=0.02)
    rest = {n for n in s if "q_proj" not in n}
    assert avg_bits(s, rest) == pytest.approx(4.0, rel=0.02)


def test_pack_is_deterministic(tmp_path: Path, three_matrices: Path) -> None:
    wcfmt.pack(three_matrices, tmp_path / "a.wclust", bits=4.0, threads=1)
    wcfmt.pack(three_matrices, tmp_path / "b.wclust", bits=4.0, threads=2)
    assert (tmp_path / "a.wclust").read_bytes() == (tmp_path / "b.wclust").read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 16, "bits": 4.0}, "not both"), ({"k": 16, "bits_embed": 5.0}, "bits_embed"),
     ({"bits": 4.0, "k_overrides": {"q": 8}}, "k_overrides"), ({"bits": 0.0}, "bits"), ({"bits": 17}, "bits"),
     ({"k": 16, "embed_weight": 4.0}, "embed_weight"), ({"bits": 4.0, "embed_weight": 0.0}, "embed_weight"),
     ({"bits": 4.0, "embed_weight": float("inf")}, "embed_weight"),
     ({"bits": 4.0, "calib_tokens": 100}, "calib"), ({"bits": 4.0, "calib": "/nonexistent.txt"}, "no such")],
)
def test_usage_errors(tmp_path: Path, three_matrices: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        wcfmt.pack(three_matrices, tmp_path / "x.wclust", **kwargs)
    assert not (tmp_path / "x.wclust").exists()


def test_calib_needs_a_model_folder(tmp_path: Path, three_matrices: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be")
    with pytest.raises(UsageError, match="model folder"):
        wcfmt.pack(three_matrices, tmp_path / "x.wclust", bits=4.0, calib=text)
    assert not (tmp_path / "x.wclust").exists()


def test_cli_k_and_bits_exclusive(tmp_path: Path, three_matrices: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "wcfmt", "pack", str(three_matrices), "-o", str(tmp_path / "x.wclust"),
                        "--k", "16", "--bits", "4"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = subprocess.run([sys.executable, "-m", "wcfmt", "pack", str(three_matrices), "-o", str(tmp_path / "y.wclust"),
                        "--bits", "4.5", "-q"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert avg_bits(stored(tmp_path / "y.wclust")) == pytest.approx(4.5, rel=0.02)
    r = subprocess.run([sys.executable, "-m", "wcfmt", "info", str(tmp_path / "y.wclust"), "--json"],
                       capture_output=True, text=True)  # fmt: skip
    settings = json.loads(r.stdout)["files"][0]["settings"]
    assert settings["method"] == "ecsq" and settings["extra"]["bits"] == "4.5"


# -- allocation on histograms ------------------------------------------------------------------
def measured_bits(tensors: dict[str, torch.Tensor], steps: dict[str, float], tmp: Path) -> dict[str, float]:
    """Bits per weight the writer stores (labels + tables, read back from the header) for each
    tensor clustered at its allocated step: what allocation promises, measured, not modelled."""
    path = tmp / "alloc.wclust"
    wcfmt.save_file({n: cluster_tensor(t, step=steps[n]) for n, t in tensors.items()}, path)
    return {n: 8 * b / e for n, (b, e) in stored(path).items()}


def test_coarse_histogram_keeps_counts_and_importance_apart() -> None:
    """A stand-in histogram keeps the element count and the summed importance of the values it
    replaces, cell by cell, and each cell's importance-weighted mean (checked by digitizing)."""
    g = np.random.default_rng(3)
    v = g.standard_t(4, 300_000).astype(np.float32)
    f32 = value_histogram(v, "F32")
    imp = ValueHistogram("F32", f32.x, f32.count, f32.count * g.uniform(0.5, 3.0, f32.x.size))
    coarse = coarse_histogram(imp)
    assert coarse.x.size <= 8192 < imp.x.size
    assert coarse.count.sum() == imp.count.sum() == 300_000
    assert coarse.weight.sum() == pytest.approx(imp.weight.sum(), rel=1e-12)
    assert not np.allclose(coarse.count, coarse.weight)
    # per cell, from the values' own counts and weights:
    starts = np.flatnonzero(np.r_[True, np.diff(coarse_cells(imp, coarse)) != 0])
    assert np.array_equal(np.add.reduceat(imp.count, starts), coarse.count)
    assert np.allclose(np.add.reduceat(imp.weight * imp.x, starts) / np.add.reduceat(imp.weight, starts), coarse.x)


def coarse_cells(h: ValueHistogram, coarse: ValueHistogram) -> np.ndarray:
    """For each value of ``h``, the stand-in cell that holds it: cells are contiguous runs of
    values, so the cell index steps up where the running count passes each cell's count."""
    ends = np.cumsum(coarse.count)
    return np.searchsorted(ends, np.cumsum(h.count), side="left")


def test_allocate_groups_meet_their_budgets_as_stored(tmp_path: Path) -> None:
    g = np.random.default_rng(3)
    heavy = torch.from_numpy(g.standard_t(4, (300, 1000)).astype(np.float32))
    narrow = torch.from_numpy(g.normal(size=(100, 500)).astype(np.float32))
    emb = torch.from_numpy(g.normal(size=(100, 500)).astype(np.float32))
    hist = lambda t: value_histogram(t.numpy().reshape(-1), "F32")  # noqa: E731
    a = allocate(
        {"a": TensorRate([coarse_histogram(hist(heavy))], [16.0], "model"), "b": TensorRate([hist(narrow)], [16.0], "model"),
         "e": TensorRate([hist(emb)], [16.0], "embed")},
        {"model": 4.0, "embed": 6.0},
    )  # fmt: skip
    assert a.steps["a"] == a.steps["b"] != a.steps["e"]
    got = measured_bits({"a": heavy, "b": narrow, "e": emb}, a.steps, tmp_path)
    assert (got["a"] * 300_000 + got["b"] * 50_000) / 350_000 == pytest.approx(4.0, rel=0.02)
    assert got["e"] == pytest.approx(6.0, rel=0.02)
    assert got["a"] > got["b"]  # one slope: the heavy-tailed one takes more bits


def test_allocate_weight_gives_finer_cells_and_keeps_the_budget(tmp_path: Path) -> None:
    g = np.random.default_rng(5)
    t = torch.from_numpy(g.normal(size=(120, 500)).astype(np.float32))
    h = value_histogram(t.numpy().reshape(-1), "F32")
    plain = allocate({"a": TensorRate([h], [16.0], "model"), "b": TensorRate([h], [16.0], "model")}, {"model": 4.0})
    assert plain.steps["a"] == plain.steps["b"]
    a = allocate({"a": TensorRate([h], [16.0], "model", weight=4.0), "b": TensorRate([h], [16.0], "model")},
                 {"model": 4.0})
    # one slope: ω = 4 halves the cells' width (λ = ω·s²·ln2/6), so "a" stores about one more bit than "b"
    assert a.steps["a"] == pytest.approx(a.steps["b"] / 2, rel=1e-12)
    got = measured_bits({"a": t, "b": t}, a.steps, tmp_path)
    assert got["a"] - got["b"] == pytest.approx(1.0, abs=0.15)
    assert (got["a"] + got["b"]) / 2 == pytest.approx(4.0, rel=0.02)
    assert a.steps["b"] > plain.steps["b"]  # the bits "a" gains, "b" pays
    with pytest.raises(UsageError, match="weight"):
        allocate({"a": TensorRate([h], [16.0], "model", weight=0.0)}, {"model": 4.0})


# -- a tied-embedding causal LM folder ---------------------------------------------------------
@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from common import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tied-llama"), hidden=64, intermediate=128, tie=True,
                            dtype=torch.bfloat16)


def test_bits_embed_clusters_the_tied_embedding_once(tmp_path: Path, tied_llama: Path) -> None:
    out = tmp_path / "packed"
    wcfmt.pack(tied_llama, out, bits=4.0, bits_embed=7.0)
    s = stored(out)
    assert "model.embed_tokens.weight" in s
    assert avg_bits(s, {"model.embed_tokens.weight"}) > 6.0
    with WclustReader(next(out.glob("*.wclust"))) as r:
        tensors = r.header.tensors
        extra = r.header.settings.extra
    # the tied head stays one tensor (no lm_head stored, or an alias of the embedding)
    head = tensors.get("lm_head.weight")
    assert head is None or isinstance(head, AliasEntry)
    assert extra["bits_embed"] == "7" and "lambda_embed" in extra and extra["embeddings"] == "clustered"
    # --no-embeddings keeps it lossless
    wcfmt.pack(tied_llama, tmp_path / "p2", bits=4.0, embeddings=False)
    assert "model.embed_tokens.weight" not in stored(tmp_path / "p2")


def test_embed_weight_moves_bits_to_the_tied_embedding(tmp_path: Path, tied_llama: Path) -> None:
    emb = {"model.embed_tokens.weight"}
    got = {}
    for w in (1.0, 16.0):
        out = tmp_path / f"w{w:g}"
        wcfmt.pack(tied_llama, out, bits=4.0, embed_weight=w)
        s = stored(out)
        got[w] = (avg_bits(s, emb), avg_bits(s, set(s) - emb), avg_bits(s))
        with WclustReader(next(out.glob("*.wclust"))) as r:
            extra = r.header.settings.extra
            steps = {n: e.quality["step"] for n, e in r.header.tensors.items() if isinstance(e, ClusteredEntry)}
        assert extra["embed_weight"] == f"{w:g}"
        # one slope: the embedding's cells are 1/√w as wide as every projection's
        proj = {v for n, v in steps.items() if n not in emb}
        assert len(proj) == 1
        assert steps["model.embed_tokens.weight"] == pytest.approx(proj.pop() / math.sqrt(w), rel=1e-5)
    assert got[16.0][0] > got[1.0][0] + 1.0  # the embedding gains bits ...
    assert got[16.0][1] < got[1.0][1]  # ... the projections pay for them
    assert got[16.0][2] == pytest.approx(4.0, rel=0.02) and got[1.0][2] == pytest.approx(4.0, rel=0.02)
    # the default is DEFAULT_EMBED_WEIGHT, the same bytes as giving it
    wcfmt.pack(tied_llama, tmp_path / "d", bits=4.0)
    wcfmt.pack(tied_llama, tmp_path / "e", bits=4.0, embed_weight=DEFAULT_EMBED_WEIGHT)
    assert next((tmp_path / "d").glob("*.wclust")).read_bytes() == next((tmp_path / "e").glob("*.wclust")).read_bytes()
    # with a budget of its own, the weight plays no part (and is not recorded)
    wcfmt.pack(tied_llama, tmp_path / "b", bits=4.0, bits_embed=6.0, embed_weight=16.0)
    with WclustReader(next((tmp_path / "b").glob("*.wclust"))) as r:
        assert "embed_weight" not in r.header.settings.extra


def test_calib_relabels_and_records(tmp_path: Path, tied_llama: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("to be or not to be that is the question the king is dead long live the queen " * 8)
    wcfmt.pack(tied_llama, tmp_path / "plain", bits=4.0, embeddings=False)
    wcfmt.pack(tied_llama, tmp_path / "cal", bits=4.0, embeddings=False, calib=text, calib_tokens=64)
    wcfmt.pack(tied_llama, tmp_path / "cal2", bits=4.0, embeddings=False, calib=text, calib_tokens=64)
    a = wcfmt.load_state_dict(tmp_path / "plain")
    b = wcfmt.load_state_dict(tmp_path / "cal")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[name], b[name])  # labels chosen against H, not nearest
    assert sorted((tmp_path / "cal").glob("*.wclust"))[0].read_bytes() == \
        sorted((tmp_path / "cal2").glob("*.wclust"))[0].read_bytes()  # fmt: skip
    with WclustReader(next((tmp_path / "cal").glob("*.wclust"))) as r:
        extra = r.header.settings.extra
    assert extra["calib_text"] == "calib.txt" and extra["calib_tokens"] == "64" and extra["calib"].startswith("gptq")


def test_cli_default_bits_is_the_librarys() -> None:
    from wcfmt import cli, convert
    text = " ".join(cli.build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
                    .choices["pack"].format_help().split())
    assert f"default {convert.DEFAULT_BITS_CALIBRATED:g} when input columns are weighted" in text
    assert f"else {convert.DEFAULT_BITS:g})" in text


# -- survivors of `python tools/mutation.py wcfmt/cluster/allocate.py` (tools/NOTES-mutation.md) ---
def _hist(n: int, seed: int = 0) -> ValueHistogram:
    return value_histogram(np.random.default_rng(seed).standard_t(4, n).astype(np.float32), "F32")


def test_a_weighted_tensor_at_a_step_is_the_unweighted_one_at_a_finer_step() -> None:
    """TensorRate's docstring: weight ω makes its cells 1/√ω as wide at one slope. So ω = 4 at
    common step s costs what ω = 1 costs at s/2, and ω = 1/4 what ω = 1 costs at 2s."""
    h = _hist(20_000)
    plain = TensorRate([h], [16.0], "g")
    for w, factor in ((4.0, 0.5), (0.25, 2.0)):
        for s in (0.05, 0.2):
            assert TensorRate([h], [16.0], "g", weight=w).bits_at(s) == pytest.approx(plain.bits_at(s * factor), rel=1e-12)


def test_coarse_histogram_keeps_a_histogram_of_exactly_the_limit() -> None:
    """At most EXACT_MAX_POINTS distinct values: the histogram itself; one more: a coarser one of
    the same dtype and the same total count."""
    x = np.arange(EXACT_MAX_POINTS + 1, dtype=np.float32) / 1000
    exact = ValueHistogram("F32", x[:-1], np.ones(EXACT_MAX_POINTS, np.int64), np.ones(EXACT_MAX_POINTS))
    assert coarse_histogram(exact) is exact
    over = ValueHistogram("F32", x, np.ones(x.size, np.int64), np.ones(x.size))
    got = coarse_histogram(over)
    assert got.dtype == "F32" and got.x.size < x.size and int(got.count.sum()) == x.size


def test_a_group_without_members_does_not_stop_the_others() -> None:
    a = allocate({"t": TensorRate([_hist(5_000)], [16.0], "later")}, {"empty": 4.0, "later": 4.0})
    assert set(a.steps) == {"t"} and set(a.group_step) == {"later"}


def test_bits_per_weight_of_a_one_element_tensor() -> None:
    """`Allocation.bits` is the tensor's modelled bits over its element count, also for one element."""
    one = value_histogram(np.array([0.5], np.float32), "F32")
    rates = {"one": TensorRate([one], [16.0], "g"), "big": TensorRate([_hist(20_000)], [16.0], "g")}
    a = allocate(rates, {"g": 4.0})
    step = a.group_step["g"]
    assert a.bits["one"] == pytest.approx(rates["one"].bits_at(step)) and a.bits["one"] > 16
