"""The lossless codec (spec §6): byte planes, the float rotation, chunking, bit-exact decode.

File-level round trips of every dtype live in test_api.py; here the codec runs on its own,
with blobs held in a dict instead of a file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import assert_bit_equal, special_values
from wcfmt.codecs import entropy, lossless
from wcfmt.constants import DEFAULT_LOSSLESS_CHUNK_BYTES
from wcfmt.dtypes import DTYPES, FLOAT_PLANES, from_numpy, to_numpy
from wcfmt.schema import Blob

ALL = sorted(DTYPES)


@pytest.mark.parametrize("name", ALL)
def test_planes_round_trip(name: str) -> None:
    t = special_values(DTYPES[name][2], n=257)
    values = to_numpy(t)
    transform = lossless.transform_for(name)
    planes = lossless.to_planes(values, name, transform)
    assert len(planes) == DTYPES[name][0]
    assert all(p.dtype == np.uint8 and p.size == values.size for p in planes)
    back = lossless.from_planes(planes, name, transform)
    assert back.dtype == values.dtype
    assert back.tobytes() == values.tobytes()


def test_transform_choice() -> None:
    for name in ALL:
        assert lossless.transform_for(name) == ("float_planes" if name in FLOAT_PLANES else "byte_planes")


@pytest.mark.parametrize(
    ("value", "planes"),
    [
        # float_planes rotate left by one: the sign becomes the lowest bit, the exponent the top byte.
        (1.0, [0x7F, 0x00, 0x00, 0x00]),  # 0x3F800000 -> 0x7F000000
        (-0.0, [0x00, 0x00, 0x00, 0x01]),  # 0x80000000 -> 0x00000001
        (-2.0, [0x80, 0x00, 0x00, 0x01]),  # 0xC0000000 -> 0x80000001
    ],
)
def test_float_rotation_layout_f32(value: float, planes: list[int]) -> None:
    got = lossless.to_planes(np.array([value], "<f4"), "F32", "float_planes")
    assert [int(p[0]) for p in got] == planes


def test_bf16_top_plane_is_the_exponent() -> None:
    t = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.bfloat16)
    top, low = lossless.to_planes(to_numpy(t), "BF16", "float_planes")
    # bf16 1.0 = 0x3F80: exponent 0x7F; sign moves to bit 0 of the low plane.
    assert top.tolist() == [0x7F, 0x7F, 0x80, 0x7E]
    assert [int(x) & 1 for x in low] == [0, 1, 0, 1]


def test_byte_planes_most_significant_first() -> None:
    planes = lossless.to_planes(np.array([0x01020304], "<i4"), "I32", "byte_planes")
    assert [int(p[0]) for p in planes] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("shape", "dtype", "want"),
    [
        ([4096, 4096], "BF16", DEFAULT_LOSSLESS_CHUNK_BYTES // (4096 * 2)),
        ([10], "F32", DEFAULT_LOSSLESS_CHUNK_BYTES // 4),
        ([], "F64", DEFAULT_LOSSLESS_CHUNK_BYTES // 8),
        ([3, 0], "F32", DEFAULT_LOSSLESS_CHUNK_BYTES),  # empty rows still give a positive count
        ([2, DEFAULT_LOSSLESS_CHUNK_BYTES], "F32", 1),  # a row over the budget: one row per chunk
    ],
)
def test_chunk_rows_for(shape: list[int], dtype: str, want: int) -> None:
    assert lossless.chunk_rows_for(shape, dtype) == want


def _encode_decode(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Run the codec through fake blob storage; return the decoded tensor and chunk sizes."""
    chunk_rows, jobs = lossless.encode_chunks(t)
    store: dict[int, bytes] = {}
    blobs = []
    for job in jobs:
        chunk = []
        for payload, enc in job():
            off = 64 * (len(store) + 1)
            store[off] = payload
            chunk.append(Blob(offset=off, length=len(payload), encoding=enc, crc32=entropy.crc32(payload)))
        blobs.append(chunk)
    entry = lossless.make_entry(t, chunk_rows, blobs)

    def read(blob: Blob, expected: int, what: str) -> bytes | memoryview:
        return entropy.decompress(store[blob.offset], blob.encoding, expected)

    parts = [lossless.decode_chunk(entry, i, read) for i in range(len(entry.chunks))]
    flat = np.concatenate(parts) if parts else np.empty(0, to_numpy(t).dtype)
    return from_numpy(flat, entry.dtype).reshape(t.shape), [p.size for p in parts]


@pytest.mark.parametrize("name", ALL)
def test_codec_round_trip_bit_exact(name: str) -> None:
    t = special_values(DTYPES[name][2], n=300).reshape(3, 100)
    got, sizes = _encode_decode(t)
    assert_bit_equal(got, t)
    assert sizes == [300]


def test_codec_splits_large_tensors_into_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lossless, "DEFAULT_LOSSLESS_CHUNK_BYTES", 64)
    t = torch.arange(70, dtype=torch.float32).reshape(7, 10)  # 40 bytes a row -> 1 row a chunk
    got, sizes = _encode_decode(t)
    assert_bit_equal(got, t)
    assert sizes == [10] * 7
    t = torch.arange(7 * 3, dtype=torch.int16).reshape(7, 3)  # 6 bytes a row -> 10 rows a chunk
    got, sizes = _encode_decode(t)
    assert sizes == [21]


def test_codec_empty_tensor_has_no_chunks() -> None:
    chunk_rows, jobs = lossless.encode_chunks(torch.empty(0, 5))
    assert jobs == [] and chunk_rows >= 1


def test_exponent_plane_compresses() -> None:
    """The point of the rotation: bf16 weights' exponent plane shrinks, the mantissa does not."""
    t = torch.randn(64, 256).mul(0.02).to(torch.bfloat16)
    _, jobs = lossless.encode_chunks(t)
    (top, top_enc), (low, _low_enc) = jobs[0]()
    assert top_enc == "zstd" and len(top) < 0.6 * t.numel()
    assert len(low) > 0.9 * t.numel()


@pytest.mark.parametrize("name", [n for n in ALL if DTYPES[n][0] > 1])
def test_merge_across_blocks_matches_the_spec_formula(name: str) -> None:
    # more than two merge blocks, random bit patterns (NaN payloads, subnormals, both signs):
    # from_planes must give what spec §6.2 says, computed here in uint64 as the reference does
    size = DTYPES[name][0]
    n = 2 * lossless._MERGE_BLOCK + 1237
    raw = np.random.default_rng(size).integers(0, 256, n * size, dtype=np.uint8)
    values = raw.view(DTYPES[name][1])
    transform = lossless.transform_for(name)
    planes = lossless.to_planes(values, name, transform)
    words = np.zeros(n, np.uint64)
    for p, plane in enumerate(planes):
        words |= plane.astype(np.uint64) << np.uint64(8 * (size - 1 - p))
    if transform == "float_planes":
        words = (words >> np.uint64(1)) | ((words & np.uint64(1)) << np.uint64(8 * size - 1))
    want = words.astype("<u8").view(np.uint8).reshape(n, 8)[:, :size].tobytes()
    out = np.full(n, 0xAB, np.uint8).repeat(size).view(DTYPES[name][1])  # stale bytes must go
    got = lossless.from_planes(planes, name, transform, out)
    assert got is out and got.tobytes() == want == raw.tobytes()


def test_float_planes_are_coded_as_literal_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds: list[str] = []
    real = entropy.compress

    def spy(data, level=None, kind="bytes"):  # type: ignore[no-untyped-def]
        kinds.append(kind)
        return real(data, level, kind)

    monkeypatch.setattr(entropy, "compress", spy)
    for t, want in ((torch.randn(64, 64).bfloat16(), "float_planes"), (torch.arange(4096, dtype=torch.int32), "bytes")):
        kinds.clear()
        _, jobs = lossless.encode_chunks(t)
        for job in jobs:
            job()
        assert kinds and set(kinds) == {want}


# -- survivors of `python tools/mutation.py wcfmt/codecs/lossless.py` (tools/NOTES-mutation.md) ----
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 0), (0,), ()])
def test_codec_tiny_and_empty_shapes(shape: tuple[int, ...]) -> None:
    """One element is one chunk; a tensor with a zero dimension (rows but empty rows) has none."""
    t = torch.full(shape, 1.5, dtype=torch.float32)
    got, sizes = _encode_decode(t)
    assert_bit_equal(got, t)
    assert sizes == ([1] if t.numel() else [])


@pytest.mark.parametrize("level", [1, 19])
def test_codec_compresses_at_the_level_asked(level: int) -> None:
    words = np.random.default_rng(0).integers(0, 1 << 20, (32, 8))  # 8-word phrases repeated at random
    t = torch.from_numpy(words[np.random.default_rng(1).integers(0, 32, 512)].astype(np.int32)).reshape(64, 64)
    _, jobs = lossless.encode_chunks(t, level=level)
    got = [payload for payload, _ in jobs[0]()]
    planes = lossless.to_planes(to_numpy(t).reshape(-1), "I32", "byte_planes")
    assert got == [entropy.compress(p.tobytes(), level, "bytes")[0] for p in planes]
    assert got != [entropy.compress(p.tobytes(), None, "bytes")[0] for p in planes]


def test_from_planes_checks_its_out_buffer() -> None:
    planes = lossless.to_planes(np.arange(8, dtype=np.int32), "I32", "byte_planes")
    good = np.empty(8, np.int32)
    assert lossless.from_planes(planes, "I32", "byte_planes", good) is good
    read_only = np.empty(8, np.int32)
    read_only.flags.writeable = False
    for bad in (np.empty(16, np.int32)[::2], read_only, np.empty(8, np.int16), np.empty(9, np.int32)):
        with pytest.raises(ValueError, match="out must be"):
            lossless.from_planes(planes, "I32", "byte_planes", bad)


def test_decode_chunk_names_the_plane_it_reads() -> None:
    t = torch.arange(6, dtype=torch.int16)
    _, jobs = lossless.encode_chunks(t)
    payloads = jobs[0]()
    blobs = [Blob(offset=64 * (i + 1), length=len(p), encoding=e, crc32=entropy.crc32(p)) for i, (p, e) in enumerate(payloads)]
    entry = lossless.make_entry(t, 6, [blobs])
    asked: list[str] = []

    def read(blob: Blob, expected: int, what: str, out: np.ndarray | None = None) -> bytes:
        asked.append(what)
        return payloads[blob.offset // 64 - 1][0]

    lossless.decode_chunk(entry, 0, read)
    lossless.decode_chunk(entry, 0, read, scratch=entropy.Scratch())
    assert asked == ["plane 0", "plane 1"] * 2
