"""Boundary cases of the reference decoder's limits (spec §7.1 zstd window, §4.3 settings types),
from the numbers in the spec's text (mutation audit 0.2: R2, R5)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard

from common import PREAMBLE, assemble, reference_decoder
from zstd_frames import MIB, frame, window_bytes

ROOT = Path(__file__).resolve().parent.parent


ref = reference_decoder()


@pytest.mark.parametrize("descriptor", [0x87, 0x88])
def test_a_window_of_exactly_128_mib_is_accepted(descriptor: int) -> None:
    assert window_bytes(descriptor) <= 128 * MIB
    assert ref.walk_zstd_frame(frame(window=descriptor)) == 300


@pytest.mark.parametrize("descriptor", [0x89, 0x8F])
def test_a_window_over_128_mib_is_rejected(descriptor: int) -> None:
    with pytest.raises(ref.FormatError, match="window"):
        ref.walk_zstd_frame(frame(window=descriptor))


@pytest.mark.parametrize("flag", [1, 2, 3])
def test_every_dictionary_flag_is_rejected(flag: int) -> None:
    with pytest.raises(ref.FormatError, match="dictionary"):
        ref.walk_zstd_frame(frame(dict_flag=flag))


@pytest.mark.parametrize("key", ["k", "chunk_rows", "level"])
@pytest.mark.parametrize("value", ["3", 3.5, None, [3]])
def test_settings_integers_must_be_integers(key: str, value: object) -> None:
    """§4.3: settings are informative but typed; k, chunk_rows and level are integers."""
    header = {"producer": "p", "tensors": {}, "settings": {key: value}}
    with pytest.raises(ref.HeaderError, match=f"settings.{key}"):
        ref.validate_header(header, False)
    ref.validate_header({"producer": "p", "tensors": {}, "settings": {key: 3}}, False)


# -- mutation audit of the reference decoder (mutmut, wclust_ref.py): what the survivors showed ---
# Every expectation below is worked by hand from the spec's text, never read off the decoder.
SPEC_MAGIC = b"\x89WCLUST\n"  # §3.1
SPEC_MAX_HEADER = 104_857_600  # §3.1
W_PLANES = (bytes([1, 3, 5, 7]), bytes([2, 4, 6, 8]))  # §6.2: plane 0 is the most significant byte
W_BYTES = bytes([2, 1, 4, 3, 6, 5, 8, 7])  # U16 0x0102 0x0304 0x0506 0x0708, little-endian
C_TABLE = bytes([0x00, 0xBC, 0x00, 0x40])  # §5.4: fp16 -1.0 (0xBC00), 2.0 (0x4000), ascending
C_LABELS = bytes([0b101])  # §5.3: k = 2, 1 bit each, labels 1, 0, 1 least significant first
C_BYTES = bytes([0x00, 0x40, 0x00, 0xBC, 0x00, 0x40])  # F16 2.0, -1.0, 2.0


def _blob_ref(i: int, payload: bytes) -> dict[str, Any]:
    return {"offset": 64 + 64 * i, "length": len(payload), "encoding": "raw", "crc32": zlib.crc32(payload)}


def _hand_file(table: bytes = C_TABLE) -> tuple[bytes, dict[str, Any]]:
    """A data section with one blob per 64 bytes (U16 planes, then the fp16 table and the labels)
    and the header describing it: a lossless U16 [2, 2] "w", a clustered F16 [3] "c" (k = 2) and
    an alias "t" of "w"."""
    blobs = [*W_PLANES, table, C_LABELS]
    data = b"".join(b + bytes(64 - len(b)) for b in blobs)
    header = {
        "producer": "hand 1",
        "metadata": {"a": "b"},
        "settings": {"k": 2, "extra": {"x": "y"}},
        "tensors": {
            "w": {"dtype": "U16", "shape": [2, 2], "codec": "lossless", "transform": "byte_planes",
                  "chunk_rows": 2, "chunks": [{"planes": [_blob_ref(0, blobs[0]), _blob_ref(1, blobs[1])]}]},
            "c": {"dtype": "F16", "shape": [3], "codec": "clustered", "chunk_rows": 3, "quality": {"q": 1.5},
                  "chunks": [{"k": 2, "label_bits": 1, "centroids": _blob_ref(2, blobs[2]),
                              "labels": _blob_ref(3, blobs[3])}]},
            "t": {"dtype": "U16", "shape": [2, 2], "codec": "alias", "target": "w"},
        },
    }  # fmt: skip
    return data, header


def _write(tmp_path: Path, header: dict[str, Any] | None = None, data: bytes | None = None, **kw: Any) -> Path:
    d, h = _hand_file()
    path = tmp_path / "hand.wclust"
    assemble(path, d if data is None else data, h if header is None else header, **kw)
    return path


def test_a_hand_built_file_decodes_to_the_bytes_worked_by_hand(tmp_path: Path) -> None:
    d = ref.decode(_write(tmp_path).read_bytes())
    assert d.version == (1, 0) and d.producer == "hand 1" and d.metadata == {"a": "b"}
    assert d.aliases == {"t": "w"}
    assert [(n, t.dtype, t.shape, t.data) for n, t in d.tensors.items()] == [
        ("w", "U16", [2, 2], W_BYTES), ("c", "F16", [3], C_BYTES), ("t", "U16", [2, 2], W_BYTES)]  # fmt: skip
    assert ref.decode(_write(tmp_path, minor=3).read_bytes()).version == (1, 3)


def test_decode_of_a_name_the_file_lacks_raises_key_error(tmp_path: Path) -> None:
    data = _write(tmp_path).read_bytes()
    with pytest.raises(KeyError, match="nope"):
        ref.decode(data, names=["c", "nope"])
    assert list(ref.decode(data, names=["t"]).tensors) == ["t"]


def test_max_bytes_equal_to_the_total_is_accepted_one_less_is_not(tmp_path: Path) -> None:
    """The tensors stored: w (4 U16 = 8 bytes) and c (3 F16 = 6 bytes); the alias adds nothing."""
    data = _write(tmp_path).read_bytes()
    assert len(ref.decode(data, max_bytes=14).tensors) == 3
    with pytest.raises(MemoryError):
        ref.decode(data, max_bytes=13)
    assert len(ref.decode(data, names=["c"], max_bytes=6).tensors) == 1
    with pytest.raises(MemoryError):
        ref.decode(data, names=["t"], max_bytes=7)


def test_command_line_main_prints_a_line_per_tensor_and_goes_on_after_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path)
    bad = tmp_path / "bad.wclust"
    raw = bytearray(good.read_bytes())
    raw[32] ^= 1  # header_crc32 (§3.1 offset 32)
    bad.write_bytes(bytes(raw))
    assert ref.main([str(bad), str(good)]) == 0
    sha = {n: hashlib.sha256(b).hexdigest() for n, b in (("w", W_BYTES), ("c", C_BYTES))}
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: ChecksumError: header CRC-32 mismatch",
        f"{good}: w U16 [2, 2] sha256={sha['w']}",
        f"{good}: c F16 [3] sha256={sha['c']}",
        f"{good}: t U16 [2, 2] sha256={sha['w']}",
    ]


@pytest.mark.parametrize("table", [bytes([0x00, 0x40, 0x00, 0xBC]), bytes([0x00, 0x40, 0x00, 0x40]),
                                   bytes([0x00, 0x80, 0x00, 0x00])], ids=["descending", "equal", "signed_zeros"])  # fmt: skip
def test_a_two_entry_table_not_strictly_ascending_is_rejected(tmp_path: Path, table: bytes) -> None:
    """§5.4 with k = 2: 2.0 then -1.0; 2.0 twice; -0.0 then +0.0 (equal as numbers)."""
    d, h = _hand_file(table)
    with pytest.raises(ref.FormatError, match="ascending"):
        ref.decode(_write(tmp_path, h, d).read_bytes())


def test_an_eight_dimensional_shape_is_accepted_nine_are_not(tmp_path: Path) -> None:
    d, h = _hand_file()
    del h["tensors"]["t"]
    h["tensors"]["c"]["shape"] = [3] + [1] * 7  # 8 dims: rows 3 of 1 element, as [3]
    got = ref.decode(_write(tmp_path, h, d).read_bytes())
    assert got.tensors["c"].shape == [3] + [1] * 7 and got.tensors["c"].data == C_BYTES
    h["tensors"]["c"]["shape"] = [3] + [1] * 8
    with pytest.raises(ref.HeaderError, match="at most 8"):
        ref.decode(_write(tmp_path, h, d).read_bytes())


def test_a_blob_running_past_header_offset_is_rejected(tmp_path: Path) -> None:
    """§3.2: offset + length <= header_offset. The labels start at 256; the data section ends at
    320 (4 blobs of 64 bytes after the preamble), so a length of 64 fits and 65 does not."""
    d, h = _hand_file()
    blobs = ref.validate_header(h, False)[0]["tensors"]
    labels = blobs["c"]["chunks"][0]["labels"]
    labels["length"] = 64
    ref.check_ranges(blobs, 320)
    labels["length"] = 65
    with pytest.raises(ref.FormatError, match="outside"):
        ref.check_ranges(blobs, 320)
    h["tensors"]["c"]["chunks"][0]["labels"]["length"] = 65
    with pytest.raises(ref.FormatError, match="outside"):
        ref.decode(_write(tmp_path, h, d).read_bytes())


# -- §3.1 preamble boundaries ------------------------------------------------------------------------
def _preamble(h_off: int = 64, h_len: int = 0, reserved: bytes = bytes(28)) -> bytes:
    return PREAMBLE.pack(SPEC_MAGIC, 1, 0, 0, h_off, h_len, 0, reserved)


def test_a_file_of_exactly_64_bytes_passes_the_preamble() -> None:
    assert ref.read_preamble(_preamble()) == (1, 0, 64, 0, 0)
    with pytest.raises(ref.FormatError, match="shorter"):
        ref.read_preamble(_preamble()[:63])
    with pytest.raises(ref.HeaderError, match="not JSON"):  # the empty header, not the length
        ref.decode(_preamble())


@pytest.mark.parametrize("byte", [36, 50, 63])
def test_every_reserved_preamble_byte_counts(byte: int) -> None:
    reserved = bytearray(28)
    reserved[byte - 36] = 1
    with pytest.raises(ref.FormatError, match="reserved"):
        ref.read_preamble(_preamble(reserved=bytes(reserved)))


def test_header_length_at_the_cap_is_accepted_one_more_is_not() -> None:
    data = bytearray(64 + SPEC_MAX_HEADER + 1)  # zero pages: nothing is written past the preamble
    data[:64] = _preamble(h_len=SPEC_MAX_HEADER)
    view = memoryview(data)
    assert ref.read_preamble(view[: 64 + SPEC_MAX_HEADER])[3] == SPEC_MAX_HEADER
    data[:64] = _preamble(h_len=SPEC_MAX_HEADER + 1)
    with pytest.raises(ref.FormatError, match="exceeds"):
        ref.read_preamble(view)


# -- §3.3 / §3.4 JSON -------------------------------------------------------------------------------
def _settings_k(literal: bytes) -> bytes:
    return b'{"producer":"p","tensors":{},"settings":{"k":' + literal + b"}}"


def test_integers_up_to_309_digits_within_binary64_are_integers() -> None:
    """§3.4: 10^308 (309 digits) is a finite binary64; 10^309 (310 digits) and 2*10^308 (309
    digits, above 1.8e308) are not, and settings.k takes any integer §3.4 allows."""
    h = ref.parse_json(_settings_k(b"1" + b"0" * 308))
    assert ref.validate_header(h, False)[0]["settings"]["k"] == 10**308
    for literal in (b"1" + b"0" * 309, b"2" + b"0" * 308, b"-1" + b"0" * 309, b"9" * 5000):
        with pytest.raises(ref.HeaderError):
            ref.validate_header(ref.parse_json(_settings_k(literal)), False)


def test_a_310_digit_integer_in_an_ignored_field_of_a_newer_minor_is_ignored() -> None:
    h = ref.parse_json(b'{"producer":"p","tensors":{},"future":1' + b"0" * 309 + b"}")
    assert ref.validate_header(h, True)[0] == {"producer": "p", "tensors": {}}
    with pytest.raises(ref.HeaderError, match="unknown field"):
        ref.validate_header(h, False)


def test_a_header_starting_with_a_byte_order_mark_is_rejected_as_such() -> None:
    with pytest.raises(ref.HeaderError, match="byte order mark"):
        ref.parse_json(b'\xef\xbb\xbf{"producer":"p","tensors":{}}')


@pytest.mark.parametrize("value", ["1", True, None, [1], 10**400], ids=["str", "bool", "null", "list", "10e400"])
def test_quality_values_must_be_finite_numbers(value: object) -> None:
    """§5.6: numbers (finite, §3.4). 10**400 is what an integer beyond binary64 would be if a
    JSON parser handed it over as an int."""
    _, h = _hand_file()
    h["tensors"]["c"]["quality"] = {"q": value}
    with pytest.raises(ref.HeaderError, match=r"tensor 'c'\.quality must map strings to numbers"):
        ref.validate_header(h, False)


# -- §4-§6: every rejection names where it is -------------------------------------------------------
def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def damage(h: dict[str, Any]) -> None:
        node = h
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return damage


def _drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def damage(h: dict[str, Any]) -> None:
        node = h
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]

    return damage


def _slug(text: str) -> str:
    """A test id of letters, digits and _ only: mutmut hands ids back to pytest on its command line."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


W0 = ("tensors", "w", "chunks", 0)
C0 = ("tensors", "c", "chunks", 0)
HEADER_FAULTS = [
    (_set("x", value=1), r"^header: unknown field\(s\) \['x'\]$"),
    (_drop("producer"), r"^header: missing field\(s\) \['producer'\]$"),
    (_set("metadata", value=[]), r"^metadata must be an object$"),
    (_set("metadata", "a", value=1), r"^metadata values must be strings$"),
    (_set("settings", value=[]), r"^settings must be an object$"),
    (_set("settings", "x", value=1), r"^settings: unknown field\(s\) \['x'\]$"),
    (_set("settings", "extra", value=[]), r"^settings\.extra must be an object$"),
    (_set("settings", "extra", "x", value=1), r"^settings\.extra must map strings to strings$"),
    (_set("tensors", value=[]), r"^tensors must be an object$"),
    (_set("tensors", "w", value=[]), r"^tensor 'w' must be an object$"),
    (_drop("tensors", "w", "codec"), r"^tensor 'w': missing field\(s\) \['codec'\]$"),
    (_set("tensors", "w", "codec", value="X"), r"^tensor 'w': unknown codec 'X'$"),
    (_set("tensors", "w", "codec", value=1), r"^tensor 'w'\.codec must be a string$"),
    (_set("tensors", "w", "x", value=1), r"^tensor 'w': unknown field\(s\) \['x'\]$"),
    (_drop("tensors", "w", "dtype"), r"^tensor 'w': missing field\(s\) \['dtype'\]$"),
    (_set("tensors", "w", "dtype", value="X9"), r"^tensor 'w': unknown dtype 'X9'$"),
    (_set("tensors", "w", "dtype", value=2), r"^tensor 'w'\.dtype must be a string$"),
    (_set("tensors", "w", "shape", value=[2, -1]), r"^tensor 'w': dimension must be an integer in \[0, "),
    (_set("tensors", "t", "target", value=5), r"^tensor 't'\.target must be a string$"),
    (_set("tensors", "w", "chunk_rows", value=0), r"^tensor 'w'\.chunk_rows must be an integer in \[1, "),
    (_set("tensors", "w", "chunk_rows", value=1), r"^tensor 'w': 1 chunks, needs 2$"),
    (_set("tensors", "w", "transform", value="X"), r"^tensor 'w': unknown transform 'X'$"),
    (_set("tensors", "w", "transform", value=[]), r"^tensor 'w'\.transform must be a string$"),
    (_set(*W0, value=[]), r"^tensor 'w' chunk 0 must be an object$"),
    (_set(*W0, "x", value=1), r"^tensor 'w' chunk 0: unknown field\(s\) \['x'\]$"),
    (_set(*W0, "planes", 1, value=[]), r"^tensor 'w' chunk 0 plane 1 must be an object$"),
    (_set(*W0, "planes", 1, "x", value=1), r"^tensor 'w' chunk 0 plane 1: unknown field\(s\) \['x'\]$"),
    (_set(*W0, "planes", 1, "offset", value=65), r"^tensor 'w' chunk 0 plane 1\.offset is not a multiple of 64$"),
    (_set(*W0, "planes", 1, "length", value=2**63), r"^tensor 'w' chunk 0 plane 1\.length must be an integer in \[0, "),
    (_set("tensors", "c", "quality", value=[]), r"^tensor 'c'\.quality must be an object$"),
    (_set(*C0, value=[]), r"^tensor 'c' chunk 0 must be an object$"),
    (_set(*C0, "x", value=1), r"^tensor 'c' chunk 0: unknown field\(s\) \['x'\]$"),
    (_drop(*C0, "label_bits"), r"^tensor 'c' chunk 0: missing field\(s\) \['label_bits'\]$"),
    (_set(*C0, "k", value=0), r"^tensor 'c' chunk 0\.k must be an integer in \[1, 257\)$"),
    (_set(*C0, "centroids", value=[]), r"^tensor 'c' chunk 0\.centroids must be an object$"),
    (_set(*C0, "centroids", "x", value=1), r"^tensor 'c' chunk 0\.centroids: unknown field\(s\) \['x'\]$"),
    (_set(*C0, "labels", value=[]), r"^tensor 'c' chunk 0\.labels must be an object$"),
    (_set(*C0, "labels", "x", value=1), r"^tensor 'c' chunk 0\.labels: unknown field\(s\) \['x'\]$"),
    (_set(*C0, "labels", "offset", value=-64), r"^tensor 'c' chunk 0\.labels\.offset must be an integer in \[0, "),
    (_set(*C0, "labels", "length", value=-1), r"^tensor 'c' chunk 0\.labels\.length must be an integer in \[0, "),
    (_set(*C0, "labels", "crc32", value=2**32), r"^tensor 'c' chunk 0\.labels\.crc32 must be an integer in \[0, 4294967296\)$"),
    (_set(*C0, "labels", "encoding", value="lz4"), r"^tensor 'c' chunk 0\.labels: unknown encoding 'lz4'$"),
    (_set(*C0, "labels", "encoding", value=None), r"^tensor 'c' chunk 0\.labels\.encoding must be a string$"),
]  # fmt: skip


@pytest.mark.parametrize("damage,message", HEADER_FAULTS, ids=[_slug(m) for _, m in HEADER_FAULTS])
def test_every_header_fault_names_its_place(damage: Callable[[dict[str, Any]], None], message: str) -> None:
    _, h = _hand_file()
    ref.validate_header(copy.deepcopy(h), False)  # the undamaged header is valid
    damage(h)
    with pytest.raises(ref.HeaderError, match=message):
        ref.validate_header(h, False)


def test_a_header_that_is_not_an_object_is_named() -> None:
    with pytest.raises(ref.HeaderError, match="^header must be an object$"):
        ref.validate_header([], False)


@pytest.mark.parametrize("damage,needs", [
    (_set("tensors", "w", "transform", value="future"), {"w": "transform 'future'", "t": "transform 'future'"}),
    (_set(*W0, "planes", 0, "encoding", value="lz4"), {"w": "encoding 'lz4'", "t": "encoding 'lz4'"}),
    (_set(*C0, "labels", "encoding", value="lz4"), {"c": "encoding 'lz4'"}),
    (_set("tensors", "c", "codec", value="vq"), {"c": "codec 'vq'"}),
    (_set("tensors", "c", "dtype", value="F4"), {"c": "dtype 'F4'"}),
])  # fmt: skip
def test_a_newer_minor_names_what_each_tensor_needs(damage: Callable[[dict[str, Any]], None], needs: dict) -> None:
    """§10: the error names the unknown value; an alias (t) needs what its target (w) needs."""
    _, h = _hand_file()
    damage(h)
    assert ref.validate_header(h, True)[1] == needs


def test_a_newer_minor_file_names_the_value_its_alias_needs(tmp_path: Path) -> None:
    d, h = _hand_file()
    h["tensors"]["w"]["transform"] = "future"
    data = _write(tmp_path, h, d, minor=1).read_bytes()
    with pytest.raises(ref.VersionError, match=r"^tensor 't' needs transform 'future' \(file 1\.1\)$"):
        ref.decode(data, names=["t"])
    assert ref.decode(data, names=["c"]).tensors["c"].data == C_BYTES


@pytest.mark.parametrize("place", [W0, W0 + ("planes", 1), C0, C0 + ("centroids",), C0 + ("labels",),
                                   ("tensors", "w"), ("tensors", "t"), ("settings",), ()])  # fmt: skip
def test_a_newer_minor_ignores_whatever_an_unknown_field_holds(tmp_path: Path, place: tuple) -> None:
    """§3.4 scope, §10: an unknown field of a newer-minor file is ignored at every level, null
    included; the known fields are kept, the unknown ones dropped."""
    d, h = _hand_file()
    _set(*place, "future", value=None)(h)
    known = ref.validate_header(copy.deepcopy(h), True)[0]
    assert known == ref.validate_header(_hand_file()[1], False)[0]
    assert "future" not in json.dumps(known)
    got = ref.decode(_write(tmp_path, h, d, minor=1).read_bytes())
    assert [t.data for t in got.tensors.values()] == [W_BYTES, C_BYTES, W_BYTES]


# -- §7.1 zstd frame walk ----------------------------------------------------------------------------
MAGIC_LE = (0xFD2FB528).to_bytes(4, "little")


@pytest.mark.parametrize("low", range(16))
def test_every_skippable_frame_magic_is_named_skippable(low: int) -> None:
    skippable = (0x184D2A50 + low).to_bytes(4, "little") + bytes(4)
    with pytest.raises(ref.FormatError, match="skippable"):
        ref.walk_zstd_frame(skippable)


# RFC 8878 §3.1.1: Frame_Header_Descriptor bits: 7-6 Frame_Content_Size_flag, 5 Single_Segment,
# 4 unused, 3 reserved, 2 Content_Checksum, 1-0 Dictionary_ID; Block_Header: bit 0 Last_Block,
# bits 1-2 Block_Type, bits 3-23 Block_Size. 0x80: 4-byte content size with a Window_Descriptor;
# 0x20: single segment, 1-byte content size.
RAW_LAST_5 = (1 | (5 << 3)).to_bytes(3, "little")  # last block, raw, 5 bytes
TRUNCATED = [
    (MAGIC_LE[:3], "shorter than a magic number"),
    (MAGIC_LE, "truncated frame header"),
    (MAGIC_LE + b"\x20", "truncated content size"),  # single segment: 1 byte of content size due
    (MAGIC_LE + b"\x80", "truncated window descriptor"),
    (MAGIC_LE + b"\x80\x50", "truncated content size"),
    (MAGIC_LE + b"\x80\x50" + bytes([5, 0, 0]), "truncated content size"),
    (MAGIC_LE + b"\x80\x50" + bytes([5, 0, 0, 0]), "truncated block header"),
    (MAGIC_LE + b"\x80\x50" + bytes([5, 0, 0, 0]) + RAW_LAST_5[:2], "truncated block header"),
    (MAGIC_LE + b"\x80\x50" + bytes([5, 0, 0, 0]) + RAW_LAST_5 + b"hell", "truncated block"),
    (MAGIC_LE + b"\x00\x50" + RAW_LAST_5 + b"hello", "frame does not declare its content size"),
    (MAGIC_LE + b"\x28\x05" + RAW_LAST_5 + b"hello", "reserved frame header bit set"),
    (MAGIC_LE + b"\x20\x05" + (1 | (3 << 1)).to_bytes(3, "little"), "reserved block type"),
    (MAGIC_LE + b"\x20\x05" + RAW_LAST_5 + b"hello!", "blob is not exactly one frame (truncated or followed by further bytes)"),
]


@pytest.mark.parametrize("blob,message", TRUNCATED, ids=[f"{len(b)}_{_slug(m)}" for b, m in TRUNCATED])
def test_each_frame_fault_has_its_own_message(blob: bytes, message: str) -> None:
    with pytest.raises(ref.FormatError, match=f"^zstd: {re.escape(message)}$"):
        ref.walk_zstd_frame(blob)


@pytest.mark.parametrize("fhd", [0x20, 0x30])
def test_single_segment_with_flag_0_declares_one_byte_of_content_size(fhd: int) -> None:
    """RFC 8878: Frame_Content_Size_flag 0 with Single_Segment_flag 1 means a 1-byte size;
    the unused bit 4 (0x10) is not interpreted (§7.1 rule 2)."""
    f = MAGIC_LE + bytes([fhd, 5]) + RAW_LAST_5 + b"hello"
    assert ref.walk_zstd_frame(f) == 5
    assert zstandard.ZstdDecompressor().decompress(f) == b"hello"  # a frame zstd itself reads


def test_the_window_limit_is_the_rfc_formula_at_every_descriptor() -> None:
    """§7.1 rule 4 over all 256 Window_Descriptor values: accepted exactly when 2^(10+e) +
    2^(10+e)/8*m <= 2^27."""
    for wd in range(256):
        f = frame(window=wd)
        if window_bytes(wd) <= 1 << 27:
            assert ref.walk_zstd_frame(f) == 300, hex(wd)
        else:
            with pytest.raises(ref.FormatError, match="window"):
                ref.walk_zstd_frame(f)
