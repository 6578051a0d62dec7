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
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
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

__all__ = ["pack", "unpack", "PackReport", "UnpackReport", "FileReport", "torch_dtype_of", "DEFAULT_BITS",
           "DEFAULT_BITS_CALIBRATED",
           "DEFAULT_EMBED_WEIGHT"]

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
    #: Clustered tensors whose recorded SQNR is below DEGENERATE_SQNR_DB: (name, SQNR dB).
    degenerate: list[tuple[str, float]] = field(default_factory=list)
    #: The commit URL when ``push_to_hub`` was given.
    pushed: str | None = None

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
    bits: float | None = None,
    bits_embed: float | None = None,
    embed_weight: float | None = None,
    chunk_rows: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    k_overrides: dict[str, int] | None = None,
    bits_overrides: dict[str, float] | None = None,
    embeddings: bool | None = None,
    embed_importance: str | None = None,
    calib: str | Path | None = None,
    calib_tokens: int | None = None,
    level: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
    base_model: str | None = None,
    quality_note: str | None = None,
    remote_code: bool = False,
    push_to_hub: str | None = None,
    token: str | bool | None = None,
) -> PackReport:
    """Pack a ``.safetensors`` file into a ``.wclust`` file, or a Hugging Face folder into a folder.

    Weights the cluster policy selects are clustered, the rest stored losslessly: by default
    the attention and MLP projection matrices (`wcfmt.cluster.ClusterPolicy`), and in bits mode
    the token embedding / LM head too (``embeddings``); ``include`` regexes add tensors to that
    set, ``exclude`` regexes remove them (``exclude=["."]`` clusters nothing).

    Two encoders (give at most one of ``k`` and ``bits``; neither: the bits encoder at
    `DEFAULT_BITS_CALIBRATED` when the pack is calibrated, explicitly or automatically (below),
    else at `DEFAULT_BITS`):

    - ``bits=B``: entropy-constrained clustering with one slope λ for every clustered tensor,
      so that they spend ``B`` stored bits per weight on average (labels after zstd plus
      tables; wider or heavier-tailed matrices get more, narrow ones fewer).
      ``embed_weight`` (default `DEFAULT_EMBED_WEIGHT`) counts the squared error of embeddings /
      LM heads that many times in that allocation (each ×4 ≈ one more bit for them, up to the
      256-value cap); ``bits_embed`` gives them a budget (and λ) of their own instead;
      ``bits_overrides`` (regex → bits, first match wins) gives single tensors theirs.
    - ``k=K``: exact k-means with at most K centroids per codebook (the paper's setting);
      ``k_overrides`` (regex → K) per tensor.

    ``chunk_rows`` gives a codebook per that many rows (default: one per tensor).

    ``embed_importance`` (bits mode, clustered embeddings): ``"tokens"`` weighs each embedding
    row's squared error by its token's expected frequency, read from the source folder's
    ``tokenizer.json`` (`wcfmt.cluster.token_weights`: BPE merge rank, Unigram scores), with a
    table per 256 rows, so rare tokens' rows get coarser cells and frequent ones finer;
    ``"uniform"`` weighs rows equally. Default: `EMBED_IMPORTANCE`. Without frequencies in the
    tokenizer (WordPiece, no tokenizer.json) rows are weighted equally.

    ``calib="random"``: the model (a Hugging Face causal LM folder, transformers, CPU) reads 8 ×
    128 random token ids once, and each projection's labels are chosen by ω_j (w − c)² +
    λ·bits(c), ω_j = E[x_j²] of its input column (`wcfmt.cluster.calibrate.column_weights`), its
    tables refit to ω-weighted means: a few seconds, no text. ``calib=None`` (the default) in
    bits mode means ``"random"`` wherever it can run (`_calibration_for`: a causal-LM folder,
    transformers installed, the model within half the free memory), else none;
    the settings record the choice or why it was not made (``calib_skipped``), and a model that
    fails to load then is a warning, not an error. ``calib="none"``: no calibration.

    ``calib``: a text file. The model (a Hugging Face causal LM folder, run with transformers on
    the CPU) reads its first ``calib_tokens`` tokens (default 4096), and every clustered linear
    layer's labels are chosen GPTQ-style against its inputs' second moments
    (`wcfmt.cluster.calibrate`): same tables, same format, labels that cost the layer's *output*
    less; in bits mode the label choice also pays the encoder's λ per bit. Embeddings keep their
    plain labels. ``calib="self"``: no text of the user's; the model first writes its own
    (`wcfmt.cluster.calibrate.sample_text`, 8 × 560 tokens sampled with a fixed seed, about a
    minute for a 135M model on 2 cores, as long as the rest of the calibrated pack);
    deterministic on one machine, not across machines.

    A folder gives one ``.wclust`` per source shard (same stem), an index
    ``model.wclust.index.json`` and a copy of every other file (config, tokenizer, …). The
    source's ``__metadata__`` is kept as the user metadata; the settings are recorded in each
    header. ``force`` replaces an existing output; ``level`` is the zstd level; ``threads``
    bounds the encoder's and clusterer's threads.

    ``src`` may be a Hub repository (``hf://org/name[@rev]`` or ``org/name``; downloaded to the
    cache). A folder output gets a model card (`wcfmt.io.card`): ``base_model`` (default: the Hub
    source's id) and ``quality_note`` go into it; ``remote_code`` adds the trust_remote_code shim.
    ``push_to_hub="org/name"`` verifies and uploads the finished folder (``token``: the Hub token).
    Clustered tensors whose recorded SQNR is below `wcfmt.inspect.DEGENERATE_SQNR_DB` are listed
    in the report's ``degenerate`` and warned about (`DegenerateQualityWarning`).
    """
    from .io.card import CardOptions
    from .io.sources import HubSource, parse_source, resolve_source

    t0 = time.perf_counter()
    hub_src = parse_source(src) if isinstance(src, str) else None
    if base_model is None and isinstance(hub_src, HubSource):
        base_model = hub_src.repo_id
    src, dst = resolve_source(src, token=token), Path(dst)
    _check_exists(src)
    card = CardOptions(base_model=base_model, quality_note=quality_note, remote_code=remote_code,
                       repo_id=push_to_hub or dst.name)  # the card names the final folder, not the temporary one
    # calib_tokens without calib stays the usage error it was (below), not a reason to calibrate
    calib, skipped = _calibration_for(src, calib, bits_mode=k is None and not k_overrides and calib_tokens is None)
    if k is None and bits is None and not k_overrides:
        bits = DEFAULT_BITS if calib is None else DEFAULT_BITS_CALIBRATED
    policy, settings = _policy(
        k, chunk_rows, include, exclude, level, bits=bits, bits_embed=bits_embed, embed_weight=embed_weight,
        k_overrides=k_overrides,
        bits_overrides=bits_overrides, embeddings=embeddings, embed_importance=embed_importance,
    )  # fmt: skip
    if calib is not None:
        policy.set_calibration(src, calib, calib_tokens, auto=skipped == "")
    elif calib_tokens is not None:
        raise UsageError("calib_tokens needs calib (a calibration text file)")
    if skipped:
        settings = settings.model_copy(update={"extra": {**settings.extra, "calib": "none", "calib_skipped": skipped}})
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    with _Clusterer(threads, _source_bytes(src)) as clusterer:
        report = _pack(src, dst, policy, settings, level, threads, force, progress, clusterer, card)
    report.seconds = time.perf_counter() - t0
    _warn_degenerate(report)
    if push_to_hub:
        from .io.hub import push_to_hub as push

        report.pushed = push(dst, push_to_hub, token=token)
    return report


def _warn_degenerate(report: "PackReport") -> None:
    import warnings

    from .inspect import DEGENERATE_SQNR_DB, DegenerateQualityWarning, calibrated, degenerate_tensors, info

    packed = info(report.dst)
    report.degenerate = degenerate_tensors(packed)
    if report.degenerate and not calibrated(packed):  # calibration lowers weight SQNR on purpose
        shown = ", ".join(f"{n} ({s:.1f} dB)" for n, s in report.degenerate[:3])
        more = f" and {len(report.degenerate) - 3} more" if len(report.degenerate) > 3 else ""
        warnings.warn(
            f"{report.dst}: {len(report.degenerate)} clustered tensor(s) with SQNR below {DEGENERATE_SQNR_DB:g} dB, "
            f"the model is likely broken: {shown}{more} (raise --k or --bits)",
            DegenerateQualityWarning, stacklevel=3,
        )  # fmt: skip


def _calibration_for(src: Path, calib: str | Path | None, *, bits_mode: bool) -> tuple[str | Path | None, str | None]:
    """``pack``'s ``calib`` as it will run, and for the automatic choice the reason it was not
    made ("" when it was; None when the user chose). ``calib=None`` in bits mode means
    `RANDOM_CALIB` wherever it can run: a Hugging Face causal-LM folder (its config names a
    ``...ForCausalLM`` / ``...LMHeadModel`` class and no custom code), transformers installed,
    and the model (run in its checkpoint's width, `calibrate._statistics_dtype`) within half
    the memory available. ``"none"``: no calibration."""
    from .cluster.calibrate import NO_CALIB, RANDOM_CALIB

    if isinstance(calib, str) and calib == NO_CALIB:
        return None, None
    if calib is not None or not bits_mode:
        return calib, None
    reason = _auto_calibration_blocker(src)
    return (RANDOM_CALIB, "") if reason is None else (None, reason)


def _auto_calibration_blocker(src: Path) -> str | None:
    import importlib.util

    config_file = src / "config.json"
    if not src.is_dir() or not config_file.is_file():
        return "not a Hugging Face model folder"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"config.json is unreadable ({e})"
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not any(isinstance(a, str) and a.endswith(_CAUSAL_LM_SUFFIXES) for a in archs):
        return "not a causal LM (config.json architectures: " + ", ".join(map(str, archs or ["none"])) + ")"
    if config.get("auto_map"):
        return "the model needs its own code (auto_map)"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    need = _source_bytes(src)  # it runs in its checkpoint's width (bfloat16 for 16-bit weights)
    have = _available_memory()
    if have is not None and need > have // 2:
        return f"the model needs {need / 2**30:.1f} GiB to run; {have / 2**30:.1f} GiB of memory is available"
    return None


#: Architectures `pack` calibrates automatically (transformers' naming of causal LMs).
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _available_memory() -> int | None:
    """Linux's MemAvailable in bytes, or None where it is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _source_bytes(src: Path) -> int:
    if src.is_dir():
        return sum(p.stat().st_size for p in src.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
    return src.stat().st_size if src.is_file() else 0


def _pack(
    src: Path, dst: Path, policy: Any, settings: PackSettings, level: int | None, threads: int | None,
    force: bool, progress: bool, clusterer: "_Clusterer", card: Any = None,
) -> PackReport:
    if src.is_dir():
        check_output(src, dst, force=force, want_dir=True)
        shards = find_safetensors_shards(src)
        headers = [_checked_header(p) for p in shards.paths]  # fail before writing anything
        weight_map = _check_source_index(shards, headers)
        settings = policy.prepare(list(zip(shards.paths, headers)), settings, progress)
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
            if card is not None:  # the model card (wcfmt/io/card.py) reads the finished headers
                from .io.card import write_card

                write_card(tmp, src, sum(f.source_bytes for f in report.files), card)
        for f in report.files:
            f.dst = dst / f.dst.name
    else:
        check_output(src, dst, force=force, want_dir=False)
        report = PackReport(src, dst)
        header = _checked_header(src)
        total_size = sum(t.nbytes for t in header.values())
        settings = policy.prepare([(src, header)], settings, progress)
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
    # numpy's BLAS likewise (calibration's Cholesky factors and block updates): SmolLM2
    # `--bits 5.43 --calib FILE` on 2 cores took 100 s with its default threads, 63 s with one
    # per worker, same bytes.
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def _worker_ready() -> None:
    return None


_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _is_output_head(name: str, folder: Path) -> bool:
    """Whether ``name`` produces logits: an LM head, or a token embedding that a causal LM in
    ``folder`` ties to its LM head (config.json ``architectures`` and ``tie_word_embeddings``,
    which transformers defaults to true). `DEFAULT_EMBED_WEIGHT` is for those: an encoder's
    input embedding (BERT, sentence-transformers) is not an output and keeps weight 1."""
    if _HEAD_RE.search(name):
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures") or []
    causal = isinstance(archs, list) and any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    return causal and config.get("tie_word_embeddings", True) is True


def cluster_for_storage(
    t: torch.Tensor, k: int | None, chunk_rows: int | None, threads: int | None, *, bits: float | None = None,
    step: float | None = None, importance: Any = None,
) -> ClusteredTensor:
    """Cluster with one codebook per ``chunk_rows`` rows (None: per tensor), stored in chunks of at
    most DEFAULT_STORAGE_CHUNK_ROWS rows so that loading decodes in parallel and by row range.
    One of ``k``, ``bits``, ``step`` (as `wcfmt.cluster_tensor`, as is ``importance``)."""
    from .cluster import cluster_tensor

    ct = cluster_tensor(t, k, chunk_rows, bits=bits, step=step, threads=threads, importance=importance)
    storage = DEFAULT_STORAGE_CHUNK_ROWS
    if ct.chunk_rows > storage and (len(ct.centroids) == 1 or ct.chunk_rows % storage == 0):
        ct = ct.rechunk(storage)
    return ct


def _cluster_spec(t: torch.Tensor, spec: "_Spec", threads: int | None) -> ClusteredTensor:
    ct = cluster_for_storage(t, spec.k, spec.chunk_rows, threads, step=spec.step, importance=spec.importance)
    if spec.hessian is not None:
        from .cluster.calibrate import calibrate_clustered

        lam = float(ct.quality.get("lambda", 0.0)) if ct.quality else 0.0
        ct = calibrate_clustered(ct, t, spec.hessian, lam=lam, refit=CALIB_REFIT)
    return ct


def _cluster_in_worker(t: torch.Tensor, spec: "_Spec") -> ClusteredTensor:
    return _cluster_spec(t, spec, 1)


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

    def submit(self, t: torch.Tensor, spec: "_Spec") -> Any:
        """Return a future (pool) or a finished ClusteredTensor (in-process)."""
        if self._pool is not None:
            return self._pool.submit(_cluster_in_worker, t, spec)
        return _cluster_spec(t, spec, self._threads)

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


#: `pack`'s encoder when neither ``k`` nor ``bits`` is given: the entropy-constrained one at this
#: model-wide average of stored bits per clustered weight, token embedding / tied LM head included.
#: Chosen from SmolLM2-135M measurements (tools/eval_smollm2.py; README "Quality and size"): at
#: 6.0 bits 1.030× bf16 perplexity (mean of three nearby budgets, 1.024–1.042) with the files at
#: 0.375 of bf16, both better than the previous default (K = 64 k-means: 1.040×, 0.417); 5.5 bits
#: gives 0.343 but 1.053×. With `DEFAULT_EMBED_WEIGHT` (8): 1.018× at 0.374; 5.43 bits 1.050× at 0.339.
DEFAULT_BITS: float = 6.0

#: The default when the pack weighs input columns by activations (``calib``, including the
#: automatic ``calib="random"``): SmolLM2-135M at 5.43 bits with column weights from random
#: tokens: 1.015× bf16 perplexity (mean of three budgets ±0.03, 1.007–1.025) at 0.339 of the
#: bf16 file, where without them 5.43 bits gave 1.050× and 1.018× needed 6 bits (0.374).
DEFAULT_BITS_CALIBRATED: float = 5.43

#: In bits mode, how many times the squared error of a clustered token embedding / LM head counts
#: in the one-slope allocation (its cells ``1/√w`` as wide as the projections'; ×4 ≈ one more
#: bit, less near the 256-value cap). At equal slope (w = 1) SmolLM2-135M's tied embedding got
#: 5.0 bits and its projections 5.6, yet the tied head's error lands on the logits directly.
#: Measured with tools/eval_smollm2.py (mean of three budgets ±0.03; tools/RESULTS-smollm2.md):
#: w = 8 (embedding ≈ 6.2 bits) at --bits 6: 1.018× bf16 perplexity vs 1.030× at w = 1, files at
#: 0.374; at --bits 5.43 (0.339): 1.050× vs 1.068×. A budget of its own (5.3 + 6.0, 5.05 + 7.0)
#: gave the same (1.045×, 1.049×); w = 32 → see the notes. It applies to output heads only (an
#: LM head, or an embedding a causal LM ties to it: `_is_output_head`): on all-MiniLM-L6-v2,
#: whose word embedding is an input only, w = 8 took bits from the projections and lowered the
#: embedding cosine from 0.9979 / 0.9955 (mean / min) to 0.9938 / 0.9859.
DEFAULT_EMBED_WEIGHT: float = 8.0


#: `pack`'s ``embed_importance`` default: how the rows of a clustered token embedding / LM head
#: are weighted (``"tokens"``: by their tokens' expected frequency; ``"uniform"``: equally).
EMBED_IMPORTANCE: str = "uniform"
EMBED_IMPORTANCE_CHOICES = ("tokens", "uniform")


#: With ``calib``: after GPTQ labelling, replace each table by its cells' diag(H)-weighted means
#: (measured on SmolLM2 with tools/eval_smollm2.py --calib; README "Calibration").
CALIB_REFIT: bool = True


@dataclass(frozen=True)
class _Spec:
    """How one tensor is clustered: ``k`` (exact k-means) or ``step`` (entropy-constrained), and
    with calibration the inputs' second moments H of its layer."""

    k: int | None
    step: float | None
    chunk_rows: int | None
    hessian: Any = None
    #: one importance per row (shape (rows, 1)): an embedding's token frequencies
    importance: Any = None


class _Plan:
    """The per-tensor decisions of one pack: the cluster policy plus, in bits mode, the steps of the
    model-wide allocation (`prepare` reads every clustered tensor's histogram first)."""

    def __init__(self, policy: Any, budgets: dict[str, float] | None, *, embed_weight: float = 1.0,
                 embed_importance: str = "uniform") -> None:
        self.policy = policy
        self.budgets = budgets
        #: allocation weight of output heads (`_is_output_head`) that share the model's slope
        self.embed_weight = embed_weight
        self.embed_importance = embed_importance
        self.row_weights: dict[str, Any] = {}  # tensor name -> per-row importance (token frequencies)
        self.steps: dict[str, float] = {}
        #: (model folder, text file or SELF_CALIB / RANDOM_CALIB, tokens of a text)
        self.calib: tuple[Path, Path | str, int] | None = None
        self.hessians: dict[str, Any] = {}
        self.calib_auto = False  # chosen by pack, not the user
        self.calib_failed = False  # ... and the model did not run

    def set_calibration(self, src: Any, calib: str | Path, tokens: int | None, *, auto: bool = False) -> None:
        """Check the calibration arguments (before anything is read or written). ``auto``: chosen
        by `pack`, not the user, so a failure to run the model is a warning, not an error."""
        self.calib_auto = auto
        from .cluster.calibrate import DEFAULT_CALIB_TOKENS, RANDOM_CALIB, SELF_CALIB

        text: Path | str
        if isinstance(calib, str) and calib in (SELF_CALIB, RANDOM_CALIB):
            text = calib  # the model writes its own text, or reads random tokens
        else:
            text = Path(calib)
            if not text.is_file():
                raise UsageError(f"calib {text}: no such text file ('self': text sampled from the model; "
                                 f"'random': random tokens)")
        if text == RANDOM_CALIB and tokens is not None:
            raise UsageError("calib_tokens does not apply to calib='random' (it reads a fixed sample of random tokens)")
        if tokens is None:
            tokens = DEFAULT_CALIB_TOKENS
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
            raise UsageError(f"calib_tokens must be an integer >= 2, got {tokens!r}")
        self.calib = (Path(src), text, tokens)

    def _collect(self, headers: Sequence[tuple[Path, dict[str, TensorInfo]]], progress: bool) -> dict[str, str]:
        """Run the model for the calibration statistics (``self.hessians``); return the header
        settings that describe them."""
        from .cluster.calibrate import (
            RANDOM_CALIB, RANDOM_SEED, SELF_CALIB, SELF_SEED, SELF_SEQUENCES, SELF_TOKENS, collect_hessians,
            collect_random_diagonals, sample_text,
        )  # fmt: skip

        assert self.calib is not None
        folder, text_path, tokens = self.calib
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise UsageError(f"{folder}: calib needs a Hugging Face model folder (config.json and weights)")
        wanted = {info.name for _, h in headers for info in h.values()
                  if self.policy.clusters(info.name, tuple(info.shape), info.dtype) and len(info.shape) == 2
                  and self.policy.group(info.name) != "embed"}  # fmt: skip
        refit = "+refit" if CALIB_REFIT else ""
        if text_path == RANDOM_CALIB:
            self.hessians, (rows, row) = collect_random_diagonals(folder, names=wanted, progress=progress)
            if not self.hessians:  # e.g. GPT-2's Conv1D projections: no nn.Linear to hook
                return {"calib": "none", "calib_skipped": "no clustered projection is an nn.Linear to weigh"}
            return {"calib": "diagonal" + refit, "calib_text": f"random ({rows}x{row} tokens, seed {RANDOM_SEED})"}
        if text_path == SELF_CALIB:
            text = sample_text(folder)
            text_name = f"self ({SELF_SEQUENCES}x{SELF_TOKENS} sampled tokens, seed {SELF_SEED})"
        else:
            assert isinstance(text_path, Path)
            text_name = text_path.name
            try:
                text = text_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"calib {text_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        self.hessians = collect_hessians(folder, text, tokens, names=wanted, progress=progress)
        return {"calib": "gptq" + refit, "calib_text": text_name, "calib_tokens": str(tokens)}

    def prepare(self, headers: Sequence[tuple[Path, dict[str, TensorInfo]]], settings: PackSettings,
                progress: bool) -> PackSettings:
        """Collect calibration statistics and allocate the bits (bits mode) over the source files
        and their (already checked) headers; return the settings with both recorded.

        The two are independent, so calibration (transformers' import, the model's load and its
        forward passes, much of it outside the GIL) runs in a thread beside the allocation."""
        if self.calib is None:
            return self._allocate(headers, settings, progress)
        found: list[Any] = []

        def collect() -> None:
            try:
                found.append(self._collect(headers, progress))
            except Exception as e:
                if not self.calib_auto:
                    found.append(e)  # re-raised in the caller's thread below
                    return
                # pack chose to calibrate, not the user: go on without, and say why (below)
                self.hessians = {}
                found.append({"calib": "none", "calib_skipped": f"the model did not run ({e})"})
                self.calib_failed = True
            except BaseException as e:  # KeyboardInterrupt: re-raised below
                found.append(e)

        # A daemon thread, not an executor: if the allocation fails, its error is raised at once
        # and the process may exit without waiting for the model to finish.
        worker = threading.Thread(target=collect, name="wcfmt-calibrate", daemon=True)
        worker.start()
        allocated = self._allocate(headers, settings, progress)
        worker.join()
        if isinstance(found[0], BaseException):
            raise found[0]
        calibrated: dict[str, str] = found[0]
        # The user asked and got nothing, or the automatic choice failed to run the model: say so.
        # (An automatic pass that found nothing to weigh is only recorded.)
        if "calib_skipped" in calibrated and (not self.calib_auto or self.calib_failed):
            import warnings

            warnings.warn(f"{self.calib[0]}: packed without column weights: {calibrated['calib_skipped']}", stacklevel=3)
        return allocated.model_copy(update={"extra": {**allocated.extra, **calibrated}})

    def _allocate(self, headers: Sequence[tuple[Path, dict[str, TensorInfo]]], settings: PackSettings,
                  progress: bool) -> PackSettings:
        """Bits mode: the model-wide allocation (one slope), steps per tensor in ``self.steps``."""
        if self.budgets is None:
            return settings
        from .cluster import table_entry_bits
        from .cluster.allocate import TensorRate, allocate, coarse_histogram
        from .cluster.kmeans import value_histogram
        from .cluster.token_weights import token_row_weights
        from .schema import chunk_row_ranges, rows_and_row_size

        rates: dict[str, TensorRate] = {}
        budgets = dict(self.budgets)
        weighted_how: set[str] = set()
        weighted_head = False
        total = sum(t.nbytes for _, h in headers for t in h.values() if self.policy.clusters(t.name, t.shape, t.dtype))
        with bar(progress, total=total, desc="histograms", unit="B", unit_scale=True) as b:
            for p, h in headers:
                with SafetensorsSource(p) as source:
                    for info in h.values():
                        if not self.policy.clusters(info.name, tuple(info.shape), info.dtype):
                            continue
                        values = to_numpy(source.get_tensor(info.name)).reshape(-1)
                        rows, row_size = rows_and_row_size(tuple(info.shape))
                        cr = self.policy.chunk_rows or max(1, rows)
                        found = None
                        if (self.embed_importance == "tokens" and len(info.shape) == 2
                                and self.policy.group(info.name) == "embed"):  # fmt: skip
                            found = token_row_weights(p.parent, rows)
                        if found is not None:  # a table per storage chunk: one step per 256 rows
                            self.row_weights[info.name] = found[0].reshape(-1, 1)
                            weighted_how.add(found[1])
                            cr = DEFAULT_STORAGE_CHUNK_ROWS
                        hists, entry = [], []
                        for a, e in chunk_row_ranges(rows, cr):
                            imp = None if found is None else np.repeat(found[0][a:e], row_size)
                            try:
                                hist = value_histogram(values[a * row_size : e * row_size], info.dtype, imp)
                            except (WclustError, ValueError) as err:
                                raise UsageError(f"{where(p, info.name)}: cannot cluster: {err}") from err
                            hists.append(coarse_histogram(hist))
                            entry.append(table_entry_bits(e - a, rows))
                        own = self.policy.bits_for(info.name)
                        group = self.policy.group(info.name)
                        if own is not None:
                            group = f"tensor:{info.name}"
                            budgets[group] = own
                        elif group not in budgets:
                            group = "model"
                        head = (group == "model" and self.policy.group(info.name) == "embed"
                                and _is_output_head(info.name, p.parent))  # fmt: skip
                        weight = self.embed_weight if head else 1.0
                        weighted_head |= head
                        rates[info.name] = TensorRate(hists, entry, group, weight)
                        b.update(info.nbytes)
        alloc = allocate(rates, budgets)
        self.steps = alloc.steps
        extra = dict(settings.extra)
        for g in sorted(alloc.group_bits):
            if g.startswith("tensor:"):
                continue
            key = "" if g == "model" else f"_{g}"
            extra[f"bits{key}"] = f"{alloc.group_bits[g]:g}"
            extra[f"lambda{key}"] = f"{alloc.group_lambda[g]:.6g}"
            extra[f"step{key}"] = f"{alloc.group_step[g]:.6g}"
        if weighted_how:
            extra["embed_importance"] = ",".join(sorted(weighted_how))
        if weighted_head:  # only where an output head shares the model's slope
            extra["embed_weight"] = f"{self.embed_weight:g}"
        return settings.model_copy(update={"extra": extra})

    def decide(self, name: str, shape: Sequence[int], dtype: str) -> _Spec | None:
        if not self.policy.clusters(name, shape, dtype):
            return None
        h = self.hessians.get(name)
        if self.budgets is None:
            k, rows = self.policy.decide(name, shape, dtype)
            return _Spec(k, None, rows, h)
        w = self.row_weights.get(name)
        if w is not None:
            return _Spec(None, self.steps[name], DEFAULT_STORAGE_CHUNK_ROWS, h, w)
        return _Spec(None, self.steps[name], self.policy.chunk_rows, h)


def _policy(
    k: int | None, chunk_rows: int | None, include: Sequence[str] | None, exclude: Sequence[str] | None,
    level: int | None, *, bits: float | None = None, bits_embed: float | None = None,
    embed_weight: float | None = None, k_overrides: dict[str, int] | None = None, bits_overrides: dict[str, float] | None = None,
    embeddings: bool | None = None, embed_importance: str | None = None,
) -> tuple[_Plan, PackSettings]:
    from .cluster import ClusterPolicy

    for what, pats in (("include", include), ("exclude", exclude)):
        if isinstance(pats, str):  # list("proj") would silently become four one-letter regexes
            raise UsageError(f"{what} must be a list of regexes, not one string ({pats!r})")
    if level is not None and not (isinstance(level, int) and -131072 <= level <= 22):
        raise UsageError(f"level must be a zstd level, an integer in -131072..22, got {level!r}")
    if k is not None and bits is not None:
        raise UsageError(f"give k or bits, not both (k={k!r}, bits={bits!r})")
    if k is None and bits is None and not k_overrides:
        bits = DEFAULT_BITS
    bits_mode = bits is not None
    if not bits_mode:
        for what, v in (("bits_embed", bits_embed), ("embed_weight", embed_weight), ("bits_overrides", bits_overrides)):
            if v:
                raise UsageError(f"{what} needs the bits encoder (give bits, not k)")
    elif k_overrides:
        raise UsageError("k_overrides needs the k-means encoder (give k, not bits)")
    if embeddings is None:
        embeddings = bits_mode
    if embed_importance is None:
        embed_importance = EMBED_IMPORTANCE
    elif embed_importance not in EMBED_IMPORTANCE_CHOICES:
        raise UsageError(f"embed_importance must be one of {', '.join(EMBED_IMPORTANCE_CHOICES)}, got {embed_importance!r}")
    elif embed_importance != "uniform" and not (bits_mode and embeddings):
        raise UsageError("embed_importance needs clustered embeddings and the bits encoder")
    kwargs: dict[str, Any] = {"embeddings": bool(embeddings)}
    if k is not None:
        kwargs["k"] = k
    if chunk_rows is not None:
        kwargs["chunk_rows"] = chunk_rows
    if include is not None:
        kwargs["include"] = include
    if exclude is not None:
        kwargs["exclude"] = exclude
    if k_overrides:
        kwargs["k_overrides"] = k_overrides
    if bits_mode:
        kwargs["bits"] = bits
        kwargs["bits_overrides"] = bits_overrides
    policy = ClusterPolicy(**kwargs)  # checks k, bits, chunk_rows and the regexes (UsageError)
    budgets = None
    if bits_mode:
        budgets = {"model": float(policy.bits)}
        if bits_embed is not None:
            from .cluster.policy import _check_bits

            budgets["embed"] = _check_bits(bits_embed, "bits_embed")
        if embed_weight is None:
            embed_weight = DEFAULT_EMBED_WEIGHT
        elif isinstance(embed_weight, bool) or not isinstance(embed_weight, (int, float)) or not 0 < embed_weight < math.inf:
            raise UsageError(f"embed_weight must be a positive number, got {embed_weight!r}")
    extra = {"storage_chunk_rows": str(DEFAULT_STORAGE_CHUNK_ROWS)}
    if embeddings:
        extra["embeddings"] = "clustered"
    fields: dict[str, Any] = {
        "k": policy.k,
        "chunk_rows": policy.chunk_rows,
        "include": list(include) if include else None,
        "exclude": list(exclude) if exclude else None,
        "level": level,
    }
    settings = PackSettings(
        **{n: v for n, v in fields.items() if v is not None}, method="ecsq" if bits_mode else "exact", extra=extra
    )
    plan = _Plan(policy, budgets, embed_weight=float(embed_weight or 1.0), embed_importance=embed_importance)
    return plan, settings


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
    from .io.sources import resolve_source

    t0 = time.perf_counter()
    src, dst = resolve_source(src), Path(dst)  # a Hub repository (hf://org/name) is downloaded first
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

