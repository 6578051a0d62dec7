"""`unpack`: a ``.wclust`` file or packed folder back to safetensors, one row chunk at a time.

Peak memory is one row chunk per file (plus the writer's buffer), whatever the model's size; a
folder output gets shards named as ``save_pretrained`` names them. Reads through `WclustReader`
(spec §4–§7), writes through `wcfmt.io.safetensors_io.SafetensorsStreamWriter`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..constants import INDEX_NAME, SUFFIX
from ..dtypes import CASTABLE, from_numpy, itemsize, name_of, to_numpy, torch_dtype, torch_dtype_of
from ..errors import FormatError
from ..io.folder import SAFETENSORS_INDEX, building_folder, check_output, check_weight_map, copy_files, \
    find_wclust_shards, other_files, write_index
from ..io.safetensors_io import SafetensorsStreamWriter, parse_size, plan_shards, shard_file_name
from ..progress import bar
from ..reader import WclustReader
from ..schema import AliasEntry
from .report import FileReport, UnpackReport
from .source import check_exists

__all__ = ["unpack"]


@dataclass
class _Item:
    reader: WclustReader
    name: str
    dtype: str  # output dtype name
    shape: tuple[int, ...]
    cast: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def unpack(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool = False,
    max_bytes: int | str | None = None,
) -> UnpackReport:
    """Unpack a ``.wclust`` file to ``.safetensors``, or a packed folder to a Hugging Face folder.

    A folder gets shards named as ``save_pretrained`` names them (``model.safetensors`` if one,
    else ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``), split at
    ``max_shard_size`` (decimal units, e.g. ``"5GB"``, as huggingface_hub), plus a copy of every
    other file. ``max_shard_size`` does not apply to a single-file output. Safetensors metadata
    is ``{"format": "pt"}`` updated with the file's user metadata. ``dtype`` casts floating-point
    tensors; otherwise every tensor keeps its dtype and its bytes: lossless tensors are the
    original bits, clustered ones exactly what `wcfmt.load_file` returns.

    Tied tensors (aliases) are written once, under their target's name, as ``save_pretrained``
    and ``safetensors.torch.save_model`` do (safetensors cannot store shared tensors);
    ``transformers`` ties them again on load. The report's ``dropped`` lists them.

    ``max_bytes`` (an int, ``"auto"`` or ``None``, as `WclustReader`'s) bounds each file's
    decoded bytes, checked from its header before anything is written (`UsageError`).
    """
    from ..io.sources import resolve_source

    t0 = time.perf_counter()
    src, dst = resolve_source(src), Path(dst)  # a Hub repository (hf://org/name) is downloaded first
    check_exists(src)
    want = name_of(torch_dtype_of(dtype)) if dtype is not None else None
    limit = parse_size(max_shard_size)
    report = UnpackReport(src, dst)
    shards = find_wclust_shards(src) if src.is_dir() else None
    paths = shards.paths if shards is not None else [src]
    check_output(src, dst, force=force, want_dir=src.is_dir())
    readers: list[WclustReader] = []
    try:
        for p in paths:
            # Positioned reads, not mmap: mapped pages would count in the RSS of a whole-model pass.
            readers.append(WclustReader(p, use_mmap=False, max_bytes=max_bytes))
            readers[-1].check_file_budget()
        items, metadata, sources = _unpack_plan(readers, want, report)
        if shards is not None:
            check_weight_map(shards, {n: r.path.name for r in readers for n in r.header.tensors})
        total = sum(it.nbytes for it in items)
        with bar(progress, total=total, desc="unpack", unit="B", unit_scale=True) as overall:
            if shards is not None:
                plan = plan_shards(((it.name, it.nbytes) for it in items), limit)
                by_name = {it.name: it for it in items}
                others = other_files(src, (SUFFIX, INDEX_NAME))
                with building_folder(dst, force=force) as tmp:
                    weight_map: dict[str, str] = {}
                    for i, names in enumerate(plan):
                        fname = shard_file_name(i, len(plan))
                        fr = FileReport(src, dst / fname)
                        _write_safetensors(tmp / fname, [by_name[n] for n in names], metadata, False, progress,
                                           overall, fr)
                        report.files.append(fr)
                        weight_map.update({n: fname for n in names})
                    if len(plan) > 1:
                        write_index(tmp / SAFETENSORS_INDEX, total, weight_map, shards.index_metadata)
                    copy_files(src, tmp, others)
                    report.copied = others
            else:
                fr = FileReport(src, dst)
                _write_safetensors(dst, items, metadata, force, progress, overall, fr)
                report.files.append(fr)
        report.source_bytes = sources
        report.output_bytes = sum(f.output_bytes for f in report.files)
    finally:
        for r in readers:
            r.close()
    report.seconds = time.perf_counter() - t0
    return report


def _unpack_plan(
    readers: list[WclustReader], want: str | None, report: UnpackReport
) -> tuple[list[_Item], dict[str, str], int]:
    items: list[_Item] = []
    seen: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for r in readers:
        for name in r.header.unsupported:
            r.entry(name)  # raises VersionError naming the codec it does not know
        for k, v in r.metadata().items():
            metadata.setdefault(k, v)
        for name, e in r.header.tensors.items():
            if name in seen:
                raise FormatError(f"{r.path}: tensor {name!r} is also in {seen[name]}")
            seen[name] = r.path
            if isinstance(e, AliasEntry):
                report.dropped[name] = e.target
                continue
            cast = want is not None and e.dtype in CASTABLE and e.dtype != want
            items.append(_Item(r, name, want if cast else e.dtype, tuple(e.shape), cast))
    metadata.setdefault("format", "pt")
    return items, metadata, sum(r.file_size for r in readers)


def _write_safetensors(
    path: Path, items: list[_Item], metadata: dict[str, str], overwrite: bool, progress: bool, overall: Any,
    report: FileReport,
) -> None:
    by_name = {it.name: it for it in items}
    specs = {it.name: (it.dtype, it.shape) for it in items}
    per_file = bar(progress, total=len(items), desc=path.name, unit="tensor", position=1, leave=False)
    with SafetensorsStreamWriter(path, specs, metadata, overwrite=overwrite) as w, per_file as per_tensor:
        for name in w.order:
            it = by_name[name]
            per_tensor.set_postfix_str(name)
            _, entry = it.reader.resolve(name)
            for i in range(len(entry.chunks)):  # one row chunk at a time: memory stays at a chunk
                values = it.reader.decode_chunk(name, i)
                if it.cast:
                    values = to_numpy(from_numpy(values, entry.dtype).to(torch_dtype(it.dtype)))
                w.write(name, values)
                overall.update(values.nbytes)
            report.tensors += 1
            per_tensor.update(1)
    report.output_bytes = path.stat().st_size

