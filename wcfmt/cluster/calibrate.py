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
- `collect_random_diagonals`: H's diagonal alone (E[x_j²] per input column) from random tokens:
  no text, one forward pass (``pack(calib="random")``, automatic for causal LMs). With a
  diagonal H nothing is fed on: `gptq_labels` chooses every label at once (`column_weights`).
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
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..clustered_tensor import ClusteredTensor
from ..dtypes import from_numpy, name_of, to_numpy
from ..errors import UsageError
from .kmeans import rebuilt_of_each, round_centroids
from .report import quality

if TYPE_CHECKING:
    from .layerwise import Statistics

__all__ = [
    "DEFAULT_CALIB_TOKENS",
    "DEFAULT_DAMP",
    "SELF_CALIB",
    "RANDOM_CALIB",
    "NO_CALIB",
    "sample_text",
    "collect_hessians",
    "collect_random_diagonals",
    "collect_text_statistics",
    "collect_random_statistics",
    "random_windows",
    "inverse_cholesky",
    "gptq_labels",
    "column_weights",
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


#: A calibration text is read in windows of this many tokens, this many windows per forward pass.
TEXT_WINDOW, TEXT_BATCH = 512, 4

#: ``calib`` value meaning "sample the calibration text from the model itself", and how:
#: sequences × tokens, sampled at temperature 1 from the BOS token with this torch seed.
SELF_CALIB = "self"
SELF_SEQUENCES, SELF_TOKENS, SELF_SEED = 8, 560, 0

#: ``calib`` value meaning "weigh input columns by what random tokens make of them" (no text,
#: no sampling: one forward pass), and how many: sequences × tokens, ids drawn with this seed.
RANDOM_CALIB = "random"
RANDOM_SEQUENCES, RANDOM_TOKENS, RANDOM_SEED = 8, 128, 0

#: ``calib`` value meaning "no calibration" (``pack`` otherwise uses `RANDOM_CALIB` where it can).
NO_CALIB = "none"


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
    folder = Path(model_folder)
    tok, model = _load_model(folder, "calib='self'")
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
def _load_model(folder: Path, what: str, tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(tokenizer or None, causal LM in ``dtype``, eval mode) of a Hugging Face folder, or `UsageError`."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: {what} needs a Hugging Face model folder (no config.json)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is in the test extra
        raise UsageError(f"{what} runs the model with transformers: pip install transformers") from e
    hf_logging.disable_progress_bar()  # quiet in library calls
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: the check below says it in one line
    try:
        tok = AutoTokenizer.from_pretrained(folder) if tokenizer else None
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"{folder}: cannot load the model for {what} ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers re-initialises weights that are missing or do not fit the config, with a
    # warning; statistics of such a model would be noise, so that is an error here.
    from ..errors import first_few
    from ..io.folder import untied_missing

    unfit = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    missing = untied_missing(model.state_dict(keep_vars=True), info.get("missing_keys", []))
    if unfit or missing:
        problem = f"weights that do not fit its config: {first_few(unfit)}" if unfit else f"missing weights: {first_few(missing)}"
        raise UsageError(f"{folder}: cannot load the model for {what} ({problem})")
    return tok, model.eval()


def _keep(names: Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    return set(names).__contains__


def collect_hessians(
    model_folder: str | Path,
    text: str,
    n_tokens: int = DEFAULT_CALIB_TOKENS,
    *,
    names: Collection[str] | Callable[[str], bool] | None = None,
    window: int = TEXT_WINDOW,
    batch: int = TEXT_BATCH,
    progress: bool = False,
    diagonal: bool = False,
    path: str | None = None,
) -> dict[str, np.ndarray]:
    """Return ``{weight name: H}``, H = mean over tokens of xxᵀ (float64, in × in), per linear layer.

    The model in ``model_folder`` (a Hugging Face causal LM folder) runs in float32 on the CPU over
    the first ``n_tokens`` tokens of ``text`` (fewer if the text is shorter), in windows of
    ``window`` tokens; a forward hook on every ``torch.nn.Linear`` sums its inputs' outer
    products. ``names`` keeps only some weights (a set of names like
    ``"model.layers.0.mlp.up_proj.weight"``, or a predicate). ``diagonal``: only H's diagonal,
    E[x_j²] per input column (a vector). The model runs one decoder block at a time where it can
    (``path``: see `wcfmt.cluster.layerwise.second_moments`; `collect_text_statistics` also says
    which ran). Raises `UsageError` when the folder, the text or transformers is missing.
    """
    return collect_text_statistics(model_folder, text, n_tokens, names=names, window=window, batch=batch,
                                   progress=progress, diagonal=diagonal, path=path).moments


def collect_text_statistics(
    model_folder: str | Path,
    text: str,
    n_tokens: int = DEFAULT_CALIB_TOKENS,
    *,
    names: Collection[str] | Callable[[str], bool] | None = None,
    window: int = TEXT_WINDOW,
    batch: int = TEXT_BATCH,
    progress: bool = False,
    diagonal: bool = False,
    path: str | None = None,
) -> "Statistics":
    """`collect_hessians` as a `wcfmt.cluster.layerwise.Statistics`: the moments, and which path
    ran (block by block, or the whole model) and why."""
    from .layerwise import second_moments

    folder = Path(model_folder)
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 2:
        raise UsageError(f"n_tokens must be an integer >= 2, got {n_tokens!r}")
    _config_of(folder, "calibration")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"{folder}: cannot load the model for calibration (its tokenizer: {e})") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise UsageError(f"calibration text has {len(ids)} tokens; need at least 2")
    ids = torch.tensor(ids[:n_tokens], dtype=torch.long)
    win = max(2, min(window, len(ids)))
    n_windows = max(1, len(ids) // win)
    windows = ids[: n_windows * win].reshape(n_windows, win)
    return second_moments(folder, windows, _keep(names), batch=batch, progress=progress, diagonal=diagonal,
                          dtype=torch.float32, what="calibration", path=path)


def _config_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _row_length(config: Any, tokens: int) -> int:
    """``tokens``, or the model's positions (``max_position_embeddings`` / ``n_positions``) when
    it has fewer."""
    for key in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and 2 <= limit < tokens:
            tokens = limit
    return tokens


def random_windows(config: Any, sequences: int = RANDOM_SEQUENCES, tokens: int = RANDOM_TOKENS,
                   seed: int = RANDOM_SEED) -> torch.Tensor:
    """``sequences`` × ``tokens`` token ids drawn uniformly (torch seed ``seed``) from a model
    config's ``vocab_size`` less its BOS, EOS and padding ids, each row starting with the BOS
    token when the config names one (as a document does); rows are cut to the model's
    positions (``max_position_embeddings`` / ``n_positions``) when it has fewer. From the config,
    not the tokenizer: loading a tokenizer costs more than the forward pass it would feed."""
    tokens = _row_length(config, tokens)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    bos = _config_ids(getattr(config, "bos_token_id", None))
    special = set(bos) | set(_config_ids(getattr(config, "eos_token_id", None))) | set(
        _config_ids(getattr(config, "pad_token_id", None)))
    pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if pool.numel() == 0:
        raise UsageError(f"the model's config has no ordinary tokens to draw from (vocab_size {vocab})")
    g = torch.Generator().manual_seed(seed)
    ids = pool[torch.randint(0, pool.numel(), (sequences, tokens), generator=g)]
    if bos and 0 <= bos[0] < vocab:
        ids[:, 0] = bos[0]
    return ids


def collect_random_diagonals(
    model_folder: str | Path,
    *,
    names: Collection[str] | Callable[[str], bool] | None = None,
    sequences: int = RANDOM_SEQUENCES,
    tokens: int = RANDOM_TOKENS,
    seed: int = RANDOM_SEED,
    progress: bool = False,
    path: str | None = None,
) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """``({weight name: E[x_j²]}, (sequences, tokens))``: per linear layer, the diagonal of its
    inputs' second moments, from the model reading random tokens (`random_windows`; the shape of
    what it read, rows cut to the model's positions): no text at all. What sets a column's importance is mostly the model's
    own scale structure (norm gains, outlier channels), which random tokens excite as text
    does: on SmolLM2-135M the log of these diagonals correlates with the ones from sampled text
    at 0.86 (median over layers), and weighting columns by them took ``--bits 5.43`` from 1.050×
    to 1.015× bf16 perplexity, as the text's own diagonals did (1.017×; tools/RESULTS-smollm2.md)."""
    stats = collect_random_statistics(model_folder, names=names, sequences=sequences, tokens=tokens, seed=seed,
                                      progress=progress, path=path)
    return stats.moments, stats.windows


def collect_random_statistics(
    model_folder: str | Path,
    *,
    names: Collection[str] | Callable[[str], bool] | None = None,
    sequences: int = RANDOM_SEQUENCES,
    tokens: int = RANDOM_TOKENS,
    seed: int = RANDOM_SEED,
    progress: bool = False,
    path: str | None = None,
) -> "Statistics":
    """`collect_random_diagonals` as a `wcfmt.cluster.layerwise.Statistics`: the diagonals, the
    windows' shape, and which path ran (block by block where the model allows it, ``path``:
    see `wcfmt.cluster.layerwise.second_moments`) and why. The token ids come from the config
    alone, so a model run block by block is never loaded whole."""
    from .layerwise import second_moments

    folder = Path(model_folder)
    config = _config_of(folder, "calib='random'")
    windows = random_windows(config, sequences, tokens, seed)
    return second_moments(folder, windows, _keep(names), batch=sequences, progress=progress, diagonal=True,
                          dtype=_statistics_dtype(folder), what="calib='random'", path=path)


def _config_of(folder: Path, what: str) -> Any:
    """The transformers config of a Hugging Face folder, or `UsageError`."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: {what} needs a Hugging Face model folder (no config.json)")
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - transformers is in the test extra
        raise UsageError(f"{what} runs the model with transformers: pip install transformers") from e
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{folder}: cannot load the model for {what} ({e})") from None


def _statistics_dtype(folder: Path) -> torch.dtype:
    """bfloat16 for a 16-bit checkpoint, else float32: E[x²] per column only sets weights rounded
    to ¼ octave, and SmolLM2 (bf16) loads in 0.13 s and runs 1,024 tokens in 0.66 s in bfloat16
    against 2.0 s and 1.8 s in float32, at half the memory (ad-hoc timing; the weights' log
    correlates with float32's at ≥ 0.999 per matrix)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return torch.bfloat16 if name in ("bfloat16", "float16") else torch.float32


class _MomentHooks:
    """Forward pre-hooks on every kept ``nn.Linear`` of ``model`` that sum its inputs' xxᵀ (or
    its diagonal); ``modules``: the hooked modules; `means` divides by the tokens read."""

    def __init__(self, model: Any, keep: Callable[[str], bool], diagonal: bool) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.modules: list[torch.nn.Module] = []
        self._hooks: list[Any] = []
        # Layers fed the same tensor (q/k/v, gate/up) share one product: the hooks of one input
        # run one after another, so the last input and its product are all that is kept. Products
        # are float32 per batch (H is dampened by 1% before use), summed in float64 across batches.
        self._last: list[Any] = [None, None]
        self._diagonal = diagonal
        #: False: the hooks let inputs pass uncounted (a block run again after it changed)
        self.enabled = True
        for mname, module in model.named_modules():
            wname = f"{mname}.weight"
            if isinstance(module, torch.nn.Linear) and keep(wname):
                self._hooks.append(module.register_forward_pre_hook(self._hook_for(wname)))
                self.modules.append(module)

    def _hook_for(self, name: str) -> Callable[..., None]:
        sums, last, diagonal = self.sums, self._last, self._diagonal

        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self.enabled:
                return
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                prod = (x * x).sum(0) if diagonal else x.T @ x
                last[:] = [args[0], prod.to(torch.float64)]
            s = sums.get(name)
            sums[name] = last[1].clone() if s is None else s.add_(last[1])

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._last[:] = [None, None]

    def means(self, n: int) -> dict[str, np.ndarray]:
        return {name: (s / n).numpy() for name, s in self.sums.items()}


def _second_moments(
    model: Any, windows: torch.Tensor, keep: Callable[[str], bool], *, batch: int, progress: bool, diagonal: bool
) -> dict[str, np.ndarray]:
    """Run ``model`` (the whole model, in memory) over the rows of ``windows`` and return mean
    xxᵀ (or its diagonal) of the input of every kept ``nn.Linear`` weight."""
    hooks = _MomentHooks(model, keep, diagonal)
    from ..progress import bar

    # Only the layers' inputs are wanted: unless the LM head's own H is, causal LMs that can skip
    # the logits of all but the last position (transformers' ``logits_to_keep``) spare the LM
    # head's product (SmolLM2: a sixth of the forward pass).
    head = model.get_output_embeddings()
    head_wanted = any(m is head for m in hooks.modules)
    skip_logits = not head_wanted and "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if skip_logits else {}
    n_windows = windows.shape[0]
    try:
        with torch.inference_mode(), bar(progress, total=n_windows, desc="calibrate", unit="window") as b:
            for i in range(0, n_windows, batch):
                model(input_ids=windows[i : i + batch], **extra)
                b.update(len(windows[i : i + batch]))
    finally:
        hooks.remove()
    return hooks.means(windows.numel())


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


def _padded(grid: np.ndarray, code_bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The grid and its code lengths with `_WINDOW` infinitely costly copies of each end, so that
    the candidates nearest ± `_WINDOW` of any label are valid indices (never chosen past an end)."""
    assert code_bits is not None
    ends = np.full(_WINDOW, np.inf)
    padded = np.concatenate((np.full(_WINDOW, grid[0]), grid, np.full(_WINDOW, grid[-1])))
    return padded, np.concatenate((ends, code_bits, ends))


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
        padded, padded_bits = _padded(grid, code_bits)
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
      second moments (any positive scale), or a vector of ``cols``: H's diagonal alone (no
      correlations, so no error to feed on: every label is chosen at once, see `_diagonal`);
      ``rebuilt``: the values the labels rebuild to.
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
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise UsageError(f"lam must be a finite number >= 0, got {lam!r}")
    bits = None
    if lam > 0:
        if code_bits is None:
            raise UsageError("an entropy term (lam > 0) needs code_bits, one per grid value")
        bits = np.asarray(code_bits, dtype=np.float64).reshape(-1)
        if bits.size != grid.size or not np.isfinite(bits).all():
            raise UsageError(f"code_bits must hold {grid.size} finite values, got {bits.size}")
    if u is None and np.ndim(h) == 1:
        return _diagonal(w, column_weights(h, damp, w.shape[1]), grid, float(lam), bits)
    if u is None:
        u = inverse_cholesky(h, damp)
    if u.shape != (w.shape[1], w.shape[1]):
        raise UsageError(f"H is {u.shape[0]} × {u.shape[1]} but the weight has {w.shape[1]} columns")
    return _gptq(w, u, grid, float(lam), bits)


#: `column_weights` are rounded to this many steps per octave (ω within ±9%, far finer than
#: random tokens estimate it): the labels do not depend on the last bits of the statistics, and
#: a tensor has few distinct ω (`_diagonal_16bit` builds a table for each).
_OMEGA_STEPS = 4


#: No column weighs less than this (ω is relative to the matrix's mean). Random tokens can
#: under-rate a column that text relies on, and at coarse grids the entropy term then moves its
#: weights far: SmolLM2 at `--bits 3.5` gave 1.444× bf16 with weights unbounded below, 1.370×
#: without weights, 1.327× with this floor; at 5.43 bits 1.015× either way (means of ±0.03).
_OMEGA_FLOOR = 0.25


def column_weights(d: np.ndarray, damp: float = DEFAULT_DAMP, cols: int | None = None) -> np.ndarray:
    """ω_j of a diagonal H = diag(d): what `inverse_cholesky` makes of it, 1/U_jj², i.e. d_j over
    the mean of the positive d, plus ``damp`` (an input that never fires: 1 + damp), at least
    `_OMEGA_FLOOR`, rounded to 1/`_OMEGA_STEPS` of an octave."""
    d = np.array(d, dtype=np.float64).reshape(-1)
    if cols is not None and d.size != cols:
        raise UsageError(f"H's diagonal has {d.size} entries but the weight has {cols} columns")
    if not np.isfinite(d).all():
        raise UsageError("H holds NaN or infinite values")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise UsageError(f"damp must be > 0, got {damp!r}")
    dead = d <= 0
    scale = float(d[~dead].mean()) if (~dead).any() else 1.0
    omega = np.maximum(np.where(dead, 1.0, d / scale) + damp, _OMEGA_FLOOR)
    return np.exp2(np.round(np.log2(omega) * _OMEGA_STEPS) / _OMEGA_STEPS)


#: Weights per block of `_diagonal`'s vectorised choice (its candidates' costs stay in cache).
_DIAG_BLOCK = 1 << 16


def _diagonal(w: np.ndarray, omega: np.ndarray, grid: np.ndarray, lam: float, code_bits: np.ndarray | None) -> np.ndarray:
    """`_gptq` for a diagonal H (U_jj = 1/√ω_j and nothing above the diagonal, so no error is
    fed on), all weights at once: the nearest grid value, or with an entropy term the cheapest
    of the `_WINDOW` values on each side by ω_j (w − c)² + λ·bits(c), the first (lowest) of ties."""
    rows, cols = w.shape
    mids = (grid[1:] + grid[:-1]) / 2
    out = np.empty((rows, cols), dtype=np.uint8)
    entropy = lam != 0.0 and code_bits is not None
    if entropy:
        padded, padded_bits = _padded(grid, code_bits)
        offsets = np.arange(2 * _WINDOW + 1).reshape((-1,) + (1,) * w.ndim)
    step = max(1, _DIAG_BLOCK // max(1, cols))
    per_row = np.ndim(omega) == 2  # one ω per row, shape (rows, 1): `_diagonal_16bit`'s tables
    for a in range(0, rows, step):
        blk = w[a : a + step]
        om = omega[a : a + step] if per_row else omega
        lab = np.searchsorted(mids, blk, side="left")
        if entropy:
            cand = lab[None] + offsets  # (candidates, *block): indices into the padded grid
            cost = padded[cand]
            cost -= blk
            cost *= cost
            cost *= om
            cost += lam * padded_bits[cand]
            lab = np.take_along_axis(cand, cost.argmin(axis=0)[None], axis=0)[0] - _WINDOW  # first of ties
        out[a : a + step] = lab
    return out


def _diagonal_16bit(
    bits: np.ndarray, dtype: str, omega: np.ndarray, grid: np.ndarray, lam: float, code_bits: np.ndarray | None
) -> np.ndarray:
    """`_diagonal` of a BF16/F16 matrix given as its bit patterns (rows × cols uint16), by tables:
    the label of every distinct value present for every distinct ω, then one gather per weight
    (on SmolLM2's matrices about 6× faster than weighing candidates per weight, by ad-hoc
    timing; the same labels)."""
    from .kmeans import _pattern_values

    rows, cols = bits.shape
    classes, col_class = np.unique(omega, return_inverse=True)
    present = np.flatnonzero(_counts(bits, 1 << 16))
    xv = _pattern_values(dtype)[present]
    table = _diagonal(np.broadcast_to(xv, (classes.size, xv.size)), classes[:, None], grid, lam, code_bits)
    lut_t = np.zeros((1 << 16, classes.size), dtype=np.uint8)
    lut_t[present] = table.T  # whole rows: far faster than scattering columns of a (classes, 65536) table
    lut = np.ascontiguousarray(lut_t.T).reshape(-1)
    base = col_class.astype(np.int64) << 16
    out = np.empty((rows, cols), dtype=np.uint8)
    step = max(1, _DIAG_BLOCK * 16 // max(1, cols))
    for a in range(0, rows, step):
        np.take(lut, base + bits[a : a + step], out=out[a : a + step])
    return out


# -- a ClusteredTensor, relabelled ------------------------------------------------------------
def _rebuilt(table: torch.Tensor, dtype: str) -> np.ndarray:
    from .kmeans import _rebuilt_values

    return _rebuilt_values(to_numpy(table), dtype)


def _counts(values: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount`` of small unsigned integers in blocks: bincount widens its input to int64,
    8 bytes a weight for the whole matrix at once."""
    flat = values.reshape(-1)
    out = np.zeros(minlength, dtype=np.int64)
    for a in range(0, flat.size, 1 << 22):
        out += np.bincount(flat[a : a + (1 << 22)], minlength=minlength)
    return out


def _code_bits(labels: np.ndarray, k: int) -> np.ndarray:
    counts = _counts(labels, k).astype(np.float64)
    n = counts.sum()
    # An empty cell costs as much as a label seen once: reachable, but not free.
    return -np.log2(np.maximum(counts, 1.0) / n)


def _refit(w: Callable[[int, int], np.ndarray], labels: np.ndarray, grid: np.ndarray, col_weight: np.ndarray,
           dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Cell means of the weights (rows ``w(a, b)`` as float64) weighted by column importance,
    rounded to a table; (table, new labels). Rows are read in blocks, so memory is a block's,
    not the matrix's four float64 copies."""
    k = grid.size
    n_rows, cols = labels.shape
    step = max(1, _DIAG_BLOCK * 16 // max(1, cols))
    mass = np.zeros(k)
    sums = np.zeros(k)
    count = np.zeros(k, dtype=np.int64)
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        lab = labels[a:b].reshape(-1)
        wt = np.broadcast_to(col_weight, (b - a, cols)).reshape(-1)
        mass += np.bincount(lab, weights=wt, minlength=k)
        sums += np.bincount(lab, weights=wt * w(a, b).reshape(-1), minlength=k)
        count += np.bincount(lab, minlength=k)
    means = np.where(mass > 0, sums / np.where(mass > 0, mass, 1.0), grid)
    used = np.flatnonzero(count)
    # Each used cell's mean, rounded the way a table entry is; cells may merge or swap order.
    each = rebuilt_of_each(means[used], dtype)
    table, rebuilt = round_centroids(means[used], dtype)
    remap = np.zeros(k, dtype=np.uint8)
    remap[used] = np.searchsorted(rebuilt, each)
    return table, remap[labels]


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
    """Return ``ct`` relabelled by `gptq_labels` against ``original`` (its source weight) and H
    (in × in, or a vector: its diagonal alone, see `gptq_labels`).

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
    diagonal = np.ndim(h) == 1
    if np.shape(h) != ((cols,) if diagonal else (cols, cols)):
        raise UsageError(f"{where}H has shape {np.shape(h)}, the weight {cols} columns: need ({cols}, {cols}) or ({cols},)")
    dtype = name_of(ct.dtype)
    u = omega = None
    try:
        if diagonal:
            omega = column_weights(h, damp, cols)
        else:
            u = inverse_cholesky(h, damp)
    except UsageError as e:
        raise UsageError(f"{where}{e}") from e
    h = np.asarray(h, dtype=np.float64)
    col_weight = np.maximum(h if diagonal else np.diag(h), 0.0)
    if not (col_weight > 0).any():
        col_weight = np.ones(cols)
    source = original.detach().cpu()
    patterns = None  # a diagonal H and a 16-bit source: labels by tables (`_diagonal_16bit`)
    if diagonal and dtype in ("BF16", "F16") and name_of(original.dtype) == dtype:
        patterns = to_numpy(source.contiguous()).view(np.uint16).reshape(shape)
    # GPTQ's loop wants the whole float64 matrix; the table path reads rows in blocks as it needs
    # them (`_refit`), so that its memory stays near the source's (an 8B model's MLP matrix: 0.1
    # GB in bf16, 0.5 GB more as float64, and more again for the refit's per-weight arrays).
    w = None if patterns is not None else source.to(torch.float64).numpy()

    def rows(a: int, b: int) -> np.ndarray:
        return w[a:b] if w is not None else source[a:b].to(torch.float64).numpy()
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
        if patterns is not None:
            assert omega is not None
            lab = _diagonal_16bit(patterns[a:b], dtype, omega, grid, lam, bits)
        else:
            assert w is not None
            lab = gptq_labels(w[a:b], h, grid, damp=damp, lam=lam, code_bits=bits, u=u)
        table = ct.centroids[i]
        if refit:
            t16, lab = _refit(lambda r0, r1, a=a: rows(a + r0, a + r1), lab, grid, col_weight, dtype)
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

