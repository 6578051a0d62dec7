"""`WclustWriter` (spec §3, §9.2): layout, determinism, atomicity, argument checks."""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path

import pytest
import torch

from common import PREAMBLE, heavy_tailed, random_clustered, small_tensors, split, write_small
from wcfmt import ClusteredTensor, OutputExistsError, UsageError, load_file, save_file
from wcfmt.constants import ALIGNMENT, MAGIC, PREAMBLE_SIZE, VERSION_MAJOR, VERSION_MINOR
from wcfmt.schema import PackSettings
from wcfmt.writer import WclustWriter, pack_preamble


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- layout -----------------------------------------------------------------------------------
def test_preamble_bytes() -> None:
    pre = pack_preamble(128, 300, 0xDEADBEEF)
    assert len(pre) == PREAMBLE_SIZE == 64
    assert pre[:8] == MAGIC == b"\x89WCLUST\n"
    assert pre[8:12] == bytes([VERSION_MAJOR, 0, VERSION_MINOR, 0])
    assert pre[12:16] == bytes(4)
    assert pre[16:24] == (128).to_bytes(8, "little")
    assert pre[24:32] == (300).to_bytes(8, "little")
    assert pre[32:36] == (0xDEADBEEF).to_bytes(4, "little")
    assert pre[36:] == bytes(28)


def test_layout(tmp_path: Path) -> None:
    path = write_small(tmp_path)
    raw = path.read_bytes()
    _, major, minor, flags, off, length, crc, reserved = PREAMBLE.unpack(raw[:64])
    assert (major, minor, flags, reserved) == (VERSION_MAJOR, VERSION_MINOR, 0, bytes(28))
    assert off % ALIGNMENT == 0 and off + length == len(raw)
    header_raw = raw[off:]
    assert zlib.crc32(header_raw) == crc
    header = json.loads(header_raw)
    # compact JSON, keys in model order
    assert header_raw == json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(header) == ["producer", "metadata", "tensors"]
    assert header["producer"].startswith("wcfmt ")
    assert list(header["tensors"]) == list(small_tensors())
    # every blob aligned, in file order, inside the data section; the gaps are zero
    spans = []
    for e in header["tensors"].values():
        for c in e.get("chunks", []):
            for b in c.get("planes", []) + [c[k] for k in ("centroids", "labels") if k in c]:
                assert b["offset"] % ALIGNMENT == 0
                assert b["crc32"] == zlib.crc32(raw[b["offset"] : b["offset"] + b["length"]])
                spans.append((b["offset"], b["offset"] + b["length"]))
    spans.sort()
    assert spans[0][0] == PREAMBLE_SIZE
    covered = bytearray(off)
    for a, b in spans:
        assert all(x == 0 for x in covered[a:b]), "blobs overlap"
        covered[a:b] = b"\x01" * (b - a)
    assert spans[-1][1] <= off
    gaps = bytes(raw[i] for i in range(PREAMBLE_SIZE, off) if not covered[i])
    assert gaps == bytes(len(gaps))


def test_alias_has_no_blobs(tmp_path: Path) -> None:
    header = split(write_small(tmp_path)).header
    assert header["tensors"]["head"] == {"dtype": "BF16", "shape": [6, 8], "codec": "alias", "target": "emb"}


def test_clustered_entry_fields(tmp_path: Path) -> None:
    ct = random_clustered((5, 16), [3, 17], 3)
    ct = ClusteredTensor(ct.labels, ct.centroids, 3, dtype=torch.float16, quality={"rel_err": 0.25})
    path = tmp_path / "c.wclust"
    save_file({"c": ct}, path)
    e = split(path).header["tensors"]["c"]
    assert (e["dtype"], e["shape"], e["codec"], e["chunk_rows"]) == ("F16", [5, 16], "clustered", 3)
    assert [(c["k"], c["label_bits"], c["centroids"]["length"]) for c in e["chunks"]] == [(3, 2, 6), (17, 8, 34)]
    assert e["quality"] == {"rel_err": 0.25}


def test_blobs_are_streamed_before_close(tmp_path: Path) -> None:
    path = tmp_path / "s.wclust"
    with WclustWriter(path) as w:
        w.add("a", heavy_tailed((256, 256)))  # 128 KiB, 85 KiB stored: more than any write buffer
        temp = [p for p in tmp_path.iterdir()]
        assert len(temp) == 1 and temp[0].name.startswith(".s.wclust.") and temp[0].name.endswith(".tmp")
        assert temp[0].stat().st_size > 64 * 1024  # the data is already on disk
        assert not path.exists()
    assert _files(tmp_path) == ["s.wclust"]


# -- determinism ------------------------------------------------------------------------------
def test_same_inputs_give_identical_bytes(tmp_path: Path) -> None:
    a = write_small(tmp_path, "a.wclust", metadata={"x": "y"})
    b = write_small(tmp_path, "b.wclust", metadata={"x": "y"})
    assert a.read_bytes() == b.read_bytes()


def test_thread_count_does_not_change_bytes(tmp_path: Path) -> None:
    tensors = {"c": random_clustered((40, 8), 16, 3, seed=5), "t": heavy_tailed((12, 5))}
    outs = []
    for threads in (1, 2, 4):
        p = tmp_path / f"t{threads}.wclust"
        save_file(tensors, p, threads=threads)
        outs.append(p.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_level_changes_bytes_not_data(tmp_path: Path) -> None:
    tensors = {"c": heavy_tailed((64, 64), seed=5)}
    save_file(tensors, tmp_path / "d.wclust")
    save_file(tensors, tmp_path / "l.wclust", level=19)
    d, l19 = (tmp_path / "d.wclust").read_bytes(), (tmp_path / "l.wclust").read_bytes()
    assert d != l19
    assert torch.equal(load_file(tmp_path / "d.wclust")["c"], load_file(tmp_path / "l.wclust")["c"])


# -- atomicity --------------------------------------------------------------------------------
def test_bad_value_midway_leaves_nothing(tmp_path: Path) -> None:
    tensors = {"a": heavy_tailed((32, 32)), "b": torch.ones(3), "bad": [1, 2, 3], "c": torch.ones(2)}
    with pytest.raises(UsageError, match="'bad'.*list"):
        save_file(tensors, tmp_path / "m.wclust")  # type: ignore[arg-type]
    assert _files(tmp_path) == []


def test_bad_value_midway_keeps_existing_destination(tmp_path: Path) -> None:
    path = write_small(tmp_path, "m.wclust")
    before = path.read_bytes()
    with pytest.raises(UsageError):
        save_file({"a": torch.ones(3), "bad": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["m.wclust"]


def test_exception_in_with_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with WclustWriter(tmp_path / "m.wclust") as w:
            w.add("a", torch.ones(4))
            raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_failure_during_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_file({"a": torch.ones(4)}, tmp_path / "m.wclust")
    assert _files(tmp_path) == []


def test_abort_discards(tmp_path: Path) -> None:
    w = WclustWriter(tmp_path / "m.wclust")
    w.add("a", torch.ones(4))
    w.abort()
    assert _files(tmp_path) == []
    with pytest.raises(UsageError, match="closed"):
        w.add("b", torch.ones(4))


def test_existing_destination_refused_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.wclust"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="m.wclust"):
        WclustWriter(path)
    with pytest.raises(FileExistsError):
        WclustWriter(path)
    assert path.read_bytes() == b"precious"
    assert _files(tmp_path) == ["m.wclust"]
    with WclustWriter(path, overwrite=True) as w:
        w.add("a", torch.ones(2))
    assert list(load_file(path)) == ["a"]


def test_save_file_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "m.wclust"
    path.write_bytes(b"old")
    save_file({"a": torch.ones(2)}, path)
    assert list(load_file(path)) == ["a"]


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_small(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# -- argument checks ---------------------------------------------------------------------------
def test_duplicate_names_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'a'.*twice"):
        with WclustWriter(tmp_path / "m.wclust") as w:
            w.add("a", torch.ones(2))
            w.add("a", torch.zeros(2))
    assert _files(tmp_path) == []
    with pytest.raises(UsageError, match="twice"):
        with WclustWriter(tmp_path / "m.wclust") as w:
            w.add("a", torch.ones(2))
            w.add("b", torch.ones(2))
            w.add_alias("b", "a")


@pytest.mark.parametrize("target", ["missing", "alias"])
def test_alias_target_must_be_a_written_tensor(tmp_path: Path, target: str) -> None:
    with pytest.raises(UsageError, match="alias target"):
        with WclustWriter(tmp_path / "m.wclust") as w:
            w.add("a", torch.ones(2))
            w.add_alias("alias", "a")
            w.add_alias("x", target)


@pytest.mark.parametrize("name", ["", 3, None])
def test_bad_names_rejected(tmp_path: Path, name: object) -> None:
    with pytest.raises(UsageError, match="name"):
        with WclustWriter(tmp_path / "m.wclust") as w:
            w.add(name, torch.ones(2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        torch.ones(2, dtype=torch.complex64),
        torch.ones(2).to_sparse(),
        torch.ones(2).numpy(),
        1.5,
    ],
    ids=["complex", "sparse", "numpy", "float"],
)
def test_bad_values_rejected(tmp_path: Path, value: object) -> None:
    with pytest.raises(UsageError):
        save_file({"v": value}, tmp_path / "m.wclust")  # type: ignore[dict-item]
    assert _files(tmp_path) == []


@pytest.mark.parametrize("metadata", [{"a": 1}, {1: "a"}, {"a": None}, ["a"], {"a": b"b"}])
def test_metadata_must_be_str_to_str(tmp_path: Path, metadata: object) -> None:
    with pytest.raises(UsageError, match="metadata"):
        save_file({"a": torch.ones(1)}, tmp_path / "m.wclust", metadata=metadata)  # type: ignore[arg-type]
    assert _files(tmp_path) == []


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        WclustWriter(tmp_path / "nope" / "m.wclust")


def test_tensors_must_be_a_dict(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="dict"):
        save_file([("a", torch.ones(1))], tmp_path / "m.wclust")  # type: ignore[arg-type]


def test_close_is_idempotent_and_settings_recorded(tmp_path: Path) -> None:
    settings = PackSettings(k=16, chunk_rows=64, method="ckmeans", extra={"note": "x"})
    w = WclustWriter(tmp_path / "m.wclust", settings=settings)
    w.add("a", torch.ones(2))
    w.close()
    w.close()
    assert split(tmp_path / "m.wclust").header["settings"] == {
        "k": 16, "chunk_rows": 64, "method": "ckmeans", "extra": {"note": "x"}
    }
    with pytest.raises(UsageError, match="closed"):
        w.add("b", torch.ones(2))
