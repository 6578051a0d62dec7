"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_file_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [b for b in _blocks() if "tests/test_readme.py" in b and "wcfmt-demo" not in b]
    assert len(runnable) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(runnable[0], "README.md", "exec"), {})
    assert (tmp_path / "m.wclust").is_file()


def _char_tokenizer(folder: Path, text: str) -> None:
    """A character-level tokenizer for the stand-in model (its vocabulary fits the model's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def test_readme_whole_model_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_hub) -> None:  # type: ignore[no-untyped-def]
    """The whole-model block, as written, in a folder laid out as `python tools/demo.py` leaves it,
    with a tiny Llama standing in for SmolLM2 and tests/hub_double.py for the Hub."""
    transformers = pytest.importorskip("transformers")
    import torch

    runnable = [b for b in _blocks() if "tests/test_readme.py" in b and "wcfmt-demo" in b]
    assert len(runnable) == 1
    demo = tmp_path / "wcfmt-demo"
    text = "\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(120))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
                                   tie_word_embeddings=True)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(demo / "smollm2-135m-bf16")
    _char_tokenizer(demo / "smollm2-135m-bf16", text)
    (demo / "train.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WCFMT_CACHE", str(tmp_path / "cache"))
    exec(compile(runnable[0], "README.md", "exec"), {})
    for out in ("SmolLM2-135M-wclust", "SmolLM2-135M-dense", "sg", "healed", "budgeted"):
        assert (tmp_path / out).is_dir(), out
    assert "model.wclust" in real_hub.repos["me/SmolLM2-135M-wclust"]


from test_hub import real_hub  # noqa: E402,F401  (the Hub double fixture)
