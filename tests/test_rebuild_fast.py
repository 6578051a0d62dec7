"""The CPU fast rebuild (`wcfmt.rebuild.fast`) against the canonical numpy reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wcfmt.codecs.bitpack import pack_labels
from wcfmt.constants import label_bits_for_k
from wcfmt.rebuild import fast
from wcfmt.rebuild.fast import rebuild_chunk_fast
from wcfmt.rebuild.reference import centroids_as, rebuild_chunk

DTYPES = ("BF16", "F16", "F32")
KS = (1, 2, 3, 4, 5, 16, 17, 32, 64, 255, 256)


def make_chunk(k: int, count: int, dtype: str, seed: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(packed labels, label bits, table in storage form): every label value appears if count >= k."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, k, count, dtype=np.uint8)
    labels[: min(k, count)] = np.arange(min(k, count), dtype=np.uint8)
    g.shuffle(labels)
    # fp16 values with both signs, +-0, subnormals and extremes: BF16 rounds some of them
    pool = np.concatenate([
        (g.standard_t(3, 4 * k + 8) * 0.05).astype("<f2"),
        np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 1.0 + 2**-10], "<f2"),
    ])
    pool = pool[np.isfinite(pool)]
    table = np.sort(g.choice(np.unique(pool), k, replace=False)).astype("<f2")
    bits = label_bits_for_k(k)
    return pack_labels(labels, bits), bits, centroids_as(table, dtype)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.fixture(params=["byte", "pair"])
def table_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the byte tables only, then with byte-pair tables for any 8-bit chunk."""
    monkeypatch.setattr(fast, "_LABELS_PER_ENTRY", 10**9 if request.param == "byte" else 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_matches_reference(k: int, dtype: str, table_kind: str) -> None:
    for i, count in enumerate((0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 255, 513, 1000, 4099)):
        packed, bits, table = make_chunk(k, count, dtype, seed=k * 100 + i)
        assert_same_bits(rebuild_chunk_fast(packed, bits, count, table), rebuild_chunk(packed, bits, count, table))


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(1, 256),
    count=st.integers(0, 3000),
    dtype=st.sampled_from(DTYPES),
    pair=st.booleans(),
    block=st.sampled_from([1, 3, 64, 1 << 18]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_property(k: int, count: int, dtype: str, pair: bool, block: int, seed: int) -> None:
    packed, bits, table = make_chunk(k, count, dtype, seed)
    want = rebuild_chunk(packed, bits, count, table)
    old = fast._LABELS_PER_ENTRY, fast._BLOCK
    fast._LABELS_PER_ENTRY, fast._BLOCK = (0 if pair else 10**9), block
    try:
        out = np.full(count, 0x7F, table.dtype)
        got = rebuild_chunk_fast(packed, bits, count, table, out=out)
    finally:
        fast._LABELS_PER_ENTRY, fast._BLOCK = old
    assert got is out
    assert_same_bits(got, want)


def test_large_chunk_uses_pair_table_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = fast._byte_pair_table
    monkeypatch.setattr(fast, "_byte_pair_table", lambda t: built.append(t.size) or real(t))
    packed, bits, table = make_chunk(256, 300_000, "BF16", seed=7)  # >= 4 * 256 * 256 labels
    assert_same_bits(rebuild_chunk_fast(packed, bits, 300_000, table), rebuild_chunk(packed, bits, 300_000, table))
    assert built == [256]


def test_writes_into_a_slice_of_a_larger_output() -> None:
    packed, bits, table = make_chunk(32, 1001, "BF16", seed=1)
    big = np.zeros(1001 + 3, table.dtype)
    rebuild_chunk_fast(packed, bits, 1001, table, out=big[1:1002])  # odd offset: unaligned pair writes
    assert_same_bits(big[1:1002], rebuild_chunk(packed, bits, 1001, table))
    assert big[0] == 0 and big[1002] == 0 and big[1003] == 0


@pytest.mark.parametrize(("k", "bad_label"), [(3, 3), (17, 200), (2, 1), (32, 32)])
def test_out_of_range_label_is_rejected(k: int, bad_label: int, table_kind: str) -> None:
    g = np.random.default_rng(0)
    bits = label_bits_for_k(max(k, bad_label + 1))  # packed wide enough to hold the bad label
    labels = g.integers(0, k, 4000, dtype=np.uint8)
    labels[1234] = bad_label
    table = centroids_as(np.sort(g.standard_normal(k)).astype("<f2")[: k - 1 if bad_label < k else k], "BF16")
    if bad_label < k:  # the table is one entry short instead
        assert table.size == k - 1
    with pytest.raises(ValueError, match="out of range"):
        rebuild_chunk_fast(pack_labels(labels, bits), bits, labels.size, table)


def test_padding_bits_are_rejected() -> None:
    packed = pack_labels(np.array([1, 0, 1], np.uint8), 1)
    packed[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        rebuild_chunk_fast(packed, 1, 3, np.array([1, 2], np.uint16))


def test_bad_arguments() -> None:
    table = np.array([1, 2, 3], np.uint16)
    packed = pack_labels(np.array([0, 1, 2, 1], np.uint8), 2)
    with pytest.raises(ValueError, match="label_bits"):
        rebuild_chunk_fast(packed, 3, 4, table)
    with pytest.raises(ValueError, match="fewer than"):
        rebuild_chunk_fast(packed, 2, 5, table)
    for out in (np.empty(4, np.float16), np.empty(5, np.uint16), np.empty(8, np.uint16)[::2]):
        with pytest.raises(ValueError, match="out must be"):
            rebuild_chunk_fast(packed, 2, 4, table, out=out)
