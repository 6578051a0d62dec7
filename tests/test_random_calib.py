"""pack's column weights from random tokens (``calib="random"``), automatic in bits mode for
causal-LM folders, and when and why it is not used (wcfmt/convert.py, wcfmt/cluster/calibrate.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import wcfmt
from wcfmt import convert
from wcfmt.packing import calibrate as calibrate_stage
from wcfmt.cli import main
from wcfmt.errors import UsageError
from wcfmt.reader import WclustReader

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("random-calib"), hidden=32, intermediate=64, dtype=torch.bfloat16)


def _extra(folder: Path) -> dict[str, str]:
    with WclustReader(next(folder.glob("*.wclust"))) as r:
        assert r.header.settings is not None
        return dict(r.header.settings.extra)


def _projections(folder: Path) -> dict[str, bytes]:
    with WclustReader(next(folder.glob("*.wclust"))) as r:
        return {n: r.decode_chunk(n, 0).tobytes() for n in r.header.tensors if "proj" in n}


def test_default_pack_of_a_causal_lm_weighs_columns_by_random_tokens(tmp_path: Path, llama: Path) -> None:
    wcfmt.pack(llama, tmp_path / "default")
    wcfmt.pack(llama, tmp_path / "random", bits=convert.DEFAULT_BITS_CALIBRATED, calib="random")
    wcfmt.pack(llama, tmp_path / "none", calib="none")
    auto, none = _extra(tmp_path / "default"), _extra(tmp_path / "none")
    # 8 rows of 128 random ids, cut to the tiny model's 64 positions
    assert auto["calib"] == "diagonal+refit" and auto["calib_text"] == "random (8x64 tokens, seed 0)"
    assert auto["bits"] == f"{convert.DEFAULT_BITS_CALIBRATED:g}" and none["bits"] == f"{convert.DEFAULT_BITS:g}"
    assert "calib" not in none and "calib_skipped" not in none  # the user said none: nothing to explain
    assert _projections(tmp_path / "default") == _projections(tmp_path / "random")  # the same choice, spelled out
    # the same again: the random tokens have a seed, the bytes do not change
    wcfmt.pack(llama, tmp_path / "again")
    a, b = (next((tmp_path / d).glob("*.wclust")).read_bytes() for d in ("default", "again"))
    assert a == b
    # and the weights were used: labels differ from an unweighted pack at the same slope
    wcfmt.pack(llama, tmp_path / "plain", bits=convert.DEFAULT_BITS_CALIBRATED, calib="none")
    assert _projections(tmp_path / "random") != _projections(tmp_path / "plain")


def test_where_automatic_calibration_does_not_run(tmp_path: Path, llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # not a causal LM: the uncalibrated default, and the reason recorded and shown
    base = tmp_path / "base-model"
    shutil.copytree(llama, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["LlamaModel"]
    (base / "config.json").write_text(json.dumps(cfg))
    wcfmt.pack(base, tmp_path / "base")
    extra = _extra(tmp_path / "base")
    assert extra["bits"] == f"{convert.DEFAULT_BITS:g}" and extra["calib"] == "none"
    assert extra["calib_skipped"] == "not a causal LM (config.json architectures: LlamaModel)"
    from wcfmt.inspect import format_table, info

    assert "not calibrated: not a causal LM" in format_table(info(tmp_path / "base"))
    # custom model code, too little memory, no transformers
    cfg["architectures"], cfg["auto_map"] = ["LlamaForCausalLM"], {"AutoModelForCausalLM": "x.Y"}
    (base / "config.json").write_text(json.dumps(cfg))
    assert calibrate_stage.auto_calibration_blocker(base) == "the model needs its own code (auto_map)"
    monkeypatch.setattr(calibrate_stage, "available_memory", lambda: 1000)
    assert "GiB of memory is available" in str(calibrate_stage.auto_calibration_blocker(llama))
    monkeypatch.undo()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    assert calibrate_stage.auto_calibration_blocker(llama) == "transformers is not installed (pip install transformers)"
    monkeypatch.undo()
    assert calibrate_stage.auto_calibration_blocker(llama) is None
    # a single file: no model to run
    wcfmt.pack(llama / "model.safetensors", tmp_path / "one.wclust")
    with WclustReader(tmp_path / "one.wclust") as r:
        assert r.header.settings.extra["calib_skipped"] == "not a Hugging Face model folder"
    # k-means: the paper's setting stays as it was
    wcfmt.pack(llama, tmp_path / "k", k=16)
    assert "calib" not in _extra(tmp_path / "k")


def test_a_model_that_fails_to_run_is_a_warning_when_automatic_an_error_when_asked(
    tmp_path: Path, llama: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(llama, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["hidden_size"] = 48  # the weights are 32 wide: transformers cannot load them
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="packed without column weights: the model did not run"):
        wcfmt.pack(broken, tmp_path / "auto")
    assert _extra(tmp_path / "auto")["calib_skipped"].startswith("the model did not run (")
    with pytest.raises(UsageError, match="cannot load the model"):
        wcfmt.pack(broken, tmp_path / "asked", calib="random")
    assert not (tmp_path / "asked").exists()


def test_random_calib_arguments_and_cli(tmp_path: Path, llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="calib_tokens does not apply to calib='random'"):
        wcfmt.pack(llama, tmp_path / "x", calib="random", calib_tokens=100)
    with pytest.raises(UsageError, match="calib_tokens needs calib"):
        wcfmt.pack(llama, tmp_path / "x", calib_tokens=100)  # not: the automatic random calibration's error
    assert main(["pack", str(llama), "-o", str(tmp_path / "cli-none"), "--calib", "none", "-q"]) == 0
    assert main(["pack", str(llama), "-o", str(tmp_path / "cli-random"), "--calib", "random", "-q"]) == 0
    assert "calib" not in _extra(tmp_path / "cli-none") and _extra(tmp_path / "cli-random")["calib"] == "diagonal+refit"
    assert main(["info", str(tmp_path / "cli-random")]) == 0
    assert "calibrated (diagonal+refit, random (8x64 tokens, seed 0))" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(list(wcfmt.load_state_dict(tmp_path / "cli-random").values())[0].float().numpy()).all()


def test_statistics_run_in_the_checkpoints_width(tmp_path: Path, llama: Path) -> None:
    from wcfmt.cluster.calibrate import _statistics_dtype

    assert _statistics_dtype(llama) == torch.bfloat16  # the fixture is a bf16 checkpoint
    for value, want in (("float16", torch.bfloat16), ("float32", torch.float32), (None, torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": value}))
        assert _statistics_dtype(tmp_path) == want
    (tmp_path / "config.json").write_text("{not json")
    assert _statistics_dtype(tmp_path) == torch.float32


def test_a_model_without_linear_projections_gets_no_weights(tmp_path: Path) -> None:
    """GPT-2's projections are Conv1D, not nn.Linear: nothing to weigh, and the header says so."""
    import transformers

    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(vocab_size=20, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # automatic: recorded, not warned
        wcfmt.pack(folder, tmp_path / "auto", bits=4.0)
    extra = _extra(tmp_path / "auto")
    assert extra["calib"] == "none" and extra["calib_skipped"] == "no clustered projection is an nn.Linear to weigh"
    with pytest.warns(UserWarning, match="no clustered projection is an nn.Linear"):  # asked for: warned
        wcfmt.pack(folder, tmp_path / "asked", bits=4.0, calib="random")


def test_a_calibration_asked_for_that_cannot_fit_is_refused_before_it_runs(
    tmp_path: Path, llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--calib FILE` keeps every projection's full in × in float64 statistics to the end, and
    `self` samples with the whole model: on a model too big for the memory available the pack is
    refused at once, with the estimate and the cheaper choice, instead of being killed later. The
    estimate is the one the automatic choice uses (`calibration_need`, from the headers)."""
    from wcfmt.cluster import layerwise as lw

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox " * 50)
    full = lw.calibration_need(llama, sequences=4, tokens=512, diagonal=False, run_itemsize=4)
    cheap = lw.calibration_need(llama, sequences=8, tokens=128)
    assert full.least > cheap.least  # full statistics and float32 weights cost more
    monkeypatch.setattr(calibrate_stage, "available_memory", lambda: (cheap.least + full.least) // 2)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"calib .*calib\.txt: calibrating .* needs about .* GiB of memory and "
                                         r".* GiB is available; --calib random \(per-column statistics\) needs about"):
        wcfmt.pack(llama, out, calib=str(text))
    assert not out.exists()
    with pytest.raises(UsageError, match="calib self: "):
        wcfmt.pack(llama, out, calib="self")
    opts = wcfmt.PackOptions(calib="random")
    assert calibrate_stage.choose(calibrate_stage.Source(llama), opts).what == "random"  # this one fits
    monkeypatch.setattr(calibrate_stage, "available_memory", lambda: cheap.least - 1)
    with pytest.raises(UsageError, match=r"calib random: .*; --calib none packs without$"):
        calibrate_stage.choose(calibrate_stage.Source(llama), opts)
    monkeypatch.setattr(calibrate_stage, "available_memory", lambda: full.whole_model)  # enough for all
    assert calibrate_stage.choose(calibrate_stage.Source(llama), wcfmt.PackOptions(calib=str(text))).what == text
    monkeypatch.setattr(calibrate_stage, "available_memory", lambda: None)  # not reported: nothing refused
    assert calibrate_stage.choose(calibrate_stage.Source(llama), wcfmt.PackOptions(calib="self")).what == "self"
