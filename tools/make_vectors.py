"""Regenerate spec/header.schema.json and the conformance vectors in spec/vectors/.

    python tools/make_vectors.py            # rewrite spec/ in place
    python tools/make_vectors.py --out DIR  # write elsewhere (the tests compare with spec/)

Valid vectors are `valid/NAME.wclust` with their expected dense tensors in
`valid/NAME.expected.safetensors`; invalid vectors are `invalid/NAME.wclust`, each with the error
class a reader must raise. `manifest.json` lists every file with its sha256. Vectors are built
from fixed seeds and hand-made ClusteredTensors (not the clustering engine), so tuning the engine
never changes them: only a change to the bytes on disk does (spec §10).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file as st_save

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wcfmt  # noqa: E402
from wcfmt.codecs import entropy  # noqa: E402
from wcfmt.constants import PREAMBLE_SIZE  # noqa: E402
from wcfmt.schema import json_schema  # noqa: E402


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


def _specials(dtype: torch.dtype) -> torch.Tensor:
    vals = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, 65504.0, 3.14159]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def valid_sets() -> dict[str, tuple[dict[str, object], dict[str, str]]]:
    rng = np.random.default_rng(20261123)
    sets: dict[str, tuple[dict[str, object], dict[str, str]]] = {}
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
    sets["lossless_dtypes"] = (lossless, {"vector": "lossless_dtypes"})
    emb = torch.from_numpy((rng.standard_normal((16, 8)) * 0.1).astype(np.float32)).bfloat16()
    sets["tied_and_metadata"] = (
        {
            "model.embed_tokens.weight": emb,
            "lm_head.weight": emb,
            "model.layers.0.mlp.up_proj.weight": _clustered(rng, (12, 8), [8], 5, torch.bfloat16),
        },
        {"format": "pt", "note": "ünïcode ✓", "empty": ""},
    )
    return sets


def _patch_header(data: bytes, mutate) -> bytes:  # type: ignore[no-untyped-def]
    """Rewrite the header through ``mutate(dict)`` and fix its CRC and the preamble."""
    magic, major, minor, flags, h_off, h_len, _crc = struct.unpack_from("<8sHHIQQI", data)
    header = json.loads(data[h_off : h_off + h_len])
    mutate(header)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    pre = struct.pack("<8sHHIQQI28x", magic, major, minor, flags, h_off, len(raw), entropy.crc32(raw))
    return pre + data[PREAMBLE_SIZE:h_off] + raw


def _set_label(data: bytes, tensor: str, value: int) -> bytes:
    """Overwrite the first label of a raw or zstd label plane with ``value`` and fix CRCs."""
    _m, _a, _b, _f, h_off, h_len, _c = struct.unpack_from("<8sHHIQQI", data)
    header = json.loads(data[h_off : h_off + h_len])
    blob = header["tensors"][tensor]["chunks"][0]["labels"]
    stored = data[blob["offset"] : blob["offset"] + blob["length"]]
    plane = bytearray(entropy.decompress(stored, blob["encoding"], _plane_len(header, tensor)))
    plane[0] = value
    new_stored = bytes(plane)  # stored raw: the size changes, so it goes at the end of the data
    body = bytearray(data[:h_off])
    pad = -len(body) % 64
    body += bytes(pad)
    blob.update(offset=len(body), length=len(new_stored), encoding="raw", crc32=entropy.crc32(new_stored))
    body += new_stored
    body += bytes(-len(body) % 64)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    pre = struct.pack("<8sHHIQQI28x", wcfmt.constants.MAGIC, 1, 0, 0, len(body), len(raw), entropy.crc32(raw))
    return pre + bytes(body[PREAMBLE_SIZE:]) + raw


def _plane_len(header: dict, tensor: str) -> int:
    e = header["tensors"][tensor]
    row = int(np.prod(e["shape"][1:])) if len(e["shape"]) > 1 else 1
    n = min(e["chunk_rows"], e["shape"][0]) * row
    bits = e["chunks"][0]["label_bits"]
    return -(-n * bits // 8)


def invalid_sets(base: bytes) -> dict[str, tuple[bytes, str]]:
    """Corruptions of the tied_and_metadata vector, each with the error class it must raise."""
    _m, _a, _b, _f, h_off, h_len, _c = struct.unpack_from("<8sHHIQQI", base)
    header = json.loads(base[h_off : h_off + h_len])
    up = header["tensors"]["model.layers.0.mlp.up_proj.weight"]["chunks"][0]
    out: dict[str, tuple[bytes, str]] = {}
    out["bad_magic"] = (b"GGUF" + base[4:], "FormatError")
    out["major_version_2"] = (base[:8] + struct.pack("<H", 2) + base[10:], "VersionError")
    out["flags_set"] = (base[:12] + struct.pack("<I", 1) + base[16:], "FormatError")
    out["truncated_preamble"] = (base[:40], "FormatError")
    out["truncated_data"] = (base[: h_off - 8], "FormatError")
    out["truncated_header"] = (base[:-1], "FormatError")
    out["trailing_bytes"] = (base + b"\x00", "FormatError")
    out["header_too_large"] = (base[:24] + struct.pack("<Q", 2**40) + base[32:], "FormatError")
    hdr_flip = bytearray(base)
    hdr_flip[h_off + 5] ^= 0x01
    out["header_crc_mismatch"] = (bytes(hdr_flip), "ChecksumError")
    lab = bytearray(base)
    lab[up["labels"]["offset"]] ^= 0x40
    out["labels_crc_mismatch"] = (bytes(lab), "ChecksumError")
    cen = bytearray(base)
    cen[up["centroids"]["offset"] + 1] ^= 0x04
    out["centroids_crc_mismatch"] = (bytes(cen), "ChecksumError")
    out["header_not_json"] = (_patch_raw_header(base, b"{not json"), "HeaderError")
    out["header_duplicate_key"] = (_patch_raw_header(base, base[h_off:h_off + h_len].replace(b'{"producer":', b'{"producer":"x","producer":', 1)), "HeaderError")
    out["label_bits_wrong"] = (_patch_header(base, lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"]["chunks"][0].update(label_bits=8)), "HeaderError")
    out["unknown_field_minor_0"] = (_patch_header(base, lambda h: h.update(surprise=1)), "HeaderError")
    out["alias_missing_target"] = (_patch_header(base, lambda h: h["tensors"]["lm_head.weight"].update(target="nope")), "HeaderError")
    out["wrong_chunk_count"] = (_patch_header(base, lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].update(chunk_rows=100)), "HeaderError")

    def overlap(h: dict) -> None:
        chunks = h["tensors"]["model.layers.0.mlp.up_proj.weight"]["chunks"]
        chunks[1]["labels"] = dict(chunks[0]["labels"])

    out["overlapping_blobs"] = (_patch_header(base, overlap), "FormatError")
    out["blob_past_data"] = (_patch_header(base, lambda h: up_of(h)["labels"].update(offset=h_off)), "FormatError")
    out["label_out_of_range"] = (_set_label(base, "model.layers.0.mlp.up_proj.weight", 8), "FormatError")
    return out


def up_of(h: dict) -> dict:
    return h["tensors"]["model.layers.0.mlp.up_proj.weight"]["chunks"][0]


def _patch_raw_header(base: bytes, raw: bytes) -> bytes:
    _m, major, minor, flags, h_off, _l, _c = struct.unpack_from("<8sHHIQQI", base)
    pre = struct.pack("<8sHHIQQI28x", wcfmt.constants.MAGIC, major, minor, flags, h_off, len(raw), entropy.crc32(raw))
    return pre + base[PREAMBLE_SIZE:h_off] + raw


def _write_vector(tensors: dict[str, object], path: Path, meta: dict[str, str]) -> None:
    """Write with a fixed producer string, so that a release number never changes the vectors."""
    from wcfmt.writer import WclustWriter

    first_of: dict[int, str] = {}
    with WclustWriter(path, metadata=meta, threads=1, overwrite=True, producer="wcfmt conformance vectors") as w:
        for name, value in tensors.items():
            if id(value) in first_of:  # the same object twice: tied weights, stored as an alias
                w.add_alias(name, first_of[id(value)])
            else:
                w.add(name, value)  # type: ignore[arg-type]
                first_of[id(value)] = name


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_all(spec_dir: Path) -> None:
    (spec_dir / "vectors" / "valid").mkdir(parents=True, exist_ok=True)
    (spec_dir / "vectors" / "invalid").mkdir(parents=True, exist_ok=True)
    (spec_dir / "header.schema.json").write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    manifest: dict[str, dict] = {"valid": {}, "invalid": {}}
    for name, (tensors, meta) in valid_sets().items():
        path = spec_dir / "vectors" / "valid" / f"{name}.wclust"
        _write_vector(tensors, path, meta)
        expected = {}
        for k, v in tensors.items():
            dense = v.decode() if isinstance(v, wcfmt.ClusteredTensor) else v  # type: ignore[union-attr]
            expected[k] = dense.clone().contiguous()
        exp_path = spec_dir / "vectors" / "valid" / f"{name}.expected.safetensors"
        st_save(expected, str(exp_path), metadata=meta)
        manifest["valid"][path.name] = {"sha256": _sha(path), "expected": exp_path.name}
    base = (spec_dir / "vectors" / "valid" / "tied_and_metadata.wclust").read_bytes()
    for name, (data, err) in invalid_sets(base).items():
        path = spec_dir / "vectors" / "invalid" / f"{name}.wclust"
        path.write_bytes(data)
        manifest["invalid"][path.name] = {"sha256": _sha(path), "error": err}
    (spec_dir / "vectors" / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "spec", help="spec folder to write (default: spec/)")
    args = ap.parse_args()
    write_all(args.out)
    print(f"wrote {args.out}/header.schema.json and {args.out}/vectors/")


if __name__ == "__main__":
    main()
