"""Centroid healing on SmolLM2-135M-Instruct: how much of the K=32 perplexity gap it recovers.

    python tools/experiments/heal_smollm2.py --steps 80 --seq-len 256 --batch 2

1. ``wcfmt pack --k 32`` (one 32-entry codebook per matrix) of the bf16 folder, unless --packed.
2. ``wcfmt heal`` on the calibration plays (macbeth, the-tempest, julius-caesar), timed.
3. Perplexity of bf16, K=32 and healed on the first --eval-tokens of the eval plays (hamlet, ...),
   which healing never sees. Recovery = (ppl_K32 - ppl_healed) / (ppl_K32 - ppl_bf16).
Writes results/heal.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=common.DEFAULT_MODEL)
    p.add_argument("--packed", type=Path, help="an existing K=32 packed folder (default: pack one)")
    p.add_argument("--work", type=Path, help="work folder (default: a temp dir)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--train-tokens", type=int, default=60000, help="calibration tokens written to the text file")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    common.setup(args.threads)
    import wcfmt

    work = args.work or Path(tempfile.mkdtemp(prefix="wcfmt-heal-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = common.tokenizer(args.model)
    eval_ids = common.shakespeare.eval_ids(tok, args.eval_tokens)
    train_ids = common.shakespeare.calibration_ids(tok, args.train_tokens)
    text = work / "train.txt"
    text.write_text(tok.decode(train_ids), encoding="utf-8")

    packed = args.packed
    if packed is None:
        packed = work / f"k{args.k}"
        if packed.exists():
            shutil.rmtree(packed)
        wcfmt.pack(args.model, packed, k=args.k)
    healed = work / f"k{args.k}-healed"
    with common.Timer() as t:
        rep = wcfmt.heal(packed, healed, text, steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                         batch=args.batch, force=True, progress=True)
    print(rep.summary(), flush=True)
    from wcfmt.inspect import verify

    verify(healed)

    ppl = {}
    for label, load in (("bf16", lambda: common.dense_model(args.model)),
                        (f"K={args.k}", lambda: common.packed_model(packed)),
                        (f"K={args.k} healed", lambda: common.packed_model(healed))):
        ppl[label] = common.perplexity(load(), eval_ids)
        print(label, f"{ppl[label]:.4f}", flush=True)
    base, k_ppl, h_ppl = ppl["bf16"], ppl[f"K={args.k}"], ppl[f"K={args.k} healed"]
    recovery = (k_ppl - h_ppl) / (k_ppl - base)
    labels_same = all(
        a == b for a, b in zip(_labels(packed), _labels(healed), strict=True)
    )
    cmd = "python tools/experiments/heal_smollm2.py " + " ".join(argv)
    md = [
        "# Centroid healing, SmolLM2-135M-Instruct, K=%d (one codebook per matrix)" % args.k, "",
        common.stamp(cmd), "",
        f"- Healing text: {len(train_ids)} tokens of {', '.join(common.shakespeare.CALIBRATION_PLAYS)};"
        f" {rep.steps} Adam steps of {args.batch} x {args.seq_len} tokens, lr {args.lr} (relative to each codebook's std).",
        f"- Held-out perplexity: first {len(eval_ids)} tokens of {', '.join(common.shakespeare.EVAL_PLAYS)}, windows of 512, fp32 compute.",
        f"- `wcfmt heal` wall time: **{t.seconds:.0f} s** ({t.seconds / 60:.1f} min, load and write included); "
        f"train loss {rep.first_loss:.4f} -> {rep.last_loss:.4f}; {rep.projected} table projection(s).",
        f"- Labels byte-identical to the unhealed file: **{labels_same}**; `wcfmt verify` passes.", "",
        common.md_table(["model", "perplexity", "x bf16"], [[k, v, v / base] for k, v in ppl.items()]), "",
        f"Recovered **{100 * recovery:.1f}%** of the perplexity gap to bf16 "
        f"({k_ppl:.3f} -> {h_ppl:.3f}, bf16 {base:.3f}).", "",
    ]
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "heal.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))
    return 0


def _labels(folder: Path) -> list[bytes]:
    import wcfmt
    from wcfmt.schema import ClusteredEntry

    out = []
    with wcfmt.safe_open(folder / "model.wclust") as f:
        for name, e in f.header.tensors.items():
            if isinstance(e, ClusteredEntry):
                out += [bytes(f.reader._stored(c.labels)) for c in e.chunks]
    return out


if __name__ == "__main__":
    sys.exit(main())
