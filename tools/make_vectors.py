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

Some valid files are assembled here blob by blob (`Hand`, `hand_vectors`): zstd frames written
byte by byte (`hand_frame`: several blocks, RLE, a Window_Descriptor, a content checksum, 4- and
8-byte content sizes), clustered scalars and zero-element tensors, and a sharded folder
(`valid/sharded/`: an index and two shards, listed under the manifest's `folders`). Their
expected values are computed here too, and must equal the reference decoder's output.
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
    # minor 1: §3.4's value rules do not reach the fields a reader ignores (§3.4, §10): numbers
    # beyond binary64 (1e400, -1e999, an integer of 400 digits), 40.0 and 4e1, null. Lone
    # surrogates and integers of more than 4300 digits there are ignored too, but no valid vector
    # holds them: tests/test_fuzz.py seeds from every valid vector and reads and rewrites headers
    # with Python's json, which refuses the one and cannot write the other as UTF-8.
    d = Draft(fault_base)
    d.minor = 1
    marks = {"@big@": "1e400", "@int400@": "1" + "0" * 399, "@float_int@": "40.0", "@exp_int@": "4e1",
             "@neg_big@": "-1e999"}  # fmt: skip
    d.header["future_top"] = {"big": "@big@", "int400": "@int400@", "float_int": "@float_int@", "exp_int": "@exp_int@",
                              "null": None}  # fmt: skip
    d.header["settings"]["future_setting"] = "@big@"
    d.header["tensors"]["up"]["future_scale"] = "@neg_big@"
    d.header["tensors"]["up"]["chunks"][0]["labels"]["future_blob"] = "@float_int@"
    d.header["tensors"]["ids"]["chunks"][0]["future_chunk"] = ["@int400@", None]
    text = compact(d.header).decode()
    for mark, literal in marks.items():
        text = text.replace(f'"{mark}"', literal)
    out["minor_1_ignored_values"] = d.build(text.encode())
    return out


# -- hand-built files (spec 1.0.2: features no writer-made vector shows) -----------------------------
# Frames here are written byte by byte from RFC 8878 §3.1.1 (frame header, block headers, the
# optional Content_Checksum), so that they hold what python-zstandard never writes for small
# inputs: several blocks in one frame, RLE blocks, a Window_Descriptor, a content checksum, 4- and
# 8-byte Frame_Content_Size fields, the Unused_bit set. Raw and RLE blocks are built here; a
# Compressed block is taken from a frame libzstd made of the same bytes (its first and only block,
# which refers to nothing before it, so it decodes the same after other blocks).
ZSTD_FRAME_MAGIC = struct.pack("<I", 0xFD2FB528)
_P64 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_M64 = (1 << 64) - 1


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (the hash of zstd's Content_Checksum, RFC 8878 §3.1.1), written from its
    specification; checked against libzstd's checksum in `hand_frame`."""
    p1, p2, p3, p4, p5 = _P64
    rotl = lambda x, r: ((x << r) | (x >> (64 - r))) & _M64  # noqa: E731

    def rnd(acc: int, lane: int) -> int:
        return (rotl((acc + lane * p2) & _M64, 31) * p1) & _M64

    n, i = len(data), 0
    if n >= 32:
        v = [(seed + p1 + p2) & _M64, (seed + p2) & _M64, seed, (seed - p1) & _M64]
        while i + 32 <= n:
            for j in range(4):
                v[j] = rnd(v[j], int.from_bytes(data[i + 8 * j : i + 8 * j + 8], "little"))
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & _M64
        for x in v:
            h = (((h ^ rnd(0, x)) * p1) + p4) & _M64
    else:
        h = (seed + p5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h = ((rotl(h ^ rnd(0, int.from_bytes(data[i : i + 8], "little")), 27) * p1) + p4) & _M64
        i += 8
    if i + 4 <= n:
        h = ((rotl(h ^ (int.from_bytes(data[i : i + 4], "little") * p1) & _M64, 23) * p2) + p3) & _M64
        i += 4
    while i < n:
        h = (rotl(h ^ (data[i] * p5) & _M64, 11) * p1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * p2) & _M64
    h ^= h >> 29
    h = (h * p3) & _M64
    return h ^ (h >> 32)


def block_header(last: bool, kind: int, size: int) -> bytes:
    """Last_Block (bit 0), Block_Type (bits 1-2: 0 raw, 1 RLE, 2 compressed, 3 reserved), Block_Size."""
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")


def compressed_block(data: bytes) -> bytes:
    """The Compressed block (header and body) libzstd writes for ``data`` alone, Last_Block clear."""
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False).compress(data)
    pos = zstandard.frame_header_size(frame)
    head = int.from_bytes(frame[pos : pos + 3], "little")
    assert (head >> 1) & 3 == 2 and head & 1 and pos + 3 + (head >> 3) == len(frame), "not one compressed block"
    return block_header(False, 2, head >> 3) + frame[pos + 3 :]


def hand_frame(content: bytes, blocks: list[tuple[str, int]], *, fcs_bytes: int, window_log: int | None = None,
               checksum: bool = False, unused_bit: bool = False) -> bytes:  # fmt: skip
    """One zstd frame of ``content``, cut into ``blocks`` (kind "raw", "rle" or "compressed",
    number of content bytes). ``window_log`` writes a Window_Descriptor (Single_Segment_flag 0);
    without it the frame is single-segment. ``fcs_bytes`` is the Frame_Content_Size field's size."""
    single = window_log is None
    fcs_flag = {1: 0, 2: 1, 4: 2, 8: 3}[fcs_bytes]
    assert fcs_bytes != 1 or single, "a 1-byte content size exists only in single-segment frames"
    fhd = fcs_flag << 6 | int(single) << 5 | int(unused_bit) << 4 | int(checksum) << 2  # reserved bit, DID: 0
    out = ZSTD_FRAME_MAGIC + bytes([fhd])
    if not single:
        out += bytes([(window_log - 10) << 3])  # Exponent, Mantissa 0: a window of 2^window_log bytes
    out += (len(content) - (256 if fcs_bytes == 2 else 0)).to_bytes(fcs_bytes, "little")
    pos = 0
    for i, (kind, n) in enumerate(blocks):
        part, last = content[pos : pos + n], i == len(blocks) - 1
        if kind == "raw":
            out += block_header(last, 0, n) + part
        elif kind == "rle":
            assert part == part[:1] * n
            out += block_header(last, 1, n) + part[:1]
        else:
            b = compressed_block(part)
            out += block_header(last, 2, len(b) - 3) + b[3:]
        pos += n
    assert pos == len(content)
    if checksum:  # the low 4 bytes of XXH64(content), little-endian
        out += (xxh64(content) & 0xFFFFFFFF).to_bytes(4, "little")
        lib = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(content)[-4:]
        assert out[-4:] == lib, "xxh64 differs from libzstd's"
    assert zstandard.ZstdDecompressor().decompress(out, max_output_size=len(content) or 1) == content or not content
    return out


def walk_blocks(frame: bytes) -> list[int]:
    """Block_Type of every block of a frame (for the asserts below; spec §7.1 rule 5)."""
    fhd = frame[4]
    pos = 5 + (0 if fhd & 0x20 else 1) + {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    kinds = []
    while True:
        head = int.from_bytes(frame[pos : pos + 3], "little")
        kinds.append((head >> 1) & 3)
        pos += 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)
        if head & 1:
            return kinds


def _planes(values: np.ndarray, transform: str = "byte_planes") -> list[bytes]:
    """The byte planes of a chunk's elements (spec §6.2), plane 0 the most significant byte."""
    size = values.dtype.itemsize
    words = values.reshape(-1).view(f"<u{size}").astype(np.uint64)
    if transform == "float_planes":
        words = ((words << np.uint64(1)) | (words >> np.uint64(8 * size - 1))) & np.uint64((1 << (8 * size)) - 1)
    return [((words >> np.uint64(8 * (size - 1 - p))) & np.uint64(0xFF)).astype(np.uint8).tobytes() for p in range(size)]


class Hand:
    """A file assembled blob by blob; `place` appends the stored blobs in any order."""

    def __init__(self, producer: str = "wcfmt conformance vectors", minor: int = 0) -> None:
        self.header: dict[str, Any] = {"producer": producer, "tensors": {}}
        self.minor = minor
        self.pending: list[tuple[dict[str, Any], bytes]] = []

    def blob(self, stored: bytes, encoding: str) -> dict[str, Any]:
        ref = {"offset": -1, "length": len(stored), "encoding": encoding, "crc32": crc(stored)}
        self.pending.append((ref, stored))
        return ref

    def lossless(self, name: str, values: np.ndarray, dtype: str, chunk_rows: int,
                 store: Callable[[int, int, bytes], tuple[bytes, str]], transform: str = "byte_planes") -> None:  # fmt: skip
        """A lossless tensor; ``store(chunk, plane, decoded) -> (stored, encoding)`` picks each blob."""
        rows, row = (values.shape[0], int(np.prod(values.shape[1:]))) if values.ndim else (1, 1)
        flat = values.reshape(-1)
        chunks = []
        for i, a in enumerate(range(0, rows if flat.size else 0, chunk_rows)):
            part = flat[a * row : min(a + chunk_rows, rows) * row]
            chunks.append({"planes": [self.blob(*store(i, p, plane)) for p, plane in enumerate(_planes(part, transform))]})
        self.header["tensors"][name] = {"dtype": dtype, "shape": list(values.shape), "codec": "lossless",
                                        "transform": transform, "chunk_rows": chunk_rows, "chunks": chunks}  # fmt: skip

    def clustered(self, name: str, dtype: str, shape: list[int], chunk_rows: int,
                  chunks: list[tuple[list[float], list[int]]]) -> None:  # fmt: skip
        """A clustered tensor from (table, labels) per chunk; labels packed here (spec §5.3), stored raw."""
        out = []
        for table, labels in chunks:
            k = len(table)
            w = 0 if k == 1 else next(b for b in (1, 2, 4, 8) if 2**b >= k)
            packed = bytearray(-(-len(labels) * w // 8))
            for j, lab in enumerate(labels if w else []):
                packed[j * w // 8] |= lab << (j * w % 8)
            out.append({"k": k, "label_bits": w, "centroids": self.blob(np.array(table, "<f2").tobytes(), "raw"),
                        "labels": self.blob(bytes(packed), "raw")})  # fmt: skip
        self.header["tensors"][name] = {"dtype": dtype, "shape": shape, "codec": "clustered", "chunk_rows": chunk_rows,
                                        "chunks": out}  # fmt: skip

    def build(self, order: Callable[[list[int]], list[int]] = lambda idx: idx, header_text: bytes | None = None) -> bytes:
        """Place the blobs in ``order`` (of their creation indices), then the header and preamble."""
        d = Draft.__new__(Draft)
        d.magic, d.major, d.minor, d.flags = MAGIC, 1, self.minor, 0
        d.data, d.header = bytearray(64), self.header
        for i in order(list(range(len(self.pending)))):
            ref, stored = self.pending[i]
            ref["offset"] = d.append(stored) if stored else len(d.data) + (-len(d.data) % 64)
        return d.build(header_text)


def hand_vectors() -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    """Valid files built here, with the values each tensor must decode to (checked in `write_all`
    against the reference decoder: two paths to the same bytes)."""
    files: dict[str, bytes] = {}
    want: dict[str, dict[str, bytes]] = {}
    g = np.random.default_rng(102)

    # zstd frames of every shape §7.1 allows, in U32 and U64 tensors; blobs in reverse header order
    h = Hand()
    # bytes 0..3 of each element are 0, 3b, 5b, 7b for b < 8 (plane 0 all zero, the others 3 bits of
    # entropy, so libzstd writes compressed blocks); a run of 0x01020304 opens chunk 1 (RLE blocks)
    u32 = (g.integers(0, 8, size=(4, 150)) * 0x00030507).astype("<u4")
    u32[2, :40] = 0x01020304
    lib10 = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=10, strategy=zstandard.STRATEGY_FAST, write_content_size=True, write_checksum=True,
        write_dict_id=False))  # fmt: skip

    def u32_store(chunk: int, plane: int, data: bytes) -> tuple[bytes, str]:
        n = len(data)
        assert n == 300
        frames = {
            (0, 0): lambda: hand_frame(data, [("rle", n)], fcs_bytes=2),  # one RLE block, 2-byte size (n - 256)
            (0, 1): lambda: hand_frame(data, [("raw", 100), ("compressed", 150), ("raw", 50)], fcs_bytes=4),
            (0, 2): lambda: hand_frame(data, [("raw", 100), ("raw", 100), ("raw", 100)], fcs_bytes=2, window_log=10,
                                       checksum=True),  # fmt: skip
            (0, 3): lambda: hand_frame(data, [("compressed", n)], fcs_bytes=8, unused_bit=True),
            (1, 0): lambda: hand_frame(data, [("rle", 40), ("rle", 260)], fcs_bytes=8, window_log=10),
            (1, 1): lambda: hand_frame(data, [("rle", 40), ("raw", 260)], fcs_bytes=4),
        }
        if (chunk, plane) in frames:
            return frames[(chunk, plane)](), "zstd"
        return data, "raw"

    h.lossless("u32_frames", u32, "U32", 2, u32_store)
    # the extremes, then a period of 50 (byte b in bytes 0..6), so that libzstd's matches reach back
    # across a block boundary
    u64 = np.concatenate([np.array([0, 1, 2**63, 2**64 - 1, 0x0102030405060708], "<u8"),
                          np.tile(np.arange(50, dtype="<u8") * np.uint64(0x01010101010101), 30)[:1495]])  # fmt: skip
    assert u64.size == 1500

    def u64_store(chunk: int, plane: int, data: bytes) -> tuple[bytes, str]:
        if plane == 1:  # libzstd, 1 KiB window: a Window_Descriptor, several blocks, a checksum
            frame = lib10.compress(data)
            assert not frame[4] & 0x20 and len(walk_blocks(frame)) >= 2 and frame[4] & 0x04, "not multi-block"
            return frame, "zstd"
        if plane == 7:
            return hand_frame(data, [("raw", 1000), ("raw", 500)], fcs_bytes=4, window_log=10, checksum=True), "zstd"
        return data, "raw"

    h.lossless("u64_frames", u64, "U64", 1500, u64_store)
    files["zstd_frames"] = h.build(order=lambda idx: idx[::-1])
    want["zstd_frames"] = {"u32_frames": u32.tobytes(), "u64_frames": u64.tobytes()}

    # clustered scalars and zero-element clustered tensors; a producer of 256 code points and
    # 1,021 bytes (511 UTF-16 units); settings integers beyond 2^63 (any integer §3.4 allows)
    h = Hand(producer="\U0001d11e" * 255 + "x")
    h.header["settings"] = {"k": 10**300, "level": -7}
    h.clustered("scalar_f32", "F32", [], 1, [([-1.5, 0.25, 3.0], [2])])
    h.clustered("scalar_bf16_k1", "BF16", [], 4, [([1 / 3], [0])])
    h.clustered("empty_rows", "F16", [0, 5], 4, [])
    h.clustered("empty_cols", "BF16", [3, 0], 1, [])
    h.clustered("f16_after_empty", "F16", [2, 3], 1, [([-2.0, 0.5], [1, 0, 1]), ([7.0, 8.0, 9.0, 10.0, 11.0], [4, 0, 2])])
    files["clustered_edges"] = h.build()
    third = np.array(1 / 3, "<f2").astype("<f4").view("<u4")  # fp16 0x3555 widened: 0x3EAAA000
    assert int(third) == 0x3EAAA000
    want["clustered_edges"] = {
        "scalar_f32": np.array(3.0, "<f4").tobytes(),
        "scalar_bf16_k1": struct.pack("<H", 0x3EAB),  # 0x3EAA, rounded up: the low half 0xA000 > 0x8000
        "empty_rows": b"", "empty_cols": b"",
        "f16_after_empty": np.array([0.5, -2.0, 0.5, 11.0, 7.0, 9.0], "<f2").tobytes(),
    }  # fmt: skip

    # a sharded model (spec §8): an index and two shards
    shards: dict[str, Hand] = {"model-00001-of-00002.wclust": Hand(), "model-00002-of-00002.wclust": Hand()}
    raw = lambda c, p, d: (d, "raw")  # noqa: E731
    emb = (np.arange(24, dtype="<u2").reshape(4, 6) * 0x0101 + 0x3C00).astype("<u2")  # BF16 bit patterns
    norm = np.linspace(0.5, 1.5, 6).astype("<f4")
    a = shards["model-00001-of-00002.wclust"]
    a.lossless("model.embed_tokens.weight", emb, "BF16", 4, raw, transform="float_planes")
    a.clustered("model.layers.0.mlp.down_proj.weight", "F16", [2, 4], 2, [([-0.125, 0.125], [0, 1, 1, 0, 1, 1, 1, 0])])
    b = shards["model-00002-of-00002.wclust"]
    b.clustered("model.layers.1.mlp.down_proj.weight", "BF16", [3, 2], 3, [([-1.0, 0.0, 1.0, 2.0], [3, 2, 1, 0, 1, 2])])
    b.lossless("model.norm.weight", norm, "F32", 6, raw, transform="float_planes")
    weight_map = {n: f for f, s in shards.items() for n in s.header["tensors"]}
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    total = sum(int(np.prod(e["shape"])) * sizes[e["dtype"]] for s in shards.values() for e in s.header["tensors"].values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    for f, s in shards.items():
        files[f"sharded/{f}"] = s.build()
    files["sharded/model.wclust.index.json"] = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    want["sharded/model-00001-of-00002.wclust"] = {
        "model.embed_tokens.weight": emb.tobytes(),
        "model.layers.0.mlp.down_proj.weight": np.array([-0.125, 0.125, 0.125, -0.125, 0.125, 0.125, 0.125, -0.125], "<f2").tobytes(),
    }  # fmt: skip
    want["sharded/model-00002-of-00002.wclust"] = {
        # BF16 of the fp16 values 2, 1, 0, -1, 0, 1: exact, so the upper halves of their float32
        "model.layers.1.mlp.down_proj.weight": struct.pack("<6H", 0x4000, 0x3F80, 0x0000, 0xBF80, 0x0000, 0x3F80),
        "model.norm.weight": norm.tobytes(),
    }  # fmt: skip
    return files, want


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

    def header_text(name: str, bad_text: bytes, err: str, rule: str, minor: int | None = None) -> None:
        d = B.copy()
        if minor is not None:
            d.minor = minor
        out[name] = (d.build(bad_text), err, rule, [["header", text]], [])

    def header_edit(name: str, mutate: Callable[[dict[str, Any]], None], err: str, rule: str,
                    repair: list[list[Any]], minor: int | None = None, also: list[str] | None = None) -> None:  # fmt: skip
        d = B.copy()
        mutate(d.header)
        if minor is not None:
            d.minor = minor
        out[name] = (d.build(), err, rule, repair, also or [])

    def blob_edit(name: str, edit: Callable[[Draft], None], err: str, rule: str, also: list[str] | None = None,
                  minor: int | None = None) -> None:  # fmt: skip
        d = B.copy()
        edit(d)
        if minor is not None:
            d.minor = minor
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
    # header_offset 0 with header_length the file size keeps the size equation: the header would
    # be the whole file, whose CRC is not the one stored (checked later, §9.4 step 2)
    raw_fault("header_offset_below_64", base[:16] + struct.pack("<QQ", 0, len(base)) + base[32:], "FormatError",
              "§3.1 header_offset >= 64", ["§3.3 header_crc32 (the whole file taken as the header)"])
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
    # an entry set aside for an unknown codec is still a key of `tensors` (found by mutation tests:
    # wcfmt accepted both, the reference decoder did not)
    header_edit("unknown_codec_empty_name", lambda h: h["tensors"].update({"": {"dtype": "F16", "shape": [2], "codec": "vq"}}),
                "HeaderError", "§4.1 tensor names are non-empty, also of a tensor needing an unknown codec (§10)",
                [["header_del", ["tensors", ""]]], minor=1)
    header_text("unknown_codec_surrogate_name",
                text.replace('"tensors":{', '"tensors":{"\\ud800":{"dtype":"F16","shape":[2],"codec":"vq"},', 1).encode(),
                "HeaderError", "§3.4 names are Unicode scalar values, also of a tensor needing an unknown codec (§10)",
                minor=1)

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
    assert B.ref("ids", 0, 1)["encoding"] == "raw"  # a lossless plane stored raw: one byte too many
    blob_edit("raw_plane_length_wrong", lambda d: d.set_blob(d.ref("ids", 0, 1), d.stored(d.ref("ids", 0, 1)) + b"\x00"),
              "FormatError", "§7.1 raw length = decoded size (a lossless plane)")
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
    _rules_of_1_0_2(B, base, text, good, plane, zstd_fault, raw_fault, header_text, header_edit, blob_edit, tpath)
    return out


def _rules_of_1_0_2(B: Draft, base: bytes, text: str, good: bytes, plane: bytes, zstd_fault: Any, raw_fault: Any,
                    header_text: Any, header_edit: Any, blob_edit: Any, tpath: Any) -> None:  # fmt: skip
    """Vectors added in spec 1.0.2: the reader MUSTs no 1.0.1 vector tested (the findings of a
    second implementation, section C). They register through the helpers of `invalid_sets`."""
    # §7.1 zstd frames (the `zlab` label plane, 2048 decoded bytes)
    head = zstandard.frame_header_size(good)
    zstd_fault("zstd_reserved_fhd_bit", good[:4] + bytes([good[4] | 0x08]) + good[5:],
               "§7.1 rule 2 the Frame_Header_Descriptor's reserved bit is zero")
    block = int.from_bytes(good[head : head + 3], "little") | 3 << 1
    zstd_fault("zstd_reserved_block_type", good[:head] + block.to_bytes(3, "little") + good[head + 3 :],
               "§7.1 rule 5 no block of the reserved Block_Type 3")
    assert good[4] == 0x60 and head == 7  # single segment, a 2-byte content size: cut inside it
    zstd_fault("zstd_header_cut", good[:6], "§7.1 the frame is complete (cut inside its header)")
    # a Compressed block whose literals section claims 31 raw bytes and holds 1: libzstd reports
    # corruption; sizes and framing are right, so only decoding finds it (rule 6)
    corrupt = ZSTD_FRAME_MAGIC + bytes([0x60]) + (len(plane) - 256).to_bytes(2, "little") + block_header(True, 2, 2) + bytes([31 << 3, 0])
    zstd_fault("zstd_corrupt_block", corrupt, "§7.1 rule 6 the frame decodes")
    checked = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(plane)
    zstd_fault("zstd_checksum_mismatch", checked[:-1] + bytes([checked[-1] ^ 1]),
               "§7.1 rule 6 a Content_Checksum that does not match is a failure to decode (FormatError)")

    # §10 unknown values in a requested tensor of a newer minor (VersionError), in one of the
    # reader's own minor (HeaderError)
    header_edit("unknown_dtype_requested", lambda h: h["tensors"]["ids"].update(dtype="I4"), "VersionError",
                "§10 a requested tensor needs an unknown dtype (newer minor)", [["header_set", tpath("ids", "dtype"), "I32"]], minor=1)
    header_edit("unknown_transform_requested", lambda h: h["tensors"]["ids"].update(transform="delta_planes"),
                "VersionError", "§10 a requested tensor needs an unknown transform (newer minor)",
                [["header_set", tpath("ids", "transform"), "byte_planes"]], minor=1)
    header_edit("unknown_encoding_requested", lambda h: h["tensors"]["ids"]["chunks"][0]["planes"][1].update(encoding="brotli"),
                "VersionError", "§10 a requested tensor needs an unknown encoding (newer minor)",
                [["header_set", tpath("ids", "chunks", 0, "planes", 1, "encoding"), "raw"]], minor=1)
    header_edit("unknown_transform_minor_0", lambda h: h["tensors"]["ids"].update(transform="delta_planes"), "HeaderError",
                "§6.1/§10 transform, own minor", [["header_set", tpath("ids", "transform"), "byte_planes"]])
    header_edit("unknown_encoding_minor_0", lambda h: h["tensors"]["ids"]["chunks"][0]["planes"][1].update(encoding="brotli"),
                "HeaderError", "§4.4/§10 encoding, own minor",
                [["header_set", tpath("ids", "chunks", 0, "planes", 1, "encoding"), "raw"]])
    header_edit("alias_of_unknown_codec", lambda h: h["tensors"]["embed"].update(codec="vq"), "VersionError",
                "§10 an alias whose target needs an unknown codec needs it too",
                [["header_set", tpath("embed", "codec"), "lossless"]], minor=1)
    # a centroid table in an unknown encoding: an unknown value, so its 2*k length is not checked
    blob_edit("centroids_unknown_encoding", lambda d: d.set_blob(d.ref("up", 0, "centroids"), b"brot", encoding="brotli"),
              "VersionError", "§5.2/§10 a centroid blob of unknown encoding (newer minor): unknown value, no 2*k check",
              minor=1)
    # an unknown codec's fields are not blobs to the reader: nothing in them is placed (§3.2)
    vq = {"dtype": "F16", "shape": [2], "codec": "vq", "planes": [{"offset": 2**40, "length": 4096, "encoding": "raw", "crc32": 0}],
          "table": {"offset": 64, "length": 72, "encoding": "raw", "crc32": 0}}  # fmt: skip
    header_edit("unknown_codec_not_placed", lambda h: h["tensors"].update(vq_w=vq), "VersionError",
                "§10 an unknown codec's entry takes no part in the range and overlap checks",
                [["header_del", ["tensors", "vq_w"]]], minor=1)
    header_edit("unknown_codec_missing_shape", lambda h: h["tensors"].update(vq_w={"dtype": "F16", "codec": "vq"}),
                "HeaderError", "§10 an unknown codec's entry still has dtype, shape and codec",
                [["header_del", ["tensors", "vq_w"]]], minor=1,
                also=["§10 a requested tensor needs an unknown codec (VersionError, §9.4 step 5)"])

    def overlap_unknown_dtype(d: Draft) -> None:
        d.header["tensors"]["ids"]["dtype"] = "I4"
        p2, p3 = d.ref("ids", 0, 2), d.ref("ids", 0, 3)
        d.data[p3["offset"] : p3["offset"] + p3["length"]] = bytes(p3["length"])
        p3.update(p2)

    blob_edit("unknown_dtype_blobs_placed", overlap_unknown_dtype, "FormatError",
              "§9.4 step 4/§10 the blobs of a known codec with an unknown dtype are range- and overlap-checked",
              ["§10 a requested tensor needs an unknown dtype (VersionError, §9.4 step 5)"], minor=1)

    def version_first(d: Draft) -> None:
        d.header["tensors"]["vq_w"] = {"dtype": "F16", "shape": [2], "codec": "vq"}
        ref = d.ref("up", 0, "labels")
        ref["crc32"] ^= 1

    blob_edit("version_before_blob_checks", version_first, "VersionError",
              "§9.4 step 5 (unknown values of every requested tensor) before step 6 (blobs)",
              ["§7.3 blob crc32 (§9.4 step 6)"], minor=1)

    # §9.4 order: the header CRC before the JSON (step 2 before 3), a blob's CRC before its data
    h_off = len(B.data)
    bad_json = b"{not json"
    raw_fault("header_crc_before_json", base[:24] + struct.pack("<QI", len(bad_json), crc(bad_json) ^ 1) + base[36:h_off] + bad_json,
              "ChecksumError", "§3.3/§9.4 the header CRC is verified before the header is parsed", ["§3.3 JSON"])
    labels = B.stored(B.ref("up", 0, "labels"))
    blob_edit("blob_crc_before_decoding",
              lambda d: d.patch_blob(d.ref("up", 0, "labels"), 0, bytes([(labels[0] & 0xF0) | 8]), fix_crc=False),
              "ChecksumError", "§7.3/§9.4 a blob's CRC is verified before it is decoded", ["§5.3 every label < k"])

    # §3.3/§3.4 JSON
    header_text("header_integer_400_digits", text.replace('"sqnr_db":18.0', '"sqnr_db":1' + "0" * 399, 1).encode(),
                "HeaderError", "§3.4 an integer of 400 digits is beyond binary64")
    header_text("header_integer_5000_digits", text.replace('"sqnr_db":18.0', '"sqnr_db":' + "9" * 5000, 1).encode(),
                "HeaderError", "§3.4 an integer of 5000 digits is beyond binary64 (CPython's int() refuses it itself)")
    assert '"level":3,' in text
    header_text("integer_exponent_form", text.replace('"level":3,', '"level":3e0,', 1).encode(), "HeaderError",
                "§3.4 integers are written without exponent (settings.level 3e0)")
    header_text("header_positive_infinity", text.replace('"sqnr_db":18.0', '"sqnr_db":Infinity', 1).encode(),
                "HeaderError", "§3.3 no Infinity")
    header_text("header_deeply_nested", text.replace('"note":"fault base"', '"note":' + "[" * 20000 + "]" * 20000, 1).encode(),
                "HeaderError", "§3.4 nesting 20,000 deep (a reader with a depth limit rejects it, one without the "
                "metadata value that is not a string)")
    header_text("header_not_object_whitespace", b" [" + text.encode() + b"]", "HeaderError",
                "§3.3 a JSON object (after leading whitespace, which §3.4 allows)")
    header_text("duplicate_key_in_ignored_field", text.replace('{"producer":', '{"future":{"a":1,"\\u0061":2},"producer":', 1).encode(),
                "HeaderError", "§3.3 no duplicate keys, in an ignored field too (newer minor)", minor=1)
    header_text("nan_in_ignored_field", text.replace('{"producer":', '{"future":[NaN],"producer":', 1).encode(),
                "HeaderError", "§3.3 no NaN, in an ignored field too (newer minor)", minor=1)

    # §4 field types
    def no_tensors(d: Draft) -> None:  # the data section zeroed with them: no nonzero padding
        d.header.pop("tensors")
        d.data[64:] = bytes(len(d.data) - 64)

    blob_edit("tensors_missing", no_tensors, "HeaderError", "§4.1 tensors required")
    header_edit("tensors_not_object", lambda h: h.update(tensors=list(h["tensors"].values())), "HeaderError",
                "§4.1 tensors is an object", [["header", text]])
    header_edit("producer_not_string", lambda h: h.update(producer=5), "HeaderError", "§4.1 producer is a string",
                [["header_set", ["producer"], B.header["producer"]]])
    header_edit("metadata_not_object", lambda h: h.update(metadata=["format", "pt"]), "HeaderError",
                "§4.1 metadata is an object", [["header_set", ["metadata"], B.header["metadata"]]])
    header_edit("settings_not_object", lambda h: h.update(settings="k=8"), "HeaderError", "§4.3 settings is an object",
                [["header", text]])
    header_edit("settings_include_wrong_type", lambda h: h["settings"].update(include=".*"), "HeaderError",
                "§4.3 settings.include is an array of strings", [["header_set", ["settings", "include"], [".*"]]])
    header_edit("settings_exclude_wrong_type", lambda h: h["settings"].update(exclude=[1]), "HeaderError",
                "§4.3 settings.exclude is an array of strings", [["header_set", ["settings", "exclude"], []]])
    header_edit("settings_method_wrong_type", lambda h: h["settings"].update(method=1), "HeaderError",
                "§4.3 settings.method is a string", [["header_set", ["settings", "method"], "ecsq"]])
    header_edit("settings_extra_wrong_type", lambda h: h["settings"]["extra"].update(bits=3.5), "HeaderError",
                "§4.3 settings.extra maps strings to strings", [["header_set", ["settings", "extra", "bits"], "3.5"]])
    def entry_not_object(d: Draft) -> None:
        for i in range(3):
            for b in (d.ref("tiny", i, "centroids"), d.ref("tiny", i, "labels")):
                d.data[b["offset"] : b["offset"] + b["length"]] = bytes(b["length"])
        d.header["tensors"]["tiny"] = "tiny"

    blob_edit("entry_not_object", entry_not_object, "HeaderError", "§4.2 a tensor entry is an object")

    def not_object(tensor: str, chunk: int, key: str | None) -> Callable[[Draft], None]:
        def f(d: Draft) -> None:  # the bytes no longer listed are zeroed: no nonzero padding
            c = d.header["tensors"][tensor]["chunks"][chunk]
            for b in ([c[key]] if key else [c["centroids"], c["labels"]]):
                d.data[b["offset"] : b["offset"] + b["length"]] = bytes(b["length"])
            if key:
                c[key] = key
            else:
                d.header["tensors"][tensor]["chunks"][chunk] = "chunk"
        return f

    blob_edit("chunk_not_object", not_object("up", 1, None), "HeaderError", "§5.2 a chunk is an object")
    blob_edit("blob_not_object", not_object("up", 1, "labels"), "HeaderError", "§4.4 a blob reference is an object")
    header_edit("dtype_missing", lambda h: h["tensors"]["ids"].pop("dtype"), "HeaderError", "§4.2 dtype required",
                [["header_set", tpath("ids", "dtype"), "I32"]])
    header_edit("shape_missing", lambda h: h["tensors"]["ids"].pop("shape"), "HeaderError", "§4.2 shape required",
                [["header_set", tpath("ids", "shape"), [6, 8]]])
    header_edit("codec_missing", lambda h: h["tensors"]["empty"].pop("codec"), "HeaderError", "§4.2 codec required",
                [["header_set", tpath("empty", "codec"), "lossless"]])
    header_edit("shape_not_array", lambda h: h["tensors"]["empty"].update(shape="0x4"), "HeaderError",
                "§4.2 shape is an array", [["header_set", tpath("empty", "shape"), [0, 4]]])
    header_edit("negative_dimension", lambda h: h["tensors"]["empty"].update(shape=[0, -4]), "HeaderError",
                "§4.2 dimensions >= 0", [["header_set", tpath("empty", "shape"), [0, 4]]])
    lab = tpath("ones", "chunks", 0, "labels")
    header_edit("length_negative", lambda h: h["tensors"]["ones"]["chunks"][0]["labels"].update(length=-1), "HeaderError",
                "§4.4 length >= 0", [["header_set", lab + ["length"], 0]])
    header_edit("length_2_63", lambda h: h["tensors"]["ones"]["chunks"][0]["labels"].update(length=2**63), "HeaderError",
                "§4.4 length < 2^63 (a field rule, before placement)", [["header_set", lab + ["length"], 0]])
    header_edit("offset_2_63", lambda h: h["tensors"]["ones"]["chunks"][0]["labels"].update(offset=2**63), "HeaderError",
                "§4.4 offset < 2^63 (a field rule, before placement)",
                [["header_set", lab + ["offset"], B.ref("ones", 0, "labels")["offset"]]])
    header_edit("chunk_rows_2_53", lambda h: h["tensors"]["ids"].update(chunk_rows=2**53), "HeaderError",
                "§5.1/§6.1 chunk_rows < 2^53", [["header_set", tpath("ids", "chunk_rows"), B.header["tensors"]["ids"]["chunk_rows"]]])
    header_edit("offset_negative", lambda h: h["tensors"]["ones"]["chunks"][0]["labels"].update(offset=-64), "HeaderError",
                "§4.4 offset >= 0", [["header_set", lab + ["offset"], B.ref("ones", 0, "labels")["offset"]]])
    header_edit("alias_target_not_string", lambda h: h["tensors"]["head"].update(target=["embed"]), "HeaderError",
                "§4.5 target is a tensor name (a string)", [["header_set", tpath("head", "target"), "embed"]])
    header_edit("chunks_not_array", lambda h: h["tensors"]["empty"].update(chunks={}), "HeaderError",
                "§6.1 chunks is an array", [["header_set", tpath("empty", "chunks"), []]])

    def alias_shape(h: dict[str, Any]) -> None:
        h["tensors"]["embed"]["codec"] = "vq"
        h["tensors"]["head"]["shape"] = [8, 16]

    header_edit("alias_of_unknown_codec_shape_mismatch", alias_shape, "HeaderError",
                "§4.5/§10 an alias is compared with a target of unknown codec (same dtype and shape)", [["header", text]],
                minor=1, also=["§10 the target needs an unknown codec (VersionError, §9.4 step 5)"])
    empty_blob = {"offset": 64, "length": 0, "encoding": "raw", "crc32": 0}
    header_edit("zero_elements_with_chunks", lambda h: h["tensors"]["empty"].update(chunks=[{"planes": [empty_blob] * 4}]),
                "HeaderError", "§4.6 a tensor with zero elements has no chunks", [["header_set", tpath("empty", "chunks"), []]])


def _with_did(frame: bytes) -> bytes:
    """The same frame with Dictionary_ID_flag = 1 and a 1-byte Dictionary_ID of 0 (RFC 8878
    §3.1.1.1.1.6): libzstd decodes it as dictionary-less; §7.1 still forbids the field."""
    fhd = frame[4]
    pos = 5 + (0 if fhd & 0x20 else 1)  # after the window descriptor, if any
    return frame[:4] + bytes([fhd | 0x01]) + frame[5:pos] + b"\x00" + frame[pos:]


#: Invalid vectors of a newer minor whose one fault is a tensor needing an unknown value (§10):
#: the tensors that need it (an alias of one too). Every other tensor of the file is read as in
#: fault_base; a reader that reads by name can check it (the manifest's `unsupported`).
PARTIAL: dict[str, set[str]] = {
    "unknown_codec_requested": {"vq_w"},
    "unknown_codec_not_placed": {"vq_w"},
    "unknown_dtype_requested": {"ids"},
    "unknown_transform_requested": {"ids"},
    "unknown_encoding_requested": {"ids"},
    "centroids_unknown_encoding": {"up"},
    "alias_of_unknown_codec": {"embed", "head"},
}


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
    hand, want = hand_vectors()
    (spec_dir / "vectors" / "valid" / "sharded").mkdir(exist_ok=True)
    index_name = "sharded/model.wclust.index.json"
    (spec_dir / "vectors" / "valid" / index_name).write_bytes(hand.pop(index_name))
    valid.update({name.removesuffix(".wclust"): data for name, data in hand.items()})
    for name, data in valid.items():
        path = spec_dir / "vectors" / "valid" / f"{name}.wclust"
        path.write_bytes(data)
        decoded = ref.decode(data)
        for tensor, values in want.get(f"{name}.wclust", want.get(name, {})).items():
            # built here from the values, decoded there from the bytes: the two must agree
            assert decoded.tensors[tensor].data == values, (name, tensor)
        exp = expected_safetensors(decoded)
        exp_path = spec_dir / "vectors" / "valid" / f"{name}.expected.safetensors"
        exp_path.write_bytes(exp)
        exp_name = f"{name}.expected.safetensors"
        manifest["valid"][f"{name}.wclust"] = {
            "sha256": _sha(data), "expected": exp_name, "expected_sha256": _sha(exp),
            "version": f"{decoded.version[0]}.{decoded.version[1]}", "tensors": list(decoded.tensors),
            "aliases": decoded.aliases,
        }  # fmt: skip
    index = json.loads((spec_dir / "vectors" / "valid" / index_name).read_bytes())
    manifest["folders"] = {"sharded": {
        "index": index_name, "sha256": _sha((spec_dir / "vectors" / "valid" / index_name).read_bytes()),
        "tensors": list(index["weight_map"]),
        "shards": sorted({f"sharded/{f}" for f in index["weight_map"].values()}),
    }}  # fmt: skip
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
        if name in PARTIAL:  # the other tensors read as fault_base's: a partial read (§9.4 step 6)
            others = [n for n in Draft(valid["fault_base"]).header["tensors"] if n not in PARTIAL[name]]
            assert list(ref.decode(data, names=others).tensors) == others, name
            entry["unsupported"] = sorted(PARTIAL[name])
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
