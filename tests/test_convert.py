"""`wcfmt.convert.pack` / `unpack` on a real (tiny) Hugging Face Llama folder and on single files.

The folder is what ``save_pretrained`` writes (config, generation config, three bf16 shards and
their index) plus tokenizer files and a subfolder; round trips are checked bit for bit against
the source (lossless tensors) and against `wcfmt.load_file` (clustered ones), and the result is
loaded into ``LlamaForCausalLM`` with ``strict=True``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch

import wcfmt
from common import assert_bit_equal, heavy_tailed
from wcfmt import FormatError, OutputExistsError, UsageError
from wcfmt.constants import INDEX_NAME
from wcfmt.convert import PackReport, UnpackReport, pack, unpack
from wcfmt.io import SafetensorsSource, load_state_dict, read_index
from wcfmt.reader import WclustReader
from wcfmt.schema import AliasEntry, ClusteredEntry, LosslessEntry

transformers = pytest.importorskip("transformers")

SHARD_SIZE = "70KB"  # gives three shards of the model below


def tiny_llama_config():  # type: ignore[no-untyped-def]
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip


def make_hf_folder(folder: Path) -> Path:
    """A tiny Llama saved by ``save_pretrained`` in three bf16 shards, plus tokenizer files."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    with torch.no_grad():  # heavy-tailed weights, like a trained model's
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(heavy_tailed(tuple(p.shape), torch.bfloat16, seed=len(name)))
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (folder / "README.md").write_text("# tiny llama\n")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}")
    assert len(list(folder.glob("model-*.safetensors"))) == 3, sorted(p.name for p in folder.iterdir())
    return folder


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(p))
    return out


def check_model_loads(sd: dict[str, torch.Tensor]) -> None:
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        logits = model(torch.arange(8).reshape(1, 8)).logits
    assert logits.shape == (1, 8, 128) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def packed(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PackReport, dict[str, str]]:
    before = tree_hash(hf)
    dst = tmp_path_factory.mktemp("packed") / "tiny-llama-wclust"
    report = pack(hf, dst)
    return dst, report, before


# -- pack a folder ------------------------------------------------------------------------------
def test_pack_folder_layout(hf: Path, packed: tuple[Path, PackReport, dict[str, str]]) -> None:
    dst, report, before = packed
    assert tree_hash(hf) == before, "the source changed"
    src_shards = sorted(p.stem for p in hf.glob("model-*.safetensors"))
    assert sorted(p.stem for p in dst.glob("*.wclust")) == src_shards
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "original/params.json"):  # fmt: skip
        assert (dst / name).read_bytes() == (hf / name).read_bytes(), name
    card = (dst / "README.md").read_text()  # the model card (tests/test_card.py), source text kept below ours
    assert card.startswith("---\n") and card.rstrip().endswith("# tiny llama")
    assert not list(dst.glob("*.safetensors*"))
    assert sorted(report.copied) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
         "original/params.json"]
    )  # fmt: skip
    assert [p.name for p in dst.parent.iterdir()] == [dst.name], "temporary folders left behind"


def test_pack_folder_index(hf: Path, packed: tuple[Path, PackReport, dict[str, str]]) -> None:
    dst, _, _ = packed
    src_meta, src_map = read_index(hf / "model.safetensors.index.json")
    meta, wm = read_index(dst / INDEX_NAME)
    assert wm == {n: f.replace(".safetensors", ".wclust") for n, f in src_map.items()}
    assert meta["total_size"] == src_meta["total_size"]
    assert meta == src_meta  # other keys (total_parameters) carried over
    for f in set(wm.values()):
        with WclustReader(dst / f) as r:
            assert sorted(r.keys()) == sorted(n for n, g in wm.items() if g == f)


def test_pack_records_settings_and_metadata(packed: tuple[Path, PackReport, dict[str, str]]) -> None:
    dst, report, _ = packed
    codecs = set()
    for p in sorted(dst.glob("*.wclust")):
        with WclustReader(p) as r:
            assert r.metadata() == {"format": "pt"}
            st = r.header.settings
            assert st is not None and st.k is None  # default: the bit-budget encoder, no K
            assert st.chunk_rows is None  # one codebook per matrix
            assert st.method == "ecsq"
            # a causal-LM folder and transformers: columns weighted by random tokens, at their default bits
            assert {k: st.extra[k] for k in ("storage_chunk_rows", "bits", "embeddings", "calib")} == {
                "storage_chunk_rows": "256", "bits": "5.43", "embeddings": "clustered", "calib": "diagonal+refit"}
            assert st.extra["calib_text"] == "random (8x64 tokens, seed 0)"
            assert float(st.extra["lambda"]) > 0 and float(st.extra["step"]) > 0
            codecs |= {e.codec for e in r.header.tensors.values()}
    assert codecs == {"clustered", "lossless"}
    assert report.clustered > 0 and report.lossless > 0 and report.tensors == report.clustered + report.lossless
    assert 0 < report.ratio < 1 and report.output_bytes == sum(p.stat().st_size for p in dst.glob("*.wclust"))
    assert "ratio" in report.summary()


def test_packed_folder_loads_into_llama(packed: tuple[Path, PackReport, dict[str, str]]) -> None:
    check_model_loads(load_state_dict(packed[0]))


def test_pack_folder_clusters_what_the_policy_says(hf: Path, packed: tuple[Path, PackReport, dict[str, str]]) -> None:
    from wcfmt.cluster import ClusterPolicy

    policy = ClusterPolicy(bits=6.0, embeddings=True)  # pack's default: bits mode, embeddings clustered
    dst, _, _ = packed
    src = source_tensors(hf)
    for p in sorted(dst.glob("*.wclust")):
        with WclustReader(p) as r:
            for name, e in r.header.tensors.items():
                want = policy.clusters(name, tuple(src[name].shape), "BF16")
                assert isinstance(e, ClusteredEntry if want else (LosslessEntry, AliasEntry)), name
                if want:
                    assert max(c.k for c in e.chunks) <= 256 and e.chunk_rows == src[name].shape[0]


# -- unpack a folder ----------------------------------------------------------------------------
@pytest.mark.parametrize("max_shard_size, files", [("5GB", ["model.safetensors"]), ("100KB", None)])
def test_unpack_folder_round_trip(
    hf: Path, packed: tuple[Path, PackReport, dict[str, str]], tmp_path: Path, max_shard_size: str, files: list | None
) -> None:
    dst, _, _ = packed
    before = tree_hash(dst)
    out = tmp_path / "unpacked"
    report = unpack(dst, out, max_shard_size=max_shard_size)
    assert isinstance(report, UnpackReport) and tree_hash(dst) == before
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if files is not None:
        assert shards == files and not (out / "model.safetensors.index.json").exists()
    else:
        n = len(shards)
        assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        meta, wm = read_index(out / "model.safetensors.index.json")
        assert set(wm.values()) == set(shards)
        assert meta["total_size"] == sum(t.numel() * t.element_size() for t in source_tensors(hf).values())
    for name in ("config.json", "tokenizer.json", "original/params.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    assert not list(out.glob("*.wclust*"))

    src, got, ref = source_tensors(hf), source_tensors(out), load_state_dict(dst)
    assert set(got) == set(src)
    for p in out.glob("*.safetensors"):
        with SafetensorsSource(p) as s:
            assert s.metadata == {"format": "pt"}
    for p in sorted(dst.glob("*.wclust")):
        with WclustReader(p) as r:
            for name, e in r.header.tensors.items():
                assert_bit_equal(got[name], ref[name])  # clustered: what load_file rebuilds
                if isinstance(e, LosslessEntry):
                    assert_bit_equal(got[name], src[name])  # lossless: the original bits
    check_model_loads(got)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_bit_equal(model.state_dict()["lm_head.weight"], got["lm_head.weight"])


def test_unpack_dtype_casts_float_tensors(packed: tuple[Path, PackReport, dict[str, str]], tmp_path: Path) -> None:
    dst, _, _ = packed
    unpack(dst, tmp_path / "f32", dtype="float32")
    got = source_tensors(tmp_path / "f32")
    ref = load_state_dict(dst)
    for name, t in got.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, ref[name].float())


# -- single files -------------------------------------------------------------------------------
def _small_source(path: Path) -> dict[str, torch.Tensor]:
    sd = {
        "model.layers.0.mlp.up_proj.weight": heavy_tailed((96, 64), torch.bfloat16, seed=1),
        "model.layers.0.self_attn.q_proj.weight": heavy_tailed((64, 64), torch.float16, seed=2),
        "model.norm.weight": torch.ones(64, dtype=torch.bfloat16),
        "position_ids": torch.arange(10),
        "mask": torch.tensor([True, False]),
        "scale": torch.tensor(0.5),
    }
    safetensors.torch.save_file(sd, path, metadata={"format": "pt", "note": "é"})
    return sd


def test_pack_unpack_file(tmp_path: Path) -> None:
    sd = _small_source(tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    r = pack(tmp_path / "m.safetensors", tmp_path / "m.wclust", k=8, chunk_rows=32, level=3, threads=1)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert r.tensors == len(sd) and len(r.files) == 1
    with WclustReader(tmp_path / "m.wclust") as rd:
        assert rd.metadata() == {"format": "pt", "note": "é"}
        s = rd.header.settings
        assert (s.k, s.chunk_rows, s.level) == (8, 32, 3)
        for e in rd.header.tensors.values():
            if isinstance(e, ClusteredEntry):
                assert max(c.k for c in e.chunks) <= 8 and e.chunk_rows == 32
    u = unpack(tmp_path / "m.wclust", tmp_path / "back.safetensors")
    assert u.tensors == len(sd)
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    ref = wcfmt.load_file(tmp_path / "m.wclust")
    for n in sd:
        assert_bit_equal(back[n], ref[n])
    for n in ("model.norm.weight", "position_ids", "mask", "scale"):
        assert_bit_equal(back[n], sd[n])
    with SafetensorsSource(tmp_path / "back.safetensors") as s:
        assert s.metadata == {"format": "pt", "note": "é"}


def test_pack_include_exclude(tmp_path: Path) -> None:
    _small_source(tmp_path / "m.safetensors")
    pack(tmp_path / "m.safetensors", tmp_path / "a.wclust", include=[r"^model\.norm"], exclude=["q_proj"])
    pack(tmp_path / "m.safetensors", tmp_path / "b.wclust", exclude=[r"up_proj"])
    with WclustReader(tmp_path / "a.wclust") as a, WclustReader(tmp_path / "b.wclust") as b:
        assert a.entry("model.layers.0.mlp.up_proj.weight").codec == "clustered"  # the default set
        assert a.entry("model.layers.0.self_attn.q_proj.weight").codec == "lossless"  # excluded
        assert a.entry("model.norm.weight").codec == "lossless"  # included, but 1-D: never clustered
        assert b.entry("model.layers.0.mlp.up_proj.weight").codec == "lossless"
        assert b.entry("model.layers.0.self_attn.q_proj.weight").codec == "clustered"
    with pytest.raises(UsageError, match="invalid regex"):
        pack(tmp_path / "m.safetensors", tmp_path / "c.wclust", include=["("])
    with pytest.raises(UsageError, match="k must be"):
        pack(tmp_path / "m.safetensors", tmp_path / "c.wclust", k=300)
    assert not (tmp_path / "c.wclust").exists()


def test_pack_is_deterministic(tmp_path: Path) -> None:
    _small_source(tmp_path / "m.safetensors")
    pack(tmp_path / "m.safetensors", tmp_path / "a.wclust", threads=1)
    pack(tmp_path / "m.safetensors", tmp_path / "b.wclust", threads=2)
    assert (tmp_path / "a.wclust").read_bytes() == (tmp_path / "b.wclust").read_bytes()


def test_unpack_writes_tied_tensors_once(tmp_path: Path) -> None:
    emb = heavy_tailed((16, 8))
    wcfmt.save_file({"embed.weight": emb, "lm_head.weight": emb, "b": torch.ones(2)}, tmp_path / "t.wclust")
    r = unpack(tmp_path / "t.wclust", tmp_path / "t.safetensors")
    assert r.dropped == {"lm_head.weight": "embed.weight"} and "tied" in r.summary()
    back = safetensors.torch.load_file(tmp_path / "t.safetensors")
    assert set(back) == {"embed.weight", "b"}
    assert_bit_equal(back["embed.weight"], emb)


# -- outputs: exists, force, atomic -------------------------------------------------------------
def test_existing_output_and_force(hf: Path, tmp_path: Path) -> None:
    _small_source(tmp_path / "m.safetensors")
    (tmp_path / "m.wclust").write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        pack(tmp_path / "m.safetensors", tmp_path / "m.wclust")
    assert (tmp_path / "m.wclust").read_bytes() == b"old"
    pack(tmp_path / "m.safetensors", tmp_path / "m.wclust", force=True)
    wcfmt.load_file(tmp_path / "m.wclust")
    out = tmp_path / "folder-out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        pack(hf, out, exclude=["."])
    # --force replaces only what wcfmt writes: a user's file in the folder makes it refuse (issue #10)
    with pytest.raises(OutputExistsError, match=r"stale\.txt.*--force replaces only"):
        pack(hf, out, force=True, exclude=["."])
    assert (out / "stale.txt").read_text() == "x"
    (out / "stale.txt").unlink()
    (out / "model-00009-of-00009.wclust").write_bytes(b"an old shard of ours")
    pack(hf, out, force=True, exclude=["."])  # nothing clustered: fast
    assert not (out / "model-00009-of-00009.wclust").exists() and (out / INDEX_NAME).exists()
    with pytest.raises(UsageError, match="is the source"):
        unpack(tmp_path / "m.wclust", tmp_path / "m.wclust", force=True)
    with pytest.raises(UsageError, match="inside the source"):
        pack(hf, hf / "out", force=True)


def test_failure_leaves_no_output(hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wcfmt import writer

    real = writer.WclustWriter.add
    calls = {"n": 0}

    def full_disk(self, name, value):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._out.tmp))
        return real(self, name, value)

    monkeypatch.setattr(writer.WclustWriter, "add", full_disk)
    with pytest.raises(OSError) as e:
        pack(hf, tmp_path / "out", exclude=["."])
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    calls["n"] = 0
    with pytest.raises(OSError):
        pack(hf, tmp_path / "out", exclude=["."], force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep").exists()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pack(tmp_path / "missing.safetensors", tmp_path / "x.wclust")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(FormatError, match="not a safetensors file"):
        pack(tmp_path / "junk.safetensors", tmp_path / "x.wclust")
    (tmp_path / "junk.wclust").write_bytes(b"\x00" * 100)
    with pytest.raises(FormatError, match="not a .wclust file"):
        unpack(tmp_path / "junk.wclust", tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="dtype"):
        unpack(tmp_path / "junk.wclust", tmp_path / "x.safetensors", dtype="int4")
    with pytest.raises(UsageError, match="size"):
        unpack(tmp_path / "junk.wclust", tmp_path / "x.safetensors", max_shard_size="lots")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .safetensors"):
        pack(tmp_path / "empty", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk.safetensors", "junk.wclust"]


# -- memory: one tensor at a time ----------------------------------------------------------------
def test_pack_holds_one_source_tensor_at_a_time(hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = SafetensorsSource.get_tensor
    alive: list[weakref.ref] = []
    most = {"n": 0}

    def tracked(self, name):  # type: ignore[no-untyped-def]
        t = real(self, name)
        alive.append(weakref.ref(t))
        most["n"] = max(most["n"], sum(r() is not None for r in alive))
        return t

    monkeypatch.setattr(SafetensorsSource, "get_tensor", tracked)
    pack(hf, tmp_path / "out", k=16)
    assert len(alive) == len(source_tensors(hf)) and most["n"] == 1
    # bits mode reads each clustered tensor once more first (its histogram, for the allocation)
    alive.clear()
    report = pack(hf, tmp_path / "out2")
    assert len(alive) == len(source_tensors(hf)) + report.clustered and most["n"] == 1


def test_unpack_reads_one_chunk_at_a_time(packed: tuple[Path, PackReport, dict[str, str]], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    calls: list[str] = []
    for meth in ("decode", "decode_rows"):
        monkeypatch.setattr(WclustReader, meth, lambda self, *a, _m=meth: calls.append(_m))
    unpack(packed[0], tmp_path / "out")
    assert calls == [], "unpack decoded a whole tensor instead of chunk by chunk"


def test_single_file_folder_and_unlisted_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sd = _small_source(src / "model.safetensors")
    (src / "config.json").write_text("{}")
    r = pack(src, tmp_path / "out")
    assert r.skipped == [] and r.copied == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["README.md", "config.json", INDEX_NAME, "model.wclust"]  # README.md: the model card
    )
    unpack(tmp_path / "out", tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert set(safetensors.torch.load_file(tmp_path / "back" / "model.safetensors")) == set(sd)
    # With an index, .safetensors files it does not list (Mistral's consolidated.safetensors) are skipped.
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    safetensors.torch.save_file({"x": torch.ones(1)}, src / "consolidated.safetensors")
    from wcfmt.io import write_index

    write_index(src / "model.safetensors.index.json", 0, {n: "model-00001-of-00001.safetensors" for n in sd})
    r = pack(src, tmp_path / "out2")
    assert r.skipped == ["consolidated.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted(
        ["README.md", "config.json", INDEX_NAME, "model-00001-of-00001.wclust"]
    )


@pytest.mark.parametrize("kw", [{"level": 99}, {"level": "3"}, {"threads": 0}, {"chunk_rows": 0}, {"k": 0},
                                {"include": "proj"}])  # fmt: skip
def test_bad_settings_are_usage_errors(tmp_path: Path, kw: dict) -> None:
    _small_source(tmp_path / "m.safetensors")
    with pytest.raises(UsageError):
        pack(tmp_path / "m.safetensors", tmp_path / "x.wclust", **kw)
    assert not (tmp_path / "x.wclust").exists()


def test_pack_in_worker_processes_gives_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clustering in a process pool (used for big inputs) must write the same file as in-process."""
    from wcfmt.packing import encode

    g = torch.Generator().manual_seed(3)
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file(
        {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(96, 64, generator=g).bfloat16()
            for i in range(3)
        }
        | {"model.norm.weight": torch.ones(64)},
        str(src),
    )
    wcfmt.pack(src, tmp_path / "serial.wclust", threads=1)
    monkeypatch.setattr(encode, "PROCESS_POOL_MIN_BYTES", 0)
    report = wcfmt.pack(src, tmp_path / "pool.wclust", threads=2)
    assert report.clustered == 3
    assert (tmp_path / "pool.wclust").read_bytes() == (tmp_path / "serial.wclust").read_bytes()


def test_default_pack_stores_whole_matrix_codebook_in_small_chunks(tmp_path: Path) -> None:
    """One codebook per matrix (the measured-best default), stored in 256-row chunks that repeat
    its table, so loading still decodes chunk by chunk; the weights equal the unchunked clustering."""
    w = heavy_tailed((600, 16))
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src))
    pack(src, tmp_path / "m.wclust")
    with WclustReader(tmp_path / "m.wclust") as r:
        e = r.header.tensors["model.layers.0.mlp.up_proj.weight"]
        assert isinstance(e, ClusteredEntry) and e.chunk_rows == 256 and len(e.chunks) == 3
        tables = {r.read_centroids("model.layers.0.mlp.up_proj.weight", i).tobytes() for i in range(3)}
        assert len(tables) == 1
    whole = wcfmt.cluster_tensor(w, step=e.quality["step"])  # the default encoder at the step pack chose
    assert torch.equal(wcfmt.load_file(tmp_path / "m.wclust")["model.layers.0.mlp.up_proj.weight"], whole.decode())
