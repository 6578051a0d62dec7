"""Peak memory of loading a packed model: `wcfmt.load_state_dict` and `wcfmt.from_pretrained`
against the dense bytes they return (issue #18, item 3: "peak at <= 1.15x the dense bytes").

    python tools/bench_load_peak.py --make DIR [--size-gb 2.5] [--tied]   # synthetic source + its pack
    python tools/bench_load_peak.py --peak PACKED_DIR [--dtype bf16] [--device cpu|cuda] [--only NAME]

``--make`` writes a *synthetic* Llama-shaped bf16 folder (TinyLlama names and shapes: hidden
2048, MLP 5632, 4 KV heads, vocab 32000, as many layers as ``--size-gb`` needs; seeded Gaussian
weights x 0.02, norms near 1) to ``DIR/src`` in shards of at most 1 GB with an index, one shard
in memory at a time, and packs it with ``wcfmt pack DIR/src -o DIR/packed --calib none``.

``--peak`` measures each loader in a fresh subprocess: after importing torch, transformers,
wcfmt and the model's transformers class (the constant every run pays) the child resets the
kernel's high-water mark of its RSS (``/proc/self/clear_refs``, "5"), loads, and reports
``VmHWM`` minus the RSS it had before the load (the *growth*), the ``ru_maxrss`` growth as a
cross-check, the wall time and the dense bytes of what it returned (every distinct tensor once,
in its output dtype). The ratio is the growth over the dense bytes: 1.0 is one copy of the
weights. With ``--device cuda`` the child
first loads the model once and drops it (the CUDA context, the Triton kernels' compilation and
torch's pinned-memory cache are constants, not copies of the weights), then measures a second
load: the host growth (no copy of the weights: about the staging slots, ``threads + 2`` of at
most 16 MiB) is reported next to ``torch.cuda.max_memory_allocated``.
Rows: ``import`` (nothing loaded: the noise floor), ``load_state_dict``, ``from_pretrained``
(and ``from_pretrained+forward``: one token through the model, which must run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import llama_shapes as _llama_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000

CHILD = r"""
import json, os, resource, sys, time
kind, path, dtype, device, threads = sys.argv[1:6]
threads = int(threads) if threads != "all" else None
import pathlib, torch, transformers, wcfmt
# the model's modeling code is imported before the measurement too (0.18 GB for Llama here):
# a constant of the transformers version, not of the model's size
config = pathlib.Path(path) / "config.json"
for arch in (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []:
    getattr(transformers, arch, None)
cuda = device.startswith("cuda")
if cuda:  # the context, the kernels' compilation and the pinned-memory cache: made by a first load
    torch.empty(1, device=device)
    if kind == "load_state_dict":
        wcfmt.load_state_dict(path, device=device, threads=threads)
    elif kind.startswith("from_pretrained"):
        with torch.no_grad():  # and the first forward's libraries (cuBLAS)
            wcfmt.from_pretrained(path, device=device, threads=threads)(torch.tensor([[1, 2, 3]], device=device))
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None

try:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    reset = True
except OSError:
    reset = False
base_rss, base_max = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
want = None if dtype == "stored" else dtype
t = time.perf_counter()
if kind == "import":
    tensors = []
elif kind == "load_state_dict":
    sd = wcfmt.load_state_dict(path, device=device, dtype=want, threads=threads)
    tensors = list(sd.values())
elif kind.startswith("from_pretrained"):
    model = wcfmt.from_pretrained(path, device=device, dtype=want, threads=threads)
    tensors = list(model.state_dict().values())
    if kind.endswith("+forward"):
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]], device=device)).logits
        assert torch.isfinite(logits.float()).all()
else:
    raise SystemExit(f"unknown kind {kind}")
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
seen, dense = set(), 0
for v in tensors:
    key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
    if key not in seen:
        seen.add(key)
        dense += v.numel() * v.element_size()
out = {"seconds": seconds, "dense": dense, "hwm_growth": status("VmHWM") - base_rss if reset else None,
       "maxrss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_max,
       "base_rss": base_rss, "rss_after": status("VmRSS"), "file_rss_after": status("RssFile")}
if cuda:
    out["gpu_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


# -- the synthetic folder ---------------------------------------------------------------------
def llama_shapes(layers: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    return _llama_shapes(layers, hidden=HIDDEN, inter=INTER, kv=KV, vocab=VOCAB, tied=tied)


def make_source(folder: Path, size_gb: float, tied: bool, shard_bytes: int = 1 << 30, seed: int = 0) -> int:
    """Write the synthetic folder one shard at a time; return its tensor bytes."""
    import safetensors.torch
    import torch

    fixed = sum(math.prod(s) for _, s in llama_shapes(0, tied))
    per_layer = sum(math.prod(s) for _, s in llama_shapes(1, tied)) - fixed
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per_layer))
    shapes = llama_shapes(layers, tied)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {}
        for name, shape in group:
            if len(shape) == 1:
                sd[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            else:
                sd[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += sd[name].numel() * 2
        safetensors.torch.save_file(sd, folder / fname, metadata={"format": "pt"})
        del sd
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": KV // 64, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
        "max_position_embeddings": 2048, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total


# -- measuring --------------------------------------------------------------------------------
def measure(kind: str, path: Path, dtype: str, device: str, threads: int | None) -> dict:
    # This process never imports torch: a child's ru_maxrss starts at its parent's RSS at fork.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), dtype, device, str(threads or "all")],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make", type=Path, metavar="DIR", help="write DIR/src (synthetic bf16) and DIR/packed")
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--tied", action="store_true", help="tie the LM head to the embedding (no lm_head.weight)")
    ap.add_argument("--peak", type=Path, metavar="PACKED_DIR", help="measure loading this packed folder")
    ap.add_argument("--dtype", default="stored", help="dtype= for both loaders (default: as stored)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="decode threads (default: every CPU)")
    ap.add_argument("--only", action="append", choices=["import", "load_state_dict", "from_pretrained",
                                                       "from_pretrained+forward"])
    args = ap.parse_args()
    if not args.make and not args.peak:
        ap.error("give --make DIR and/or --peak PACKED_DIR")
    if args.make:
        src, dst = args.make / "src", args.make / "packed"
        if not (src / "config.json").is_file():
            t = time.perf_counter()
            code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import bench_load_peak as b; "
                    "print(b.make_source(pathlib.Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == '1'))")
            r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(src), str(args.size_gb),
                                "1" if args.tied else "0"], capture_output=True, text=True, check=True)
            print(f"wrote {src}: {int(r.stdout) / 1e9:.3f} GB bf16 in {time.perf_counter() - t:.1f} s")
        if not dst.is_dir():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "wcfmt", "pack", str(src), "-o", str(dst), "--calib", "none", "-q"],
                           check=True, cwd=ROOT)
            packed = sum(p.stat().st_size for p in dst.glob("*.wclust"))
            print(f"packed {dst}: {packed / 1e9:.3f} GB .wclust in {time.perf_counter() - t:.1f} s")
        if args.peak is None:
            args.peak = dst
    kinds = args.only or ["import", "load_state_dict", "from_pretrained", "from_pretrained+forward"]
    packed = sum(p.stat().st_size for p in args.peak.glob("*.wclust"))
    print(f"\n{args.peak}: {packed / 1e9:.3f} GB of .wclust, dtype {args.dtype}, device {args.device}, "
          f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}")
    gpu = args.device.startswith("cuda")
    print(f"{'':26}{'seconds':>9}{'dense GB':>10}{'peak growth GB':>16}{'ratio':>7}{'ru_maxrss GB':>14}"
          f"{'file RSS GB':>13}" + ("  GPU peak GB" if gpu else ""))
    for kind in kinds:
        r = measure(kind, args.peak, args.dtype, args.device, args.threads)
        growth = r["hwm_growth"] if r["hwm_growth"] is not None else r["maxrss_growth"]
        ratio = f"{growth / r['dense']:7.3f}" if r["dense"] else f"{'':7}"
        extra = f"{r['gpu_peak'] / 1e9:13.3f}" if gpu else ""
        print(f"{kind:26}{r['seconds']:9.2f}{r['dense'] / 1e9:10.3f}{growth / 1e9:16.3f}{ratio}"
              f"{r['maxrss_growth'] / 1e9:14.3f}{(r['file_rss_after'] or 0) / 1e9:13.3f}{extra}")
    print("(peak growth: VmHWM after the load minus VmRSS before it, the high-water mark reset after "
          "imports; ratio: growth / dense bytes, 1.0 = one copy of the weights)")


if __name__ == "__main__":
    main()
