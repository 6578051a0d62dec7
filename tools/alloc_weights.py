"""Experimental data-free importance weights ω for pack's one-slope bit allocation (Llama-style names).

``tools/eval_smollm2.py --alloc-weights SCHEME`` multiplies ``TensorRate.weight`` by ω(name) for every
tensor `wcfmt.cluster.allocate.allocate` sees (one λ, each tensor's squared error counted ω times:
its cells ``1/√ω`` as wide). Schemes (the first three from the weights alone, no text):

- ``gamma``: q/k/v by the mean γ² of the block's ``input_layernorm``, gate/up by that of its
  ``post_attention_layernorm`` (each kind normalised to mean 1 over the layers); o/down 1.
- ``gauss[:P]``: a Gaussian propagation of second moments through the block (normalised inputs of unit
  variance; attention output ≈ v; gate and up independent): ω = E[input²] × the gain from the
  tensor's output error to the residual stream ÷ the residual's mean square there (to the power P).
- ``kind:QK,VO,GU,D``: q/k, v/o, gate/up, down weighted by the four numbers.
- ``layers:F``: the first and the last block ×F.
- ``embed:W``: the token embedding / LM head ×W (otherwise it stays at 1).
Schemes join with ``+`` (weights multiply).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch

_NAME = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$")


def _silu_moments(var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[silu(g)²] and E[silu'(g)²] for g ~ N(0, var), by Gauss–Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    g = np.sqrt(var)[:, None] * x[None, :]
    sig = 1.0 / (1.0 + np.exp(-g))
    s = g * sig
    ds = sig * (1.0 + g * (1.0 - sig))
    return (s * s) @ w, (ds * ds) @ w


def gauss_weights(state: dict[str, torch.Tensor], power: float = 1.0) -> dict[str, float]:
    """ω_t = (mean square error reaching the residual stream per unit weight MSE of t, per weight)
    ÷ (the residual's mean square there), second moments propagated as Gaussians from unit-variance
    normalised inputs (attention output ≈ v; gate, up independent; q/k counted as v)."""
    f = {k: v.float().numpy().astype(np.float64) for k, v in state.items()}
    n_layers = 1 + max(int(m.group(1)) for k in f if (m := _NAME.search(k)))
    emb = f["model.embed_tokens.weight"]
    r2 = float((emb * emb).mean())  # residual mean square after the embedding (uniform tokens)
    out: dict[str, float] = {}
    for l in range(n_layers):
        p = f"model.layers.{l}."
        g_in = f[p + "input_layernorm.weight"] ** 2
        q, k, v, o = (f[p + f"self_attn.{x}_proj.weight"] for x in "qkvo")
        d = o.shape[0]
        var_v = (v * v) @ g_in  # per v channel
        head = 64  # GQA: o reads n_heads heads; head h reads kv head h // (n_heads / n_kv)
        kvh, nh = v.shape[0] // head, o.shape[1] // head
        var_attn = np.concatenate([var_v[(h // (nh // kvh)) * head:(h // (nh // kvh) + 1) * head] for h in range(nh)])
        x_in = float(g_in.mean())
        w_v = float((o * o).sum()) * x_in / (d * v.shape[0]) / r2
        for x in "qkv":
            out[p + f"self_attn.{x}_proj.weight"] = w_v
        out[p + "self_attn.o_proj.weight"] = float(var_attn.mean()) / o.shape[1] / r2
        r2 += float(((o * o) @ var_attn).mean())
        g_post = f[p + "post_attention_layernorm.weight"] ** 2
        gate, up, down = (f[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
        var_g = (gate * gate) @ g_post
        var_u = (up * up) @ g_post
        s2, ds2 = _silu_moments(var_g)
        h2 = s2 * var_u
        down_col = (down * down).sum(axis=0)
        x_post = float(g_post.mean())
        inner = down.shape[1]
        out[p + "mlp.up_proj.weight"] = x_post * float((s2 * down_col).sum()) / (d * inner) / r2
        out[p + "mlp.gate_proj.weight"] = x_post * float((ds2 * var_u * down_col).sum()) / (d * inner) / r2
        out[p + "mlp.down_proj.weight"] = float(h2.mean()) / inner / r2
        r2 += float(((down * down) @ h2).mean())
    geo = math.exp(np.mean([math.log(w) for w in out.values()]))
    return {k: (w / geo) ** power for k, w in out.items()}


def gamma_weights(state: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    layers = sorted({int(m.group(1)) for k in state if (m := _NAME.search(k))})
    for norm, kinds in (("input_layernorm", ("self_attn.q", "self_attn.k", "self_attn.v")),
                        ("post_attention_layernorm", ("mlp.gate", "mlp.up"))):
        g2 = {l: float((state[f"model.layers.{l}.{norm}.weight"].float() ** 2).mean()) for l in layers}
        mean = sum(g2.values()) / len(g2)
        for l in layers:
            for kind in kinds:
                out[f"model.layers.{l}.{kind}_proj.weight"] = g2[l] / mean
    return out


def kind_weights(spec: str) -> Callable[[str], float]:
    qk, vo, gu, dn = (float(x) for x in spec.split(","))
    table = {"q": qk, "k": qk, "v": vo, "o": vo, "gate": gu, "up": gu, "down": dn}
    return lambda name: table[m.group(3)] if (m := _NAME.search(name)) else 1.0


def layer_weights(spec: str, n_layers: int) -> Callable[[str], float]:
    f = float(spec)
    return lambda name: f if (m := _NAME.search(name)) and int(m.group(1)) in (0, n_layers - 1) else 1.0


def weights_for(scheme: str, state: dict[str, torch.Tensor]) -> Callable[[str], float]:
    parts: list[Callable[[str], float]] = []
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := _NAME.search(k)))
    for part in scheme.split("+"):
        name, _, arg = part.partition(":")
        if name == "gamma":
            w = gamma_weights(state)
            parts.append(lambda n, w=w: w.get(n, 1.0))
        elif name == "gauss":
            w = gauss_weights(state, float(arg or 1.0))
            parts.append(lambda n, w=w: w.get(n, 1.0))
        elif name == "kind":
            parts.append(kind_weights(arg))
        elif name == "embed":
            parts.append(lambda n, f=float(arg): f if "embed_tokens" in n or "lm_head" in n else 1.0)
        elif name == "layers":
            parts.append(layer_weights(arg, n_layers))
        else:
            raise ValueError(f"unknown scheme {part!r}")
    return lambda n: math.prod(p(n) for p in parts)


def install(scheme: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Wrap `wcfmt.cluster.allocate.allocate` so that every tensor gets ω(name); returns ω of the
    state's tensors (for printing)."""
    import wcfmt.cluster.allocate as A

    omega = weights_for(scheme, state)
    real = getattr(A.allocate, "__wrapped__", A.allocate)

    def allocate(tensors, budgets):
        for name, t in tensors.items():
            t.weight *= omega(name)
        return real(tensors, budgets)

    allocate.__wrapped__ = real
    A.allocate = allocate
    return {k: omega(k) for k in state if _NAME.search(k)}
