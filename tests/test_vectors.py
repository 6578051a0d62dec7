"""Conformance vectors (spec/vectors/): every valid file decodes bit-for-bit to its pinned
expected output, in header order; every invalid one is rejected with its error class; the one
fault of each invalid vector is repaired by its manifest `repair` and the repaired file then
verifies; and regenerating the vectors gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load

import wcfmt
from common import load_script
from wcfmt.inspect import verify

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def _make_vectors():  # type: ignore[no-untyped-def]
    return load_script("tools/make_vectors.py", "make_vectors")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(MANIFEST["valid"]))
def test_valid_vector_decodes_bit_exactly(name: str) -> None:
    entry = MANIFEST["valid"][name]
    path = VECTORS / "valid" / name
    exp_path = VECTORS / "valid" / entry["expected"]
    assert _sha(path) == entry["sha256"]
    assert _sha(exp_path) == entry["expected_sha256"]  # the expected output is pinned too
    expected = st_load(str(exp_path))
    got = wcfmt.load_file(path)
    assert list(got) == entry["tensors"]  # header order, aliases included
    assert set(expected) == set(entry["tensors"])
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        assert torch.equal(_bits(have), _bits(want)), key
    for alias, target in entry["aliases"].items():
        assert got[alias] is got[target]
    with wcfmt.safe_open(path) as f:
        assert f.keys() == entry["tensors"]
        assert "{}.{}".format(*f.reader.version) == entry["version"]
    verify(path)


@pytest.mark.parametrize("name", sorted(MANIFEST["invalid"]))
def test_invalid_vector_is_rejected(name: str) -> None:
    entry = MANIFEST["invalid"][name]
    path = VECTORS / "invalid" / name
    assert _sha(path) == entry["sha256"]
    with pytest.raises(wcfmt.WclustError) as info:
        wcfmt.load_file(path)
    assert type(info.value).__name__ == entry["error"], f"{entry['rule']}: {info.value}"
    assert name in str(info.value)  # the message names the file
    with pytest.raises(getattr(wcfmt, entry["error"])):
        verify(path)


@pytest.mark.parametrize("name", sorted(MANIFEST["invalid"]))
def test_repairing_the_one_fault_gives_a_valid_file(name: str, tmp_path: Path) -> None:
    """The manifest's repair undoes exactly the vector's fault: afterwards the file verifies,
    so the vector broke no other rule (save those listed in `also_breaks`, which its repair
    fixes too and whose check comes later in the order of spec §9.4)."""
    entry = MANIFEST["invalid"][name]
    raw = (VECTORS / "invalid" / name).read_bytes()
    fixed = _make_vectors().apply_repair(raw, entry["repair"])
    assert fixed != raw
    out = tmp_path / name
    out.write_bytes(fixed)
    verify(out)
    wcfmt.load_file(out)


def test_every_invalid_vector_names_a_rule_and_a_class() -> None:
    classes = {"FormatError", "HeaderError", "ChecksumError", "VersionError"}
    for name, entry in MANIFEST["invalid"].items():
        assert entry["error"] in classes, name
        assert entry["rule"].startswith("§"), name
    rules = {e["rule"] for e in MANIFEST["invalid"].values()}
    assert len(rules) >= 60  # one vector per reader MUST of the spec (see spec/vectors/README.md)


def test_header_too_large_as_a_single_fault(tmp_path: Path) -> None:
    """The committed `header_too_large` vector also breaks the size equation; this is the same
    fault alone, built here (100 MiB is too big to commit): a header of valid JSON padded with
    spaces to one byte over the cap, with the right CRC. It is refused before the header is read;
    repaired (the padding cut), it verifies."""
    raw = b'{"producer":"x","tensors":{}}'
    length = 104_857_601
    pad = length - len(raw)
    crc = zlib.crc32(b" " * pad, zlib.crc32(raw)) & 0xFFFFFFFF
    path = tmp_path / "huge_header.wclust"
    with open(path, "wb") as f:
        f.write(struct.pack("<8sHHIQQI28x", b"\x89WCLUST\n", 1, 0, 0, 64, length, crc))
        f.write(raw)
        f.write(b" " * pad)
    with pytest.raises(wcfmt.FormatError, match="exceeds"):
        wcfmt.load_file(path)
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(struct.pack("<QI", len(raw), zlib.crc32(raw) & 0xFFFFFFFF))
        f.truncate(64 + len(raw))
    verify(path)
    assert wcfmt.load_file(path) == {}


def test_regenerating_vectors_gives_identical_bytes(tmp_path: Path) -> None:
    """A failure here means the bytes on disk changed: update spec/, the version rule, the
    vectors (tools/make_vectors.py) and CHANGELOG.md together."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_vectors.py"), "--out", str(tmp_path)], check=True)
    fresh = json.loads((tmp_path / "vectors" / "manifest.json").read_text())
    assert fresh == MANIFEST
    assert (tmp_path / "header.schema.json").read_text() == (ROOT / "spec" / "header.schema.json").read_text()


def test_schema_file_matches_models() -> None:
    from wcfmt.schema import json_schema

    on_disk = json.loads((ROOT / "spec" / "header.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), "run tools/make_vectors.py"


def test_manifest_fields_are_documented() -> None:
    readme = (VECTORS / "README.md").read_text()
    fields = {k for e in MANIFEST["valid"].values() for k in e} | {k for e in MANIFEST["invalid"].values() for k in e}
    for f in fields:
        assert f"`{f}`" in readme, f
    for op in {op[0] for e in MANIFEST["invalid"].values() for op in e["repair"]}:
        assert f"`{op}`" in readme, op


def _blob_refs(node: object) -> list[dict]:
    if isinstance(node, dict):
        if {"offset", "length", "crc32"} <= set(node):
            return [node]
        return [b for v in node.values() for b in _blob_refs(v)]
    if isinstance(node, list):
        return [b for v in node for b in _blob_refs(v)]
    return []


@pytest.mark.parametrize("folder", ["valid", "invalid"])
def test_vectors_leave_no_nonzero_padding(folder: str) -> None:
    """Padding is the one writer MUST readers need not check (spec §3.2), so no vector may
    carry nonzero padding: a reader that does check it would reject a file for the wrong reason."""
    checked = 0
    for name in sorted(MANIFEST[folder]):
        raw = (VECTORS / folder / name).read_bytes()
        if len(raw) < 64:
            continue
        h_off, h_len = struct.unpack_from("<QQ", raw, 16)
        if not 64 <= h_off <= len(raw):
            continue
        try:
            header = json.loads(raw[h_off : h_off + h_len])
        except (ValueError, RecursionError):
            header = json.loads((VECTORS / "valid" / "fault_base.wclust").read_bytes()[h_off:])  # data is fault_base's
        covered = bytearray(h_off)
        for b in _blob_refs(header):
            o, n = b["offset"], b["length"]
            if isinstance(o, int) and isinstance(n, int) and 0 <= o <= h_off:
                covered[o : min(h_off, o + n)] = b"\x01" * (min(h_off, o + n) - o)
        pad = [i for i in range(64, h_off) if not covered[i] and raw[i]]
        assert not pad, f"{name}: nonzero padding at {pad[:4]}"
        checked += 1
    assert checked >= len(MANIFEST[folder]) - 12


# -- what the valid vectors cover (spec 1.0.2; findings of a second implementation, section D) ---
SPEC_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
               "F8_E4M3", "F8_E5M2"}  # fmt: skip


def _header_of(path: Path) -> dict:
    raw = path.read_bytes()
    h_off, h_len = struct.unpack_from("<QQ", raw, 16)
    return json.loads(raw[h_off : h_off + h_len])


def test_valid_vectors_cover_every_dtype() -> None:
    """Every dtype of spec §4.2's table is in some valid vector's expected output."""
    spec = (ROOT / "spec" / "wclust-v1.md").read_text()
    assert all(f"`{d}`" in spec for d in SPEC_DTYPES)
    seen = set()
    for entry in MANIFEST["valid"].values():
        raw = (VECTORS / "valid" / entry["expected"]).read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]])
        seen |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert seen == SPEC_DTYPES
    assert len(MANIFEST["valid"]) >= 8


def _frame_features(frame: bytes) -> set[str]:
    """Walk one zstd frame (RFC 8878 §3.1.1) and name what it holds."""
    fhd = frame[4]
    single, fcs_flag = fhd >> 5 & 1, fhd >> 6
    fcs = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    out = {f"fcs_{fcs}"} | ({"window_descriptor"} if not single else set()) | ({"checksum"} if fhd & 4 else set())
    out |= {"unused_bit"} if fhd & 0x10 else set()
    pos, kinds = 5 + (not single) + fcs, []
    while True:
        head = int.from_bytes(frame[pos : pos + 3], "little")
        kinds.append(("raw", "rle", "compressed")[head >> 1 & 3])
        pos += 3 + (1 if head >> 1 & 3 == 1 else head >> 3)
        if head & 1:
            break
    assert pos + (4 if fhd & 4 else 0) == len(frame)
    return out | set(kinds) | ({"several_blocks"} if len(kinds) > 1 else set())


def test_valid_vectors_cover_the_frame_and_layout_features() -> None:
    frames: set[str] = set()
    layout: set[str] = set()
    for name in MANIFEST["valid"]:
        raw = (VECTORS / "valid" / name).read_bytes()
        header = _header_of(VECTORS / "valid" / name)
        offsets = [b["offset"] for b in _blob_refs(header["tensors"]) if b["length"]]
        if offsets != sorted(offsets):
            layout.add("blobs_out_of_header_order")
        for e in header["tensors"].values():
            if e["codec"] == "clustered" and e["shape"] == []:
                layout.add("clustered_scalar")
            if e["codec"] == "clustered" and 0 in e["shape"]:
                layout.add("clustered_zero_elements")
        for b in _blob_refs(header["tensors"]):
            if b["encoding"] == "zstd":
                frames |= _frame_features(raw[b["offset"] : b["offset"] + b["length"]])
    assert frames >= {"fcs_1", "fcs_2", "fcs_4", "fcs_8", "window_descriptor", "checksum", "unused_bit", "raw", "rle",
                      "compressed", "several_blocks"}  # fmt: skip
    assert layout == {"blobs_out_of_header_order", "clustered_scalar", "clustered_zero_elements"}


def test_sharded_folder_vector(tmp_path: Path) -> None:
    """spec §8: the index names a shard for every tensor, each shard holds exactly its names, and
    the folder loads to the shards' expected outputs."""
    folder = MANIFEST["folders"]["sharded"]
    index_path = VECTORS / "valid" / folder["index"]
    assert _sha(index_path) == folder["sha256"]
    index = json.loads(index_path.read_text())
    assert list(index["weight_map"]) == folder["tensors"]
    expected: dict[str, torch.Tensor] = {}
    for shard in folder["shards"]:
        entry = MANIFEST["valid"][shard]
        names = [n for n, f in index["weight_map"].items() if f"sharded/{f}" == shard]
        assert sorted(entry["tensors"]) == sorted(names)
        expected |= st_load(str(VECTORS / "valid" / entry["expected"]))
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total and set(expected) == set(index["weight_map"])
    assert all(_header_of(VECTORS / "valid" / s)["tensors"][n]["dtype"] in sizes for s in folder["shards"]
               for n in MANIFEST["valid"][s]["tensors"])  # fmt: skip
    got = wcfmt.load_state_dict(VECTORS / "valid" / "sharded")
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and torch.equal(_bits(got[key]), _bits(want)), key


def test_readme_lists_the_newer_minor_vectors() -> None:
    """spec/vectors/README.md names every invalid vector that sets version_minor (its setting, not its fault)."""
    readme = (VECTORS / "README.md").read_text()
    for name in MANIFEST["invalid"]:
        raw = (VECTORS / "invalid" / name).read_bytes()
        if raw[:8] == b"\x89WCLUST\n" and struct.unpack_from("<H", raw, 10)[0] == 1:
            assert f"`{name.removesuffix('.wclust')}`" in readme, name


PARTIAL = sorted(n for n, e in MANIFEST["invalid"].items() if "unsupported" in e)


@pytest.mark.parametrize("name", PARTIAL)
def test_newer_minor_file_reads_its_other_tensors(name: str) -> None:
    """spec §10: a file of a newer minor opens; only a requested tensor that needs an unknown
    value is refused (VersionError); every other one reads as in fault_base's pinned output."""
    entry = MANIFEST["invalid"][name]
    assert entry["error"] == "VersionError"
    base = st_load(str(VECTORS / "valid" / MANIFEST["valid"]["fault_base.wclust"]["expected"]))
    with wcfmt.safe_open(VECTORS / "invalid" / name) as f:
        assert set(entry["unsupported"]) <= set(f.keys())
        for key in f.keys():
            if key in entry["unsupported"]:
                with pytest.raises(wcfmt.VersionError):
                    f.get_tensor(key)
            else:
                assert torch.equal(_bits(f.get_tensor(key)), _bits(base[key])), key
        assert set(f.keys()) == set(base) | set(entry["unsupported"])


def test_valid_vectors_match_their_source_values_by_a_third_path() -> None:
    """The expected outputs are the reference decoder's; here they are checked against the values
    the vectors were made from, rebuilt by torch's own casts (spec §5.5: the fp16 table converted
    to the tensor's dtype, round to nearest even, then indexed by the labels) — neither wcfmt's
    rebuild nor the reference decoder's code. Lossless tensors must come back as they went in."""
    checked = 0
    for name, (tensors, _meta, _settings) in _make_vectors().valid_sets().items():
        expected = st_load(str(VECTORS / "valid" / f"{name}.expected.safetensors"))
        for key, src in tensors.items():
            if isinstance(src, wcfmt.ClusteredTensor):
                flat = src.labels.reshape(-1).long()
                row = flat.numel() // max(1, src.shape[0]) if len(src.shape) else 1
                parts = [table.to(src.dtype)[flat[a * row : b * row]] for table, (a, b) in zip(src.centroids, src.row_ranges())]
                want = torch.cat(parts).reshape(src.shape) if parts else torch.zeros(src.shape, dtype=src.dtype)
            elif isinstance(src, torch.Tensor):
                want = src
            else:
                continue
            have = expected[key]
            assert have.dtype == want.dtype and have.shape == want.shape, (name, key)
            assert torch.equal(_bits(have), _bits(want)), (name, key)
            checked += 1
    assert checked >= 25
