"""pack(calib="self"): calibration on text the model samples itself (wcfmt/cluster/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt.errors import UsageError
from wcfmt.reader import WclustReader

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import write_tiny_llama

    folder = write_tiny_llama(tmp_path_factory.mktemp("self-calib"), hidden=32, intermediate=64, dtype=torch.bfloat16)
    cfg = folder / "tokenizer_config.json"
    c = json.loads(cfg.read_text())
    c["eos_token"] = "[UNK]"  # something to start sampling from (the tiny tokenizer has no BOS)
    cfg.write_text(json.dumps(c))
    return folder


def test_sample_text_is_deterministic_and_leaves_torch_rng_alone(llama: Path) -> None:
    from wcfmt.cluster.calibrate import sample_text

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_text(llama, sequences=2, tokens=12)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    assert a == sample_text(llama, sequences=2, tokens=12) and a != sample_text(llama, sequences=2, tokens=12, seed=1)
    assert len(a.split("\n\n")) == 2 and len(a.split()) >= 12


def test_pack_calib_self_is_calibration_on_the_sampled_text(tmp_path: Path, llama: Path) -> None:
    from wcfmt.cluster.calibrate import sample_text

    wcfmt.pack(llama, tmp_path / "self", bits=4.0, embeddings=False, calib="self", calib_tokens=256)
    # the same through an ordinary text file holding what the model samples
    text = tmp_path / "sampled.txt"
    text.write_text(sample_text(llama), encoding="utf-8")
    wcfmt.pack(llama, tmp_path / "file", bits=4.0, embeddings=False, calib=text, calib_tokens=256)
    wcfmt.pack(llama, tmp_path / "plain", bits=4.0, embeddings=False)
    a, b, c = (next((tmp_path / d).glob("*.wclust")) for d in ("self", "file", "plain"))
    with WclustReader(a) as ra, WclustReader(b) as rb:
        assert ra.header.settings.extra["calib_text"].startswith("self (8x560 sampled tokens")
        ta = {n: ra.decode_chunk(n, 0).tobytes() for n in ra.header.tensors if "proj" in n}
        tb = {n: rb.decode_chunk(n, 0).tobytes() for n in rb.header.tensors if "proj" in n}
    assert ta == tb  # same labels and tables as calibrating on the sampled file
    assert wcfmt.load_state_dict(tmp_path / "self").keys() == wcfmt.load_state_dict(tmp_path / "plain").keys()
    assert a.read_bytes() != c.read_bytes()


def test_calib_self_errors(tmp_path: Path, llama: Path) -> None:
    with pytest.raises(UsageError, match=r"calib self: no such text file"):
        wcfmt.pack(llama, tmp_path / "o", bits=4.0, calib=Path("self"))  # a Path is always a file
    st = tmp_path / "one.safetensors"
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 8)}, str(st))
    with pytest.raises(UsageError, match="Hugging Face model folder"):
        wcfmt.pack(st, tmp_path / "o.wclust", bits=4.0, calib="self")
    assert not (tmp_path / "o.wclust").exists()


def test_calibrated_packs_note_low_weight_sqnr_instead_of_warning(tmp_path: Path, llama: Path) -> None:
    import warnings

    from wcfmt.inspect import DegenerateQualityWarning, format_table, info

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be that is the question the king is dead long live the queen " * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateQualityWarning)  # a calibrated pack must not warn
        rep = wcfmt.pack(llama, tmp_path / "cal", bits=2.0, embeddings=False, calib=text, calib_tokens=64)
    assert rep.degenerate  # still reported, just not as a broken model
    table = format_table(info(tmp_path / "cal"))
    assert "note: " in table and "calibrated tensor(s) with weight SQNR below" in table and "\n! " not in table
    with pytest.warns(DegenerateQualityWarning):  # the same bits without calibration: a warning
        plain = wcfmt.pack(llama, tmp_path / "plain", bits=2.0, embeddings=False, calib="none")
    assert plain.degenerate and "likely broken" in format_table(info(tmp_path / "plain"))
