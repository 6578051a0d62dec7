"""In-place centroid rewrite (wcfmt/edit.py, spec §9.3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt.edit import rewrite_centroids
from wcfmt.reader import WclustReader


def _file(tmp_path: Path) -> tuple[Path, wcfmt.ClusteredTensor]:
    g = torch.Generator().manual_seed(0)
    ct = wcfmt.ClusteredTensor(
        labels=torch.randint(0, 4, (10, 6), dtype=torch.uint8, generator=g),
        centroids=[torch.tensor([-1, 0, 1, 2.0], dtype=torch.float16), torch.tensor([-3, -1, 0, 5.0], dtype=torch.float16)],
        chunk_rows=5,
        dtype=torch.bfloat16,
    )
    p = tmp_path / "m.wclust"
    wcfmt.save_file({"w": ct, "tied": torch.ones(3), "tied2": torch.ones(3)}, p)
    return p, ct


def test_rewrite_changes_tables_keeps_labels(tmp_path: Path) -> None:
    p, ct = _file(tmp_path)
    with WclustReader(p) as r:
        labels_before = [r.read_labels("w", i).tobytes() for i in range(2)]
    new = [torch.tensor([-2, 0, 1, 3.0], dtype=torch.float16), torch.tensor([-1, -0.5, 1, 2.0], dtype=torch.float16)]
    rewrite_centroids(p, {"w": new})
    want = wcfmt.ClusteredTensor(labels=ct.labels, centroids=new, chunk_rows=5, dtype=torch.bfloat16).decode()
    out = wcfmt.load_file(p)
    assert torch.equal(out["w"], want)
    assert torch.equal(out["tied"], torch.ones(3))
    with WclustReader(p) as r:
        r.verify()
        assert [r.read_labels("w", i).tobytes() for i in range(2)] == labels_before


@pytest.mark.parametrize(
    "tables, match",
    [
        ([[2.0, 1.0, 3.0, 4.0], [-3, -1, 0, 5.0]], "ascending"),
        ([[1.0, 2.0, 3.0], [-3, -1, 0, 5.0]], "K=4"),
        ([[1.0, 2.0, 3.0, 4.0]], "chunks"),
        ([[1.0, 2.0, 3.0, 1e6], [-3, -1, 0, 5.0]], "ascending|fp16"),
        ([[1.0, 2.0, 3.0, 4.0001], [-3, -1, 0, 5.0]], "fp16"),
    ],
)
def test_rewrite_rejects_bad_tables_without_writing(tmp_path: Path, tables: list, match: str) -> None:
    p, _ = _file(tmp_path)
    before = p.read_bytes()
    with pytest.raises(wcfmt.UsageError, match=match):
        rewrite_centroids(p, {"w": [torch.tensor(t, dtype=torch.float32) for t in tables]})
    assert p.read_bytes() == before


def test_rewrite_refuses_lossless_tensor(tmp_path: Path) -> None:
    p, _ = _file(tmp_path)
    with pytest.raises(wcfmt.UsageError, match="lossless"):
        rewrite_centroids(p, {"tied": [torch.zeros(1)]})
