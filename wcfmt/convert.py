"""`pack` (safetensors → .wclust) and `unpack` (.wclust → safetensors), file or folder.

Both go tensor by tensor, so peak memory is about one tensor (pack: the source tensor, its
labels and the encoder's bounded look-ahead; unpack: one row chunk) plus a constant, whatever
the model's size. Outputs appear only when complete: files through a temporary name and an
atomic rename, folders through a temporary folder beside the destination. The source is only
read.

>>> import tempfile, os, torch, safetensors.torch
>>> d = tempfile.mkdtemp()
>>> safetensors.torch.save_file({"b": torch.ones(4)}, f"{d}/m.safetensors", metadata={"format": "pt"})
>>> r = pack(f"{d}/m.safetensors", f"{d}/m.wclust")
>>> u = unpack(f"{d}/m.wclust", f"{d}/back.safetensors")
>>> safetensors.torch.load_file(f"{d}/back.safetensors")["b"]
tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .clustered_tensor import ClusteredTensor
from .constants import DEFAULT_STORAGE_CHUNK_ROWS, INDEX_NAME, SUFFIX
from .dtypes import CLUSTERABLE, DTYPES, from_numpy, itemsize, name_of, to_numpy, torch_dtype
from .errors import FormatError, UsageError, WclustError, where
from .io.folder import (
    SAFETENSORS_INDEX,
    Shards,
    building_folder,
    check_output,
    check_weight_map,
    copy_files,
    find_safetensors_shards,
    find_wclust_shards,
    other_files,
    write_index,
)
from .io.safetensors_io import (
    SAFETENSORS_SUFFIX,
    SafetensorsSource,
    SafetensorsStreamWriter,
    TensorInfo,
    format_size,
    parse_size,
    plan_shards,
    read_safetensors_header,
    shard_file_name,
)
from .progress import bar
from .reader import WclustReader
from .schema import AliasEntry, PackSettings
from .writer import WclustWriter

__all__ = ["pack", "unpack", "PackReport", "UnpackReport", "FileReport", "torch_dtype_of"]

# Dtype-name parsing lives in dtypes.py; re-exported here (``convert.torch_dtype_of`` is public).
from .dtypes import _DTYPE_NAMES, CASTABLE, torch_dtype_of  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
@dataclass
class FileReport:
    """One output file: its tensors by codec and its size (and, for pack, its source file's size).

    Unpack re-splits tensors into new shards, so its files have no single source (0 there).
    """

    src: Path
    dst: Path
    tensors: int = 0
    clustered: int = 0
    lossless: int = 0
    aliases: int = 0
    source_bytes: int = 0
    output_bytes: int = 0


@dataclass
class _Report:
    src: Path
    dst: Path
    files: list[FileReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tensors(self) -> int:
        return sum(f.tensors for f in self.files)

    #: Bytes of the model files read (.safetensors for pack, .wclust for unpack) and written.
    source_bytes: int = 0
    output_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Output bytes / source bytes of the model files (copied files not counted)."""
        return self.output_bytes / self.source_bytes if self.source_bytes else float("nan")


@dataclass
class PackReport(_Report):
    """What `pack` did. ``ratio`` is packed bytes / source bytes (below 1 is smaller)."""

    #: Top-level .safetensors files of the source folder that its index does not list (not packed).
    skipped: list[str] = field(default_factory=list)

    @property
    def clustered(self) -> int:
        return sum(f.clustered for f in self.files)

    @property
    def lossless(self) -> int:
        return sum(f.lossless for f in self.files)

    def summary(self) -> str:
        return (
            f"packed {self.src} -> {self.dst}: {self.tensors} tensors ({self.clustered} clustered, "
            f"{self.lossless} lossless) in {len(self.files)} file(s), {format_size(self.source_bytes)} -> "
            f"{format_size(self.output_bytes)}, ratio {self.ratio:.3f}, {self.seconds:.1f} s"
        )


@dataclass
class UnpackReport(_Report):
    """What `unpack` did. Tied tensors (aliases) are written once: ``dropped`` maps alias -> kept name."""

    dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        tied = f", {len(self.dropped)} tied alias(es) not written" if self.dropped else ""
        return (
            f"unpacked {self.src} -> {self.dst}: {self.tensors} tensors in {len(self.files)} file(s){tied}, "
            f"{format_size(self.source_bytes)} -> {format_size(self.output_bytes)}, {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------
def pack(
    src: str | Path,
    dst: str | Path,
    *,
    k: int | None = None,
    chunk_rows: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    level: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> PackReport:
    """Pack a ``.safetensors`` file into a ``.wclust`` file, or a Hugging Face folder into a folder.

    Weights the cluster policy selects are clustered, the rest stored losslessly: by default
    the attention and MLP projection matrices (`wcfmt.cluster.ClusterPolicy`); ``include``
    regexes add tensors to that set, ``exclude`` regexes remove them (``exclude=["."]``
    clusters nothing); ``k`` and ``chunk_rows`` default to the policy's.

    A folder gives one ``.wclust`` per source shard (same stem), an index
    ``model.wclust.index.json`` and a copy of every other file (config, tokenizer, …). The
    source's ``__metadata__`` is kept as the user metadata; the settings are recorded in each
    header. ``force`` replaces an existing output; ``level`` is the zstd level; ``threads``
    bounds the encoder's and clusterer's threads.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_exists(src)
    policy, settings = _policy(k, chunk_rows, include, exclude, level)
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    with _Clusterer(threads, _source_bytes(src)) as clusterer:
        report = _pack(src, dst, policy, settings, level, threads, force, progress, clusterer)
    report.seconds = time.perf_counter() - t0
    return report


def _source_bytes(src: Path) -> int:
    if src.is_dir():
        return sum(p.stat().st_size for p in src.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
    return src.stat().st_size if src.is_file() else 0


def _pack(
    src: Path, dst: Path, policy: Any, settings: PackSettings, level: int | None, threads: int | None,
    force: bool, progress: bool, clusterer: "_Clusterer",
) -> PackReport:
    if src.is_dir():
        check_output(src, dst, force=force, want_dir=True)
        shards = find_safetensors_shards(src)
        headers = [_checked_header(p) for p in shards.paths]  # fail before writing anything
        weight_map = _check_source_index(shards, headers)
        total_size = sum(t.nbytes for h in headers for t in h.values())
        in_folder = {p.name for p in src.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file()}
        report = PackReport(src, dst, skipped=sorted(in_folder - set(shards.files)))
        others = other_files(src, (SAFETENSORS_SUFFIX, f"{SAFETENSORS_SUFFIX}.index.json"))
        with building_folder(dst, force=force) as tmp:
            with bar(progress, total=total_size, desc="pack", unit="B", unit_scale=True) as overall:
                for p in shards.paths:
                    out = tmp / (p.name[: -len(SAFETENSORS_SUFFIX)] + SUFFIX)
                    report.files.append(
                        _pack_file(p, out, policy, settings, level, threads, True, progress, overall, clusterer)
                    )
            out_map = {n: f[: -len(SAFETENSORS_SUFFIX)] + SUFFIX for n, f in weight_map.items()}
            write_index(tmp / INDEX_NAME, total_size, out_map, shards.index_metadata)
            copy_files(src, tmp, others)
            report.copied = others
        for f in report.files:
            f.dst = dst / f.dst.name
    else:
        check_output(src, dst, force=force, want_dir=False)
        report = PackReport(src, dst)
        total_size = sum(t.nbytes for t in _checked_header(src).values())
        with bar(progress, total=total_size, desc="pack", unit="B", unit_scale=True) as overall:
            report.files.append(
                _pack_file(src, dst, policy, settings, level, threads, force, progress, overall, clusterer)
            )
    report.source_bytes = sum(f.source_bytes for f in report.files)
    report.output_bytes = sum(f.output_bytes for f in report.files)
    return report


#: Below this much source data, starting worker processes costs more than it saves.
_PROCESS_POOL_MIN_BYTES = 64 * 1024 * 1024


def _worker_init() -> None:
    # One torch thread per worker: two workers with two OpenMP threads each ran no faster than
    # one process (10.9 s vs 10.8 s for SmolLM2-135M); with one each, 5.4 s against 10.1 s.
    torch.set_num_threads(1)


def _worker_ready() -> None:
    return None


def cluster_for_storage(t: torch.Tensor, k: int, chunk_rows: int | None, threads: int | None) -> ClusteredTensor:
    """Cluster with one codebook per ``chunk_rows`` rows (None: per tensor), stored in chunks of at
    most DEFAULT_STORAGE_CHUNK_ROWS rows so that loading decodes in parallel and by row range."""
    from .cluster import cluster_tensor

    ct = cluster_tensor(t, k, chunk_rows, threads=threads)
    storage = DEFAULT_STORAGE_CHUNK_ROWS
    if ct.chunk_rows > storage and (len(ct.centroids) == 1 or ct.chunk_rows % storage == 0):
        ct = ct.rechunk(storage)
    return ct


def _cluster_in_worker(t: torch.Tensor, k: int, chunk_rows: int | None) -> ClusteredTensor:
    return cluster_for_storage(t, k, chunk_rows, threads=1)


class _Clusterer:
    """Clusters tensors in worker processes, so that packing uses every core.

    The exact k-means makes many small numpy calls that hold the GIL, so threads barely help
    (measured: +10-20% with two); processes scale (SmolLM2-135M on 2 cores: 10.7 s -> 7.2 s,
    identical bytes). Up to ``workers`` tensors are in flight, so peak memory is about
    (workers + 1) x the largest tensor. Inputs under 64 MB cluster in-process.
    """

    def __init__(self, threads: int | None, source_bytes: int) -> None:
        import os

        if threads:
            self.workers = threads
        elif hasattr(os, "sched_getaffinity"):
            self.workers = len(os.sched_getaffinity(0))
        else:
            self.workers = os.cpu_count() or 1
        self._pool: Any = None
        if self.workers >= 2 and source_bytes >= _PROCESS_POOL_MIN_BYTES:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: no re-import of the caller's __main__ (an unguarded script
            # would run again in every worker under spawn/forkserver). The workers are forked
            # here, before pack starts any thread of its own.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method), initializer=_worker_init)
            for f in [self._pool.submit(_worker_ready) for _ in range(self.workers)]:
                f.result()
        self.depth = self.workers if self._pool is not None else 0
        self._threads = threads

    def submit(self, t: torch.Tensor, k: int, chunk_rows: int | None) -> Any:
        """Return a future (pool) or a finished ClusteredTensor (in-process)."""
        if self._pool is not None:
            return self._pool.submit(_cluster_in_worker, t, k, chunk_rows)
        return cluster_for_storage(t, k, chunk_rows, self._threads)

    def __enter__(self) -> "_Clusterer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _checked_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, refusing dtypes the format cannot store."""
    tensors = read_safetensors_header(path)[1]
    for t in tensors.values():
        if t.dtype not in DTYPES:
            raise UsageError(f"{where(path, t.name)}: unsupported dtype {t.dtype} (supported: {', '.join(DTYPES)})")
    return tensors


def _check_exists(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or folder", str(src))


def _policy(
    k: int | None, chunk_rows: int | None, include: Sequence[str] | None, exclude: Sequence[str] | None,
    level: int | None,
) -> tuple[Any, PackSettings]:
    from .cluster import ClusterPolicy

    for what, pats in (("include", include), ("exclude", exclude)):
        if isinstance(pats, str):  # list("proj") would silently become four one-letter regexes
            raise UsageError(f"{what} must be a list of regexes, not one string ({pats!r})")
    if level is not None and not (isinstance(level, int) and -131072 <= level <= 22):
        raise UsageError(f"level must be a zstd level, an integer in -131072..22, got {level!r}")
    kwargs: dict[str, Any] = {}
    if k is not None:
        kwargs["k"] = k
    if chunk_rows is not None:
        kwargs["chunk_rows"] = chunk_rows
    if include is not None:
        kwargs["include"] = include
    if exclude is not None:
        kwargs["exclude"] = exclude
    policy = ClusterPolicy(**kwargs)  # checks k, chunk_rows and the regexes (UsageError)
    settings = PackSettings(
        k=getattr(policy, "k", k),
        chunk_rows=getattr(policy, "chunk_rows", chunk_rows),
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        level=level,
        method="exact",
        extra={"storage_chunk_rows": str(DEFAULT_STORAGE_CHUNK_ROWS)},
    )
    return policy, settings


def _check_source_index(shards: Shards, headers: list[dict[str, TensorInfo]]) -> dict[str, str]:
    """Return tensor -> source file, checking the index (if any) against the files' contents."""
    found: dict[str, str] = {}
    for f, h in zip(shards.files, headers, strict=True):
        for name in h:
            if name in found:
                raise FormatError(f"{shards.folder / f}: tensor {name!r} is also in {found[name]}")
            found[name] = f
    check_weight_map(shards, found)
    return found


def _pack_file(
    src: Path, dst: Path, policy: Any, settings: PackSettings, level: int | None, threads: int | None,
    overwrite: bool, progress: bool, overall: Any, clusterer: _Clusterer,
) -> FileReport:
    from collections import deque
    from concurrent.futures import Future

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
                report.tensors += 1
                per_tensor.set_postfix_str(info.name)
                per_tensor.update(1)
                overall.update(info.nbytes)

            for info in source.tensors.values():
                t = source.get_tensor(info.name)
                decision = (
                    policy.decide(info.name, tuple(info.shape), info.dtype)
                    if info.dtype in CLUSTERABLE and t.numel() > 0
                    else None
                )
                if decision is None:
                    item: Any = t
                    report.lossless += 1
                else:
                    kk, rows = decision
                    try:
                        item = clusterer.submit(t, kk, rows)
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


# --------------------------------------------------------------------------------------------
# unpack
# --------------------------------------------------------------------------------------------
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
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_exists(src)
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
            readers.append(WclustReader(p, use_mmap=False))
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

