"""The calibrate stage: whether the model runs, and the statistics its layers' inputs give.

`choose` decides what runs: the user's ``calib`` (a text file, ``"self"``, ``"random"``,
``"none"``) or, in bits mode when none is given, ``"random"`` wherever it can run
(`auto_calibration_blocker` says why not). `collect` runs the model
(`wcfmt.cluster.calibrate`) for each clustered projection's input statistics — E[x²] per
column (random tokens) or H = E[x xᵀ] (a text: GPTQ) — into ``plan.hessians``, and returns the
header settings that describe what ran. `run_beside` runs it in a thread while the allocation
reads histograms: the two are independent.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from .encode import CALIB_REFIT
from .options import PackOptions
from .plan import Plan
from .source import Source

__all__ = ["Calibration", "choose", "collect", "run_beside", "auto_calibration_blocker", "available_memory"]

#: Architectures `pack` calibrates automatically (transformers' naming of causal LMs).
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class Calibration:
    """What the calibrate stage runs: ``what`` is None (nothing), ``"random"``, ``"self"`` or a
    text file; ``auto``: chosen by pack, not the user (a model that fails to run is then a
    warning); ``skipped``: why the automatic choice did not calibrate (recorded in the header)."""

    what: str | Path | None
    tokens: int | None = None
    auto: bool = False
    skipped: str | None = None
    #: `wcfmt.cluster.layerwise.LAYERWISE` when the automatic choice was made for one block's
    #: memory and the whole model would not fit (then only the block-by-block pass may run);
    #: None: the collection functions choose.
    path: str | None = None

    @property
    def runs(self) -> bool:
        return self.what is not None


def choose(source: Source, options: PackOptions) -> Calibration:
    """``options.calib`` as it will run. ``None`` in bits mode means ``"random"`` wherever it can
    run (`auto_calibration_blocker`): a Hugging Face causal-LM folder, transformers installed, the
    pass within half the memory available (one decoder block at a time, plus the embedding, head
    and activations: `wcfmt.cluster.layerwise.calibration_need`). ``"none"``: no calibration. A text file must exist."""
    from ..cluster.calibrate import DEFAULT_CALIB_TOKENS, NO_CALIB, RANDOM_CALIB, SELF_CALIB

    calib = options.calib
    if calib == NO_CALIB:
        return Calibration(None)
    if calib is None:
        if options.k_mode:
            return Calibration(None)
        reason, path = _auto_choice(source.path)
        if reason is not None:
            return Calibration(None, skipped=reason)
        return Calibration(RANDOM_CALIB, auto=True, path=path)
    if calib == RANDOM_CALIB:
        _refuse_if_too_big(source.path, RANDOM_CALIB)
        return Calibration(RANDOM_CALIB)
    tokens = options.calib_tokens if options.calib_tokens is not None else DEFAULT_CALIB_TOKENS
    if calib == SELF_CALIB:
        _refuse_if_too_big(source.path, SELF_CALIB)
        return Calibration(SELF_CALIB, tokens)
    text = Path(calib)
    if not text.is_file():
        raise UsageError(f"calib {text}: no such text file ('self': text sampled from the model; "
                         f"'random': random tokens)")
    _refuse_if_too_big(source.path, str(text))
    return Calibration(text, tokens)


def _refuse_if_too_big(src: Path, what: str) -> None:
    """Raise `UsageError` before anything runs when the calibration the user asked for would need
    more memory than is available (estimated from config.json and the safetensors headers, as for
    the automatic choice): a text needs every projection's full in × in statistics (float64, kept
    to the end) and runs the model in float32; ``self`` also samples with the whole model. Nothing
    is said where the estimate cannot be made (not a model folder, no MemAvailable)."""
    from ..cluster.calibrate import RANDOM_CALIB, RANDOM_SEQUENCES, RANDOM_TOKENS, SELF_CALIB, TEXT_BATCH, TEXT_WINDOW
    from ..cluster.layerwise import calibration_need

    have = available_memory()
    if have is None or not src.is_dir() or not (src / "config.json").is_file():
        return
    try:
        cheap = need = calibration_need(src, sequences=RANDOM_SEQUENCES, tokens=RANDOM_TOKENS).least
        if what != RANDOM_CALIB:
            full = calibration_need(src, sequences=TEXT_BATCH, tokens=TEXT_WINDOW, diagonal=False, run_itemsize=4)
            need = full.whole_model if what == SELF_CALIB else full.least
    except UsageError:
        return
    if need <= have:
        return
    also = "" if what == RANDOM_CALIB else f"; --calib random (per-column statistics) needs about {cheap / 2**30:.1f} GiB"
    raise UsageError(f"calib {what}: calibrating {src.name} needs about {need / 2**30:.1f} GiB of memory and "
                     f"{have / 2**30:.1f} GiB is available{also}; --calib none packs without")


def auto_calibration_blocker(src: Path) -> str | None:
    """Why ``calib="random"`` cannot run on ``src`` unasked, or None when it can."""
    return _auto_choice(src)[0]


def _auto_choice(src: Path) -> tuple[str | None, str | None]:
    """``(why calib="random" cannot run unasked or None, the path it must take or None)``: the
    path is `LAYERWISE` when only one block at a time fits in half the available memory."""
    config_file = src / "config.json"
    if not src.is_dir() or not config_file.is_file():
        return "not a Hugging Face model folder", None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"config.json is unreadable ({e})", None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not any(isinstance(a, str) and a.endswith(_CAUSAL_LM_SUFFIXES) for a in archs):
        return "not a causal LM (config.json architectures: " + ", ".join(map(str, archs or ["none"])) + ")", None
    if config.get("auto_map"):
        return "the model needs its own code (auto_map)", None
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)", None
    have = available_memory()
    if have is None:
        return None, None
    from ..cluster.calibrate import RANDOM_SEQUENCES, RANDOM_TOKENS
    from ..cluster.layerwise import LAYERWISE, calibration_need

    # From config.json and the safetensors headers alone: one decoder block at a time where the
    # checkpoint's names show a stack of blocks, else the whole model.
    try:
        need = calibration_need(src, sequences=RANDOM_SEQUENCES, tokens=RANDOM_TOKENS)
    except UsageError:
        whole, block = Source(src).file_bytes, None
    else:
        whole, block = need.whole_model, need.layerwise
    if whole <= have // 2:
        return None, None
    if block is not None and block < whole and block <= have // 2:
        return None, LAYERWISE
    need_bytes, how = (block, "one block at a time") if block is not None and block < whole else (whole, "the whole model")
    return f"calibration needs {need_bytes / 2**30:.1f} GiB ({how}); {have / 2**30:.1f} GiB of memory is available", None


def available_memory() -> int | None:
    """Linux's MemAvailable in bytes, or None where it is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def collect(plan: Plan, source: Source, calibration: Calibration, progress: bool) -> dict[str, str]:
    """Run the model for the calibration statistics (into ``plan.hessians``); return the header
    settings that describe them."""
    from ..cluster.calibrate import (
        RANDOM_CALIB, RANDOM_SEED, SELF_CALIB, SELF_SEED, SELF_SEQUENCES, SELF_TOKENS, collect_random_statistics,
        collect_text_statistics, sample_text,
    )  # fmt: skip

    folder, what, tokens = source.path, calibration.what, calibration.tokens
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: calib needs a Hugging Face model folder (config.json and weights)")
    wanted = plan.clustered_projections(source.files)
    refit = "+refit" if CALIB_REFIT else ""
    if what == RANDOM_CALIB:
        # The pass runs block by block where the model allows it; an automatic choice made for a
        # block's memory (`Calibration.path`) must not fall back to loading the whole model.
        stats = collect_random_statistics(folder, names=wanted, progress=progress, path=calibration.path)
        plan.hessians, (rows, row) = stats.moments, stats.windows
        if not plan.hessians:  # e.g. GPT-2's Conv1D projections: no nn.Linear to hook
            return {"calib": "none", "calib_skipped": "no clustered projection is an nn.Linear to weigh"}
        return {"calib": "diagonal" + refit, "calib_text": f"random ({rows}x{row} tokens, seed {RANDOM_SEED})",
                "calib_path": stats.path}
    assert tokens is not None
    if what == SELF_CALIB:
        text = sample_text(folder)
        text_name = f"self ({SELF_SEQUENCES}x{SELF_TOKENS} sampled tokens, seed {SELF_SEED})"
    else:
        assert isinstance(what, Path)
        text_name = what.name
        try:
            text = what.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"calib {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stats = collect_text_statistics(folder, text, tokens, names=wanted, progress=progress)
    plan.hessians = stats.moments
    return {"calib": "gptq" + refit, "calib_text": text_name, "calib_tokens": str(tokens), "calib_path": stats.path}


def run_beside(plan: Plan, source: Source, calibration: Calibration, progress: bool,
               other: Callable[[], None], seconds: dict[str, float]) -> None:
    """Run `collect` and ``other`` (the allocation) at once and record what calibration did in
    the plan's settings. Calibration (transformers' import, the model's load and its forward
    passes, much of it outside the GIL) runs in a thread; ``other`` in the caller's.

    A failure of an automatic calibration (the user did not ask for it) is a warning and the
    pack goes on without; any other failure is raised in the caller's thread. ``seconds`` gets
    each one's wall time (``calibrate``, ``allocate``)."""
    if not calibration.runs:
        if calibration.skipped:
            plan.add_settings({"calib": "none", "calib_skipped": calibration.skipped})
        _timed(other, seconds, "allocate")
        return
    found: list[Any] = []
    failed = False

    def work() -> None:
        nonlocal failed
        try:
            found.append(_timed(lambda: collect(plan, source, calibration, progress), seconds, "calibrate"))
        except Exception as e:
            if not calibration.auto:
                found.append(e)  # re-raised in the caller's thread below
                return
            # pack chose to calibrate, not the user: go on without, and say why (below)
            plan.hessians = {}
            found.append({"calib": "none", "calib_skipped": f"the model did not run ({e})"})
            failed = True
        except BaseException as e:  # KeyboardInterrupt: re-raised below
            found.append(e)

    # A daemon thread, not an executor: if the allocation fails, its error is raised at once
    # and the process may exit without waiting for the model to finish.
    worker = threading.Thread(target=work, name="wcfmt-calibrate", daemon=True)
    worker.start()
    _timed(other, seconds, "allocate")
    worker.join()
    if isinstance(found[0], BaseException):
        raise found[0]
    calibrated: dict[str, str] = found[0]
    # The user asked and got nothing, or the automatic choice failed to run the model: say so.
    # (An automatic pass that found nothing to weigh is only recorded.)
    if "calib_skipped" in calibrated and (not calibration.auto or failed):
        warnings.warn(f"{source.path}: packed without column weights: {calibrated['calib_skipped']}", stacklevel=4)
    plan.add_settings(calibrated)


def _timed(fn: Callable[[], Any], seconds: dict[str, float], name: str) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        seconds[name] = time.perf_counter() - t0
