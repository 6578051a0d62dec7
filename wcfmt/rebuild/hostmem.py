"""Host memory for loaded tensors: transparent huge pages for large outputs (Linux).

A load writes every byte of a freshly allocated tensor once. With 4 KiB pages that is one page
fault per 4 KiB, and in a VM a fault costs microseconds: on the 2-core test machine, faulting
in 1.2 GB of new tensors took 0.9-1.6 s of system time, more than decoding them. Asking the
kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) before the first write makes it
one fault per 2 MiB: filling 21 fresh tensors of 1.2 GB in all took 0.28 s instead of 0.54 s
there (system time 0.45 s instead of 0.89 s, 11K faults instead of 296K; a one-off script on a
shared machine, so only the ratio means much; `tools/bench_load.py` measures the whole load).

Only advice: where THP is off, unsupported or the call fails, nothing changes. Memory use does
not grow, since every page of the tensor is written anyway; only the 2 MiB-aligned interior of
each tensor is advised, so no neighbouring allocation is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

__all__ = ["advise_huge_pages"]

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
#: Smaller tensors are not worth a system call (and rarely span a whole 2 MiB page).
_MIN_BYTES = 4 << 20

_madvise: Any = None


def _libc_madvise() -> Any:
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise huge pages for the 2 MiB-aligned interior of a large, not yet written CPU tensor;
    return whether the kernel accepted the advice."""
    n = t.numel() * t.element_size()
    if t.device.type != "cpu" or n < _MIN_BYTES:
        return False
    fn = _libc_madvise()
    if not fn:
        return False
    start = t.data_ptr()
    lo = -(-start // _HUGE) * _HUGE
    hi = (start + n) // _HUGE * _HUGE
    if hi <= lo:
        return False
    return fn(lo, hi - lo, _MADV_HUGEPAGE) == 0
