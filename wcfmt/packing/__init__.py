"""The pack pipeline: safetensors → ``.wclust``, as named stages; and `unpack`, its inverse.

``pack()`` is the list of its stages, each a module with explicit inputs and outputs:

1. options (`wcfmt.packing.options`): every option in one validated `PackOptions`;
2. source (`wcfmt.packing.source`): the file or folder (or Hub repository) and its checked headers;
3. plan (`wcfmt.packing.plan`): which tensors are clustered, by which encoder, and in bits mode
   the model-wide allocation of bits (one slope);
4. calibrate (`wcfmt.packing.calibrate`): when asked (or automatically), the model runs and each
   projection's input statistics are collected — beside the allocation, in a thread;
5. encode (`wcfmt.packing.encode`): each tensor clustered in worker processes;
6. write (`wcfmt.packing.write`): the ``.wclust`` files, index, copied files and card.

`unpack` (`wcfmt.packing.unpack`) goes back to safetensors. Note that ``wcfmt.pack`` is the
*function* (a promised name); import the stages as ``from wcfmt.packing.options import …``.

>>> import tempfile, os, torch, safetensors.torch, wcfmt
>>> d = tempfile.mkdtemp()
>>> safetensors.torch.save_file({"b": torch.ones(4)}, f"{d}/m.safetensors", metadata={"format": "pt"})
>>> r = wcfmt.pack(f"{d}/m.safetensors", f"{d}/m.wclust")
>>> u = wcfmt.unpack(f"{d}/m.wclust", f"{d}/back.safetensors")
>>> safetensors.torch.load_file(f"{d}/back.safetensors")["b"]
tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from ..dtypes import torch_dtype_of
from ..io.folder import check_output
from . import calibrate as _calibrate
from .encode import Clusterer, cluster_for_storage, release_free_memory
from .options import (
    DEFAULT_BITS,
    DEFAULT_BITS_CALIBRATED,
    DEFAULT_EMBED_WEIGHT,
    EMBED_IMPORTANCE,
    PackOptions,
)
from .plan import allocate_bits, make_plan
from .report import FileReport, PackReport, UnpackReport
from .source import open_source
from .unpack import unpack
from .write import write_pack

__all__ = [
    "pack",
    "unpack",
    "PackOptions",
    "PackReport",
    "UnpackReport",
    "FileReport",
    "cluster_for_storage",
    "torch_dtype_of",
    "DEFAULT_BITS",
    "DEFAULT_BITS_CALIBRATED",
    "DEFAULT_EMBED_WEIGHT",
    "EMBED_IMPORTANCE",
]


def pack(src: str | Path, dst: str | Path, options: PackOptions | None = None, **fields: Any) -> PackReport:
    """Pack a ``.safetensors`` file into a ``.wclust`` file, or a Hugging Face folder (local or a
    Hub repository, ``hf://org/name[@rev]``) into a folder of ``.wclust`` shards.

    ``options`` (a `PackOptions`) and keyword ``fields`` (the same names, on top of ``options``:
    ``bits=``, ``k=``, ``calib=``, ``chunk_rows=``, ``include=``, …; see `PackOptions` for every
    one and its default) say how. With neither ``k`` nor ``bits`` the bits encoder runs at
    `DEFAULT_BITS_CALIBRATED` when the pack is calibrated (for a causal-LM folder ``calib``
    defaults to ``"random"`` wherever the model can run) and at `DEFAULT_BITS` otherwise.
    ``options=PackOptions.from_file(PACKED)`` packs exactly as ``PACKED`` was packed.

    Clustered tensors whose recorded SQNR is below `wcfmt.inspect.DEGENERATE_SQNR_DB` are listed
    in the report's ``degenerate`` and warned about (`DegenerateQualityWarning`); a budget the
    encoder could not spend (``bits`` above what ≤ 256 values per codebook store) is warned about
    and recorded (``bits_cap``), the bits achieved beside the bits asked for.
    """
    opts = options.updated(**fields) if options is not None and fields else (options or PackOptions(**fields))
    if opts.budget_ppl is not None:
        return _pack_with_budget(src, dst, opts)
    t0 = time.perf_counter()
    source = open_source(src, token=opts.token)
    dst = Path(dst)
    calibration = _calibrate.choose(source, opts)
    opts = _resolved(opts, calibration)
    plan = make_plan(opts)
    plan.add_settings({"options": opts.recorded_json()})
    check_output(source.path, dst, force=opts.force, want_dir=source.is_dir)
    source.read_headers()  # every header checked before anything is written
    stages: dict[str, float] = {"plan": time.perf_counter() - t0}
    # The encoder's workers are forked first, while this process is small and has no thread of
    # its own: forked later, each would map what calibration and allocation left resident.
    with Clusterer(opts.threads, source.file_bytes) as clusterer:
        _calibrate.run_beside(plan, source, calibration, opts.progress,
                              lambda: allocate_bits(plan, source.files, opts.progress), stages)
        release_free_memory()
        t1 = time.perf_counter()
        report = write_pack(source, dst, plan, level=opts.level, threads=opts.threads, force=opts.force,
                            progress=opts.progress, clusterer=clusterer, card=_card(opts, source, dst))
        stages["encode+write"] = time.perf_counter() - t1
    report.stages, report.capped = stages, dict(plan.capped)
    report.seconds = time.perf_counter() - t0
    for why in report.capped.values():
        warnings.warn(f"{report.dst}: {why}", stacklevel=2)
    _warn_degenerate(report)
    if opts.push_to_hub:
        from ..io.hub import push_to_hub

        t2 = time.perf_counter()
        report.pushed = push_to_hub(dst, opts.push_to_hub, token=opts.token)
        report.stages["push"] = time.perf_counter() - t2
    return report


def _resolved(opts: PackOptions, calibration: _calibrate.Calibration) -> PackOptions:
    """``opts`` with every default that decides the bytes made explicit, as recorded in the
    header: packing with them again (`PackOptions.from_file`) gives the same bytes, whatever
    the automatic choices would decide on another day or machine."""
    if opts.k_mode:
        return opts.updated(embeddings=bool(opts.embeddings))
    calibrated = calibration.runs
    return opts.updated(
        bits=opts.bits if opts.bits is not None else (DEFAULT_BITS_CALIBRATED if calibrated else DEFAULT_BITS),
        embeddings=True if opts.embeddings is None else opts.embeddings,
        embed_weight=opts.embed_weight if opts.embed_weight is not None else DEFAULT_EMBED_WEIGHT,
        embed_importance=opts.embed_importance or EMBED_IMPORTANCE,
        calib=calibration.what if calibrated else "none",
        calib_tokens=calibration.tokens,
    )


def _card(opts: PackOptions, source: Any, dst: Path) -> Any:
    from ..io.card import CardOptions

    return CardOptions(base_model=opts.base_model or source.hub_id, quality_note=opts.quality_note,
                       remote_code=opts.remote_code,
                       repo_id=opts.push_to_hub or dst.name)  # the card names the final folder, not the temporary one


def _warn_degenerate(report: PackReport) -> None:
    from ..inspect import DEGENERATE_SQNR_DB, DegenerateQualityWarning, calibrated, degenerate_tensors, info

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


def _pack_with_budget(src: str | Path, dst: str | Path, opts: PackOptions) -> PackReport:
    """``budget_ppl``: per-matrix K from measured sensitivity (`wcfmt.sensitivity.pack_with_budget`)."""
    from ..method.sensitivity import pack_with_budget

    cache: Any = None
    if opts.cache_dir is not None:
        cache = Path(opts.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)  # a folder: the cache file inside is named by its key
    skip = {"budget_ppl", "text", "budget_k", "tokens", "window", "cache_dir", "force", "progress"}
    rest = {n: v for n, v in opts.model_dump().items() if n not in skip and v not in (None, False)}
    report, chosen, _ = pack_with_budget(src, dst, budget_ppl=opts.budget_ppl, text=opts.text, ks=opts.budget_k,
                                         tokens=opts.tokens, window=opts.window, cache=cache, force=opts.force,
                                         progress=opts.progress, **rest)  # fmt: skip
    report.chosen_k = chosen
    return report
