"""Benchmark `wcfmt.cluster.cluster_tensor`: weights per second per core, against `numpy.sort`.

Clusters one heavy-tailed 4096 x 14336 matrix (Student-t, 4 degrees of freedom, scale 0.02, plus a
few "super weights" up to ±12, as in a Llama MLP) in BF16 and F32, at K = 16, 32, 64, with one table
per tensor and with a table per 256 rows, single-threaded (clustering + label assignment +
quality figures). The baseline is `numpy.sort` of the same stored array, timed in the same run.

Times are CPU seconds of this process (`time.process_time`, best of ``--repeat``): on a shared
machine they measure the work, not the neighbours. Wall-clock seconds are printed too.

    python tools/bench_cluster.py            # the full table (about two minutes)
    python tools/bench_cluster.py --rows 512 # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from wcfmt.cluster import cluster_tensor
from wcfmt.dtypes import to_numpy


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    for r, c, v in ((3, 11, 12.0), (rows // 2, 7, -9.5), (rows - 1, cols // 3, 6.25)):  # super weights
        w[r, c] = v
    return torch.from_numpy(w)


def best_of(repeat: int, fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the fastest of ``repeat`` runs."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--dtypes", nargs="+", default=["BF16", "F32"])
    args = ap.parse_args()

    base = heavy_tailed(args.rows, args.cols)
    n = base.numel()
    print(f"# {args.rows} x {args.cols} = {n / 1e6:.1f} M weights, Student-t(4) x 0.02 + 3 super weights; "
          f"1 thread; {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"{'dtype':5} {'chunk_rows':>10} {'K':>3} {'cpu s':>7} {'wall s':>7} {'Mw/s/core':>10} "
          f"{'sort cpu s':>10} {'vs sort':>8} {'K used':>6} {'rel_error':>9}")
    for name in args.dtypes:
        t = base.to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[name])
        stored = to_numpy(t).reshape(-1)
        sort_cpu, _ = best_of(args.repeat, lambda: np.sort(stored))
        for chunk_rows in (None, 256):
            for k in args.ks:
                out = {}
                cpu, wall = best_of(args.repeat, lambda: out.update(ct=cluster_tensor(t, k, chunk_rows, threads=1)))
                ct = out["ct"]
                print(f"{name:5} {str(chunk_rows):>10} {k:>3} {cpu:7.3f} {wall:7.3f} {n / cpu / 1e6:10.1f} "
                      f"{sort_cpu:10.3f} {sort_cpu / cpu:7.1f}x {ct.quality['k_mean']:6.1f} "
                      f"{ct.quality['rel_error']:9.4f}")


if __name__ == "__main__":
    main()
