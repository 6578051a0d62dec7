"""The CPU's name for the "measured on" line of the tools' results (one place for the three tools
that print it)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo, else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
