"""Reference decoder for .wclust 1.0 (spec revision 1.0.2), written from `spec/wclust-v1.md` alone.

Educational and canonical, in the spirit of zstd's educational decoder: plain code that follows
the spec section by section, numpy and zstandard only, no import of `wcfmt`. It reads a whole
file, checks every rule a reader MUST check in the order of spec §9.4, and returns every tensor's
bytes; or it raises one of the four error classes of §9.4.

    python spec/reference/wclust_ref.py FILE.wclust     # prints one line per tensor, or the error

It is slow on purpose where speed would hide the rule (the zstd frame walk, §7.1). The test
suite runs it and wcfmt over every vector and over files wcfmt writes, and requires the two to
agree (`tests/test_reference_decoder.py`). The conformance vectors' expected outputs are made by
this decoder (`tools/make_vectors.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

__all__ = [
    "FormatError", "HeaderError", "ChecksumError", "VersionError",
    "Tensor", "Decoded", "decode", "decode_file",
]  # fmt: skip


# -- §9.4 error classes --------------------------------------------------------------------------
class FormatError(Exception):
    """The bytes break a structural or data rule (§3, §5.3-§5.4, §6, §7.1)."""


class HeaderError(FormatError):
    """The JSON header breaks a rule of §3.3-§6 (syntax, types, ranges, cross-field rules)."""


class ChecksumError(FormatError):
    """A CRC-32 does not match the bytes it covers (§7.3)."""


class VersionError(FormatError):
    """An unimplemented major version, or a requested tensor needing what 1.0 lacks (§10)."""


# -- §3.1 preamble --------------------------------------------------------------------------------
MAGIC = b"\x89WCLUST\n"
IMPLEMENTED_MINOR = 0
MAX_HEADER = 104_857_600
ALIGN = 64

# -- §4.2 element sizes ---------------------------------------------------------------------------
ELEMENT_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
FLOATS = ("F64", "F32", "F16", "BF16")
CLUSTERED_DTYPES = ("F32", "F16", "BF16")
CODECS = ("clustered", "lossless", "alias")
TRANSFORMS = ("byte_planes", "float_planes")
ENCODINGS = ("raw", "zstd")

# Fields of each object (§4-§6); in a file of minor 0 any other key is an error (§10).
TOP_FIELDS = {"producer", "metadata", "settings", "tensors"}
SETTINGS_FIELDS = {"k", "chunk_rows", "include", "exclude", "level", "method", "extra"}
COMMON_FIELDS = {"dtype", "shape", "codec"}
CLUSTERED_FIELDS = COMMON_FIELDS | {"chunk_rows", "chunks", "quality"}
LOSSLESS_FIELDS = COMMON_FIELDS | {"transform", "chunk_rows", "chunks"}
ALIAS_FIELDS = COMMON_FIELDS | {"target"}
CHUNK_FIELDS = {"k", "label_bits", "centroids", "labels"}
BLOB_FIELDS = {"offset", "length", "encoding", "crc32"}

ZSTD_MAGIC = 0xFD2FB528
MAX_WINDOW = 1 << 27  # §7.1


@dataclass
class Tensor:
    dtype: str
    shape: list[int]
    data: bytes  # row-major elements, little-endian, in `dtype`


@dataclass
class Decoded:
    version: tuple[int, int]
    producer: str
    metadata: dict[str, str]
    tensors: dict[str, Tensor]  # in header order; aliases included
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> target


def crc32(b: bytes) -> int:  # §7.3: ISO-HDLC, as zlib and PNG
    return zlib.crc32(b) & 0xFFFFFFFF


# -- §3.1 -------------------------------------------------------------------------------------------
def read_preamble(data: bytes) -> tuple[int, int, int, int, int]:
    if len(data) < 64:
        raise FormatError(f"file is {len(data)} bytes, shorter than the 64-byte preamble")
    magic, major, minor, flags, h_off, h_len, h_crc = struct.unpack_from("<8sHHIQQI", data, 0)
    reserved = data[36:64]
    if magic != MAGIC:
        raise FormatError("bad magic")
    if major != 1:
        raise VersionError(f"file version {major}.{minor}, this decoder implements 1.{IMPLEMENTED_MINOR}")
    if flags != 0:
        raise FormatError("flags are not zero")
    if any(reserved):
        raise FormatError("reserved preamble bytes are not zero")
    if h_len > MAX_HEADER:
        raise FormatError("header_length exceeds 104,857,600")
    if h_off < 64 or h_off % ALIGN:
        raise FormatError("header_offset below 64 or not a multiple of 64")
    if h_off + h_len != len(data):
        raise FormatError("header_offset + header_length is not the file size")
    return major, minor, h_off, h_len, h_crc


# -- §3.3 / §3.4 JSON ------------------------------------------------------------------------------
def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # compared after unescaping: "a" and "\u0061" are the same key
            raise HeaderError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise HeaderError(f"{name} is not JSON")


def _float(text: str) -> float:
    return float(text)  # 1e400 becomes inf here; §3.4 rejects it only in a field this decoder knows


def _int(text: str) -> int | float:
    # A JSON integer without leading zeros and of more than 309 digits is at least 10^309, beyond
    # binary64 (CPython's int() would also refuse more than 4300 digits, with a ValueError that is
    # not a JSON error); inf stands for such a number until §3.4 looks at it (known fields only).
    if len(text.lstrip("-")) > 309:
        return math.inf
    v = int(text)
    try:
        float(v)
    except OverflowError:
        return math.inf
    return v


def _scalar_values(node: Any) -> None:
    """§3.4's value rules, for the known fields they are applied to: no null, every number finite
    in binary64, strings Unicode scalar values (no lone surrogates)."""
    if node is None:
        raise HeaderError("null is not a valid header value")
    if isinstance(node, float) and not math.isfinite(node):
        raise HeaderError("number overflows binary64")
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderError("string holds a lone surrogate") from None
    elif isinstance(node, dict):
        for k, v in node.items():
            _scalar_values(k)
            _scalar_values(v)
    elif isinstance(node, list):
        for v in node:
            _scalar_values(v)


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise HeaderError("header is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise HeaderError("header starts with a byte order mark")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"header is not JSON ({e})") from None


# -- §4-§6 header rules ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def _is_num(v: Any) -> bool:
    """A JSON number that is a finite binary64 value (§3.4)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer literal beyond binary64
        return False


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise HeaderError(f"{what} must be an object")
    return v


def _keys(obj: dict[str, Any], allowed: set[str], required: set[str], what: str, lenient: bool) -> dict[str, Any]:
    extra = set(obj) - allowed
    if extra and not lenient:
        raise HeaderError(f"{what}: unknown field(s) {sorted(extra)}")
    obj = {k: v for k, v in obj.items() if k in allowed}
    missing = required - set(obj)
    if missing:
        raise HeaderError(f"{what}: missing field(s) {sorted(missing)}")
    return obj


def _int_in(v: Any, lo: int, hi: int, what: str) -> int:
    if not _is_int(v) or not lo <= v < hi:
        raise HeaderError(f"{what} must be an integer in [{lo}, {hi})")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise HeaderError(f"{what} must be a string")
    return v


def _blob(v: Any, what: str, lenient: bool) -> tuple[dict[str, Any], str | None]:  # §4.4
    """Return the blob and, in a newer-minor file, its unknown encoding (else None)."""
    b = _keys(_obj(v, what), BLOB_FIELDS, BLOB_FIELDS, what, lenient)
    _int_in(b["offset"], 0, 2**63, f"{what}.offset")
    if b["offset"] % ALIGN:  # a field rule (§4.4), checked with the header, not a placement rule
        raise HeaderError(f"{what}.offset is not a multiple of 64")
    _int_in(b["length"], 0, 2**63, f"{what}.length")
    _int_in(b["crc32"], 0, 2**32, f"{what}.crc32")
    unknown = _known_value(b["encoding"], ENCODINGS, "encoding", what, lenient)
    return b, unknown


def _known_value(v: Any, known: tuple[str, ...] | dict[str, int], field: str, what: str, lenient: bool) -> str | None:
    """§10: a string this version does not know is an unknown value in a newer-minor file (the
    tensor needs it) and an error in a file of its own minor; anything but a string is an error."""
    if not isinstance(v, str):
        raise HeaderError(f"{what}.{field} must be a string")
    if v in known:
        return None
    if not lenient:
        raise HeaderError(f"{what}: unknown {field} {v!r}")
    return f"{field} {v!r}"


def width(k: int) -> int:  # §5.3
    for w in (0, 1, 2, 4, 8):
        if 2**w >= k:
            return w
    raise AssertionError(k)


def rows_of(shape: list[int]) -> tuple[int, int]:  # §4.6
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _chunk_count(shape: list[int], chunk_rows: int, n: int, what: str) -> None:  # §4.6
    rows, row = rows_of(shape)
    want = 0 if rows * row == 0 else -(-rows // chunk_rows)
    if n != want:
        raise HeaderError(f"{what}: {n} chunks, needs {want}")


def _entry(name: str, v: Any, lenient: bool) -> tuple[dict[str, Any], str | None]:
    """Validate one tensor entry (§4.2, §5, §6, §10); return its known fields and, in a newer-minor
    file, the first unknown value it needs (codec, dtype, transform, encoding) or None.

    A rule that depends on an unknown value is skipped (the element size of an unknown dtype, the
    fields of an unknown codec, the 2*k length of a centroid blob of unknown encoding); every
    other rule applies as in a file of this decoder's own minor."""
    what = f"tensor {name!r}"
    e = _obj(v, what)
    if "codec" not in e:
        raise HeaderError(f"{what}: missing field(s) ['codec']")
    needs = [_known_value(e["codec"], CODECS, "codec", what, lenient)]
    codec = e["codec"]
    allowed = {"clustered": CLUSTERED_FIELDS, "lossless": LOSSLESS_FIELDS, "alias": ALIAS_FIELDS}.get(codec, COMMON_FIELDS)
    # an unknown codec's other fields are unknown fields: ignored, whatever they hold (§10)
    e = _keys(e, allowed, allowed - {"quality"}, what, lenient)
    needs.append(_known_value(e["dtype"], ELEMENT_SIZE, "dtype", what, lenient))  # §4.2
    size = ELEMENT_SIZE.get(e["dtype"])  # None: unknown dtype (newer minor)
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > 8:
        raise HeaderError(f"{what}: shape must be an array of at most 8 integers")
    for d in shape:
        _int_in(d, 0, 2**53, f"{what}: dimension")
    if size is not None and math.prod(shape) * size >= 2**63:  # §4.2: sizes fit in 63 bits
        raise HeaderError(f"{what}: tensor size overflows 2^63 bytes")
    if codec == "alias":
        _str(e["target"], f"{what}.target")
    if codec not in ("clustered", "lossless"):
        return e, next((n for n in needs if n), None)
    _int_in(e["chunk_rows"], 1, 2**53, f"{what}.chunk_rows")
    if not isinstance(e["chunks"], list):
        raise HeaderError(f"{what}.chunks must be an array")
    if codec == "clustered":  # §5.1
        if size is not None and e["dtype"] not in CLUSTERED_DTYPES:
            raise HeaderError(f"{what}: dtype {e['dtype']} cannot be clustered")
        if "quality" in e:  # §5.6
            q = _obj(e["quality"], f"{what}.quality")
            if not all(isinstance(k, str) and _is_num(x) for k, x in q.items()):
                raise HeaderError(f"{what}.quality must map strings to numbers")
        chunks = []
        for i, c in enumerate(e["chunks"]):  # §5.2
            cw = f"{what} chunk {i}"
            c = _keys(_obj(c, cw), CHUNK_FIELDS, CHUNK_FIELDS, cw, lenient)
            k = _int_in(c["k"], 1, 257, f"{cw}.k")
            if not _is_int(c["label_bits"]) or c["label_bits"] != width(k):
                raise HeaderError(f"{cw}: label_bits must be width(k) = {width(k)}")
            c["centroids"], cent_needs = _blob(c["centroids"], f"{cw}.centroids", lenient)
            c["labels"], label_needs = _blob(c["labels"], f"{cw}.labels", lenient)
            needs += [cent_needs, label_needs]
            if cent_needs is None and (c["centroids"]["encoding"] != "raw" or c["centroids"]["length"] != 2 * k):
                raise HeaderError(f"{cw}: centroids must be raw, 2*k bytes")
            chunks.append(c)
        e["chunks"] = chunks
    else:  # §6.1
        transform_needs = _known_value(e["transform"], TRANSFORMS, "transform", what, lenient)
        needs.insert(2, transform_needs)  # codec, dtype, transform, then blob encodings
        if size is not None and e["transform"] == "float_planes" and e["dtype"] not in FLOATS:
            raise HeaderError(f"{what}: float_planes is only for float dtypes")
        chunks = []
        for i, c in enumerate(e["chunks"]):
            cw = f"{what} chunk {i}"
            c = _keys(_obj(c, cw), {"planes"}, {"planes"}, cw, lenient)
            if not isinstance(c["planes"], list) or (size is not None and len(c["planes"]) != size):
                raise HeaderError(f"{cw}: needs one plane per byte of the element")
            planes = []
            for j, p in enumerate(c["planes"]):
                blob, blob_needs = _blob(p, f"{cw} plane {j}", lenient)
                planes.append(blob)
                needs.append(blob_needs)
            c["planes"] = planes
            chunks.append(c)
        e["chunks"] = chunks
    _chunk_count(shape, e["chunk_rows"], len(e["chunks"]), what)
    return e, next((n for n in needs if n), None)


def validate_header(h: Any, lenient: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """§4: return (the header with its known fields, tensors needing what 1.0 lacks).

    Every entry is validated, also one that needs an unknown value (§10): only the rules that
    depend on that value are skipped. §3.4's value rules apply to known fields only; what a
    newer-minor file holds in a field this decoder ignores, it ignores."""
    h = _keys(_obj(h, "header"), TOP_FIELDS, {"producer", "tensors"}, "header", lenient)
    if not isinstance(h["producer"], str) or len(h["producer"]) > 256:  # code points (§3.4)
        raise HeaderError("producer must be a string of at most 256 characters")
    if "metadata" in h:
        m = _obj(h["metadata"], "metadata")
        if not all(isinstance(v, str) for v in m.values()):
            raise HeaderError("metadata values must be strings")
    if "settings" in h:  # §4.3: informative, but still typed
        s = _keys(_obj(h["settings"], "settings"), SETTINGS_FIELDS, set(), "settings", lenient)
        for key in ("k", "chunk_rows", "level"):  # any integer §3.4 allows: no range of their own
            if key in s and not _is_int(s[key]):
                raise HeaderError(f"settings.{key} must be an integer")
        for key in ("include", "exclude"):
            if key in s and not (isinstance(s[key], list) and all(isinstance(x, str) for x in s[key])):
                raise HeaderError(f"settings.{key} must be an array of strings")
        if "method" in s and not isinstance(s["method"], str):
            raise HeaderError("settings.method must be a string")
        if "extra" in s and not all(isinstance(v, str) for v in _obj(s["extra"], "settings.extra").values()):
            raise HeaderError("settings.extra must map strings to strings")
        h["settings"] = s
    entries: dict[str, Any] = {}
    unsupported: dict[str, str] = {}
    for name, e in _obj(h["tensors"], "tensors").items():
        if name == "":
            raise HeaderError("tensor names must not be empty")
        entries[name], needs = _entry(name, e, lenient)
        if needs is not None:
            unsupported[name] = needs
    h["tensors"] = entries
    _scalar_values(h)  # §3.4 on every known field (unknown ones were dropped above)
    for name, e in entries.items():  # §4.5
        if e["codec"] == "alias":
            t = entries.get(e["target"])
            if t is None:
                raise HeaderError(f"alias {name!r}: target is not a tensor of the file")
            if t["codec"] == "alias":
                raise HeaderError(f"alias {name!r}: target is itself an alias")
            if t["dtype"] != e["dtype"] or t["shape"] != e["shape"]:
                raise HeaderError(f"alias {name!r}: dtype or shape differs from its target")
            if name not in unsupported and e["target"] in unsupported:  # §10: it needs what its target needs
                unsupported[name] = unsupported[e["target"]]
    return h, unsupported


# -- §3.2 blob ranges -----------------------------------------------------------------------------
def blobs_of(e: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in e.get("chunks", []):
        out += c["planes"] if "planes" in c else [c["centroids"], c["labels"]]
    return out


def check_ranges(tensors: dict[str, Any], h_off: int) -> None:
    spans = []
    for e in tensors.values():
        for b in blobs_of(e):
            if b["offset"] < 64 or b["offset"] + b["length"] > h_off:
                raise FormatError("a blob lies outside [64, header_offset]")
            if b["length"]:
                spans.append((b["offset"], b["offset"] + b["length"]))
    spans.sort()
    for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError("two non-empty blobs overlap")


# -- §7.1 zstd frames -----------------------------------------------------------------------------
def walk_zstd_frame(frame: bytes) -> int:
    """Check §7.1's framing rules by walking the frame; return its declared content size."""
    if len(frame) < 4:
        raise FormatError("zstd: shorter than a magic number")
    magic = struct.unpack_from("<I", frame)[0]
    if magic & 0xFFFFFFF0 == 0x184D2A50:
        raise FormatError("zstd: skippable frame")
    if magic != ZSTD_MAGIC:
        raise FormatError("zstd: bad frame magic")
    if len(frame) < 5:
        raise FormatError("zstd: truncated frame header")
    fhd = frame[4]
    fcs_flag, single, reserved, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved:
        raise FormatError("zstd: reserved frame header bit set")
    if did_flag:
        raise FormatError("zstd: frame names a dictionary")
    pos = 5
    if not single:
        if len(frame) < pos + 1:
            raise FormatError("zstd: truncated window descriptor")
        wd = frame[pos]
        pos += 1
        base = 1 << (10 + (wd >> 3))
        if base + (base // 8) * (wd & 7) > MAX_WINDOW:
            raise FormatError("zstd: window larger than 128 MiB")
    fcs_size = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    if fcs_size == 0:
        raise FormatError("zstd: frame does not declare its content size")
    if len(frame) < pos + fcs_size:
        raise FormatError("zstd: truncated content size")
    size = int.from_bytes(frame[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    pos += fcs_size
    while True:
        if len(frame) < pos + 3:
            raise FormatError("zstd: truncated block header")
        bh = int.from_bytes(frame[pos : pos + 3], "little")
        pos += 3
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise FormatError("zstd: reserved block type")
        pos += 1 if btype == 1 else bsize
        if pos > len(frame):
            raise FormatError("zstd: truncated block")
        if last:
            break
    pos += 4 if checksum else 0
    if pos != len(frame):
        raise FormatError("zstd: blob is not exactly one frame (truncated or followed by further bytes)")
    return size


def decode_blob(data: bytes, b: dict[str, Any], expected: int) -> bytes:
    """§7.3 then §7.1: CRC first, then the encoding's rules; return exactly ``expected`` bytes."""
    stored = data[b["offset"] : b["offset"] + b["length"]]
    if crc32(stored) != b["crc32"]:
        raise ChecksumError("blob CRC-32 mismatch")
    if b["encoding"] == "raw":
        if len(stored) != expected:
            raise FormatError(f"raw blob of {len(stored)} bytes, expected {expected}")
        return stored
    if walk_zstd_frame(stored) != expected:
        raise FormatError(f"zstd frame does not declare {expected} bytes")
    try:
        if expected == 0:
            # python-zstandard's one-shot decompress returns b"" for a frame that declares 0
            # bytes without decoding its blocks; rule 6 still needs them decoded (and empty)
            out = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False).read(1)
        else:
            out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise FormatError(f"zstd: corrupt frame ({e})") from None
    if len(out) != expected:
        raise FormatError("zstd frame decoded to another size")
    return out


# -- §5 clustered ----------------------------------------------------------------------------------
def table_bits(table_f16_bits: np.ndarray, dtype: str) -> np.ndarray:  # §5.5
    if dtype == "F16":
        return table_f16_bits.astype("<u2")
    f32 = table_f16_bits.view("<f2").astype("<f4")  # exact widening
    if dtype == "F32":
        return f32.view("<u4")
    u = f32.view("<u4").astype(np.uint64)  # BF16: round to nearest, ties to even (no NaN here)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def decode_clustered(data: bytes, e: dict[str, Any]) -> bytes:
    rows, row = rows_of(e["shape"])
    parts = []
    for i, c in enumerate(e["chunks"]):
        n = (min((i + 1) * e["chunk_rows"], rows) - i * e["chunk_rows"]) * row
        k, w = c["k"], c["label_bits"]
        tab = np.frombuffer(decode_blob(data, c["centroids"], 2 * k), "<u2")  # §5.4
        vals = tab.view("<f2").astype(np.float64)
        if not np.isfinite(vals).all():
            raise FormatError(f"chunk {i}: centroid NaN or infinity")
        if k > 1 and not (vals[1:] > vals[:-1]).all():  # as numbers: -0.0 == +0.0 is not ascending
            raise FormatError(f"chunk {i}: centroids not strictly ascending")
        plane = np.frombuffer(decode_blob(data, c["labels"], -(-n * w // 8)), np.uint8)  # §5.3
        if w == 0:
            labels = np.zeros(n, np.uint8)
        else:  # label j: bits [(j mod p)*w, +w) of byte j div p, least significant first
            p = 8 // w
            shifts = (np.arange(p) * w).astype(np.uint8)
            every = ((plane[:, None] >> shifts[None, :]) & np.uint8((1 << w) - 1)).reshape(-1)
            if every[n:].any():
                raise FormatError(f"chunk {i}: nonzero padding bits")
            labels = every[:n]
        if labels.size and labels.max() >= k:
            raise FormatError(f"chunk {i}: label >= k")
        parts.append(table_bits(tab, e["dtype"])[labels].tobytes())
    return b"".join(parts)


# -- §6 lossless -----------------------------------------------------------------------------------
def decode_lossless(data: bytes, e: dict[str, Any]) -> bytes:
    rows, row = rows_of(e["shape"])
    s = ELEMENT_SIZE[e["dtype"]]
    bits = np.uint64(8 * s)
    one = np.uint64(1)
    parts = []
    for i, c in enumerate(e["chunks"]):
        n = (min((i + 1) * e["chunk_rows"], rows) - i * e["chunk_rows"]) * row
        words = np.zeros(n, np.uint64)  # every element size fits in 64 bits
        for p, b in enumerate(c["planes"]):  # plane p is byte s-1-p of x' (§6.2)
            plane = np.frombuffer(decode_blob(data, b, n), np.uint8)
            words |= plane.astype(np.uint64) << np.uint64(8 * (s - 1 - p))
        if e["transform"] == "float_planes":  # undo the left rotation by one bit
            words = (words >> one) | ((words & one) << (bits - one))
        out = words.astype("<u8").view(np.uint8).reshape(n, 8)[:, :s].tobytes()  # low s bytes, LE
        if e["dtype"] == "BOOL" and np.frombuffer(out, np.uint8).max(initial=0) > 1:  # §6.3
            raise FormatError(f"chunk {i}: BOOL byte other than 0 or 1")
        parts.append(out)
    return b"".join(parts)


# -- whole file --------------------------------------------------------------------------------------
def decode(data: bytes, *, max_bytes: int | None = None, names: list[str] | None = None) -> Decoded:
    """Check and decode the tensors ``names`` asks for (default: every tensor), in the check order
    of §9.4. Steps 1-4 check the whole file whatever is asked for; steps 5 and 6 only the tensors
    asked for (an alias's target with it). A name the file does not hold raises KeyError."""
    major, minor, h_off, h_len, h_crc = read_preamble(data)  # 1. preamble
    raw = data[h_off : h_off + h_len]
    if crc32(raw) != h_crc:  # 2. header CRC
        raise ChecksumError("header CRC-32 mismatch")
    try:
        h, unsupported = validate_header(parse_json(raw), lenient=minor > IMPLEMENTED_MINOR)  # 3. header
    except RecursionError:
        raise HeaderError("header nested too deeply") from None
    check_ranges(h["tensors"], h_off)  # 4. blob ranges (an unknown codec's entry holds no known blob)
    tensors = h["tensors"]
    requested = list(tensors) if names is None else [n for n in tensors if n in set(names)]
    missing = set(names or []) - set(tensors)
    if missing:
        raise KeyError(f"no tensor named {sorted(missing)[0]!r}")
    for name in requested:  # 5. every requested tensor, before any is decoded
        if name in unsupported:
            raise VersionError(f"tensor {name!r} needs {unsupported[name]} (file {major}.{minor})")
    wanted = {tensors[n]["target"] if tensors[n]["codec"] == "alias" else n for n in requested}
    stored = [n for n in tensors if n in wanted]  # header order
    total = sum(math.prod(tensors[n]["shape"]) * ELEMENT_SIZE[tensors[n]["dtype"]] for n in stored)
    if max_bytes is not None and total > max_bytes:
        raise MemoryError(f"decoding needs {total} bytes, above max_bytes={max_bytes}")
    out: dict[str, Tensor] = {}
    for name in stored:  # 6. blobs, chunk by chunk, in header order
        e = tensors[name]
        decoder = decode_clustered if e["codec"] == "clustered" else decode_lossless
        out[name] = Tensor(e["dtype"], list(e["shape"]), decoder(data, e))
    aliases = {n: tensors[n]["target"] for n in requested if tensors[n]["codec"] == "alias"}
    ordered = {name: out[aliases.get(name, name)] for name in requested}
    return Decoded((major, minor), h["producer"], dict(h.get("metadata", {})), ordered, aliases)


def decode_file(path: str, *, max_bytes: int | None = None, names: list[str] | None = None) -> Decoded:
    with open(path, "rb") as f:
        return decode(f.read(), max_bytes=max_bytes, names=names)


def main(argv: list[str]) -> int:
    for path in argv:
        try:
            d = decode_file(path)
        except FormatError as e:
            print(f"{path}: {type(e).__name__}: {e}")
            continue
        for name, t in d.tensors.items():
            print(f"{path}: {name} {t.dtype} {t.shape} sha256={hashlib.sha256(t.data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
