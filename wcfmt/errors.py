"""Typed errors. Each also inherits the matching built-in so callers may catch either.

Messages name the file, the tensor, the field and what was expected, e.g.
``model.wclust: tensor 'layers.3.mlp.up_proj.weight': chunk 7 labels checksum mismatch
(expected 0x1f2e3d4c, got 0x09ab0000)``.
"""

from __future__ import annotations

__all__ = [
    "WclustError",
    "FormatError",
    "HeaderError",
    "VersionError",
    "ChecksumError",
    "UsageError",
    "TensorNotFoundError",
    "OutputExistsError",
    "HubError",
]


class WclustError(Exception):
    """Base class of every error wcfmt raises on purpose."""


class FormatError(WclustError, ValueError):
    """The bytes are not a valid .wclust file (bad magic, truncation, bad offsets, bad data)."""


class HeaderError(FormatError):
    """The JSON header is malformed or fails schema validation."""


class VersionError(FormatError):
    """The file's major version (or a codec it needs) is not one this reader implements."""


class ChecksumError(FormatError):
    """A stored CRC-32 does not match the bytes it covers."""


class UsageError(WclustError, ValueError):
    """The caller asked for something invalid (bad argument, unsupported dtype, ...)."""


class TensorNotFoundError(WclustError, KeyError):
    """A tensor name that the file does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class OutputExistsError(WclustError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class HubError(WclustError, OSError):
    """A Hugging Face Hub download or upload failed (network, unknown repository, permission)."""


def where(path: object, tensor: str | None = None, chunk: int | None = None) -> str:
    """Return the location prefix used in every message: ``file: tensor 'x': chunk 3``."""
    parts = [str(path)]
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    if chunk is not None:
        parts.append(f"chunk {chunk}")
    return ": ".join(parts)


def first_few(names: "list[str]", limit: int = 5, sep: str = ", ") -> str:
    """``names`` joined for an error message: the first ``limit``, then "..." if there are more.

    >>> first_few(["a", "b", "c"], limit=2)
    'a, b, ...'
    """
    return sep.join(names[:limit]) + (f"{sep}..." if len(names) > limit else "")
