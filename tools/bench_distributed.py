"""What each rank decodes when `torch.distributed.checkpoint.load` reads a packed folder through
`wcfmt.distributed.WclustReader` into FSDP2-style ``Shard(0)`` DTensors (issue #18, item 4).

    python tools/bench_distributed.py [--ranks 2 4] [--layers 2] [--hidden 1024] [--intermediate 2816]
                                      [--vocab 8192] [--src PACKED_FOLDER]

Without ``--src`` it writes a *synthetic* seeded bf16 folder shaped like a small Llama (Gaussian
weights, two safetensors shards) and packs it with ``wcfmt.pack(k=16, calib="none")``: 256-row
storage chunks, the projection matrices clustered, embeddings and norms lossless. Then for each
rank count it starts that many gloo processes on the CPU; every rank loads the whole state dict
as ``Shard(0)`` DTensors and counts (`WclustReader.stats`) the clustered label-plane bytes it
decoded. The baseline, measured in the same run, is one process loading plain tensors (every
chunk once). The table gives each rank's label bytes, its exact share of the baseline
(``rows_of_rank / rows`` per tensor), the two bounds "share + one chunk per tensor" (issue #18)
and "share + two chunks per tensor" (a rank's rows can start and end inside a chunk), and the
ratio to the baseline; the last line per rank count sums the ranks (the boundary chunks that two
neighbours both decode).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import wcfmt  # noqa: E402
from wcfmt.codecs.bitpack import packed_size  # noqa: E402
from wcfmt.distributed import WclustReader  # noqa: E402
from wcfmt.reader import WclustReader as FileReader  # noqa: E402
from wcfmt.schema import ClusteredEntry, chunk_row_ranges, rows_and_row_size  # noqa: E402


def make_folder(root: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> Path:
    """A seeded synthetic Llama-shaped bf16 folder in two safetensors shards, packed at k=16."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    tensors = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden // 4, hidden),
            p + "self_attn.v_proj.weight": w(hidden // 4, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }  # fmt: skip
    tensors |= {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": w(vocab, hidden)}
    src = root / "src"
    src.mkdir()
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for j, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    wcfmt.pack(src, root / "packed", k=16, calib="none")
    return root / "packed"


def _worker(rank: int, world: int, init_file: str, src: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import empty as dtensor_empty

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (world,))
        with WclustReader(src) as reader:
            md = reader.read_metadata()
            state = {n: dtensor_empty(m.size, dtype=m.properties.dtype, device_mesh=mesh, placements=[Shard(0)])
                     for n, m in md.state_dict_metadata.items()}  # fmt: skip
            t0 = time.perf_counter()
            dcp.load(state, storage_reader=reader)
            seconds = time.perf_counter() - t0
            Path(out, f"rank{rank}.json").write_text(json.dumps({"label_bytes": reader.stats.label_bytes,
                                                                  "chunks": len(reader.stats.chunks), "s": seconds}))  # fmt: skip
    finally:
        dist.destroy_process_group()


def bounds(src: Path, rank: int, world: int) -> tuple[float, float, float]:
    """(share, share + 1 chunk per clustered tensor, share + 2 chunks per clustered tensor)."""
    share = one = two = 0.0
    for f in sorted(src.glob("*.wclust")) if src.is_dir() else [src]:
        with FileReader(f) as r:
            for e in r.header.tensors.values():
                if not isinstance(e, ClusteredEntry):
                    continue
                rows, row_size = rows_and_row_size(e.shape)
                labels = [packed_size((b - a) * row_size, c.label_bits)
                          for (a, b), c in zip(chunk_row_ranges(rows, e.chunk_rows), e.chunks)]  # fmt: skip
                size = math.ceil(rows / world)
                lo, hi = min(rank * size, rows), min(rank * size + size, rows)
                s = sum(labels) * (hi - lo) / rows
                share, one, two = share + s, one + s + max(labels), two + s + 2 * max(labels)
    return share, one, two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--src", type=Path, help="a packed folder or .wclust file instead of the synthetic one")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = args.src or make_folder(root, args.layers, args.hidden, args.intermediate, args.vocab)
        with WclustReader(src) as reader, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = {n: torch.empty(m.size, dtype=m.properties.dtype)
                     for n, m in reader.read_metadata().state_dict_metadata.items()}  # fmt: skip
            import torch.distributed.checkpoint as dcp

            dcp.load(state, storage_reader=reader, no_dist=True)
            baseline = reader.stats.label_bytes
        print(f"source: {src if args.src else 'synthetic, ' + str(vars(args))}")
        print(f"baseline (one process, every chunk once): {baseline} label bytes\n")
        print("ranks rank  label bytes   share      share+1 chunk  share+2 chunks  ≤+1?  ratio to baseline  load s")
        for world in args.ranks:
            run = root / f"run{world}"
            run.mkdir()
            mp.start_processes(_worker, args=(world, str(run / "init"), str(src), str(run)), nprocs=world,
                               start_method="spawn")  # fmt: skip
            total = 0
            for rank in range(world):
                got = json.loads((run / f"rank{rank}.json").read_text())
                share, one, two = bounds(src, rank, world)
                total += got["label_bytes"]
                print(f"{world:5} {rank:4}  {got['label_bytes']:11}  {share:10.0f}  {one:13.0f}  {two:14.0f}  "
                      f"{'yes' if got['label_bytes'] <= one else 'no':4}  {got['label_bytes'] / baseline:17.3f}  "
                      f"{got['s']:6.2f}")  # fmt: skip
            print(f"{world:5}  all  {total:11}  {baseline:10}  {'':13}  {'':14}  {'':4}  {total / baseline:17.3f}")


if __name__ == "__main__":
    main()
