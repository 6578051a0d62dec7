"""The entropy stage (spec §7): zstd frames, the raw fallback, size checks, CRC-32."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import zstandard

from wcfmt.codecs.entropy import compress, crc32, declared_size, decompress


def _labels(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 4, n, dtype=np.uint8).tobytes()


def test_compressible_data_becomes_a_zstd_frame() -> None:
    raw = _labels()
    stored, enc = compress(raw)
    assert enc == "zstd" and len(stored) < len(raw)
    assert zstandard.frame_content_size(stored) == len(raw)  # the frame declares its size
    assert bytes(decompress(stored, enc, len(raw))) == raw


def test_incompressible_data_stays_raw() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    assert compress(raw) == (raw, "raw")
    assert bytes(decompress(raw, "raw", len(raw))) == raw


def test_empty_is_raw() -> None:
    assert compress(b"") == (b"", "raw")
    assert bytes(decompress(b"", "raw", 0)) == b""


def test_memoryview_input() -> None:
    raw = _labels()
    assert compress(memoryview(raw)) == compress(raw)


@pytest.mark.parametrize("level", [None, 1, 3, 19, -5])
def test_levels_round_trip_and_are_deterministic(level: int | None) -> None:
    raw = _labels(20000, seed=3)
    a = compress(raw, level)
    assert a == compress(raw, level)
    assert bytes(decompress(*a, len(raw))) == raw


def test_frames_carry_no_checksum_or_dict_id() -> None:
    stored, _ = compress(_labels())
    params = zstandard.get_frame_parameters(stored)
    assert not params.has_checksum and params.dict_id == 0


def test_raw_size_mismatch() -> None:
    with pytest.raises(ValueError, match="expected 5"):
        decompress(b"abcd", "raw", 5)


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="encoding"):
        decompress(b"abcd", "brotli", 4)


def test_declared_size_checked_before_decompressing() -> None:
    raw = _labels()
    stored, _ = compress(raw)
    for wrong in (len(raw) - 1, len(raw) + 1, 0):
        with pytest.raises(ValueError, match="declares"):
            decompress(stored, "zstd", wrong)


def test_frame_without_content_size_rejected() -> None:
    raw = _labels()
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(ValueError, match="declares"):
        decompress(stored, "zstd", len(raw))


def test_trailing_bytes_rejected() -> None:
    raw = _labels()
    stored, _ = compress(raw)
    with pytest.raises(ValueError, match="trailing"):
        decompress(stored + b"\x00", "zstd", len(raw))
    with pytest.raises(ValueError, match="trailing"):
        decompress(stored + stored, "zstd", len(raw))


def test_truncated_frame_rejected() -> None:
    raw = _labels()
    stored, _ = compress(raw)
    for cut in (len(stored) - 1, len(stored) // 2, 8):
        with pytest.raises(ValueError):
            decompress(stored[:cut], "zstd", len(raw))


def test_frame_lying_about_its_size_rejected() -> None:
    """A frame whose header declares the expected size but whose blocks hold less."""
    raw = _labels()
    short = zstandard.ZstdCompressor(write_content_size=False).compress(raw[:-10])
    # Splice the declared size of a frame of `raw` onto the blocks of the shorter frame.
    full, _ = compress(raw)
    hdr_len = zstandard.frame_header_size(full)
    lying = full[:hdr_len] + short[zstandard.frame_header_size(short) :]
    assert zstandard.frame_content_size(lying) == len(raw)
    with pytest.raises(ValueError):
        decompress(lying, "zstd", len(raw))


@pytest.mark.parametrize("junk", [b"", b"\x00" * 16, b"not a zstd frame at all"])
def test_not_a_frame(junk: bytes) -> None:
    with pytest.raises(ValueError):
        decompress(junk, "zstd", 16)


def test_crc32_is_zlib_crc32() -> None:
    assert crc32(b"123456789") == 0xCBF43926  # the CRC-32/ISO-HDLC check value
    data = _labels()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)) == crc32(data)
    assert crc32(b"") == 0


def test_declared_size_reads_the_frame_header_only() -> None:
    raw = _labels()
    stored, enc = compress(raw)
    assert declared_size(stored, enc) == len(raw)
    assert declared_size(stored[:18], enc) == len(raw)  # a frame header is at most 18 bytes
    assert declared_size(b"abc", "raw") == 3
    assert declared_size(zstandard.ZstdCompressor(write_content_size=False).compress(raw), "zstd") is None
    assert declared_size(b"junk", "zstd") is None
    assert declared_size(stored[:2], "zstd") is None


def test_a_frame_saving_less_than_min_saving_is_stored_raw() -> None:
    from wcfmt.codecs.entropy import MIN_SAVING

    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, 1 << 19, dtype=np.uint8).tobytes()
    # a compressible head of ~0.8% of the data: zstd saves a little, less than MIN_SAVING
    slight = bytes(4096) + noise
    frame = zstandard.ZstdCompressor().compress(slight)
    assert len(frame) < len(slight) and len(frame) > len(slight) * (1 - MIN_SAVING)
    assert compress(slight) == (slight, "raw")
    # a compressible head of ~10%: a frame
    stored, enc = compress(bytes(40000) + noise)
    assert enc == "zstd" and len(stored) < (40000 + len(noise)) * (1 - MIN_SAVING)


def test_float_planes_kind_codes_literals_without_matches() -> None:
    # an exponent-like plane: few distinct bytes, repeats that the fast strategy would match
    rng = np.random.default_rng(0)
    plane = (120 + rng.geometric(0.45, 1 << 18).clip(0, 12)).astype(np.uint8).tobytes()
    lit, enc1 = compress(plane, kind="float_planes")
    byt, enc2 = compress(plane, kind="bytes")
    assert enc1 == enc2 == "zstd"
    assert len(lit) < len(byt)  # matches cost more than the literals they replace
    assert decompress(lit, "zstd", len(plane)) == plane
    with pytest.raises(ValueError, match="kind"):
        compress(plane, kind="nope")
