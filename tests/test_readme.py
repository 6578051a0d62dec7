"""README.md is short, its links resolve, and its code blocks run as written.

Every fenced block is one of: a ```python block that names this file (run by `exec`), the
```bash block of `wcfmt` command lines (each line run in a shell), or a block preceded by
``<!-- not run by tests/test_readme.py: REASON -->`` (the install commands CI runs itself, the
torchrun example that tests/test_distributed.py runs).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = "<!-- not run by tests/test_readme.py: "
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)


def _fences() -> list[tuple[str, str, str | None]]:
    """(language, body, reason it is not run or None) for every fenced block, in order."""
    text, out, last = README.read_text(), [], 0
    for m in FENCE.finditer(text):
        before = text[last : m.start()]
        why = before[before.index(SKIP) + len(SKIP) :].split("-->")[0].strip() if SKIP in before else None
        out.append((m.group(1), m.group(2), why))
        last = m.end()
    return out


def _blocks() -> list[str]:
    return [body for lang, body, why in _fences() if lang == "python" and why is None]


def _cli_lines() -> list[str]:
    blocks = [body for lang, body, why in _fences() if lang == "bash" and why is None]
    assert len(blocks) == 1, "one bash block of wcfmt commands runs; mark the others as not run"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_readme_is_short_and_every_block_runs_or_says_why() -> None:
    assert len(README.read_text().splitlines()) <= 200
    fences = _fences()
    assert fences
    for lang, body, why in fences:
        if why is not None:
            assert len(why) > 10, f"say why this block is not run: {body[:60]!r}"
        elif lang == "python":
            assert "tests/test_readme.py" in body, body[:80]
        else:
            assert lang == "bash" and all(line.startswith("wcfmt ") for line in body.splitlines() if line.strip()), body[:80]


def test_readme_keeps_ci_test_command() -> None:
    """README's test command is what .ci/run runs (the two are kept in step)."""
    ci = (ROOT / ".ci" / "run").read_text()
    skipped = [body.strip() for lang, body, why in _fences() if why is not None]
    assert any(b.endswith('pip install -e ".[test]" && python -m pytest -q') for b in skipped)
    assert 'python -m pip install -q -e ".[test]" && python -m pytest -q' in ci


def test_readme_links_resolve() -> None:
    """Relative links and images of README.md point at files of the repository."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert local
    for target in local:
        assert (ROOT / target).exists(), target


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


def _demo_folder(tmp_path: Path) -> Path:
    """A folder laid out as `python tools/demo.py` leaves it, with a tiny Llama standing in for SmolLM2."""
    transformers = pytest.importorskip("transformers")
    import torch

    demo = tmp_path / "wcfmt-demo"
    text = "\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(120))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
                                   tie_word_embeddings=True)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(demo / "smollm2-135m-bf16")
    _char_tokenizer(demo / "smollm2-135m-bf16", text)
    (demo / "train.txt").write_text(text)
    return demo


def test_readme_whole_model_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-model block, as written, in a folder laid out as `python tools/demo.py` leaves it."""
    runnable = [b for b in _blocks() if "tests/test_readme.py" in b and "wcfmt-demo" in b]
    assert len(runnable) == 1
    _demo_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WCFMT_CACHE", str(tmp_path / "cache"))
    exec(compile(runnable[0], "README.md", "exec"), {})
    for out in ("SmolLM2-135M-wclust", "SmolLM2-5bit", "SmolLM2-again"):
        assert (tmp_path / out).is_dir(), out
    packed = [(tmp_path / d / "model.wclust").read_bytes() for d in ("SmolLM2-135M-wclust", "SmolLM2-again")]
    assert packed[0] == packed[1]  # the block says "the same bytes": it is so


def test_readme_cli_tour_runs(tmp_path: Path) -> None:
    """Every line of the README's command-line block, in a shell, where the demo ran."""
    lines = _cli_lines()
    assert len(lines) >= 4
    _demo_folder(tmp_path)
    for line in lines:
        command = line.split("#")[0].strip()
        argv = shlex.split(command)
        assert argv[0] == "wcfmt"
        run = subprocess.run([sys.executable, "-m", "wcfmt", *argv[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, (line, run.stderr[-3000:])
    assert (tmp_path / "smol-dense").is_dir()
    same = [(tmp_path / d / "model.wclust").read_bytes() for d in ("smol-wclust", "smol-again")]
    assert same[0] == same[1]
