"""Editing a .wclust file in place: rewriting centroid tables without touching labels (spec §9.3).

The method's centroid experiments (rank-preserving transforms, affine corrections, healing)
change only the K fp16 values of each chunk; the labels, which are most of the file, stay put.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .codecs import entropy
from .errors import UsageError, where
from .reader import WclustReader
from .schema import ClusteredEntry, Header, serialize_header

__all__ = ["rewrite_centroids"]


def rewrite_centroids(
    path: str | os.PathLike[str],
    tables: dict[str, list[torch.Tensor | np.ndarray]],
    *,
    settings_extra: dict[str, str] | None = None,
) -> None:
    """Replace the centroid tables of clustered tensors in place.

    ``tables[name]`` holds one table per row chunk, each with the chunk's K values, fp16-exact,
    finite and strictly ascending (labels are ranks, so the order must not change). Everything
    is validated before the first byte is written. The update is not atomic: a crash midway
    leaves a file whose checksums fail (spec §9.3), never silently wrong weights.
    ``settings_extra`` (str → str) is merged into the header's ``settings.extra``, so that tools
    (healing, transforms) can record what they changed.
    """
    path = Path(path)
    with WclustReader(path) as r:
        header, h_off = r.header, r._header_offset
        new_tensors = dict(header.tensors)
        writes: list[tuple[int, bytes]] = []
        for name, new in tables.items():
            target, e = r.resolve(name)
            if not isinstance(e, ClusteredEntry):
                raise UsageError(f"{where(path, name)}: tensor is stored {e.codec}, not clustered")
            if len(new) != len(e.chunks):
                raise UsageError(f"{where(path, name)}: {len(new)} tables given, the tensor has {len(e.chunks)} chunks")
            chunks = []
            for i, (table, chunk) in enumerate(zip(new, e.chunks)):
                arr = _as_f16(table, path, name, i)
                if arr.size != chunk.k:
                    raise UsageError(f"{where(path, name, i)}: table has {arr.size} values, chunk has K={chunk.k}")
                if not np.isfinite(arr).all() or (arr.size > 1 and not (arr[1:] > arr[:-1]).all()):
                    raise UsageError(f"{where(path, name, i)}: table must be finite and strictly ascending")
                raw = arr.astype("<f2").tobytes()
                writes.append((chunk.centroids.offset, raw))
                chunks.append(chunk.model_copy(update={"centroids": chunk.centroids.model_copy(update={"crc32": entropy.crc32(raw)})}))
            new_tensors[target] = e.model_copy(update={"chunks": chunks})
    fields = {**header.model_dump(exclude_none=True), "tensors": {
        n: v.model_dump(exclude_none=True) for n, v in new_tensors.items()}}
    if settings_extra:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in settings_extra.items()):
            raise UsageError(f"{path}: settings_extra must map str to str")
        settings = dict(fields.get("settings") or {})
        settings["extra"] = {**settings.get("extra", {}), **settings_extra}
        fields["settings"] = settings
    new_header = Header.model_validate(fields)
    raw_header = serialize_header(new_header)
    from .writer import pack_preamble

    with open(path, "r+b") as f:
        for offset, raw in writes:
            f.seek(offset)
            f.write(raw)
        f.seek(h_off)
        f.write(raw_header)
        f.truncate()
        f.seek(0)
        f.write(pack_preamble(h_off, len(raw_header), entropy.crc32(raw_header)))
        f.flush()
        os.fsync(f.fileno())


def _as_f16(table: torch.Tensor | np.ndarray, path: Path, name: str, i: int) -> np.ndarray:
    arr = table.detach().cpu().numpy() if isinstance(table, torch.Tensor) else np.asarray(table)
    if arr.ndim != 1:
        raise UsageError(f"{where(path, name, i)}: a centroid table must be 1-D")
    with np.errstate(over="ignore"):
        f16 = arr.astype(np.float16)  # overflow -> inf, caught as not representable below
    if arr.dtype != np.float16 and not np.array_equal(f16.astype(arr.dtype), arr, equal_nan=True):
        raise UsageError(f"{where(path, name, i)}: centroids must be exactly representable in fp16")
    return f16
