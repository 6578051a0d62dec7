"""``wcfmt pack`` at its defaults on a Llama-3.1-8B-shaped bf16 folder: wall time per stage, peak
memory, ratio, and whether the pack was calibrated (issue #18).

The folder is SYNTHETIC: Llama-3.1-8B's names and shapes (32 layers, hidden 4096, MLP 14336,
vocab 128256, 32 heads / 8 KV heads, untied LM head; 8.03 B parameters, 16.06 GB in 4 shards with
an index, and its config.json with ``LlamaForCausalLM``), filled with seeded random numbers drawn
to resemble trained weights' scale: every matrix normal with std 0.02 and 0.25% of its input
columns (chosen at random) scaled by 8, as activation-outlier channels are; the norm gains
1 + N(0, 0.1²). It has no tokenizer: the automatic ``calib random`` draws token ids from the
config, not a tokenizer. Nothing about a trained model's quality can be read from it; it measures
time and memory at that size.

The pack runs as ``wcfmt pack SRC -o DST --force`` (its defaults: ``wcfmt.cli.main`` in a fresh
Python subprocess), and the stage timings are the library's own (``PackReport.stages``: ``plan``;
``calibrate``, the forward pass that weighs columns, and ``allocate``, the bit allocation's pass
over the weights, which run at once; ``encode+write``, clustering and writing, interleaved tensor
by tensor). Peak memory: the peak RSS of the pack process and of its largest worker
(``getrusage``), and the peak of the summed RSS of the process tree sampled every 0.5 s, also
split into before the encoder starts (plan, calibration beside allocation) and after.

    python tools/bench_scale.py --src /work/scratch/llama8b-synth --dst /tmp/llama8b.wclust
    python tools/bench_scale.py --src /work/scratch/llama8b-synth --reuse ...   # keep the folder
    python tools/bench_scale.py --make-only --src DIR                            # only write it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import llama_shapes as _llama_shapes  # noqa: E402

import numpy as np

LAYERS, HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 32, 4096, 14336, 128256, 32, 8
HEAD_DIM = HIDDEN // HEADS
SHARDS = 4
SEED = 0
STD = 0.02
OUTLIER_FRACTION, OUTLIER_SCALE = 0.0025, 8.0

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
    "note": "SYNTHETIC weights (tools/bench_scale.py): Llama-3.1-8B shapes, random values",
}


def tensor_shapes(layers: int = LAYERS) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in Llama's checkpoint order."""
    return _llama_shapes(layers, hidden=HIDDEN, inter=INTER, kv=KV_HEADS * HEAD_DIM, vocab=VOCAB, norms_first=True)


def _values(name: str, shape: tuple[int, ...], index: int, rows: slice, out: np.ndarray) -> None:
    """Rows ``rows`` of tensor ``name`` as bf16 bit patterns into ``out`` (seeded per tensor
    and row block, so a tensor's values do not depend on the order it is written in)."""
    import torch

    g = torch.Generator().manual_seed(SEED * 1_000_003 + index * 4099 + rows.start)
    if len(shape) == 1:
        x = 1.0 + 0.1 * torch.randn(shape[0], generator=g)
    else:
        x = torch.randn(rows.stop - rows.start, shape[1], generator=g).mul_(STD)
        cols = torch.Generator().manual_seed(SEED * 7919 + index)  # one set of columns per tensor
        n = max(1, int(shape[1] * OUTLIER_FRACTION))
        x[:, torch.randperm(shape[1], generator=cols)[:n]] *= OUTLIER_SCALE
    out[...] = x.to(torch.bfloat16).view(torch.int16).numpy().reshape(out.shape)


def make_folder(dst: Path, layers: int = LAYERS) -> None:
    """Write the synthetic folder (safetensors written by hand, tensor by tensor, row block by row
    block: memory stays at one block, not one shard)."""
    import torch

    torch.set_num_threads(1)
    shapes = tensor_shapes(layers)
    sizes = [int(np.prod(s)) * 2 for _, s in shapes]
    total = sum(sizes)
    # shard boundaries: the first tensor that crosses each quarter of the bytes ends a shard
    shards: list[list[int]] = [[] for _ in range(SHARDS)]
    acc = 0
    for i, n in enumerate(sizes):
        shards[min(SHARDS - 1, acc * SHARDS // total)].append(i)
        acc += n
    shards = [s for s in shards if s]  # a model of few layers may fill fewer
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    t0 = time.perf_counter()
    for s, members in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for i in members:
            name, shape = shapes[i]
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + sizes[i]]}
            off += sizes[i]
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = dst / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for i in members:
                name, shape = shapes[i]
                rows = shape[0]
                step = rows if len(shape) == 1 else max(1, (16 << 20) // shape[1])
                for a in range(0, rows, step):
                    b = min(rows, a + step)
                    buf = np.empty((b - a,) + tuple(shape[1:]), dtype=np.int16)
                    _values(name, shape, i, slice(a, b), buf)
                    f.write(memoryview(buf).cast("B"))
        tmp.rename(dst / fname)
        print(f"  wrote {fname} ({off / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}, indent=2) + "\n")
    (dst / "SYNTHETIC.txt").write_text(__doc__ or "")


def folder_ok(src: Path, layers: int = LAYERS) -> bool:
    index = src / "model.safetensors.index.json"
    if not index.is_file() or not (src / "config.json").is_file():
        return False
    names = set(json.loads(index.read_text())["weight_map"])
    return names == {n for n, _ in tensor_shapes(layers)} and all(
        (src / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))


# The pack subprocess: the CLI, with the library's report kept for its stage timings.
RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    import wcfmt.cli, wcfmt.packing
    reports = []
    pack = wcfmt.packing.pack
    def kept(*a, **k):
        r = pack(*a, **k)
        reports.append(r)
        return r
    wcfmt.packing.pack = kept  # the CLI imports it when it runs
    t0, epoch = time.perf_counter(), time.time()
    code = wcfmt.cli.main(["pack", *sys.argv[2:]])
    wall = time.perf_counter() - t0
    out = {"code": code, "wall_s": wall, "t0_epoch": epoch, "stages": dict(reports[0].stages) if reports else {},
           "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    open(sys.argv[1], "w").write(json.dumps(out))
    """
)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and its descendants."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def run_pack(src: Path, dst: Path, extra: list[str]) -> dict:
    result = dst.parent / (dst.name + ".bench.json")
    cmd = [sys.executable, "-c", RUNNER, str(result), str(src), "-o", str(dst), "--force", *extra]
    samples: list[tuple[float, int, int]] = []  # (time, pack process RSS, process tree RSS)
    proc = subprocess.Popen(cmd)

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.time(), _rss(proc.pid), _tree_rss(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - t0
    sampler.join()
    if code != 0:
        raise SystemExit(f"pack failed with exit code {code}")
    out = json.loads(result.read_text())
    out["outer_wall_s"] = wall
    out["tree_peak_rss"] = max((t for _, _, t in samples), default=0)
    # the samples before the encoder starts (plan, then calibrate beside allocate) and after
    st = out["stages"]
    split = out["t0_epoch"] + st.get("plan", 0.0) + max(st.get("calibrate", 0.0), st.get("allocate", 0.0))
    for when, keep in (("prepare", lambda t: t <= split), ("encode", lambda t: t > split)):
        chosen = [(m, t) for at, m, t in samples if keep(at)]
        out[f"{when}_peak"] = (max((m for m, _ in chosen), default=0), max((t for _, t in chosen), default=0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="the synthetic folder (written unless --reuse finds it)")
    ap.add_argument("--dst", type=Path, default=None, help="the packed folder (default: SRC + '.wclust')")
    ap.add_argument("--reuse", action="store_true", help="use SRC as it is when it holds the synthetic model")
    ap.add_argument("--make-only", action="store_true", help="only write the synthetic folder")
    ap.add_argument("--delete-src", action="store_true", help="delete SRC after the run")
    ap.add_argument("--layers", type=int, default=LAYERS,
                    help=f"decoder blocks (default {LAYERS}; fewer: a quick check at the same block, embedding and head size)")
    ap.add_argument("pack_args", nargs="*", help="more arguments for wcfmt pack (after --)")
    args = ap.parse_args(argv)
    src: Path = args.src
    dst: Path = args.dst or src.with_name(src.name + ".wclust")
    if args.reuse and folder_ok(src, args.layers):
        print(f"reusing {src}")
    else:
        if src.exists():
            shutil.rmtree(src)
        print(f"writing the synthetic folder {src} ...", flush=True)
        t = time.perf_counter()
        make_folder(src, args.layers)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    if args.make_only:
        return 0
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    r = run_pack(src, dst, args.pack_args)
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.wclust"))
    from wcfmt.inspect import info

    extra = ((info(dst).files[0].get("settings") or {}).get("extra") or {})
    calibrated = extra.get("calib", "none") != "none" and "calib_skipped" not in extra
    print(f"\nmachine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}")
    print(f"command: wcfmt pack {src} -o {dst} {' '.join(args.pack_args)}".rstrip())
    print(f"{'stage (PackReport.stages)':<28}{'wall s':>9}")
    for name, sec in r["stages"].items():
        print(f"{name:<28}{sec:>9.1f}")
    print(f"{'pack() call in all':<28}{r['wall_s']:>9.1f}")
    print(f"{'with Python start-up':<28}{r['outer_wall_s']:>9.1f}")
    gb = 1e9
    print(f"peak RSS: pack process {r['self_maxrss'] / gb:.2f} GB, largest worker {r['children_maxrss'] / gb:.2f} GB, "
          f"process tree (sampled sum) {r['tree_peak_rss'] / gb:.2f} GB")
    for when in ("prepare", "encode"):
        m, t = r[f"{when}_peak"]
        print(f"  sampled during {when:<8} pack process {m / gb:.2f} GB, process tree {t / gb:.2f} GB")
    print(f"bytes: {src_bytes / gb:.2f} GB -> {out_bytes / gb:.2f} GB, ratio {out_bytes / src_bytes:.4f}")
    keys = ("calib", "calib_path", "calib_text", "calib_skipped", "bits")
    print("header: " + ", ".join(f"{k}={extra[k]!r}" for k in keys if k in extra))
    print(f"calibrated (calib recorded, no calib_skipped): {calibrated}")
    if args.delete_src:
        shutil.rmtree(src)
        print(f"deleted {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
