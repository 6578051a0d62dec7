"""The header models and `parse_header` (spec §3.3, §4, §5.2, §6.1, §10)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from wcfmt.constants import MAX_K, MAX_NDIM, label_bits_for_k
from wcfmt.dtypes import DTYPES
from wcfmt.schema import (
    Blob,
    ClusteredChunk,
    Header,
    chunk_row_ranges,
    json_schema,
    serialize_header,
    parse_header,
    rows_and_row_size,
)

ROOT = Path(__file__).resolve().parent.parent


def _blob(offset: int = 64, length: int = 0, encoding: str = "raw", crc32: int = 0) -> dict[str, Any]:
    return {"offset": offset, "length": length, "encoding": encoding, "crc32": crc32}


def _clustered(shape: list[int], chunk_rows: int, ks: list[int], dtype: str = "BF16") -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": shape,
        "codec": "clustered",
        "chunk_rows": chunk_rows,
        "chunks": [
            {"k": k, "label_bits": label_bits_for_k(k), "centroids": _blob(64, 2 * k), "labels": _blob(128)}
            for k in ks
        ],
    }


def _lossless(shape: list[int], chunk_rows: int, n_chunks: int, dtype: str = "F32") -> dict[str, Any]:
    planes = DTYPES[dtype][0]
    return {
        "dtype": dtype,
        "shape": shape,
        "codec": "lossless",
        "transform": "float_planes" if dtype in ("F64", "F32", "F16", "BF16") else "byte_planes",
        "chunk_rows": chunk_rows,
        "chunks": [{"planes": [_blob() for _ in range(planes)]} for _ in range(n_chunks)],
    }


def _header(**tensors: dict[str, Any]) -> dict[str, Any]:
    return {"producer": "test", "metadata": {"a": "b"}, "tensors": tensors}


def _good() -> dict[str, Any]:
    return _header(
        w=_clustered([5, 4], 2, [1, 3, 256]),
        b=_lossless([3, 2], 2, 2),
        tied=_alias("w", [5, 4], "BF16"),
    )


def _alias(target: str, shape: list[int], dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "codec": "alias", "target": target}


def _parse(h: dict[str, Any] | str | bytes, lenient: bool = False) -> Header:
    raw = h if isinstance(h, bytes) else (h if isinstance(h, str) else json.dumps(h)).encode()
    return parse_header(raw, lenient=lenient)


# -- helpers of §4.6 --------------------------------------------------------------------------
def test_rows_and_row_size() -> None:
    assert rows_and_row_size([]) == (1, 1)
    assert rows_and_row_size([7]) == (7, 1)
    assert rows_and_row_size([3, 4, 5]) == (3, 20)
    assert rows_and_row_size([0, 4]) == (0, 4)
    assert rows_and_row_size([4, 0]) == (4, 0)


@pytest.mark.parametrize(
    ("rows", "chunk_rows", "want"),
    [(0, 3, []), (1, 3, [(0, 1)]), (6, 3, [(0, 3), (3, 6)]), (7, 3, [(0, 3), (3, 6), (6, 7)]), (2, 1, [(0, 1), (1, 2)])],
)
def test_chunk_row_ranges(rows: int, chunk_rows: int, want: list[tuple[int, int]]) -> None:
    assert chunk_row_ranges(rows, chunk_rows) == want


@pytest.mark.parametrize(
    ("k", "bits"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (64, 8), (255, 8), (256, 8)]
)
def test_label_bits_for_k(k: int, bits: int) -> None:
    assert label_bits_for_k(k) == bits


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1])
def test_label_bits_for_k_rejects_out_of_range(k: int) -> None:
    with pytest.raises(ValueError):
        label_bits_for_k(k)


# -- valid headers -----------------------------------------------------------------------------
def test_good_header_parses() -> None:
    h = _parse(_good())
    assert list(h.tensors) == ["w", "b", "tied"]
    assert h.metadata == {"a": "b"}
    assert h.tensors["w"].chunks[2].k == 256
    assert h.unsupported == {}


def test_empty_tensor_has_no_chunks() -> None:
    _parse(_header(e=_lossless([0, 5], 4, 0), f=_clustered([3, 0], 2, [])))
    with pytest.raises(ValueError, match="chunks"):
        _parse(_header(e=_lossless([0, 5], 4, 1)))


def test_scalar_is_one_chunk() -> None:
    _parse(_header(s=_lossless([], 1, 1)))
    with pytest.raises(ValueError, match="needs 1"):
        _parse(_header(s=_lossless([], 1, 0)))


def test_model_round_trips_through_json() -> None:
    h = _parse(_good())
    again = _parse(h.model_dump_json(exclude_none=True))
    assert again == h


def test_generated_schema_matches_spec_file() -> None:
    """spec/header.schema.json is generated from the models (STYLE item 2); regenerate it
    with tools/make_vectors.py when the models change."""
    on_disk = json.loads((ROOT / "spec" / "header.schema.json").read_text())
    assert on_disk == json_schema()


# -- structural rejections -------------------------------------------------------------------
def _mutated(path: str, value: Any) -> dict[str, Any]:
    """`_good()` with one field (dotted path, list indices as numbers) set to ``value``;
    ``value`` of `...` deletes the field."""
    h = copy.deepcopy(_good())
    node: Any = h
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return h


BAD_FIELDS = [
    ("producer", ...),
    ("producer", "x" * 257),
    ("producer", 3),
    ("tensors", ...),
    ("tensors", []),
    ("metadata", {"a": 1}),
    ("metadata", ["a"]),
    ("extra_top_level", 1),
    ("tensors.w.dtype", "F128"),
    ("tensors.w.dtype", "I32"),  # not clusterable
    ("tensors.w.shape", [5, -4]),
    ("tensors.w.shape", [5, 4.0]),
    ("tensors.w.shape", [5, "4"]),
    ("tensors.w.shape", [5, 4, 1, 1, 1, 1, 1, 1, 1]),  # MAX_NDIM + 1
    ("tensors.w.shape", [5, 2**53]),
    ("tensors.w.codec", "quantized"),
    ("tensors.w.chunk_rows", 0),
    ("tensors.w.chunk_rows", True),
    ("tensors.w.chunk_rows", 1),  # 5 chunks needed, 3 given
    ("tensors.w.chunk_rows", 3),  # 2 chunks needed, 3 given
    ("tensors.w.chunks.0.k", 0),
    ("tensors.w.chunks.0.k", 257),
    ("tensors.w.chunks.0.k", "1"),
    ("tensors.w.chunks.1.label_bits", 4),  # k=3 needs 2
    ("tensors.w.chunks.1.label_bits", 3),
    ("tensors.w.chunks.2.label_bits", 4),  # k=256 needs 8
    ("tensors.w.chunks.1.centroids.length", 4),  # k=3 needs 6
    ("tensors.w.chunks.1.centroids.encoding", "zstd"),
    ("tensors.w.chunks.1.labels.encoding", "gzip"),
    ("tensors.w.chunks.1.labels.offset", 65),  # unaligned
    ("tensors.w.chunks.1.labels.offset", -64),
    ("tensors.w.chunks.1.labels.offset", 2**63),
    ("tensors.w.chunks.1.labels.length", -1),
    ("tensors.w.chunks.1.labels.crc32", 2**32),
    ("tensors.w.chunks.1.labels.crc32", -1),
    ("tensors.w.chunks.1.labels.crc32", 1.0),
    ("tensors.w.chunks.1.labels.unknown", 1),
    ("tensors.w.chunks.1.extra", 1),
    ("tensors.w.extra", 1),
    ("tensors.w.quality", {"sqnr": "high"}),
    ("tensors.b.transform", "byte_planes"),  # float dtype with wrong transform is allowed...
    ("tensors.b.transform", "delta"),
    ("tensors.b.chunks.0.planes", []),  # F32 needs 4 planes
    ("tensors.b.chunks", []),
    ("tensors.tied.target", "missing"),
    ("tensors.tied.target", "tied"),  # alias of an alias (itself)
    ("tensors.tied.shape", [4, 5]),
    ("tensors.tied.dtype", "F16"),
    ("settings", {"k": 16, "bogus": 1}),
    ("settings", {"extra": {"a": 1}}),
]
# byte_planes on a float dtype is a legal (if poor) choice; only float_planes on ints is wrong.
BAD_FIELDS.remove(("tensors.b.transform", "byte_planes"))


@pytest.mark.parametrize(("path", "value"), BAD_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v in BAD_FIELDS])
def test_bad_field_rejected_naming_it(path: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        _parse(_mutated(path, value))
    msg = str(info.value)
    assert msg  # every rejection says something
    assert "field" in msg or "alias" in msg or "tensor" in msg


def test_message_names_the_field_path() -> None:
    with pytest.raises(ValueError, match=r"tensors\.w\.clustered\.chunks\.1"):
        _parse(_mutated("tensors.w.chunks.1.label_bits", 4))


def test_float_planes_only_for_float_dtypes() -> None:
    bad = _lossless([4], 4, 1, dtype="I32")
    bad["transform"] = "float_planes"
    with pytest.raises(ValueError, match="float_planes"):
        _parse(_header(i=bad))
    ok = _lossless([4], 4, 1, dtype="F16")
    ok["transform"] = "byte_planes"
    _parse(_header(f=ok))


def test_every_dtype_is_accepted_lossless() -> None:
    _parse(_header(**{n: _lossless([2], 2, 1, dtype=n) for n in DTYPES}))


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_clusterable_dtypes(dtype: str) -> None:
    _parse(_header(w=_clustered([2], 2, [4], dtype=dtype)))


def test_empty_tensor_name_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1 character"):
        _parse(_header(**{"": _lossless([1], 1, 1)}))


def test_max_ndim_accepted() -> None:
    _parse(_header(t=_lossless([1] * MAX_NDIM, 1, 1)))


def test_blob_offset_must_be_aligned() -> None:
    Blob(offset=128, length=3, encoding="raw", crc32=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        Blob(offset=96, length=3, encoding="raw", crc32=0)


def test_models_are_frozen() -> None:
    c = ClusteredChunk(
        k=2, label_bits=1, centroids=Blob(offset=64, length=4, encoding="raw", crc32=0), labels=Blob(**_blob())
    )
    with pytest.raises(ValueError):
        c.k = 3  # type: ignore[misc]


# -- the JSON layer (spec §3.3) ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"producer": "t", "tensors": {}', "JSON"),
        (b"", "JSON"),
        (b"[]", "field"),
        (b'"str"', "field"),
        (b'{"producer": "t", "producer": "u", "tensors": {}}', "duplicate"),
        (b'{"producer": "t", "tensors": {}, "metadata": {"a": "1", "a": "2"}}', "duplicate"),
        (b'{"producer": "t", "tensors": {}, "settings": {"level": NaN}}', "NaN"),
        (b'{"producer": "t", "tensors": {}, "settings": {"level": Infinity}}', "Infinity"),
        (b'{"producer": "t", "tensors": {}, "settings": {"level": -Infinity}}', "Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
)
def test_bad_json_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_header(raw)


def test_non_ascii_text_is_fine() -> None:
    h = parse_header(json.dumps({"producer": "t", "metadata": {"ключ": "值"}, "tensors": {}}, ensure_ascii=False).encode())
    assert h.metadata == {"ключ": "值"}


# -- forward compatibility (spec §10) -----------------------------------------------------------
UNKNOWN_FIELDS = ["new_top", "tensors.w.new_entry_field", "tensors.w.chunks.0.new_chunk_field",
                  "tensors.w.chunks.0.labels.new_blob_field", "tensors.b.chunks.1.planes.2.new_blob_field",
                  "tensors.tied.new_alias_field", "settings.new_setting"]


@pytest.mark.parametrize("path", UNKNOWN_FIELDS)
def test_unknown_field_strict_vs_lenient(path: str) -> None:
    h = _good()
    h["settings"] = {"k": 16}
    h = copy.deepcopy(h)
    node: Any = h
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = {"anything": [1, 2]}
    with pytest.raises(ValueError, match="xtra|not permitted|forbid"):
        _parse(h)
    got = _parse(h, lenient=True)
    assert got.tensors["w"].chunks[2].k == 256 and got.settings is not None and got.settings.k == 16


def test_lenient_still_validates_known_fields() -> None:
    h = _mutated("tensors.w.chunks.1.label_bits", 4)
    h["new_top"] = 1
    with pytest.raises(ValueError, match="label_bits"):
        _parse(h, lenient=True)


def test_unknown_codec_strict_vs_lenient() -> None:
    h = _good()
    h["tensors"]["q"] = {"dtype": "BF16", "shape": [2], "codec": "vq", "codebook": 3}
    h["tensors"]["q_tied"] = _alias("q", [2], "BF16")
    with pytest.raises(ValueError):
        _parse(h)
    got = _parse(h, lenient=True)
    assert got.unsupported == {"q": "codec 'vq'", "q_tied": "codec 'vq'"}
    assert set(got.tensors) == {"w", "b", "tied"}


NEW_VALUES = [
    ("tensors.w.chunks.1.labels.encoding", "brotli", "w", "encoding 'brotli'"),
    ("tensors.b.chunks.1.planes.0.encoding", "lz4", "b", "encoding 'lz4'"),
    ("tensors.b.transform", "delta_planes", "b", "transform 'delta_planes'"),
    ("tensors.b.dtype", "F4_E2M1", "b", "dtype 'F4_E2M1'"),
]


@pytest.mark.parametrize(("path", "value", "tensor", "what"), NEW_VALUES)
def test_unknown_value_refuses_only_its_tensor_when_lenient(path: str, value: str, tensor: str, what: str) -> None:
    """Spec §10: a new dtype, transform or encoding is a minor change; a reader opens the
    file and refuses only the tensors that need it (and their aliases)."""
    h = _mutated(path, value)
    with pytest.raises(ValueError):
        _parse(h)
    got = _parse(h, lenient=True)
    want = {tensor: what} | ({"tied": what} if tensor == "w" else {})
    assert got.unsupported == want
    assert set(got.tensors) == {"w", "b", "tied"} - set(want)


def test_wrong_types_stay_errors_when_lenient() -> None:
    for path, value in [("tensors.b.dtype", 7), ("tensors.w.chunks.1.labels.encoding", None), ("tensors.b.transform", [])]:
        with pytest.raises(ValueError):
            _parse(_mutated(path, value), lenient=True)


# -- spec 1.0.2: what a newer-minor reader still validates (§3.4, §10) ----------------------------
@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("tensors.b.dtype", "F4_E2M1", None),  # an unknown dtype: plane count and size unchecked
        ("tensors.b.chunks.1.planes.0.encoding", "lz4", None),
    ],
)
def test_unknown_value_entry_keeps_its_blobs(path: str, value: str, match: None) -> None:
    """A known codec with an unknown dtype, transform or encoding: its blobs are still listed for
    the range and overlap checks (spec §9.4 step 4)."""
    got = _parse(_mutated(path, value), lenient=True)
    assert "b" in got.unsupported
    assert len(got.unsupported_blobs) == 2 * 4  # two chunks of four F32 planes


def test_unknown_dtype_skips_only_the_rules_that_need_it() -> None:
    h = _mutated("tensors.b.dtype", "F4_E2M1")
    h["tensors"]["b"]["chunks"][0]["planes"].pop()  # a plane count only the dtype's size could check
    assert "b" in _parse(h, lenient=True).unsupported
    for path, value, match in [
        ("tensors.b.chunk_rows", 0, "chunk_rows"),
        ("tensors.b.chunks.1.planes.0.offset", 65, "offset"),
        ("tensors.b.chunks.1.planes.0.length", 2**63, "length"),
        ("tensors.b.shape", [3, -2], "shape"),
    ]:
        bad = _mutated("tensors.b.dtype", "F4_E2M1")
        bad = _set(bad, path, value)
        with pytest.raises(ValueError, match=match):
            _parse(bad, lenient=True)


def test_unknown_centroid_encoding_skips_the_2k_length() -> None:
    h = _mutated("tensors.w.chunks.1.centroids.encoding", "brotli")
    h["tensors"]["w"]["chunks"][1]["centroids"]["length"] = 5
    got = _parse(h, lenient=True)
    assert got.unsupported == {"w": "encoding 'brotli'", "tied": "encoding 'brotli'"}
    h["tensors"]["w"]["chunks"][1]["centroids"]["encoding"] = "zstd"  # known: the rule applies
    with pytest.raises(ValueError, match="2\\*k"):
        _parse(h, lenient=True)


def test_unknown_codec_entry_needs_dtype_shape_codec() -> None:
    for drop in ("dtype", "shape"):
        h = _good()
        h["tensors"]["q"] = {"dtype": "BF16", "shape": [2], "codec": "vq", "anything": None}
        del h["tensors"]["q"][drop]
        with pytest.raises(ValueError, match=drop):
            _parse(h, lenient=True)
    h = _good()
    h["tensors"]["q"] = {"dtype": "BF16", "shape": [2], "codec": "vq", "anything": None, "big": [1e308]}
    got = _parse(h, lenient=True)
    assert got.unsupported == {"q": "codec 'vq'"} and got.unsupported_blobs == []
    h["tensors"]["q_tied"] = _alias("q", [3], "BF16")  # compared with its target although unknown
    with pytest.raises(ValueError, match="alias"):
        _parse(h, lenient=True)


def test_value_rules_only_in_known_fields() -> None:
    """§3.4's value rules (null, finite numbers, lone surrogates) reach known fields only; §3.3's
    (syntax, NaN and Infinity literals, duplicate keys) every byte of the header."""
    text = json.dumps(_good())
    ignored = text.replace('{"producer"', '{"future": [1e400, -1e999, 1%s, null, "\\ud800"], "producer"' % ("0" * 400), 1)
    _parse(ignored, lenient=True)
    with pytest.raises(ValueError):
        _parse(ignored)  # unknown in the reader's own minor
    w = '"codec": "clustered", '
    assert text.count(w) == 1
    # each passes every other rule: quality values are numbers, metadata values strings, and
    # quality is optional (its null is refused by §3.4 alone)
    for known in [text.replace(w, w + f'"quality": {{"q": {n}}}, ', 1) for n in ("1e400", "1" + "0" * 400, "9" * 5000)] + [
        text.replace(w, w + '"quality": null, ', 1), text.replace('"a": "b"', '"a": "\\ud800"', 1),
    ]:  # fmt: skip
        with pytest.raises(ValueError):
            _parse(known, lenient=True)
        assert "ud800" in known or "quality" in known
    _parse(text.replace(w, w + '"quality": {"q": 1e300}, ', 1), lenient=True)  # the same place, finite
    for bad in ('{"future": [NaN], "producer"', '{"future": {"a": 1, "\\u0061": 2}, "producer"'):
        with pytest.raises(ValueError):
            _parse(text.replace('{"producer"', bad, 1), lenient=True)


def _set(h: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = h
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return h


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("tensors.w.chunks.1.k", 0, "k"),
        ("tensors.w.chunks.1.label_bits", 8, "label_bits"),
        ("tensors.w.chunks.1.labels.offset", 96, "offset"),
        ("tensors.w.chunks.1.centroids.crc32", 2**32, "crc32"),
        ("tensors.w.chunks.0.centroids.length", 4, "2\\*k"),  # another chunk: its encoding is known
        ("tensors.w.quality", {"rel_error": "low"}, "quality"),
        ("tensors.w.dtype", "F64", "clustered"),
        ("tensors.w.chunk_rows", True, "chunk_rows"),
        ("tensors.tied.shape", [5, 5], "alias"),
    ],
)
def test_unknown_encoding_entry_keeps_its_other_rules(path: str, value: Any, match: str) -> None:
    """A clustered entry with a labels blob of unknown encoding (newer minor) is refused only when
    requested, but each of its other fields is checked as usual."""
    h = _mutated("tensors.w.chunks.1.labels.encoding", "brotli")
    assert _parse(h, lenient=True).unsupported == {"w": "encoding 'brotli'", "tied": "encoding 'brotli'"}
    with pytest.raises(ValueError, match=match):
        _parse(_set(h, path, value), lenient=True)


# -- survivors of `python tools/mutation.py wcfmt/schema.py` (tools/NOTES-mutation.md) ------------
def test_strict_is_the_default() -> None:
    """A header of the reader's own minor: an unknown field is an error unless lenient is asked."""
    h = _good()
    h["new_top"] = 1
    with pytest.raises(ValueError, match="new_top"):
        parse_header(json.dumps(h).encode())


def test_serialized_header_bytes_by_hand() -> None:
    """Compact JSON (no spaces), UTF-8 text not \\u escapes, fields in model order, None left out:
    the bytes written by hand from spec §3.3."""
    h = Header.model_validate(_header(w=_clustered([1, 2], 1, [2])) | {"producer": "wcfmt é"})
    want = (
        '{"producer":"wcfmt é","metadata":{"a":"b"},"tensors":{"w":{"dtype":"BF16","shape":[1,2],'
        '"codec":"clustered","chunk_rows":1,"chunks":[{"k":2,"label_bits":1,'
        '"centroids":{"offset":64,"length":4,"encoding":"raw","crc32":0},'
        '"labels":{"offset":128,"length":0,"encoding":"raw","crc32":0}}]}}}'
    ).encode("utf-8")
    assert serialize_header(h) == want


@pytest.mark.parametrize("raw", [b"[]", b'{"producer": "x", "tensors": 5}', b'{"producer": "x", "tensors": {"a": 5}}'])
def test_lenient_parse_of_non_objects_is_a_header_error(raw: bytes) -> None:
    """A header, tensors map or entry that is not an object is a ValueError in lenient mode too
    (not a TypeError or AttributeError from walking it)."""
    with pytest.raises(ValueError):
        parse_header(raw, lenient=True)


def test_settings_integers_beyond_binary64_are_rejected() -> None:
    """§3.4: every number finite in binary64. 10^308 (309 digits) is; 10^309 (310 digits) and
    2·10^308 are not, whatever field holds them."""
    for big, ok in ((10**308, True), (10**309, False), (2 * 10**308, False)):
        h = _good()
        h["settings"] = {"k": big}
        if ok:
            assert _parse(h).settings.k == big
        else:
            with pytest.raises(ValueError, match="settings"):
                _parse(h)


def test_validation_messages_list_five_errors_then_a_count() -> None:
    """Pydantic errors are named field by field: the first five, "; "-separated, then how many
    more; one error is one "field PATH: message" with nothing after it."""
    h = _good()
    for i in range(7):
        h["tensors"][f"x{i}"] = {"dtype": "BF16", "shape": [2], "codec": "alias", "target": 5}
    with pytest.raises(ValueError) as e:
        _parse(h)
    msg = str(e.value)
    assert msg.count("field tensors.") == 5 and msg.endswith("; and 2 more")
    assert len(msg.split("; ")) == 6 and "XX" not in msg
    del h["tensors"]["x6"]  # six errors: five named, "and 1 more"
    with pytest.raises(ValueError, match="; and 1 more$"):
        _parse(h)
    with pytest.raises(ValueError) as e:
        _parse(_mutated("tensors.w.chunks.0.k", "3"))
    assert str(e.value).startswith("field tensors.w.") and "more" not in str(e.value)
    assert str(e.value).endswith(e.value.args[0].rpartition(": ")[2]) and "XX" not in str(e.value)
    with pytest.raises(ValueError, match="^field <root>: "):
        parse_header(b"[]")


def _future(**tensors: dict[str, Any]) -> dict[str, Any]:
    """`_good()` plus tensors that need a value 1.0 lacks (a newer minor's file, parsed leniently)."""
    h = _good()
    h["tensors"].update(tensors)
    return h


def test_unsupported_entries_keep_every_blob_and_name_it() -> None:
    """Two tensors of an unknown encoding: both tensors' blobs are kept for the range checks,
    each described by its tensor, chunk and field."""
    a = _clustered([2, 2], 2, [2])
    a["chunks"][0]["labels"]["encoding"] = "brotli"
    b = _lossless([1, 2], 1, 1, dtype="I16")
    b["chunks"][0]["planes"][1]["encoding"] = "lz4"
    got = _parse(_future(a=a, b2=b), lenient=True)
    assert got.unsupported == {"a": "encoding 'brotli'", "b2": "encoding 'lz4'"}
    names = sorted(what for _, _, what in got.unsupported_blobs)
    assert names == ["tensor 'a' chunk 0 centroids", "tensor 'a' chunk 0 labels",
                     "tensor 'b2' chunk 0 plane 0", "tensor 'b2' chunk 0 plane 1"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        # the fields of the entry's own codec are required even when its dtype is unknown
        ({"dtype": "X9", "shape": [2], "codec": "clustered", "chunks": []}, r"tensor 'n': missing field\(s\) \['chunk_rows'\]"),
        ({"dtype": "X9", "shape": [2], "codec": "alias"}, r"tensor 'n': missing field\(s\) \['target'\]"),
        # §4.2: 2^63 bytes or more, with a known element size (an unknown codec's entry)
        ({"dtype": "F32", "shape": [2**30, 2**31], "codec": "vq"}, "2\\^63"),  # exactly 2^63
        ({"dtype": "F32", "shape": [2**31, 2**31], "codec": "vq"}, "2\\^63"),
        # alias rules on an alias that needs an unknown value
        ({"dtype": "X9", "shape": [2], "codec": "alias", "target": "nowhere"}, "tensor 'n': alias target 'nowhere'"),
        ({"dtype": "X9", "shape": [2], "codec": "alias", "target": ["w"]}, "tensor 'n': alias target"),
        ({"dtype": "X9", "shape": [5, 4], "codec": "alias", "target": "tied"}, "'tied' is not a non-alias tensor"),
        ({"dtype": "X9", "shape": [2], "codec": "alias", "target": "\ud800"}, "surrogate"),
        # §3.4 value rules on the known fields of a known codec's entry (a quality key here)
        ({"dtype": "X9", "shape": [0], "codec": "clustered", "chunk_rows": 1, "chunks": [],
          "quality": {"\ud800": 1.0}}, "surrogate"),
        # float_planes is for float dtypes, also in an entry refused for an unknown encoding
        ({"dtype": "I16", "shape": [1], "codec": "lossless", "transform": "float_planes", "chunk_rows": 1,
          "chunks": [{"planes": [_blob(), _blob(encoding="lz4")]}]}, "tensor 'n': transform float_planes"),
        # messages name the tensor, chunk and field
        ({"dtype": "X9", "shape": [2], "codec": "clustered", "chunk_rows": 2,
          "chunks": [{"k": 2, "label_bits": 1, "centroids": _blob(64, 4), "labels": _blob(65)}]},
         "tensor 'n' chunk 0 labels: field offset"),
        ({"dtype": "X9", "shape": [2], "codec": "clustered", "chunk_rows": 2,
          "chunks": [{"k": 2, "label_bits": 2, "centroids": _blob(64, 4), "labels": _blob(128)}]},
         "tensor 'n' chunk 0: "),
        ({"dtype": "X9", "shape": [1], "codec": "lossless", "transform": "byte_planes", "chunk_rows": 1,
          "chunks": [{"planes": [_blob(), _blob(crc32=-1)]}]}, "tensor 'n' chunk 0 plane 1: field crc32"),
    ],
)
def test_rules_of_entries_that_need_an_unknown_value(entry: dict[str, Any], match: str) -> None:
    """§10: an entry a newer minor's file holds, needing a value 1.0 lacks, still obeys every rule
    that does not depend on that value, and its faults are named."""
    if entry["codec"] == "alias" and entry.get("target") == "tied":  # an alias of an alias, of an unknown dtype
        h = _future(q={"dtype": "BF16", "shape": [5, 4], "codec": "vq"}, n=entry)
        h["tensors"]["tied"] = _alias("q", [5, 4], "BF16")
    else:
        h = _future(n=entry)
    with pytest.raises(ValueError, match=match):
        _parse(h, lenient=True)


def test_lenient_drops_unknown_fields_inside_centroid_blobs() -> None:
    h = _mutated("tensors.w.chunks.0.centroids.note", "new in 1.1")
    with pytest.raises(ValueError, match="note"):
        _parse(h)
    assert _parse(h, lenient=True).tensors["w"].chunks[0].centroids.length == 2


@pytest.mark.parametrize(("name", "match"), [("", "empty"), ("\ud800", "surrogate")])
def test_names_of_entries_that_need_an_unknown_value_obey_the_name_rules(name: str, match: str) -> None:
    """An entry set aside for an unknown codec is still a key of `tensors`: an empty name or one
    holding a lone surrogate fails the whole header, as the reference decoder has it (wcfmt
    accepted both before this test)."""
    h = _future(**{name: {"dtype": "BF16", "shape": [2], "codec": "vq"}})
    with pytest.raises(ValueError, match=match):
        _parse(h, lenient=True)
