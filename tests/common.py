"""Shared test helpers: tensor builders, small files, and surgery on .wclust bytes.

The surgery helpers (`rewrite`, `replace_blob`, `patch_blob`) craft files that are invalid in
one chosen way yet carry correct checksums, so a test reaches the check it means to exercise
instead of stopping at a CRC.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from hypothesis import HealthCheck, settings

from wcfmt import ClusteredTensor, save_file
from wcfmt.constants import ALIGNMENT, MAGIC, PREAMBLE_SIZE, VERSION_MAJOR, VERSION_MINOR
from wcfmt.schema import chunk_row_ranges, rows_and_row_size

PREAMBLE = struct.Struct("<8sHHIQQI28s")
CLUSTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def hypothesis_settings(examples: int) -> settings:
    """Property-test settings: few examples by default (suite time matters); set
    WCFMT_HYPOTHESIS_EXAMPLES=500 for a deeper run."""
    return settings(
        max_examples=int(os.environ.get("WCFMT_HYPOTHESIS_EXAMPLES", examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


# -- tensors ------------------------------------------------------------------------------------
def random_clustered(
    shape: tuple[int, ...],
    k: int | list[int],
    chunk_rows: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> ClusteredTensor:
    """A valid `ClusteredTensor` with random labels and random ascending fp16 tables.

    ``k`` is one K for every chunk or a list with one K per chunk. Every label value 0..K-1
    appears when the chunk has at least K elements, so a decoder that mixes up labels shows it.
    """
    g = np.random.default_rng(seed)
    rows, row_size = rows_and_row_size(shape)
    ranges = [] if rows * row_size == 0 else chunk_row_ranges(rows, chunk_rows)
    ks = [k] * len(ranges) if isinstance(k, int) else list(k)
    assert len(ks) == len(ranges), (ks, ranges)
    labels = np.zeros(rows * row_size, np.uint8)
    tables = []
    for kk, (a, b) in zip(ks, ranges):
        n = (b - a) * row_size
        lab = g.integers(0, kk, n, dtype=np.uint8)
        lab[: min(n, kk)] = np.arange(min(n, kk), dtype=np.uint8)
        g.shuffle(lab)
        labels[a * row_size : b * row_size] = lab
        tables.append(torch.from_numpy(ascending_f16(kk, g)))
    return ClusteredTensor(
        labels=torch.from_numpy(labels).reshape(shape), centroids=tables, chunk_rows=chunk_rows, dtype=dtype
    )


def ascending_f16(k: int, g: np.random.Generator) -> np.ndarray:
    """``k`` distinct finite fp16 values in ascending order (heavy-tailed, both signs)."""
    vals = np.empty(0, np.float32)
    while vals.size < k:
        cand = (g.standard_t(3, size=4 * k + 8) * 0.05).astype("<f2").astype("<f4")
        vals = np.unique(np.concatenate([vals, cand[np.isfinite(cand)]]))  # one of +0.0/-0.0
    return np.sort(g.choice(vals, k, replace=False)).astype("<f2")


def heavy_tailed(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) values, scaled like LLM weights, in ``dtype``."""
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_t(3, size=shape).astype(np.float32) * 0.02).to(dtype)


def special_values(dtype: torch.dtype, n: int = 64, seed: int = 0) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` holding its edge cases, then random bit patterns: for floats
    NaNs with payloads (one negative), +-0, +-inf, 1, extremes and subnormals; for integers
    their extremes."""
    g = np.random.default_rng(seed)
    if dtype == torch.bool:
        return torch.from_numpy(g.integers(0, 2, n).astype(np.bool_))
    size = torch.empty(0, dtype=dtype).element_size()
    raw = g.integers(0, 256, n * size, dtype=np.uint8).view(f"<u{size}").copy()
    if dtype.is_floating_point:
        top, sign = (1 << (8 * size - 1)) - 1, 1 << (8 * size - 1)
        raw[:3] = [top, top - 2, sign | (top - 1)]  # only a bit-exact codec keeps these NaNs
    t = torch.from_numpy(raw.view(f"<i{size}") if size > 1 else raw).view(dtype).clone()
    if dtype.is_floating_point:
        fi = torch.finfo(dtype)
        edge = [0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, fi.max, fi.min, fi.tiny, fi.tiny / 4, -fi.tiny / 2]
        t[3 : 3 + len(edge)] = torch.tensor(edge, dtype=torch.float64).to(dtype)
    else:
        ii = torch.iinfo(dtype)
        edge = [ii.min, ii.max, -1] if dtype.is_signed else [0, min(ii.max, 2**63 - 1)]
        t[: len(edge)] = torch.tensor(edge, dtype=torch.int64).to(dtype)
    return t


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (flat, integer), for bit-exact comparisons (NaN == NaN)."""
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_bits_dtype(t.dtype))


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    assert torch.equal(bits(got), bits(want))


# -- files --------------------------------------------------------------------------------------
def small_tensors() -> dict[str, torch.Tensor | ClusteredTensor]:
    """A small file's worth of every blob kind: clustered chunks with 2-bit and 8-bit labels
    ("clu"), 1-bit labels with padding bits ("odd"), zstd-coded labels ("skew"), lossless
    float planes raw ("emb") and integer planes zstd-coded ("ids"), a scalar, and a tied alias."""
    emb = heavy_tailed((6, 8), torch.bfloat16, seed=1)
    skew = random_clustered((16, 40), 4, chunk_rows=16, dtype=torch.float16, seed=3)
    skew_labels = skew.labels.clone()
    skew_labels[:, 2:] = 0  # mostly zeros: zstd shrinks the label plane
    return {
        "clu": random_clustered((5, 16), [3, 17], chunk_rows=3, dtype=torch.bfloat16, seed=2),
        "odd": random_clustered((3, 5), 2, chunk_rows=2, dtype=torch.float32, seed=4),
        "skew": ClusteredTensor(skew_labels, skew.centroids, 16, dtype=torch.float16),
        "emb": emb,
        "head": emb,
        "ids": torch.arange(-40, 40, dtype=torch.int32).reshape(8, 10),
        "scale": torch.tensor(0.5, dtype=torch.float32),
    }


def write_small(folder: Path, name: str = "small.wclust", tensors: dict | None = None, **kw: Any) -> Path:
    """Write `small_tensors()` (or ``tensors``) into ``folder`` and return the file's path."""
    path = Path(folder) / name
    save_file(small_tensors() if tensors is None else tensors, path, **kw)
    return path


@dataclass
class Parts:
    """A .wclust file taken apart: preamble fields, the data section and the parsed header."""

    major: int
    minor: int
    flags: int
    header_offset: int
    header_length: int
    header_crc: int
    reserved: bytes
    data: bytearray  # bytes [64, header_offset)
    header: dict[str, Any]


def split(path: Path) -> Parts:
    raw = Path(path).read_bytes()
    magic, major, minor, flags, off, length, crc, reserved = PREAMBLE.unpack(raw[:PREAMBLE_SIZE])
    assert magic == MAGIC and off + length == len(raw)
    return Parts(
        major, minor, flags, off, length, crc, reserved, bytearray(raw[PREAMBLE_SIZE:off]), json.loads(raw[off:])
    )


def assemble(
    path: Path,
    data: bytes,
    header: dict[str, Any] | bytes,
    *,
    major: int = VERSION_MAJOR,
    minor: int = VERSION_MINOR,
    flags: int = 0,
    reserved: bytes = bytes(28),
    header_crc: int | None = None,
) -> None:
    """Write a file from a data section and a header, computing offset, length and CRC."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    data = bytes(data) + bytes(-(PREAMBLE_SIZE + len(data)) % ALIGNMENT)
    crc = zlib.crc32(raw) if header_crc is None else header_crc
    pre = PREAMBLE.pack(MAGIC, major, minor, flags, PREAMBLE_SIZE + len(data), len(raw), crc, reserved)
    write_fresh(path, pre + data + raw)


def rewrite(
    path: Path, mutate: Callable[[dict[str, Any]], Any] | None = None, out: Path | None = None, **preamble: Any
) -> Path:
    """Apply ``mutate`` to the header dict (in place, or return a replacement: a dict or raw
    bytes), then rewrite the file with a correct header CRC and preamble. ``preamble`` overrides
    fields of `assemble` (``minor=1``, ``flags=2`` ...). Returns the written path."""
    p = split(path)
    header: Any = p.header
    if mutate is not None:
        res = mutate(header)
        header = header if res is None else res
    target = path if out is None else out
    assemble(target, p.data, header, **preamble)
    return target


def blob(header: dict[str, Any], tensor: str, chunk: int, kind: str) -> dict[str, Any]:
    """The header dict of one blob: ``kind`` is "labels", "centroids" or "plane N"."""
    c = header["tensors"][tensor]["chunks"][chunk]
    if kind.startswith("plane"):
        return c["planes"][int(kind.split()[1])]
    return c[kind]


def blob_bytes(path: Path, tensor: str, chunk: int, kind: str) -> bytes:
    p = split(path)
    b = blob(p.header, tensor, chunk, kind)
    return bytes(p.data[b["offset"] - PREAMBLE_SIZE : b["offset"] - PREAMBLE_SIZE + b["length"]])


def patch_blob(path: Path, tensor: str, chunk: int, kind: str, payload: bytes, *, fix_crc: bool = True) -> None:
    """Overwrite a blob in place with same-length ``payload``; fix its CRC unless told not to."""
    p = split(path)
    b = blob(p.header, tensor, chunk, kind)
    assert len(payload) == b["length"], (len(payload), b["length"])
    start = b["offset"] - PREAMBLE_SIZE
    p.data[start : start + len(payload)] = payload
    if fix_crc:
        b["crc32"] = zlib.crc32(payload)
    assemble(path, p.data, p.header, major=p.major, minor=p.minor)


def replace_blob(path: Path, tensor: str, chunk: int, kind: str, payload: bytes, encoding: str) -> None:
    """Append ``payload`` as the new content of a blob (any length) with a correct CRC."""
    p = split(path)
    b = blob(p.header, tensor, chunk, kind)
    data = bytes(p.data) + bytes(-(PREAMBLE_SIZE + len(p.data)) % ALIGNMENT)
    b.update(offset=PREAMBLE_SIZE + len(data), length=len(payload), encoding=encoding, crc32=zlib.crc32(payload))
    assemble(path, data + payload, p.header, major=p.major, minor=p.minor)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= mask
    write_fresh(path, bytes(raw))


def write_fresh(path: Path, data: bytes) -> None:
    """Replace a file's bytes. Unlinking first is 5-10x faster than truncating on ext4, whose
    auto_da_alloc flushes a file that is truncated and rewritten; the sweeps do this 1000s of times."""
    Path(path).unlink(missing_ok=True)
    Path(path).write_bytes(data)


def write_tiny_llama(folder: Path, *, hidden: int = 16, intermediate: int = 32, tie: bool = False,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Save a random 2-layer Llama causal LM with a 15-word tokenizer into ``folder`` (needs
    transformers); deterministic (seed 0)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]"] + "the king is dead long live queen and to be or not that question".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=max(2, hidden // 16), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def load_script(relpath: str, name: str) -> Any:
    """A file of the repository that is not part of the package (the reference decoder beside the
    spec, a script in tools/), loaded once as module ``name``."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / relpath)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def reference_decoder() -> Any:
    """The reference decoder, `spec/reference/wclust_ref.py`, as module ``wclust_ref``."""
    return load_script("spec/reference/wclust_ref.py", "wclust_ref")
