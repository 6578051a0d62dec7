"""`ClusteredTensor`: a weight held as per-row-chunk labels plus fp16 centroid tables (spec §5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .constants import MAX_K
from .dtypes import CLUSTERABLE, from_numpy, name_of, to_numpy
from .errors import UsageError
from .schema import chunk_row_ranges, rows_and_row_size

__all__ = ["ClusteredTensor"]


@dataclass(frozen=True, eq=False)
class ClusteredTensor:
    """A clustered weight: ``W[i, j] = centroids[c][labels[i, j]]`` where ``c`` is row ``i``'s chunk.

    - ``labels``: uint8 tensor of the weight's shape; a label is the rank of its centroid
      within its row chunk.
    - ``centroids``: one strictly ascending, finite fp16 table per row chunk (K may differ).
    - ``chunk_rows``: rows per chunk (the last chunk may be shorter); rows are dimension 0.
    - ``dtype`` / ``shape``: the original weight's; ``decode()`` rebuilds in that dtype.

    >>> ct = ClusteredTensor(
    ...     labels=torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8),
    ...     centroids=[torch.tensor([-0.5, 0.25], dtype=torch.float16)],
    ...     chunk_rows=2, dtype=torch.bfloat16)
    >>> ct.decode()
    tensor([[-0.5000,  0.2500],
            [ 0.2500,  0.2500]], dtype=torch.bfloat16)
    """

    labels: torch.Tensor
    centroids: list[torch.Tensor]
    chunk_rows: int
    dtype: torch.dtype = torch.bfloat16
    shape: torch.Size = field(default=None)  # type: ignore[assignment]
    #: Optional quality figures (relative error, SQNR, entropy) carried into the header.
    quality: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.shape is None:
            object.__setattr__(self, "shape", torch.Size(self.labels.shape))
        else:
            object.__setattr__(self, "shape", torch.Size(self.shape))
        object.__setattr__(self, "centroids", list(self.centroids))
        self.validate()

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `UsageError` unless labels, tables and chunking agree (spec §5.2, §5.4)."""
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UsageError(f"ClusteredTensor dtype must be one of {sorted(CLUSTERABLE)}, got {self.dtype}")
        if self.labels.dtype != torch.uint8:
            raise UsageError(f"labels must be uint8, got {self.labels.dtype}")
        if tuple(self.labels.shape) != tuple(self.shape):
            raise UsageError(f"labels shape {tuple(self.labels.shape)} != shape {tuple(self.shape)}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise UsageError(f"chunk_rows must be a positive int, got {self.chunk_rows!r}")
        ranges = self.row_ranges()
        if len(self.centroids) != len(ranges):
            raise UsageError(f"{len(self.centroids)} centroid tables, but {len(ranges)} row chunks")
        # numpy, not torch: torch's max spins up its thread pool per call (~8 ms per chunk on 2 busy
        # cores against ~0.1 ms; tools/NOTES-bench.md). CPU uint8 labels are a zero-copy view.
        flat = None
        if self.labels.numel():
            lab = self.labels if self.labels.device.type == "cpu" else self.labels.cpu()
            flat = lab.reshape(len(lab) if lab.dim() else 1, -1).numpy()
        for i, (table, (a, b)) in enumerate(zip(self.centroids, ranges)):
            if table.dtype != torch.float16 or table.dim() != 1:
                raise UsageError(f"chunk {i}: centroids must be a 1-D float16 tensor")
            k = table.numel()
            if not 1 <= k <= MAX_K:
                raise UsageError(f"chunk {i}: K={k} is outside 1..{MAX_K}")
            t = table.float()
            if not torch.isfinite(t).all() or (k > 1 and not (t[1:] > t[:-1]).all()):
                raise UsageError(f"chunk {i}: centroids must be finite and strictly ascending")
            if flat is not None and int(flat[a:b].max()) >= k:
                raise UsageError(f"chunk {i}: a label is >= K={k}")

    def row_ranges(self) -> list[tuple[int, int]]:
        """Return each chunk's [start, stop) rows."""
        rows, row_size = rows_and_row_size(tuple(self.shape))
        return [] if rows * row_size == 0 else chunk_row_ranges(rows, self.chunk_rows)

    # -- views ----------------------------------------------------------------------------
    @property
    def ks(self) -> list[int]:
        """K of every chunk."""
        return [int(t.numel()) for t in self.centroids]

    def rechunk(self, chunk_rows: int) -> "ClusteredTensor":
        """Return the same tensor stored in smaller row chunks, each with its codebook's table.

        A codebook fitted to many rows (a whole matrix) can be stored in small chunks, which
        repeat its K-entry table (2K bytes each) so that chunks still decode independently, in
        parallel and by row range. New chunks must nest in the old ones.

        >>> ct = ClusteredTensor(labels=torch.zeros(5, 2, dtype=torch.uint8),
        ...     centroids=[torch.tensor([1.0], dtype=torch.float16)], chunk_rows=5, dtype=torch.float16)
        >>> r = ct.rechunk(2); r.chunk_rows, len(r.centroids), torch.equal(r.decode(), ct.decode())
        (2, 3, True)
        """
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise UsageError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        old = self.row_ranges()
        if chunk_rows == self.chunk_rows or not old:
            return self
        if len(old) > 1 and self.chunk_rows % chunk_rows:
            raise UsageError(f"chunks of {chunk_rows} rows do not nest in chunks of {self.chunk_rows}")
        rows, _ = rows_and_row_size(tuple(self.shape))
        tables = [self.centroids[a // self.chunk_rows] for a, _ in chunk_row_ranges(rows, chunk_rows)]
        return ClusteredTensor(
            labels=self.labels, centroids=tables, chunk_rows=chunk_rows, dtype=self.dtype, shape=self.shape,
            quality=self.quality,
        )

    def chunk_values(self, i: int) -> np.ndarray:
        """Row chunk ``i`` rebuilt (spec §5.5), flat, in the storage form of the tensor's dtype
        (numpy; BF16 as uint16): one chunk's memory, not the matrix's."""
        from .rebuild.reference import centroids_as

        (a, b), row_size = self.row_ranges()[i], rows_and_row_size(tuple(self.shape))[1]
        labels = to_numpy(self.labels).reshape(-1)[a * row_size : b * row_size]
        return np.take(centroids_as(to_numpy(self.centroids[i]), name_of(self.dtype)), labels)

    def decode(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Rebuild the dense weight in its original dtype (bit-exact, spec §5.5), then cast/move."""
        name = name_of(self.dtype)
        rows, row_size = rows_and_row_size(tuple(self.shape))
        out = np.empty(rows * row_size, dtype=to_numpy(torch.empty(0, dtype=self.dtype)).dtype)
        for i, (a, b) in enumerate(self.row_ranges()):
            out[a * row_size : b * row_size] = self.chunk_values(i)
        dense = from_numpy(out, name).reshape(self.shape)
        if dtype is not None and dtype != self.dtype:
            dense = dense.to(dtype)
        if device is not None:
            dense = dense.to(device)
        return dense

    def __repr__(self) -> str:
        ks = sorted(set(self.ks))
        kdesc = str(ks[0]) if len(ks) == 1 else f"{ks[0]}..{ks[-1]}"
        return (
            f"ClusteredTensor(shape={tuple(self.shape)}, dtype={self.dtype}, K={kdesc}, "
            f"chunk_rows={self.chunk_rows}, chunks={len(self.centroids)})"
        )
