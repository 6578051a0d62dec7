"""Calibration: choose labels by what a layer's inputs see, not by the weights alone (GPTQ-style).

Nearest-centroid labels minimise ‖W − Ŵ‖², but a linear layer's error is ‖(W − Ŵ)X‖², which
depends on its inputs' second moments H = XᵀX. Given H, labels are chosen one input column at a
time, and each column's rounding error is pushed onto the columns not yet labelled through the
upper Cholesky factor U of H⁻¹ (Frantar et al., "GPTQ", 2022, Algorithm 1). The centroid table
stays the encoder's (the grid), so the bytes on disk keep their format and nearly their size;
optionally the cell means are re-fitted afterwards, weighted by diag(H), and re-rounded by the
table rules of `wcfmt.cluster.kmeans.round_centroids`.

- `sample_text`: calibration text the model writes itself (``pack(calib="self")``), when the
  user has none.
- `collect_hessians`: run a Hugging Face causal LM (transformers, CPU) over a text and return
  H / n_tokens for every ``nn.Linear`` weight.
- `gptq_labels`: labels of one matrix onto one ascending grid of rebuilt values.
- `calibrate_clustered`: a `ClusteredTensor` (from `cluster_tensor`) relabelled the same way.

>>> import numpy as np
>>> w = np.array([[0.4, 0.4]]); grid = np.array([0.0, 1.0])
>>> gptq_labels(w, np.eye(2), grid).tolist()         # H = I: nearest rounding
[[0, 0]]
>>> h = np.array([[1.0, 0.99], [0.99, 1.0]])         # correlated inputs: the error is fed on
>>> gptq_labels(w, h, grid).tolist()
[[0, 1]]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..dtypes import from_numpy, name_of, to_numpy
from ..errors import UsageError
from .kmeans import round_centroids
from .report import quality

__all__ = [
    "DEFAULT_CALIB_TOKENS",
    "DEFAULT_DAMP",
    "SELF_CALIB",
    "sample_text",
    "collect_hessians",
    "inverse_cholesky",
    "gptq_labels",
    "calibrate_clustered",
]

#: Tokens of calibration text: measured (issue #8) 4k tokens of one play are enough for H.
DEFAULT_CALIB_TOKENS = 4096

#: Dampening added to H's diagonal, as a fraction of its mean diagonal (GPTQ's default, 1%).
DEFAULT_DAMP = 0.01

#: Columns labelled between two lazy updates of the rest of the matrix (GPTQ's block size).
_BLOCK = 128

#: With an entropy term, candidates within this many grid steps of the nearest are weighed.
_WINDOW = 2


#: ``calib`` value meaning "sample the calibration text from the model itself", and how:
#: sequences × tokens, sampled at temperature 1 from the BOS token with this torch seed.
SELF_CALIB = "self"
SELF_SEQUENCES, SELF_TOKENS, SELF_SEED = 8, 560, 0


# -- calibration text without a user's text ---------------------------------------------------
def sample_text(
    model_folder: str | Path, sequences: int = SELF_SEQUENCES, tokens: int = SELF_TOKENS, seed: int = SELF_SEED,
) -> str:
    """``sequences`` texts of ``tokens`` tokens each, sampled from the causal LM in
    ``model_folder`` (float32, CPU, temperature 1, no top-k/top-p, torch seed ``seed``, each
    starting at the BOS token), joined by blank lines.

    What a model writes at temperature 1 is a sample of what it has learned to expect, so its
    layers' input statistics on it stand in for real text's. SmolLM2-135M: 8 × 560 tokens
    (about 50 s on 2 cores) as the calibration text of ``--bits 5.43`` gave 0.986× bf16
    perplexity on held-out plays at 0.338 of the bf16 file, against 1.050× uncalibrated
    (tools/RESULTS-smollm2.md). Sampling is deterministic for one machine and torch build;
    others may sample other tokens (and so write other bytes)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise UsageError("calib='self' needs transformers (pip install transformers)") from e
    hf_logging.disable_progress_bar()  # quiet in library calls, as collect_hessians
    folder = Path(model_folder)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: calib='self' needs a Hugging Face causal LM folder (config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{folder}: cannot load the model to sample calibration text ({e})") from None
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start_id is None:
        raise UsageError(f"{folder}: the tokenizer has no BOS or EOS token to start sampling from")
    gen = torch.random.fork_rng(devices=[])
    with gen, torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            torch.full((sequences, 1), start_id, dtype=torch.long), attention_mask=torch.ones(sequences, 1, dtype=torch.long),
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
            pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else start_id,
        )  # fmt: skip
    return "\n\n".join(tok.decode(o[1:], skip_special_tokens=True) for o in out)


# -- the inputs' second moments ---------------------------------------------------------------
def collect_hessians(
    model_folder: str | Path,
    text: str,
    n_tokens: int = DEFAULT_CALIB_TOKENS,
    *,
    names: Collection[str] | Callable[[str], bool] | None = None,
    window: int = 512,
    batch: int = 4,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Return ``{weight name: H}``, H = mean over tokens of xxᵀ (float64, in × in), per linear layer.

    The model in ``model_folder`` (a Hugging Face causal LM folder) runs in float32 on the CPU over
    the first ``n_tokens`` tokens of ``text`` (fewer if the text is shorter), in windows of
    ``window`` tokens; a forward hook on every ``torch.nn.Linear`` sums its inputs' outer
    products. ``names`` keeps only some weights (a set of names like
    ``"model.layers.0.mlp.up_proj.weight"``, or a predicate). Raises `UsageError` when the
    folder, the text or transformers is missing.
    """
    folder = Path(model_folder)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: calibration needs a Hugging Face model folder (no config.json)")
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 2:
        raise UsageError(f"n_tokens must be an integer >= 2, got {n_tokens!r}")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is in the test extra
        raise UsageError("calibration runs the model with transformers: pip install transformers") from e
    keep: Callable[[str], bool]
    if names is None:
        keep = lambda n: True  # noqa: E731
    elif callable(names):
        keep = names
    else:
        wanted = set(names)
        keep = wanted.__contains__

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise UsageError(f"calibration text has {len(ids)} tokens; need at least 2")
    ids = torch.tensor(ids[:n_tokens], dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    # Layers fed the same tensor (q/k/v, gate/up) share one product: the hooks of one input run
    # one after another, so the last input and its product are all that is kept. Products are
    # float32 per batch (H is dampened by 1% before use), summed in float64 across batches.
    last: list[Any] = [None, None]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                last[:] = [args[0], (x.T @ x).to(torch.float64)]
            s = sums.get(name)
            sums[name] = last[1].clone() if s is None else s.add_(last[1])

        return hook

    hooked = []
    for mname, module in model.named_modules():
        wname = f"{mname}.weight"
        if isinstance(module, torch.nn.Linear) and keep(wname):
            hooks.append(module.register_forward_pre_hook(hook_for(wname)))
            hooked.append(module)
    win = max(2, min(window, len(ids)))
    n_windows = max(1, len(ids) // win)
    windows = ids[: n_windows * win].reshape(n_windows, win)
    from ..progress import bar

    # Only the layers' inputs are wanted: unless the LM head's own H is, causal LMs that can skip
    # the logits of all but the last position (transformers' ``logits_to_keep``) spare the LM
    # head's product (SmolLM2: a sixth of the forward pass).
    head = model.get_output_embeddings()
    head_wanted = any(m is head for m in hooked)
    skip_logits = not head_wanted and "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if skip_logits else {}
    try:
        with torch.inference_mode(), bar(progress, total=n_windows, desc="calibrate", unit="window") as b:
            for i in range(0, n_windows, batch):
                model(input_ids=windows[i : i + batch], **extra)
                b.update(len(windows[i : i + batch]))
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    n = windows.numel()
    return {name: (s / n).numpy() for name, s in sums.items()}


# -- GPTQ onto a fixed grid -------------------------------------------------------------------
def inverse_cholesky(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H/mean diag + damp·I)⁻¹, so that UᵀU = H⁻¹ (dampened).

    H is scaled to a mean diagonal of 1 first, so that ``damp`` and an entropy term's λ do not
    depend on the activations' scale. Columns whose input never fires (H_jj = 0) get a unit
    diagonal: their weights never reach the output, and nearest rounding is then their choice.
    """
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise UsageError(f"H must be a square matrix, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise UsageError("H holds NaN or infinite values")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise UsageError(f"damp must be > 0, got {damp!r}")
    d = np.diag(h).copy()
    dead = d <= 0
    scale = float(d[~dead].mean()) if (~dead).any() else 1.0
    h /= scale
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1.0
    h[np.diag_indices_from(h)] += damp
    # LAPACK's potrf / potri / potrf through torch (which a pack worker runs on one thread):
    # H⁻¹ from H's factor directly, half the time of a general solve against I.
    ht = torch.from_numpy(h)
    lower, info = torch.linalg.cholesky_ex(ht)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise UsageError(f"H is not positive definite even with damp={damp} (leading minor {int(info)})")
    return upper.numpy()


def _check_grid(grid: np.ndarray) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64).reshape(-1)
    if g.size == 0 or g.size > 256 or not np.isfinite(g).all() or (np.diff(g) <= 0).any():
        raise UsageError("the grid must hold 1..256 finite, strictly ascending values")
    return g


def _gptq(w: np.ndarray, u: np.ndarray, grid: np.ndarray, lam: float, code_bits: np.ndarray | None) -> np.ndarray:
    """GPTQ's loop (Algorithm 1, lazy batches of `_BLOCK` columns) on a transposed working copy,
    so that a column is contiguous. Each column's label: the nearest grid value (ties to the
    lower, as `assign_labels`), or with an entropy term the cheapest of the `_WINDOW` values on
    each side by ((w − c)/U_jj)² + λ·bits(c) (the first, lowest, of ties); the grid is padded
    with infinitely costly copies of its ends instead of clipping indices."""
    rows, cols = w.shape
    wt = np.array(w.T, dtype=np.float64, order="C")  # columns absorb earlier columns' errors
    mids = (grid[1:] + grid[:-1]) / 2
    entropy = lam != 0.0 and code_bits is not None
    if entropy:
        assert code_bits is not None
        ends = np.full(_WINDOW, np.inf)
        padded = np.concatenate((np.full(_WINDOW, grid[0]), grid, np.full(_WINDOW, grid[-1])))
        padded_bits = np.concatenate((ends, code_bits, ends))
        offsets = np.arange(2 * _WINDOW + 1)
        every = np.arange(rows)
    labels = np.empty((cols, rows), dtype=np.int64)
    err = np.empty((rows, _BLOCK))
    for a in range(0, cols, _BLOCK):
        b = min(a + _BLOCK, cols)
        for i in range(b - a):
            j = a + i
            col = wt[j]
            lab = np.searchsorted(mids, col, side="left")
            u_jj = u[j, j]
            if entropy:
                cand = lab[:, None] + offsets  # indices into the padded grid
                cost = ((col[:, None] - padded[cand]) / u_jj) ** 2 + lam * padded_bits[cand]
                lab = cand[every, np.argmin(cost, axis=1)] - _WINDOW
            labels[j] = lab
            e = (col - grid[lab]) / u_jj
            if j + 1 < b:
                wt[j + 1 : b] -= np.outer(u[j, j + 1 : b], e)
            err[:, i] = e
        if b < cols:
            wt[b:] -= (err[:, : b - a] @ u[a:b, b:]).T
    return labels.T.astype(np.uint8)


def gptq_labels(
    w: np.ndarray,
    h: np.ndarray,
    rebuilt: np.ndarray,
    *,
    damp: float = DEFAULT_DAMP,
    lam: float = 0.0,
    code_bits: np.ndarray | None = None,
    u: np.ndarray | None = None,
) -> np.ndarray:
    """Return uint8 labels (rows × cols) of ``w`` onto the ascending grid ``rebuilt`` by GPTQ.

    - ``w``: the weight, rows × cols (a linear layer's out × in); ``h``: cols × cols, the inputs'
      second moments (any positive scale); ``rebuilt``: the values the labels rebuild to.
    - ``damp``: added to the diagonal of H scaled to mean diagonal 1.
    - ``lam`` and ``code_bits`` (one per grid value, e.g. −log2 of its frequency): the label of
      each weight minimises ((w − c)/U_jj)² + λ·bits(c) among the nearest few grid values, the
      entropy-constrained choice in the same units as an unweighted ECSQ's λ (H is scaled).
    - ``u``: `inverse_cholesky(h, damp)` when the caller already has it (then ``h`` is unused).

    With H diagonal (no correlation between inputs) and λ = 0 this is nearest rounding.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise UsageError(f"w must be a matrix (rows, cols), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise UsageError("w holds NaN or infinite values")
    grid = _check_grid(rebuilt)
    if u is None:
        u = inverse_cholesky(h, damp)
    if u.shape != (w.shape[1], w.shape[1]):
        raise UsageError(f"H is {u.shape[0]} × {u.shape[1]} but the weight has {w.shape[1]} columns")
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise UsageError(f"lam must be a finite number >= 0, got {lam!r}")
    bits = None
    if lam > 0:
        if code_bits is None:
            raise UsageError("an entropy term (lam > 0) needs code_bits, one per grid value")
        bits = np.asarray(code_bits, dtype=np.float64).reshape(-1)
        if bits.size != grid.size or not np.isfinite(bits).all():
            raise UsageError(f"code_bits must hold {grid.size} finite values, got {bits.size}")
    return _gptq(w, u, grid, float(lam), bits)


# -- a ClusteredTensor, relabelled ------------------------------------------------------------
def _rebuilt(table: torch.Tensor, dtype: str) -> np.ndarray:
    from .kmeans import _rebuilt_values

    return _rebuilt_values(to_numpy(table), dtype)


def _code_bits(labels: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels.reshape(-1), minlength=k).astype(np.float64)
    n = counts.sum()
    # An empty cell costs as much as a label seen once: reachable, but not free.
    return -np.log2(np.maximum(counts, 1.0) / n)


def _refit(w: np.ndarray, labels: np.ndarray, grid: np.ndarray, col_weight: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Cell means of ``w`` weighted by column importance, rounded to a table; (table, new labels)."""
    k = grid.size
    wt = np.broadcast_to(col_weight, w.shape).reshape(-1)
    lab = labels.reshape(-1).astype(np.int64)
    mass = np.bincount(lab, weights=wt, minlength=k)
    sums = np.bincount(lab, weights=wt * w.reshape(-1), minlength=k)
    means = np.where(mass > 0, sums / np.where(mass > 0, mass, 1.0), grid)
    used = np.flatnonzero(np.bincount(lab, minlength=k))
    # Each used cell's mean, rounded the way a table entry is; cells may merge or swap order.
    each = np.array([round_centroids(np.array([m]), dtype)[1][0] for m in means[used]])
    table, rebuilt = round_centroids(means[used], dtype)
    remap = np.zeros(k, dtype=np.int64)
    remap[used] = np.searchsorted(rebuilt, each)
    return table, remap[labels].astype(np.uint8)


def calibrate_clustered(
    ct: ClusteredTensor,
    original: torch.Tensor,
    h: np.ndarray,
    *,
    damp: float = DEFAULT_DAMP,
    lam: float = 0.0,
    refit: bool = False,
    name: str | None = None,
) -> ClusteredTensor:
    """Return ``ct`` relabelled by `gptq_labels` against ``original`` (its source weight) and H.

    Each group of consecutive chunks that share one table (a codebook stored in several chunks,
    `ClusteredTensor.rechunk`) is relabelled on that table, so the tables and chunking stay as
    they were; with ``refit`` each table is replaced by its cells' means weighted by diag(H),
    rounded by the table rules (entries may merge, so K can shrink). ``lam`` > 0 adds the
    entropy term with code lengths from ``ct``'s own label frequencies. ``quality`` is
    recomputed (``bits_per_weight``, if present, moves with the label entropy). ``name`` only
    labels error messages.
    """
    where = f"tensor {name!r}: " if name else ""
    shape = tuple(ct.shape)
    if tuple(original.shape) != shape:
        raise UsageError(f"{where}original shape {tuple(original.shape)} != clustered shape {shape}")
    if len(shape) != 2:
        raise UsageError(f"{where}calibration needs a matrix (out × in), got shape {shape}")
    cols = shape[1]
    if np.shape(h) != (cols, cols):
        raise UsageError(f"{where}H has shape {np.shape(h)}, the weight {cols} columns: need ({cols}, {cols})")
    dtype = name_of(ct.dtype)
    try:
        u = inverse_cholesky(h, damp)
    except UsageError as e:
        raise UsageError(f"{where}{e}") from e
    col_weight = np.maximum(np.diag(np.asarray(h, dtype=np.float64)), 0.0)
    if not (col_weight > 0).any():
        col_weight = np.ones(cols)
    w = original.detach().cpu().to(torch.float64).numpy()
    old = to_numpy(ct.labels)
    labels = np.empty(shape, dtype=np.uint8)
    tables: list[torch.Tensor] = []
    ranges = ct.row_ranges()
    i = 0
    while i < len(ranges):
        j = i + 1  # chunks i..j-1 share one table
        while j < len(ranges) and torch.equal(ct.centroids[j], ct.centroids[i]):
            j += 1
        a, b = ranges[i][0], ranges[j - 1][1]
        grid = _rebuilt(ct.centroids[i], dtype)
        bits = _code_bits(old[a:b], grid.size) if lam > 0 else None
        lab = gptq_labels(w[a:b], h, grid, lam=lam, code_bits=bits, u=u)
        table = ct.centroids[i]
        if refit:
            t16, lab = _refit(w[a:b], lab, grid, col_weight, dtype)
            table = from_numpy(t16, "F16")
        labels[a:b] = lab
        tables += [table] * (j - i)
        i = j
    out = ClusteredTensor(
        labels=from_numpy(labels, "U8"), centroids=tables, chunk_rows=ct.chunk_rows, dtype=ct.dtype, shape=ct.shape,
    )
    q = quality(original, out)
    if ct.quality:
        for key, v in ct.quality.items():
            if key not in q:
                q[key] = v
        if "bits_per_weight" in ct.quality and "label_entropy_bits" in ct.quality:
            q["bits_per_weight"] = ct.quality["bits_per_weight"] + q["label_entropy_bits"] - ct.quality["label_entropy_bits"]
    return ClusteredTensor(
        labels=out.labels, centroids=out.centroids, chunk_rows=out.chunk_rows, dtype=out.dtype, shape=out.shape, quality=q,
    )

