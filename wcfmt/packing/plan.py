"""The plan stage: which tensors are clustered, by which encoder, at what budget.

`make_plan` turns `PackOptions` into a `Plan`: the cluster policy (`wcfmt.cluster.ClusterPolicy`:
the default projection set, ``include``/``exclude``, embeddings) and, in bits mode, the budget
groups. `allocate_bits` then reads every clustered tensor's value histogram and gives each a
step at one model-wide slope (`wcfmt.cluster.allocate`), recording the budget asked for and the
bits that step achieves (less where the 256-value cap binds). `Plan.decide` is the per-tensor
answer the encode stage takes (`wcfmt.packing.encode.Spec`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..constants import DEFAULT_STORAGE_CHUNK_ROWS
from ..dtypes import to_numpy
from ..errors import UsageError, WclustError, where
from ..io.safetensors_io import SafetensorsSource, TensorInfo
from ..progress import bar
from ..schema import PackSettings
from .encode import Spec
from .options import DEFAULT_BITS, DEFAULT_EMBED_WEIGHT, EMBED_IMPORTANCE, PackOptions

__all__ = ["Plan", "make_plan", "allocate_bits", "is_output_head", "CAP_TOLERANCE"]

#: The allocation meets a budget from below within the bisection's precision; a group whose
#: modelled bits fall short of its budget by more than this fraction hit a cap (≤ 256 values
#: per codebook, or every distinct value its own centroid): `pack` warns, `info` says so.
CAP_TOLERANCE = 0.02


class Plan:
    """The per-tensor decisions of one pack: the cluster policy plus, in bits mode, the steps of
    the model-wide allocation (`allocate_bits`) and, with calibration, each layer's statistics."""

    def __init__(self, policy: Any, budgets: dict[str, float] | None, settings: PackSettings, *,
                 embed_weight: float = 1.0, embed_importance: str = "uniform") -> None:
        self.policy = policy
        self.budgets = budgets
        #: the header's settings, completed by the stages (allocation, calibration)
        self.settings = settings
        #: allocation weight of output heads (`is_output_head`) that share the model's slope
        self.embed_weight = embed_weight
        self.embed_importance = embed_importance
        self.row_weights: dict[str, Any] = {}  # tensor name -> per-row importance (token frequencies)
        self.steps: dict[str, float] = {}
        self.hessians: dict[str, Any] = {}
        #: budget groups whose budget the allocation could not reach: group -> why
        self.capped: dict[str, str] = {}

    @property
    def bits_mode(self) -> bool:
        return self.budgets is not None

    def add_settings(self, extra: dict[str, str]) -> None:
        self.settings = self.settings.model_copy(update={"extra": {**self.settings.extra, **extra}})

    def clustered_projections(self, files: Sequence[tuple[Path, dict[str, TensorInfo]]]) -> set[str]:
        """The clustered 2-D tensors that are not embeddings: the layers calibration weighs."""
        return {info.name for _, h in files for info in h.values()
                if self.policy.clusters(info.name, tuple(info.shape), info.dtype) and len(info.shape) == 2
                and self.policy.group(info.name) != "embed"}  # fmt: skip

    def decide(self, name: str, shape: Sequence[int], dtype: str) -> Spec | None:
        if not self.policy.clusters(name, shape, dtype):
            return None
        h = self.hessians.get(name)
        if self.budgets is None:
            k, rows = self.policy.decide(name, shape, dtype)
            return Spec(k, None, rows, h)
        w = self.row_weights.get(name)
        if w is not None:
            return Spec(None, self.steps[name], DEFAULT_STORAGE_CHUNK_ROWS, h, w)
        return Spec(None, self.steps[name], self.policy.chunk_rows, h)


def make_plan(options: PackOptions) -> Plan:
    """The policy and base settings of ``options`` (validated; `wcfmt.pack` first resolves the
    defaults that depend on calibration)."""
    from ..cluster import ClusterPolicy

    o = options
    bits_mode = not o.k_mode
    embeddings = bits_mode if o.embeddings is None else o.embeddings
    kwargs: dict[str, Any] = {"embeddings": bool(embeddings)}
    kwargs.update({n: getattr(o, n) for n in ("k", "chunk_rows", "include", "exclude", "k_overrides")
                   if getattr(o, n) is not None})
    if bits_mode:
        kwargs["bits"] = o.bits if o.bits is not None else DEFAULT_BITS
        kwargs["bits_overrides"] = o.bits_overrides
    policy = ClusterPolicy(**kwargs)
    budgets = None
    if bits_mode:
        budgets = {"model": float(policy.bits)}
        if o.bits_embed is not None:
            budgets["embed"] = float(o.bits_embed)
    extra = {"storage_chunk_rows": str(DEFAULT_STORAGE_CHUNK_ROWS)}
    if embeddings:
        extra["embeddings"] = "clustered"
    fields: dict[str, Any] = {
        "k": policy.k,
        "chunk_rows": policy.chunk_rows,
        "include": list(o.include) if o.include else None,
        "exclude": list(o.exclude) if o.exclude else None,
        "level": o.level,
    }
    settings = PackSettings(
        **{n: v for n, v in fields.items() if v is not None}, method="ecsq" if bits_mode else "exact", extra=extra
    )
    embed_weight = (o.embed_weight if o.embed_weight is not None else DEFAULT_EMBED_WEIGHT) if bits_mode else 1.0
    return Plan(policy, budgets, settings, embed_weight=float(embed_weight),
                embed_importance=o.embed_importance or EMBED_IMPORTANCE)


def allocate_bits(plan: Plan, files: Sequence[tuple[Path, dict[str, TensorInfo]]], progress: bool) -> None:
    """Bits mode: the model-wide allocation (one slope per budget group) over the source files
    and their checked headers: steps per tensor in ``plan.steps``; budget, achieved bits, λ and
    step per group in the settings."""
    if plan.budgets is None:
        return
    from ..cluster import table_entry_bits
    from ..cluster.allocate import TensorRate, allocate, coarse_histogram
    from ..cluster.kmeans import value_histogram
    from ..cluster.token_weights import token_row_weights
    from ..schema import chunk_row_ranges, rows_and_row_size

    policy = plan.policy
    rates: dict[str, TensorRate] = {}
    budgets = dict(plan.budgets)
    weighted_how: set[str] = set()
    weighted_head = False
    many_values: set[str] = set()  # groups with a codebook of more than 256 distinct values
    total = sum(t.nbytes for _, h in files for t in h.values() if policy.clusters(t.name, t.shape, t.dtype))
    with bar(progress, total=total, desc="histograms", unit="B", unit_scale=True) as b:
        for p, h in files:
            with SafetensorsSource(p) as source:
                for info in h.values():
                    if not policy.clusters(info.name, tuple(info.shape), info.dtype):
                        continue
                    values = to_numpy(source.get_tensor(info.name)).reshape(-1)
                    rows, row_size = rows_and_row_size(tuple(info.shape))
                    cr = policy.chunk_rows or max(1, rows)
                    found = None
                    if (plan.embed_importance == "tokens" and len(info.shape) == 2
                            and policy.group(info.name) == "embed"):  # fmt: skip
                        found = token_row_weights(p.parent, rows)
                    if found is not None:  # a table per storage chunk: one step per 256 rows
                        plan.row_weights[info.name] = found[0].reshape(-1, 1)
                        weighted_how.add(found[1])
                        cr = DEFAULT_STORAGE_CHUNK_ROWS
                    hists, entry = [], []
                    for a, e in chunk_row_ranges(rows, cr):
                        imp = None if found is None else np.repeat(found[0][a:e], row_size)
                        try:
                            hist = value_histogram(values[a * row_size : e * row_size], info.dtype, imp)
                        except (WclustError, ValueError) as err:
                            raise UsageError(f"{where(p, info.name)}: cannot cluster: {err}") from err
                        hists.append(coarse_histogram(hist))
                        entry.append(table_entry_bits(e - a, rows))
                    own = policy.bits_for(info.name)
                    group = policy.group(info.name)
                    if own is not None:
                        group = f"tensor:{info.name}"
                        budgets[group] = own
                    elif group not in budgets:
                        group = "model"
                    head = (group == "model" and policy.group(info.name) == "embed"
                            and is_output_head(info.name, p.parent))  # fmt: skip
                    weight = plan.embed_weight if head else 1.0
                    weighted_head |= head
                    rates[info.name] = TensorRate(hists, entry, group, weight)
                    if any(hh.x.size > 256 for hh in hists):
                        many_values.add(group)
                    b.update(info.nbytes)
    alloc = allocate(rates, budgets)
    plan.steps = alloc.steps
    extra: dict[str, str] = {}
    for g in sorted(alloc.group_bits):
        if g.startswith("tensor:"):
            continue
        key = "" if g == "model" else f"_{g}"
        members = [n for n, r in rates.items() if r.group == g]
        weights = sum(rates[n].elements for n in members)
        achieved = sum(alloc.bits[n] * rates[n].elements for n in members) / max(1, weights)
        extra[f"bits{key}"] = f"{alloc.group_bits[g]:g}"
        extra[f"bits_achieved{key}"] = f"{achieved:.4g}"
        extra[f"lambda{key}"] = f"{alloc.group_lambda[g]:.6g}"
        extra[f"step{key}"] = f"{alloc.group_step[g]:.6g}"
        if achieved < alloc.group_bits[g] * (1 - CAP_TOLERANCE):
            why = ("K <= 256 per chunk" if g in many_values
                   else "every distinct value already has a centroid of its own")  # fmt: skip
            extra[f"bits_cap{key}"] = why
            who = "" if g == "model" else f" ({g})"
            plan.capped[g] = f"requested {alloc.group_bits[g]:g} bits/weight{who}, achieved {achieved:.2f}: {why}"
    if weighted_how:
        extra["embed_importance"] = ",".join(sorted(weighted_how))
    if weighted_head:  # only where an output head shares the model's slope
        extra["embed_weight"] = f"{plan.embed_weight:g}"
    plan.add_settings(extra)


_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def is_output_head(name: str, folder: Path) -> bool:
    """Whether ``name`` produces logits: an LM head, or a token embedding that a causal LM in
    ``folder`` ties to its LM head (config.json ``architectures`` and ``tie_word_embeddings``,
    which transformers defaults to true). `DEFAULT_EMBED_WEIGHT` is for those: an encoder's
    input embedding (BERT, sentence-transformers) is not an output and keeps weight 1."""
    if _HEAD_RE.search(name):
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures") or []
    causal = isinstance(archs, list) and any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    return causal and config.get("tie_word_embeddings", True) is True
