"""Progress bars where a person waits: a thin tqdm wrapper that is a no-op unless enabled.

Library calls pass ``progress=False`` by default, so nothing is printed and tqdm is not even
imported; the CLI turns bars on (``--quiet`` turns them off). Bars go to stderr, so stdout stays
clean for ``--json`` and for the final summary line.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

__all__ = ["Bar", "bar"]


class Bar:
    """The interface of a bar (tqdm's subset wcfmt uses). This base class does nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def reset(self, total: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def bar(
    enabled: bool,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    unit_scale: bool = False,
    position: int | None = None,
    leave: bool = True,
) -> Any:
    """Return a tqdm bar on stderr when ``enabled``, else a `Bar` that does nothing.

    >>> with bar(False, total=3) as b:
    ...     b.update(3)
    """
    if not enabled:
        return Bar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        unit_divisor=1000,  # decimal, as the sizes wcfmt prints and parses ("5GB")
        position=position,
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
    )
