"""Every option of `wcfmt.pack`, in one pydantic model: `PackOptions`.

One source of truth for the pack options: the Python keywords, the ``wcfmt pack`` flags (each
field's ``flag``, ``metavar`` and description make its ``--help`` line, `add_arguments`), the
validation (every usage error about options is raised here, once, naming the keyword; the
command line shows it as the flag), and what the header records (`recorded`: the options that
decide the bytes, written as JSON into ``settings.extra["options"]``, so that
`PackOptions.from_file` packs another model — or the same one again — exactly as a file was
packed).

>>> o = PackOptions(bits=5.0, chunk_rows=128)
>>> o.bits, o.k, o.chunk_rows
(5.0, None, 128)
>>> PackOptions(k=16, bits=5.0)
Traceback (most recent call last):
...
wcfmt.errors.UsageError: give k or bits, not both (k=16, bits=5.0)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..cluster.policy import _check_bits, _check_k, _compile
from ..errors import UsageError

__all__ = [
    "PackOptions",
    "DEFAULT_BITS",
    "DEFAULT_BITS_CALIBRATED",
    "DEFAULT_EMBED_WEIGHT",
    "EMBED_IMPORTANCE",
    "EMBED_IMPORTANCE_CHOICES",
    "CALIB_CHOICES",
    "OPTIONS_KEY",
]

#: `pack`'s encoder when neither ``k`` nor ``bits`` is given: the entropy-constrained one at this
#: model-wide average of stored bits per clustered weight, token embedding / tied LM head included.
#: Chosen from SmolLM2-135M measurements (tools/eval_smollm2.py; README "Quality and size"): at
#: 6.0 bits 1.030× bf16 perplexity (mean of three nearby budgets, 1.024–1.042) with the files at
#: 0.375 of bf16, both better than the previous default (K = 64 k-means: 1.040×, 0.417); 5.5 bits
#: gives 0.343 but 1.053×. With `DEFAULT_EMBED_WEIGHT` (8): 1.018× at 0.374; 5.43 bits 1.050× at 0.339.
DEFAULT_BITS: float = 6.0

#: The default when the pack weighs input columns by activations (``calib``, including the
#: automatic ``calib="random"``): SmolLM2-135M at 5.43 bits with column weights from random
#: tokens: 1.015× bf16 perplexity (mean of three budgets ±0.03, 1.007–1.025) at 0.339 of the
#: bf16 file, where without them 5.43 bits gave 1.050× and 1.018× needed 6 bits (0.374).
DEFAULT_BITS_CALIBRATED: float = 5.43

#: In bits mode, how many times the squared error of a clustered token embedding / LM head counts
#: in the one-slope allocation (its cells ``1/√w`` as wide as the projections'; ×4 ≈ one more
#: bit, less near the 256-value cap). At equal slope (w = 1) SmolLM2-135M's tied embedding got
#: 5.0 bits and its projections 5.6, yet the tied head's error lands on the logits directly.
#: Measured with tools/eval_smollm2.py (mean of three budgets ±0.03; tools/RESULTS-smollm2.md):
#: w = 8 (embedding ≈ 6.2 bits) at --bits 6: 1.018× bf16 perplexity vs 1.030× at w = 1, files at
#: 0.374; at --bits 5.43 (0.339): 1.050× vs 1.068×. A budget of its own (5.3 + 6.0, 5.05 + 7.0)
#: gave the same (1.045×, 1.049×). It applies to output heads only (an LM head, or an embedding a
#: causal LM ties to it: `wcfmt.packing.plan.is_output_head`): on all-MiniLM-L6-v2, whose word
#: embedding is an input only, w = 8 took bits from the projections and lowered the embedding
#: cosine from 0.9979 / 0.9955 (mean / min) to 0.9938 / 0.9859.
DEFAULT_EMBED_WEIGHT: float = 8.0

#: `pack`'s ``embed_importance`` default: how the rows of a clustered token embedding / LM head
#: are weighted (``"tokens"``: by their tokens' expected frequency; ``"uniform"``: equally).
EMBED_IMPORTANCE: str = "uniform"
EMBED_IMPORTANCE_CHOICES = ("tokens", "uniform")

#: The named ``calib`` values (anything else is a text file): see `wcfmt.cluster.calibrate`.
CALIB_CHOICES = ("random", "self", "none")

#: The ``settings.extra`` key that holds the recorded options (JSON).
OPTIONS_KEY = "options"

#: field -> (lowest, highest, what the error message says it must be)
_INTEGER_RANGES: dict[str, tuple[float, float, str]] = {
    "k": (1, 256, "an integer in 1..256"),
    "chunk_rows": (1, math.inf, "a positive integer or None"),
    "threads": (1, math.inf, "a positive integer or None"),
    "calib_tokens": (2, math.inf, "an integer >= 2"),
    "level": (-131072, 22, "a zstd level, an integer in -131072..22"),
}


def _f(flag: str | None, description: str, *, metavar: str | None = None, group: str = "encode",
       default: Any = None, **cli: Any) -> Any:
    """A field with its command-line spelling: ``flag`` (None: Python only), ``metavar``, and
    ``group``: ``encode`` (decides the bytes: recorded in the header), ``run`` (how, not what:
    threads, force, progress), ``card`` (model card and Hub), ``budget`` (the ``--budget-ppl``
    route)."""
    extra = {"flag": flag, "metavar": metavar, "group": group, **cli}
    return Field(default=default, description=description, json_schema_extra=extra)


class PackOptions(BaseModel):
    """The options of one pack. Fields are named as ``wcfmt pack``'s flags (``--bits-embed`` →
    ``bits_embed``); None means "the default", which depends on the others (below).

    Build one with keywords (``PackOptions(bits=5.0)``), from a packed file
    (`from_file`), or let `wcfmt.pack` build it from its keywords. Invalid combinations raise
    `wcfmt.UsageError` at construction.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # --- the encoder -------------------------------------------------------------------------
    bits: float | None = _f(
        "--bits", "entropy-constrained encoder: B stored bits per clustered weight on average over the model, "
        "one slope for all tensors (the default encoder; default {DEFAULT_BITS_CALIBRATED:g} when input columns "
        "are weighted (--calib, automatic for causal LMs), else {DEFAULT_BITS:g})", metavar="B", exclusive="encoder")
    k: int | None = _f(
        "--k", "exact k-means with at most K centroids per codebook instead of --bits (the paper's setting)",
        metavar="K", exclusive="encoder")
    bits_embed: float | None = _f(
        "--bits-embed", "a budget of its own for token embeddings / LM heads (default: they share --bits' slope)",
        metavar="B")
    embed_weight: float | None = _f(
        "--embed-weight", "with --bits, count the squared error of token embeddings / LM heads W times in the "
        "one-slope allocation (each x4 is about one more bit for them; default {DEFAULT_EMBED_WEIGHT:g})",
        metavar="W")
    embeddings: bool | None = _f(
        "--embeddings", "cluster token embeddings and LM heads (default: yes with --bits, no with --k)",
        boolean=True)
    embed_importance: Literal["tokens", "uniform"] | None = _f(
        "--embed-importance", "weigh clustered embedding rows by their tokens' expected frequency from the "
        "folder's tokenizer.json (tokens: rare tokens' rows get coarser cells) or equally (uniform; "
        "default {EMBED_IMPORTANCE})", choices=EMBED_IMPORTANCE_CHOICES)
    calib: str | Path | None = _f(
        "--calib", "calibration: run the model (transformers) and choose labels by what each layer's inputs "
        "see. 'random' (the default with --bits for a causal-LM folder when transformers is installed): "
        "random tokens, each input column's error weighted by its E[x^2] (seconds); FILE: a text, GPTQ-style "
        "error feedback onto the encoder's grid; 'self': the same on text the model samples itself (minutes); "
        "'none': no calibration (a file of one of these names: ./NAME). A calibration asked for that would "
        "not fit in the memory available is refused before anything runs", metavar="FILE|random|self|none")
    calib_tokens: int | None = _f(
        "--calib-tokens", "tokens of --calib used (default 4096)", metavar="N")
    chunk_rows: int | None = _f(
        "--chunk-rows", "rows per centroid table (default: one table per tensor)", metavar="N")
    include: list[str] | None = _f(
        "--include", "also cluster tensors whose name matches RE (re.search; repeatable)", metavar="RE",
        repeat=True)
    exclude: list[str] | None = _f(
        "--exclude", "never cluster tensors whose name matches RE (wins over --include; repeatable)",
        metavar="RE", repeat=True)
    k_overrides: dict[str, int] | None = _f(
        None, "regex -> K for single tensors (k-means encoder; first match wins)")
    bits_overrides: dict[str, float] | None = _f(
        None, "regex -> bits for single tensors, each with a budget of its own (bits encoder; first match wins)")
    level: int | None = _f(
        "--level", "zstd level (default: parameters tuned for label planes)", metavar="L")

    # --- how it runs (not recorded) ----------------------------------------------------------
    threads: int | None = _f(
        "--threads", "encoder/clusterer threads (default: one clusterer per core, encoder min(4, cores))",
        metavar="N", group="run")
    force: bool = _f("--force", "replace DST if it exists", group="run", default=False, store_true=True)
    progress: bool = _f(None, "progress bars (the command line shows them on a terminal unless --quiet)",
                        group="run", default=False)

    # --- the model card and the Hub ----------------------------------------------------------
    base_model: str | None = _f(
        "--base-model", "Hub id of the source model, for the card's base_model (default: SRC when it is a Hub id)",
        metavar="ID", group="card")
    quality_note: str | None = _f(
        "--quality-note", "quality figures to state in the model card", metavar="TEXT", group="card")
    remote_code: bool = _f(
        "--remote-code", "also write a trust_remote_code shim so AutoModel*.from_pretrained loads the folder",
        group="card", default=False, store_true=True)
    push_to_hub: str | None = _f(
        "--push-to-hub", "verify and upload the packed folder to this repository", metavar="REPO_ID", group="card")
    token: str | bool | None = _f(
        "--token", "Hub token for a Hub SRC or --push-to-hub (default: stored login)", metavar="TOKEN", group="card")

    # --- per-matrix K from measured sensitivity (`wcfmt.sensitivity.pack_with_budget`) --------
    budget_ppl: float | None = _f(
        "--budget-ppl", "per-matrix K: the smallest of --budget-k whose isolated clustering raises perplexity on "
        "--text by at most D (runs `wcfmt sensitivity`; cached)", metavar="D", group="budget")
    text: str | None = _f("--text", "text for --budget-ppl", metavar="FILE", group="budget")
    budget_k: list[int] = _f("--budget-k", "candidate K values (default 16 32 64)", metavar="K", group="budget",
                             default=[16, 32, 64], nargs="+")
    tokens: int = _f("--tokens", "tokens of --text scored (default 2048)", metavar="N", group="budget",
                     default=2048)
    window: int = _f("--window", "perplexity window (default 512)", metavar="L", group="budget", default=512)
    cache_dir: str | None = _f("--cache-dir", "sensitivity cache folder (default ~/.cache/wcfmt)", metavar="DIR",
                               group="budget")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _usage_error(e) from None

    # --- validation (once, here) -------------------------------------------------------------
    @field_validator("bits", "bits_embed", mode="before")
    @classmethod
    def _bits(cls, v: Any, info: Any) -> Any:
        return v if v is None else _check_bits(v, info.field_name)

    @field_validator("k", "chunk_rows", "threads", "calib_tokens", "level", mode="before")
    @classmethod
    def _integers(cls, v: Any, info: Any) -> Any:
        lo, hi, what = _INTEGER_RANGES[info.field_name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise UsageError(f"{info.field_name} must be {what}, got {v!r}")
        return v

    @field_validator("embed_weight", mode="before")
    @classmethod
    def _embed_weight(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise UsageError(f"embed_weight must be a positive number, got {v!r}")
        return v

    @field_validator("embed_importance", mode="before")
    @classmethod
    def _embed_importance(cls, v: Any) -> Any:
        if v is not None and v not in EMBED_IMPORTANCE_CHOICES:
            raise UsageError(f"embed_importance must be one of {', '.join(EMBED_IMPORTANCE_CHOICES)}, got {v!r}")
        return v

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _patterns(cls, v: Any, info: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, str):  # list("proj") would silently become four one-letter regexes
            raise UsageError(f"{info.field_name} must be a list of regexes, not one string ({v!r})")
        v = list(v)
        _compile(v, info.field_name)
        return v

    @field_validator("k_overrides", "bits_overrides", mode="before")
    @classmethod
    def _overrides(cls, v: Any, info: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, Mapping):
            raise UsageError(f"{info.field_name} must be a dict of regex -> value, got {v!r}")
        _compile(list(v), info.field_name)
        check = _check_k if info.field_name == "k_overrides" else _check_bits
        for p, x in v.items():
            check(x, f"{info.field_name}[{p!r}]")
        return dict(v)

    @field_validator("calib", mode="before")
    @classmethod
    def _calib(cls, v: Any) -> Any:
        if isinstance(v, os.PathLike):
            return Path(v)  # a Path is always a text file, even one named "self" or "random"
        if v is not None and not isinstance(v, str):
            raise UsageError(f"calib must be 'random', 'self', 'none' or a text file, got {v!r}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "PackOptions":
        if self.k is not None and self.bits is not None:
            raise UsageError(f"give k or bits, not both (k={self.k!r}, bits={self.bits!r})")
        k_mode = self.k is not None or (self.bits is None and bool(self.k_overrides))
        if k_mode:
            for what in ("bits_embed", "embed_weight", "bits_overrides"):
                if getattr(self, what):
                    raise UsageError(f"{what} needs the bits encoder (give bits, not k)")
        elif self.k_overrides:
            raise UsageError("k_overrides needs the k-means encoder (give k, not bits)")
        if self.embed_importance not in (None, "uniform") and (k_mode or self.embeddings is False):
            raise UsageError("embed_importance needs clustered embeddings and the bits encoder")
        if self.calib == "random" and self.calib_tokens is not None:
            raise UsageError("calib_tokens does not apply to calib='random' (it reads a fixed sample of random tokens)")
        if self.calib_tokens is not None and self.calib in (None, "none"):
            raise UsageError("calib_tokens needs calib (a calibration text file)")
        if self.budget_ppl is not None:
            if self.text is None or self.k is not None or self.bits is not None or self.calib is not None:
                raise UsageError("budget_ppl needs text (a text file) and chooses K itself (no k, bits or calib)")
        return self

    # --- what the header records -------------------------------------------------------------
    @property
    def k_mode(self) -> bool:
        """True for the k-means encoder (``k`` or ``k_overrides`` without ``bits``)."""
        return self.k is not None or (self.bits is None and bool(self.k_overrides))

    @classmethod
    def recorded_fields(cls) -> list[str]:
        """The fields that decide the bytes (group ``encode``): recorded in the header."""
        return [n for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("group") == "encode"]

    def recorded(self) -> dict[str, Any]:
        """The options that decide the bytes, those that are set (not None), as JSON values."""
        out = {n: getattr(self, n) for n in self.recorded_fields() if getattr(self, n) is not None}
        if isinstance(out.get("calib"), Path):  # a text file; ./self, not the word self
            name = str(out["calib"])
            out["calib"] = f"./{name}" if name in CALIB_CHOICES else name
        return out

    def recorded_json(self) -> str:
        """`recorded` as the compact, key-sorted JSON string written to ``settings.extra["options"]``."""
        return json.dumps(self.recorded(), sort_keys=True, separators=(",", ":"))

    def updated(self, **fields: Any) -> "PackOptions":
        """A copy with ``fields`` set (validated). Setting one encoder drops the other's options:
        ``k`` clears ``bits`` and the bits-only options, ``bits`` clears ``k`` and ``k_overrides``,
        so that an explicit flag overrides what a file recorded (`from_file`)."""
        base = self.model_dump()
        if fields.get("k") is not None or fields.get("k_overrides"):
            for n in ("bits", "bits_embed", "embed_weight", "bits_overrides", "embed_importance"):
                base[n] = None
        if fields.get("bits") is not None:
            base["k"] = None
            base["k_overrides"] = None
        if fields.get("calib") is not None and fields.get("calib_tokens") is None:
            base["calib_tokens"] = None  # tokens of another calibration
        base.update(fields)
        return PackOptions(**base)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> "PackOptions":
        """The options a packed file or folder was packed with (its header's settings), with
        ``overrides`` set on top (as `updated`): ``wcfmt pack SRC -o DST --settings-from PACKED``.

        Files written by wcfmt 0.3 and later record their options (``settings.extra["options"]``)
        and are reproduced exactly; for older files the options are read back from the settings
        they recorded (encoder, bits, K, chunk rows, patterns, level, embeddings, calibration).
        """
        from ..io.folder import find_wclust_shards
        from ..reader import WclustReader

        p = Path(path)
        first = find_wclust_shards(p).paths[0] if p.is_dir() else p
        with WclustReader(first) as r:
            settings = r.header.settings
        if settings is None:
            raise UsageError(f"{first}: the file records no settings to pack with")
        extra = settings.extra
        if OPTIONS_KEY in extra:
            try:
                fields = json.loads(extra[OPTIONS_KEY])
            except ValueError as e:
                raise UsageError(f"{first}: settings.extra.options is not JSON ({e})") from None
            if not isinstance(fields, dict) or not set(fields) <= set(cls.recorded_fields()):
                raise UsageError(f"{first}: settings.extra.options holds unknown options: {fields!r}")
        else:
            fields = _legacy_options(settings)
        return cls(**fields).updated(**overrides) if overrides else cls(**fields)


def _legacy_options(settings: Any) -> dict[str, Any]:
    """Options read back from the settings of a file packed before they were recorded (wcfmt 0.2)."""
    extra = settings.extra
    out: dict[str, Any] = {}
    if settings.method == "ecsq":
        if "bits" in extra:
            out["bits"] = float(extra["bits"])
        if "bits_embed" in extra:
            out["bits_embed"] = float(extra["bits_embed"])
        if "embed_weight" in extra:
            out["embed_weight"] = float(extra["embed_weight"])
        if extra.get("embed_importance"):
            out["embed_importance"] = "tokens"
    elif settings.k is not None:
        out["k"] = settings.k
    out["embeddings"] = extra.get("embeddings") == "clustered"
    for n in ("chunk_rows", "include", "exclude", "level"):
        if getattr(settings, n) is not None:
            out[n] = getattr(settings, n)
    calib, text = extra.get("calib", "none"), extra.get("calib_text", "")
    if calib == "none":
        out["calib"] = "none"
    elif text.startswith("random"):
        out["calib"] = "random"
    elif text.startswith("self"):
        out["calib"] = "self"
    else:
        out["calib"] = text  # the text file's name, as recorded
        if "calib_tokens" in extra:
            out["calib_tokens"] = int(extra["calib_tokens"])
    return out


def _usage_error(e: ValidationError) -> UsageError:
    """The first error of a pydantic ValidationError as our own: a UsageError raised by a
    validator comes back as it was; pydantic's own (a wrong type, an unknown keyword) names the
    keyword and what it got."""
    err = e.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UsageError):
        return cause
    name = ".".join(str(x) for x in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return UsageError(f"unknown pack option {name!r}")
    return UsageError(f"{name}: {err.get('msg')}, got {err.get('input')!r}")


def help_text(name: str) -> str:
    """A field's description with its defaults filled in: the ``wcfmt pack --help`` text."""
    text = PackOptions.model_fields[name].description or ""
    return text.format(DEFAULT_BITS=DEFAULT_BITS, DEFAULT_BITS_CALIBRATED=DEFAULT_BITS_CALIBRATED,
                       DEFAULT_EMBED_WEIGHT=DEFAULT_EMBED_WEIGHT, EMBED_IMPORTANCE=EMBED_IMPORTANCE)


def add_arguments(parser: Any) -> None:
    """Add one flag per `PackOptions` field that has one (argparse), help from its description.
    ``dest`` is the field's name, so ``vars(args)`` speaks PackOptions' names."""
    import argparse

    groups: dict[str, Any] = {}
    for name, f in PackOptions.model_fields.items():
        cli = dict(f.json_schema_extra or {})  # type: ignore[arg-type]
        flag = cli.get("flag")
        if flag is None:
            continue
        target = parser
        if cli.get("exclusive"):
            if cli["exclusive"] not in groups:
                groups[cli["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[cli["exclusive"]]
        kw: dict[str, Any] = {"dest": name, "help": help_text(name)}
        if cli.get("store_true"):
            kw["action"] = "store_true"
        elif cli.get("boolean"):
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = None
        else:
            kw["metavar"] = cli.get("metavar")
            kw["type"] = _cli_type(f.annotation)
            if cli.get("repeat"):
                kw["action"] = "append"
            if cli.get("nargs"):
                kw["nargs"] = cli["nargs"]
            if cli.get("choices"):
                kw["choices"] = cli["choices"]
                kw.pop("metavar")
            if f.default is not None:
                kw["default"] = f.default
        target.add_argument(flag, **kw)


def _cli_type(annotation: Any) -> Any:
    text = str(annotation)
    if "float" in text:
        return float
    if "int" in text and "str" not in text:
        return int
    return str


def flag_of(name: str) -> str | None:
    """The command-line flag of a field (``bits_embed`` → ``--bits-embed``), or None."""
    f = PackOptions.model_fields.get(name)
    return None if f is None else (f.json_schema_extra or {}).get("flag")  # type: ignore[union-attr]
