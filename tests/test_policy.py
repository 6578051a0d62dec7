"""Tests for `wcfmt.cluster.policy`: which tensors of real checkpoints are clustered.

The names are those of the Hugging Face checkpoints (safetensors keys) of each architecture.
"""

from __future__ import annotations

import pytest

from wcfmt import UsageError
from wcfmt.cluster import DEFAULT_CHUNK_ROWS, DEFAULT_K, ClusterPolicy

#: architecture -> (names the default policy clusters, names it keeps lossless)
ARCHITECTURES: dict[str, tuple[list[str], list[str]]] = {
    "llama": (
        [f"model.layers.7.self_attn.{p}_proj.weight" for p in "qkvo"]
        + [f"model.layers.7.mlp.{p}_proj.weight" for p in ("gate", "up", "down")],
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
         "model.layers.7.input_layernorm.weight", "model.layers.7.post_attention_layernorm.weight",
         "model.layers.7.self_attn.rotary_emb.inv_freq"],
    ),
    "mistral": (
        ["model.layers.31.self_attn.k_proj.weight", "model.layers.31.mlp.down_proj.weight"],
        ["model.embed_tokens.weight", "lm_head.weight", "model.layers.31.input_layernorm.weight"],
    ),
    "mixtral": (
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.block_sparse_moe.experts.5.w1.weight",
         "model.layers.0.block_sparse_moe.experts.5.w2.weight", "model.layers.0.block_sparse_moe.experts.5.w3.weight"],
        ["model.layers.0.block_sparse_moe.gate.weight"],  # the router
    ),
    "qwen2": (
        [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkvo"] + ["model.layers.3.mlp.up_proj.weight"],
        ["model.layers.3.self_attn.q_proj.bias", "model.layers.3.self_attn.k_proj.bias",
         "model.layers.3.self_attn.v_proj.bias", "model.embed_tokens.weight", "lm_head.weight"],
    ),
    "gemma": (
        ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight"],
        ["model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
         "model.embed_tokens.weight"],
    ),
    "phi-2": (
        ["model.layers.5.self_attn.q_proj.weight", "model.layers.5.self_attn.dense.weight",
         "model.layers.5.mlp.fc1.weight", "model.layers.5.mlp.fc2.weight"],
        ["model.layers.5.self_attn.dense.bias", "model.layers.5.mlp.fc1.bias", "model.final_layernorm.weight",
         "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"],
    ),
    "phi-3": (
        ["model.layers.5.self_attn.qkv_proj.weight", "model.layers.5.self_attn.o_proj.weight",
         "model.layers.5.mlp.gate_up_proj.weight", "model.layers.5.mlp.down_proj.weight"],
        ["model.layers.5.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"],
    ),
    "gpt2": (
        ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.11.mlp.c_fc.weight", "h.11.mlp.c_proj.weight",
         "transformer.h.3.attn.c_attn.weight"],
        ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.bias", "h.0.attn.bias",
         "ln_f.weight", "transformer.wte.weight"],
    ),
    "gpt-neox": (
        ["gpt_neox.layers.2.attention.query_key_value.weight", "gpt_neox.layers.2.attention.dense.weight",
         "gpt_neox.layers.2.mlp.dense_h_to_4h.weight", "gpt_neox.layers.2.mlp.dense_4h_to_h.weight"],
        ["gpt_neox.embed_in.weight", "embed_out.weight", "gpt_neox.layers.2.attention.query_key_value.bias",
         "gpt_neox.final_layer_norm.weight", "gpt_neox.layers.2.attention.rotary_emb.inv_freq"],
    ),
    "falcon": (
        ["transformer.h.0.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight",
         "transformer.h.0.mlp.dense_h_to_4h.weight", "transformer.h.0.mlp.dense_4h_to_h.weight"],
        ["transformer.word_embeddings.weight", "transformer.h.0.ln_attn.weight"],
    ),
    "bert": (
        [f"bert.encoder.layer.4.attention.self.{p}.weight" for p in ("query", "key", "value")]
        + ["bert.encoder.layer.4.attention.output.dense.weight", "bert.encoder.layer.4.intermediate.dense.weight",
           "bert.encoder.layer.4.output.dense.weight"],
        ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
         "bert.encoder.layer.4.attention.output.LayerNorm.weight", "bert.encoder.layer.4.output.dense.bias",
         "bert.pooler.dense.weight", "cls.predictions.transform.dense.weight"],
    ),
    "mpt": (
        ["transformer.blocks.1.attn.Wqkv.weight", "transformer.blocks.1.attn.out_proj.weight",
         "transformer.blocks.1.ffn.up_proj.weight", "transformer.blocks.1.ffn.down_proj.weight"],
        ["transformer.wte.weight", "transformer.blocks.1.norm_1.weight"],
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_policy_on_real_names(arch: str) -> None:
    clustered, lossless = ARCHITECTURES[arch]
    p = ClusterPolicy()
    for name in clustered:
        assert p.decide(name, (256, 128), "BF16") == (DEFAULT_K, DEFAULT_CHUNK_ROWS), name
    for name in lossless:
        assert p.decide(name, (256, 128), "BF16") is None, name


def test_defaults() -> None:
    assert DEFAULT_K == 64 and DEFAULT_CHUNK_ROWS is None  # one codebook per matrix: tools/RESULTS-smollm2.md
    p = ClusterPolicy()
    assert (p.k, p.chunk_rows) == (DEFAULT_K, DEFAULT_CHUNK_ROWS)


@pytest.mark.parametrize(
    "shape, dtype",
    [((4096,), "BF16"), ((), "F32"), ((64, 64), "I8"), ((64, 64), "F64"), ((64, 64), "F8_E4M3"), ((0, 64), "BF16")],
)
def test_only_float_tensors_of_two_dims_are_eligible(shape: tuple[int, ...], dtype: str) -> None:
    p = ClusterPolicy(include=[".*"])
    assert p.decide("model.layers.0.mlp.up_proj.weight", shape, dtype) is None


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_every_clusterable_dtype_and_more_dims(dtype: str) -> None:
    assert ClusterPolicy().decide("model.layers.0.mlp.up_proj.weight", (8, 4, 2), dtype) == (64, DEFAULT_CHUNK_ROWS)


def test_include_exclude_and_overrides() -> None:
    p = ClusterPolicy(
        k=32,
        chunk_rows=None,
        include=[r"^model\.embed_tokens\.weight$"],
        exclude=[r"\.layers\.0\.", r"embed"],
        k_overrides={r"down_proj": 128, r"mlp\.": 16},
    )
    assert p.decide("model.layers.0.self_attn.q_proj.weight", (8, 8), "F16") is None  # excluded
    assert p.decide("model.embed_tokens.weight", (8, 8), "F16") is None  # exclude wins over include
    assert p.decide("model.layers.1.self_attn.q_proj.weight", (8, 8), "F16") == (32, None)
    assert p.decide("model.layers.1.mlp.down_proj.weight", (8, 8), "F16") == (128, None)  # first match
    assert p.decide("model.layers.1.mlp.up_proj.weight", (8, 8), "F16") == (16, None)
    q = ClusterPolicy(include=[r"^lm_head\.weight$"])
    assert q.decide("lm_head.weight", (100, 8), "BF16") == (64, DEFAULT_CHUNK_ROWS)
    assert ClusterPolicy(k_overrides={"lm_head": 8}).decide("lm_head.weight", (100, 8), "BF16") is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(k=257), "k must be"),
        (dict(k=True), "k must be"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(include=["("]), "include: invalid regex"),
        (dict(exclude=["[a-"]), "exclude: invalid regex"),
        (dict(include="q_proj"), "list of regexes"),
        (dict(k_overrides={"(": 4}), "k_overrides: invalid regex"),
        (dict(k_overrides={"q_proj": 300}), r"k_overrides\['q_proj'\]"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ClusterPolicy(**kwargs)


def test_repr_names_the_settings() -> None:
    assert "k=16" in repr(ClusterPolicy(k=16)) and "chunk_rows=None" in repr(ClusterPolicy(chunk_rows=None))
