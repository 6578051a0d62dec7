"""Compatibility: `wcfmt.sensitivity` moved to `wcfmt.method.sensitivity` in wcfmt 0.3; this name keeps working."""

from .method.sensitivity import *  # noqa: F401,F403
from .method.sensitivity import __all__  # noqa: F401
