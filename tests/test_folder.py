"""`wcfmt.io` (folders, indexes, shard plans, safetensors streaming) against the tools they mimic:
huggingface_hub's sharding and size parsing, safetensors' own bytes and header checks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int

import wcfmt
from common import assert_bit_equal, heavy_tailed
from wcfmt import FormatError, OutputExistsError, UsageError
from wcfmt.constants import INDEX_NAME
from wcfmt.dtypes import DTYPES, to_numpy, torch_dtype
from wcfmt.io import (
    SafetensorsSource,
    SafetensorsStreamWriter,
    find_safetensors_shards,
    find_wclust_shards,
    format_size,
    load_state_dict,
    parse_size,
    plan_shards,
    read_index,
    read_safetensors_header,
    shard_file_name,
    write_index,
)
from wcfmt.io.folder import building_folder, check_output, other_files


# -- sizes and shard plans --------------------------------------------------------------------
@pytest.mark.parametrize("text", ["5GB", "500MB", "1.5GB", "10KB", "2TB", " 3 mb ", "0.5kb"])
def test_parse_size_matches_huggingface_hub(text: str) -> None:
    assert parse_size(text) == parse_size_to_int(text)


def test_parse_size_plain_and_bad() -> None:
    assert parse_size(123) == 123 and parse_size("123") == 123
    for bad in ["5GiB", "GB", "", "-1GB", "0", 0, True, 1.5, None]:
        with pytest.raises(UsageError):
            parse_size(bad)  # type: ignore[arg-type]


def test_format_size_reads_back() -> None:
    for n in (1, 999, 1_000, 12_345_678, 5 * 10**9):
        assert abs(parse_size(format_size(n).replace(" ", "")) - n) <= n * 0.005


@pytest.mark.parametrize("limit", [1, 100, 250, 1000, 10**6])
def test_plan_shards_matches_huggingface_hub(limit: int) -> None:
    g = np.random.default_rng(limit)
    sd = {f"t{i:02d}": torch.zeros(int(n), dtype=torch.uint8) for i, n in enumerate(g.integers(1, 300, 30))}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    ours = plan_shards(((n, t.numel()) for n, t in sd.items()), limit)
    names = [shard_file_name(i, len(ours)) for i in range(len(ours))]
    assert dict(zip(names, ours, strict=True)) == split.filename_to_tensors


def test_shard_file_names_are_save_pretrained_names() -> None:
    assert shard_file_name(0, 1) == "model.safetensors"
    assert [shard_file_name(i, 3) for i in range(3)] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan_shards([], "5GB") == [[]]


# -- safetensors streaming writer ---------------------------------------------------------------
def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, name in enumerate(sorted(DTYPES)):
        dt = torch_dtype(name)
        raw = torch.randint(0, 256, (3 * 4 * DTYPES[name][0],), dtype=torch.uint8, generator=g)
        t = raw.view(dt) if dt != torch.bool else raw % 2 == 1
        out[f"{'zyx'[i % 3]}{name.lower()}"] = t.reshape(3, -1).clone()
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["é\nname"] = torch.ones(2)
    return out


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"format": "pt", "b": "é", "a": "1"}])
def test_stream_writer_bytes_equal_safetensors_save_file(tmp_path: Path, metadata: dict | None) -> None:
    sd = _every_dtype()
    safetensors.torch.save_file(sd, tmp_path / "ref.safetensors", metadata=metadata)
    specs = {n: (wcfmt.dtypes.name_of(t.dtype), tuple(t.shape)) for n, t in sd.items()}
    with SafetensorsStreamWriter(tmp_path / "ours.safetensors", specs, metadata) as w:
        for n in w.order:  # in pieces, as unpack writes row chunks
            a = to_numpy(sd[n]).reshape(-1)
            for part in np.array_split(a, 3):
                w.write(n, part)
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    if metadata is not None and len(metadata) > 1:
        # safetensors writes metadata keys in HashMap order (it changes from run to run); ours
        # sorts them. Everything else is the same.
        assert _split_safetensors(ours) == _split_safetensors(ref) and len(ours) == len(ref)
    else:
        assert ours == ref


def test_stream_writer_refuses_wrong_use_and_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    with pytest.raises(UsageError, match="out of order"):
        with SafetensorsStreamWriter(p, {"a": ("F32", (2,)), "b": ("F32", (1,))}) as w:
            w.write("b", np.zeros(1, np.float32))
    with pytest.raises(UsageError, match="before all tensor bytes"):
        with SafetensorsStreamWriter(p, {"a": ("F32", (2,))}) as w:
            w.write("a", np.zeros(1, np.float32))
    with pytest.raises(UsageError, match="more than"):
        with SafetensorsStreamWriter(p, {"a": ("F32", (1,))}) as w:
            w.write("a", np.zeros(2, np.float32))
    with pytest.raises(UsageError, match="unsupported dtype"):
        SafetensorsStreamWriter(p, {"a": ("C64", (1,))})
    assert list(tmp_path.iterdir()) == []
    p.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        SafetensorsStreamWriter(p, {})
    with SafetensorsStreamWriter(p, {}, overwrite=True):
        pass
    assert safetensors.torch.load_file(p) == {}


# -- safetensors reading ------------------------------------------------------------------------
def test_source_reads_in_file_order_with_metadata(tmp_path: Path) -> None:
    sd = _every_dtype()
    p = tmp_path / "m.safetensors"
    safetensors.torch.save_file(sd, p, metadata={"format": "pt"})
    with SafetensorsSource(p) as src:
        offsets = [t.start for t in src.tensors.values()]
        assert offsets == sorted(offsets) and set(src.tensors) == set(sd)
        assert src.metadata == {"format": "pt"}
        for n, t in sd.items():
            assert_bit_equal(src.get_tensor(n), t)
            assert src.tensors[n].nbytes == t.numel() * t.element_size()


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "only 0 bytes"),
        (b"\x01\x02", "only 2 bytes"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (_safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "do not match"),
        (_safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "data section"),
        (_safetensors_bytes({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "malformed"),
        (
            _safetensors_bytes(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6),
            "overlap",
        ),  # fmt: skip
        (_safetensors_bytes({"__metadata__": {"a": 1}}, b""), "strings to strings"),
    ],
)
def test_malformed_safetensors_is_a_format_error(tmp_path: Path, payload: bytes, match: str) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(payload)
    with pytest.raises(FormatError, match=match) as e:
        read_safetensors_header(p)
    assert str(p) in str(e.value)


def test_unsupported_dtype_names_the_tensor(tmp_path: Path) -> None:
    p = tmp_path / "c.safetensors"
    p.write_bytes(_safetensors_bytes({"z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(UsageError, match=r"c\.safetensors: tensor 'z': unsupported dtype C64"):
        SafetensorsSource(p)


# -- folders ------------------------------------------------------------------------------------
def _touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_text(n)


def test_find_shards_from_index_or_files(tmp_path: Path) -> None:
    safetensors.torch.save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    assert find_safetensors_shards(tmp_path).files == ["model.safetensors"]
    assert find_safetensors_shards(tmp_path).index is None
    for i in (1, 2):
        safetensors.torch.save_file({f"t{i}": torch.ones(1)}, tmp_path / f"model-0000{i}-of-00002.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "consolidated.safetensors").write_bytes(b"")  # Mistral ships one beside the shards
    wm = {"t2": "model-00002-of-00002.safetensors", "t1": "model-00001-of-00002.safetensors"}
    write_index(tmp_path / "model.safetensors.index.json", 8, wm)
    s = find_safetensors_shards(tmp_path)
    assert s.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert s.weight_map == wm and s.index_metadata == {"total_size": 8}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="not in the folder"):
        find_safetensors_shards(tmp_path)
    with pytest.raises(UsageError, match="no .safetensors"):
        find_safetensors_shards(tmp_path / "sub") if (tmp_path / "sub").mkdir() is None else None


def test_find_wclust_shards(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no .wclust"):
        find_wclust_shards(tmp_path)
    for n in ("b.wclust", "a.wclust"):
        wcfmt.save_file({n: torch.ones(1)}, tmp_path / n)
    assert find_wclust_shards(tmp_path).files == ["a.wclust", "b.wclust"]
    write_index(tmp_path / INDEX_NAME, 8, {"b.wclust": "b.wclust"})
    assert find_wclust_shards(tmp_path).files == ["b.wclust"]


@pytest.mark.parametrize(
    "text, match",
    [("{", "not valid JSON"), ("[]", "weight_map"), ('{"weight_map": {"a": "../x.wclust"}}', "not a file name"),
     ('{"weight_map": {}, "metadata": 3}', "metadata")],
)  # fmt: skip
def test_bad_index_is_a_format_error(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "i.json").write_text(text)
    with pytest.raises(FormatError, match=match):
        read_index(tmp_path / "i.json")


def test_index_written_as_save_pretrained_writes_it(tmp_path: Path) -> None:
    wm = {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}
    write_index(tmp_path / "i.json", 10, wm, {"total_parameters": 5, "total_size": 1})
    text = (tmp_path / "i.json").read_text()
    want = {"metadata": {"total_parameters": 5, "total_size": 10}, "weight_map": wm}
    assert text == json.dumps(want, indent=2, sort_keys=True) + "\n"
    assert read_index(tmp_path / "i.json") == (want["metadata"], wm)


def test_other_files_skips_model_files_and_caches(tmp_path: Path) -> None:
    _touch(tmp_path, "config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json",
           "original/params.json", ".cache/huggingface/x", ".git/HEAD", ".m.wclust.abc.tmp", "README.md")  # fmt: skip
    got = other_files(tmp_path, (".safetensors", ".safetensors.index.json"))
    assert got == ["README.md", "config.json", "tokenizer.json", os.path.join("original", "params.json")]


def test_building_folder_is_all_or_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with building_folder(dst) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with building_folder(dst) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(OutputExistsError):
        with building_folder(dst):
            pass
    with pytest.raises(RuntimeError):
        with building_folder(dst, force=True) as tmp:
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "v1").exists()
    # force replaces only what wcfmt writes: v1 is not in the new output nor a model file -> refused, kept
    with pytest.raises(OutputExistsError, match=r"holds files wcfmt did not write \(v1\)"):
        with building_folder(dst, force=True) as tmp:
            (tmp / "v2").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "v1").read_text() == "1"
    (dst / "old.wclust").write_text("a shard of an earlier pack")
    with building_folder(dst, force=True) as tmp:
        (tmp / "v1").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dst.iterdir()) == ["v1"] and (dst / "v1").read_text() == "2"


def test_foreign_files(tmp_path: Path) -> None:
    from wcfmt.io.folder import foreign_files

    old, new = tmp_path / "old", tmp_path / "new"
    for f in ("model.wclust", "model.wclust.index.json", "README.md", "modeling_wclust.py", "config.json",
              "notes.txt", "sub/keep.md", "sub/tok.json", ".git/HEAD"):  # fmt: skip
        (old / f).parent.mkdir(parents=True, exist_ok=True)
        (old / f).write_text("x")
    for f in ("config.json", "sub/tok.json"):
        (new / f).parent.mkdir(parents=True, exist_ok=True)
        (new / f).write_text("y")
    assert foreign_files(old, new) == [".git/HEAD", "notes.txt", "sub/keep.md"]


def test_check_output_guards_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(UsageError, match="is the source"):
        check_output(src, src, force=True, want_dir=True)
    with pytest.raises(UsageError, match="holds the source"):
        check_output(src, tmp_path, force=True, want_dir=True)
    with pytest.raises(UsageError, match="inside the source"):
        check_output(src, src / "out", force=True, want_dir=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        check_output(src, tmp_path / "f", force=False, want_dir=True)
    with pytest.raises(UsageError, match="is a file"):
        check_output(src, tmp_path / "f", force=True, want_dir=True)
    with pytest.raises(UsageError, match="does not exist"):
        check_output(src, tmp_path / "no" / "out", force=False, want_dir=True)


# -- load_state_dict ----------------------------------------------------------------------------
def test_load_state_dict_file_and_folder(tmp_path: Path) -> None:
    emb = heavy_tailed((8, 4))
    wcfmt.save_file({"emb": emb, "head": emb, "n": torch.arange(3)}, tmp_path / "a.wclust")
    wcfmt.save_file({"w": torch.ones(2, dtype=torch.float16)}, tmp_path / "b.wclust")
    write_index(tmp_path / INDEX_NAME, 0, {"emb": "a.wclust", "head": "a.wclust", "n": "a.wclust", "w": "b.wclust"})
    sd = load_state_dict(tmp_path)
    assert set(sd) == {"emb", "head", "n", "w"} and sd["head"] is sd["emb"]
    assert_bit_equal(sd["emb"], emb)
    sd = load_state_dict(tmp_path, dtype="fp32")
    assert sd["w"].dtype == sd["emb"].dtype == torch.float32 and sd["n"].dtype == torch.int64
    assert sd["head"] is sd["emb"]
    assert set(load_state_dict(tmp_path / "b.wclust")) == {"w"}
    write_index(tmp_path / INDEX_NAME, 0, {"gone": "a.wclust"})
    with pytest.raises(FormatError, match="no shard holds"):
        load_state_dict(tmp_path)
    with pytest.raises(UsageError, match="dtype"):
        load_state_dict(tmp_path / "b.wclust", dtype="int8")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.wclust")


def test_force_swaps_folders_in_one_step_where_the_system_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wcfmt.io.folder as folder
    from wcfmt.io.folder import building_folder, exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not exchange_paths(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system")
    assert (a / "y").read_text() == "from b" and (b / "x").read_text() == "from a"
    with pytest.raises(FileNotFoundError):  # a missing path is an error, not a silent fallback
        exchange_paths(tmp_path / "nope", a)
    # --force uses it: the old folder is never missing, so os.replace of a folder is not called
    dst = tmp_path / "out"
    with building_folder(dst) as tmp:
        (tmp / "model.wclust").write_text("1")
    moves: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(folder.os, "replace", lambda s, d: (moves.append((str(s), str(d))), real(s, d))[1])
    with building_folder(dst, force=True) as tmp:
        (tmp / "model.wclust").write_text("2")
    assert moves == [] and (dst / "model.wclust").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # the old folder is gone
