"""Run jobs in a thread pool, yielding results in submission order with bounded look-ahead.

The writer (chunk encoding) and the loader (chunk decoding) both need exactly this: keep the
cores busy, keep output order, and never hold more than ``depth`` finished-but-unconsumed
results in memory.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

__all__ = ["bounded_map"]


def bounded_map(pool: ThreadPoolExecutor, fns: Sequence[Callable[[], Any]], depth: int) -> Iterator[Any]:
    """Yield ``fn()`` for every fn in order, with at most ``depth`` submitted and not yet yielded.

    >>> with ThreadPoolExecutor(2) as pool:
    ...     list(bounded_map(pool, [lambda i=i: i * i for i in range(5)], 2))
    [0, 1, 4, 9, 16]
    """
    queue: deque[Future[Any]] = deque()
    try:
        for fn in fns:
            if len(queue) >= depth:
                yield queue.popleft().result()
            queue.append(pool.submit(fn))
        while queue:
            yield queue.popleft().result()
    finally:
        for f in queue:
            f.cancel()
        for f in queue:
            with contextlib.suppress(BaseException):
                f.result()  # let running jobs end before their outputs go away
