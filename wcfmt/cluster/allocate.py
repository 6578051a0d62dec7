"""Model-wide bit allocation: one slope (λ) for every clustered tensor of a budget group.

Minimising the total (importance-weighted) squared error of many tensors for a total number of
bits puts every tensor at the same slope of its distortion-rate curve (the Lagrangian
condition). With the entropy-constrained encoder's uniform cells, the slope of a tensor
clustered at step ``s`` is ``ω·s²·ln2/6`` (`wcfmt.cluster.ecsq.slope_of_step`, ω its mean
importance), so one λ is one common step ``s`` scaled by ``1/√ω`` per tensor. A tensor whose
values spread wide or have heavy tails then gets more cells and more bits at the same λ than a
narrow one: bits go where they lower the error most.

`allocate` runs on value histograms only (tensor data is read once for them, and again when the
tensors are clustered), so the budget is met across the whole model before anything is written.
Groups with their own budget (``--bits-embed``, per-regex overrides) get their own λ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .ecsq import CELL_ENTRY_BITS, ecsq_cells, equal_slope_scales, rate_bits, slope_of_step, step_for_bits
from .kmeans import EXACT_MAX_POINTS, ValueHistogram, _grid_cells

__all__ = ["TensorRate", "Allocation", "allocate", "coarse_histogram"]


@dataclass
class TensorRate:
    """What allocation needs of one tensor: its codebook chunks' histograms and table-entry bits,
    the budget group it belongs to, and the weight ω of its squared error in the group's total
    (its cells at one slope λ are ``1/√ω`` as wide: more bits for ω > 1)."""

    hists: list[ValueHistogram]
    entry_bits: list[float]
    group: str
    weight: float = 1.0

    @property
    def elements(self) -> int:
        return int(sum(int(h.count.sum()) for h in self.hists))

    @property
    def scales(self) -> list[float]:
        w = 1.0 / math.sqrt(self.weight)
        return [sc * w for sc in equal_slope_scales(self.hists)]

    def bits_at(self, step: float) -> float:
        """Modelled stored bits of the whole tensor at common step ``step``."""
        return sum(
            rate_bits(ecsq_cells(h, step * sc, CELL_ENTRY_BITS), e)
            for h, e, sc in zip(self.hists, self.entry_bits, self.scales)
            if h.x.size
        )


@dataclass
class Allocation:
    """The result: per tensor its step (what `cluster_tensor(step=...)` takes) and modelled bits;
    per group its budget, step and λ."""

    steps: dict[str, float] = field(default_factory=dict)
    bits: dict[str, float] = field(default_factory=dict)
    group_bits: dict[str, float] = field(default_factory=dict)
    group_step: dict[str, float] = field(default_factory=dict)
    group_lambda: dict[str, float] = field(default_factory=dict)


def coarse_histogram(h: ValueHistogram) -> ValueHistogram:
    """``h`` itself, or for an F32 histogram of more than EXACT_MAX_POINTS distinct values a
    stand-in of ≤ 8,192 grid cells (each its weighted mean, count and weight), good enough to
    predict a tensor's rate at the steps allocation tries and far smaller to hold."""
    if h.x.size <= EXACT_MAX_POINTS:
        return h
    starts = _grid_cells(h.x)
    count = np.add.reduceat(h.count, starts)
    weight = np.add.reduceat(h.weight, starts)
    x = np.add.reduceat(h.weight * h.x, starts) / weight
    return ValueHistogram(h.dtype, x, count, weight)


def allocate(tensors: dict[str, TensorRate], budgets: dict[str, float]) -> Allocation:
    """Give every tensor a step so that each group ``g`` spends ``budgets[g]`` bits per weight on
    average (modelled stored bits), all tensors of a group at one slope.

    >>> from wcfmt.cluster.kmeans import value_histogram
    >>> rng = np.random.default_rng(0)
    >>> wide = value_histogram(rng.standard_t(3, 100_000).astype(np.float32), "F32")
    >>> narrow = value_histogram(rng.normal(size=100_000).astype(np.float32), "F32")
    >>> a = allocate({"wide": TensorRate([wide], [16.0], "all"), "narrow": TensorRate([narrow], [16.0], "all")},
    ...              {"all": 4.0})
    >>> a.steps["wide"] == a.steps["narrow"], a.bits["wide"] > a.bits["narrow"]
    (True, True)
    >>> round((a.bits["wide"] + a.bits["narrow"]) / 2, 2)
    4.0
    """
    out = Allocation()
    for group, budget in budgets.items():
        members = {n: t for n, t in tensors.items() if t.group == group}
        if not members:
            continue
        hists, entry, scales = [], [], []
        for name, t in members.items():
            if not (t.weight > 0 and math.isfinite(t.weight)):
                raise UsageError(f"tensor {name!r}: allocation weight must be a positive finite number, got {t.weight!r}")
            hists += t.hists
            entry += t.entry_bits
            scales += t.scales
        step = step_for_bits(hists, budget, entry, scales)
        out.group_bits[group] = budget
        out.group_step[group] = step
        out.group_lambda[group] = slope_of_step(step)
        for name, t in members.items():
            out.steps[name] = step / math.sqrt(t.weight)
            out.bits[name] = t.bits_at(step) / max(1, t.elements)
    return out
