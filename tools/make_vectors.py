"""Regenerate spec/header.schema.json and the conformance vectors in spec/vectors/.

    python tools/make_vectors.py            # rewrite spec/ in place
    python tools/make_vectors.py --out DIR  # write elsewhere (the tests compare with spec/)

Valid vectors are `valid/NAME.wclust`; their expected dense tensors, `valid/NAME.expected.safetensors`,
are written from the output of the reference decoder (`spec/reference/wclust_ref.py`), not from
wcfmt, and pinned by sha256. Invalid vectors are `invalid/NAME.wclust`: each breaks one reader
rule (named in the manifest) of an otherwise valid file, and carries a *repair*, a list of edits
that undo just that fault; the repaired file must verify. `manifest.json` lists every file (its
fields are documented in spec/vectors/README.md). Vectors are built from fixed seeds and
hand-made ClusteredTensors (not the clustering engine), so tuning the engine never changes them:
only a change to the bytes on disk does (spec §10).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wcfmt  # noqa: E402
from wcfmt.schema import PackSettings, json_schema  # noqa: E402

PRE = struct.Struct("<8sHHIQQI")
MAGIC = b"\x89WCLUST\n"


def reference_decoder():  # type: ignore[no-untyped-def]
    """The reference decoder module (spec/reference/wclust_ref.py), loaded by path."""
    if "wclust_ref" in sys.modules:
        return sys.modules["wclust_ref"]
    spec = importlib.util.spec_from_file_location("wclust_ref", ROOT / "spec" / "reference" / "wclust_ref.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["wclust_ref"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def compact(h: Any) -> bytes:
    return json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- byte-level drafts ------------------------------------------------------------------------------
class Draft:
    """A .wclust file taken apart for surgery: preamble fields, data section, header object."""

    def __init__(self, raw: bytes) -> None:
        self.magic, self.major, self.minor, self.flags, h_off, h_len, _ = PRE.unpack_from(raw)
        self.data = bytearray(raw[:h_off])
        self.header: dict[str, Any] = json.loads(raw[h_off : h_off + h_len])

    def copy(self) -> "Draft":
        d = copy.copy(self)
        d.data = bytearray(self.data)
        d.header = copy.deepcopy(self.header)
        return d

    def ref(self, tensor: str, chunk: int, key: str | int) -> dict[str, Any]:
        c = self.header["tensors"][tensor]["chunks"][chunk]
        return c["planes"][key] if isinstance(key, int) else c[key]

    def stored(self, ref: dict[str, Any]) -> bytes:
        return bytes(self.data[ref["offset"] : ref["offset"] + ref["length"]])

    def _room(self, ref: dict[str, Any]) -> int:
        """Bytes from the blob's offset to the next non-empty blob (or the data end)."""
        starts = [
            b["offset"] for e in self.header["tensors"].values() for c in e.get("chunks", [])
            for b in (c.get("planes", []) + [c[k] for k in ("centroids", "labels") if k in c])
            if b["offset"] > ref["offset"] and b["length"]
        ]  # fmt: skip
        end = min(starts, default=len(self.data))
        return end - ref["offset"]

    def set_blob(self, ref: dict[str, Any], payload: bytes, encoding: str | None = None, fix_crc: bool = True) -> None:
        """Replace a blob's stored bytes (in place if they fit, else at the end); old bytes zeroed."""
        old = ref["offset"]
        self.data[old : old + ref["length"]] = bytes(ref["length"])
        if len(payload) <= self._room(ref):
            self.data[old : old + len(payload)] = payload
        else:
            ref["offset"] = self.append(payload)
        ref["length"] = len(payload)
        if encoding is not None:
            ref["encoding"] = encoding
        if fix_crc:
            ref["crc32"] = crc(payload)

    def patch_blob(self, ref: dict[str, Any], at: int, new: bytes, fix_crc: bool = True) -> None:
        b = bytearray(self.stored(ref))
        b[at : at + len(new)] = new
        self.set_blob(ref, bytes(b), fix_crc=fix_crc)

    def append(self, payload: bytes) -> int:
        self.data += bytes(-len(self.data) % 64)
        off = len(self.data)
        self.data += payload
        self.data += bytes(-len(self.data) % 64)
        return off

    def build(self, header_bytes: bytes | None = None, **pre: int) -> bytes:
        body = bytes(self.data) + bytes(-len(self.data) % 64)
        raw = compact(self.header) if header_bytes is None else header_bytes
        f = dict(magic=self.magic, major=self.major, minor=self.minor, flags=self.flags,
                 h_off=len(body), h_len=len(raw), crc=crc(raw))  # fmt: skip
        f.update(pre)
        head = PRE.pack(f["magic"], f["major"], f["minor"], f["flags"], f["h_off"], f["h_len"], f["crc"])
        return head + bytes(28) + body[64:] + raw


# -- repairs (documented in spec/vectors/README.md) ------------------------------------------------
def apply_repair(raw: bytes, ops: list[list[Any]]) -> bytes:
    """Apply a manifest ``repair`` to an invalid vector's bytes and return the repaired file."""
    data = bytearray(raw)
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "splice":  # [offset, delete, hex]: replace `delete` bytes at `offset`
            off, n, hexs = args
            data[off : off + n] = bytes.fromhex(hexs)
        elif kind in ("header", "header_set", "header_del", "blob_crc", "header_crc"):
            _m, _a, _b, _f, h_off, h_len, _c = PRE.unpack_from(data)
            if kind == "header_crc":
                data[32:36] = struct.pack("<I", crc(bytes(data[h_off : h_off + h_len])))
                continue
            if kind == "header":  # [text]: the header's new bytes (UTF-8 of text)
                new = args[0].encode("utf-8")
            else:
                h = json.loads(data[h_off : h_off + h_len])
                if kind == "blob_crc":  # [path to a blob object]: its CRC from the current bytes
                    b = _at(h, args[0])
                    b["crc32"] = crc(bytes(data[b["offset"] : b["offset"] + b["length"]]))
                elif kind == "header_set":  # [path, value]
                    _at(h, args[0][:-1])[args[0][-1]] = args[1]
                else:  # header_del [path]
                    del _at(h, args[0][:-1])[args[0][-1]]
                new = compact(h)
            data[h_off:] = new
            data[24:36] = struct.pack("<QI", len(new), crc(new))
        else:
            raise ValueError(f"unknown repair op {kind!r}")
    return bytes(data)


def _at(node: Any, path: list[Any]) -> Any:
    for p in path:
        node = node[p]
    return node


# -- valid vectors ----------------------------------------------------------------------------------
def _clustered(rng: np.random.Generator, shape: tuple[int, ...], ks: list[int], chunk_rows: int, dtype: torch.dtype) -> wcfmt.ClusteredTensor:
    rows = shape[0] if shape else 1
    row_size = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    labels = np.zeros(rows * row_size, np.uint8)
    tables = []
    for c, a in enumerate(range(0, rows, chunk_rows)):
        b = min(a + chunk_rows, rows)
        k = ks[c % len(ks)]
        # k distinct fp16 values, heavy-tailed, strictly ascending
        pool = np.unique((rng.standard_t(3, size=4 * k + 8) * 0.05).astype(np.float16))
        table = np.sort(rng.choice(pool, size=k, replace=False)) if pool.size >= k else None
        assert table is not None and np.all(table[1:] > table[:-1])
        tables.append(torch.from_numpy(table.astype(np.float16)))
        labels[a * row_size : b * row_size] = rng.integers(0, k, size=(b - a) * row_size)
    return wcfmt.ClusteredTensor(
        labels=torch.from_numpy(labels).reshape(shape), centroids=tables, chunk_rows=chunk_rows, dtype=dtype, shape=torch.Size(shape)
    )


def _fixed(labels: np.ndarray, tables: list[list[float]], chunk_rows: int, shape: tuple[int, ...], dtype: torch.dtype,
           quality: dict[str, float] | None = None) -> wcfmt.ClusteredTensor:  # fmt: skip
    return wcfmt.ClusteredTensor(
        labels=torch.from_numpy(labels.astype(np.uint8)).reshape(shape),
        centroids=[torch.tensor(t, dtype=torch.float16) for t in tables],
        chunk_rows=chunk_rows, dtype=dtype, shape=torch.Size(shape), quality=quality,
    )  # fmt: skip


def _specials(dtype: torch.dtype) -> torch.Tensor:
    vals = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, 65504.0, 3.14159]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def valid_sets() -> dict[str, tuple[dict[str, object], dict[str, str], PackSettings | None]]:
    rng = np.random.default_rng(20261123)
    sets: dict[str, tuple[dict[str, object], dict[str, str], PackSettings | None]] = {}
    sets["clustered_shapes"] = (
        {
            "bf16_2d_k16_chunks_not_dividing": _clustered(rng, (37, 20), [16], 8, torch.bfloat16),
            "f32_3d_k2": _clustered(rng, (5, 3, 4), [2], 2, torch.float32),
            "f16_1d_k1": _clustered(rng, (10,), [1], 4, torch.float16),
            "bf16_mixed_k_per_chunk": _clustered(rng, (9, 300), [3, 256, 17, 64, 5], 2, torch.bfloat16),
            "f16_k4_one_chunk": _clustered(rng, (6, 7), [4], 6, torch.float16),
            "bf16_scalar_rows_k32": _clustered(rng, (64, 1), [32], 64, torch.bfloat16),
        },
        {"vector": "clustered_shapes"},
        None,
    )
    lossless: dict[str, object] = {}
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        lossless[f"specials_{str(dt).split('.')[1]}"] = _specials(dt)
    lossless["bf16_matrix"] = torch.from_numpy((rng.standard_t(4, size=(33, 17)) * 0.02).astype(np.float32)).bfloat16()
    lossless["i64_positions"] = torch.arange(-5, 300, dtype=torch.int64).reshape(5, 61)
    lossless["i32"] = torch.from_numpy(rng.integers(-(2**31), 2**31 - 1, size=(4, 4), dtype=np.int32))
    lossless["i16"] = torch.from_numpy(rng.integers(-(2**15), 2**15 - 1, size=7, dtype=np.int16))
    lossless["i8"] = torch.from_numpy(rng.integers(-128, 127, size=(3, 3), dtype=np.int8))
    lossless["u8"] = torch.from_numpy(rng.integers(0, 255, size=(2, 2, 2), dtype=np.uint8))
    lossless["bool_mask"] = torch.from_numpy(rng.integers(0, 2, size=(3, 5)).astype(bool))
    lossless["f8_e4m3"] = torch.linspace(-4, 4, 9).to(torch.float8_e4m3fn)
    lossless["f8_e5m2"] = torch.linspace(-4, 4, 9).to(torch.float8_e5m2)
    lossless["u16"] = torch.from_numpy(rng.integers(0, 2**16 - 1, size=6, dtype=np.uint16)).view(torch.uint16)
    lossless["scalar_f32"] = torch.tensor(2.5)
    lossless["empty_1d"] = torch.zeros(0)
    lossless["empty_2d"] = torch.zeros(3, 0, dtype=torch.bfloat16)
    sets["lossless_dtypes"] = (lossless, {"vector": "lossless_dtypes"}, None)
    emb = torch.from_numpy((rng.standard_normal((16, 8)) * 0.1).astype(np.float32)).bfloat16()
    sets["tied_and_metadata"] = (
        {
            "model.embed_tokens.weight": emb,
            "lm_head.weight": emb,
            "model.layers.0.mlp.up_proj.weight": _clustered(rng, (12, 8), [8], 5, torch.bfloat16),
        },
        {"format": "pt", "note": "ünïcode ✓", "empty": ""},
        None,
    )
    # The base of the invalid vectors: one tensor for each kind of rule, every blob placed so
    # that a fault can be put in one of them without touching any other.
    g = np.random.default_rng(7)
    emb2 = torch.from_numpy((g.standard_normal((16, 8)) * 0.1).astype(np.float32)).bfloat16()
    skewed = np.minimum(g.geometric(0.6, size=64 * 32) - 1, 16)  # low entropy: a zstd label plane
    sets["fault_base"] = (
        {
            "embed": emb2,
            "head": emb2,
            "up": _fixed(g.integers(0, 8, size=12 * 8), [sorted(g.choice(np.arange(-40, 40), 8, replace=False) / 64)] * 3,
                         5, (12, 8), torch.bfloat16, quality={"rel_error": 0.125, "sqnr_db": 18.0, "bits_per_weight": 3.5}),
            "tiny": _fixed(np.array([1, 7, 3, 0, 5]), [[-0.5, -0.25, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]] * 3, 2, (5,), torch.float16),
            "signs": _fixed(np.array([0, 1, 2, 3, 3, 2]), [[-0.5, -0.25, 0.25, 0.5]], 6, (2, 3), torch.float32),
            "zlab": _fixed(skewed, [list(np.linspace(-1, 1, 17))], 64, (64, 32), torch.bfloat16),
            "ids": torch.arange(0, 48, dtype=torch.int32).reshape(6, 8) * 1_000_003,
            "mask": torch.from_numpy(g.integers(0, 2, size=15).astype(bool)),
            "empty": torch.zeros(0, 4),
            "ones": _fixed(np.zeros(12), [[1.0]], 4, (4, 3), torch.float16),  # last: empty blob at header_offset
        },
        {"format": "pt", "note": "fault base"},
        PackSettings(k=8, chunk_rows=5, method="ecsq", level=3, include=[".*"], exclude=[],
                           extra={"bits": "3.5", "lambda": "0.01", "step": "0.02"}),  # fmt: skip
    )
    return sets


def _write_vector(tensors: dict[str, object], path: Path, meta: dict[str, str], settings: Any) -> None:
    """Write with a fixed producer string, so that a release number never changes the vectors."""
    from wcfmt.writer import WclustWriter

    first_of: dict[int, str] = {}
    with WclustWriter(path, metadata=meta, settings=settings, threads=1, overwrite=True,
                      producer="wcfmt conformance vectors") as w:  # fmt: skip
        for name, value in tensors.items():
            if id(value) in first_of:  # the same object twice: tied weights, stored as an alias
                w.add_alias(name, first_of[id(value)])
            else:
                w.add(name, value)  # type: ignore[arg-type]
                first_of[id(value)] = name


def _hand_lossless(d: Draft, name: str, values: np.ndarray, dtype: str, chunk_rows: int, transform: str) -> None:
    """Add a lossless tensor built here, plane by plane (spec §6.2), to a draft."""
    size = values.dtype.itemsize
    words = values.reshape(-1).view(f"<u{size}").astype(np.uint64)
    if transform == "float_planes":
        words = ((words << np.uint64(1)) | (words >> np.uint64(8 * size - 1))) & np.uint64((1 << (8 * size)) - 1)
    rows = values.shape[0]
    row = int(np.prod(values.shape[1:]))
    chunks = []
    for a in range(0, rows, chunk_rows):
        part = words[a * row : min(a + chunk_rows, rows) * row]
        planes = []
        for p in range(size):
            plane = ((part >> np.uint64(8 * (size - 1 - p))) & np.uint64(0xFF)).astype(np.uint8).tobytes()
            frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(plane)
            stored, enc = (frame, "zstd") if len(frame) < len(plane) else (plane, "raw")
            planes.append({"offset": d.append(stored), "length": len(stored), "encoding": enc, "crc32": crc(stored)})
        chunks.append({"planes": planes})
    d.header["tensors"][name] = {"dtype": dtype, "shape": list(values.shape), "codec": "lossless",
                                 "transform": transform, "chunk_rows": chunk_rows, "chunks": chunks}  # fmt: skip


def edge_vectors(fault_base: bytes) -> dict[str, bytes]:
    """Valid cases a writer-made file does not show: built by editing one."""
    out: dict[str, bytes] = {}
    # minor 1: unknown fields at every level are ignored (§10)
    d = Draft(fault_base)
    d.minor = 1
    d.header["future_top"] = {"nested": [1, None, "x"]}
    d.header["settings"]["future_setting"] = 5
    d.header["tensors"]["up"]["future_entry"] = True
    d.header["tensors"]["up"]["chunks"][1]["future_chunk"] = []
    d.header["tensors"]["up"]["chunks"][1]["labels"]["future_blob"] = "x"
    d.header["tensors"]["ids"]["chunks"][0]["future_chunk"] = 1.5
    d.header["tensors"]["head"]["future_alias"] = {}
    out["minor_1_unknown_fields"] = d.build()
    # edge cases in a 1.0 file: a k = 1 labels blob stored as a zstd frame of 0 bytes; lossless
    # tensors of several chunks (zstd and raw planes, float and byte planes); an alias before its
    # target; an empty blob at exactly header_offset (the k = 1 tensor written last).
    d = Draft(fault_base)
    empty_frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"")
    ref = d.ref("ones", 0, "labels")
    ref.update(offset=d.append(empty_frame), length=len(empty_frame), encoding="zstd", crc32=crc(empty_frame))
    g = np.random.default_rng(11)
    _hand_lossless(d, "multi_f32", (g.standard_normal((10, 6)) * 0.01).astype("<f4"), "F32", 3, "float_planes")
    _hand_lossless(d, "multi_i16", np.repeat(np.arange(7, dtype="<i2"), 10).reshape(7, 10), "I16", 2, "byte_planes")
    tensors = d.header["tensors"]
    d.header["tensors"] = {"head": tensors["head"], **{k: v for k, v in tensors.items() if k != "head"}}
    z = Draft(d.build())
    z_ref = {"offset": len(z.data) + (-len(z.data) % 64), "length": 0, "encoding": "raw", "crc32": 0}
    z.header["tensors"]["ones_last"] = {"dtype": "F16", "shape": [2], "codec": "clustered", "chunk_rows": 2,
                                        "chunks": [{"k": 1, "label_bits": 0, "labels": z_ref,
                                                    "centroids": {"offset": z.append(b"\x00\x3c"), "length": 2,
                                                                  "encoding": "raw", "crc32": crc(b"\x00\x3c")}}]}  # fmt: skip
    z_ref["offset"] = len(z.data)  # the data end: exactly header_offset
    out["edge_cases"] = z.build()
    return out


# -- invalid vectors --------------------------------------------------------------------------------
Fault = tuple[bytes, str, str, list[list[Any]], list[str]]  # data, error, rule, repair, also_breaks


def _splice_restore(bad: bytes, good: bytes) -> list[list[Any]]:
    """The one splice that turns ``bad`` into ``good`` (a common prefix and suffix kept)."""
    i = 0
    while i < min(len(bad), len(good)) and bad[i] == good[i]:
        i += 1
    j = 0
    while j < min(len(bad), len(good)) - i and bad[-1 - j] == good[-1 - j]:
        j += 1
    return [["splice", i, len(bad) - i - j, good[i : len(good) - j].hex()]]


def invalid_sets(base: bytes) -> dict[str, Fault]:
    """Each vector breaks one rule of the valid `fault_base` vector (checksums fixed up)."""
    B = Draft(base)
    h_off = len(B.data)
    text = compact(B.header).decode()
    out: dict[str, Fault] = {}

    def raw_fault(name: str, bad: bytes, err: str, rule: str, also: list[str] | None = None) -> None:
        out[name] = (bad, err, rule, _splice_restore(bad, base), also or [])

    def header_text(name: str, bad_text: bytes, err: str, rule: str) -> None:
        out[name] = (B.build(bad_text), err, rule, [["header", text]], [])

    def header_edit(name: str, mutate: Callable[[dict[str, Any]], None], err: str, rule: str,
                    repair: list[list[Any]], minor: int | None = None) -> None:  # fmt: skip
        d = B.copy()
        mutate(d.header)
        if minor is not None:
            d.minor = minor
        out[name] = (d.build(), err, rule, repair, [])

    def blob_edit(name: str, edit: Callable[[Draft], None], err: str, rule: str, also: list[str] | None = None) -> None:
        d = B.copy()
        edit(d)
        bad = d.build()
        # Repair: put the original bytes of the data section and the original header back.
        fix = _splice_restore(bad[:h_off], base[:h_off]) if bad[:h_off] != base[:h_off] else []
        out[name] = (bad, err, rule, fix + [["header", text]], also or [])

    def tpath(tensor: str, *rest: Any) -> list[Any]:
        return ["tensors", tensor, *rest]

    # §3.1 preamble, in the order readers check it
    raw_fault("truncated_preamble", base[:40], "FormatError", "§3.1 a file is at least 64 bytes")
    raw_fault("bad_magic", b"GGUF" + base[4:], "FormatError", "§3.1 magic")
    raw_fault("major_version_2", base[:8] + struct.pack("<H", 2) + base[10:], "VersionError", "§3.1/§10 version_major")
    raw_fault("flags_set", base[:12] + struct.pack("<I", 1) + base[16:], "FormatError", "§3.1 flags are zero")
    raw_fault("reserved_nonzero", base[:50] + b"\x01" + base[51:], "FormatError", "§3.1 reserved bytes are zero")
    raw_fault("header_too_large", base[:24] + struct.pack("<Q", 104_857_601) + base[32:], "FormatError",
              "§3.1 header_length <= 104,857,600", ["§3.1 size equation (a single-fault file is > 100 MiB; "
              "tests/test_vectors.py builds one, sparse)"])  # fmt: skip
    raw_fault("header_offset_below_64", base[:16] + struct.pack("<Q", 0) + base[24:], "FormatError",
              "§3.1 header_offset >= 64", ["§3.1 size equation"])
    unaligned = base[:16] + struct.pack("<Q", h_off + 8) + base[24:h_off] + bytes(8) + base[h_off:]
    raw_fault("header_offset_unaligned", unaligned, "FormatError", "§3.1 header_offset is a multiple of 64")
    raw_fault("truncated_data", base[: h_off - 8], "FormatError", "§3.1 size equation (truncated)")
    raw_fault("truncated_header", base[:-1], "FormatError", "§3.1 size equation (truncated)")
    raw_fault("trailing_bytes", base + b"\x00", "FormatError", "§3.1 size equation (trailing bytes)")
    # §3.3 / §7.3 header checksum, then §3.3-§3.4 JSON
    raw_fault("header_crc_mismatch", base[:32] + struct.pack("<I", crc(compact(B.header)) ^ 1) + base[36:],
              "ChecksumError", "§3.3 header_crc32")
    header_text("header_not_utf8", text.replace('"fault base"', '"fault \udcff"', 1).encode("utf-8", "surrogateescape"),
                "HeaderError", "§3.3 UTF-8")
    header_text("header_bom", b"\xef\xbb\xbf" + text.encode(), "HeaderError", "§3.4 no byte order mark")
    header_text("header_not_json", b"{not json", "HeaderError", "§3.3 JSON")
    header_text("header_not_object", b"[" + text.encode() + b"]", "HeaderError", "§3.3 a JSON object")
    header_text("header_duplicate_key", text.replace('{"producer":', '{"producer":"x","producer":', 1).encode(),
                "HeaderError", "§3.3 no duplicate keys")
    header_text("header_nested_duplicate_key", text.replace('"format":"pt"', '"format":"pt","form\\u0061t":"pt"', 1).encode(),
                "HeaderError", "§3.3/§3.4 no duplicate keys, compared after unescaping")
    header_text("header_nan", text.replace('"rel_error":0.125', '"rel_error":NaN', 1).encode(), "HeaderError", "§3.3 no NaN")
    header_text("header_infinity", text.replace('"sqnr_db":18.0', '"sqnr_db":-Infinity', 1).encode(), "HeaderError",
                "§3.3 no Infinity")
    header_text("header_number_overflow", text.replace('"sqnr_db":18.0', '"sqnr_db":1e400', 1).encode(), "HeaderError",
                "§3.4 numbers finite in binary64")
    header_text("header_lone_surrogate", text.replace('"fault base"', '"fault \\ud800"', 1).encode(), "HeaderError",
                "§3.4 strings are Unicode scalar values")
    header_text("header_null", text.replace('"level":3', '"level":null', 1).encode(), "HeaderError", "§3.4 no null")
    header_text("integer_written_as_float", text.replace('"chunk_rows":5,', '"chunk_rows":5.0,', 1).encode(), "HeaderError",
                "§3.4 integers are written without fraction or exponent")
    # §4 header fields
    header_edit("unknown_field_minor_0", lambda h: h.update(surprise=1), "HeaderError", "§10 unknown field, own minor",
                [["header_del", ["surprise"]]])
    header_edit("unknown_nested_field_minor_0", lambda h: h["tensors"]["up"]["chunks"][0]["labels"].update(surprise=1),
                "HeaderError", "§10 unknown field at any level, own minor",
                [["header_del", tpath("up", "chunks", 0, "labels", "surprise")]])
    header_edit("unknown_settings_key_minor_0", lambda h: h["settings"].update(bits=3), "HeaderError",
                "§4.3 settings are validated; unknown keys rejected in own minor", [["header_del", ["settings", "bits"]]])
    header_edit("settings_wrong_type", lambda h: h["settings"].update(k="8"), "HeaderError", "§4.3 settings.k integer",
                [["header_set", ["settings", "k"], 8]])
    header_edit("missing_producer", lambda h: h.pop("producer"), "HeaderError", "§4.1 producer required",
                [["header_set", ["producer"], B.header["producer"]]])
    header_edit("producer_too_long", lambda h: h.update(producer="é" * 257), "HeaderError", "§4.1 producer <= 256 chars",
                [["header_set", ["producer"], "é" * 256]])
    header_edit("metadata_value_not_string", lambda h: h["metadata"].update(note=5), "HeaderError",
                "§4.1 metadata string -> string", [["header_set", ["metadata", "note"], "fault base"]])

    def rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
        def f(h: dict[str, Any]) -> None:
            h["tensors"] = {(new if k == old else k): v for k, v in h["tensors"].items()}
        return f

    header_edit("empty_tensor_name", rename("tiny", ""), "HeaderError", "§4.1 names are non-empty", [["header", text]])
    header_edit("unknown_dtype_minor_0", lambda h: h["tensors"]["ids"].update(dtype="I4"), "HeaderError",
                "§4.2 dtype", [["header_set", tpath("ids", "dtype"), "I32"]])
    header_edit("unknown_codec_minor_0", lambda h: h["tensors"]["empty"].update(codec="vq"), "HeaderError",
                "§4.2/§10 codec, own minor", [["header_set", tpath("empty", "codec"), "lossless"]])
    header_edit("too_many_dims", lambda h: h["tensors"]["up"].update(shape=[12, 8] + [1] * 7), "HeaderError",
                "§4.2 at most 8 dimensions", [["header_set", tpath("up", "shape"), [12, 8]]])
    header_edit("dimension_too_large", lambda h: h["tensors"]["empty"].update(shape=[0, 2**53]), "HeaderError",
                "§4.2 dimensions < 2^53", [["header_set", tpath("empty", "shape"), [0, 4]]])
    header_edit("size_overflows_63_bits", lambda h: h["tensors"]["ones"].update(shape=[1, 2**31, 2**31]), "HeaderError",
                "§4.2 element count x element size < 2^63", [["header_set", tpath("ones", "shape"), [4, 3]]])
    header_edit("alias_missing_target", lambda h: h["tensors"]["head"].update(target="nope"), "HeaderError",
                "§4.5 target exists", [["header_set", tpath("head", "target"), "embed"]])

    def alias_to_alias(h: dict[str, Any]) -> None:
        h["tensors"]["head2"] = dict(h["tensors"]["head"], target="head")

    header_edit("alias_to_alias", alias_to_alias, "HeaderError", "§4.5 target is not an alias",
                [["header_set", tpath("head2", "target"), "embed"]])
    header_edit("alias_shape_mismatch", lambda h: h["tensors"]["head"].update(shape=[8, 16]), "HeaderError",
                "§4.5 same shape as target", [["header_set", tpath("head", "shape"), [16, 8]]])
    header_edit("alias_dtype_mismatch", lambda h: h["tensors"]["head"].update(dtype="F16"), "HeaderError",
                "§4.5 same dtype as target", [["header_set", tpath("head", "dtype"), "BF16"]])
    def drop(blobs: list[dict[str, Any]]) -> Callable[[Draft], None]:
        # a blob the header no longer lists has its bytes zeroed: no nonzero padding left behind
        def f(d: Draft) -> None:
            for b in blobs:
                d.data[b["offset"] : b["offset"] + b["length"]] = bytes(b["length"])
        return f

    def wrong_chunk_count(d: Draft) -> None:
        c = d.header["tensors"]["up"]["chunks"].pop()
        drop([c["centroids"], c["labels"]])(d)

    blob_edit("wrong_chunk_count", wrong_chunk_count, "HeaderError", "§4.6 chunk count")
    header_edit("chunk_rows_zero", lambda h: h["tensors"]["empty"].update(chunk_rows=0), "HeaderError",
                "§5.1/§6.1 chunk_rows >= 1", [["header_set", tpath("empty", "chunk_rows"), 1]])
    # §5.1-§5.2 clustered entries
    header_edit("clustered_wrong_dtype", lambda h: h["tensors"]["up"].update(dtype="F64"), "HeaderError",
                "§5.1 clustered dtype is F32, F16 or BF16", [["header_set", tpath("up", "dtype"), "BF16"]])
    header_edit("quality_not_number", lambda h: h["tensors"]["up"]["quality"].update(rel_error="low"), "HeaderError",
                "§5.6 quality string -> number", [["header_set", tpath("up", "quality", "rel_error"), 0.125]])

    def k_zero(d: Draft) -> None:
        c = d.header["tensors"]["ones"]["chunks"][0]
        d.set_blob(c["centroids"], b"")  # the old table's bytes zeroed: no nonzero padding left behind
        c["k"] = 0

    blob_edit("k_zero", k_zero, "HeaderError", "§5.2 k in 1..256 (centroid length 2k kept consistent)")
    tiny_last = B.header["tensors"]["tiny"]["chunks"][2]
    assert tiny_last["k"] == 8 and tiny_last["label_bits"] == 4
    header_edit("label_bits_wrong", lambda h: h["tensors"]["tiny"]["chunks"][2].update(label_bits=8), "HeaderError",
                "§5.2 label_bits = width(k) (one label: the plane size is the same)",
                [["header_set", tpath("tiny", "chunks", 2, "label_bits"), 4]])
    def k_too_large(d: Draft) -> None:
        # 257 finite ascending fp16 values, appended; `ones` keeps label_bits 0 (no width fits k > 256)
        c = d.header["tensors"]["ones"]["chunks"][0]
        table = np.arange(257, dtype="<f2").tobytes()
        old = c["centroids"]
        d.data[old["offset"] : old["offset"] + old["length"]] = bytes(old["length"])
        c["k"] = 257
        c["centroids"] = dict(c["centroids"], offset=d.append(table), length=len(table), crc32=crc(table))

    blob_edit("k_too_large", k_too_large, "HeaderError", "§5.2 k in 1..256 (k = 257, centroids 2k bytes)",
              ["§5.2 label_bits = width(k) (no width exists for k > 256)"])

    def centroids_length(d: Draft) -> None:
        # the table's blob takes in two bytes of the (zero) padding after it, CRC fixed up
        ref = d.ref("signs", 0, "centroids")
        assert d._room(ref) >= ref["length"] + 2
        ref["length"] += 2
        ref["crc32"] = crc(d.stored(ref))

    blob_edit("centroids_length_not_2k", centroids_length, "HeaderError", "§5.2 centroid blob is 2k bytes")
    # found by tests/test_fuzz.py: a Literal field matched false and -0.0 as 0; a codec of the wrong
    # type in a newer-minor file crashed the unknown-field filter
    header_edit("label_bits_not_integer", lambda h: h["tensors"]["ones"]["chunks"][0].update(label_bits=False),
                "HeaderError", "§3.4 true/false are not integers (label_bits)",
                [["header_set", tpath("ones", "chunks", 0, "label_bits"), 0]])
    header_edit("codec_wrong_type_minor_1", lambda h: h["tensors"]["ones"].update(codec={"name": "vq"}), "HeaderError",
                "§10 a value of the wrong type is an error, not an unknown value (newer minor)",
                [["header_set", tpath("ones", "codec"), "clustered"]], minor=1)
    header_edit("centroids_not_raw", lambda h: h["tensors"]["up"]["chunks"][0]["centroids"].update(encoding="zstd"),
                "HeaderError", "§5.2 centroid blob is raw", [["header_set", tpath("up", "chunks", 0, "centroids", "encoding"), "raw"]])
    # §4.4 blob fields, §6.1 lossless entries
    header_edit("float_planes_on_integers", lambda h: h["tensors"]["ids"].update(transform="float_planes"), "HeaderError",
                "§6.1 float_planes only for float dtypes", [["header_set", tpath("ids", "transform"), "byte_planes"]])
    blob_edit("wrong_plane_count", lambda d: drop([d.header["tensors"]["ids"]["chunks"][0]["planes"].pop()])(d),
              "HeaderError", "§6.1 one plane per byte of the element")
    header_edit("crc_out_of_range", lambda h: h["tensors"]["ids"]["chunks"][0]["planes"][0].update(crc32=2**32),
                "HeaderError", "§4.4 crc32 < 2^32", [["blob_crc", tpath("ids", "chunks", 0, "planes", 0)]])
    # unknown codec in a newer minor: the file opens, but loading that tensor is refused (§10)
    header_edit("unknown_codec_requested", lambda h: h["tensors"].update(vq_w={"dtype": "F16", "shape": [2], "codec": "vq"}),
                "VersionError", "§10 a requested tensor needs an unknown codec", [["header_del", ["tensors", "vq_w"]]], minor=1)

    # §4.4/§3.2 blob placement (checked before any blob is read)
    def unaligned_blob(d: Draft) -> None:
        ref = d.ref("up", 0, "labels")
        payload = d.stored(ref)
        d.data[ref["offset"] : ref["offset"] + ref["length"]] = bytes(ref["length"])
        ref["offset"] = d.append(bytes(8) + payload) + 8

    blob_edit("blob_offset_unaligned", unaligned_blob, "HeaderError", "§4.4 offset is a multiple of 64")
    blob_edit("empty_blob_before_data", lambda d: d.ref("ones", 0, "labels").update(offset=0), "FormatError",
              "§3.2 even an empty blob lies in [64, header_offset]")
    blob_edit("empty_blob_after_header_offset", lambda d: d.ref("ones", 0, "labels").update(offset=h_off + 64),
              "FormatError", "§3.2 an empty blob may sit at header_offset, not after it")
    blob_edit("blob_past_data", lambda d: d.ref("ids", 0, 3).update(length=d.ref("ids", 0, 3)["length"] + 4096),
              "FormatError", "§3.2 blob inside the data section",
              ["§7.3 CRC (a correct one is impossible: the bytes past the data are the header that holds it)"])

    def overlap(d: Draft) -> None:
        c0, c1 = d.ref("up", 0, "labels"), d.ref("up", 1, "labels")
        d.data[c1["offset"] : c1["offset"] + c1["length"]] = bytes(c1["length"])
        c1.update(c0)

    blob_edit("overlapping_blobs", overlap, "FormatError", "§3.2 non-empty blobs do not overlap")
    # §7.3 blob checksums
    blob_edit("labels_crc_mismatch", lambda d: d.ref("up", 0, "labels").update(crc32=d.ref("up", 0, "labels")["crc32"] ^ 1),
              "ChecksumError", "§7.3 blob crc32")
    blob_edit("centroids_crc_mismatch",
              lambda d: d.ref("up", 0, "centroids").update(crc32=d.ref("up", 0, "centroids")["crc32"] ^ 0x100),
              "ChecksumError", "§7.3 blob crc32")
    # §5.3-§5.4 decoded data (labels stored raw so one byte can be set)
    assert B.ref("up", 0, "labels")["encoding"] == "raw" and B.ref("tiny", 2, "labels")["encoding"] == "raw"
    blob_edit("label_out_of_range", lambda d: d.patch_blob(d.ref("up", 0, "labels"), 0, bytes([(d.stored(d.ref("up", 0, "labels"))[0] & 0xF0) | 8])),
              "FormatError", "§5.3 every label < k")
    blob_edit("label_padding_nonzero", lambda d: d.patch_blob(d.ref("tiny", 2, "labels"), 0, bytes([d.stored(d.ref("tiny", 2, "labels"))[0] | 0x10])),
              "FormatError", "§5.3 padding bits are zero")
    f16 = lambda *v: np.array(v, "<f2").tobytes()  # noqa: E731
    blob_edit("centroids_not_ascending", lambda d: d.patch_blob(d.ref("signs", 0, "centroids"), 0, f16(-0.25, -0.5)),
              "FormatError", "§5.4 strictly ascending")
    blob_edit("centroids_signed_zeros", lambda d: d.patch_blob(d.ref("signs", 0, "centroids"), 2, f16(-0.0, 0.0)),
              "FormatError", "§5.4 strictly ascending as numbers: -0.0 == +0.0")
    blob_edit("centroids_nan", lambda d: d.patch_blob(d.ref("signs", 0, "centroids"), 6, f16(np.nan)),
              "FormatError", "§5.4 no NaN")
    blob_edit("centroids_infinity", lambda d: d.patch_blob(d.ref("signs", 0, "centroids"), 6, f16(np.inf)),
              "FormatError", "§5.4 no infinity")
    # §6.3 BOOL bytes
    assert B.ref("mask", 0, 0)["encoding"] == "raw"
    blob_edit("bool_byte_not_0_or_1", lambda d: d.patch_blob(d.ref("mask", 0, 0), 3, b"\x02"), "FormatError",
              "§6.3 BOOL elements are 0 or 1")
    # §7.1 raw and zstd blobs
    blob_edit("raw_length_wrong", lambda d: d.set_blob(d.ref("up", 0, "labels"), d.stored(d.ref("up", 0, "labels")) + b"\x00"),
              "FormatError", "§7.1 raw length = decoded size")
    blob_edit("raw_plane_length_wrong", lambda d: d.set_blob(d.ref("ids", 0, 0), d.stored(d.ref("ids", 0, 0))[:-1]),
              "FormatError", "§7.1 raw length = decoded size")
    zref = B.ref("zlab", 0, "labels")
    assert zref["encoding"] == "zstd"
    plane = zstandard.ZstdDecompressor().decompress(B.stored(zref))

    def zstd_fault(name: str, frame: bytes, rule: str) -> None:
        blob_edit(name, lambda d: d.set_blob(d.ref("zlab", 0, "labels"), frame), "FormatError", rule)

    zc = zstandard.ZstdCompressor(level=3, write_content_size=True)
    good = zc.compress(plane)
    zstd_fault("zstd_no_content_size", zstandard.ZstdCompressor(level=3, write_content_size=False).compress(plane),
               "§7.1 the frame declares its content size")
    zstd_fault("zstd_wrong_content_size", zc.compress(plane + b"\x00"), "§7.1 declared size = expected size")
    zstd_fault("zstd_truncated", good[:-1], "§7.1 the frame is complete")
    zstd_fault("zstd_trailing_bytes", good + b"\x00\x00\x00\x00", "§7.1 nothing after the frame")
    zstd_fault("zstd_two_frames", good + zc.compress(b""), "§7.1 exactly one frame")
    zstd_fault("zstd_skippable_frame", struct.pack("<II", 0x184D2A50, 4) + b"wclu" + good, "§7.1 no skippable frame")
    zstd_fault("zstd_dictionary_id", _with_did(good), "§7.1 no dictionary")
    wide = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=10, write_content_size=True, write_checksum=False, write_dict_id=False)).compress(plane)
    assert not wide[4] & 0x20  # a window descriptor follows the frame header descriptor
    zstd_fault("zstd_window_too_large", wide[:5] + bytes([18 << 3]) + wide[6:], "§7.1 window <= 128 MiB")
    # A frame declaring 0 bytes (a k = 1 label plane) is still walked and decoded: python-zstandard's
    # one-shot decompress returns b"" for it without reading its blocks (found by tests/test_fuzz.py).
    empty = zc.compress(b"")
    assert len(empty) == 9 and empty[4] & 0x20  # single segment: magic, descriptor, 1-byte size, one block header
    for name, frame, rule in [
        ("zstd_empty_frame_incomplete", empty[:6] + bytes(3), "§7.1 the frame is complete (a 0-byte frame too)"),
        ("zstd_empty_frame_holds_bytes", empty[:6] + (1 | 3 << 3).to_bytes(3, "little") + b"abc",
         "§7.1 decodes to the declared size (0 bytes: its blocks hold none)"),
    ]:  # fmt: skip
        blob_edit(name, lambda d, f=frame: d.set_blob(d.ref("ones", 0, "labels"), f, encoding="zstd"), "FormatError", rule)
    blob_edit("zstd_on_raw_bytes", lambda d: d.ref("up", 0, "labels").update(encoding="zstd"), "FormatError",
              "§7.1 a zstd blob is a zstd frame")
    return out


def _with_did(frame: bytes) -> bytes:
    """The same frame with Dictionary_ID_flag = 1 and a 1-byte Dictionary_ID of 0 (RFC 8878
    §3.1.1.1.1.6): libzstd decodes it as dictionary-less; §7.1 still forbids the field."""
    fhd = frame[4]
    pos = 5 + (0 if fhd & 0x20 else 1)  # after the window descriptor, if any
    return frame[:4] + bytes([fhd | 0x01]) + frame[5:pos] + b"\x00" + frame[pos:]


# -- expected outputs ----------------------------------------------------------------------------------
_ST_DTYPE = {"F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16", "I64": "I64", "I32": "I32", "I16": "I16",
             "I8": "I8", "U8": "U8", "BOOL": "BOOL", "F8_E4M3": "F8_E4M3", "F8_E5M2": "F8_E5M2", "U16": "U16",
             "U32": "U32", "U64": "U64"}  # fmt: skip


def expected_safetensors(decoded: Any) -> bytes:
    """A safetensors file of the reference decoder's output (written here: the format is 8 bytes
    of header length, a JSON header, the data), tensors in the file's order."""
    header: dict[str, Any] = {"__metadata__": dict(decoded.metadata)} if decoded.metadata else {}
    pos = 0
    blobs = []
    for name, t in decoded.tensors.items():
        header[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": t.shape, "data_offsets": [pos, pos + len(t.data)]}
        blobs.append(t.data)
        pos += len(t.data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write_all(spec_dir: Path) -> None:
    ref = reference_decoder()
    (spec_dir / "vectors" / "valid").mkdir(parents=True, exist_ok=True)
    (spec_dir / "vectors" / "invalid").mkdir(parents=True, exist_ok=True)
    (spec_dir / "header.schema.json").write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    manifest: dict[str, dict] = {"valid": {}, "invalid": {}}
    valid: dict[str, bytes] = {}
    for name, (tensors, meta, settings) in valid_sets().items():
        path = spec_dir / "vectors" / "valid" / f"{name}.wclust"
        _write_vector(tensors, path, meta, settings)
        valid[name] = path.read_bytes()
    # The alias of fault_base comes before its target in the header (§4.1: any order).
    d = Draft(valid["fault_base"])
    t = d.header["tensors"]
    d.header["tensors"] = {"head": t["head"], **{k: v for k, v in t.items() if k != "head"}}
    valid["fault_base"] = d.build()
    valid.update(edge_vectors(valid["fault_base"]))
    for name, data in valid.items():
        path = spec_dir / "vectors" / "valid" / f"{name}.wclust"
        path.write_bytes(data)
        decoded = ref.decode(data)
        exp = expected_safetensors(decoded)
        exp_path = spec_dir / "vectors" / "valid" / f"{name}.expected.safetensors"
        exp_path.write_bytes(exp)
        manifest["valid"][path.name] = {
            "sha256": _sha(data), "expected": exp_path.name, "expected_sha256": _sha(exp),
            "version": f"{decoded.version[0]}.{decoded.version[1]}", "tensors": list(decoded.tensors),
            "aliases": decoded.aliases,
        }  # fmt: skip
    for name, (data, err, rule, repair, also) in invalid_sets(valid["fault_base"]).items():
        path = spec_dir / "vectors" / "invalid" / f"{name}.wclust"
        path.write_bytes(data)
        try:
            ref.decode(data)
            raise AssertionError(f"{name}: the reference decoder accepts it")
        except ref.FormatError as e:
            assert type(e).__name__ == err, (name, type(e).__name__, err, e)
        fixed = apply_repair(data, repair)
        assert fixed != data, name
        ref.decode(fixed)  # the repaired file is valid
        entry: dict[str, Any] = {"sha256": _sha(data), "error": err, "rule": rule, "repair": repair}
        if also:
            entry["also_breaks"] = also
        manifest["invalid"][path.name] = entry
    (spec_dir / "vectors" / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "spec", help="spec folder to write (default: spec/)")
    args = ap.parse_args()
    write_all(args.out)
    print(f"wrote {args.out}/header.schema.json and {args.out}/vectors/")


if __name__ == "__main__":
    main()
