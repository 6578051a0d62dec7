"""Centroid healing: fine-tune only the centroid tables of a packed causal LM, labels fixed.

Every clustered matrix becomes ``W = table[labels]`` with the table a trainable parameter (one row
of tables per codebook); all other weights are frozen. Training minimises next-token loss on the
given text; the new tables are written into a copy of the packed folder (`wcfmt.rewrite_centroids`
on a byte copy, so labels and every other blob stay byte-identical).

Tables must stay strictly ascending (labels are ranks, spec §5.4). Healing **projects**: after
every optimiser step each table that lost its order is replaced by its closest ascending table
(weighted least squares, pool-adjacent-violators with each cluster's weight count), and when the
file is written the tables are rounded to what the tensor rebuilds to (bf16 for BF16 weights),
separating any equal neighbours by one step (`wcfmt.transforms.fp16_table`). Labels are never
re-sorted.

The learning rate is relative: each codebook is trained as ``table = σ·u`` with σ its weights'
standard deviation, so one ``lr`` suits matrices of any scale.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..errors import UsageError

__all__ = ["heal", "HealReport", "ClusteredLinears", "project_ascending", "DEFAULTS"]

#: CPU-friendly defaults (2 cores: about 10-20 s per step for a 135M model at these sizes).
DEFAULTS: dict[str, Any] = {"steps": 60, "lr": 2e-3, "seq_len": 256, "batch": 4}


def project_ascending(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The nondecreasing sequence closest to ``values`` in ``weights``-weighted least squares (PAV).

    >>> project_ascending(np.array([1.0, 3.0, 2.0, 4.0]), np.array([1, 1, 3, 1])).tolist()
    [1.0, 2.25, 2.25, 4.0]
    """
    v = np.asarray(values, np.float64)
    w = np.maximum(np.asarray(weights, np.float64), 1e-12)
    means: list[float] = []
    ws: list[float] = []
    sizes: list[int] = []
    for x, wi in zip(v, w):
        means.append(float(x)); ws.append(float(wi)); sizes.append(1)  # noqa: E702
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, s2 = means.pop(), ws.pop(), sizes.pop()
            m1, w1, s1 = means.pop(), ws.pop(), sizes.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2)); ws.append(w1 + w2); sizes.append(s1 + s2)  # noqa: E702
    return np.repeat(np.array(means), sizes)


class _Gather(torch.autograd.Function):
    """``table[index]`` whose backward is one ``scatter_add`` into the table.

    Autograd's own backward of indexing (``index_put_`` with accumulate) took about 120 s per
    step for SmolLM2's 210 matrices on 2 cores; this takes about 0.3 s (int64 index, measured).
    """

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.numel()
        return torch.take(table, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        out = torch.zeros(ctx.size, dtype=grad.dtype, device=grad.device)
        return out.scatter_add_(0, index.reshape(-1), grad.reshape(-1)), None


class _Codebooks(torch.nn.Module):
    """The trainable tables of one clustered matrix, and its labels as a flat gather index."""

    def __init__(self, ct: ClusteredTensor, compute_dtype: torch.dtype) -> None:
        from .transforms import codebooks, weighted_stats

        super().__init__()
        self.ct = ct
        self.groups = codebooks(ct)
        kmax = max(ct.ks)
        ranges = ct.row_ranges()
        rows = ct.shape[0]
        row_group = torch.empty(rows, dtype=torch.int32)
        init = torch.zeros(len(self.groups), kmax, dtype=torch.float64)
        counts = np.zeros((len(self.groups), kmax))
        scale = torch.ones(len(self.groups), 1, dtype=torch.float64)
        flat = ct.labels.reshape(rows, -1)
        for g, group in enumerate(self.groups):
            t = ct.centroids[group[0]].double()
            init[g, : t.numel()] = t
            for i in group:
                a, b = ranges[i]
                row_group[a:b] = g
                counts[g, : t.numel()] += np.bincount(flat[a:b].reshape(-1).numpy(), minlength=t.numel())
            s = weighted_stats(t.numpy(), counts[g, : t.numel()])[1]
            scale[g, 0] = s if s > 0 else 1.0
        self.kmax = kmax
        self.counts = counts
        self.register_buffer("scale", scale.to(compute_dtype), persistent=False)
        self.u = torch.nn.Parameter((init / scale).to(compute_dtype))
        index = (row_group.to(torch.int64)[:, None] * kmax + flat.to(torch.int64)).reshape(ct.shape)
        self.register_buffer("index", index, persistent=False)

    def weight(self) -> torch.Tensor:
        return _Gather.apply((self.u * self.scale).reshape(-1), self.index)

    @torch.no_grad()
    def project(self) -> int:
        """Make every table ascending again (PAV); return how many tables needed it."""
        fixed = 0
        for g, group in enumerate(self.groups):
            k = self.ct.centroids[group[0]].numel()
            row = self.u[g, :k]
            if k > 1 and not bool((row[1:] > row[:-1]).all()):
                new = project_ascending(row.double().cpu().numpy(), self.counts[g, :k])
                row.copy_(torch.from_numpy(new).to(row))
                fixed += 1
        return fixed

    def tables(self) -> list[torch.Tensor]:
        """fp16 tables, one per storage chunk, strictly ascending in the rebuild dtype."""
        from ..dtypes import name_of
        from .transforms import fp16_table

        dtype = name_of(self.ct.dtype)
        out: list[torch.Tensor] = list(self.ct.centroids)
        with torch.no_grad():
            full = (self.u * self.scale).double().cpu().numpy()
        for g, group in enumerate(self.groups):
            k = self.ct.centroids[group[0]].numel()
            v = project_ascending(full[g, :k], self.counts[g, :k])
            table, new_label, _ = fp16_table(v, dtype)
            assert np.array_equal(new_label, np.arange(k))  # ascending input: the order is kept
            t = torch.from_numpy(table)
            for i in group:
                out[i] = t
        return out


class ClusteredLinears:
    """Swap the weights of a model's clustered matrices for ``table[labels]`` gathers.

    ``clustered``: parameter name → `ClusteredTensor` (as stored). Each such parameter is removed
    from its module and recomputed from the trainable tables before every forward; every other
    parameter is frozen. `parameters` are the tables (the relative ``u`` of each codebook).
    """

    def __init__(self, model: torch.nn.Module, clustered: dict[str, ClusteredTensor]) -> None:
        compute = next(model.parameters()).dtype
        for p in model.parameters():
            p.requires_grad_(False)
        self.books: dict[str, _Codebooks] = {}
        self._hooks = []
        for name, ct in clustered.items():
            mod_name, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(mod_name)
            except AttributeError as e:
                raise UsageError(f"tensor {name!r}: the model has no module {mod_name!r}") from e
            old = getattr(module, attr, None)
            if not isinstance(old, torch.Tensor) or tuple(old.shape) != tuple(ct.shape):
                raise UsageError(f"tensor {name!r}: the model's {attr} has another shape or is missing")
            book = _Codebooks(ct, compute)
            self.books[name] = book
            delattr(module, attr)
            setattr(module, attr, book.weight().detach())

            def hook(mod: torch.nn.Module, args: Any, book: _Codebooks = book, attr: str = attr) -> None:
                setattr(mod, attr, book.weight())

            self._hooks.append(module.register_forward_pre_hook(hook))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [b.u for b in self.books.values()]

    def project(self) -> int:
        return sum(b.project() for b in self.books.values())

    def tables(self) -> dict[str, list[torch.Tensor]]:
        return {n: b.tables() for n, b in self.books.items()}


@dataclass
class HealReport:
    """What `heal` did: steps, the training loss at the start and end, timing, projections."""

    src: Path
    dst: Path
    tensors: int
    steps: int
    tokens_per_step: int
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    projected: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"healed {self.src} -> {self.dst}: {self.tensors} clustered tensors, {self.steps} steps of "
            f"{self.tokens_per_step} tokens, train loss {self.first_loss:.4f} -> {self.last_loss:.4f} "
            f"(mean of first/last {min(5, len(self.losses))} steps), {self.projected} table projection(s), "
            f"{self.seconds:.1f} s"
        )


def _token_ids(src: Path, text: str | os.PathLike[str] | torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).to(torch.long)
    if isinstance(text, (list, tuple)):
        return torch.tensor(text, dtype=torch.long)
    path = Path(text)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. the text itself passed instead of its path: "File name too long"
        raise UsageError(f"text must be the path of a UTF-8 text file (or token ids), not {str(text)[:40]!r}…") from None
    if not is_file:
        raise FileNotFoundError(2, "No such file", str(path))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UsageError(f"{src}: no tokenizer in the packed folder to read {path} ({e})") from e
    return torch.tensor(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False), dtype=torch.long)


def heal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    text: str | os.PathLike[str] | torch.Tensor | Sequence[int],
    *,
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    seq_len: int = DEFAULTS["seq_len"],
    batch: int = DEFAULTS["batch"],
    seed: int = 0,
    tensors: str | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> HealReport:
    """Heal the packed causal LM folder ``src`` (or Hub repository, ``hf://org/name[@rev]``) on
    ``text``; write the healed folder ``dst``.

    ``text``: a UTF-8 text file (tokenized with the folder's tokenizer) or token ids. It is cut
    into windows of ``seq_len`` tokens; each of ``steps`` Adam steps (learning rate ``lr``,
    relative to each codebook's spread) takes ``batch`` windows in a seeded random order.
    ``tensors``: a regex choosing which clustered tensors to heal (default all). ``threads`` sets
    torch's intra-op threads for the run. Training computes in float32; ``dst`` holds the new
    tables, rounded as the module notes say, and ``settings.extra["healed"]`` records the run.
    """
    import re

    from ..api import safe_open
    from ..io.folder import check_output, find_wclust_shards
    from ..io.transformers_io import from_pretrained
    from ..progress import bar
    from ..schema import ClusteredEntry
    from .transforms import write_edited

    from ..io.sources import resolve_source

    t0 = time.perf_counter()
    src, dst = resolve_source(src), Path(dst)  # a Hub repository (hf://org/name) is downloaded first
    for what, v, lo in (("steps", steps, 1), ("seq_len", seq_len, 2), ("batch", batch, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UsageError(f"{what} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"lr must be a positive number, got {lr!r}")
    if not src.is_dir():
        if src.exists():
            raise UsageError(f"{src}: heal needs a packed model folder (config.json and .wclust shards)")
        raise FileNotFoundError(2, "No such file or folder", str(src))
    check_output(src, dst, force=force, want_dir=True)
    rx = re.compile(tensors) if tensors is not None else None
    ids = _token_ids(src, text)
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise UsageError(f"{text}: {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        clustered: dict[str, ClusteredTensor] = {}
        for p in find_wclust_shards(src).paths:
            with safe_open(p) as f:
                for name, e in f.header.tensors.items():
                    if isinstance(e, ClusteredEntry) and (rx is None or rx.search(name)):
                        clustered[name] = f.get_clustered(name)
        if not clustered:
            raise UsageError(f"{src}: no clustered tensor to heal" + (f" matches {tensors!r}" if rx else ""))
        model = from_pretrained(src, dtype=torch.float32)
        swap = ClusteredLinears(model, clustered)
        opt = torch.optim.Adam(swap.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_windows, generator=gen)
        pos = 0
        losses: list[float] = []
        projected = 0
        model.train()
        with bar(progress, total=steps, desc="heal", unit="step") as pb:
            for _ in range(steps):
                idx = []
                while len(idx) < min(batch, n_windows):
                    if pos == n_windows:
                        order, pos = torch.randperm(n_windows, generator=gen), 0
                    idx.append(int(order[pos]))
                    pos += 1
                x = windows[idx]
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                projected += swap.project()
                losses.append(float(loss.detach()))
                pb.set_postfix_str(f"loss {losses[-1]:.4f}")
                pb.update(1)
        tables = swap.tables()
    finally:
        torch.set_num_threads(old_threads)
    n = min(5, len(losses))
    report = HealReport(
        src, dst, len(clustered), steps, min(batch, n_windows) * seq_len,
        first_loss=sum(losses[:n]) / n, last_loss=sum(losses[-n:]) / n, losses=losses, projected=projected,
    )  # fmt: skip

    def edit(name: str, ct: ClusteredTensor) -> ClusteredTensor | None:
        if name not in tables:
            return None
        return ClusteredTensor(labels=ct.labels, centroids=tables[name], chunk_rows=ct.chunk_rows,
                               dtype=ct.dtype, shape=ct.shape)

    note = {"healed": f"steps={steps} lr={lr} seq_len={seq_len} batch={batch} seed={seed} "
                      f"tokens={len(ids)} tensors={tensors or 'all'} order=projected"}  # fmt: skip
    write_edited(src, dst, edit, note=note, force=force)
    report.seconds = time.perf_counter() - t0
    return report
