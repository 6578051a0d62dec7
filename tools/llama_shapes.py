"""Names and shapes of a Llama-architecture checkpoint, for the tools that write synthetic ones
(`bench_pack.py`, `bench_load_peak.py`, `bench_scale.py`): one list, so that the benchmarks'
models differ only in their sizes."""

from __future__ import annotations


def llama_shapes(layers: int, *, hidden: int, inter: int, kv: int, vocab: int, tied: bool = False,
                 norms_first: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` in checkpoint order: the embedding, each layer's projections and norms
    (``norms_first``: each norm before the projections it feeds, as transformers saves Llama),
    the final norm and, unless ``tied``, the LM head."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        attn = [(p + f"self_attn.{n}_proj.weight", s)
                for n, s in (("q", (hidden, hidden)), ("k", (kv, hidden)), ("v", (kv, hidden)), ("o", (hidden, hidden)))]
        mlp = [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
               (p + "mlp.down_proj.weight", (hidden, inter))]
        norm_in, norm_post = (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))
        out += [norm_in, *attn, norm_post, *mlp] if norms_first else [*attn, *mlp, norm_in, norm_post]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out
