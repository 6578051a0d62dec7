"""Centroid transforms: change the cluster means of a clustered file, keep the assignments.

The experiments of "Only relative ranks matter in weight-clustered LLMs" replace each matrix's
K cluster means by other values while every weight keeps its cluster. Modes (``MODES``):

rank-preserving (labels untouched; the table stays ascending):
  - ``affine``: ``a·c + b`` with ``a > 0``.
  - ``affine-correct``: the affine map that gives the table the frequency-weighted mean and
    variance of the table read from the file (identity alone; after another mode in the same
    chain it undoes that mode's scale drift: ``modes=["sorted-gaussian", "affine-correct"]``).
  - ``sorted-gaussian``: K draws from N(μ, σ²) (μ, σ: the weights' mean and std), sorted.
  - ``monotone-freq``: the Gaussian quantile of each cluster's frequency-weighted CDF midpoint,
    ``μ + σ·Φ⁻¹((C_{k-1} + n_k/2) / N)``: a monotone map that makes the weights Gaussian.
  - ``power``: ``sign(c)·m·(|c|/m)^p`` with ``m = max|c|`` (``p > 0``, default 0.5).
  - ``tanh``: ``s·tanh(c/s)`` with ``s = scale·σ`` (default scale 2).

rank-breaking (the file must keep tables ascending, spec §5.4, so labels are permuted):
  - ``sign-scramble``: random signs, magnitudes kept (ranks of ``|w|`` kept). Clusters ``x`` and
    ``-x`` flip together, so no two clusters meet.
  - ``rank-break``: values permuted at random among the negative clusters and among the positive
    ones (every weight keeps its sign).
  - ``gaussian``: K independent draws from N(0, 1), then set to the weights' mean and variance.
  - ``permute``: the K values permuted at random.

Statistics (μ, σ, frequencies) are per codebook: consecutive storage chunks that repeat one table
(`ClusteredTensor.rechunk`) are one codebook and get one transformed table. Random modes draw from
``numpy.random.default_rng([seed, crc32(name), codebook])``, so a tensor's result does not depend on
which other tensors are transformed.

Rounding: a mode's values are rounded to what the tensor rebuilds to (fp16; bf16 for a BF16
tensor) and stored in fp16 (an fp16 overflow is an error). Two clusters that round to the same
value are separated explicitly: walking up the sorted table, a value not above its predecessor
becomes the next representable value above it (one step of the rebuild grid, the smallest change
that keeps the table, and the rebuilt weights, strictly ascending). So the decoded weights are the
mode's values rounded to the tensor's dtype, apart from such collisions, which move a value by a
few steps and keep its order.

>>> import torch
>>> from wcfmt import ClusteredTensor
>>> ct = ClusteredTensor(labels=torch.tensor([[0, 1, 2, 2]], dtype=torch.uint8),
...     centroids=[torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float16)], chunk_rows=1, dtype=torch.float16)
>>> out, relabelled = transform_tensor(ct, "affine", a=2.0, b=1.0)
>>> out.decode().tolist(), relabelled
([[-1.0, 2.0, 5.0, 5.0]], False)
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..dtypes import name_of
from ..errors import UsageError, where

__all__ = [
    "MODES",
    "RANK_PRESERVING",
    "RANK_BREAKING",
    "TransformReport",
    "transform",
    "transform_tensor",
    "transform_values",
    "fp16_table",
    "codebooks",
    "weighted_stats",
    "write_edited",
    "clustered_names",
]

RANK_PRESERVING: tuple[str, ...] = ("affine", "affine-correct", "sorted-gaussian", "monotone-freq", "power", "tanh")
RANK_BREAKING: tuple[str, ...] = ("sign-scramble", "rank-break", "gaussian", "permute")
MODES: tuple[str, ...] = RANK_PRESERVING + RANK_BREAKING

_F16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------------
# table maths
# --------------------------------------------------------------------------------------------
def weighted_stats(values: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Frequency-weighted mean and standard deviation of a table (clusters with count 0 weigh 0).

    >>> weighted_stats(np.array([0.0, 2.0]), np.array([3, 1]))
    (0.5, 0.8660254037844386)
    """
    c = np.asarray(counts, np.float64)
    n = c.sum()
    if n <= 0:  # no weight uses the table: fall back to the unweighted figures
        c, n = np.ones_like(c), float(c.size)
    v = np.asarray(values, np.float64)
    mu = float((c * v).sum() / n)
    return mu, float(np.sqrt(max(0.0, (c * (v - mu) ** 2).sum() / n)))


def _affine_to(values: np.ndarray, counts: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    m, s = weighted_stats(values, counts)
    if s == 0.0:
        return np.full_like(values, mu) + (values - m)
    return mu + (values - m) * (sigma / s)


def transform_values(
    mode: str,
    table: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    *,
    reference: np.ndarray | None = None,
    a: float = 1.0,
    b: float = 0.0,
    p: float = 0.5,
    scale: float = 2.0,
) -> np.ndarray:
    """Return the float64 value each cluster gets under ``mode`` (one per label, label order).

    ``table``: the current values (ascending for the first mode of a chain, any order after a
    rank-breaking one); ``counts``: how many weights use each cluster; ``reference``: the table
    read from the file, which ``affine-correct`` matches (default: ``table``).
    """
    v = np.asarray(table, np.float64)
    k = v.size
    mu, sigma = weighted_stats(v, counts)
    if mode == "affine":
        if not a > 0:
            raise UsageError(f"affine needs a > 0 (a rank-preserving map), got a={a}")
        return a * v + b
    if mode == "affine-correct":
        ref = v if reference is None else np.asarray(reference, np.float64)
        return _affine_to(v, counts, *weighted_stats(ref, counts))
    if mode == "sorted-gaussian":
        return np.sort(rng.normal(mu, sigma, k))
    if mode == "monotone-freq":
        c = np.asarray(counts, np.float64)
        if c.sum() <= 0:
            c = np.ones(k)
        order = np.argsort(v, kind="stable")
        cum = np.cumsum(c[order])
        mid = (cum - c[order] / 2) / cum[-1]
        nd = NormalDist()
        q = np.array([nd.inv_cdf(min(max(x, 1e-12), 1 - 1e-12)) for x in mid])
        out = np.empty(k)
        out[order] = mu + sigma * q
        return out
    if mode == "power":
        if not p > 0:
            raise UsageError(f"power needs p > 0 (a monotone map), got p={p}")
        m = float(np.abs(v).max())
        return v if m == 0 else np.sign(v) * m * (np.abs(v) / m) ** p
    if mode == "tanh":
        s = scale * sigma
        if not s > 0:
            raise UsageError(f"tanh needs scale > 0 and a table with spread, got scale={scale}, std={sigma}")
        return s * np.tanh(v / s)
    if mode == "sign-scramble":
        out = v.copy()
        mags = np.abs(v)
        for m in np.unique(mags[mags > 0]):  # x and -x flip together: no two clusters collide
            if rng.random() < 0.5:
                idx = mags == m
                out[idx] = -out[idx]
        return out
    if mode == "rank-break":
        out = v.copy()
        for idx in (np.flatnonzero(v < 0), np.flatnonzero(v > 0)):
            out[idx] = v[rng.permutation(idx)]
        return out
    if mode == "gaussian":
        z = rng.normal(0.0, 1.0, k)
        return _affine_to(z, counts, mu, sigma) if k > 1 else np.array([mu])
    if mode == "permute":
        return v[rng.permutation(k)]
    raise UsageError(f"unknown transform mode {mode!r}; choose from {', '.join(MODES)}")


def fp16_table(values: np.ndarray, dtype: str = "F16") -> tuple[np.ndarray, np.ndarray, int]:
    """Round ``values`` (one per old label) to a strictly ascending fp16 table for a ``dtype`` tensor.

    Returns ``(table, new_label_of_old, bumps)``: ``table[new_label_of_old[k]]`` is cluster k's
    value. For a BF16 tensor values are rounded to bf16 first (what the file rebuilds to), and
    "strictly ascending" holds for the rebuilt values too. ``bumps`` counts values raised to
    separate collisions: a value that does not rebuild above its predecessor becomes the next
    fp16 number that does (one fp16 step for F16, one bf16 step for BF16). Raises `UsageError`
    on a value outside the fp16 range.

    >>> t, new, bumps = fp16_table(np.array([0.5, -1.0, 0.5]))
    >>> t.tolist(), new.tolist(), bumps
    ([-1.0, 0.5, 0.50048828125], [1, 0, 2], 1)
    >>> fp16_table(np.array([0.5, 0.5]), "BF16")[0].tolist()
    [0.5, 0.50390625]
    """
    v = np.asarray(values, np.float64)
    if not np.isfinite(v).all() or (np.abs(v) > _F16_MAX).any():
        raise UsageError(f"a transformed centroid is outside the fp16 range (max |value| {np.abs(v).max():.4g})")
    if dtype == "BF16":  # round to the rebuild grid first, so fp16 -> bf16 does not round again
        v = torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16).float().numpy().astype(np.float64)
    h = v.astype(np.float16) + np.float16(0.0)  # -0 -> +0

    def rebuilt(x: np.ndarray) -> np.ndarray:  # the value the file rebuilds (spec §5.5), as float64
        f = torch.from_numpy(np.asarray(x, np.float16).astype(np.float32))
        return (f.to(torch.bfloat16).float() if dtype == "BF16" else f).numpy().astype(np.float64)

    order = np.argsort(rebuilt(h), kind="stable")
    table = h[order].copy()
    bumps = 0
    up = np.float16(np.inf)
    for i in range(1, table.size):
        prev = rebuilt(table[i - 1 : i])[0]
        if rebuilt(table[i : i + 1])[0] > prev:
            continue
        x = table[i - 1]
        while np.isfinite(x) and not rebuilt(np.array([x], np.float16))[0] > prev:
            x = np.nextafter(x, up)
        y = rebuilt(np.array([x], np.float16)).astype(np.float16)  # store the rebuilt value itself when exact
        table[i] = y[0] if rebuilt(y)[0] == rebuilt(np.array([x], np.float16))[0] else x
        bumps += 1
    if not np.isfinite(table).all():
        raise UsageError("separating equal centroids ran past the fp16 range")
    new_label = np.empty(v.size, np.int64)
    new_label[order] = np.arange(v.size)
    return table, new_label, bumps


def codebooks(ct: ClusteredTensor) -> list[list[int]]:
    """Group chunk indices into codebooks: runs of consecutive chunks with the very same table."""
    groups: list[list[int]] = []
    for i, t in enumerate(ct.centroids):
        if groups and torch.equal(ct.centroids[groups[-1][0]], t):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def transform_tensor(
    ct: ClusteredTensor,
    modes: str | Sequence[str],
    *,
    seed: int = 0,
    name: str = "",
    a: float = 1.0,
    b: float = 0.0,
    p: float = 0.5,
    scale: float = 2.0,
) -> tuple[ClusteredTensor, bool]:
    """Apply ``modes`` (one or a chain, in order) to every codebook of ``ct``.

    Returns ``(new tensor, relabelled)``; ``relabelled`` is True when labels had to be permuted to
    keep tables ascending (a rank-breaking mode). Rank-preserving chains keep ``ct.labels`` (the
    very tensor object). ``name`` seeds the random modes together with ``seed``.
    """
    chain = [modes] if isinstance(modes, str) else list(modes)
    if not chain:
        raise UsageError("no transform mode given")
    for m in chain:
        if m not in MODES:
            raise UsageError(f"unknown transform mode {m!r}; choose from {', '.join(MODES)}")
    ranges = ct.row_ranges()
    row_size = ct.labels.numel() // max(1, ct.shape[0]) if ct.labels.dim() else 1
    flat = ct.labels.reshape(-1).numpy()
    tables = list(ct.centroids)
    new_labels: np.ndarray | None = None
    name_crc = zlib.crc32(name.encode("utf-8"))
    dtype = name_of(ct.dtype)
    for g, group in enumerate(codebooks(ct)):
        ref = ct.centroids[group[0]].numpy().astype(np.float64)
        k = ref.size
        spans = [(ranges[i][0] * row_size, ranges[i][1] * row_size) for i in group]
        counts = sum(np.bincount(flat[s:e], minlength=k) for s, e in spans)
        rng = np.random.default_rng([seed, name_crc, g])
        v = ref
        for m in chain:
            v = transform_values(m, v, counts, rng, reference=ref, a=a, b=b, p=p, scale=scale)
        table, new_label, _ = fp16_table(v, dtype)
        t = torch.from_numpy(table)
        for i in group:
            tables[i] = t
        if not np.array_equal(new_label, np.arange(k)):
            if new_labels is None:
                new_labels = flat.copy()
            lut = new_label.astype(np.uint8)
            for s, e in spans:
                new_labels[s:e] = lut[flat[s:e]]
    labels = ct.labels if new_labels is None else torch.from_numpy(new_labels).reshape(ct.shape)
    out = ClusteredTensor(labels=labels, centroids=tables, chunk_rows=ct.chunk_rows, dtype=ct.dtype, shape=ct.shape)
    return out, new_labels is not None


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
Edit = Callable[[str, ClusteredTensor], "ClusteredTensor | None"]


def write_edited(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    edit: Edit,
    *,
    note: dict[str, str],
    force: bool = False,
) -> list[str]:
    """Write a copy of the .wclust file or packed folder ``src`` at ``dst`` with edited tensors.

    ``edit(name, ct)`` returns a replacement `ClusteredTensor` (same shape and chunking) or None to
    keep the tensor. A file whose replacements keep every label is copied byte for byte and its
    tables rewritten (`wcfmt.rewrite_centroids`), so its labels stay byte-identical; a file with
    new labels is re-encoded tensor by tensor with its recorded zstd level. ``note`` is added to
    the header's ``settings.extra``. The output appears only when complete; ``src`` is only read.
    Returns the names of the edited tensors.
    """
    from ..io.folder import building_folder, check_output, find_wclust_shards, other_files

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(2, "No such file or folder", str(src))
    check_output(src, dst, force=force, want_dir=src.is_dir())
    edited: list[str] = []
    if src.is_dir():
        shards = find_wclust_shards(src)
        with building_folder(dst, force=force) as tmp:
            for p in shards.paths:
                edited += _edit_file(p, tmp / p.name, edit, note)
            skip = {p.name for p in shards.paths}
            for rel in other_files(src, ()):
                if rel not in skip:
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / rel, target)
            from ..io.card import note_edit

            what = {"transform": "`wcfmt transform`", "healed": "`wcfmt heal` (centroid-only fine-tuning)"}
            note_edit(tmp, [f"{what.get(k, k)}: {v}; {len(set(edited))} tensor(s)" for k, v in note.items()])
    else:
        from ..atomic import AtomicFile

        out = AtomicFile(dst)  # reserves the temporary name; the edit writes into it by path
        out.file.close()
        try:
            edited += _edit_file(src, out.tmp, edit, note, replace=True)
            os.replace(out.tmp, dst)
        finally:
            out.tmp.unlink(missing_ok=True)
    return edited


def _edit_file(src: Path, dst: Path, edit: Edit, note: dict[str, str], replace: bool = False) -> list[str]:
    from ..api import safe_open
    from ..edit import rewrite_centroids
    from ..schema import AliasEntry, ClusteredEntry
    from ..writer import WclustWriter

    new: dict[str, ClusteredTensor] = {}
    relabel = False
    with safe_open(src) as f:
        header = f.header
        for name, e in header.tensors.items():
            if isinstance(e, ClusteredEntry):
                ct = f.get_clustered(name)
                out = edit(name, ct)
                if out is not None:
                    if tuple(out.shape) != tuple(ct.shape) or out.chunk_rows != ct.chunk_rows:
                        raise UsageError(f"{where(src, name)}: an edit must keep the shape and chunking")
                    new[name] = out
                    relabel = relabel or not torch.equal(out.labels, ct.labels)
        settings = header.settings
        extra = {**(settings.extra if settings is not None else {}), **note}
        if relabel:
            from ..schema import PackSettings

            s = (settings or PackSettings()).model_copy(update={"extra": extra})
            level = settings.level if settings is not None else None
            with WclustWriter(dst, metadata=header.metadata, settings=s, level=level, overwrite=replace) as w:
                for name, e in header.tensors.items():
                    if isinstance(e, AliasEntry):
                        continue
                    if name in new:
                        w.add(name, new[name])
                    elif isinstance(e, ClusteredEntry):
                        w.add(name, f.get_clustered(name))
                    else:
                        w.add(name, f.get_tensor(name))
                for name, e in header.tensors.items():
                    if isinstance(e, AliasEntry):
                        w.add_alias(name, e.target)
            return list(new)
    shutil.copyfile(src, dst)
    rewrite_centroids(dst, {n: ct.centroids for n, ct in new.items()}, settings_extra=extra)
    return list(new)


@dataclass
class TransformReport:
    """What `transform` did: the modes, the tensors changed, and which of them were re-labelled."""

    src: Path
    dst: Path
    modes: list[str]
    tensors: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kind = (
            f"labels permuted in {len(self.relabelled)} (rank-breaking: tables must stay ascending)"
            if self.relabelled else "labels untouched"
        )
        return f"transformed {self.src} -> {self.dst}: {' then '.join(self.modes)} on {len(self.tensors)} tensor(s), {kind}"


def transform(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    mode: str | Sequence[str],
    *,
    tensors: str | None = None,
    seed: int = 0,
    a: float = 1.0,
    b: float = 0.0,
    p: float = 0.5,
    scale: float = 2.0,
    force: bool = False,
    progress: bool = False,
) -> TransformReport:
    """Write ``dst``: ``src`` (a .wclust file or packed folder, or a packed Hub repository:
    ``hf://org/name[@rev]``) with its centroid tables transformed.

    ``mode``: one of `MODES`, or a chain applied in order; ``tensors``: a regex (`re.search`)
    choosing the clustered tensors to change (default: all); ``seed`` for the random modes;
    ``a``/``b`` for ``affine``, ``p`` for ``power``, ``scale`` for ``tanh``. The chain is recorded
    in the header's ``settings.extra["transform"]``.
    """
    from ..io.sources import resolve_source
    from ..progress import bar

    chain = [mode] if isinstance(mode, str) else list(mode)
    try:
        rx = re.compile(tensors) if tensors is not None else None
    except re.error as e:
        raise UsageError(f"tensors: invalid regex {tensors!r}: {e}") from e
    for m in chain:  # before any output exists
        if m not in MODES:
            raise UsageError(f"unknown transform mode {m!r}; choose from {', '.join(MODES)}")
    src = resolve_source(src)  # a Hub repository is downloaded (cached) first
    names = clustered_names(src)
    chosen = [n for n in names if rx is None or rx.search(n)]
    if not chosen:
        what = f"matches {tensors!r}" if rx is not None else "is stored clustered"
        raise UsageError(f"{src}: no tensor {what}")
    report = TransformReport(Path(src), Path(dst), chain)
    with bar(progress, total=len(chosen), desc="transform", unit="tensor") as pb:

        def edit(name: str, ct: ClusteredTensor) -> ClusteredTensor | None:
            if rx is not None and not rx.search(name):
                return None
            out, relabelled = transform_tensor(ct, chain, seed=seed, name=name, a=a, b=b, p=p, scale=scale)
            report.tensors.append(name)
            if relabelled:
                report.relabelled.append(name)
            pb.update(1)
            return out

        desc = " ".join(chain) + f" seed={seed} a={a} b={b} p={p} scale={scale}"
        if tensors is not None:
            desc += f" tensors={tensors}"
        write_edited(src, dst, edit, note={"transform": desc}, force=force)
    return report


def clustered_names(src: str | os.PathLike[str]) -> list[str]:
    """Names of the clustered tensors (not aliases) of a .wclust file or packed folder."""
    from ..io.folder import find_wclust_shards
    from ..reader import WclustReader
    from ..schema import ClusteredEntry

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(2, "No such file or folder", str(src))
    paths = find_wclust_shards(src).paths if src.is_dir() else [src]
    out = []
    for path in paths:
        with WclustReader(path) as r:
            out += [n for n, e in r.header.tensors.items() if isinstance(e, ClusteredEntry)]
    return out
