"""Per-matrix sensitivity and the K budget rule (wcfmt/sensitivity.py) on a tiny random Llama."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt.cli import main
from wcfmt.errors import UsageError
from wcfmt.inspect import info, verify
from wcfmt.sensitivity import Sensitivity, choose_k, pack_with_budget, sensitivity

transformers = pytest.importorskip("transformers")

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sens") / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init, so that clustering one matrix shows
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.mul_(8.0)
    model.to(torch.bfloat16).save_pretrained(d)
    return d


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(seed))


def independent_ppl(folder: Path, x: torch.Tensor, replace: dict[str, torch.Tensor] | None = None) -> float:
    """Perplexity with the plain transformers loss (its own shift and mean), one window per row."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, w in (replace or {}).items():
            model.get_parameter(n).copy_(w)
        loss = model(input_ids=x.reshape(-1, 64), labels=x.reshape(-1, 64)).loss
    return math.exp(float(loss))


def test_sensitivity_matches_an_independent_measurement(folder: Path, tmp_path: Path) -> None:
    s = sensitivity(folder, ids(), ks=[2, 8], tokens=256, window=64, cache=tmp_path / "c.json")
    assert len(s.ppl) == 14 and s.measured == 28
    assert s.base_ppl == pytest.approx(independent_ppl(folder, ids()), rel=1e-4)
    from safetensors.torch import load_file

    w = load_file(folder / "model.safetensors")[Q0]
    dec = wcfmt.cluster_tensor(w, 2).decode().float()
    assert s.ppl[Q0][2] == pytest.approx(independent_ppl(folder, ids(), {Q0: dec}), rel=1e-4)
    assert all(s.delta(n, 2) != 0 for n in s.ppl)  # every matrix's clustering shows in perplexity


def test_cache_is_reused_and_keyed_by_text_and_settings(folder: Path, tmp_path: Path) -> None:
    c = tmp_path / "c.json"
    a = sensitivity(folder, ids(), ks=[4], tokens=128, window=64, cache=c, tensors=r"layers\.0\.mlp")
    assert a.measured == 3
    b = sensitivity(folder, ids(), ks=[4], tokens=128, window=64, cache=c, tensors=r"layers\.0\.mlp")
    assert b.measured == 0 and b.ppl == a.ppl
    more = sensitivity(folder, ids(), ks=[4, 8], tokens=128, window=64, cache=c, tensors=r"layers\.0\.mlp")
    assert more.measured == 3 and {n: d[4] for n, d in more.ppl.items()} == {n: d[4] for n, d in a.ppl.items()}
    other = sensitivity(folder, ids(2), ks=[4], tokens=128, window=64, cache=c, tensors=r"layers\.0\.mlp")
    assert other.measured == 3  # other text: other key, nothing reused


def test_budget_rule_on_a_hand_made_table() -> None:
    s = Sensitivity(5.0, {"a": {2: 6.0, 4: 5.3, 8: 5.05}, "b": {2: 5.2, 4: 5.1, 8: 5.0}, "c": {2: 9, 4: 8, 8: 7}},
                    [2, 4, 8], 256, 64, "")
    assert choose_k(s, 0.25) == {"a": 8, "b": 2, "c": 8}
    assert choose_k(s, 0.3) == {"a": 4, "b": 2, "c": 8}
    assert choose_k(s, 100) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(UsageError):
        choose_k(s, -1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # K=2 on purpose: pack warns about degenerate SQNR
def test_pack_with_budget_uses_the_rule_and_records_it(folder: Path, tmp_path: Path) -> None:
    c = tmp_path / "c.json"
    budget = 0.05
    rep, chosen, s = pack_with_budget(folder, tmp_path / "out", budget_ppl=budget, text=ids(), ks=[2, 4, 16],
                                      tokens=256, window=64, cache=c)  # fmt: skip
    # The rule, checked from the measured table by hand here.
    for n, d in s.ppl.items():
        ok = [k for k in (2, 4, 16) if d[k] - s.base_ppl <= budget]
        assert chosen[n] == (ok[0] if ok else 16)
    assert len(set(chosen.values())) > 1  # the toy is built so that matrices differ
    with wcfmt.safe_open(tmp_path / "out" / "model.wclust") as f:
        extra = f.header.settings.extra
        assert extra["budget_ppl"] == "0.05" and extra["budget_ks"] == "2,4,16" and extra["budget_key"] == s.key
        for n, k in chosen.items():
            assert max(f.get_clustered(n).ks) <= k
            assert f.header.tensors[n].chunks[0].k == min(k, f.header.tensors[n].chunks[0].k)
    i = info(tmp_path / "out").to_dict()
    assert i["files"][0]["settings"]["extra"]["budget_ppl"] == "0.05"
    verify(tmp_path / "out")
    assert rep.clustered == 14
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'wcfmt.from_pretrained("out")' in card and ".tmp" not in card  # the output's name, not the temporary one


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_sensitivity_and_pack_budget(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from test_heal import char_tokenizer

    ids_file = tmp_path / "ids.txt"  # the CLI reads text: give the tiny model a character tokenizer
    ids_file.write_text("abc def ghij klm nop.\n" * 40)
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    char_tokenizer(src, ids_file.read_text())
    c = tmp_path / "cache"
    assert main(["sensitivity", str(src), "--text", str(ids_file), "--k", "2", "4", "--tokens", "256",
                 "--window", "64", "--cache-dir", str(c), "--tensors", "layers\\.1\\.mlp"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "K=2 +ppl" in out and "model.layers.1.mlp.up_proj.weight" in out
    assert main(["pack", str(src), "-o", str(tmp_path / "p"), "--budget-ppl", "0.1", "--text", str(ids_file),
                 "--budget-k", "2", "4", "--tokens", "256", "--window", "64", "--cache-dir", str(c)]) == 0
    assert "budget" in capsys.readouterr().out
    with wcfmt.safe_open(tmp_path / "p" / "model.wclust") as f:
        assert f.header.settings.extra["budget_ks"] == "2,4"


def test_bad_input(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ks must be"):
        sensitivity(folder, ids(), ks=[0], cache=False)
    with pytest.raises(UsageError, match="dense Hugging Face model folder"):
        sensitivity(tmp_path, ids(), cache=False)
    with pytest.raises(UsageError, match="fewer than one window"):
        sensitivity(folder, ids()[:10], window=64, cache=False)
    with pytest.raises(UsageError, match="chooses K itself"):
        pack_with_budget(folder, tmp_path / "x", budget_ppl=1, text=ids(), k=8)
    assert re.escape(Q0) + "$"  # the override pattern form used by pack_with_budget


def test_perplexity_needs_one_window() -> None:
    from wcfmt.errors import UsageError
    from wcfmt.method.sensitivity import perplexity

    with pytest.raises(UsageError, match="10 tokens is less than one window of 512"):
        perplexity(None, torch.arange(10))
