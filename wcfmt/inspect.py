"""`info` (what a .wclust file or packed folder holds, and how small) and `verify` (is it intact).

`info` reads headers only; `verify` reads every blob and checks every checksum and every
decoded value (spec §9.1), file by file and tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import itemsize
from .errors import FormatError
from .io.folder import check_weight_map, find_wclust_shards
from .io.safetensors_io import format_size
from .progress import bar
from .reader import WclustReader
from .schema import AliasEntry, ClusteredEntry, LosslessEntry

__all__ = [
    "TensorRow", "Info", "VerifyReport", "info", "verify", "format_table", "natural_key", "degenerate_tensors",
    "DEGENERATE_SQNR_DB", "DegenerateQualityWarning",
]

#: Below this signal-to-quantisation-noise ratio a clustered tensor has lost its shape: K = 1
#: (a constant) gives about 0 dB, Gaussian data at K = 2 4.4 dB and K = 4 9.3 dB, while the
#: defaults give 25-31 dB. Such a tensor almost surely breaks the model, so pack warns and info
#: flags it. (A higher SQNR is no proof of a working model: see the README's K = 16 rows.)
DEGENERATE_SQNR_DB = 10.0


class DegenerateQualityWarning(UserWarning):
    """A pack produced clustered tensors with SQNR below `DEGENERATE_SQNR_DB`."""


def natural_key(name: str) -> list[Any]:
    """Sort key that orders numbers by value: ``layers.2`` before ``layers.10``.

    >>> sorted(["l.10.w", "l.2.w", "l.1.w", "emb"], key=natural_key)
    ['emb', 'l.1.w', 'l.2.w', 'l.10.w']
    """
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


@dataclass
class TensorRow:
    """One tensor as `info` shows it. ``ratio`` is packed / original bytes (below 1 is smaller)."""

    file: str
    name: str
    shape: list[int]
    dtype: str
    codec: str
    k_min: int | None
    k_max: int | None
    chunks: int
    original_bytes: int
    packed_bytes: int
    bits_per_weight: float | None
    ratio: float | None
    target: str | None = None  # for aliases
    #: Clustered tensors: quality figures recorded at pack time (rel_error, sqnr_db, ...).
    quality: dict[str, float] | None = None
    #: True when the recorded SQNR is below DEGENERATE_SQNR_DB (the tensor is nearly constant).
    degenerate: bool = False


@dataclass
class Info:
    """Every tensor of a file or folder, and the totals."""

    path: str
    files: list[dict[str, Any]] = field(default_factory=list)
    rows: list[TensorRow] = field(default_factory=list)

    @property
    def original_bytes(self) -> int:
        """Bytes of the tensors in their original dtype (aliases counted once, as tied weights)."""
        return sum(r.original_bytes for r in self.rows if r.codec != "alias")

    @property
    def packed_bytes(self) -> int:
        """Bytes of the .wclust files, headers and padding included."""
        return sum(int(f["size"]) for f in self.files)

    @property
    def ratio(self) -> float | None:
        return self.packed_bytes / self.original_bytes if self.original_bytes else None

    def totals(self) -> dict[str, Any]:
        by_codec: dict[str, int] = {}
        for r in self.rows:
            by_codec[r.codec] = by_codec.get(r.codec, 0) + 1
        return {
            "files": len(self.files),
            "tensors": len(self.rows),
            "by_codec": by_codec,
            "original_bytes": self.original_bytes,
            "packed_bytes": self.packed_bytes,
            "ratio": self.ratio,
            "degenerate": sum(1 for r in self.rows if r.degenerate),
            #: stored bits per clustered weight per budget group, from the blobs' sizes
            "achieved_bits": achieved_bits(self),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "files": self.files, "tensors": [asdict(r) for r in self.rows],
                "totals": self.totals()}


def _paths(path: Path) -> list[Path]:
    if path.is_dir():
        return find_wclust_shards(path).paths
    if not path.exists():
        raise FileNotFoundError(2, "No such file or folder", str(path))
    return [path]


def info(path: str | os.PathLike[str]) -> Info:
    """Describe a .wclust file or packed folder from its headers (no tensor data is read).

    Rows are in natural order of the tensor names (layer 2 before layer 10). ``path`` may be a
    Hub repository (``hf://org/name[@rev]``, ``org/name``): its shards and index are downloaded.

    >>> import tempfile, os, torch, wcfmt
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> wcfmt.save_file({"b": torch.zeros(8)}, p)
    >>> i = info(p)
    >>> [(r.name, r.codec, r.original_bytes) for r in i.rows]
    [('b', 'lossless', 32)]
    """
    from .io.sources import resolve_source

    shown = str(path)
    path = resolve_source(path, allow_patterns=_SHARD_PATTERNS)
    out = Info(shown)
    for p in _paths(path):
        with WclustReader(p, use_mmap=False) as r:
            h = r.header
            out.files.append({
                "path": str(p),
                "size": r.file_size,
                "version": f"{r.version[0]}.{r.version[1]}",
                "producer": h.producer,
                "metadata": dict(h.metadata),
                "settings": h.settings.model_dump(exclude_none=True) if h.settings else None,
            })  # fmt: skip
            for name, e in h.tensors.items():
                out.rows.append(_row(p.name, name, e))
            for name, codec in h.unsupported.items():
                out.rows.append(TensorRow(p.name, name, [], "?", codec, None, None, 0, 0, 0, None, None))
    out.rows.sort(key=lambda r: natural_key(r.name))
    return out


#: What info and verify download of a Hub repository: the shards and the index.
_SHARD_PATTERNS = ["*.wclust", "model.wclust.index.json"]


def calibrated(i: Info) -> bool:
    """Whether the file or folder was packed with calibration (``--calib``): its tensors' recorded
    SQNR is of the weights, which calibration trades for the layer's output error."""
    return any((f.get("settings") or {}).get("extra", {}).get("calib", "none") != "none" for f in i.files)


def degenerate_tensors(i: Info) -> list[tuple[str, float]]:
    """(name, SQNR dB) of every clustered tensor flagged degenerate, in `info`'s order."""
    return [(r.name, float(r.quality["sqnr_db"])) for r in i.rows if r.degenerate and r.quality]


def _row(file: str, name: str, e: ClusteredEntry | LosslessEntry | AliasEntry) -> TensorRow:
    numel = math.prod(e.shape)
    original = numel * itemsize(e.dtype)
    ks: list[int] = []
    if isinstance(e, ClusteredEntry):
        ks = [c.k for c in e.chunks]
        packed = sum(c.centroids.length + c.labels.length for c in e.chunks)
    elif isinstance(e, LosslessEntry):
        packed = sum(p.length for c in e.chunks for p in c.planes)
    else:
        return TensorRow(file, name, list(e.shape), e.dtype, "alias", None, None, 0, original, 0, None, None,
                         target=e.target)
    return TensorRow(
        file=file,
        name=name,
        shape=list(e.shape),
        dtype=e.dtype,
        codec=e.codec,
        k_min=min(ks) if ks else None,
        k_max=max(ks) if ks else None,
        chunks=len(e.chunks),
        original_bytes=original,
        packed_bytes=packed,
        bits_per_weight=packed * 8 / numel if numel else None,
        ratio=packed / original if original else None,
        quality=dict(e.quality) if isinstance(e, ClusteredEntry) and e.quality else None,
        degenerate=bool(
            isinstance(e, ClusteredEntry) and e.quality and e.quality.get("sqnr_db", math.inf) < DEGENERATE_SQNR_DB
        ),
    )


def format_table(i: Info) -> str:
    """Render `Info` as the text table ``wcfmt info`` prints."""
    many = len(i.files) > 1
    head = (["file"] if many else []) + ["name", "shape", "dtype", "codec", "K", "bits/w", "ratio", "rel.err",
                                         "SQNR dB"]
    lines = []
    for r in i.rows:
        if r.k_min is None:
            k = f"-> {r.target}" if r.target else "-"
        else:
            k = str(r.k_min) if r.k_min == r.k_max else f"{r.k_min}-{r.k_max}"
        cells = ([r.file] if many else []) + [
            r.name,
            "x".join(map(str, r.shape)) or "scalar",
            r.dtype,
            r.codec,
            k,
            "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
            "-" if r.ratio is None else f"{r.ratio:.3f}",
            f"{r.quality['rel_error']:.4f}" if r.quality and "rel_error" in r.quality else "-",
            (f"{r.quality['sqnr_db']:.1f}" + (" !" if r.degenerate else "")) if r.quality and "sqnr_db" in r.quality
            else "-",
        ]
        lines.append(cells)
    widths = [max([len(h)] + [len(c[j]) for c in lines]) for j, h in enumerate(head)]
    right = {"bits/w", "ratio", "rel.err", "SQNR dB"}

    def fmt(cells: list[str]) -> str:
        padded = (c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, head, strict=True))
        return "  ".join(padded).rstrip()

    t = i.totals()
    codecs = ", ".join(f"{n} {c}" for c, n in sorted(t["by_codec"].items()))
    ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
    bad = degenerate_tensors(i)
    warn = (
        [f"! {len(bad)} clustered tensor(s) with SQNR below {DEGENERATE_SQNR_DB:g} dB: nearly constant, the model "
         "is likely broken (pack again with a larger --k or --bits)"]
        if bad and not calibrated(i) else
        [f"note: {len(bad)} calibrated tensor(s) with weight SQNR below {DEGENERATE_SQNR_DB:g} dB: calibration moves "
         "error to where the layer's inputs do not look; judge the model by perplexity"]
        if bad else []
    )  # fmt: skip
    return "\n".join(
        [fmt(head)]
        + [fmt(c) for c in lines]
        + [
            "",
            f"total: {t['tensors']} tensors ({codecs}) in {t['files']} file(s); original "
            f"{format_size(t['original_bytes'])}, packed {format_size(t['packed_bytes'])}, ratio {ratio}",
        ]
        + _settings_lines(i)
        + warn
    )


def _settings_lines(i: Info) -> list[str]:
    """How the file was packed (its header's settings), one line: the encoder and, in bits mode,
    each budget group's bits, λ and step; calibration if any."""
    s = next((f["settings"] for f in i.files if f.get("settings")), None)
    if not s:
        return []
    extra = s.get("extra", {})
    parts = [f"encoder {s.get('method', '?')}"]
    if s.get("k") is not None:
        parts.append(f"K {s['k']}")
    measured = achieved_bits(i)
    for group in ("", "_embed", "_attention", "_mlp"):
        if f"bits{group}" in extra:
            who = group[1:] or "model"
            got = measured.get(who)
            achieved = "" if got is None else f", achieved {got:.2f}"
            cap = extra.get(f"bits_cap{group}")
            parts.append(f"{who}: requested {extra[f'bits{group}']} bits/weight{achieved}"
                         + (f": {cap}" if cap else "")
                         + f" (λ {extra.get(f'lambda{group}', '?')}, step {extra.get(f'step{group}', '?')})")
    if extra.get("embeddings") == "clustered":
        how = extra.get("embed_importance")
        parts.append("embeddings clustered" + (f", rows weighted by token frequency ({how})" if how else ""))
    if extra.get("calib", "none") != "none":
        text = extra.get("calib_text", "?")
        if "calib_tokens" in extra:
            text = f"{extra['calib_tokens']} tokens of {text}"
        parts.append(f"calibrated ({extra['calib']}, {text})")
    elif "calib_skipped" in extra:
        parts.append(f"not calibrated: {extra['calib_skipped']}")
    return ["packed with: " + "; ".join(parts)]


def achieved_bits(i: Info) -> dict[str, float]:
    """Stored bits per clustered weight (labels after zstd plus tables, from the files' blob
    sizes) per budget group of the settings: ``model``, and ``embed`` when embeddings had a
    budget of their own (``bits_embed``). Tensors with a budget of their own are left out."""
    s = next((f["settings"] for f in i.files if f.get("settings")), None) or {}
    extra = s.get("extra", {})
    options = extra.get("options")
    own: list[str] = []
    if options:
        try:
            own = list((json.loads(options).get("bits_overrides") or {}))
        except (ValueError, AttributeError):
            own = []
    from .cluster.policy import ClusterPolicy

    bits: dict[str, float] = {}
    weights: dict[str, int] = {}
    for r in i.rows:
        if r.codec != "clustered" or any(re.search(p, r.name) for p in own):
            continue
        group = "embed" if "bits_embed" in extra and ClusterPolicy.group(r.name) == "embed" else "model"
        numel = math.prod(r.shape)
        bits[group] = bits.get(group, 0.0) + r.packed_bytes * 8
        weights[group] = weights.get(group, 0) + numel
    return {g: bits[g] / weights[g] for g in bits if weights[g]}


@dataclass
class VerifyReport:
    """What `verify` checked (it raises on the first problem, so a report means all is well)."""

    path: str
    files: int = 0
    tensors: int = 0
    bytes: int = 0

    def summary(self) -> str:
        return f"OK: {self.path}: {self.files} file(s), {self.tensors} tensors, {format_size(self.bytes)} checked"


def verify(
    path: str | os.PathLike[str], *, progress: bool = False, max_bytes: int | str | None = None
) -> VerifyReport:
    """Check the structure and every checksum of a .wclust file or of every file of a packed folder.

    For a folder the index must agree with the files (every listed tensor in the file it names,
    no tensor in two files). Raises `FormatError` (or `ChecksumError`, `HeaderError`,
    `VersionError`) naming the file, tensor and chunk at the first problem. ``max_bytes`` (an
    int, ``"auto"`` or ``None``, as `WclustReader`'s) bounds each file's decoded bytes, checked
    from its header before anything is decoded (`UsageError`).
    """
    from .io.sources import resolve_source

    shown = str(path)
    path = resolve_source(path, allow_patterns=_SHARD_PATTERNS)
    paths = _paths(path)
    shards = find_wclust_shards(path) if path.is_dir() else None
    report = VerifyReport(shown)
    seen: dict[str, str] = {}
    total = sum(p.stat().st_size for p in paths)
    with bar(progress, total=total, desc="verify", unit="B", unit_scale=True) as overall:
        for p in paths:
            # Positioned reads, not mmap: a whole-folder pass would otherwise grow RSS to its size.
            with WclustReader(p, use_mmap=False, max_bytes=max_bytes) as r, \
                 bar(progress, total=len(r.header.tensors), desc=p.name, unit="tensor", position=1,
                     leave=False) as per_tensor:  # fmt: skip
                r.check_file_budget()
                for name in r.header.unsupported:
                    r.verify_tensor(name)  # raises VersionError naming the unknown codec
                for name in r.header.tensors:
                    if name in seen:
                        raise FormatError(f"{p}: tensor {name!r} is also in {seen[name]}")
                    seen[name] = p.name
                    per_tensor.set_postfix_str(name)
                    r.verify_tensor(name)
                    report.tensors += 1
                    per_tensor.update(1)
                overall.update(r.file_size)
            report.files += 1
            report.bytes += r.file_size
        if shards is not None:
            check_weight_map(shards, seen)
    return report
