"""Centroid healing (wcfmt/heal.py) on a tiny random Llama: the loss falls, labels stay put."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import wcfmt
from wcfmt.cli import main
from wcfmt.errors import UsageError
from wcfmt.method.heal import _Gather, project_ascending
from wcfmt.inspect import verify
from wcfmt.schema import ClusteredEntry

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("heal")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(d / "hf")
    wcfmt.pack(d / "hf", d / "packed", k=4)
    return d / "packed"


def ids() -> torch.Tensor:
    # A repeating pattern: learnable, so a few steps must lower the loss.
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(0, 64, (16,), generator=g)
    return motif.repeat(40)


def blobs(folder: Path) -> dict[str, list[bytes]]:
    out = {}
    with wcfmt.safe_open(folder / "model.wclust") as f:
        for name, e in f.header.tensors.items():
            if isinstance(e, ClusteredEntry):
                out[name] = [bytes(f.reader._stored(c.labels)) for c in e.chunks]
            else:
                out[name] = [bytes(f.reader._stored(b)) for c in e.chunks for b in c.planes]  # type: ignore[union-attr]
    return out


def loss_of(folder: Path, x: torch.Tensor) -> float:
    model = wcfmt.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def test_heal_lowers_the_loss_and_keeps_labels_and_other_tensors(packed: Path, tmp_path: Path) -> None:
    dst = tmp_path / "healed"
    rep = wcfmt.heal(packed, dst, ids(), steps=30, lr=0.1, seq_len=32, batch=4)
    assert rep.tensors == 14 and rep.steps == 30
    assert rep.last_loss < rep.first_loss
    # Independent check through the written files, on the training windows.
    x = ids()[: 4 * 32].reshape(4, 32)
    assert loss_of(dst, x) < loss_of(packed, x) - 0.05
    before, after = blobs(packed), blobs(dst)
    assert before.keys() == after.keys()
    for name in before:  # labels of clustered tensors and all lossless blobs byte-identical
        assert before[name] == after[name], name
    verify(dst)
    changed = 0
    with wcfmt.safe_open(packed / "model.wclust") as a, wcfmt.safe_open(dst / "model.wclust") as b:
        assert "healed" in b.header.settings.extra
        for name, e in a.header.tensors.items():
            if isinstance(e, ClusteredEntry):
                ta, tb = a.get_clustered(name).centroids, b.get_clustered(name).centroids
                changed += not all(torch.equal(p, q) for p, q in zip(ta, tb))
                for t in tb:  # ascending in fp16 and in the bf16 the tensor rebuilds to
                    assert bool((t[1:] > t[:-1]).all()) and bool((t.bfloat16()[1:] > t.bfloat16()[:-1]).all())
    assert changed == 14
    assert (dst / "config.json").read_bytes() == (packed / "config.json").read_bytes()
    # the card of the copy says it was healed (the packed folder's card does not)
    card = (dst / "README.md").read_text()
    assert "## Changes after packing" in card and "`wcfmt heal`" in card and "steps=30" in card
    assert "## Changes after packing" not in (packed / "README.md").read_text()


def test_heal_only_the_chosen_tensors(packed: Path, tmp_path: Path) -> None:
    dst = tmp_path / "mlp"
    rep = wcfmt.heal(packed, dst, ids(), steps=2, lr=1e-2, seq_len=32, batch=2, tensors=r"mlp\.")
    assert rep.tensors == 6
    with wcfmt.safe_open(packed / "model.wclust") as a, wcfmt.safe_open(dst / "model.wclust") as b:
        q = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(a.get_clustered(q).centroids[0], b.get_clustered(q).centroids[0])


def test_gather_backward_is_a_per_cluster_sum() -> None:
    table = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 2, 2], [1, 0, 2]])
    w = _Gather.apply(table, index)
    assert w.tolist() == [[0.5, 2.0, 2.0], [-1.0, 0.5, 2.0]]
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    w.backward(g)
    assert table.grad.tolist() == [1.0 + 5.0, 4.0, 2.0 + 3.0 + 6.0]


def test_project_ascending_is_the_weighted_least_squares_projection() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=5)
        w = rng.integers(1, 5, size=5).astype(float)
        got = project_ascending(v, w)
        assert (np.diff(got) >= -1e-12).all()
        # Brute force: the optimum is piecewise constant on blocks of consecutive entries, each at
        # its block's weighted mean; try every split into blocks and keep the best ascending one.
        best = None
        for cuts in itertools.product([0, 1], repeat=4):
            blocks, start = [], 0
            for i, c in enumerate(cuts, 1):
                if c:
                    blocks.append((start, i))
                    start = i
            blocks.append((start, 5))
            cand = np.concatenate([np.full(b - a, np.average(v[a:b], weights=w[a:b])) for a, b in blocks])
            if (np.diff(cand) >= -1e-12).all():
                cost = float((w * (cand - v) ** 2).sum())
                best = cost if best is None else min(best, cost)
        assert float((w * (got - v) ** 2).sum()) == pytest.approx(best, abs=1e-12)


def test_bad_input(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="steps"):
        wcfmt.heal(packed, tmp_path / "x", ids(), steps=0)
    with pytest.raises(UsageError, match="packed model folder"):
        wcfmt.heal(packed / "model.wclust", tmp_path / "x", ids())
    with pytest.raises(UsageError, match="fewer than one window"):
        wcfmt.heal(packed, tmp_path / "x", ids()[:10], seq_len=32)
    with pytest.raises(FileNotFoundError):
        wcfmt.heal(packed, tmp_path / "x", tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="path of a UTF-8 text file"):  # the text itself, not its path
        wcfmt.heal(packed, tmp_path / "x", "to be or not to be " * 50)
    assert not (tmp_path / "x").exists()


def char_tokenizer(folder: Path, text: str) -> None:
    """Save a character-level fast tokenizer (no merges) for the tiny model into ``folder``."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    assert len(vocab) <= 64
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(BPE(vocab=vocab, merges=[])))
    tok.save_pretrained(folder)


def test_cli_heal_with_a_text_file(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 20)
    # A folder without a tokenizer cannot read text: a one-line error, exit 1, nothing written.
    assert main(["heal", str(packed), "-o", str(tmp_path / "h"), "--text", str(text), "--steps", "1"]) == 1
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    src = tmp_path / "with-tok"
    shutil.copytree(packed, src)
    char_tokenizer(src, text.read_text())
    assert main(["heal", str(src), "-o", str(tmp_path / "h"), "--text", str(text), "--steps", "3",
                 "--seq-len", "64", "--batch", "2", "--lr", "0.01"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("healed ") and "3 steps of 128 tokens" in out
    verify(tmp_path / "h")
    assert blobs(src)["model.layers.1.mlp.down_proj.weight"] == blobs(tmp_path / "h")["model.layers.1.mlp.down_proj.weight"]


def test_cli_defaults_are_the_library_defaults() -> None:
    from wcfmt import cli
    from wcfmt.heal import DEFAULTS

    assert cli._HEAL_DEFAULTS == DEFAULTS


# -- multi-chunk codebooks and the weighted projection (mutation audit 0.2: H1, H3) -----------------
def _multi_chunk_codebook():  # type: ignore[no-untyped-def]
    from wcfmt.cluster import cluster_tensor

    w = torch.from_numpy(np.random.default_rng(2).standard_t(3, (64, 24)).astype(np.float32))
    ct = cluster_tensor(w, k=8).rechunk(16)  # one table stored in four chunks
    assert len(ct.centroids) == 4 and all(torch.equal(t, ct.centroids[0]) for t in ct.centroids)
    return ct


def test_codebook_counts_sum_every_chunk_of_the_codebook() -> None:
    from wcfmt.method.heal import _Codebooks

    ct = _multi_chunk_codebook()
    cb = _Codebooks(ct, torch.float64)
    k = ct.centroids[0].numel()
    assert cb.counts[0, :k].tolist() == np.bincount(ct.labels.numpy().reshape(-1), minlength=k).tolist()
    assert cb.counts[0, :k].sum() == 64 * 24


def isotonic_brute_force(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The nondecreasing sequence nearest ``v`` in w-weighted least squares, by trying every
    split into consecutive blocks (each block at its weighted mean) and keeping the best
    nondecreasing one."""
    best, arg = np.inf, None
    for cuts in itertools.product([0, 1], repeat=v.size - 1):
        b = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [v.size]
        means = [float((w[a:e] * v[a:e]).sum() / w[a:e].sum()) for a, e in zip(b[:-1], b[1:])]
        if any(m2 < m1 for m1, m2 in zip(means, means[1:])):
            continue
        fit = np.concatenate([np.full(e - a, m) for a, e, m in zip(b[:-1], b[1:], means)])
        cost = float((w * (v - fit) ** 2).sum())
        if cost < best:
            best, arg = cost, fit
    assert arg is not None
    return arg


def test_each_steps_projection_is_weighted_by_the_cluster_counts() -> None:
    from wcfmt.method.heal import _Codebooks

    ct = _multi_chunk_codebook()
    cb = _Codebooks(ct, torch.float64)
    k = ct.centroids[0].numel()
    counts = np.bincount(ct.labels.numpy().reshape(-1), minlength=k).astype(np.float64)
    assert counts.max() > 3 * counts.min()  # unequal counts: the weights matter
    bent = np.array([0.0, 1.0, 0.5, 2.0, 1.5, 1.2, 3.0, 2.5])[:k]
    with torch.no_grad():
        cb.u[0, :k] = torch.from_numpy(bent)
    assert cb.project() == 1
    got = cb.u[0, :k].detach().double().numpy()
    assert np.allclose(got, isotonic_brute_force(bent, counts), rtol=0, atol=1e-12)
    assert not np.allclose(got, isotonic_brute_force(bent, np.ones(k)), rtol=0, atol=1e-6)
