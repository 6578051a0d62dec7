"""The write stage: stream tensors through the encode stage into ``.wclust`` files.

A file source gives one ``.wclust`` file; a folder gives one ``.wclust`` per source shard (same
stem), the index ``model.wclust.index.json`` (spec §8), a copy of every other file and a model
card (`wcfmt.io.card`). Tensors are written in source order through `wcfmt.writer.WclustWriter`
(bytes: spec §3–§7) while up to the clusterer's depth are clustered ahead, so peak memory is a
few tensors. Outputs appear only when complete (a temporary name, then a rename).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..constants import INDEX_NAME, SUFFIX
from ..dtypes import CLUSTERABLE
from ..errors import UsageError, WclustError, where
from ..io.folder import building_folder, copy_files, write_index
from ..io.safetensors_io import SAFETENSORS_SUFFIX, SafetensorsSource
from ..progress import bar
from ..schema import PackSettings
from ..writer import WclustWriter
from .encode import Clusterer, release_free_memory
from .plan import Plan
from .report import FileReport, PackReport
from .source import Source

__all__ = ["write_pack", "INFLIGHT_BYTES"]

#: Source bytes of the tensors clustered ahead of the one being written, at most (a larger
#: tensor goes alone). 8B-shaped pack: the MLP matrices (117 MB) keep both workers busy; the
#: embedding and LM head (1.05 GB each) go one at a time.
INFLIGHT_BYTES = 1 << 30


def write_pack(source: Source, dst: Path, plan: Plan, *, level: int | None, threads: int | None, force: bool,
               progress: bool, clusterer: Clusterer, card: Any = None) -> PackReport:
    """Encode and write every tensor of ``source`` (headers read) to ``dst`` as ``plan`` says."""
    settings = plan.settings
    total_size = source.tensor_bytes
    if source.is_dir:
        report = PackReport(source.path, dst, skipped=list(source.skipped))
        others = source.other_files()
        with building_folder(dst, force=force) as tmp:
            with bar(progress, total=total_size, desc="pack", unit="B", unit_scale=True) as overall:
                for p, _ in source.files:
                    out = tmp / (p.name[: -len(SAFETENSORS_SUFFIX)] + SUFFIX)
                    report.files.append(
                        _pack_file(p, out, plan, settings, level, threads, True, progress, overall, clusterer)
                    )
            assert source.shards is not None
            out_map = {n: f[: -len(SAFETENSORS_SUFFIX)] + SUFFIX for n, f in source.weight_map.items()}
            write_index(tmp / INDEX_NAME, total_size, out_map, source.shards.index_metadata)
            copy_files(source.path, tmp, others)
            report.copied = others
            if card is not None:  # the model card (wcfmt/io/card.py) reads the finished headers
                from ..io.card import write_card

                write_card(tmp, source.path, sum(f.source_bytes for f in report.files), card)
        for f in report.files:
            f.dst = dst / f.dst.name
    else:
        report = PackReport(source.path, dst)
        with bar(progress, total=total_size, desc="pack", unit="B", unit_scale=True) as overall:
            report.files.append(
                _pack_file(source.path, dst, plan, settings, level, threads, force, progress, overall, clusterer)
            )
    report.source_bytes = sum(f.source_bytes for f in report.files)
    report.output_bytes = sum(f.output_bytes for f in report.files)
    return report


def _pack_file(
    src: Path, dst: Path, plan: Plan, settings: PackSettings, level: int | None, threads: int | None,
    overwrite: bool, progress: bool, overall: Any, clusterer: Clusterer,
) -> FileReport:
    report = FileReport(src, dst, source_bytes=src.stat().st_size)
    with SafetensorsSource(src) as source:
        with WclustWriter(dst, metadata=source.metadata, settings=settings, level=level, threads=threads,
                          overwrite=overwrite) as w, \
             bar(progress, total=len(source.tensors), desc=src.name, unit="tensor", position=1,
                 leave=False) as per_tensor:  # fmt: skip
            # Tensors are written in source order; up to `clusterer.depth` are clustered ahead.
            pending: deque[tuple[Any, Any]] = deque()

            def write_oldest() -> None:
                info, item = pending.popleft()
                if isinstance(item, Future):
                    try:
                        item = item.result()
                    except (WclustError, ValueError) as e:
                        raise UsageError(f"{where(src, info.name)}: cannot cluster: {e}") from e
                w.add(info.name, item)
                if info.nbytes >= INFLIGHT_BYTES // 4:
                    del item
                    release_free_memory()  # a big tensor's buffers, freed: give them back now
                report.tensors += 1
                per_tensor.set_postfix_str(info.name)
                per_tensor.update(1)
                overall.update(info.nbytes)

            for info in source.tensors.values():
                # A tensor in flight holds its source here (the pool keeps a task's arguments) and,
                # done, its labels: bound their bytes too, so that two of an 8B model's 1 GB
                # embedding matrices are never held at once beside a third tensor.
                while pending and sum(i.nbytes for i, _ in pending) + info.nbytes > INFLIGHT_BYTES:
                    write_oldest()
                t = source.get_tensor(info.name)
                decision = (
                    plan.decide(info.name, tuple(info.shape), info.dtype)
                    if info.dtype in CLUSTERABLE and t.numel() > 0
                    else None
                )
                if decision is None:
                    item: Any = t
                    report.lossless += 1
                else:
                    try:
                        item = clusterer.submit(t, decision)
                    except (WclustError, ValueError) as e:
                        raise UsageError(f"{where(src, info.name)}: cannot cluster: {e}") from e
                    report.clustered += 1
                del t
                pending.append((info, item))
                del item
                while len(pending) > clusterer.depth:
                    write_oldest()
            while pending:
                write_oldest()
    report.output_bytes = dst.stat().st_size
    return report
