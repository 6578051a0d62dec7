"""Compatibility: `wcfmt.transforms` moved to `wcfmt.method.transforms` in wcfmt 0.3; this name keeps working."""

from .method.transforms import *  # noqa: F401,F403
from .method.transforms import __all__  # noqa: F401
