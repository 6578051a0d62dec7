"""Sharded loading with torch.distributed.checkpoint (wcfmt/distributed.py).

Two sources: a file of every tensor kind (clustered BF16/F16/F32 with chunk row counts that do
not divide the rows, lossless tensors in many chunks, tied pairs, 1-D, a scalar, an empty
tensor, a tensor with fewer rows than ranks) and a folder packed by `wcfmt.pack` from two
safetensors shards. The gloo tests load them into DTensors on 2 and 4 CPU processes and check
every rank's local shard bit-for-bit against the matching slice of `wcfmt.load_file`, computed
here from the placements (not from DTensor), and which row chunks each rank decoded.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import wcfmt
from common import assert_bit_equal, flip, write_tiny_llama
from test_hub import real_hub  # noqa: F401  (the Hub double, a fixture)
from wcfmt.codecs import lossless
from wcfmt.codecs.bitpack import packed_size
from wcfmt.constants import INDEX_NAME
from wcfmt.dtypes import torch_dtype
from wcfmt.distributed import ChunkRef, WclustReader
from wcfmt.reader import WclustReader as FileReader
from wcfmt.schema import AliasEntry, ClusteredEntry, chunk_row_ranges, rows_and_row_size

#: Each gloo run (spawn, torch import, every placement on both sources) must finish in this time.
SPAWN_TIMEOUT_S = 180


# -- the sources --------------------------------------------------------------------------------
def _mixed(path: Path) -> Path:
    g = torch.Generator().manual_seed(11)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tied_clustered = wcfmt.cluster_tensor(randn(16, 8), k=32, chunk_rows=3)
    emb = randn(11, 8).bfloat16()
    tensors: dict[str, Any] = {
        "clu.bf16": wcfmt.cluster_tensor(randn(37, 12).bfloat16(), k=16, chunk_rows=5),  # 7 full + 2 rows
        "clu.f32.3d": wcfmt.cluster_tensor(randn(23, 6, 4), k=8, chunk_rows=4),
        "clu.f16": wcfmt.cluster_tensor(randn(19, 10).half(), k=4, chunk_rows=19),  # one chunk
        "tok.weight": tied_clustered,
        "lm_head.weight": tied_clustered,  # clustered alias
        "emb": emb,
        "head": emb,  # lossless alias
        "ll.bf16": randn(29, 8).bfloat16(),
        "ll.f32": randn(17, 6),
        "norm": randn(13),
        "tiny": randn(3, 5),  # fewer rows than 4 ranks: one rank's Shard(0) is empty
        "ids": torch.arange(27, dtype=torch.int64).reshape(9, 3) - 13,
        "scale": torch.tensor(0.75),
        "empty": torch.zeros(0, 4),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lossless, "DEFAULT_LOSSLESS_CHUNK_BYTES", 48)  # lossless tensors in chunks of a few rows
        wcfmt.save_file(tensors, path)
    return path


def _packed(root: Path) -> Path:
    """A safetensors folder in two shards, packed by `wcfmt.pack`: 256-row storage chunks."""
    from safetensors.torch import save_file as save_safetensors

    g = torch.Generator().manual_seed(12)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16()

    shards = {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": randn(40, 16),
            "model.layers.0.self_attn.q_proj.weight": randn(300, 16),
            "model.layers.0.input_layernorm.weight": randn(16),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.mlp.up_proj.weight": randn(520, 16),
            "model.layers.1.mlp.down_proj.weight": randn(16, 520),
            "model.norm.weight": randn(16),
        },
    }
    src = root / "src"
    src.mkdir()
    weight_map = {}
    for name, part in shards.items():
        save_safetensors(part, src / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    wcfmt.pack(src, root / "packed", k=16, calib="none")
    return root / "packed"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {"mixed": _mixed(root / "mixed.wclust"), "packed": _packed(root)}


def _expected(source: Path) -> dict[str, torch.Tensor]:
    return wcfmt.load_state_dict(source) if source.is_dir() else wcfmt.load_file(source)


def _files(source: Path) -> list[Path]:
    return sorted(source.glob("*.wclust")) if source.is_dir() else [source]


def _load(state: dict[str, Any], reader: WclustReader, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group means one process
        dcp.load(state, storage_reader=reader, **kw)


# -- one process, no process group -----------------------------------------------------------------
def test_metadata_has_one_chunk_per_row_chunk(sources: dict[str, Path]) -> None:
    """Each tensor's DCP chunks are its row chunks (offsets (row_start, 0, ...), sizes (rows,
    *shape[1:])); an alias lists its target's chunks and its storage_data points at the target;
    a scalar is one chunk of no dimensions, an empty tensor has none."""
    with WclustReader(sources["mixed"]) as reader:
        md = reader.read_metadata()
    with FileReader(sources["mixed"]) as f:
        assert sorted(md.state_dict_metadata) == sorted(f.header.tensors)
        for name, tmd in md.state_dict_metadata.items():
            target, e = f.resolve(name)
            assert tmd.size == torch.Size(e.shape) and tmd.properties.dtype == torch_dtype(e.dtype)
            rows, row_size = rows_and_row_size(e.shape)
            ranges = chunk_row_ranges(rows, e.chunk_rows) if rows * row_size else []
            assert len(tmd.chunks) == len(ranges) == len(e.chunks)
            for i, (c, (a, b)) in enumerate(zip(tmd.chunks, ranges)):
                if e.shape:
                    assert list(c.offsets) == [a] + [0] * (len(e.shape) - 1)
                    assert list(c.sizes) == [b - a, *e.shape[1:]]
                else:
                    assert c.offsets == c.sizes == torch.Size([])
                ref = md.storage_data[dcp.metadata.MetadataIndex(name, c.offsets)]
                assert ref == ChunkRef("mixed.wclust", target, i)
    assert len(md.state_dict_metadata["clu.bf16"].chunks) == 8  # 37 rows in chunks of 5
    assert md.state_dict_metadata["empty"].chunks == []
    assert md.storage_data[dcp.metadata.MetadataIndex("lm_head.weight", [3, 0])] == ChunkRef(
        "mixed.wclust", "tok.weight", 1
    )


@pytest.mark.parametrize("which", ["mixed", "packed"])
def test_load_without_process_group(sources: dict[str, Path], which: str) -> None:
    """dcp.load(no_dist=True) into plain tensors gives load_file's tensors bit-for-bit, decoding
    each stored chunk exactly once (an alias and its target share the decode)."""
    want = _expected(sources[which])
    state = {n: torch.full_like(t, 7) for n, t in want.items()}
    with WclustReader(sources[which]) as reader:
        _load(state, reader, no_dist=True)
        decoded = reader.stats.chunks
    for name, t in want.items():
        assert_bit_equal(state[name], t)
    stored = set()
    for f in _files(sources[which]):
        with FileReader(f) as r:
            for name, e in r.header.tensors.items():
                if not isinstance(e, AliasEntry):
                    stored |= {ChunkRef(f.name, name, i) for i in range(len(e.chunks))}
    assert sorted(decoded, key=str) == sorted(stored, key=str)  # all, and none twice


def test_state_dict_in_another_dtype_gets_a_cast(sources: dict[str, Path]) -> None:
    want = wcfmt.load_file(sources["mixed"])
    state = {"clu.bf16": torch.zeros(37, 12, dtype=torch.float32)}
    with WclustReader(sources["mixed"]) as reader:
        _load(state, reader, no_dist=True)
    assert torch.equal(state["clu.bf16"], want["clu.bf16"].float())


def test_checkpoint_id_reopens_and_validates(sources: dict[str, Path], tmp_path: Path) -> None:
    """dcp.load(checkpoint_id=...) resets the reader onto that source; validate_checkpoint_id
    accepts .wclust files, packed folders and Hub references only."""
    want = _expected(sources["packed"])
    state = {"model.norm.weight": torch.zeros(16, dtype=torch.bfloat16)}
    with WclustReader(sources["mixed"]) as reader:
        _load(state, reader, checkpoint_id=sources["packed"], no_dist=True)
        assert reader.checkpoint_id == sources["packed"] and reader.path == sources["packed"]
    assert_bit_equal(state["model.norm.weight"], want["model.norm.weight"])
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert WclustReader.validate_checkpoint_id(sources["mixed"])
    assert WclustReader.validate_checkpoint_id(sources["packed"])
    assert WclustReader.validate_checkpoint_id("hf://org/name@v1")
    assert not WclustReader.validate_checkpoint_id(tmp_path)
    assert not WclustReader.validate_checkpoint_id(tmp_path / "x.safetensors")
    assert not WclustReader.validate_checkpoint_id(tmp_path / "missing.wclust")


def test_hub_source(sources: dict[str, Path], real_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """hf://org/name: the real huggingface_hub client downloads only the shards and the index
    (into its cache) and the load equals the local folder's."""
    from huggingface_hub import HfApi, constants

    folder = sources["packed"]
    api = HfApi()
    api.create_repo("me/dist-wclust")
    api.upload_folder(folder_path=str(folder), repo_id="me/dist-wclust")
    want = _expected(folder)
    state = {n: torch.zeros_like(t) for n, t in want.items()}
    with WclustReader("hf://me/dist-wclust") as reader:
        _load(state, reader, no_dist=True)
        assert reader.path.is_relative_to(constants.HF_HUB_CACHE)
        got_files = sorted(p.name for p in reader.path.iterdir())
    for name, t in want.items():
        assert_bit_equal(state[name], t)
    assert got_files == sorted([INDEX_NAME, *(p.name for p in _files(folder))])  # no README.md


def test_missing_source_is_a_wcfmt_error(tmp_path: Path) -> None:
    with pytest.raises(wcfmt.FormatError, match=r"missing\.wclust: no such file"):
        WclustReader(tmp_path / "missing.wclust")
    with pytest.raises(wcfmt.UsageError, match=r"no \.wclust files"):
        WclustReader(tmp_path)


def test_folder_index_must_match_its_shards(sources: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(sources["packed"], tmp_path / "packed")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.wclust"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(wcfmt.FormatError, match=r"lists tensor 'model\.norm\.weight' in model-00001"):
        WclustReader(folder)


def test_key_the_file_lacks(sources: dict[str, Path]) -> None:
    """DCP's planner names the key; allow_partial_load=True leaves it untouched instead."""
    state = {"norm": torch.zeros(13), "not.in.file": torch.zeros(2)}
    with WclustReader(sources["mixed"]) as reader:
        with pytest.raises(CheckpointException, match=r"Missing key in checkpoint state_dict: not\.in\.file"):
            _load(state, reader, no_dist=True)
        _load(state, reader, no_dist=True, planner=DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(state["not.in.file"], torch.zeros(2))
    assert_bit_equal(state["norm"], wcfmt.load_file(sources["mixed"])["norm"])


def test_damaged_chunk_names_file_tensor_and_chunk(sources: dict[str, Path], tmp_path: Path) -> None:
    """Blobs are checked when decoded: a load that needs the damaged chunk fails with a
    ChecksumError naming it; a load that does not need it succeeds."""
    import shutil

    path = shutil.copy(sources["mixed"], tmp_path / "damaged.wclust")
    with FileReader(path) as f:
        labels = f.header.tensors["clu.bf16"].chunks[7].labels  # type: ignore[union-attr]
    flip(Path(path), labels.offset)
    with WclustReader(path) as reader:
        with pytest.raises(CheckpointException) as info:
            _load({"clu.bf16": torch.zeros(37, 12, dtype=torch.bfloat16)}, reader, no_dist=True)
        err = info.value.failures[0][0]
        assert isinstance(err, wcfmt.ChecksumError)
        assert "damaged.wclust: tensor 'clu.bf16': chunk 7: labels checksum mismatch" in str(err)
        state = {"clu.f16": torch.zeros(19, 10, dtype=torch.float16)}
        _load(state, reader, no_dist=True)
    assert_bit_equal(state["clu.f16"], wcfmt.load_file(sources["mixed"])["clu.f16"])



def test_max_bytes_caps_each_chunk(sources: dict[str, Path]) -> None:
    """max_bytes (spec §9.1) applies to every chunk a rank decodes: UsageError before allocating."""
    with WclustReader(sources["mixed"], max_bytes=100) as reader:
        with pytest.raises(CheckpointException) as info:
            _load({"clu.bf16": torch.zeros(37, 12, dtype=torch.bfloat16)}, reader, no_dist=True)
        err = info.value.failures[0][0]
        assert isinstance(err, wcfmt.UsageError) and "tensor 'clu.bf16': chunk 0: decoding needs 120 bytes" in str(err)
        state = {"norm": torch.zeros(13)}  # 12 + 1 rows of F32: 48 bytes at most
        _load(state, reader, no_dist=True)
    assert_bit_equal(state["norm"], wcfmt.load_file(sources["mixed"])["norm"])


# -- gloo: 2 and 4 processes --------------------------------------------------------------------
def _shard_box(shape: list[int], mesh_shape: list[int], coord: list[int], placements: list[str]) -> list[slice]:
    """The box of the global tensor a rank holds, from the placements alone: each mesh
    dimension that shards tensor dimension d splits the box so far as torch.chunk does
    (ceil-sized pieces, the last ones possibly empty)."""
    box = [slice(0, n) for n in shape]
    for mesh_dim, p in enumerate(placements):
        if p == "R":
            continue
        d = int(p[1:])
        lo, hi = box[d].start, box[d].stop
        size = math.ceil((hi - lo) / mesh_shape[mesh_dim])
        start = min(lo + coord[mesh_dim] * size, hi)
        box[d] = slice(start, min(start + size, hi))
    return box


#: case -> (mesh shape, placements as strings: "S<dim>" or "R"); a shard dimension a tensor
#: lacks becomes "R" for that tensor.
CASES = {
    2: {"shard0": ([2], ["S0"]), "shard1": ([2], ["S1"]), "replicate": ([2], ["R"])},
    4: {
        "shard0": ([4], ["S0"]),
        "shard1": ([4], ["S1"]),
        "replicate": ([4], ["R"]),
        "2d": ([2, 2], ["S0", "S1"]),
        "hsdp": ([2, 2], ["R", "S0"]),
    },
}


def _placements_for(ndim: int, placements: list[str]) -> list[str]:
    return [p if p == "R" or int(p[1:]) < ndim else "R" for p in placements]


def _worker(rank: int, world: int, init_file: str, sources: dict[str, str], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import full as dtensor_full

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        report: dict[str, Any] = {}
        meshes: dict[tuple[int, ...], Any] = {}
        for which, src in sources.items():
            want = _expected(Path(src))
            for case, (mesh_shape, placements) in CASES[world].items():
                key = tuple(mesh_shape)
                if key not in meshes:
                    meshes[key] = init_device_mesh("cpu", key, mesh_dim_names=tuple(f"d{i}" for i in range(len(key))))
                mesh = meshes[key]
                coord = mesh.get_coordinate()
                state = {}
                for name, t in want.items():
                    ps = _placements_for(t.dim(), placements)
                    objs = [Replicate() if p == "R" else Shard(int(p[1:])) for p in ps]
                    fill = -7 if not t.is_floating_point() else 7.25
                    state[name] = dtensor_full(t.shape, fill, dtype=t.dtype, device_mesh=mesh, placements=objs)
                with WclustReader(src) as reader:
                    dcp.load(state, storage_reader=reader)
                    stats = reader.stats
                for name, t in want.items():
                    box = _shard_box(list(t.shape), mesh_shape, coord, _placements_for(t.dim(), placements))
                    local = state[name].to_local()
                    try:
                        assert_bit_equal(local, t[tuple(box)])
                    except AssertionError as e:
                        raise AssertionError(f"rank {rank} {which} {case} {name}: {e}") from None
                report[f"{which}/{case}"] = {
                    "coord": coord,
                    "chunks": [[r.file, r.tensor, r.chunk] for r in stats.chunks],
                    "label_bytes": stats.label_bytes,
                }
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and reported: skip the interpreter's teardown, which took 2-10 s per process on this
    # busy 2-core machine (measured) and checks nothing.
    sys.stdout.flush()
    os._exit(0)


def _spawn(world: int, sources: dict[str, Path], tmp_path: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as tmp

    args = (world, str(tmp_path / "init"), {k: str(v) for k, v in sources.items()}, str(tmp_path))
    ctx = tmp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=max(0.5, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} gloo processes did not finish in {SPAWN_TIMEOUT_S} s")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _needed(source: Path, world: int, case: str, coord: list[int]) -> set[tuple[str, str, int]]:
    """The row chunks a rank must decode: those overlapping the rows of its (non-empty) box of
    each tensor, an alias's under its target's name."""
    mesh_shape, placements = CASES[world][case]
    out = set()
    for f in _files(source):
        with FileReader(f) as r:
            for name in r.header.tensors:
                target, e = r.resolve(name)
                box = _shard_box(list(e.shape), mesh_shape, coord, _placements_for(len(e.shape), placements))
                rows, row_size = rows_and_row_size(e.shape)
                if rows * row_size == 0 or any(b.stop <= b.start for b in box):
                    continue
                lo, hi = (box[0].start, box[0].stop) if box else (0, 1)
                ranges = chunk_row_ranges(rows, e.chunk_rows)
                out |= {(f.name, target, i) for i, (a, b) in enumerate(ranges) if a < hi and b > lo}
    return out


def _clustered_tensors(source: Path) -> dict[tuple[str, str], ClusteredEntry]:
    out = {}
    for f in _files(source):
        with FileReader(f) as r:
            for name, e in r.header.tensors.items():
                if isinstance(e, ClusteredEntry):
                    out[(f.name, name)] = e
    return out


def _label_bytes(e: ClusteredEntry, i: int) -> int:
    rows, row_size = rows_and_row_size(e.shape)
    a, b = chunk_row_ranges(rows, e.chunk_rows)[i]
    return packed_size((b - a) * row_size, e.chunks[i].label_bits)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_every_placement(sources: dict[str, Path], tmp_path: Path, world: int) -> None:
    """DTensor state dicts of every placement (Shard(0), Shard(1), Replicate; on 4 ranks also
    a 2x2 mesh with [Shard(0), Shard(1)] and HSDP's [Replicate, Shard(0)]) load bit-equal to
    the matching slices of load_file (checked in the workers). From each rank's counts: every
    rank decodes exactly the row chunks its rows overlap, each once (a Shard(1) or Replicate
    rank all of them, a rank with an empty shard none); a Shard(0) rank's clustered label bytes
    are at most its share plus two chunks per tensor (one at each end), and all ranks' together
    at most the tensors' plus one chunk per tensor per boundary between ranks."""
    reports = _spawn(world, sources, tmp_path)
    for which, src in sources.items():
        for case in CASES[world]:
            for rank, rep in enumerate(reports):
                got = rep[f"{which}/{case}"]
                decoded = [tuple(c) for c in got["chunks"]]
                assert len(decoded) == len(set(decoded)), (which, case, rank, "a chunk decoded twice")
                assert set(decoded) == _needed(src, world, case, got["coord"]), (which, case, rank)
        clustered = _clustered_tensors(src)
        total = 0
        for rank, rep in enumerate(reports):
            bound = 0.0
            for e in clustered.values():
                rows, _ = rows_and_row_size(e.shape)
                size = math.ceil(rows / world)
                lo, hi = min(rank * size, rows), min(rank * size + size, rows)
                labels = [_label_bytes(e, i) for i in range(len(e.chunks))]
                bound += sum(labels) * (hi - lo) / rows + 2 * max(labels)
            got = rep[f"{which}/shard0"]["label_bytes"]
            assert got <= bound, (which, rank, got, bound)
            total += got
        whole = sum(_label_bytes(e, i) for e in clustered.values() for i in range(len(e.chunks)))
        one_chunk = sum(max(_label_bytes(e, i) for i in range(len(e.chunks))) for e in clustered.values())
        assert whole <= total <= whole + (world - 1) * one_chunk, (which, total, whole)


# -- the README's torchrun example ----------------------------------------------------------------
#: README.md shows this script as written (test_readme_shows_the_example_as_tested).
TORCHRUN_EXAMPLE = """\
# torchrun --nproc-per-node 2 load_sharded.py PACKED_FOLDER   (made by `wcfmt pack`)
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM
from wcfmt.distributed import WclustReader

dist.init_process_group("gloo")                     # "nccl" on GPUs, with device "cuda"
mesh = torch.distributed.init_device_mesh("cpu", (dist.get_world_size(),))
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)                   # FSDP2: every parameter a Shard(0) DTensor
fully_shard(model, mesh=mesh)
state = get_model_state_dict(model)                 # this rank's shards
tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()   # stored once, as the embedding
dcp.load({k: v for k, v in state.items() if k not in tied},   # fills the shards in place, decoding
         storage_reader=WclustReader(sys.argv[1]))          # only the row chunks they overlap
set_model_state_dict(model, state)
"""

#: Run after the example: every parameter, gathered, equals load_state_dict's tensor (a tied head
#: the embedding), and the sharded model's logits equal from_pretrained's.
EXAMPLE_CHECK = """
import wcfmt
want = wcfmt.load_state_dict(sys.argv[1])
for name, p in model.state_dict().items():
    key = "model.embed_tokens.weight" if name in tied else name
    assert torch.equal(p.full_tensor(), want[key]), name
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad():
    assert torch.equal(model(ids).logits, wcfmt.from_pretrained(sys.argv[1])(ids).logits)
print(f"rank {dist.get_rank()} ok")
dist.destroy_process_group()
"""


def test_torchrun_example(tmp_path: Path) -> None:
    """The README's example under torchrun (2 processes, FSDP2 on gloo), on a tiny Llama with a
    tied LM head packed by wcfmt.pack."""
    pytest.importorskip("transformers")
    src = write_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, tie=True)
    wcfmt.pack(src, tmp_path / "packed", k=16, calib="none")
    script = tmp_path / "load_sharded.py"
    script.write_text(TORCHRUN_EXAMPLE + EXAMPLE_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path / "packed")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    # the two processes share one stdout: a line of one can land inside the other's ("rank 1 okrank 0 ok")
    assert sorted(re.findall(r"rank \d+ ok", run.stdout)) == ["rank 0 ok", "rank 1 ok"]


def test_readme_shows_the_example_as_tested() -> None:
    """Once README.md shows a torchrun example of WclustReader, it is TORCHRUN_EXAMPLE exactly."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
              if "wcfmt.distributed import WclustReader" in b and "torchrun" in b]  # fmt: skip
    assert blocks in ([], [TORCHRUN_EXAMPLE])
