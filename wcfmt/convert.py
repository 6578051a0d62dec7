"""Compatibility: the pack pipeline moved to `wcfmt.packing` (a package of stages) in wcfmt 0.3.

``from wcfmt.convert import pack, unpack, PackReport, …`` keeps working; new code imports from
`wcfmt` (``wcfmt.pack``, ``wcfmt.unpack``, ``wcfmt.PackOptions``) or the stage modules.
"""

from __future__ import annotations

from .packing import (
    DEFAULT_BITS,
    DEFAULT_BITS_CALIBRATED,
    DEFAULT_EMBED_WEIGHT,
    EMBED_IMPORTANCE,
    FileReport,
    PackOptions,
    PackReport,
    UnpackReport,
    cluster_for_storage,
    pack,
    torch_dtype_of,
    unpack,
)
from .packing.encode import CALIB_REFIT
from .packing.options import EMBED_IMPORTANCE_CHOICES

__all__ = ["pack", "unpack", "PackReport", "UnpackReport", "FileReport", "torch_dtype_of", "DEFAULT_BITS",
           "DEFAULT_BITS_CALIBRATED", "DEFAULT_EMBED_WEIGHT", "PackOptions", "cluster_for_storage",
           "EMBED_IMPORTANCE", "EMBED_IMPORTANCE_CHOICES", "CALIB_REFIT"]
