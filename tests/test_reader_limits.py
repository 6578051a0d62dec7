"""Boundary cases of the limits wcfmt's reader enforces (spec §3.2 header length, §7.1 zstd
window and dictionary), each from the numbers in the spec's text (mutation audit 0.2: RD2, RD3,
RD5). The vectors hold one window (2^28) and one dictionary flag (1); these hold the edges."""

from __future__ import annotations

import struct

import pytest
import zstandard

from zstd_frames import MIB, frame, window_bytes
from wcfmt.constants import MAGIC, VERSION_MAJOR
from wcfmt.errors import FormatError
from wcfmt.reader import _zstd_frame_rules, read_preamble

#: spec §3.2: "whose header_length exceeds 104,857,600 (100 MiB ...)" is rejected.
SPEC_HEADER_CAP = 104_857_600


def _preamble(h_len: int) -> bytes:
    return struct.pack("<8sHHIQQI28s", MAGIC, VERSION_MAJOR, 0, 0, 64, h_len, 0, bytes(28))


def test_header_length_at_the_cap_is_accepted_one_more_is_not() -> None:
    assert read_preamble(_preamble(SPEC_HEADER_CAP), 64 + SPEC_HEADER_CAP, "f")[3] == SPEC_HEADER_CAP
    with pytest.raises(FormatError, match="exceeds"):
        read_preamble(_preamble(SPEC_HEADER_CAP + 1), 64 + SPEC_HEADER_CAP + 1, "f")


@pytest.mark.parametrize("descriptor", [0x00, 0x50, 0x87, 0x88])
def test_windows_up_to_128_mib_are_accepted(descriptor: int) -> None:
    assert window_bytes(descriptor) <= 128 * MIB
    f = frame(window=descriptor)
    _zstd_frame_rules(f)
    assert zstandard.ZstdDecompressor().decompress(f) == b"wclust" * 50  # a valid frame otherwise


@pytest.mark.parametrize("descriptor", [0x89, 0x8F, 0x90, 0xF8])
def test_windows_over_128_mib_are_rejected(descriptor: int) -> None:
    """0x89 is 144 MiB and 0x8F 240 MiB: the same exponent as 128 MiB, so the mantissa counts."""
    assert window_bytes(descriptor) > 128 * MIB
    with pytest.raises(ValueError, match="window"):
        _zstd_frame_rules(frame(window=descriptor))


@pytest.mark.parametrize("flag", [1, 2, 3])
def test_every_dictionary_flag_is_rejected(flag: int) -> None:
    with pytest.raises(ValueError, match="dictionar"):
        _zstd_frame_rules(frame(dict_flag=flag))
    _zstd_frame_rules(frame(dict_flag=0))


def test_auto_cap_is_64_times_the_file_at_least_256_mib() -> None:
    """spec §9.1: "by default at 64 times its size, at least 256 MiB"."""
    from wcfmt.reader import auto_max_bytes

    assert auto_max_bytes(0) == 256 * MIB
    assert auto_max_bytes(4 * MIB) == 256 * MIB  # 64 × 4 MiB is exactly the floor
    assert auto_max_bytes(4 * MIB + 1) == 256 * MIB + 64
    assert auto_max_bytes(1 << 30) == 64 << 30


def test_a_safetensors_file_is_named_as_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A safetensors file given to the reader: "not a .wclust file", with the hint to pack it.
    The hint needs what a safetensors file starts with: an 8-byte little-endian length from 2 to
    under 100 MiB, then "{" (and more than 9 bytes); anything else gets no hint."""
    import torch
    from safetensors.torch import save_file

    from wcfmt.reader import WclustReader, _looks_like_safetensors

    p = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(FormatError, match="not a .wclust file.*looks like a safetensors file"):
        WclustReader(p)
    text = tmp_path / "t.wclust"
    text.write_bytes(b"hello, this is text")
    with pytest.raises(FormatError, match="not a .wclust file") as e:
        WclustReader(text)
    assert "looks like" not in str(e.value)

    def head(n: int, brace: bytes = b"{", tail: bytes = b'"a":1}') -> bytes:
        return n.to_bytes(8, "little") + brace + tail

    assert _looks_like_safetensors(head(2)) and _looks_like_safetensors(head(100 * MIB - 1))
    assert not _looks_like_safetensors(head(1)) and not _looks_like_safetensors(head(100 * MIB))
    assert not _looks_like_safetensors(head(50, b"[")) and not _looks_like_safetensors(head(50, tail=b""))
    assert _looks_like_safetensors(head(50, tail=b"}"))  # 10 bytes: enough


# -- sizes and caps of decoding (mutants of tools/mutation.py on reader.py) ------------------------
def _small_file(tmp_path):  # type: ignore[no-untyped-def]
    """a: F32 3×5 (60 bytes), b: BF16 4×5 (40 bytes), c: an alias of a, s: an F32 scalar (4 bytes)."""
    import torch

    import wcfmt

    a = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    p = tmp_path / "m.wclust"
    wcfmt.save_file({"a": a, "b": torch.ones(4, 5, dtype=torch.bfloat16), "c": a, "s": torch.tensor(2.5)}, p)
    return p, a


def test_nbytes_and_the_whole_file_budget_count_stored_tensors_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from wcfmt.errors import UsageError
    from wcfmt.reader import WclustReader

    p, _ = _small_file(tmp_path)
    with WclustReader(p) as r:
        assert [r.nbytes(n) for n in "abcs"] == [60, 40, 60, 4]
    with WclustReader(p, max_bytes=104) as r:  # a + b + s; the alias c is the same bytes as a
        r.check_file_budget()
    with WclustReader(p, max_bytes=103) as r, pytest.raises(UsageError, match=f"{p}: decoding needs 104 bytes"):
        r.check_file_budget()


def test_decode_rows_shapes_and_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from wcfmt.errors import UsageError
    from wcfmt.reader import WclustReader

    p, a = _small_file(tmp_path)
    with WclustReader(p, max_bytes=60) as r:
        rows = r.decode_rows("a", 1, 3)  # its one chunk, 60 bytes, at the cap
        assert rows.shape == (2, 5) and np.array_equal(rows, a.numpy()[1:3])
        assert r.decode_rows("a", 2, 2).shape == (0, 5)
        assert r.decode("s").shape == () and float(r.decode("s")) == 2.5
        assert r.decode_rows("s", 0, 1).shape == ()
    with WclustReader(p, max_bytes=59) as r:  # refused by decode_rows itself, before any chunk
        with pytest.raises(UsageError, match=f"{p}: tensor 'a': decoding needs 60 bytes"):
            r.decode_rows("a", 0, 3)
    with WclustReader(p, max_bytes=0) as r:  # an empty range needs nothing
        assert r.decode_rows("a", 2, 2).shape == (0, 5)


def test_decode_rows_of_every_range_match_the_tensor_in_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A clustered tensor of 10 rows in chunks of 4 (0-4, 4-8, 8-10): every row range, in and
    beyond the tensor, decodes to the rows of the in-memory ClusteredTensor (its own decode, not
    the reader's); the packed label plane of each chunk, at K = 256 one byte per label, is the
    labels of its rows."""
    import numpy as np
    import torch

    import wcfmt
    from wcfmt.cluster import cluster_tensor
    from wcfmt.reader import WclustReader

    t = torch.from_numpy(np.random.default_rng(0).standard_normal((10, 80)).astype(np.float32))
    ct = cluster_tensor(t, k=256, chunk_rows=4)
    assert len(ct.centroids) == 3 and min(ct.ks) > 128
    want = ct.decode().numpy()
    p = tmp_path / "c.wclust"
    wcfmt.save_file({"w": ct}, p)
    with WclustReader(p) as r:
        for start in range(-1, 12):
            for stop in range(-1, 13):
                got = r.decode_rows("w", start, stop)
                lo, hi = max(0, start), min(10, stop)
                assert got.shape == (max(0, hi - lo), 80), (start, stop)
                assert np.array_equal(got.view(np.float32), want[lo:hi]) if hi > lo else got.size == 0, (start, stop)
        labels = ct.labels.numpy()
        for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
            assert np.array_equal(r.read_labels("w", i), labels[a:b].reshape(-1))


@pytest.mark.parametrize("magic", [0x184D2A50, 0x184D2A51, 0x184D2A5F])
def test_every_skippable_frame_magic_is_rejected(magic: int) -> None:
    """RFC 8878 §3.1.2: skippable frames have magic 0x184D2A5?; spec §7.1 wants exactly one zstd frame."""
    with pytest.raises(ValueError, match="skippable"):
        _zstd_frame_rules(magic.to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd")


def test_a_five_byte_frame_header_is_checked() -> None:
    """Magic and frame header descriptor are enough to see a dictionary flag or the reserved bit."""
    with pytest.raises(ValueError, match="dictionar"):
        _zstd_frame_rules(frame(dict_flag=1)[:5])
    with pytest.raises(ValueError, match="reserved"):
        _zstd_frame_rules((0xFD2FB528).to_bytes(4, "little") + bytes([0x08]))


def test_label_and_table_reads_of_a_lossless_tensor_name_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from wcfmt.errors import UsageError
    from wcfmt.reader import WclustReader

    p, _ = _small_file(tmp_path)
    with WclustReader(p) as r:
        for read in (r.read_centroids, r.read_labels):
            with pytest.raises(UsageError, match="tensor 'a': tensor is stored lossless, not clustered"):
                read("a", 0)


def test_decode_chunk_cap_and_chunk_indices(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each chunk is checked against the cap by its own size (4 rows × 80 F32 = 1280 bytes, the
    last 2 rows 640); chunk indices past the end are a FormatError naming the chunk."""
    import numpy as np
    import torch

    import wcfmt
    from wcfmt.cluster import cluster_tensor
    from wcfmt.errors import UsageError
    from wcfmt.reader import WclustReader

    t = torch.from_numpy(np.random.default_rng(1).standard_normal((10, 80)).astype(np.float32))
    p = tmp_path / "c.wclust"
    wcfmt.save_file({"w": cluster_tensor(t, k=16, chunk_rows=4)}, p)
    with WclustReader(p, max_bytes=640) as r:
        assert r.decode_chunk("w", 2).size == 160
        for i in (0, 1):
            with pytest.raises(UsageError, match=f"{p}: tensor 'w': chunk {i}: decoding needs 1280 bytes"):
                r.decode_chunk("w", i)
    with WclustReader(p) as r:
        r.check_sizes("w", [0, 1, 2])
        with pytest.raises(FormatError, match="chunk 3 does not exist"):
            r.check_sizes("w", [3])
        with pytest.raises((FormatError, UsageError)):
            r.decode_chunk("w", 3)


def test_preamble_sizes_and_what_the_error_says() -> None:
    """A header of length 0 right after the preamble is a 64-byte file; under 64 bytes is
    truncated; a header past the end is "truncated", one that ends early "followed by trailing bytes"."""
    assert read_preamble(_preamble(0), 64, "f")[2:4] == (64, 0)
    with pytest.raises(FormatError, match="truncated"):
        read_preamble(_preamble(0), 63, "f")
    with pytest.raises(FormatError, match=r"f: file is truncated \(header ends at 164, file size is 163\)"):
        read_preamble(_preamble(100), 163, "f")
    with pytest.raises(FormatError, match=r"f: file is followed by trailing bytes \(header ends at 164, file size is 165\)"):
        read_preamble(_preamble(100), 165, "f")
    with pytest.raises(FormatError) as e:
        read_preamble(b"PK\x03\x04" + bytes(60), 64, "f")
    assert str(e.value).endswith("expected b'\\x89WCLUST\\n')")  # no hint for a file that is not safetensors


def test_max_bytes_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """None, 0 or any non-negative int, or "auto" (64x the file, at least 256 MiB); anything
    else (negative, bool, float, another string) is a UsageError. use_mmap=False reads without a map."""
    from wcfmt.errors import UsageError
    from wcfmt.reader import WclustReader, auto_max_bytes

    p, _ = _small_file(tmp_path)
    for value, want in ((None, None), (0, 0), (7, 7), ("auto", auto_max_bytes(p.stat().st_size))):
        with WclustReader(p, max_bytes=value) as r:
            assert r.max_bytes == want
    assert auto_max_bytes(p.stat().st_size) == 256 * MIB
    for bad in (-1, True, 1.5, "AUTO", "64x"):
        with pytest.raises(UsageError, match="max_bytes must be"):
            WclustReader(p, max_bytes=bad)
    with WclustReader(p) as r:
        assert r._map is not None
    with WclustReader(p, use_mmap=False) as r:
        assert r._map is None and r.decode("a").shape == (3, 5)
