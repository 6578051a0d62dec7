"""pack(embed_importance="tokens"): embedding rows weighted by their tokens' expected frequency
(wcfmt/cluster/token_weights.py, wcfmt/convert.py). Expectations come from the stored bytes and
the decoded weights, not from the allocator's predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as st_save

import wcfmt
from wcfmt.errors import UsageError
from wcfmt.reader import WclustReader
from wcfmt.schema import ClusteredEntry

VOCAB = 1024
EMB = "model.embed_tokens.weight"


def bpe_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A BPE tokenizer.json whose token i (i >= 2) is made by merge i - 1: 'a', 'b', 'ab', 'abb', ..."""
    names = ["a", "b"] + ["a" + "b" * (i - 1) for i in range(2, vocab)]
    merges = [[names[i - 1], "b"] for i in range(2, vocab)]
    spec = {"version": "1.0", "model": {"type": "BPE", "vocab": {n: i for i, n in enumerate(names)}, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("emb-imp") / "src"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    st_save({
        EMB: (torch.randn(VOCAB, 48, generator=g) * 0.02).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": (torch.randn(96, 48, generator=g) * 0.05).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(48, 48, generator=g) * 0.05).bfloat16(),
        "model.norm.weight": torch.ones(48).bfloat16(),
    }, str(d / "model.safetensors"))  # fmt: skip
    (d / "config.json").write_text("{}")
    bpe_tokenizer(d)
    return d


def emb_error_by_quarter(src: Path, packed: Path) -> list[float]:
    from safetensors.torch import load_file

    want = load_file(str(src / "model.safetensors"))[EMB].float()
    got = wcfmt.load_state_dict(packed)[EMB].float()
    err = ((got - want) ** 2).mean(dim=1)
    return [float(err[a : a + VOCAB // 4].mean()) for a in range(0, VOCAB, VOCAB // 4)]


def stored_bits(packed: Path) -> tuple[float, dict[str, str], int]:
    with WclustReader(packed / "model.wclust") as r:
        nbytes = n = 0
        tables = 0
        for name, e in r.header.tensors.items():
            if isinstance(e, ClusteredEntry):
                nbytes += sum(c.labels.length + c.centroids.length for c in e.chunks)
                n += math.prod(e.shape)
                if name == EMB:
                    tables = len({bytes(r._stored(c.centroids)) for c in e.chunks})
        return 8 * nbytes / n, dict(r.header.settings.extra), tables


def test_frequent_tokens_rows_get_finer_cells_at_the_same_budget(tmp_path: Path, model: Path) -> None:
    wcfmt.pack(model, tmp_path / "tok", bits=3.0, embed_importance="tokens")
    wcfmt.pack(model, tmp_path / "uni", bits=3.0, embed_importance="uniform")
    bits_t, extra_t, tables_t = stored_bits(tmp_path / "tok")
    bits_u, extra_u, _ = stored_bits(tmp_path / "uni")
    assert extra_t["embed_importance"] == "bpe-merge-rank" and "embed_importance" not in extra_u
    assert tables_t == 4  # one table (and step) per 256 rows
    assert bits_t == pytest.approx(3.0, rel=0.03) and bits_u == pytest.approx(3.0, rel=0.03)  # same budget
    tok, uni = emb_error_by_quarter(model, tmp_path / "tok"), emb_error_by_quarter(model, tmp_path / "uni")
    assert tok[0] < tok[1] < tok[3]  # error grows with merge rank (rarer tokens)
    assert tok[0] < 0.5 * uni[0] and tok[3] > uni[3]  # bits moved from rare rows to frequent ones
    # deterministic bytes
    wcfmt.pack(model, tmp_path / "tok2", bits=3.0, embed_importance="tokens")
    assert (tmp_path / "tok" / "model.wclust").read_bytes() == (tmp_path / "tok2" / "model.wclust").read_bytes()


def test_without_token_frequencies_rows_weigh_the_same(tmp_path: Path, model: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(model, src)
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    wcfmt.pack(src, tmp_path / "wp", bits=3.0, embed_importance="tokens")
    wcfmt.pack(src, tmp_path / "uni", bits=3.0, embed_importance="uniform")
    headers = []
    for name in ("wp", "uni"):
        with WclustReader(tmp_path / name / "model.wclust") as r:
            extra = dict(r.header.settings.extra)  # type: ignore[union-attr]
            asked = json.loads(extra.pop("options"))["embed_importance"]  # the options as given differ
            headers.append((asked, r.header.model_dump()["tensors"], extra))
    assert headers[0][0] == "tokens" and headers[1][0] == "uniform"
    assert headers[0][1:] == headers[1][1:]  # same blobs (offsets, lengths, CRCs) and settings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_importance": "zipf"}, "embed_importance must be one of"),
        ({"embed_importance": "tokens", "k": 16}, "needs clustered embeddings and the bits encoder"),
        ({"embed_importance": "tokens", "bits": 4.0, "embeddings": False}, "needs clustered embeddings"),
    ],
)
def test_usage_errors(tmp_path: Path, model: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        wcfmt.pack(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_option_and_default(tmp_path: Path, model: Path) -> None:
    from wcfmt import cli, convert
    from wcfmt.cli import main

    pack_help = cli.build_parser()._subparsers._group_actions[0].choices["pack"].format_help()  # type: ignore[union-attr]
    assert f"(uniform; default {convert.EMBED_IMPORTANCE})" in " ".join(pack_help.split())
    assert main(["pack", str(model), "-o", str(tmp_path / "c"), "--bits", "3", "--embed-importance", "tokens", "-q"]) == 0
    assert stored_bits(tmp_path / "c")[1]["embed_importance"] == "bpe-merge-rank"
    from wcfmt.inspect import format_table, info

    assert "rows weighted by token frequency (bpe-merge-rank)" in format_table(info(tmp_path / "c"))
    with pytest.raises(SystemExit):
        main(["pack", str(model), "-o", str(tmp_path / "d"), "--embed-importance", "zipf"])
    assert np.isfinite(stored_bits(tmp_path / "c")[0])


def test_embed_weight_is_for_output_heads_only(tmp_path: Path, model: Path) -> None:
    """--embed-weight (default 8) weighs an LM head or an embedding a causal LM ties to one; an
    encoder's input embedding (no causal architecture in config.json) keeps weight 1."""
    import shutil

    from wcfmt.packing.plan import is_output_head as _is_output_head

    steps = {}
    for name, config in (("encoder", {"architectures": ["BertModel"]}),
                         ("causal", {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}),
                         ("untied", {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False})):  # fmt: skip
        src = tmp_path / name
        shutil.copytree(model, src)
        (src / "config.json").write_text(json.dumps(config))
        wcfmt.pack(src, tmp_path / f"{name}.out", bits=3.0)
        with WclustReader(tmp_path / f"{name}.out" / "model.wclust") as r:
            q = {n: e.quality["step"] for n, e in r.header.tensors.items() if isinstance(e, ClusteredEntry)}
            steps[name] = (q[EMB] / q["model.layers.0.mlp.up_proj.weight"], r.header.settings.extra.get("embed_weight"))
    assert steps["encoder"][0] == pytest.approx(1.0) and steps["encoder"][1] is None
    assert steps["untied"][0] == pytest.approx(1.0) and steps["untied"][1] is None
    assert steps["causal"][0] == pytest.approx(1 / math.sqrt(8.0), rel=1e-5) and steps["causal"][1] == "8"
    assert _is_output_head("lm_head.weight", tmp_path / "encoder")  # a head is a head anywhere
