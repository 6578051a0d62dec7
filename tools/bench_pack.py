"""Time and peak memory of ``wcfmt pack`` / ``wcfmt unpack`` on a multi-shard bf16 folder, next to
``safetensors.torch.load_file`` + ``save_file`` of the same folder, measured in the same run.

The folder is Llama-shaped (TinyLlama names and shapes: hidden 2048, MLP 5632, 4 KV heads, vocab
32000, as many layers as the requested size needs), filled with heavy-tailed random weights
(Student-t, 3 degrees of freedom, like trained weights), written by huggingface_hub's
``save_torch_state_dict`` in shards with an index, a config and a tokenizer file.

Each operation runs in a fresh Python subprocess that reports its own wall time and peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so nothing one measurement allocates counts
against the next. The baseline copies the folder shard by shard with safetensors (load a shard,
save it), the way a safetensors tool holds one shard at a time. ``import`` is Python + torch +
wcfmt doing nothing: the constant every row pays.

    python tools/bench_pack.py                    # >= 1 GB, default K and chunking
    python tools/bench_pack.py --size-gb 0.2 --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import llama_shapes as _llama_shapes  # noqa: E402

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000

RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    op, args = sys.argv[1], sys.argv[2:]
    import torch, wcfmt, wcfmt.cli, safetensors.torch  # the constant every row pays
    t0 = time.perf_counter()
    if op == "import":
        pass
    elif op in ("pack", "unpack"):
        code = wcfmt.cli.main([op, *args, "-q", "--force"])
        assert code == 0, code
    elif op == "safetensors":
        import pathlib, shutil
        src, dst = map(pathlib.Path, args)
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        for p in sorted(src.glob("*.safetensors")):
            with safetensors.safe_open(str(p), "pt") as f:
                meta = f.metadata()
            sd = safetensors.torch.load_file(p)
            safetensors.torch.save_file(sd, dst / p.name, metadata=meta)
            del sd
    else:
        raise SystemExit(f"unknown op {op}")
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    hwm = None
    try:  # the kernel's own high-water mark of this process image, as a cross-check
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    print(json.dumps({"seconds": wall, "peak_rss": rss, "vm_hwm": hwm}))
    """
)


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    return _llama_shapes(layers, hidden=HIDDEN, inter=INTER, kv=KV, vocab=VOCAB)


def build_folder(folder: Path, size_gb: float, shard: str) -> tuple[int, int]:
    """Write the model; return (bytes of tensors, layers)."""
    import numpy as np
    import torch
    from huggingface_hub import save_torch_state_dict

    per_layer = sum(math.prod(s) for _, s in llama_shapes(1)) - sum(math.prod(s) for _, s in llama_shapes(0))
    fixed = sum(math.prod(s) for _, s in llama_shapes(0))
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per_layer))
    g = np.random.default_rng(0)
    sd = {}
    for name, shape in llama_shapes(layers):
        if len(shape) == 1:
            sd[name] = torch.from_numpy(1 + 0.1 * g.standard_normal(shape, dtype=np.float32)).to(torch.bfloat16)
        else:
            sd[name] = torch.from_numpy((g.standard_t(3, size=shape) * 0.02).astype(np.float32)).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(sd, folder, max_shard_size=shard, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": KV // 64, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    return total, layers


def largest_tensor_bytes(layers: int) -> int:
    return max(math.prod(s) for _, s in llama_shapes(layers)) * 2


def measure(op: str, *args: str) -> dict[str, float]:
    # This process stays small (it never imports torch): on Linux a child's ru_maxrss starts at
    # the RSS of the process it was forked from, so a big parent would inflate every row.
    r = subprocess.run([sys.executable, "-c", RUNNER, op, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{op} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def main() -> None:
    if sys.argv[1:2] == ["--_build"]:  # the child that builds the folder (so this process stays small)
        build_folder(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size in GB of bf16 tensors (default 1.0)")
    ap.add_argument("--shard", default="400MB", help="source shard size (default 400MB)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--pack-args", default="", help="extra `wcfmt pack` options, e.g. '--k 16 --threads 2'")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_pack."))
    src, packed, unpacked, copied = work / "src", work / "packed", work / "unpacked", work / "copied"
    try:
        if not (src / "model.safetensors.index.json").exists():
            print(f"building {args.size_gb} GB folder in {src} ...", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--_build", str(src), str(args.size_gb), args.shard], check=True)
        total = folder_bytes(src, "*.safetensors")
        layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        for p in src.glob("*.safetensors"):  # warm the page cache so the first row pays no cold reads
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        largest = largest_tensor_bytes(layers)

        rows = []
        print("measuring ...", file=sys.stderr)
        base = measure("import")
        st = measure("safetensors", str(src), str(copied))
        pk = measure("pack", str(src), "-o", str(packed), *args.pack_args.split())
        up = measure("unpack", str(packed), "-o", str(unpacked))
        rows = [
            ("import only (constant)", base, None),
            ("safetensors load+save (per shard)", st, folder_bytes(copied, "*.safetensors")),
            ("wcfmt pack", pk, folder_bytes(packed, "*.wclust")),
            ("wcfmt unpack", up, folder_bytes(unpacked, "*.safetensors")),
        ]
        n_src = len(list(src.glob("*.safetensors")))
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}")  # fmt: skip
        print(f"model: {total / 1e9:.2f} GB bf16 in {n_src} shards; largest tensor {largest / 1e6:.0f} MB")
        print("\n| operation | time (s) | x safetensors | peak RSS (MB) | RSS - import (MB) | VmHWM (MB) "
              "| output (MB) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, m, size in rows:
            tr = "" if name.startswith("import") else f"{m['seconds'] / st['seconds']:.2f}"
            extra = (m["peak_rss"] - base["peak_rss"]) / 1e6
            print(
                f"| {name} | {m['seconds']:.2f} | {tr} | {m['peak_rss'] / 1e6:.0f} | {extra:.0f} | "
                f"{(m['vm_hwm'] or 0) / 1e6:.0f} | "
                + ("" if size is None else f"{size / 1e6:.0f}")
                + " |"
            )
        print(f"\npacked / source bytes: {folder_bytes(packed, '*.wclust') / total:.3f}")
        print(f"pack peak RSS above import: {(pk['peak_rss'] - base['peak_rss']) / largest:.2f} x largest tensor; "
              f"safetensors: {(st['peak_rss'] - base['peak_rss']) / largest:.2f} x")  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
