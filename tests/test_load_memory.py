"""Peak memory of loading a packed model (issue 18, item 3): one copy of the weights.

`wcfmt.load_state_dict` and `wcfmt.from_pretrained` (wcfmt/io/folder.py, wcfmt/io/transformers_io.py)
load a synthetic Llama-shaped packed folder of 291 MB of dense bf16 (tied) in a fresh subprocess. After
its imports (torch, transformers, wcfmt, the model's class) the child resets the kernel's
high-water mark of its RSS (``/proc/self/clear_refs``), loads, and reports the ``VmHWM`` growth.
The limit is 1.15x the dense bytes plus 32 MiB: a second copy of the weights (2x), a stored-dtype
copy under a ``dtype=`` cast (1.5x), transformers' random initial weights (2x) or the packed
file's pages mapped on top of the weights (1.38x here: labels are 6 bits) all exceed it.
Values are checked against the mapped loader (`wcfmt.load_file`) bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import assert_bit_equal

import wcfmt

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, KV, VOCAB, LAYERS = 1024, 2816, 256, 32000, 10
LIMIT_RATIO, LIMIT_EXTRA = 1.15, 32 << 20

CHILD = r"""
import json, sys
kind, path, dtype, device = sys.argv[1:5]
import torch, transformers, wcfmt
transformers.LlamaForCausalLM  # the modeling code's import is a constant, not the load's

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

want = None if dtype == "stored" else dtype
if device != "cpu":  # the device's context, kernels and pinned-memory cache are made by a first load
    torch.empty(1, device=device)
    if kind == "load_state_dict":
        wcfmt.load_state_dict(path, device=device, threads=2)
    else:
        with torch.no_grad():  # and the first forward's libraries (cuBLAS)
            wcfmt.from_pretrained(path, device=device, threads=2)(torch.tensor([[1, 2, 3]], device=device))
    torch.cuda.synchronize()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
if kind == "load_state_dict":
    tensors = list(wcfmt.load_state_dict(path, dtype=want, device=device, threads=2).values())
else:
    model = wcfmt.from_pretrained(path, dtype=want, device=device, threads=2)
    tensors = list(model.state_dict().values())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]], device=device)).logits.float()).all()
seen = {(t.data_ptr(), tuple(t.shape)): t.numel() * t.element_size() for t in tensors}
print(json.dumps({"growth": status("VmHWM") - base, "dense": sum(seen.values()),
                  "devices": sorted({t.device.type for t in tensors})}))
"""


def llama_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (KV, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTER)), (p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,))]  # fmt: skip
    return shapes + [("model.norm.weight", (HIDDEN,))]


#: bf16 bytes of the model (tied: the embedding once): 291,022,848
DENSE = 2 * sum(math.prod(shape) for _, shape in llama_shapes())


def llama_folder(folder: Path) -> Path:
    """A tied Llama of random 6-bit labels (one fp16 table per matrix) and bf16 norms, written with
    `wcfmt.save_file` (seconds, where packing would take a minute) and a config.json."""
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes()
    table = torch.linspace(-0.08, 0.08, 64, dtype=torch.float32).half()
    tensors: dict[str, object] = {}
    for name, shape in shapes:
        if len(shape) == 1:
            tensors[name] = (1 + 0.1 * torch.randn(shape, generator=g)).bfloat16()
        else:
            labels = torch.randint(0, 64, shape, generator=g, dtype=torch.uint8)
            n_chunks = -(-shape[0] // 256)
            tensors[name] = wcfmt.ClusteredTensor(labels=labels, centroids=[table] * n_chunks, chunk_rows=256,
                                                  dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    wcfmt.save_file(tensors, folder / "model.wclust")  # type: ignore[arg-type]
    cfg = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=16,
        num_key_value_heads=KV // 64, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )  # fmt: skip
    cfg.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("load_memory") / "llama")


def peak(kind: str, path: Path, dtype: str = "stored", device: str = "cpu") -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs to reset the RSS high-water mark (Linux only)")
    env = dict(os.environ, PYTHONPATH=str(Path(wcfmt.__file__).parent.parent))
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), dtype, device],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("kind", "dtype", "dense"), [
    ("load_state_dict", "stored", DENSE),
    ("from_pretrained", "stored", DENSE),
    ("from_pretrained", "float32", 2 * DENSE),
])  # fmt: skip
def test_peak_is_one_copy_of_the_weights(packed: Path, kind: str, dtype: str, dense: int) -> None:
    got = peak(kind, packed, dtype)
    assert got["dense"] == dense  # tied: the embedding once
    assert got["growth"] <= LIMIT_RATIO * dense + LIMIT_EXTRA, (
        f"{kind} dtype={dtype}: peak RSS grew {got['growth'] / dense:.3f}x the dense bytes "
        f"({got['growth'] / 1e6:.0f} MB for {dense / 1e6:.0f} MB)"
    )
    if dtype == "stored":  # the file's pages, mapped on top of the weights, would exceed the limit
        assert (packed / "model.wclust").stat().st_size > (LIMIT_RATIO - 1) * dense + LIMIT_EXTRA


def test_values_equal_the_mapped_loader(packed: Path) -> None:
    want = wcfmt.load_file(packed / "model.wclust")
    got = wcfmt.load_state_dict(packed)
    assert list(got) == list(want)
    for name, t in want.items():
        assert_bit_equal(got[name], t)
    model = wcfmt.from_pretrained(packed, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    for name, t in want.items():
        assert_bit_equal(state[name], t.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", ["load_state_dict", "from_pretrained"])
def test_cuda_decodes_on_the_device_without_a_host_copy(packed: Path, kind: str) -> None:
    got = peak(kind, packed, device="cuda")
    assert got["devices"] == ["cuda"]
    # staging: (threads + 2) slots of at most 16 MiB; a host copy of the weights would be 291 MB
    assert got["growth"] <= 0.25 * got["dense"] + (4 << 24) + (64 << 20), got
    want = wcfmt.load_state_dict(packed)
    if kind == "load_state_dict":
        state = wcfmt.load_state_dict(packed, device="cuda")
    else:
        model = wcfmt.from_pretrained(packed, device="cuda")
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
        state = model.state_dict()
    for name, t in want.items():
        assert_bit_equal(state[name].cpu(), t)
