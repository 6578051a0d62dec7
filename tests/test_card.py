"""Model cards and the remote-code shim of packed folders (wcfmt/io/card.py), through `pack`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt.io.card import class_of

transformers = pytest.importorskip("transformers")
from huggingface_hub import ModelCard  # noqa: E402
from test_transformers_io import tiny_llama_folder  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("card")
    src = tiny_llama_folder(root / "src")
    (src / "README.md").write_text("---\nlicense: mit\ntags: [tiny]\n---\n\n# Tiny source\n\nSource words.\n")
    wcfmt.pack(src, root / "packed", k=16, base_model="org/tiny-base", quality_note="perplexity 1.02x of bf16",
               remote_code=True)  # fmt: skip
    return src, root / "packed"


def test_card_parses_and_names_the_base_model(packed: tuple[Path, Path]) -> None:
    src, out = packed
    card = ModelCard.load(out / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "org/tiny-base" and d["base_model_relation"] == "quantized"
    assert d["library_name"] == "wcfmt" and d["tags"][0] == "wclust" and "tiny" in d["tags"]
    assert d["license"] == "mit"  # carried from the source card
    assert "pip install wcfmt" in card.text and 'wcfmt.from_pretrained("packed")' in card.text
    assert "perplexity 1.02x of bf16" in card.text
    assert card.text.rstrip().endswith("Source words.")  # source text kept below ours
    # per-class rows from the headers: 2 layers of q_proj, K=16, clustered
    row = next(line for line in card.text.splitlines() if line.startswith("| `self_attn.q_proj.weight`"))
    assert row.split("|")[2:5] == [" clustered ", " 2 ", " 16 "]
    assert (src / "README.md").read_text().startswith("---\nlicense: mit")  # source untouched


def test_remote_code_loads_through_auto_class(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = packed
    folder = shutil.copytree(out, tmp_path / "rc")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ref = wcfmt.from_pretrained(folder)
    assert type(model) is transformers.LlamaForCausalLM
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_class_of() -> None:
    assert class_of("model.layers.0.mlp.up_proj.weight") == "mlp.up_proj.weight"
    assert class_of("lm_head.weight") == "lm_head.weight"


def test_transforms_say_so_in_the_copied_card(packed: tuple[Path, Path], tmp_path: Path) -> None:
    from wcfmt.io.card import EDITS_HEADING, note_edit

    _, out = packed
    before = (out / "README.md").read_text()
    wcfmt.transforms.transform(out, tmp_path / "t1", "affine", a=2.0, tensors=r"q_proj")
    wcfmt.transforms.transform(tmp_path / "t1", tmp_path / "t2", "permute", seed=3)
    text = (tmp_path / "t2" / "README.md").read_text()
    card = ModelCard(text)  # still a valid card, front matter untouched
    assert card.data.to_dict()["library_name"] == "wcfmt"
    assert text.count(EDITS_HEADING) == 1
    ours, original = text.split("## Original model card")
    lines = [line for line in ours.split(EDITS_HEADING)[1].splitlines() if line.startswith("- ")]
    assert len(lines) == 2 and "affine" in lines[0] and "2 tensor(s)" in lines[0] and "permute seed=3" in lines[1]
    assert original.rstrip().endswith("Source words.")  # the source's text stays last
    assert (out / "README.md").read_text() == before  # the source folder is only read
    # a README that is not a wcfmt card is left as it is
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("# my notes\n")
    assert note_edit(plain, ["x"]) is False and (plain / "README.md").read_text() == "# my notes\n"


# -- every figure of the card's tables, hand-worked (mutation audit 0.2: CA1-CA4) -------------------
def _row(name: str, codec: str, shape: tuple[int, ...], packed: int, k: tuple[int, int] | None, sqnr: float | None) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(name=name, codec=codec, shape=shape, packed_bytes=packed, k_min=k[0] if k else None,
                           k_max=k[1] if k else None, quality={"sqnr_db": sqnr} if sqnr is not None else None)


def test_class_table_figures_by_hand() -> None:
    """Two q_proj matrices (K 16 and 40, SQNR 20 and 26 dB, 300 + 500 bytes over 2 × 32×20
    weights), one lossless norm and an alias: bits/weight = 800·8/1280 = 5.0, K 16–40, SQNR the
    mean 23.0; the norm 64 bytes over 16 weights = 32.0 bits; the alias is not a row."""
    from types import SimpleNamespace

    from wcfmt.io.card import class_table

    info = SimpleNamespace(rows=[
        _row("model.layers.0.self_attn.q_proj.weight", "clustered", (32, 20), 300, (16, 16), 20.0),
        _row("model.layers.1.self_attn.q_proj.weight", "clustered", (32, 20), 500, (40, 40), 26.0),
        _row("model.layers.0.input_layernorm.weight", "lossless", (16,), 64, None, None),
        _row("lm_head.weight", "alias", (32, 20), 0, None, None),
    ])
    q, norm = class_table(info)
    assert q == {"class": "self_attn.q_proj.weight", "codec": "clustered", "tensors": 2, "weights": 1280, "bytes": 800,
                 "k_min": 16, "k_max": 40, "bits_per_weight": 5.0, "sqnr_db": 23.0}
    assert norm["class"] == "input_layernorm.weight" and norm["bits_per_weight"] == 32.0
    assert norm["sqnr_db"] is None and norm["k_min"] is None


def test_settings_rows_name_every_setting() -> None:
    """The card's settings table: method, bits, k, chunk_rows, include, exclude, level in that
    order (lists as JSON), then the extra settings sorted by name; unset ones left out."""
    from types import SimpleNamespace

    from wcfmt.io.card import _settings_rows

    settings = {"method": "ecsq", "bits": 4.5, "k": None, "chunk_rows": 256, "include": ["a.*"], "level": 3,
                "extra": {"calib": "random", "bits_embed": "6.0"}}
    info = SimpleNamespace(files=[{"settings": None}, {"settings": settings}])
    assert _settings_rows(info) == [("method", "ecsq"), ("bits", "4.5"), ("chunk_rows", "256"), ("include", '["a.*"]'),
                                    ("level", "3"), ("bits_embed", "6.0"), ("calib", "random")]
