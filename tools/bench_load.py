"""Time to a fully materialised state dict: wcfmt's streaming loader against safetensors (issue #5).

    python tools/bench_load.py [--layers 3] [--k 32] [--device cpu|cuda] [--repeat 3] [--threads N] [--dir DIR] [--cold] [--into]

Builds a bf16 model of *synthetic* heavy-tailed (Student-t, 4 degrees of freedom) matrices
shaped like a 7B model's layers (``--layers 3`` is 1.2 GB), clustered at K, and writes it twice:
as .wclust (`wcfmt.save_file`) and, dense, as .safetensors (the same bf16 values, so both files
hold one state dict). Then, with both files in the page cache (each is read once first), it
measures in fresh subprocesses, alternating, best and median of ``--repeat``:

- wcfmt: open the file and `rebuild.stream.load_tensors` everything onto ``--device``;
- safetensors: ``safetensors.torch.load_file`` onto ``--device``, then ``.clone()`` of every
  tensor (a real loader copies the weights into the model's own parameters);

with the CPU seconds (user + system) each spent, the peak RSS of each process (``ru_maxrss``;
also the part above the process's RSS after its imports) and, on CUDA, peak GPU memory.
Prints a table with the ratios and the backend used. ``--threads`` sets wcfmt's decode threads
(default: every CPU this process may use).

``--into`` adds a table for loading into a model that exists already (a module with one
parameter per tensor, allocated and written before the clock starts, as a model built before
its weights are loaded): `wcfmt.load_model` against ``safetensors.torch.load_model``. The
parameters' pages are already there, so neither loader pays for fresh memory.

``--cold`` adds a table: before each of those runs both files are flushed
(``fsync``) and evicted from the page cache (``os.posix_fadvise(..., POSIX_FADV_DONTNEED)``), so
each loader reads its file from the disk. The table prints the fraction of each file still
resident just before each run (``mincore``): a platform that ignores the advice shows it there.
In a VM the "disk" may itself be cached by the host, which makes cold reads faster than a real
disk would; the .wclust file is 0.31 of the .safetensors bytes, so the slower the disk, the
more wcfmt gains.

Labels are drawn i.i.d. from the cluster probabilities of a Student-t sample (what clustering
i.i.d. Student-t weights yields, at 1/50 of the generation time), one fitted table per matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: One layer of a 7B-class model: attention q, k, v, o and the MLP's gate, up, down.
LAYER = [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)), ("o_proj", (4096, 4096)),
         ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)), ("down_proj", (4096, 11008))]


# -- building the model ---------------------------------------------------------------------
def fit_table(k: int, rng, samples: int = 1 << 20):  # type: ignore[no-untyped-def]
    """K fp16 centroids (Lloyd on a Student-t sample) and their probabilities."""
    import numpy as np

    x = np.sort(rng.standard_t(4, size=samples).astype(np.float32) * 0.02)
    c = np.quantile(x, (np.arange(k) + 0.5) / k).astype(np.float32)
    for _ in range(20):
        edges = (c[1:] + c[:-1]) / 2
        idx = np.searchsorted(edges, x)
        sums = np.bincount(idx, weights=x, minlength=k)
        counts = np.bincount(idx, minlength=k)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c).astype(np.float32)
    c16 = np.unique(c.astype(np.float16))
    while c16.size < k:  # fp16 rounding merged two centroids: add a neighbour value
        c16 = np.unique(np.append(c16, np.nextafter(c16[-1], np.float16(1))))
    edges = (c16[1:].astype(np.float32) + c16[:-1].astype(np.float32)) / 2
    p = np.bincount(np.searchsorted(edges, x), minlength=k) / x.size
    return c16, p


def build(folder: Path, layers: int, k: int, chunk_rows: int, seed: int = 0) -> tuple[Path, Path]:
    import numpy as np
    import safetensors.torch
    import torch

    import wcfmt
    from wcfmt.dtypes import from_numpy, to_numpy

    rng = np.random.default_rng(seed)
    clustered: dict[str, object] = {}
    dense: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for name, shape in LAYER:
            key = f"model.layers.{layer}.{name}.weight"
            table, p = fit_table(k, rng)
            # inverse CDF on 16-bit uniforms: label of each of the 65,536 levels
            lut = np.minimum(np.searchsorted(np.cumsum(p), (np.arange(65536) + 0.5) / 65536), k - 1).astype(np.uint8)
            labels = np.take(lut, rng.integers(0, 65536, size=shape, dtype=np.uint16))
            rows = shape[0]
            tables = [torch.from_numpy(table.copy()) for _ in range(-(-rows // chunk_rows))]
            ct = wcfmt.ClusteredTensor(labels=torch.from_numpy(labels), centroids=tables, chunk_rows=chunk_rows,
                                       dtype=torch.bfloat16)
            clustered[key] = ct
            bf16 = to_numpy(torch.from_numpy(table.astype(np.float32)).bfloat16())
            dense[key] = from_numpy(np.take(bf16, labels), "BF16")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{layer}.{norm}.weight"
            clustered[key] = dense[key] = (1 + 0.1 * torch.randn(4096)).bfloat16()
    wpath, spath = folder / "model.wclust", folder / "model.safetensors"
    wcfmt.save_file(clustered, wpath)  # type: ignore[arg-type]
    safetensors.torch.save_file(dense, spath)
    return wpath, spath


# -- one measurement, in a fresh process ----------------------------------------------------------
def existing_model(path: str, device: str):  # type: ignore[no-untyped-def]
    """A module with one parameter per tensor of the safetensors file ``path`` (same names,
    shapes and dtypes), every page written, as a model built before its weights are loaded."""
    import safetensors
    import torch

    from wcfmt.dtypes import torch_dtype

    root = torch.nn.Module()
    with safetensors.safe_open(path, "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            dtype = torch_dtype(sl.get_dtype())
            *parents, leaf = name.split(".")
            mod = root
            for part in parents:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            t = torch.empty(sl.get_shape(), dtype=dtype, device=device).fill_(0.5)
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def child(kind: str, path: str, device: str, threads: int | None) -> None:
    import torch

    if kind.startswith("wcfmt"):
        import wcfmt
        from wcfmt.reader import WclustReader
        from wcfmt.rebuild.stream import load_tensors
    else:
        import safetensors.torch
    cuda = device.startswith("cuda")
    if cuda:
        torch.empty(1, device=device)  # create the context before timing
        torch.cuda.synchronize()
    model = None
    if kind.endswith("-into"):  # the safetensors twin of the file names every tensor
        model = existing_model(str(Path(path).with_suffix(".safetensors")), device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    base = before.ru_maxrss
    t = time.perf_counter()
    if kind == "wcfmt":
        with WclustReader(path) as r:
            sd = load_tensors(r, device=device, threads=threads)
    elif kind == "safetensors":
        sd = {n: v.clone() for n, v in safetensors.torch.load_file(path, device=device).items()}
    elif kind == "wcfmt-into":
        wcfmt.load_model(model, path, threads=threads)
        sd = model.state_dict()
    else:
        safetensors.torch.load_model(model, path, device=device)
        sd = model.state_dict()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = after.ru_maxrss
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = {"seconds": seconds, "cpu_seconds": cpu, "rss_kib": peak, "rss_above_imports_kib": peak - base,
           "bytes": sum(v.numel() * v.element_size() for v in sd.values())}
    if cuda:
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    if kind.startswith("wcfmt"):
        from wcfmt.rebuild.backend import default_backend

        out["backend"] = default_backend(device)
    print(json.dumps(out))


def run_child(kind: str, path: Path, args: argparse.Namespace) -> str:
    cmd = [sys.executable, __file__, "--child", kind, str(path), "--device", args.device,
           "--layers", str(args.layers), "--k", str(args.k), "--chunk-rows", str(args.chunk_rows)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{kind} child failed:\n{res.stderr}")
    return res.stdout


def measure(kind: str, path: Path, args: argparse.Namespace) -> dict:
    return json.loads(run_child(kind, path, args).strip().splitlines()[-1])


def warm(path: Path) -> None:
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def evict(path: Path) -> None:
    """Flush ``path`` and ask the kernel to drop it from the page cache (POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore), or NaN where it cannot be asked."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if not size or not sys.platform.startswith("linux"):
        return float("nan")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            import numpy as np

            a = np.frombuffer(m, np.uint8)  # only for the mapping's address
            vec = np.zeros(-(-size // page), np.uint8)
            ok = libc.mincore(a.ctypes.data, size, vec.ctypes.data) == 0
            del a
            return float((vec & 1).mean()) if ok else float("nan")
        finally:
            m.close()


def check(wpath: Path, spath: Path) -> None:
    import safetensors.torch
    import torch

    from wcfmt.reader import WclustReader
    from wcfmt.rebuild.stream import load_tensors

    want = safetensors.torch.load_file(spath)
    with WclustReader(wpath) as r:
        got = load_tensors(r)
    assert set(got) == set(want)
    for n, v in want.items():
        assert torch.equal(got[n].view(torch.int16), v.view(torch.int16)), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3, help="7B-shaped layers (0.4 GB of bf16 each)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk (512 x 4096 bf16 = 4 MiB)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="wcfmt decode threads (default: all CPUs)")
    ap.add_argument("--dir", type=Path, help="keep the files here (reused if present)")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exactness check")
    ap.add_argument("--cold", action="store_true", help="also time both loaders with their files evicted from the page cache")
    ap.add_argument("--into", action="store_true",
                    help="also time wcfmt.load_model against safetensors.torch.load_model into an existing model")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, where = args.child
        if kind == "build":
            build(Path(where), args.layers, args.k, args.chunk_rows)
        elif kind == "check":
            check(Path(where) / "model.wclust", Path(where) / "model.safetensors")
        else:
            child(kind, where, args.device, args.threads)
        return

    # This process stays small and imports no torch: a child's ru_maxrss starts from its
    # parent's RSS at fork, so building and checking run in children of their own.
    tmp = None
    folder = args.dir
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_load.")
        folder = Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    wpath, spath = folder / "model.wclust", folder / "model.safetensors"
    if not (wpath.exists() and spath.exists()):
        t = time.perf_counter()
        run_child("build", folder, args)
        print(f"built in {time.perf_counter() - t:.1f} s: {wpath.stat().st_size / 1e9:.3f} GB .wclust, "
              f"{spath.stat().st_size / 1e9:.3f} GB .safetensors")
    if not args.no_check:
        run_child("check", folder, args)
        print("check: wcfmt load == safetensors load, bit for bit")
    warm(wpath)
    warm(spath)

    runs: dict[str, list[dict]] = {"wcfmt": [], "safetensors": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeat):
        for kind, path in (("wcfmt", wpath), ("safetensors", spath)):
            runs[kind].append(measure(kind, path, args))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    median = {k: sorted(r["seconds"] for r in v)[len(v) // 2] for k, v in runs.items()}
    w, s = best["wcfmt"], best["safetensors"]
    gb = s["bytes"] / 1e9
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{gb:.2f} GB bf16 state dict, K={args.k}, device {args.device}, {cpus} CPUs, wcfmt backend "
          f"{w['backend']}, {args.repeat} runs each, files in page cache, load average {load_before:.1f} "
          f"-> {os.getloadavg()[0]:.1f}")
    gpu_head = "  GPU peak GB" if "gpu_peak_bytes" in w else ""
    print(f"{'':26}{'best s':>8}{'median s':>10}{'GB/s':>7}{'CPU s':>7}{'peak RSS GB':>13}{'above imports':>15}"
          f"{gpu_head}")
    for name, kind in (("wcfmt load_tensors", "wcfmt"), ("safetensors + clone", "safetensors")):
        r = best[kind]
        gpu = f"{r['gpu_peak_bytes'] / 1e9:13.2f}" if "gpu_peak_bytes" in r else ""
        print(f"{name:26}{r['seconds']:8.3f}{median[kind]:10.3f}{gb / r['seconds']:7.2f}{r['cpu_seconds']:7.2f}"
              f"{r['rss_kib'] * 1024 / 1e9:13.2f}{r['rss_above_imports_kib'] * 1024 / 1e9:15.2f}{gpu}")
    rss_ratio = w["rss_kib"] / s["rss_kib"]
    above_ratio = w["rss_above_imports_kib"] / max(1, s["rss_above_imports_kib"])
    print(f"{'ratio wcfmt / safetensors':26}{w['seconds'] / s['seconds']:8.2f}"
          f"{median['wcfmt'] / median['safetensors']:10.2f}{'':7}{w['cpu_seconds'] / s['cpu_seconds']:7.2f}"
          f"{rss_ratio:13.2f}{above_ratio:15.2f}")
    print("(CPU s: user + system seconds of the best run; with other load on the machine, compare these too)")
    print(f"file size: .wclust {wpath.stat().st_size / 1e9:.3f} GB, .safetensors {spath.stat().st_size / 1e9:.3f} GB")
    if args.into:
        into: dict[str, list[dict]] = {"wcfmt-into": [], "safetensors-into": []}
        for _ in range(args.repeat):
            for kind, path in (("wcfmt-into", wpath), ("safetensors-into", spath)):
                into[kind].append(measure(kind, path, args))
        ib = {k: min(v, key=lambda r: r["seconds"]) for k, v in into.items()}
        im = {k: sorted(r["seconds"] for r in v)[len(v) // 2] for k, v in into.items()}
        print("\ninto an existing model (its parameters allocated and written before the clock starts; "
              "files in page cache)")
        print(f"{'':34}{'best s':>8}{'median s':>10}{'GB/s':>7}{'CPU s':>7}{'above imports GB':>18}")
        for name, kind in (("wcfmt.load_model", "wcfmt-into"), ("safetensors.torch.load_model", "safetensors-into")):
            r = ib[kind]
            print(f"{name:34}{r['seconds']:8.3f}{im[kind]:10.3f}{gb / r['seconds']:7.2f}{r['cpu_seconds']:7.2f}"
                  f"{r['rss_above_imports_kib'] * 1024 / 1e9:18.2f}")
        print(f"{'ratio wcfmt / safetensors':34}{ib['wcfmt-into']['seconds'] / ib['safetensors-into']['seconds']:8.2f}"
              f"{im['wcfmt-into'] / im['safetensors-into']:10.2f}")
    if args.cold:
        cold: dict[str, list[dict]] = {"wcfmt": [], "safetensors": []}
        left: list[float] = []
        for _ in range(args.repeat):
            for kind, path in (("wcfmt", wpath), ("safetensors", spath)):
                evict(wpath)
                evict(spath)
                left.append(resident(path))
                cold[kind].append(measure(kind, path, args))
        cb = {k: min(v, key=lambda r: r["seconds"]) for k, v in cold.items()}
        cm = {k: sorted(r["seconds"] for r in v)[len(v) // 2] for k, v in cold.items()}
        print(f"\ncold (both files evicted before each run; largest fraction still resident before a run: "
              f"{max(left):.3f}{' - the platform ignored the advice' if max(left) > 0.05 else ''})")
        print(f"{'':26}{'best s':>8}{'median s':>10}{'CPU s':>7}")
        for name, kind in (("wcfmt load_tensors", "wcfmt"), ("safetensors + clone", "safetensors")):
            print(f"{name:26}{cb[kind]['seconds']:8.3f}{cm[kind]:10.3f}{cb[kind]['cpu_seconds']:7.2f}")
        print(f"{'ratio wcfmt / safetensors':26}{cb['wcfmt']['seconds'] / cb['safetensors']['seconds']:8.2f}"
              f"{cm['wcfmt'] / cm['safetensors']:10.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
