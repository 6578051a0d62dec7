"""Codec registry (spec §5, §6): each codec turns one tensor into per-chunk blobs and back.

A codec module exposes ``CODEC_ID``, ``encode_chunks`` (value -> per-chunk payloads),
``make_entry`` (payload blob references -> header entry) and ``decode_chunk`` (header entry +
blob reader -> the chunk's values in storage form). New codec = new module + entry here +
conformance vectors.
"""

from __future__ import annotations

from types import ModuleType

from . import clustered, lossless

__all__ = ["CODECS", "codec_for"]

CODECS: dict[str, ModuleType] = {clustered.CODEC_ID: clustered, lossless.CODEC_ID: lossless}


def codec_for(codec_id: str) -> ModuleType:
    """Return the codec module for an id; KeyError if this version does not implement it."""
    return CODECS[codec_id]
