"""`wcfmt.from_pretrained` (wcfmt/io/transformers_io.py): packed folder -> transformers model.

The reference is transformers' own loader on the unpacked folder (`wcfmt unpack` writes plain
safetensors; `AutoModel*.from_pretrained` reads them by its own code path): outputs must be equal
bit for bit, since both hold the same decoded weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt import FormatError, UsageError

transformers = pytest.importorskip("transformers")


def _heavy(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def tiny_llama_folder(folder: Path, *, tied: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    _heavy(model)
    model.save_pretrained(folder)
    return folder


def tiny_sentence_bert_folder(folder: Path) -> Path:
    """A BERT encoder laid out as sentence-transformers lays it out (modules.json, 1_Pooling/)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(cfg)
    _heavy(model)
    model.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                  "pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(packed folder, unpacked folder) of a tiny tied Llama."""
    root = tmp_path_factory.mktemp("llama")
    src = tiny_llama_folder(root / "src")
    wcfmt.pack(src, root / "packed", k=16)
    wcfmt.unpack(root / "packed", root / "unpacked")
    return root / "packed", root / "unpacked"


def test_causal_lm_matches_transformers_on_the_unpacked_folder(llama: tuple[Path, Path]) -> None:
    packed, unpacked = llama
    model = wcfmt.from_pretrained(packed)
    ref = transformers.AutoModelForCausalLM.from_pretrained(unpacked)
    assert type(model) is transformers.LlamaForCausalLM
    assert not model.training
    assert model.dtype == torch.bfloat16 == ref.dtype
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, one tensor
    assert all(b.device.type == "cpu" for b in model.buffers())  # rotary inv_freq computed, not meta
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    a = model.generate(ids, max_new_tokens=12, do_sample=False)
    b = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


def test_the_model_owns_the_decoded_tensors(llama: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import wcfmt.io.folder as folder_mod

    seen: dict[str, int] = {}
    real = folder_mod.load_state_dict

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        sd = real(*a, **kw)
        seen.update({n: t.data_ptr() for n, t in sd.items()})
        return sd

    monkeypatch.setattr(folder_mod, "load_state_dict", spy)
    model = wcfmt.from_pretrained(llama[0])
    params = {n: t.data_ptr() for n, t in model.state_dict().items()}
    assert seen and all(params[n] == p for n, p in seen.items())  # assigned, never copied


def test_dtype_and_device(llama: tuple[Path, Path]) -> None:
    packed, unpacked = llama
    model = wcfmt.from_pretrained(packed, dtype="float32", device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(unpacked, dtype=torch.float32)
    assert model.dtype == torch.float32
    for (n, p), (n2, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n


def test_config_without_architectures_uses_the_causal_lm_mapping(llama: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    packed = shutil.copytree(llama[0], tmp_path / "p")
    cfg = json.loads((packed / "config.json").read_text())
    del cfg["architectures"]
    (packed / "config.json").write_text(json.dumps(cfg))
    assert type(wcfmt.from_pretrained(packed)) is transformers.LlamaForCausalLM
    # model_class wins, and config kwargs reach the config
    m = wcfmt.from_pretrained(packed, model_class=transformers.LlamaForCausalLM, use_cache=False)
    assert m.config.use_cache is False


def test_sentence_transformers_folder(tmp_path: Path) -> None:
    src = tiny_sentence_bert_folder(tmp_path / "src")
    wcfmt.pack(src, tmp_path / "packed", k=16)
    wcfmt.unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert json.loads((tmp_path / "packed" / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    model = wcfmt.from_pretrained(tmp_path / "packed")
    ref = transformers.AutoModel.from_pretrained(tmp_path / "unpacked")
    assert type(model) is transformers.BertModel and not model.training
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_missing_weights_are_an_error(tmp_path: Path) -> None:
    import safetensors.torch

    src = tiny_llama_folder(tmp_path / "src")
    sd = safetensors.torch.load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    wcfmt.pack(src, tmp_path / "packed", k=16)
    with pytest.raises(FormatError, match=r"expects 1 weight.*layers\.1\.mlp\.up_proj"):
        wcfmt.from_pretrained(tmp_path / "packed")


def test_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        wcfmt.from_pretrained(tmp_path / "noconfig")
    wcfmt.save_file({"w": torch.ones(2)}, tmp_path / "m.wclust")
    with pytest.raises(UsageError, match="needs a packed model folder"):
        wcfmt.from_pretrained(tmp_path / "m.wclust")
    with pytest.raises(FileNotFoundError):
        wcfmt.from_pretrained(tmp_path / "absent")


def test_unknown_architecture() -> None:
    from wcfmt.io.transformers_io import model_class_for

    class Config:  # a config type no mapping knows, naming a class transformers does not export
        architectures = ["NoSuchModelForCausalLM"]
        model_type = "nosuch"

    with pytest.raises(UsageError, match=r"'nosuch'.*NoSuchModelForCausalLM.*model_class="):
        model_class_for(Config())
    assert model_class_for(transformers.BertConfig(architectures=["BertForMaskedLM"])) is transformers.BertForMaskedLM


# -- the device path (wcfmt.io.transformers_io._decoded_on_device), run here on the CPU ---------------
def _same_model(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert all(not t.is_meta for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.float32])
@pytest.mark.parametrize("backend", ["numpy", "torch"])  # "torch": the staging pipeline a GPU runs
def test_device_path_equals_the_cpu_path(
    llama: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
    tied: bool, dtype: torch.dtype | None, backend: str,
) -> None:
    from wcfmt.io.transformers_io import _decoded_on_device

    if tied:
        packed = llama[0]
    else:
        root = tmp_path_factory.mktemp("untied")
        wcfmt.pack(tiny_llama_folder(root / "src", tied=False), root / "packed", k=16)
        packed = root / "packed"
    monkeypatch.setenv("WCFMT_BACKEND", backend)
    config = transformers.AutoConfig.from_pretrained(packed)
    model = _decoded_on_device(transformers.LlamaForCausalLM, config, packed, torch.device("cpu"), dtype, {}).eval()
    ref = wcfmt.from_pretrained(packed, dtype=dtype)
    _same_model(model, ref)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_device_path_bert_buffers(tmp_path: Path) -> None:
    from wcfmt.io.transformers_io import _decoded_on_device

    wcfmt.pack(tiny_sentence_bert_folder(tmp_path / "src"), tmp_path / "packed", k=16)
    ref = wcfmt.from_pretrained(tmp_path / "packed")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "packed")
    model = _decoded_on_device(transformers.BertModel, config, tmp_path / "packed", torch.device("cpu"), None, {})
    _same_model(model.eval(), ref)
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_device_path_leaves_fused_weights_to_the_cpu_path(tmp_path: Path) -> None:
    # transformers 5 fuses Mixtral's per-expert matrices on load: the model's keys are not the file's
    from wcfmt.io.transformers_io import _decoded_on_device

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=32,
    )  # fmt: skip
    transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    wcfmt.pack(tmp_path / "src", tmp_path / "packed", k=16)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "packed")
    cls = transformers.MixtralForCausalLM
    assert _decoded_on_device(cls, config, tmp_path / "packed", torch.device("cpu"), None, {}) is None
    wcfmt.unpack(tmp_path / "packed", tmp_path / "unpacked")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked")
    _same_model(wcfmt.from_pretrained(tmp_path / "packed"), ref)


def test_device_path_missing_weights_are_an_error(tmp_path: Path) -> None:
    import safetensors.torch

    from wcfmt.io.transformers_io import _decoded_on_device

    src = tiny_llama_folder(tmp_path / "src")
    sd = safetensors.torch.load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    wcfmt.pack(src, tmp_path / "packed", k=16)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "packed")
    with pytest.raises(FormatError, match=r"expects 1 weight.*layers\.1\.mlp\.up_proj"):
        _decoded_on_device(transformers.LlamaForCausalLM, config, tmp_path / "packed", torch.device("cpu"), None, {})


def test_device_map_names_one_device(llama: tuple[Path, Path]) -> None:
    from wcfmt.io.transformers_io import _one_device

    cuda0 = torch.device("cuda", 0)
    assert _one_device(None, None) is None
    assert _one_device("cpu", None) == torch.device("cpu")
    assert _one_device(None, "cuda:0") == _one_device(None, 0) == _one_device(None, {"": "cuda:0"}) == cuda0
    assert _one_device(None, {"": cuda0}) == _one_device("cuda:0", "cuda:0") == cuda0
    assert _one_device(None, "auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("balanced", {"model": "cpu", "lm_head": "cuda:0"}, "nowhere", -1):
        with pytest.raises(UsageError, match="one device"):
            _one_device(None, bad)
    with pytest.raises(UsageError, match="disagree"):
        _one_device("cpu", "cuda:0")
    model = wcfmt.from_pretrained(llama[0], device_map="cpu")
    assert model.device == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_equals_the_cpu_model(llama: tuple[Path, Path]) -> None:
    model = wcfmt.from_pretrained(llama[0], device="cuda")
    ref = wcfmt.from_pretrained(llama[0])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].cpu(), b[name]), name
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    out = model.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 14)


def test_device_path_gives_way_when_set_up_writes_a_weight(
    llama: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # an expanded placeholder refuses in-place writes; the caller then takes the CPU path
    from wcfmt.io import transformers_io

    def writes(cls, config, state, want, model_kwargs):  # type: ignore[no-untyped-def]
        next(iter(state.values())).add_(1)
        raise AssertionError("unreachable: the write above raises")

    monkeypatch.setattr(transformers_io, "_build", writes)
    config = transformers.AutoConfig.from_pretrained(llama[0])
    cls = transformers.LlamaForCausalLM
    assert transformers_io._decoded_on_device(cls, config, llama[0], torch.device("cpu"), None, {}) is None
