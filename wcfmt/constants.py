"""Every fixed number of the .wclust v1 format, in one place (spec §2, §3, §9).

The spec (`spec/wclust-v1.md`) is the contract; this module is its single source of truth in
code. Nothing else in wcfmt spells a magic number, a limit or an alignment.
"""

from __future__ import annotations

from typing import Final

#: First 8 bytes of every .wclust file (spec §3.1).
MAGIC: Final[bytes] = b"\x89WCLUST\n"

#: Format version written by this library (spec §10).
VERSION_MAJOR: Final[int] = 1
VERSION_MINOR: Final[int] = 0

#: Size of the fixed preamble in bytes (spec §3.1).
PREAMBLE_SIZE: Final[int] = 64

#: Every data blob starts on a multiple of this many bytes from the file start (spec §3.2).
ALIGNMENT: Final[int] = 64

#: Readers refuse headers larger than this (spec §3.3): bounded allocation on untrusted input.
MAX_HEADER_BYTES: Final[int] = 100 * 1024 * 1024

#: Most dimensions a tensor may have, and most centroids a row chunk may hold (spec §4, §5).
MAX_NDIM: Final[int] = 8
MAX_K: Final[int] = 256

#: Label widths a clustered chunk may use (spec §5.3): byte-aligned so zstd's Huffman stage
#: sees whole symbols (a 5-bit packing leaves zstd at 5.00 bits/label, one byte each at 4.35).
LABEL_BITS_ALLOWED: Final[tuple[int, ...]] = (0, 1, 2, 4, 8)

#: Default row-chunk size for lossless tensors (spec §6): one frame per chunk bounds memory and
#: lets chunks decode in parallel.
DEFAULT_LOSSLESS_CHUNK_BYTES: Final[int] = 4 * 1024 * 1024

#: Rows per stored chunk of a clustered tensor whose codebook spans more rows (spec §4.6):
#: chunks are the unit of parallel decoding and of row-range reads; repeating a 64-entry table
#: costs 128 bytes per chunk (SmolLM2-135M: +0.04% of the file).
DEFAULT_STORAGE_CHUNK_ROWS: Final[int] = 256

#: Blob encodings (spec §7).
ENCODING_RAW: Final[str] = "raw"
ENCODING_ZSTD: Final[str] = "zstd"

#: Largest zstd window a frame may declare (spec §7.1): zstd's default decoder limit, so every
#: conforming frame decodes with stock settings; a single-segment frame's window is its size.
MAX_ZSTD_WINDOW: Final[int] = 1 << 27

#: Default cap on the bytes one call of the CLI decodes (``--max-bytes``, spec §9.1): far above
#: any chunk wcfmt writes (lossless chunks ~4 MiB, clustered 256 rows), far below a machine's RAM.
CLI_MAX_BYTES: Final[int] = 1 << 30

#: Codec identifiers (spec §5, §6).
CODEC_CLUSTERED: Final[str] = "clustered"
CODEC_LOSSLESS: Final[str] = "lossless"

#: File name suffix and the index file of a packed folder (spec §8).
SUFFIX: Final[str] = ".wclust"
INDEX_NAME: Final[str] = "model.wclust.index.json"


def label_bits_for_k(k: int) -> int:
    """Return the label width a chunk with ``k`` centroids uses (spec §5.3).

    >>> [label_bits_for_k(k) for k in (1, 2, 3, 4, 5, 16, 17, 64, 256)]
    [0, 1, 2, 2, 4, 4, 8, 8, 8]
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    if k == 1:
        return 0
    need = (k - 1).bit_length()
    for bits in LABEL_BITS_ALLOWED[1:]:
        if bits >= need:
            return bits
    raise AssertionError("unreachable: MAX_K fits in 8 bits")
