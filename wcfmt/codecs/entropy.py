"""The entropy stage: zstd frames over label and byte planes (spec §7).

Each blob is one zstd frame (or raw bytes when zstd would not make it smaller). Defaults are
tuned on label streams: match finding only hurts there (level 3 gives 1.03 x entropy; the fast
strategy with min_match=7 and a tiny hash table 1.008-1.04 x, ~0.6 GB/s), and zstd's Huffman
literal coder does the work (see `_HASH_LOG`).

Reading is on every load's critical path, so two things here are chosen for speed:

- `crc32` uses ISA-L's CRC-32 (package ``isal``, same polynomial as zlib) when it is installed:
  11-14 GB/s against zlib's 2.4-3.4 GB/s on this project's 2-core EPYC test machine
  (1.3 MB blobs, best of 50; the machine was shared, so only the ratio means much). Without
  ``isal`` it falls back to `zlib.crc32`; `CRC_BACKEND` says which one runs. Both release the GIL.
- `decompress` can decode straight into a caller's buffer (``out=``): the loader reuses one
  buffer per thread instead of allocating (and page-faulting) a fresh one per blob. For a frame
  whose content size is declared and whose output buffer is large enough, zstd's streaming
  decoder takes its single-pass path, so this costs no extra copy.
"""

from __future__ import annotations

import threading
import zlib
from typing import Callable

import numpy as np
import zstandard

from ..constants import ENCODING_RAW, ENCODING_ZSTD

__all__ = ["compress", "decompress", "declared_size", "crc32", "frame_length", "Scratch", "CRC_BACKEND"]

_crc: Callable[[bytes | memoryview], int]
try:  # ISA-L's CRC-32: the zlib polynomial at memory speed (optional dependency)
    from isal.isal_zlib import crc32 as _crc

    CRC_BACKEND = "isal"
except ImportError:  # pragma: no cover - exercised where isal is not installed
    _crc = zlib.crc32
    CRC_BACKEND = "zlib"

_local = threading.local()


class Scratch:
    """Reusable decode buffers for one thread: ``get(slot, n)`` returns ``n`` bytes of buffer
    ``slot``, grown (never shrunk) as needed. What it returns is valid until the next ``get`` of
    the same slot; a loader keeps one per worker thread, so decoding a chunk allocates nothing.

    >>> s = Scratch()
    >>> a = s.get(0, 10); b = s.get(0, 4)
    >>> b.size, np.shares_memory(a, b)
    (4, True)
    """

    def __init__(self) -> None:
        self._bufs: dict[int, np.ndarray] = {}

    def get(self, slot: int, nbytes: int) -> np.ndarray:
        buf = self._bufs.get(slot)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[slot] = np.empty(nbytes, np.uint8)
        return buf[:nbytes]


#: ``level=None`` parameters per plane kind. Label planes: window 2^17 keeps zstd's blocks at
#: their 128 KiB maximum (a block is never larger than the window, and each block pays for its
#: own Huffman table), and the smallest hash table (2^6) all but turns match finding off: on
#: low-entropy labels (2.5 bits) the fast strategy's 7-byte matches are frequent and cost more
#: than the literals they replace (2.74 bits/label with hash_log 12, 2.56 with 6, against 2.53
#: for an ideal Huffman code; tools/bench_format.py --labels). Float byte planes (the lossless
#: codec's exponent and mantissa planes) are the same kind of stream: on the SmolLM2 embedding's
#: exponent plane hash_log 6 against 12 gave 2.67 against 2.81 bits per byte, and, with fewer
#: sequences to execute, decoded at 2.7–2.9 against 1.3–1.7 GB/s. Other byte planes (integers)
#: keep a real hash table.
_HASH_LOG = {"labels": 6, "float_planes": 6, "bytes": 12}

#: A zstd frame is stored only when it saves at least this share of the raw size: a frame that
#: saves less (a mantissa plane: 0.01%) costs a decode copy on every load for nothing, while a
#: raw blob is used where it lies in the mapped file.
MIN_SAVING = 1 / 64


def _params(level: int | None, kind: str = "bytes") -> zstandard.ZstdCompressionParameters:
    if level is None:
        return zstandard.ZstdCompressionParameters(
            window_log=17, hash_log=_HASH_LOG[kind], chain_log=12, search_log=1, min_match=7,
            target_length=0, strategy=zstandard.STRATEGY_FAST, write_content_size=True,
            write_checksum=False, write_dict_id=False,
        )
    return zstandard.ZstdCompressionParameters.from_level(
        level, write_content_size=True, write_checksum=False, write_dict_id=False
    )


def _compressor(level: int | None, kind: str = "bytes") -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get((level, kind))
    if c is None:
        c = cache[(level, kind)] = zstandard.ZstdCompressor(compression_params=_params(level, kind))
    return c


def compress(data: bytes | memoryview, level: int | None = None, kind: str = "bytes") -> tuple[bytes, str]:
    """Return (stored bytes, encoding): a zstd frame, or the input when the frame would not save
    at least `MIN_SAVING` of it.

    ``kind`` (``"labels"``, ``"float_planes"`` or ``"bytes"``) picks the tuned parameters when
    ``level`` is None."""
    if kind not in _HASH_LOG:
        raise ValueError(f"kind must be one of {sorted(_HASH_LOG)}, got {kind!r}")
    raw = bytes(data) if not isinstance(data, bytes) else data
    if not raw:
        return b"", ENCODING_RAW
    frame = _compressor(level, kind).compress(raw)
    if len(frame) > len(raw) * (1 - MIN_SAVING):
        return raw, ENCODING_RAW
    return frame, ENCODING_ZSTD


def decompress(
    stored: bytes | memoryview, encoding: str, expected_size: int, out: np.ndarray | None = None
) -> bytes | memoryview | np.ndarray:
    """Return exactly ``expected_size`` decoded bytes; raise ValueError on any mismatch.

    The declared frame size is checked before anything is allocated, and trailing bytes after
    the frame are refused, so a hostile blob cannot make the reader allocate more than the
    tensor it claims to hold.

    ``out``, if given, is a writeable contiguous uint8 array of at least ``expected_size`` bytes
    that receives a zstd frame's bytes; the result is then ``out[:expected_size]``. A raw blob is
    returned as it is (no copy), whether or not ``out`` is given.
    """
    if encoding == ENCODING_RAW:
        if len(stored) != expected_size:
            raise ValueError(f"raw blob holds {len(stored)} bytes, expected {expected_size}")
        return stored
    if encoding != ENCODING_ZSTD:
        raise ValueError(f"unknown encoding {encoding!r}")
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    if declared != expected_size:
        raise ValueError(f"zstd frame declares {declared} bytes, expected {expected_size}")
    # spec §7.1 rule 5 by a frame walk, on every path: python-zstandard's one-shot decompress
    # returns b"" for a frame declaring 0 bytes without reading its blocks (found by fuzzing)
    end = frame_length(stored)
    if end != len(stored):
        raise ValueError(f"corrupt zstd frame or trailing bytes (the frame ends at byte {end} of {len(stored)})")
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    if expected_size == 0:  # decode its blocks anyway: they must hold nothing (rule 6)
        try:
            extra = d.stream_reader(stored, read_across_frames=False).read(1)
        except zstandard.ZstdError as e:
            raise ValueError(f"corrupt zstd frame ({e})") from None
        if extra:
            raise ValueError("zstd frame declares 0 bytes but its blocks hold more")
        return b"" if out is None else out[:0]
    if out is not None:
        return _decompress_into(d, stored, expected_size, out)
    try:
        # One shot into a buffer of the declared (and checked) size; trailing bytes are refused.
        out = d.decompress(stored, max_output_size=expected_size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt zstd frame or trailing bytes ({e})") from None
    if len(out) != expected_size:
        raise ValueError(f"zstd frame decoded to {len(out)} bytes, expected {expected_size}")
    return out


def _decompress_into(
    d: zstandard.ZstdDecompressor, stored: bytes | memoryview, expected_size: int, out: np.ndarray
) -> np.ndarray:
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise TypeError("out must be a writeable contiguous 1-D uint8 array")
    if out.size < expected_size:
        raise ValueError(f"out holds {out.size} bytes, fewer than the {expected_size} to decode")
    dst = out[:expected_size]
    try:
        # The whole frame is input and the buffer holds its declared size: zstd decodes it in one pass.
        got = d.stream_reader(stored, read_size=len(stored), read_across_frames=False).readinto(dst)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt zstd frame ({e})") from None
    if got != expected_size:
        raise ValueError(f"zstd frame decoded to {got} bytes, expected {expected_size}")
    return dst


def frame_length(stored: bytes | memoryview) -> int:
    """The length in bytes of the zstd frame that starts ``stored``, from its header and block
    headers (RFC 8878 §3.1.1); raise ValueError if the frame runs past the end of ``stored``."""
    try:
        pos = zstandard.frame_header_size(stored)
        has_checksum = zstandard.get_frame_parameters(stored).has_checksum
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    view = memoryview(stored)
    n = len(view)
    while True:
        if pos + 3 > n:
            raise ValueError("zstd frame is incomplete (a block header is cut off)")
        head = int.from_bytes(view[pos : pos + 3], "little")
        kind, size = (head >> 1) & 3, head >> 3
        if kind == 3:
            raise ValueError("zstd frame holds a reserved block type")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if pos > n:
            raise ValueError("zstd frame is incomplete (a block is cut off)")
        if head & 1:
            return pos + (4 if has_checksum else 0)


def declared_size(stored: bytes | memoryview, encoding: str) -> int | None:
    """The decoded size a stored blob declares (raw: its length; zstd: its frame header's), or
    None when it declares none. Reads only the frame header, so a reader can check every size
    before it allocates anything (spec §9.1)."""
    if encoding == ENCODING_RAW:
        return len(stored)
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        return None
    return size if size >= 0 else None


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib) of the stored bytes of a blob (spec §7.3).

    >>> hex(crc32(b"123456789"))  # the check value of CRC-32/ISO-HDLC
    '0xcbf43926'
    """
    return _crc(data) & 0xFFFFFFFF
