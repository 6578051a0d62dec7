"""Token-frequency row weights from tokenizer.json (wcfmt/cluster/token_weights.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wcfmt.cluster.token_weights import OFFSET, token_row_weights


def write(folder: Path, model: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model}))
    return folder


def test_bpe_weights_follow_merge_rank_and_pad_rows_get_the_least(tmp_path: Path) -> None:
    vocab = {"<s>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4, "aba": 5}
    merges = [["a", "b"], "b a", ["ab", "a"]]  # both spellings tokenizers writes
    w, how = token_row_weights(write(tmp_path, {"type": "BPE", "vocab": vocab, "merges": merges}), 8)
    assert how == "bpe-merge-rank" and w.shape == (8,)
    assert np.log(w).mean() == pytest.approx(0.0, abs=1e-12)  # geometric mean 1
    want = 1.0 / (np.array([0, 0, 0, 1, 2, 3, 3, 3]) + OFFSET)  # rows 6, 7: padding, rank = merges
    np.testing.assert_allclose(w / w[0], want / want[0])


def test_a_real_bpe_tokenizer_weights_frequent_tokens_higher(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    words = [f"w{i}x" for i in range(300)]
    zipf = 1.0 / np.arange(1, 301)
    text = " ".join(rng.choice(words, size=20000, p=zipf / zipf.sum()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = tok.get_vocab_size()
    w, _ = token_row_weights(tmp_path, rows)
    # an independent path: count the tokens of the text and compare ranks (Spearman)
    counts = np.bincount(tok.encode(text).ids, minlength=rows).astype(float)
    used = counts > 0
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(w[used]), rank(counts[used]))[0, 1]
    assert rho > 0.5, rho
    assert tokenizers is not None


def test_unigram_weights_are_the_piece_probabilities(tmp_path: Path) -> None:
    vocab = [["<unk>", 0.0], ["▁the", -2.0], ["x", -5.0], ["rare", -40.0]]
    w, how = token_row_weights(write(tmp_path, {"type": "Unigram", "vocab": vocab}), 1000)
    assert how == "unigram-score"
    r = w / w[0]
    np.testing.assert_allclose(r[1:3], np.exp([-2.0, -5.0]))
    floor = OFFSET / (1000 + OFFSET)
    assert r[3] == pytest.approx(floor) and r[999] == pytest.approx(floor)  # floored; padding rows too


@pytest.mark.parametrize(
    "content",
    [
        None,  # no file
        "not json {",
        json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}),
        json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}),
        json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7]}}),
        json.dumps({"model": {"type": "Unigram", "vocab": [["a", "x"]]}}),
        json.dumps([1, 2]),
    ],
)
def test_no_frequencies_means_no_weights(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    assert token_row_weights(tmp_path, 4) is None
