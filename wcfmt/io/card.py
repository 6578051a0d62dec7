"""The model card of a packed folder (``README.md``), and the optional remote-code shim.

A packed folder is a model repository like any other, so it says what it is and how to load it:
front matter that the Hub reads (``library_name: wcfmt``, ``tags: [wclust, ...]``, and when the
source is known ``base_model`` with ``base_model_relation: quantized``), then a body with the
loading code, the pack settings, the sizes before and after, bits and K per tensor class (read
from the packed headers, not from what was asked for), the quality figures the user gives
(``quality_note``), and the source's own card text below ours.

``remote_code=True`` also writes ``modeling_wclust.py`` and an ``auto_map`` entry in
``config.json``, so that ``AutoModelForCausalLM.from_pretrained(folder_or_repo,
trust_remote_code=True)`` loads the packed weights (through `wcfmt.from_pretrained`; the user
still needs ``pip install wcfmt``). transformers' own loader cannot read ``.wclust`` files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import UsageError
from .safetensors_io import format_size

__all__ = ["CardOptions", "write_card", "note_edit", "class_of", "class_table", "SHIM_NAME", "write_remote_code"]

CARD_NAME = "README.md"
SHIM_NAME = "modeling_wclust.py"
_LAYER = re.compile(r"(^|\.)\d+\.")


@dataclass
class CardOptions:
    """What `pack` was told about the card (``--base-model``, ``--quality-note``, ``--remote-code``)."""

    base_model: str | None = None
    quality_note: str | None = None
    remote_code: bool = False
    #: Where the card's loading code points (a Hub repo id when pushing, else the folder name).
    repo_id: str | None = None


def class_of(name: str) -> str:
    """The tensor class of a parameter name: what is left after the last layer index.

    >>> class_of("model.layers.17.self_attn.q_proj.weight"), class_of("encoder.layer.3.output.dense.weight")
    ('self_attn.q_proj.weight', 'output.dense.weight')
    >>> class_of("model.embed_tokens.weight")
    'model.embed_tokens.weight'
    """
    parts = _LAYER.split(name)
    return parts[-1] if len(parts) > 1 else name


def class_table(info: Any) -> list[dict[str, Any]]:
    """Per tensor class of a packed folder: tensors, codec, K range, stored bits/weight, mean SQNR.

    ``info`` is a `wcfmt.inspect.Info`. Bits/weight are the stored bytes of labels and tables
    (or lossless planes) per weight, from the blob lengths in the headers; SQNR is the mean of
    the per-tensor figures recorded at pack time.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in info.rows:
        if r.codec == "alias":
            continue
        key = (class_of(r.name), r.codec)
        g = groups.setdefault(key, {"class": key[0], "codec": key[1], "tensors": 0, "weights": 0, "bytes": 0,
                                    "k_min": None, "k_max": None, "sqnr": []})  # fmt: skip
        g["tensors"] += 1
        g["weights"] += math.prod(r.shape) if r.shape else 1
        g["bytes"] += r.packed_bytes
        if r.k_min is not None:
            g["k_min"] = r.k_min if g["k_min"] is None else min(g["k_min"], r.k_min)
            g["k_max"] = r.k_max if g["k_max"] is None else max(g["k_max"], r.k_max)
        if r.quality and "sqnr_db" in r.quality:
            g["sqnr"].append(float(r.quality["sqnr_db"]))
    out = []
    for g in groups.values():
        sq = g.pop("sqnr")
        g["bits_per_weight"] = g["bytes"] * 8 / g["weights"] if g["weights"] else 0.0
        g["sqnr_db"] = sum(sq) / len(sq) if sq else None
        out.append(g)
    return sorted(out, key=lambda g: (g["codec"] != "clustered", g["class"]))


def _settings_rows(info: Any) -> list[tuple[str, str]]:
    settings = next((f["settings"] for f in info.files if f.get("settings")), None) or {}
    rows = []
    for key in ("method", "bits", "k", "chunk_rows", "include", "exclude", "level"):
        if key in settings and settings[key] is not None:
            rows.append((key, json.dumps(settings[key]) if isinstance(settings[key], list) else str(settings[key])))
    for key, value in sorted((settings.get("extra") or {}).items()):
        rows.append((key, str(value)))
    return rows


def _source_card(src: Path | None) -> Any:
    if src is None or not src.is_dir() or not (src / CARD_NAME).is_file():
        return None
    from huggingface_hub import ModelCard

    text = (src / CARD_NAME).read_text(encoding="utf-8", errors="replace")
    if text.startswith("---"):
        try:
            return ModelCard(text)
        except Exception:  # front matter that does not parse: the text is still kept, below ours
            pass
    return type("Card", (), {"data": None, "text": text})()


def card_text(folder: Path, src: Path | None, source_bytes: int, options: CardOptions) -> str:
    """The card of packed ``folder`` (its headers are read), packed from ``src``."""
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__
    from ..inspect import info as read_info

    i = read_info(folder)
    source = _source_card(src)
    sdata = source.data.to_dict() if source is not None and source.data is not None else {}
    tags = ["wclust", "wcfmt", "weight-clustering", "quantized"]
    for t in sdata.get("tags") or []:
        if t not in tags:
            tags.append(t)
    data = ModelCardData(
        library_name="wcfmt", tags=tags, license=sdata.get("license"), language=sdata.get("language"),
        pipeline_tag=sdata.get("pipeline_tag"),
        **({"base_model": options.base_model, "base_model_relation": "quantized"} if options.base_model else {}),
    )  # fmt: skip
    where = options.repo_id or folder.name
    title = where.split("/")[-1]
    lines = [f"# {title}", ""]
    what = f"[{options.base_model}](https://huggingface.co/{options.base_model})" if options.base_model else "A model"
    lines += [
        f"{what} packed into the `.wclust` weight-clustered format by wcfmt {__version__}: each clustered matrix is "
        "stored as a small table of centroids and one label per weight, and decoded back to dense weights when "
        "loaded (inference then runs at full speed with no special kernels).",
        "",
        "## How to load",
        "",
        "```bash",
        "pip install wcfmt",
        "```",
        "",
        "```python",
        "import wcfmt",
        "",
        f'model = wcfmt.from_pretrained("{where}")  # a transformers model, weights decoded, eval mode',
        "```",
    ]
    if options.remote_code:
        lines += [
            "",
            "or, with transformers alone once wcfmt is installed:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)',
            "```",
        ]
    lines += [
        "",
        f"Dense safetensors, for any other tool: `wcfmt unpack {where} -o dense/`.",
        "",
        "## Pack settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in _settings_rows(i)] or ["| (defaults) | |"]
    ratio = i.packed_bytes / source_bytes if source_bytes else None
    lines += [
        "",
        "## Sizes",
        "",
        f"- source safetensors: {format_size(source_bytes)}" if source_bytes else "- source size: unknown",
        f"- packed `.wclust` files: {format_size(i.packed_bytes)}"
        + (f" ({ratio:.1%} of the source)" if ratio is not None else ""),
        "",
        "## Bits and K per tensor class",
        "",
        "From the packed headers: stored bits per weight (labels after entropy coding plus centroid tables, or "
        "lossless planes) and the signal-to-quantisation-noise ratio measured at pack time.",
        "",
        "| tensor class | codec | tensors | K | bits/weight | mean SQNR dB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for g in class_table(i):
        k = "-" if g["k_min"] is None else (str(g["k_min"]) if g["k_min"] == g["k_max"] else f"{g['k_min']}-{g['k_max']}")
        sq = "-" if g["sqnr_db"] is None else f"{g['sqnr_db']:.1f}"
        lines.append(f"| `{g['class']}` | {g['codec']} | {g['tensors']} | {k} | {g['bits_per_weight']:.2f} | {sq} |")
    lines += ["", "## Quality", "", options.quality_note.strip() if options.quality_note else
              "Not measured by the packer: compare the perplexity or task scores with the source before use."]
    if source is not None and source.text.strip():
        lines += ["", "---", "", "## Original model card", "", source.text.strip()]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    ModelCard(content)  # parses what we wrote (raises on invalid front matter)
    return content


def write_card(folder: str | os.PathLike[str], src: str | os.PathLike[str] | None, source_bytes: int,
               options: CardOptions) -> Path:
    """Write ``README.md`` (and with ``remote_code`` the shim) into packed ``folder``; return the card path."""
    folder = Path(folder)
    if options.remote_code:
        write_remote_code(folder)
    path = folder / CARD_NAME
    write_text_atomic(path, card_text(folder, Path(src) if src is not None else None, source_bytes, options))
    return path


#: The section `note_edit` adds to a wcfmt card, and the line it opens with.
EDITS_HEADING = "## Changes after packing"
_EDITS_INTRO = ("These edits were made to the packed weights after packing; the settings, sizes and quality above "
                "describe the model as packed, before them.")
_ORIGINAL = "\n---\n\n## Original model card"


def note_edit(folder: str | os.PathLike[str], lines: list[str]) -> bool:
    """Record an edit of packed ``folder`` (``wcfmt transform``, ``wcfmt heal``) in its card.

    Adds ``lines`` (markdown bullets, without the ``- ``) to the card's "Changes after packing"
    section, made before the source's own card text if there is none yet, so that a transformed
    or healed copy does not present itself as the model that was packed. A ``README.md`` that is
    not a wcfmt card (no ``library_name: wcfmt`` in its front matter) is left alone. Returns
    whether the card was changed."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8")
        if ModelCard(text).data.to_dict().get("library_name") != "wcfmt":
            return False
    except (FileNotFoundError, UnicodeDecodeError, ValueError):  # no card, or front matter that does not parse
        return False
    bullets = "".join(f"- {line}\n" for line in lines)
    if EDITS_HEADING in text:
        head, tail = text.split(EDITS_HEADING, 1)
        cut = tail.find(_ORIGINAL)
        body, rest = (tail, "") if cut < 0 else (tail[:cut], tail[cut:])
        text = head + EDITS_HEADING + body.rstrip("\n") + "\n" + bullets + rest
    else:
        cut = text.find(_ORIGINAL)
        section = f"\n{EDITS_HEADING}\n\n{_EDITS_INTRO}\n\n{bullets}"
        text = text.rstrip("\n") + "\n" + section if cut < 0 else text[:cut].rstrip("\n") + "\n" + section + text[cut:]
    write_text_atomic(path, text)
    return True


#: Which Auto class a shim registers for, by the architecture's suffix.
_AUTO_BY_SUFFIX = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)

_SHIM = '''"""Loads this packed (.wclust) model for transformers' trust_remote_code path. Written by wcfmt.

transformers cannot read .wclust files itself; this class hands the folder (or Hub repository)
to wcfmt.from_pretrained, which decodes the weights into a plain {arch}. Needs `pip install wcfmt`.
"""

from transformers import {arch} as _Base


class Wclust{arch}(_Base):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        try:
            import wcfmt
        except ImportError as e:  # say what to install instead of a bare ModuleNotFoundError
            raise ImportError("this model is stored in the .wclust format: pip install wcfmt") from e
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map") if isinstance(kwargs.get("device_map"), str) else None
        return wcfmt.from_pretrained(
            pretrained_model_name_or_path, model_class=_Base, dtype=None if dtype in (None, "auto") else dtype,
            device=None if device == "auto" else device, revision=kwargs.get("revision"),
            token=kwargs.get("token"), cache_dir=kwargs.get("cache_dir"),
        )
'''


def write_remote_code(folder: str | os.PathLike[str]) -> Path:
    """Write ``modeling_wclust.py`` and point ``config.json``'s ``auto_map`` at it; return the shim's path."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{folder}: no config.json; remote_code needs a transformers model folder")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    if not archs or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", archs[0]):
        raise UsageError(f"{cfg_path}: no 'architectures' entry; remote_code needs the model class name")
    import transformers

    arch = archs[0]
    if not isinstance(getattr(transformers, arch, None), type):
        raise UsageError(f"{cfg_path}: transformers has no class {arch}; remote_code needs a class it exports")
    auto = next((a for s, a in _AUTO_BY_SUFFIX if arch.endswith(s)), "AutoModel")
    shim = folder / SHIM_NAME
    write_text_atomic(shim, _SHIM.format(arch=arch))
    cfg.setdefault("auto_map", {})[auto] = f"{SHIM_NAME[:-3]}.Wclust{arch}"
    write_text_atomic(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return shim
