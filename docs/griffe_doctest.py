"""A griffe extension for the API pages: doctest examples in docstrings become ``pycon`` code blocks.

wcfmt's docstrings carry small runnable examples (``>>> ...``, checked by ``pytest
--doctest-modules``) in their prose, not under an ``Examples:`` heading; Markdown would render
them as nested block quotes. This wraps each run of doctest lines (from a ``>>>`` line to the next
blank line, as doctest reads them) in a fenced ``pycon`` block, on the docs side only.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if not inside and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out += ["", f"{indent}```pycon"]
            inside = True
        elif inside and not line.strip():
            out.append(f"{indent}```")
            inside = False
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
