"""Compatibility: `wcfmt.heal` moved to `wcfmt.method.heal` in wcfmt 0.3; this name keeps working."""

from .method.heal import *  # noqa: F401,F403
from .method.heal import __all__  # noqa: F401
