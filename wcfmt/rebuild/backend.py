"""Which rebuild backend wcfmt uses, and the chunk batch that the device backends share.

Three backends rebuild clustered chunks, all bit-identical to `reference.rebuild_chunk`:

- ``"numpy"``: `fast.rebuild_chunk_fast` on the CPU (byte and byte-pair lookup tables);
- ``"torch"``: `torch_gather.rebuild_chunks_torch`, plain torch ops, any device;
- ``"triton"``: `triton_kernel.rebuild_chunks_triton`, one kernel launch per batch of chunks
  (CUDA only; Triton is optional and imported only when asked for).

`default_backend` picks numpy for the CPU and Triton, then torch, for other devices. The
environment variable ``WCFMT_BACKEND`` (one of the names above) overrides the choice; asking
for a backend that cannot serve the device raises `UsageError`.

>>> default_backend("cpu")
'numpy'
>>> "numpy" in available_backends() and "torch" in available_backends()
True
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ..errors import UsageError

__all__ = ["BACKENDS", "ENV_VAR", "ChunkSpec", "available_backends", "default_backend", "triton_available"]

BACKENDS: tuple[str, ...] = ("triton", "torch", "numpy")
ENV_VAR = "WCFMT_BACKEND"


class ChunkSpec(NamedTuple):
    """Where one row chunk's inputs and output lie inside a batch (all offsets in elements).

    ``label_offset``: its first label byte in the batch's concatenated label planes;
    ``out_offset``: its first value in the flat output; ``count``: values in the chunk;
    ``label_bits``: 0, 1, 2, 4 or 8; ``table_offset``: its first entry in the concatenated tables.
    """

    label_offset: int
    out_offset: int
    count: int
    label_bits: int
    table_offset: int


@functools.cache
def triton_available() -> bool:
    """Return True if Triton imports (it is absent on some platforms; never required)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Return the backends that can rebuild on ``device`` (any device if None), best first."""
    dev = None if device is None else torch.device(device)
    out = []
    if triton_available() and (dev is None or dev.type == "cuda" or (_interpreting() and dev.type == "cpu")):
        out.append("triton")
    out.append("torch")
    if dev is None or dev.type == "cpu":
        out.append("numpy")
    return out


def default_backend(device: str | torch.device = "cpu") -> str:
    """Return the backend used for ``device``: ``$WCFMT_BACKEND`` if set, else the fastest available."""
    dev = torch.device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise UsageError(f"{ENV_VAR}={forced!r} is not a backend (choose from {', '.join(BACKENDS)})")
        if forced not in available_backends(dev):
            ok = ", ".join(available_backends(dev))
            raise UsageError(f"{ENV_VAR}={forced!r} cannot rebuild on device {dev} (available: {ok})")
        return forced
    if dev.type == "cpu":
        return "numpy"
    if dev.type == "cuda" and triton_available():
        return "triton"
    return "torch"
