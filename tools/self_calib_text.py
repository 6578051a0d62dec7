"""Calibration text without user text: sample it from the model itself, for ``wcfmt pack --calib``.

    python tools/self_calib_text.py --model /tmp/wc/smollm2-bf16 -o selfgen.txt
    wcfmt pack /tmp/wc/smollm2-bf16 -o packed --bits 5.43 --calib selfgen.txt
    wcfmt pack /tmp/wc/smollm2-bf16 -o packed --bits 5.43 --calib self     # the same, in one step

Sequences start from the tokenizer's BOS token and are sampled at temperature 1 (no top-k/top-p)
with a fixed seed; the texts are joined by blank lines. On SmolLM2-135M-Instruct, 8 × 560 tokens
(52 s on 2 cores) as the calibration text of ``--bits 5.43`` gave 0.986× bf16 perplexity on the
held-out plays with the files at 0.338 of bf16 (mean of three budgets ±0.03; without calibration
1.050×): tools/RESULTS-smollm2.md, notes. Sampling runs in float32 on the CPU; other machines or
thread counts may sample other tokens, so keep the file if you want to repeat a pack.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wcfmt.cluster.calibrate import SELF_SEED, SELF_SEQUENCES, SELF_TOKENS, sample_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="Hugging Face causal LM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="text file to write")
    p.add_argument("--sequences", type=int, default=SELF_SEQUENCES,
                   help=f"sequences sampled in one batch (default {SELF_SEQUENCES})")
    p.add_argument("--tokens", type=int, default=SELF_TOKENS, help=f"tokens per sequence (default {SELF_TOKENS})")
    p.add_argument("--seed", type=int, default=SELF_SEED, help=f"torch seed (default {SELF_SEED})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    text = sample_text(args.model, args.sequences, args.tokens, args.seed)
    args.output.write_text(text, encoding="utf-8")
    print(f"{args.output}: {args.sequences} x {args.tokens} tokens, {len(text):,} characters, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
