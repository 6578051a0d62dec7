"""Per-matrix sensitivity and the per-layer K budget ("the smallest K whose isolated replacement
raises perplexity by at most D").

`sensitivity` loads a dense Hugging Face causal LM folder, measures the perplexity of some text,
then, for every matrix the cluster policy would cluster and every candidate K, clusters only
that matrix (exact k-means, one codebook per matrix, as ``wcfmt pack --k K`` does), measures the
perplexity again and puts the weight back. Results are cached in a JSON file keyed by the source
files' SHA-256, the token ids and the settings, and saved after every matrix, so an interrupted run
resumes. `choose_k` applies the budget rule; `pack_with_budget` packs with the chosen K per matrix
(``k_overrides={re.escape(name) + "$": K}``) and records the budget in each header's
``settings.extra`` (``budget_ppl``, ``budget_ks``, ``budget_tokens``, ``budget_key``).

Cost: one forward pass over the text per (matrix, K); keep the text short (a few thousand tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UsageError

__all__ = ["DEFAULT_KS", "Sensitivity", "sensitivity", "choose_k", "pack_with_budget", "perplexity", "cache_dir"]

#: Candidate K values (every power of two the paper's rule usually picks from).
DEFAULT_KS: tuple[int, ...] = (16, 32, 64)
_VERSION = 1  # of the cache layout and of what is measured


def cache_dir() -> Path:
    """Where caches go by default: ``$WCFMT_CACHE`` or ``$XDG_CACHE_HOME/wcfmt`` (``~/.cache/wcfmt``)."""
    env = os.environ.get("WCFMT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wcfmt"


def perplexity(model: Any, ids: torch.Tensor, window: int = 512, batch: int = 4) -> float:
    """exp(mean next-token NLL) over consecutive ``window``-token windows of ``ids``, ``batch``
    windows per forward pass. `UsageError` when ``ids`` is shorter than one window."""
    n = len(ids) // window
    if n == 0:
        raise UsageError(f"{len(ids)} tokens is less than one window of {window}")
    w = ids[: n * window].reshape(n, window)
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = w[i : i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            scored += x[:, 1:].numel()
    return math.exp(nll / scored)


@dataclass
class Sensitivity:
    """Base perplexity and, per matrix and K, the perplexity with only that matrix clustered."""

    base_ppl: float
    ppl: dict[str, dict[int, float]]
    ks: list[int]
    tokens: int
    window: int
    key: str
    cache: Path | None = None
    seconds: float = 0.0
    measured: int = 0  # (matrix, K) pairs evaluated in this call (the rest came from the cache)
    extra: dict[str, Any] = field(default_factory=dict)

    def delta(self, name: str, k: int) -> float:
        return self.ppl[name][k] - self.base_ppl

    def to_dict(self) -> dict[str, Any]:
        return {"base_ppl": self.base_ppl, "ks": self.ks, "tokens": self.tokens, "window": self.window,
                "key": self.key, "ppl": {n: {str(k): v for k, v in d.items()} for n, d in self.ppl.items()}}

    def format_table(self) -> str:
        head = ["name"] + [f"K={k} +ppl" for k in self.ks]
        rows = [[n] + [f"{self.delta(n, k):+.4f}" if k in d else "-" for k in self.ks] for n, d in self.ppl.items()]
        widths = [max([len(h)] + [len(r[j]) for r in rows]) for j, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in [head] + rows]
        return "\n".join(lines + ["", f"base perplexity {self.base_ppl:.4f} over {self.tokens} tokens "
                                      f"(windows of {self.window}); cache {self.cache}"])


def choose_k(s: Sensitivity, budget_ppl: float) -> dict[str, int]:
    """The paper's rule: per matrix, the smallest K whose isolated replacement raises perplexity
    by at most ``budget_ppl``; the largest candidate when none does.

    >>> s = Sensitivity(10.0, {"a": {16: 10.5, 32: 10.05, 64: 10.01}, "b": {16: 10.02, 32: 10.0, 64: 10.0}},
    ...                 [16, 32, 64], 1024, 512, "")
    >>> choose_k(s, 0.1)
    {'a': 32, 'b': 16}
    >>> choose_k(s, 0.001)
    {'a': 64, 'b': 32}
    """
    if not (isinstance(budget_ppl, (int, float)) and math.isfinite(budget_ppl) and budget_ppl >= 0):
        raise UsageError(f"budget_ppl must be a number >= 0, got {budget_ppl!r}")
    out = {}
    for name, d in s.ppl.items():
        ks = sorted(d)
        out[name] = next((k for k in ks if d[k] - s.base_ppl <= budget_ppl), ks[-1])
    return out


def _token_ids(src: Path, text: Any) -> torch.Tensor:
    from .heal import _token_ids as ids

    return ids(src, text)


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.glob("*.safetensors")):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def sensitivity(
    src: str | os.PathLike[str],
    text: str | os.PathLike[str] | torch.Tensor | Sequence[int],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    tokens: int = 2048,
    window: int = 512,
    tensors: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    cache: str | os.PathLike[str] | None | bool = None,
    threads: int | None = None,
    progress: bool = False,
) -> Sensitivity:
    """Measure every clusterable matrix's isolated perplexity increase at each K in ``ks``.

    ``src``: a dense Hugging Face causal LM folder (safetensors), or a Hub repository
    (``hf://org/name[@rev]``). ``text``: a UTF-8 file
    (tokenized with the folder's tokenizer) or token ids, of which the first ``tokens`` are
    scored in windows of ``window``. ``tensors``: a regex limiting the matrices measured;
    ``include``/``exclude`` as for `wcfmt.pack`. ``cache``: the JSON file, or a folder for one
    file per key (default: `cache_dir`; False: no cache).
    """
    from safetensors import safe_open as st_open
    from transformers import AutoModelForCausalLM

    from ..cluster import ClusterPolicy, cluster_tensor
    from ..constants import MAX_K
    from ..progress import bar

    from ..io.sources import resolve_source

    t0 = time.perf_counter()
    src = resolve_source(src)  # a Hub repository (hf://org/name) is downloaded (cached) first
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise UsageError(f"{src}: sensitivity needs a dense Hugging Face model folder (config.json, *.safetensors)")
    ks = sorted(set(ks))
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K for k in ks):
        raise UsageError(f"ks must be integers in 1..{MAX_K}, got {list(ks)!r}")
    ids = _token_ids(src, text)[:tokens]
    if len(ids) < window:
        raise UsageError(f"{text}: {len(ids)} tokens, fewer than one window of {window}")
    ids = ids[: len(ids) // window * window]
    rx = re.compile(tensors) if tensors is not None else None
    policy = ClusterPolicy(include=list(include) if include else None, exclude=list(exclude) if exclude else None)

    key = hashlib.sha256(json.dumps({
        "v": _VERSION, "src": _source_hash(src), "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "window": window, "method": "exact", "chunk_rows": None,
    }, sort_keys=True).encode()).hexdigest()[:32]  # fmt: skip
    if cache is False:
        path = None
    else:
        path = Path(cache) if cache not in (None, True) else cache_dir()
        if cache in (None, True) or path.is_dir():
            path = path / f"sensitivity-{key}.json"
    stored: dict[str, Any] = {}
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        if stored.get("key") != key:
            stored = {}
    ppl: dict[str, dict[int, float]] = {n: {int(k): v for k, v in d.items()} for n, d in stored.get("ppl", {}).items()}

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    measured = 0
    try:
        from ..io.transformers_io import _quiet_transformers

        with _quiet_transformers():  # no "Loading weights" bar in a library call
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        base = stored.get("base_ppl")
        if base is None:
            base = perplexity(model, ids, window)
        params = dict(model.named_parameters())
        names: list[str] = []
        files = sorted(src.glob("*.safetensors"))
        where_is: dict[str, Path] = {}
        for p in files:
            with st_open(str(p), "pt") as f:
                for n in f.keys():
                    where_is[n] = p
                    sl = f.get_slice(n)
                    if (rx is None or rx.search(n)) and n in params and policy.decide(n, sl.get_shape(), sl.get_dtype()):
                        names.append(n)
        if not names:
            raise UsageError(f"{src}: no clusterable matrix" + (f" matches {tensors!r}" if rx else ""))
        todo = [(n, k) for n in names for k in ks if k not in ppl.get(n, {})]
        with bar(progress, total=len(todo), desc="sensitivity", unit="eval") as pb:
            for n in names:
                missing = [k for k in ks if k not in ppl.get(n, {})]
                if not missing:
                    continue
                with st_open(str(where_is[n]), "pt") as f:
                    w = f.get_tensor(n)
                param = params[n]
                keep = param.detach().clone()
                for k in missing:
                    ct = cluster_tensor(w, k, None, threads=threads or 1)
                    with torch.no_grad():
                        param.copy_(ct.decode().to(param.dtype))
                    ppl.setdefault(n, {})[k] = perplexity(model, ids, window)
                    measured += 1
                    pb.set_postfix_str(f"{n} K={k}")
                    pb.update(1)
                with torch.no_grad():
                    param.copy_(keep)
                if path is not None:
                    _save(path, key, base, ppl)
    finally:
        torch.set_num_threads(old_threads)
    if path is not None:
        _save(path, key, base, ppl)
    return Sensitivity(
        base_ppl=base, ppl={n: {k: ppl[n][k] for k in ks} for n in names}, ks=ks, tokens=len(ids), window=window,
        key=key, cache=path, seconds=time.perf_counter() - t0, measured=measured,
    )


def _save(path: Path, key: str, base: float, ppl: dict[str, dict[int, float]]) -> None:
    from ..atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(
        {"key": key, "version": _VERSION, "base_ppl": base,
         "ppl": {n: {str(k): v for k, v in d.items()} for n, d in ppl.items()}}, indent=1))  # fmt: skip


def pack_with_budget(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    budget_ppl: float,
    text: str | os.PathLike[str] | torch.Tensor | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    tokens: int = 2048,
    window: int = 512,
    cache: str | os.PathLike[str] | None | bool = None,
    force: bool = False,
    progress: bool = False,
    **pack_kwargs: Any,
) -> tuple[Any, dict[str, int], Sensitivity]:
    """`wcfmt.pack` with each matrix's K chosen by `choose_k` from its measured sensitivity.

    Returns ``(pack report, {name: K}, sensitivity)``. Other keywords go to `wcfmt.pack`
    (``include``, ``exclude``, ``level``, ``threads``, ...); ``k`` and ``bits`` are not allowed
    (the budget decides K). The output appears only when complete.
    """
    from ..packing import pack
    from ..edit import rewrite_centroids
    from ..io.folder import building_folder, check_output, find_wclust_shards
    from ..io.card import CARD_NAME, CardOptions, write_card

    for bad in ("k", "bits", "k_overrides", "bits_overrides"):
        if pack_kwargs.get(bad) is not None:
            raise UsageError(f"pack_with_budget chooses K itself; do not pass {bad}")
    from ..io.sources import HubSource, parse_source, resolve_source

    where = parse_source(src) if isinstance(src, str) else None
    if pack_kwargs.get("base_model") is None and isinstance(where, HubSource):
        pack_kwargs["base_model"] = where.repo_id  # as pack names a Hub source in the card
    src, dst = resolve_source(src, token=pack_kwargs.get("token")), Path(dst)
    check_output(src, dst, force=force, want_dir=True)
    s = sensitivity(src, text, ks=ks, tokens=tokens, window=window, cache=cache, progress=progress,
                    include=pack_kwargs.get("include"), exclude=pack_kwargs.get("exclude"),
                    threads=pack_kwargs.get("threads"))  # fmt: skip
    chosen = choose_k(s, budget_ppl)
    overrides = {re.escape(n) + "$": k for n, k in chosen.items()}
    note = {"budget_ppl": repr(float(budget_ppl)), "budget_ks": ",".join(map(str, s.ks)),
            "budget_tokens": str(s.tokens), "budget_key": s.key}  # fmt: skip
    push = pack_kwargs.pop("push_to_hub", None)  # after the budget notes are in, not from inside pack
    with building_folder(dst, force=force) as tmp:
        report = pack(src, tmp, k=max(s.ks), k_overrides=overrides, force=True, progress=progress, **pack_kwargs)
        for p in find_wclust_shards(tmp).paths:
            rewrite_centroids(p, {}, settings_extra=note)
        if (tmp / CARD_NAME).is_file():  # pack named the temporary folder in its card; name the output
            options = CardOptions(base_model=pack_kwargs.get("base_model"), quality_note=pack_kwargs.get("quality_note"),
                                  remote_code=bool(pack_kwargs.get("remote_code")), repo_id=push or dst.name)  # fmt: skip
            write_card(tmp, src, sum(f.source_bytes for f in report.files), options)
    report.dst = dst
    for f in report.files:
        f.dst = dst / f.dst.name
    if push:
        from ..io.hub import push_to_hub

        report.pushed = push_to_hub(dst, push, token=pack_kwargs.get("token"))
    return report, chosen, s
