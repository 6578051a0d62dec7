"""Label planes (spec §5.3): bit order, padding, and round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import hypothesis_settings
from wcfmt.codecs.bitpack import max_label, pack_labels, packed_size, unpack_labels

BITS = (1, 2, 4, 8)


@pytest.mark.parametrize(
    ("count", "bits", "size"),
    [(0, 1, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 2, 1), (5, 2, 2), (1, 4, 1), (3, 4, 2), (7, 8, 7), (10, 0, 0)],
)
def test_packed_size(count: int, bits: int, size: int) -> None:
    assert packed_size(count, bits) == size


@pytest.mark.parametrize(
    ("labels", "bits", "packed"),
    [
        # least significant bits first: label i at bit (i % per) * bits of byte i // per
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0b00001101, 0b00000001]),
        ([1, 2, 3, 0, 2], 2, [0b00111001, 0b00000010]),
        ([0xA, 0x5, 0xF], 4, [0x5A, 0x0F]),
        ([7, 255, 0], 8, [7, 255, 0]),
    ],
)
def test_bit_layout(labels: list[int], bits: int, packed: list[int]) -> None:
    got = pack_labels(np.array(labels, np.uint8), bits)
    assert got.dtype == np.uint8 and got.tolist() == packed
    assert unpack_labels(got, bits, len(labels)).tolist() == labels


def test_zero_bits_is_empty() -> None:
    assert pack_labels(np.zeros(5, np.uint8), 0).size == 0
    assert unpack_labels(np.zeros(0, np.uint8), 0, 5).tolist() == [0] * 5
    assert max_label(np.zeros(0, np.uint8), 0, 5) == -1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_round_trip(bits: int, count: int) -> None:
    g = np.random.default_rng(count * 10 + bits)
    labels = g.integers(0, 1 << bits, count, dtype=np.uint8)
    packed = pack_labels(labels, bits)
    assert packed.size == packed_size(count, bits)
    assert np.array_equal(unpack_labels(packed, bits, count), labels)
    assert max_label(packed, bits, count) == (int(labels.max()) if count else -1)


@hypothesis_settings(40)
@given(bits=st.sampled_from(BITS), data=st.data())
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    labels = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    arr = np.array(labels, np.uint8)
    packed = pack_labels(arr, bits)
    assert unpack_labels(packed, bits, len(labels)).tolist() == labels
    assert max_label(packed, bits, len(labels)) == max(labels, default=-1)


def test_pack_accepts_non_contiguous_and_2d() -> None:
    lab = np.arange(32, dtype=np.uint8).reshape(4, 8) % 4
    view = lab[:, ::2]
    assert np.array_equal(unpack_labels(pack_labels(view, 2), 2, view.size), view.reshape(-1))


@pytest.mark.parametrize(("bits", "count"), [(1, 9), (1, 15), (2, 5), (2, 7), (4, 3)])
def test_max_label_rejects_set_padding_bits(bits: int, count: int) -> None:
    packed = pack_labels(np.zeros(count, np.uint8), bits)
    per = 8 // bits
    tail = count % per
    packed[-1] |= np.uint8(1 << (tail * bits))  # lowest padding bit
    with pytest.raises(ValueError, match="padding"):
        max_label(packed, bits, count)
    packed[-1] = np.uint8(0x80)  # highest padding bit
    with pytest.raises(ValueError, match="padding"):
        max_label(packed, bits, count)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_max_label_sees_every_slot(bits: int) -> None:
    """The largest label is found whatever its position in a byte."""
    per = 8 // bits
    top = (1 << bits) - 1
    for pos in range(2 * per):
        labels = np.zeros(2 * per, np.uint8)
        labels[pos] = top
        assert max_label(pack_labels(labels, bits), bits, labels.size) == top


def test_full_bytes_have_no_padding() -> None:
    packed = np.array([0xFF, 0xFF], np.uint8)
    assert max_label(packed, 1, 16) == 1
    assert max_label(packed, 4, 4) == 15


@pytest.mark.parametrize("bits", BITS)
def test_plain_integer_labels_and_planes_are_taken_as_bytes(bits: int) -> None:
    """Labels given as Python ints or int64 (what a caller's argmin returns) pack to the same uint8
    plane as uint8 labels, and planes given as a list of ints or int64 unpack the same; the hand
    layout of `test_bit_layout` for four 4-bit labels is 0x21, 0x43."""
    top = (1 << bits) - 1
    labels = [i % (top + 1) for i in range(11)]
    want = pack_labels(np.array(labels, np.uint8), bits)
    for given_labels in (labels, np.array(labels, np.int64)):
        got = pack_labels(given_labels, bits)
        assert got.dtype == np.uint8 and got.tolist() == want.tolist()
    for plane in (want.tolist(), want.astype(np.int64)):
        out = unpack_labels(plane, bits, 11)
        assert out.dtype == np.uint8 and out.tolist() == labels
    assert pack_labels([1, 2, 3, 4], 4).tolist() == [0x21, 0x43]


def test_empty_planes_are_uint8() -> None:
    """Zero-bit labels pack to an empty *byte* plane (a float64 empty array would write nothing but
    break a caller that concatenates planes or views them as bytes)."""
    assert pack_labels(np.zeros(3, np.uint8), 0).dtype == np.uint8
    assert pack_labels([], 0).dtype == np.uint8


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_two_dimensional_planes_are_read_flat(bits: int) -> None:
    """A plane handed over as rows of bytes (a 2-D view of the blob) reads as the flat plane."""
    labels = np.arange(31, dtype=np.uint8) % (1 << bits)  # 31: the last byte has padding
    plane = pack_labels(labels, bits)
    rows = plane.reshape(2, -1)
    assert unpack_labels(rows, bits, 31).tolist() == labels.tolist()
    assert max_label(rows, bits, 31) == int(labels.max())
