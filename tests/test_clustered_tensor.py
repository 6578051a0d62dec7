"""`ClusteredTensor` (spec §5): validation, decode (bit-exact rebuild), views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import CLUSTER_DTYPES, assert_bit_equal, random_clustered
from wcfmt import ClusteredTensor, UsageError


def _reference_decode(ct: ClusteredTensor) -> torch.Tensor:
    """W[i, j] = centroids[chunk of row i][labels[i, j]], rounded fp16 -> dtype by torch."""
    shape = tuple(ct.shape)
    rows = shape[0] if shape else 1
    labels = ct.labels.reshape(rows, -1).long()
    out = torch.empty(labels.shape, dtype=ct.dtype)
    for c, table in enumerate(ct.centroids):
        a, b = c * ct.chunk_rows, min((c + 1) * ct.chunk_rows, rows)
        out[a:b] = table.to(torch.float32).to(ct.dtype)[labels[a:b]]
    return out.reshape(shape)


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
@pytest.mark.parametrize(
    ("shape", "k", "chunk_rows"),
    [((6, 5), 4, 2), ((7, 3), [3, 17, 256], 3), ((5,), 2, 5), ((2, 3, 4), 16, 1), ((), 1, 1), ((9, 1), 256, 4)],
)
def test_decode_matches_reference(dtype: torch.dtype, shape: tuple[int, ...], k: int | list[int], chunk_rows: int) -> None:
    ct = random_clustered(shape, k, chunk_rows, dtype=dtype, seed=7)
    got = ct.decode()
    assert_bit_equal(got, _reference_decode(ct))


def test_docstring_example_and_bf16_rounding() -> None:
    # fp16 0.1 is 0x2E66 = f32 0x3DCCC000; the dropped half 0xC000 > 0x8000 rounds up to bf16 0x3DCD.
    ct = ClusteredTensor(
        labels=torch.tensor([[0, 1]], dtype=torch.uint8),
        centroids=[torch.tensor([-1.0, 0.1], dtype=torch.float16)],
        chunk_rows=1,
        dtype=torch.bfloat16,
    )
    assert ct.decode().view(torch.int16).tolist() == [[-16512, 0x3DCD]]  # -1.0 = 0xBF80
    # Ties go to even: fp16 0x3C04 = f32 0x3F808000 -> 0x3F80; 0x3C0C = f32 0x3F818000 -> 0x3F82.
    ties = ClusteredTensor(
        labels=torch.tensor([0, 1], dtype=torch.uint8),
        centroids=[torch.tensor([0x3C04, 0x3C0C], dtype=torch.int16).view(torch.float16)],
        chunk_rows=2,
    )
    assert ties.decode().view(torch.int16).tolist() == [0x3F80, 0x3F82]
    assert ct.decode(dtype=torch.float32).dtype == torch.float32
    assert ct.decode(device="cpu").device.type == "cpu"


def test_empty_tensor_has_no_tables() -> None:
    ct = ClusteredTensor(labels=torch.zeros(0, 4, dtype=torch.uint8), centroids=[], chunk_rows=3)
    assert ct.row_ranges() == [] and ct.decode().shape == (0, 4)
    ct = ClusteredTensor(labels=torch.zeros(3, 0, dtype=torch.uint8), centroids=[], chunk_rows=3)
    assert ct.decode().shape == (3, 0)


def test_views() -> None:
    ct = random_clustered((7, 4), [3, 17, 256], 3)
    assert ct.ks == [3, 17, 256]
    assert ct.row_ranges() == [(0, 3), (3, 6), (6, 7)]
    assert ct.shape == torch.Size([7, 4])
    r = repr(ct)
    assert "K=3..256" in r and "chunks=3" in r and "(7, 4)" in r
    assert "K=4," in repr(random_clustered((4, 4), 4, 2))


def _ok(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "labels": torch.tensor([[0, 1], [1, 0], [2, 2]], dtype=torch.uint8),
        "centroids": [torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float16)] * 2,
        "chunk_rows": 2,
    }
    base.update(kw)
    return base


def test_valid_base() -> None:
    ClusteredTensor(**_ok())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dtype": torch.float64}, "dtype"),
        ({"dtype": torch.int8}, "dtype"),
        ({"labels": torch.zeros(3, 2, dtype=torch.int64)}, "uint8"),
        ({"shape": (2, 3)}, "shape"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 2.0}, "chunk_rows"),
        ({"centroids": [torch.tensor([0.0], dtype=torch.float16)]}, "2 row chunks"),
        ({"centroids": [torch.tensor([-1.0, 0.0, 1.0])] * 2}, "float16"),
        ({"centroids": [torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float16)] * 2}, "1-D"),
        ({"centroids": [torch.zeros(0, dtype=torch.float16)] * 2}, "K=0"),
        ({"centroids": [torch.arange(257, dtype=torch.float16)] * 2}, "K=257"),
        ({"centroids": [torch.tensor([-1.0, float("nan"), 1.0], dtype=torch.float16)] * 2}, "finite"),
        ({"centroids": [torch.tensor([-1.0, float("inf"), 1.0], dtype=torch.float16)] * 2}, "finite"),
        ({"centroids": [torch.tensor([1.0, 0.0, -1.0], dtype=torch.float16)] * 2}, "ascending"),
        ({"centroids": [torch.tensor([0.0, 0.0, 1.0], dtype=torch.float16)] * 2}, "ascending"),
        ({"centroids": [torch.tensor([-0.0, 0.0, 1.0], dtype=torch.float16)] * 2}, "ascending"),
        ({"labels": torch.tensor([[0, 1], [1, 0], [3, 2]], dtype=torch.uint8)}, "chunk 1: a label"),
        ({"labels": torch.tensor([[0, 3], [1, 0], [2, 2]], dtype=torch.uint8)}, "chunk 0: a label"),
    ],
)
def test_validation(kw: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ClusteredTensor(**_ok(**kw))  # type: ignore[arg-type]


def test_different_k_per_chunk_checks_each_chunk() -> None:
    labels = torch.tensor([[0, 1], [1, 0], [2, 2]], dtype=torch.uint8)
    two = torch.tensor([0.0, 1.0], dtype=torch.float16)
    three = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float16)
    ClusteredTensor(labels=labels, centroids=[two, three], chunk_rows=2)
    with pytest.raises(UsageError, match="chunk 1"):
        ClusteredTensor(labels=labels, centroids=[three, two], chunk_rows=2)


def test_is_frozen_and_copies_table_list() -> None:
    tables = [torch.tensor([0.0, 1.0], dtype=torch.float16)]
    ct = ClusteredTensor(labels=torch.tensor([0, 1], dtype=torch.uint8), centroids=tables, chunk_rows=4)
    tables.append(tables[0])
    assert len(ct.centroids) == 1
    with pytest.raises(AttributeError):
        ct.chunk_rows = 1  # type: ignore[misc]


def test_non_contiguous_labels() -> None:
    base = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (6, 8), dtype=np.uint8))
    labels = base.t()  # (8, 6), non-contiguous
    tables = [torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float16)] * 3
    ct = ClusteredTensor(labels=labels, centroids=tables, chunk_rows=3, dtype=torch.float16)
    assert_bit_equal(ct.decode(), tables[0][labels.long()])
