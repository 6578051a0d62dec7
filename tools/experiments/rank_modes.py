"""The rank experiments of "Only relative ranks matter in weight-clustered LLMs" on SmolLM2-135M.

    python tools/experiments/rank_modes.py                       # all three, ~15-25 min on 2 busy cores
    python tools/experiments/rank_modes.py --only table1 --tokens 2048

- ``table1``: one mid-layer MLP matrix (``--matrix``) clustered at K (one codebook), then each
  `wcfmt.transforms` mode applied to its centroids; perplexity with only that matrix replaced.
- ``depth``: the same modes on the same kind of matrix in an early, the middle and a late layer.
- ``progressive``: the first (or, with --reverse, the last) n blocks replaced (all 7 projection matrices of each), every table by a
  sorted Gaussian (rank kept, scale free), with and without ``affine-correct`` (each table's
  frequency-weighted mean and variance matched to the clustered table's).

Everything is in memory through the library (`cluster_tensor`, `transforms.transform_tensor`,
`ClusteredTensor.decode`): the weights measured are what a .wclust file with those tables would
rebuild to. Writes results/{table1,depth,progressive}.md and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: (label, chain, keyword arguments) for Table 1 and the depth study.
MODES: list[tuple[str, list[str], dict]] = [
    ("affine (a=1.1, b=0)", ["affine"], {"a": 1.1, "b": 0.0}),
    ("affine-correct", ["affine-correct"], {}),
    ("sorted-gaussian", ["sorted-gaussian"], {}),
    ("sorted-gaussian + affine-correct", ["sorted-gaussian", "affine-correct"], {}),
    ("monotone-freq", ["monotone-freq"], {}),
    ("power (p=0.5)", ["power"], {"p": 0.5}),
    ("power (p=0.9)", ["power"], {"p": 0.9}),
    ("tanh (scale=2)", ["tanh"], {"scale": 2.0}),
    ("sign-scramble", ["sign-scramble"], {}),
    ("rank-break", ["rank-break"], {}),
    ("gaussian", ["gaussian"], {}),
    ("permute", ["permute"], {}),
]
DEPTH_MODES = ("sorted-gaussian", "monotone-freq", "affine (a=1.1, b=0)", "sign-scramble", "gaussian", "permute")
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
RANK_PRESERVING = {"affine (a=1.1, b=0)", "affine-correct", "sorted-gaussian", "sorted-gaussian + affine-correct",
                   "monotone-freq", "power (p=0.5)", "power (p=0.9)", "tanh (scale=2)"}  # fmt: skip


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from safetensors.torch import load_file

        self.args = args
        self.model = common.dense_model(args.model)
        self.params = dict(self.model.named_parameters())
        self.bf16 = load_file(args.model / "model.safetensors")
        self.ids = common.shakespeare.eval_ids(common.tokenizer(args.model), args.tokens)
        self.base = self.ppl()
        print(f"bf16 perplexity {self.base:.4f}", flush=True)

    def ppl(self) -> float:
        return common.perplexity(self.model, self.ids, self.args.window)

    def clustered(self, name: str):
        from wcfmt.cluster import cluster_tensor

        return cluster_tensor(self.bf16[name], self.args.k, None, threads=self.args.threads)

    def put(self, name: str, w: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.params[name].copy_((self.bf16[name] if w is None else w).float())

    def modes_on(self, name: str, labels: list[str] | None = None) -> list[tuple[str, float, bool]]:
        from wcfmt.transforms import transform_tensor

        ct = self.clustered(name)
        rows = []
        self.put(name, ct.decode())
        rows.append(("clustered, untransformed", self.ppl(), False))
        print(name, rows[-1], flush=True)
        for label, chain, kw in MODES:
            if labels is not None and label not in labels:
                continue
            out, relabelled = transform_tensor(ct, chain, seed=self.args.seed, name=name, **kw)
            self.put(name, out.decode())
            rows.append((label, self.ppl(), relabelled))
            print(name, rows[-1], flush=True)
        self.put(name, None)
        return rows


def layer_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{proj}.weight"


def table1(b: Bench) -> None:
    name = b.args.matrix
    rows = b.modes_on(name)
    ref = rows[0][1]
    md = [
        f"# Table 1: centroid transforms on `{name}` (K={b.args.k}, one codebook)", "",
        common.stamp("python tools/experiments/rank_modes.py --only table1 " + _argline(b.args)), "",
        f"Only this matrix is replaced; perplexity on the first {len(b.ids)} tokens of "
        f"{', '.join(common.shakespeare.EVAL_PLAYS)}; bf16 perplexity {b.base:.4f}. Ratio: to the "
        "untransformed clustered matrix. Seed " + str(b.args.seed) + ".", "",
        common.md_table(["mode", "rank", "perplexity", "x clustered", "labels permuted"],
                        [[m, _kind(m), p, p / ref, "yes" if r else "no"] for m, p, r in rows]), "",
    ]  # fmt: skip
    preserving = [p / ref for m, p, _ in rows[1:] if m in RANK_PRESERVING]
    perm = next(p for m, p, _ in rows if m == "permute") / ref
    md += [f"- Rank-preserving modes: worst {max(preserving):.4f}x the untransformed perplexity "
           f"(target: within 1.05x): **{'reproduced' if max(preserving) <= 1.05 else 'NOT reproduced'}**.",
           f"- Full permutation: {perm:.2f}x (target: at least 2x): **{'reproduced' if perm >= 2 else 'NOT reproduced'}**.",
           ""]  # fmt: skip
    _write("table1", md)
    _bars("table1", [m for m, _, _ in rows], [p for _, p, _ in rows], ref, f"{name}, K={b.args.k}")


def depth(b: Bench) -> None:
    proj = b.args.matrix.split("layers.")[1].split(".", 1)[1].removesuffix(".weight")
    layers = [int(x) for x in b.args.depth_layers]
    results = {}
    for layer in layers:
        results[layer] = b.modes_on(layer_name(layer, proj), list(DEPTH_MODES))
    labels = [m for m, _, _ in results[layers[0]]]
    rows = [[m, _kind(m)] + [results[l][i][1] for l in layers] for i, m in enumerate(labels)]
    md = [
        f"# Depth study: centroid transforms on `{proj}` at layers {', '.join(map(str, layers))} (K={b.args.k})", "",
        common.stamp("python tools/experiments/rank_modes.py --only depth " + _argline(b.args)), "",
        f"One matrix replaced at a time; bf16 perplexity {b.base:.4f}; {len(b.ids)} eval tokens.", "",
        common.md_table(["mode", "rank"] + [f"layer {l}" for l in layers], rows), "",
    ]  # fmt: skip
    _write("depth", md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, m in enumerate(labels):
        ax.plot(layers, [results[l][i][1] for l in layers], marker="o", label=m)
    ax.axhline(b.base, color="k", ls=":", label="bf16")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{proj} replaced at one layer, K={b.args.k}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.RESULTS / "depth.png", dpi=110)


def progressive(b: Bench) -> None:
    from wcfmt.transforms import transform_tensor

    n_total = b.model.config.num_hidden_layers
    n_layers = min(n_total, b.args.progressive_max or 10**9)
    steps = list(range(b.args.progressive_step, n_layers + 1, b.args.progressive_step))
    if steps[-1] != n_layers:
        steps.append(n_layers)
    cts = {}
    curves = {}
    for label, chain in (("sorted-gaussian", ["sorted-gaussian"]),
                         ("sorted-gaussian + affine-correct", ["sorted-gaussian", "affine-correct"]),
                         ("clustered, untransformed", [])):
        done = 0
        curve = []
        for n in steps:
            for i in range(done, n):
                layer = n_total - 1 - i if b.args.reverse else i
                for proj in PROJ:
                    name = layer_name(layer, proj)
                    if name not in cts:
                        cts[name] = b.clustered(name)
                    ct = cts[name] if not chain else transform_tensor(cts[name], chain, seed=b.args.seed, name=name)[0]
                    b.put(name, ct.decode())
            done = n
            curve.append(b.ppl())
            print(label, n, f"{curve[-1]:.3f}", flush=True)
        curves[label] = curve
        for name in cts:
            b.put(name, None)
    def first_double(curve: list[float]) -> str:
        return next((str(n) for n, p in zip(steps, curve) if p >= 2 * b.base), f"> {steps[-1]}")

    md = [
        f"# Progressive replacement: the {'last' if b.args.reverse else 'first'} n blocks, all 7 projections each, "
        f"K={b.args.k}", "",
        common.stamp("python tools/experiments/rank_modes.py --only progressive " + _argline(b.args)), "",
        f"bf16 perplexity {b.base:.4f}; {len(b.ids)} eval tokens. Every table of a replaced block becomes a sorted "
        "Gaussian sample (ranks kept), optionally affine-corrected to the clustered table's frequency-weighted "
        "mean and variance.", "",
        common.md_table(["blocks replaced"] + list(curves), [[n] + [curves[c][i] for c in curves] for i, n in enumerate(steps)]),
        "",
        "Blocks replaced when perplexity first reaches 2x bf16 (n at the first such point): "
        + "; ".join(f"{c}: {first_double(v)}" for c, v in curves.items()) + ".", "",
    ]  # fmt: skip
    _write("progressive" + b.args.suffix, md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, v in curves.items():
        ax.plot(steps, v, marker="o", label=c)
    ax.axhline(2 * b.base, color="r", ls=":", label="2x bf16")
    ax.axhline(b.base, color="k", ls=":", label="bf16")
    ax.set_yscale("log")
    ax.set_xlabel(f"blocks replaced (from block {n_total - 1 if b.args.reverse else 0})")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"SmolLM2-135M, progressive replacement, K={b.args.k}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"progressive{b.args.suffix}.png", dpi=110)


def _kind(m: str) -> str:
    if m.startswith("clustered"):
        return "-"
    return "kept" if m in RANK_PRESERVING else "broken"


def _argline(a: argparse.Namespace) -> str:
    extra = f" --progressive-step {a.progressive_step}"
    if a.progressive_max:
        extra += f" --progressive-max {a.progressive_max}"
    if a.reverse:
        extra += " --reverse"
    if a.suffix:
        extra += f" --suffix={a.suffix}"
    return f"--k {a.k} --tokens {a.tokens} --seed {a.seed}{extra}"


def _write(stem: str, md: list[str]) -> None:
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"{stem}.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md), flush=True)


def _bars(stem: str, labels: list[str], values: list[float], ref: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["grey"] + ["tab:green" if m in RANK_PRESERVING else "tab:red" for m in labels[1:]]
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.axvline(ref, color="k", ls=":", label="clustered, untransformed")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log); green: rank kept, red: rank broken")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"{stem}.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=common.DEFAULT_MODEL)
    p.add_argument("--only", choices=("table1", "depth", "progressive"), action="append")
    p.add_argument("--matrix", default="model.layers.15.mlp.up_proj.weight")
    p.add_argument("--depth-layers", nargs="+", default=["1", "15", "28"])
    p.add_argument("--progressive-step", type=int, default=3)
    p.add_argument("--progressive-max", type=int, help="stop after this many blocks (default: all)")
    p.add_argument("--reverse", action="store_true", help="progressive: replace from the last block down")
    p.add_argument("--suffix", default="", help="appended to the output names (results/progressive<SUFFIX>.md)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    common.setup(args.threads)
    b = Bench(args)
    for what in args.only or ["table1", "depth", "progressive"]:
        {"table1": table1, "depth": depth, "progressive": progressive}[what](b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
