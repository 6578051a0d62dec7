"""`WclustReader` never trusts the file (spec §3, §7, §9.1, §10).

Each invalid file is crafted to fail exactly one check (the others, CRCs included, pass), and
each must raise exactly the expected error class with a message naming the file, and the
tensor and chunk where there is one.
"""

from __future__ import annotations

import ast
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import zstandard

from common import (
    PREAMBLE,
    assemble,
    assert_bit_equal,
    blob,
    blob_bytes,
    flip,
    patch_blob,
    random_clustered,
    replace_blob,
    rewrite,
    split,
    write_fresh,
    write_small,
)
from wcfmt import (
    ChecksumError,
    FormatError,
    HeaderError,
    TensorNotFoundError,
    UsageError,
    VersionError,
    WclustError,
    load_file,
    safe_open,
    save_file,
)
from wcfmt.constants import MAX_HEADER_BYTES, PREAMBLE_SIZE
from wcfmt.reader import WclustReader

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_small(tmp_path)


def expect(cls: type[WclustError], path: Path, *fragments: str, load: Callable[[Path], Any] = load_file) -> str:
    """Run ``load(path)``; assert it raises exactly ``cls`` naming the file and ``fragments``."""
    with pytest.raises(WclustError) as info:
        load(path)
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def _set_preamble(path: Path, **fields: int | bytes) -> None:
    raw = bytearray(path.read_bytes())
    names = ["magic", "major", "minor", "flags", "header_offset", "header_length", "header_crc", "reserved"]
    values = dict(zip(names, PREAMBLE.unpack(raw[:64])))
    values.update(fields)
    raw[:64] = PREAMBLE.pack(*(values[n] for n in names))
    write_fresh(path, bytes(raw))


# -- a valid file --------------------------------------------------------------------------------
@pytest.mark.parametrize("use_mmap", [True, False])
def test_valid_file(small: Path, use_mmap: bool) -> None:
    with WclustReader(small, use_mmap=use_mmap) as r:
        assert r.version == (1, 0)
        assert r.keys() == ["clu", "odd", "skew", "emb", "head", "ids", "scale"]
        assert r.metadata() == {}
        assert r.file_size == small.stat().st_size
        r.verify()
        assert r.resolve("head")[0] == "emb"
        with pytest.raises(TensorNotFoundError, match="nope"):
            r.entry("nope")
        with pytest.raises(FormatError, match="chunk 5 does not exist"):
            r.decode_chunk("clu", 5)
        with pytest.raises(FormatError, match="chunk -1 does not exist"):
            r.decode_chunk("clu", -1)
        with pytest.raises(UsageError, match="not clustered"):
            r.read_centroids("emb", 0)


def test_mmap_and_pread_agree(small: Path) -> None:
    with WclustReader(small) as a, WclustReader(small, use_mmap=False) as b:
        for name in a.keys():
            assert a.decode(name).tobytes() == b.decode(name).tobytes()


def test_reader_does_not_import_writer() -> None:
    tree = ast.parse((ROOT / "wcfmt" / "reader.py").read_text())
    imported = [
        (n.module or "") + "." + a.name if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    ]
    assert not [m for m in imported if "writer" in m]


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_not_a_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.wclust"
    if kind == "folder":
        path.mkdir()
    expect(FormatError, path)


# -- preamble (spec §3.1) -----------------------------------------------------------------------
@pytest.mark.parametrize("pos", range(8))
def test_wrong_magic(small: Path, pos: int) -> None:
    flip(small, pos, 0x20)
    expect(FormatError, small, "not a .wclust file")


def test_other_formats_are_not_wclust(tmp_path: Path) -> None:
    from safetensors.torch import save_file as st_save

    path = tmp_path / "m.safetensors"
    st_save({"a": torch.ones(64)}, str(path))
    expect(FormatError, path, "not a .wclust file")


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_other_major_version(small: Path, major: int) -> None:
    _set_preamble(small, major=major)
    expect(VersionError, small, f"{major}.0", "1.x")


def test_newer_minor_reads_unknown_fields(small: Path, tmp_path: Path) -> None:
    """Spec §10: a newer minor may add fields; an older reader ignores them."""
    want = load_file(small)

    def add_fields(h: dict[str, Any]) -> None:
        h["future"] = {"x": 1}
        h["tensors"]["clu"]["future"] = [1]
        h["tensors"]["clu"]["chunks"][1]["labels"]["future"] = "x"
        h["tensors"]["ids"]["chunks"][0]["planes"][3]["future"] = None

    newer = rewrite(small, add_fields, out=tmp_path / "newer.wclust", minor=1)
    got = load_file(newer)
    assert list(got) == list(want)
    for name in want:
        assert_bit_equal(got[name], want[name])
    with safe_open(newer) as f:
        assert f.reader.version == (1, 1)
    same = rewrite(small, add_fields, out=tmp_path / "same.wclust", minor=0)
    expect(HeaderError, same, "future")


def test_newer_minor_unknown_codec_refused_per_tensor(small: Path) -> None:
    def add_codec(h: dict[str, Any]) -> None:
        h["tensors"]["vq"] = {"dtype": "BF16", "shape": [4], "codec": "vq", "codebooks": []}
        h["tensors"]["vq_tied"] = {"dtype": "BF16", "shape": [4], "codec": "alias", "target": "vq"}

    rewrite(small, add_codec, minor=3)
    with safe_open(small) as f:
        assert "vq" in f.keys() and "vq_tied" in f.keys()
        assert f.get_tensor("ids").shape == (8, 10)
        for name in ("vq", "vq_tied"):
            with pytest.raises(VersionError, match="codec 'vq'") as info:
                f.get_tensor(name)
            assert str(small) in str(info.value) and name in str(info.value)
    expect(VersionError, small, "'vq'")
    rewrite(small, minor=0)
    expect(HeaderError, small, "vq")


def test_newer_minor_unknown_encoding_refused_per_tensor(small: Path) -> None:
    rewrite(small, _set("tensors.ids.chunks.0.planes.0.encoding", "brotli"), minor=2)
    with safe_open(small) as f:
        assert f.keys()[-1] == "ids"
        assert f.get_tensor("scale").item() == 0.5
        with pytest.raises(VersionError, match="'ids'.*encoding 'brotli'.*1.2"):
            f.get_tensor("ids")
    rewrite(small, minor=0)
    expect(HeaderError, small, "planes.0.encoding")


@pytest.mark.parametrize("flags", [1, 0x80, 0x80000000])
def test_flags_must_be_zero(small: Path, flags: int) -> None:
    _set_preamble(small, flags=flags)
    expect(FormatError, small, "flags")


@pytest.mark.parametrize("pos", [36, 50, 63])
def test_reserved_must_be_zero(small: Path, pos: int) -> None:
    flip(small, pos, 0x01)
    expect(FormatError, small, "reserved")


@pytest.mark.parametrize("offset", [0, 32, 63, 65, 1000, 2**63])
def test_header_offset_must_be_aligned_after_preamble(small: Path, offset: int) -> None:
    _set_preamble(small, header_offset=offset)
    expect(FormatError, small)


def test_header_offset_pointing_elsewhere(small: Path) -> None:
    """An aligned offset that is not where the header starts fails the size rule."""
    p = split(small)
    _set_preamble(small, header_offset=p.header_offset - 64)
    expect(FormatError, small, "trailing")


CUTS = {
    "empty": lambda h, n, size: 0,
    "magic": lambda h, n, size: 5,
    "preamble": lambda h, n, size: 35,
    "preamble-1": lambda h, n, size: 63,
    "preamble_only": lambda h, n, size: 64,
    "first_blob": lambda h, n, size: 65,
    "data": lambda h, n, size: (64 + h) // 2,
    "header-1": lambda h, n, size: h - 1,
    "no_header": lambda h, n, size: h,
    "header+1": lambda h, n, size: h + 1,
    "mid_header": lambda h, n, size: h + n // 2,
    "last_byte": lambda h, n, size: size - 1,
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncation(small: Path, cut: str) -> None:
    raw = small.read_bytes()
    p = split(small)
    write_fresh(small, raw[: CUTS[cut](p.header_offset, p.header_length, len(raw))])
    if cut == "empty":  # no magic at all: issue #10 reports it as not a .wclust file
        msg = expect(FormatError, small)
        assert "truncated" in msg or "not a .wclust file" in msg, msg
    else:
        expect(FormatError, small, "truncated")


@pytest.mark.parametrize("extra", [b"\x00", bytes(64), b"garbage" * 100])
def test_trailing_bytes(small: Path, extra: bytes) -> None:
    with open(small, "ab") as f:
        f.write(extra)
    expect(FormatError, small, "trailing")


def test_header_length_cap_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header of MAX_HEADER_BYTES + 1 is refused before any of it is read; the file is sparse
    so that every other preamble rule holds."""
    path = tmp_path / "huge.wclust"
    length = MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(PREAMBLE.pack(b"\x89WCLUST\n", 1, 0, 0, 64, length, 0, bytes(28)))
        f.truncate(64 + length)
    reads: list[int] = []
    real = os.pread

    def spy(fd: int, n: int, off: int) -> bytes:
        reads.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", spy)
    expect(FormatError, path, "exceeds", str(MAX_HEADER_BYTES))
    assert max(reads) <= PREAMBLE_SIZE


@pytest.mark.parametrize("length", [2**64 - 1, MAX_HEADER_BYTES + 1])
def test_header_length_cap_on_small_file(small: Path, length: int) -> None:
    _set_preamble(small, header_length=length)
    expect(FormatError, small, "exceeds")


# -- header (spec §3.3, §4) ---------------------------------------------------------------------
def test_header_crc_mismatch(small: Path) -> None:
    p = split(small)
    flip(small, p.header_offset + 10, 0x01)
    expect(ChecksumError, small, "header checksum")


def test_header_crc_field_mismatch(small: Path) -> None:
    p = split(small)
    _set_preamble(small, header_crc=p.header_crc ^ 1)
    expect(ChecksumError, small, "header checksum", f"0x{p.header_crc ^ 1:08x}", f"0x{p.header_crc:08x}")


def test_header_crc_checked_before_parsing(small: Path) -> None:
    p = split(small)
    assemble(small, p.data, b"{not json", header_crc=0)
    expect(ChecksumError, small)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"producer":"x","tensors":{}', "JSON"),
        (b'{"producer":"x","producer":"y","tensors":{}}', "duplicate"),
        (b'{"producer":"x","tensors":{},"settings":{"level":NaN}}', "NaN"),
        (b'{"producer":"x","tensors":{},"settings":{"level":-Infinity}}', "Infinity"),
        (b"[" * 50_000 + b"]" * 50_000, "JSON"),
        (b"[]", "invalid header"),
    ],
)
def test_bad_header_bytes(small: Path, raw: bytes, fragment: str) -> None:
    assemble(small, split(small).data, raw)
    expect(HeaderError, small, fragment)


def test_duplicate_tensor_name(small: Path) -> None:
    p = split(small)
    text = json.dumps(p.header, separators=(",", ":"))
    entry = json.dumps(p.header["tensors"]["scale"], separators=(",", ":"))
    text = text.replace('"tensors":{', '"tensors":{"scale":' + entry + ",", 1)
    assemble(small, p.data, text.encode())
    expect(HeaderError, small, "duplicate", "scale")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def mutate(h: dict[str, Any]) -> None:
        node: Any = h
        for k in keys[:-1]:
            node = node[k]
        if value is ...:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


SCHEMA_VIOLATIONS = [
    ("tensors.clu.chunks.0.label_bits", 4, "label_bits"),
    ("tensors.clu.chunks.1.label_bits", 4, "label_bits"),
    ("tensors.clu.chunks.0.k", 5, "label_bits"),
    ("tensors.clu.chunks.0.centroids.length", 8, "centroids"),
    ("tensors.clu.chunk_rows", 2, "chunks"),
    ("tensors.clu.chunks", [], "chunks"),
    ("tensors.clu.dtype", "F64", "cannot be clustered"),
    ("tensors.emb.dtype", "F24", "dtype"),
    ("tensors.emb.chunks.0.planes", [], "planes"),
    ("tensors.head.target", "missing", "alias target"),
    ("tensors.head.shape", [8, 6], "alias"),
    ("tensors.ids.transform", "float_planes", "float_planes"),
    ("tensors.ids.chunks.0.planes.0.encoding", "lz4", "encoding"),
    ("tensors.ids.chunks.0.planes.0.offset", 100, "multiple of 64"),
    ("tensors.scale.shape", [1] * 9, "shape"),
    ("tensors.scale.codec", ..., "codec"),
    ("producer", ..., "producer"),
    ("metadata", {"a": 1}, "metadata"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), SCHEMA_VIOLATIONS, ids=[v[0] for v in SCHEMA_VIOLATIONS])
def test_schema_violation(small: Path, path: str, value: Any, fragment: str) -> None:
    rewrite(small, _set(path, value))
    expect(HeaderError, small, "invalid header", fragment)


# -- blob ranges (spec §3.2) ---------------------------------------------------------------------
def test_blob_past_data_section(small: Path) -> None:
    p = split(small)
    rewrite(small, _set("tensors.ids.chunks.0.planes.1.offset", p.header_offset))
    expect(FormatError, small, "tensor 'ids'", "chunk 0 plane 1", "outside the data section")


def test_blob_running_into_header(small: Path) -> None:
    p = split(small)
    last = blob(p.header, "scale", 0, "plane 3")
    assert last["offset"] + last["length"] <= p.header_offset
    rewrite(small, _set("tensors.scale.chunks.0.planes.3.length", p.header_offset - last["offset"] + 1))
    expect(FormatError, small, "tensor 'scale'", "outside the data section")


def test_blob_far_beyond_file(small: Path) -> None:
    rewrite(small, _set("tensors.clu.chunks.1.labels.offset", 2**62))
    expect(FormatError, small, "tensor 'clu'", "chunk 1 labels", "outside")


def test_blob_inside_preamble(small: Path) -> None:
    rewrite(small, _set("tensors.clu.chunks.0.centroids.offset", 0))
    expect(FormatError, small, "tensor 'clu'", "chunk 0 centroids", "outside")


def test_overlapping_blobs(small: Path) -> None:
    def overlap(h: dict[str, Any]) -> None:
        h["tensors"]["emb"]["chunks"][0]["planes"][1]["offset"] = h["tensors"]["emb"]["chunks"][0]["planes"][0]["offset"]

    rewrite(small, overlap)
    expect(FormatError, small, "overlap", "'emb'")


def test_partly_overlapping_blobs(small: Path) -> None:
    """A long blob reaching into the next one, which it does not share a start with."""
    rewrite(small, _set("tensors.ids.chunks.0.planes.0.length", 65))
    expect(FormatError, small, "overlap", "tensor 'ids' chunk 0 plane 0", "tensor 'ids' chunk 0 plane 1")


def test_empty_blobs_may_share_offsets(tmp_path: Path) -> None:
    """K=1 chunks have empty label planes; empty blobs never overlap anything."""
    path = tmp_path / "k1.wclust"
    ct = random_clustered((4, 3), 1, 1, dtype=torch.float32)
    save_file({"k1": ct}, path)
    want = ct.decode()

    def stack(h: dict[str, Any]) -> None:
        for c in h["tensors"]["k1"]["chunks"]:
            c["labels"]["offset"] = h["tensors"]["k1"]["chunks"][0]["centroids"]["offset"]

    rewrite(path, stack)
    assert_bit_equal(load_file(path)["k1"], want)


# -- blob contents (spec §5, §6, §7) ---------------------------------------------------------------
BLOBS = [
    ("clu", 0, "centroids"),
    ("clu", 0, "labels"),
    ("clu", 1, "centroids"),
    ("clu", 1, "labels"),
    ("odd", 1, "labels"),
    ("skew", 0, "labels"),  # zstd
    ("emb", 0, "plane 0"),
    ("emb", 0, "plane 1"),
    ("ids", 0, "plane 0"),  # zstd
    ("ids", 0, "plane 3"),
    ("scale", 0, "plane 2"),
]


@pytest.mark.parametrize(("tensor", "chunk", "kind"), BLOBS)
@pytest.mark.parametrize("where", ["first", "last"])
def test_flipped_blob_byte(small: Path, tensor: str, chunk: int, kind: str, where: str) -> None:
    b = blob(split(small).header, tensor, chunk, kind)
    flip(small, b["offset"] + (0 if where == "first" else b["length"] - 1), 0x04)
    expect(ChecksumError, small, f"tensor {tensor!r}", f"chunk {chunk}", f"{kind} checksum mismatch")
    # lazy: the file still opens, and every other tensor still reads
    with safe_open(small) as f:
        for other in f.keys():
            if other != tensor and f.reader.resolve(other)[0] != tensor:
                f.get_tensor(other)
        if tensor == "emb":
            with pytest.raises(ChecksumError, match="'emb'"):
                f.get_tensor("head")  # the alias reads the damaged target


@pytest.mark.parametrize("use_mmap", [True, False])
def test_flipped_byte_detected_without_mmap(small: Path, use_mmap: bool) -> None:
    b = blob(split(small).header, "clu", 1, "labels")
    flip(small, b["offset"] + 3)
    expect(ChecksumError, small, "tensor 'clu'", "chunk 1", load=lambda p: WclustReader(p, use_mmap=use_mmap).verify())


def _crafted(path: Path, tensor: str, chunk: int, kind: str, edit: Callable[[bytearray], None]) -> None:
    data = bytearray(blob_bytes(path, tensor, chunk, kind))
    edit(data)
    patch_blob(path, tensor, chunk, kind, bytes(data))


def test_label_out_of_range_2bit(small: Path) -> None:
    def edit(d: bytearray) -> None:
        d[5] |= 0b11000000  # label 3 with K=3

    _crafted(small, "clu", 0, "labels", edit)
    expect(FormatError, small, "tensor 'clu'", "chunk 0", "label 3", "K=3")


def test_label_out_of_range_8bit(small: Path) -> None:
    def edit(d: bytearray) -> None:
        d[-1] = 17

    _crafted(small, "clu", 1, "labels", edit)
    expect(FormatError, small, "tensor 'clu'", "chunk 1", "label 17", "K=17")


def test_label_out_of_range_via_get_clustered(small: Path) -> None:
    _crafted(small, "clu", 1, "labels", lambda d: d.__setitem__(0, 255))
    with safe_open(small) as f, pytest.raises(FormatError, match="chunk 1.*label 255"):
        f.get_clustered("clu")


@pytest.mark.parametrize(("chunk", "mask"), [(0, 0b00000100), (0, 0x80), (1, 0b00100000)])
def test_padding_bits_must_be_zero(small: Path, chunk: int, mask: int) -> None:
    # "odd" is (3, 5), 1-bit labels, chunk_rows 2: chunk 0 holds 10 labels, chunk 1 holds 5.
    _crafted(small, "odd", chunk, "labels", lambda d: d.__setitem__(-1, d[-1] | mask))
    expect(FormatError, small, "tensor 'odd'", f"chunk {chunk}", "padding")


def _table(path: Path, tensor: str, chunk: int) -> np.ndarray:
    return np.frombuffer(blob_bytes(path, tensor, chunk, "centroids"), "<f2").copy()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.__setitem__(1, np.nan), "NaN"),
        (lambda t: t.__setitem__(0, -np.inf), "infinity"),
        (lambda t: t.__setitem__(slice(None), t[::-1].copy()), "ascending"),
        (lambda t: t.__setitem__(1, t[0]), "ascending"),
    ],
    ids=["nan", "inf", "descending", "repeated"],
)
def test_bad_centroid_table(small: Path, edit: Callable[[np.ndarray], None], fragment: str) -> None:
    table = _table(small, "clu", 1)
    edit(table)
    patch_blob(small, "clu", 1, "centroids", table.tobytes())
    expect(FormatError, small, "tensor 'clu'", "chunk 1", fragment)
    with safe_open(small) as f, pytest.raises(FormatError, match=fragment):
        f.get_clustered("clu")


def test_signed_zero_pair_is_not_ascending(small: Path) -> None:
    table = _table(small, "odd", 0)
    table[:] = [-0.0, 0.0]
    patch_blob(small, "odd", 0, "centroids", table.tobytes())
    expect(FormatError, small, "tensor 'odd'", "ascending")


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_zstd_frame_declaring_wrong_size(small: Path, delta: int) -> None:
    raw = zstandard.ZstdDecompressor().decompress(blob_bytes(small, "skew", 0, "labels"))
    other = np.zeros(len(raw) + delta, np.uint8).tobytes()
    replace_blob(small, "skew", 0, "labels", zstandard.ZstdCompressor().compress(other), "zstd")
    expect(FormatError, small, "tensor 'skew'", "chunk 0", "declares")


def test_zstd_frame_with_trailing_bytes(small: Path) -> None:
    frame = blob_bytes(small, "ids", 0, "plane 1")
    replace_blob(small, "ids", 0, "plane 1", frame + b"\x00\x00", "zstd")
    expect(FormatError, small, "tensor 'ids'", "chunk 0", "plane 1", "trailing")


def test_zstd_frame_without_declared_size(small: Path) -> None:
    raw = zstandard.ZstdDecompressor().decompress(blob_bytes(small, "skew", 0, "labels"))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    replace_blob(small, "skew", 0, "labels", frame, "zstd")
    expect(FormatError, small, "tensor 'skew'", "declares")


def test_zstd_encoding_on_raw_bytes(small: Path) -> None:
    rewrite(small, _set("tensors.emb.chunks.0.planes.0.encoding", "zstd"))
    expect(FormatError, small, "tensor 'emb'", "plane 0", "zstd")


def test_zstd_labels_out_of_range(small: Path) -> None:
    """"skew" holds labels 0..3 in a zstd frame; declaring K=3 (same 2-bit width, the table's
    first 6 bytes, checksummed) makes label 3 out of range."""
    table = blob_bytes(small, "skew", 0, "centroids")[:6]

    def shrink(h: dict[str, Any]) -> None:
        c = h["tensors"]["skew"]["chunks"][0]
        assert c["labels"]["encoding"] == "zstd"
        c["k"], c["centroids"]["length"], c["centroids"]["crc32"] = 3, 6, zlib.crc32(table)

    rewrite(small, shrink)
    expect(FormatError, small, "tensor 'skew'", "chunk 0", "label 3", "K=3")


@pytest.mark.parametrize(("tensor", "kind", "delta"), [("clu", "labels", -1), ("clu", "labels", 1), ("ids", "plane 3", -4)])
def test_raw_blob_of_wrong_length(small: Path, tensor: str, kind: str, delta: int) -> None:
    data = blob_bytes(small, tensor, 0, kind)
    data = data[:delta] if delta < 0 else data + bytes(delta)
    replace_blob(small, tensor, 0, kind, data, "raw")
    expect(FormatError, small, f"tensor {tensor!r}", "chunk 0", "expected")


def test_lying_shape_is_caught_by_sizes(small: Path) -> None:
    """A header shape that disagrees with the stored planes fails on the expected sizes."""
    rewrite(small, _set("tensors.emb.shape", [6, 9]))
    rewrite(small, _set("tensors.head.shape", [6, 9]))
    expect(FormatError, small, "tensor 'emb'", "expected")


@pytest.mark.parametrize("tensor", ["odd", "emb", "skew"])
def test_huge_shape_fails_before_allocating(small: Path, tensor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checksummed header that claims a shape its blobs cannot hold is refused from the
    blobs' declared sizes, before the reader allocates the tensor it claims (spec §9.1)."""

    def grow(h: dict[str, Any]) -> None:
        for name in (tensor, "head"):
            if h["tensors"][name].get("target", tensor) == tensor:
                h["tensors"][name]["shape"][1] = 2**40

    rewrite(small, grow)
    sizes: list[int] = []
    real = np.empty

    def spy(shape: Any, *a: Any, **kw: Any) -> np.ndarray:
        sizes.append(int(np.prod(shape)))
        return real(shape, *a, **kw)

    monkeypatch.setattr(np, "empty", spy)
    expect(FormatError, small, f"tensor {tensor!r}", "chunk 0")
    with safe_open(small) as f:
        with pytest.raises(FormatError):
            f.get_slice(tensor)[:1]
        if tensor != "emb":
            with pytest.raises(FormatError):
                f.get_clustered(tensor)
    assert max(sizes, default=0) < 2**20


# -- sweeps ---------------------------------------------------------------------------------------
def _everything(path: Path) -> dict[str, bytes]:
    """Every tensor's bytes, plus every clustered tensor's labels and tables."""
    out: dict[str, bytes] = {}
    with safe_open(path) as f:
        for name, t in f.load_all().items():
            out[name] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + repr((t.dtype, tuple(t.shape))).encode()
        for name in ("clu", "odd", "skew"):
            ct = f.get_clustered(name)
            out[name + "/ct"] = ct.labels.numpy().tobytes() + b"".join(c.numpy().tobytes() for c in ct.centroids)
        out["/meta"] = repr(f.metadata()).encode()
    return out


def test_every_byte_flip_is_caught_or_harmless(small: Path, tmp_path: Path) -> None:
    """Flip each byte of a small file (masks cycling over all bits, one bit, the top bit, a
    middle bit): the reader raises a WclustError or, where the byte was padding, returns
    identical data. Any other exception type fails the test."""
    want = _everything(small)
    raw = small.read_bytes()
    harmless = []
    masks = (0xFF, 0x01, 0x80, 0x10)
    fd = os.open(small, os.O_RDWR)
    try:
        for pos in range(len(raw)):
            os.pwrite(fd, bytes([raw[pos] ^ masks[pos % len(masks)]]), pos)  # in place: fast
            try:
                got = _everything(small)
            except WclustError:
                continue
            finally:
                os.pwrite(fd, raw[pos : pos + 1], pos)
            assert got == want, f"byte {pos} changed the data without an error"
            harmless.append(pos)
    finally:
        os.close(fd)
    assert small.read_bytes() == raw
    p = split(small)
    # Harmless: padding in the data section, and version_minor (a newer minor is read, §10).
    assert all(PREAMBLE_SIZE <= pos < p.header_offset or pos in (10, 11) for pos in harmless)
    blobs = _blob_bytes_set(p.header)
    assert not [pos for pos in harmless if pos in blobs]
    assert harmless  # the file has padding, so some flips must be harmless


def _blob_bytes_set(header: dict[str, Any]) -> set[int]:
    out: set[int] = set()
    for e in header["tensors"].values():
        for c in e.get("chunks", []):
            for b in c.get("planes", []) + [c[k] for k in ("centroids", "labels") if k in c]:
                out.update(range(b["offset"], b["offset"] + b["length"]))
    return out


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _leaves(v, path + (k,))]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _leaves(v, path + (i,))]
    return [(path, node)]


def test_checksummed_header_fuzz(small: Path, tmp_path: Path) -> None:
    """Replace each header value with hostile ones, CRC fixed up: the reader raises a
    WclustError or reads the file; it never raises anything else (MemoryError, IndexError,
    OverflowError, KeyError ...)."""
    base = split(small)
    hostile: list[Any] = [-1, 0, 3, 2**31, 2**64, 1.5, "x", None, {}]
    target = tmp_path / "fuzz.wclust"
    outcomes = {"error": 0, "ok": 0}
    for path, _value in _leaves(base.header):
        if path[0] == "producer":
            continue
        for v in hostile:
            header = json.loads(json.dumps(base.header))
            node = header
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = v
            assemble(target, base.data, header)
            try:
                _everything(target)
                outcomes["ok"] += 1
            except WclustError:
                outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
