"""Calibration statistics one decoder block at a time (wcfmt/cluster/layerwise.py): the same
statistics as the whole model's pass, on several architectures; memory of a block, not of the
model; the fallback; the memory estimate from the headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import transformers

from wcfmt.cluster import layerwise as lw
from wcfmt.cluster.calibrate import (
    collect_hessians,
    collect_random_statistics,
    random_windows,
)
from wcfmt.errors import UsageError

_SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _config(arch: str) -> Any:
    if arch == "llama-tied":
        return transformers.LlamaConfig(**_SMALL, tie_word_embeddings=True)
    if arch == "mistral":  # a sliding window shorter than the rows
        return transformers.MistralConfig(**_SMALL, sliding_window=8)
    if arch == "qwen2":  # biases on q/k/v
        return transformers.Qwen2Config(**_SMALL)
    if arch == "gemma2":  # embeddings scaled in the model's forward, per-layer masks (sliding / global)
        return transformers.Gemma2Config(**_SMALL, head_dim=8, sliding_window=8)
    if arch == "phi3":  # fused qkv and gate_up projections
        return transformers.Phi3Config(**_SMALL, pad_token_id=0)
    if arch == "gpt2":  # Conv1D projections: only the head is an nn.Linear
        return transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)
    raise AssertionError(arch)


def _save(folder: Path, config: Any, dtype: torch.dtype = torch.bfloat16) -> Path:
    cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = cls.from_config(config).to(dtype)
    config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    return folder


def _assert_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for k in b:
        scale = float(np.abs(b[k]).max()) or 1.0
        assert float(np.abs(a[k] - b[k]).max()) <= rtol * scale, k


@pytest.mark.parametrize("arch", ["llama-tied", "mistral", "qwen2", "gemma2", "phi3", "gpt2"])
def test_layerwise_statistics_equal_whole_model(tmp_path: Path, arch: str) -> None:
    folder = _save(tmp_path, _config(arch))
    windows = random_windows(transformers.AutoConfig.from_pretrained(folder), 6, 24)
    cases = [(True, torch.bfloat16, lambda n: "lm_head" not in n),  # calib random: no head
             (False, torch.float32, lambda n: True)]  # H of every layer, the LM head's too
    for diagonal, dtype, keep in cases:
        a = lw.second_moments(folder, windows, keep, batch=4, diagonal=diagonal, dtype=dtype)
        b = lw.second_moments(folder, windows, keep, batch=4, diagonal=diagonal, dtype=dtype, path=lw.WHOLE_MODEL)
        assert (a.path, a.fallback, b.path) == (lw.LAYERWISE, "", lw.WHOLE_MODEL)
        assert a.windows == b.windows == (6, 24)
        # the same operations on the same inputs: equal bit for bit on this CPU (measured), and
        # within float rounding anywhere
        _assert_equal(a.moments, b.moments, rtol=1e-6)
        if arch != "gpt2":
            assert len(a.moments) >= 7 * 3 - (arch == "phi3") * 9
        assert a.peak_parameter_bytes < b.peak_parameter_bytes


def test_text_hessians_layerwise_equal_whole_model(tmp_path: Path) -> None:
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path, hidden=32, intermediate=64)
    text = " ".join(["the king is dead long live the queen", "to be or not to be that is the question"] * 20)
    a = collect_hessians(folder, text, 96, window=16, batch=2)
    b = collect_hessians(folder, text, 96, window=16, batch=2, path=lw.WHOLE_MODEL)
    _assert_equal(a, b, rtol=1e-6)
    assert next(iter(a.values())).shape == (32, 32)


def test_random_statistics_record_the_path(tmp_path: Path) -> None:
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path, hidden=32, intermediate=64, dtype=torch.bfloat16)
    s = collect_random_statistics(folder, names=lambda n: "mlp" in n)
    assert s.path == lw.LAYERWISE and s.windows == (8, 64)  # rows cut to the model's 64 positions
    assert sorted(s.moments) == sorted(f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down"))
    with pytest.raises(UsageError, match="path must be"):
        collect_random_statistics(folder, path="sideways")


def test_fallback_to_the_whole_model(tmp_path: Path) -> None:
    """A checkpoint whose names are not the model's own (GPT-2's old names, no ``transformer.``
    prefix: transformers maps them on load) runs the whole model, and says why."""
    import safetensors.torch

    config = _config("gpt2")
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    sd = {k[len("transformer."):]: v.contiguous() for k, v in model.state_dict().items() if k.startswith("transformer.")}
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    windows = random_windows(config, 2, 8)
    s = lw.second_moments(tmp_path, windows, lambda n: True, batch=2, diagonal=True, dtype=torch.float32)
    assert s.path == lw.WHOLE_MODEL and "not found under their names" in s.fallback
    assert sorted(s.moments) == ["lm_head.weight"]
    with pytest.raises(UsageError, match="block by block"):
        lw.second_moments(tmp_path, windows, lambda n: True, batch=2, diagonal=True, dtype=torch.float32,
                          path=lw.LAYERWISE)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    import safetensors.torch
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path, hidden=32, intermediate=64)
    sd = safetensors.torch.load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(63, 32)
    safetensors.torch.save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="do not fit"):
        collect_random_statistics(folder)


def _deep_llama(folder: Path, layers: int = 12) -> Path:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return _save(folder, config)


def test_memory_is_one_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At no moment does the pass hold more parameters than one block plus everything outside
    the stack: counted by hooks of the test's own on every block, over the whole model."""
    folder = _deep_llama(tmp_path)
    whole = sum(p.numel() * 2 for p in transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).parameters())
    block = whole // 14  # a block is ~1/12 of this model; the embedding and head are small
    limit = 2 * block  # far below the whole model's bytes: loading it whole breaks the limit
    seen: list[int] = []
    build = lw._skeleton

    def counted(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)

        def count(*_: Any) -> None:
            seen.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"))

        for m in model.model.layers:
            m.register_forward_pre_hook(count)
        return model

    monkeypatch.setattr(lw, "_skeleton", counted)
    s = collect_random_statistics(folder)
    assert s.path == lw.LAYERWISE and len(seen) == 12
    assert 0 < max(seen) <= limit < whole
    assert s.peak_parameter_bytes == max(seen)
    need = lw.calibration_need(folder, sequences=8, tokens=64)
    assert need.layerwise is not None and need.layerwise < need.whole_model


_RSS = textwrap.dedent(
    """
    import sys, torch, transformers
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from wcfmt.cluster.calibrate import collect_random_statistics

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS")):
                yield int(line.split()[1]) * 1024

    collect_random_statistics(sys.argv[3], path=sys.argv[2])  # imports, first-call costs: not counted
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from here
    before = max(hwm())
    s = collect_random_statistics(sys.argv[1], path=sys.argv[2])
    print(max(hwm()) - before, s.path)
    """
)


def test_peak_rss_of_a_model_that_would_not_fit(tmp_path: Path) -> None:
    """A 340 MB model: the whole-model pass grows the process's peak RSS by more than the model;
    the layer-wise pass stays under half of it (one block is 34 MB, and bf16 matmuls on this CPU
    convert weights to float32 as they run). Both first run a tiny model
    of the same architecture, so that imports and first-call costs are not counted."""
    from common import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny", hidden=32, intermediate=64, dtype=torch.bfloat16)
    tmp_path = tmp_path / "big"
    tmp_path.mkdir()
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    sd = {n: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) for n, p in skeleton.state_dict().items()}
    for n in sd:
        if n.endswith("norm.weight"):
            sd[n] = torch.ones_like(sd[n])
    model_bytes = sum(t.numel() * 2 for t in sd.values())
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    del sd
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grown = {}
    for path in (lw.LAYERWISE, lw.WHOLE_MODEL):
        out = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path), path, str(tiny)], capture_output=True, text=True,
                             env=env, check=True)
        grown[path] = int(out.stdout.split()[0])
    limit = model_bytes // 2
    assert grown[lw.WHOLE_MODEL] > model_bytes > limit, grown
    assert grown[lw.LAYERWISE] < limit, grown


def test_calibration_need_from_headers(tmp_path: Path) -> None:
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path, hidden=32, intermediate=64, dtype=torch.bfloat16)
    need = lw.calibration_need(folder, sequences=8, tokens=64)
    # by hand: the model in bf16, a block of 2·32² + 2·16·32 (attention: 2 heads, 1 KV head of
    # 16) + 3·32·64 (MLP) + 2·32 (norms)
    sd_bytes = (folder / "model.safetensors").stat().st_size
    block = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32)
    assert need.whole_model - need.layerwise == block  # two blocks in the model
    assert need.whole_model > sd_bytes - 4096  # the weights (less the header) and more
    full = lw.calibration_need(folder, sequences=8, tokens=64, diagonal=False)
    # H in float64 instead of its diagonal: six projections read 32 inputs, one 64, in 2 layers
    assert full.whole_model - need.whole_model == 8 * 2 * (6 * 32 * 32 + 64 * 64 - (6 * 32 + 64))
    # no stack in the names: only the whole model's need
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "num_hidden_layers": 5}))
    assert lw.calibration_need(folder, sequences=8, tokens=64).layerwise is None


@pytest.mark.real_model
def test_smollm2_layerwise_equals_whole_model() -> None:
    """SmolLM2-135M (bf16 folder: tools/convert_gguf.py): calib random's diagonals equal."""
    folder = Path(os.environ.get("WCFMT_SMOLLM2_BF16", "/work/scratch/smollm2-bf16"))
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder}: no SmolLM2 bf16 folder (python tools/convert_gguf.py -o DIR; WCFMT_SMOLLM2_BF16=DIR)")
    keep = lambda n: "embed" not in n and "lm_head" not in n
    a = collect_random_statistics(folder, names=keep)
    b = collect_random_statistics(folder, names=keep, path=lw.WHOLE_MODEL)
    assert (a.path, b.path, len(a.moments)) == (lw.LAYERWISE, lw.WHOLE_MODEL, 30 * 7)
    _assert_equal(a.moments, b.moments, rtol=1e-6)


def test_pack_calibrates_when_only_a_block_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic ``calib random`` is chosen when one block fits half the memory available
    though the whole model does not; the header says which path ran; where the model cannot run
    block by block then, it is skipped (and says why) rather than loaded whole."""
    import wcfmt
    from wcfmt.packing import calibrate as stage
    from wcfmt.reader import WclustReader

    folder = _deep_llama(tmp_path / "src", layers=6)
    need = lw.calibration_need(folder, sequences=8, tokens=128)
    assert need.layerwise is not None and need.layerwise < need.whole_model
    monkeypatch.setattr(stage, "available_memory", lambda: need.layerwise + need.whole_model)  # half: between

    def extra(out: Path) -> dict[str, str]:
        with WclustReader(next(out.glob("*.wclust"))) as r:
            assert r.header.settings is not None
            return dict(r.header.settings.extra)

    wcfmt.pack(folder, tmp_path / "a")
    got = extra(tmp_path / "a")
    assert (got["calib"], got["calib_path"], "calib_skipped" in got) == ("diagonal+refit", lw.LAYERWISE, False)

    def unsupported(model: Any) -> Any:
        raise lw.LayerwiseUnsupported("no stack here")

    monkeypatch.setattr(lw, "_find_stack", unsupported)
    with pytest.warns(UserWarning, match="block by block: no stack here"):
        wcfmt.pack(folder, tmp_path / "b")
    got = extra(tmp_path / "b")
    assert got["calib"] == "none" and "block by block: no stack here" in got["calib_skipped"]
    monkeypatch.setattr(stage, "available_memory", lambda: 4 * need.whole_model)  # the whole model fits
    wcfmt.pack(folder, tmp_path / "c")
    assert extra(tmp_path / "c")["calib_path"] == lw.WHOLE_MODEL


def test_after_block_feeds_the_changed_block_on(tmp_path: Path) -> None:
    """GPTQ's sequential variant: ``after_block`` sees each block's own statistics, complete, in
    order; what it does to a block's weights changes what the next blocks read, not that block's
    statistics."""
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path, hidden=32, intermediate=64)
    windows = random_windows(transformers.AutoConfig.from_pretrained(folder), 4, 16)
    seen: list[tuple[int, list[str]]] = []

    def zero_mlp(i: int, block: torch.nn.Module, moments: dict[str, np.ndarray]) -> None:
        seen.append((i, sorted(moments)))
        block.mlp.down_proj.weight.data.zero_()  # the block adds nothing through its MLP

    keep = lambda n: "lm_head" not in n
    plain = lw.second_moments(folder, windows, keep, batch=2, diagonal=True, dtype=torch.float32)
    changed = lw.second_moments(folder, windows, keep, batch=2, diagonal=True, dtype=torch.float32,
                                after_block=zero_mlp)
    assert [i for i, _ in seen] == [0, 1]
    assert all(len(names) == 7 and all(n.startswith(f"model.layers.{i}.") for n in names) for i, names in seen)
    for name in plain.moments:
        same = np.array_equal(plain.moments[name], changed.moments[name])
        assert same == name.startswith("model.layers.0."), name  # block 1 reads block 0's changed output
