"""The safetensors-style public API: `save_file`, `load_file`, `safe_open` (torch at the edge)."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import numpy as np
import torch

from .clustered_tensor import ClusteredTensor
from .dtypes import from_numpy, storage_dtype, torch_dtype
from .errors import UsageError, where
from .reader import WclustReader
from .schema import AliasEntry, ClusteredEntry, PackSettings, chunk_row_ranges, rows_and_row_size
from .writer import WclustWriter

__all__ = ["save_file", "load_file", "safe_open"]


def save_file(
    tensors: dict[str, torch.Tensor | ClusteredTensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    settings: PackSettings | None = None,
    level: int | None = None,
    threads: int | None = None,
) -> None:
    """Write ``tensors`` to a .wclust file, atomically (overwrites, like safetensors' save_file).

    `ClusteredTensor` values are stored clustered, `torch.Tensor` values losslessly. Tensors that
    are the same object, or views of the same storage with the same offset, shape, strides and
    dtype (tied weights), are stored once and come back as one tensor under both names.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> emb = torch.randn(4, 3)
    >>> save_file({"embed.weight": emb, "lm_head.weight": emb}, p, metadata={"format": "pt"})
    >>> out = load_file(p)
    >>> out["lm_head.weight"] is out["embed.weight"], torch.equal(out["embed.weight"], emb)
    (True, True)
    """
    if not isinstance(tensors, dict):
        raise UsageError(f"{path}: tensors must be a dict of name to tensor, got {type(tensors).__name__}")
    seen: dict[Any, str] = {}
    with WclustWriter(path, metadata=metadata, settings=settings, level=level, threads=threads, overwrite=True) as w:
        for name, value in tensors.items():
            key = _identity(value)
            if key is not None and key in seen:
                w.add_alias(name, seen[key])
                continue
            w.add(name, value)
            if key is not None:
                seen[key] = name


def _identity(value: object) -> Any:
    """A key equal for two values that are the same data (tied weights), else None-safe unique."""
    if isinstance(value, ClusteredTensor):
        return ("ct", id(value))
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.layout != torch.strided or value.numel() == 0:
            return None  # not aliasable; the writer stores or rejects it
        return (
            "t",
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
    return None


def load_file(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    max_bytes: int | str | None = None,
) -> dict[str, torch.Tensor]:
    """Load every tensor of a .wclust file as dense torch tensors on ``device``.

    Clustered tensors are rebuilt in their original dtype (bit-exactly) by the streaming
    pipeline (`wcfmt.rebuild.stream`): chunks decode in a thread pool and, on a GPU, labels
    cross PCIe compact and are expanded on the device. Aliases come back as the same tensor
    object as their target. ``dtype`` converts floating-point tensors (as ``.to(dtype)``).
    ``max_bytes`` caps the decoded bytes of all tensors together (`UsageError` before anything
    is allocated): use it on untrusted files (spec §9.1); ``"auto"`` allows 64 times the file's
    size, at least 256 MiB (`wcfmt.reader.auto_max_bytes`, what the ``wcfmt`` command uses).
    """
    from .rebuild.stream import load_tensors

    with WclustReader(path, max_bytes=max_bytes) as reader:
        reader.check_file_budget()
        return load_tensors(reader, device=device, dtype=dtype, threads=threads)


class _Slice:
    """``safe_open(...).get_slice(name)[a:b, ...]``: reads and decodes only the row chunks it needs."""

    def __init__(self, opened: "safe_open", name: str) -> None:
        self._f = opened
        self._name = name
        _, self._entry = opened._reader.resolve(name)

    def get_shape(self) -> list[int]:
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        return self._entry.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        idx = index if isinstance(index, tuple) else (index,)
        shape = self._entry.shape
        if not shape:
            return self._f.get_tensor(self._name)[index]
        rows = shape[0]
        first, rest = idx[0], idx[1:]
        if first is Ellipsis:
            return self._f.get_tensor(self._name)[index]
        if isinstance(first, (int, np.integer)):
            i = int(first)
            if not -rows <= i < rows:
                raise IndexError(f"index {i} is out of range for dimension 0 of size {rows}")
            i %= rows
            block = self._rows(i, i + 1)
            return block[(0, *rest)]
        if isinstance(first, slice):
            r = range(rows)[first]
            if len(r) == 0:
                return self._rows(0, 0)[(slice(None), *rest)]
            if r.step == 1:
                return self._rows(r.start, r.stop)[(slice(None), *rest)]
            return self._pick(r)[(slice(None), *rest)]
        raise UsageError(f"{where(self._f._reader.path, self._name)}: get_slice supports int/slice on dimension 0")

    def _pick(self, wanted: range) -> Any:
        """Rows ``wanted`` in order (any step), decoding only the chunks that hold one of them."""
        cr = self._entry.chunk_rows
        spans: dict[int, list[int]] = {}
        for i in wanted:
            lo_hi = spans.setdefault(i // cr, [i, i + 1])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], i), max(lo_hi[1], i + 1)
        blocks = {c: (lo, self._f._reader.decode_rows(self._name, lo, hi)) for c, (lo, hi) in spans.items()}
        picked = np.stack([blocks[i // cr][1][i - blocks[i // cr][0]] for i in wanted])
        return self._f._to_torch(picked, self._entry.dtype)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        arr = self._f._reader.decode_rows(self._name, start, stop)
        return self._f._to_torch(arr, self._entry.dtype)


class safe_open:
    """Lazy access to a .wclust file over mmap, in the manner of ``safetensors.safe_open``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> save_file({"w": torch.arange(12.0).reshape(6, 2)}, p)
    >>> with safe_open(p, framework="pt") as f:
    ...     f.keys(), f.get_slice("w")[1:3]
    (['w'], tensor([[2., 3.],
            [4., 5.]]))
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        framework: str = "pt",
        device: str | torch.device = "cpu",
        *,
        use_mmap: bool = True,
        max_bytes: int | str | None = None,
    ) -> None:
        if framework not in ("pt", "torch", "numpy", "np"):
            raise UsageError(f"{filename}: framework {framework!r} is not supported (use 'pt' or 'numpy')")
        self._numpy = framework in ("numpy", "np")
        self._device = torch.device(device)
        self._reader = WclustReader(filename, use_mmap=use_mmap, max_bytes=max_bytes)

    # context manager
    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    # header views
    def keys(self) -> list[str]:
        return self._reader.keys()

    def metadata(self) -> dict[str, str]:
        return self._reader.metadata()

    @property
    def header(self):  # type: ignore[no-untyped-def]
        """The validated pydantic header (`wcfmt.schema.Header`)."""
        return self._reader.header

    @property
    def reader(self) -> WclustReader:
        return self._reader

    # tensors
    def _to_torch(self, arr: np.ndarray, dtype: str) -> Any:
        if self._numpy:
            if dtype == "BF16":
                raise UsageError(f"{self._reader.path}: numpy has no bfloat16; use framework='pt'")
            return arr.view(storage_dtype(dtype))
        t = from_numpy(arr, dtype)
        return t.to(self._device) if self._device.type != "cpu" else t

    def get_tensor(self, name: str) -> Any:
        """Return one tensor, dense, in its original dtype."""
        _, e = self._reader.resolve(name)
        return self._to_torch(self._reader.decode(name), e.dtype)

    def get_slice(self, name: str) -> _Slice:
        """Return a lazy slice object; indexing dimension 0 decodes only the chunks it covers."""
        return _Slice(self, name)

    def get_clustered(self, name: str) -> ClusteredTensor:
        """Return a clustered tensor's labels and centroid tables without rebuilding it."""
        target, e = self._reader.resolve(name)
        if not isinstance(e, ClusteredEntry):
            raise UsageError(f"{where(self._reader.path, name)}: tensor is stored {e.codec}, not clustered")
        rows, row_size = rows_and_row_size(e.shape)
        self._reader.check_sizes(target, range(len(e.chunks)))  # before allocating for the labels
        self._reader.check_budget(rows * row_size, where(self._reader.path, name))
        labels = np.empty(rows * row_size, np.uint8)
        tables = []
        from .codecs.bitpack import unpack_labels

        for i, (a, b) in enumerate(chunk_row_ranges(rows, e.chunk_rows) if rows * row_size else []):
            tables.append(torch.from_numpy(self._reader.read_centroids(target, i).copy()))
            packed = self._reader.read_labels(target, i)
            labels[a * row_size : b * row_size] = unpack_labels(packed, e.chunks[i].label_bits, (b - a) * row_size)
        return ClusteredTensor(
            labels=torch.from_numpy(labels).reshape(e.shape),
            centroids=tables,
            chunk_rows=e.chunk_rows,
            dtype=torch_dtype(e.dtype),
            shape=torch.Size(e.shape),
            quality=e.quality,
        )

    def load_all(self) -> dict[str, Any]:
        """Every tensor, dense; aliases share their target's tensor object."""
        for name in self._reader.header.unsupported:
            self._reader.entry(name)  # raises VersionError naming the codec
        out: dict[str, Any] = {}
        for name, e in self._reader.header.tensors.items():
            if isinstance(e, AliasEntry):
                continue
            out[name] = self.get_tensor(name)
        for name, e in self._reader.header.tensors.items():
            if isinstance(e, AliasEntry):
                out[name] = out[e.target]
        return {name: out[name] for name in self._reader.header.tensors}
