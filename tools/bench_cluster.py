"""Benchmark clustering: weights per second per core, beside `numpy.sort` of the same values.

Two modes, one heavy-tailed matrix per run (Student-t, 4 degrees of freedom, scale 0.02, plus a
few "super weights" up to ±12, as in a Llama MLP; fixed seed), single-threaded:

- ``--ks K ...`` (exact 1-D k-means, the paper's setting): `cluster_tensor(w, K, chunk_rows)`
  with one table per tensor and with a table per 256 rows, for each of ``--dtypes``.
- ``--bits B ...`` (the entropy-constrained encoder, issue #8): BF16 only, one table per tensor,
  two rows per B: ``cluster_tensor(w, bits=B, threads=1)`` and what ``wcfmt pack`` runs per
  tensor, ``wcfmt.convert.cluster_for_storage(w, None, None, threads=1, bits=B)`` (the same plus
  the re-chunking into 256-row storage chunks), and a third, ``cluster_for_storage(..., step=s)``
  at the step ``s`` the bits call found: what pack runs per tensor after its model-wide
  allocation (`wcfmt.cluster.allocate`, whose bisection costs about what the per-tensor one does).

The baseline is `numpy.sort` of the same *values* (BF16/F16 widened to float32 outside the
timing, F32 as is: sorting the stored uint16 bit patterns instead is a 16-bit integer sort, ~10×
faster and not the same work), timed in the same run; "vs sort" is sort's time over the row's.
Times are CPU seconds of this process (`time.process_time`, best of ``--repeat``): on a shared
machine they measure the work, not the neighbours. Wall-clock seconds are printed too. torch runs
one thread, as in `wcfmt pack`'s workers: with two, each small torch reduction in
`ClusteredTensor.validate` (a uint8 ``max`` per storage chunk) cost ~8 ms of OpenMP time on a
busy 2-core machine, 60 ms per 2048-row tensor, which is not clustering.
``--profile`` prints a cProfile of one ``--bits`` call (the first B) after the table.

    python tools/bench_cluster.py                                          # k-means table (~2 min)
    python tools/bench_cluster.py --rows 512                               # a quicker, smaller run
    python tools/bench_cluster.py --rows 2048 --cols 5632 --ks --bits 4.5 6.0   # the bits mode
    python tools/bench_cluster.py --rows 2048 --cols 5632 --ks --bits 6.0 --profile

Measured figures, profile and suggestions: tools/NOTES-bench.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np
import torch

from wcfmt.cluster import cluster_tensor

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    for r, c, v in ((3, 11, 12.0), (rows // 2, 7, -9.5), (rows - 1, cols // 3, 6.25)):  # super weights
        w[r, c] = v
    return torch.from_numpy(w)


def values_f32(t: torch.Tensor) -> np.ndarray:
    """The tensor's values as a flat float32 array (exact for BF16/F16): what np.sort sorts."""
    return t.float().numpy().reshape(-1).copy()


def best_of(repeat: int, fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the fastest of ``repeat`` runs."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def machine() -> str:
    from machine_info import cpu_name

    return f"{cpu_name()}, numpy {np.__version__}"


HEADER = (f"{'dtype':5} {'call':28} {'chunk_rows':>10} {'setting':>8} {'cpu s':>7} {'wall s':>7} "
          f"{'Mw/s/core':>10} {'sort cpu s':>10} {'vs sort':>8} {'K used':>6} {'H bits':>6} {'rel_error':>9}")


def row(dtype: str, call: str, chunk_rows, setting: str, cpu: float, wall: float, n: int, sort_cpu: float, q: dict) -> str:
    return (f"{dtype:5} {call:28} {str(chunk_rows):>10} {setting:>8} {cpu:7.3f} {wall:7.3f} {n / cpu / 1e6:10.1f} "
            f"{sort_cpu:10.3f} {sort_cpu / cpu:7.2f}x {q['k_mean']:6.1f} {q['label_entropy_bits']:6.2f} "
            f"{q['rel_error']:9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="*", default=[16, 32, 64], help="k-means rows (an empty list skips them)")
    ap.add_argument("--dtypes", nargs="+", default=["BF16", "F32"], help="dtypes of the k-means rows")
    ap.add_argument("--bits", type=float, nargs="*", default=[], help="bits-mode rows (BF16, one table per tensor)")
    ap.add_argument("--profile", action="store_true", help="cProfile one call of the first --bits value")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = heavy_tailed(args.rows, args.cols)
    n = base.numel()
    print(f"# {args.rows} x {args.cols} = {n / 1e6:.1f} M weights, Student-t(4) x 0.02 + 3 super weights, seed 0; "
          f"1 thread (torch too); CPU s best of {args.repeat}; {machine()}")
    print(HEADER)
    sort_cpu_of: dict[str, float] = {}

    def sort_cpu(name: str) -> float:
        if name not in sort_cpu_of:
            vals = values_f32(base.to(DTYPES[name]))
            sort_cpu_of[name] = best_of(args.repeat, lambda: np.sort(vals))[0]
        return sort_cpu_of[name]

    for name in args.dtypes if args.ks else []:
        t = base.to(DTYPES[name])
        for chunk_rows in (None, 256):
            for k in args.ks:
                out = {}
                cpu, wall = best_of(args.repeat, lambda: out.update(ct=cluster_tensor(t, k, chunk_rows, threads=1)))
                print(row(name, "cluster_tensor(k=K)", chunk_rows, f"K={k}", cpu, wall, n, sort_cpu(name),
                          out["ct"].quality), flush=True)

    if args.bits:
        from wcfmt.convert import cluster_for_storage

        t = base.to(torch.bfloat16)
        for b in args.bits:
            out: dict = {}
            cpu, wall = best_of(args.repeat, lambda: out.update(ct=cluster_tensor(t, bits=b, threads=1)))
            print(row("BF16", "cluster_tensor(bits=B)", None, f"B={b:g}", cpu, wall, n, sort_cpu("BF16"),
                      out["ct"].quality), flush=True)
            cpu, wall = best_of(args.repeat, lambda: out.update(ct=cluster_for_storage(t, None, None, threads=1, bits=b)))
            print(row("BF16", "cluster_for_storage(bits=B)", None, f"B={b:g}", cpu, wall, n, sort_cpu("BF16"),
                      out["ct"].quality), flush=True)
            s = out["ct"].quality["step"]
            cpu, wall = best_of(args.repeat, lambda: out.update(ct=cluster_for_storage(t, None, None, threads=1, step=s)))
            print(row("BF16", "cluster_for_storage(step=s)", None, f"B={b:g}", cpu, wall, n, sort_cpu("BF16"),
                      out["ct"].quality), flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            cluster_tensor(t, bits=args.bits[0], threads=1)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(f"\n# cProfile of cluster_tensor(w, bits={args.bits[0]:g}, threads=1), by own time")
            print(s.getvalue())


if __name__ == "__main__":
    main()
