"""Hand-built zstd frames for the limits of spec §7.1, shared by tests/test_reader_limits.py and
tests/test_reference_limits.py (RFC 8878 §3.1.1: frame header, window descriptor, raw blocks)."""

from __future__ import annotations

#: RFC 8878's Window_Descriptor: Exponent (5 bits) and Mantissa (3 bits);
#: window = 2^(10+e) + 2^(10+e)/8 · m.
def window_bytes(descriptor: int) -> int:
    e, m = descriptor >> 3, descriptor & 7
    return (1 << (10 + e)) + (1 << (10 + e)) // 8 * m


MIB = 1 << 20


def frame(content: bytes = b"wclust" * 50, *, window: int | None = None, dict_flag: int = 0) -> bytes:
    """One zstd frame holding ``content`` as a single raw block, with a 4-byte content size.
    ``window``: a Window_Descriptor byte (the frame is then not single-segment); ``dict_flag``:
    the Dictionary_ID_flag (0-3), with a dictionary id of 1, 2 or 4 bytes."""
    fhd = (2 << 6) | (0 if window is not None else 0x20) | dict_flag
    out = bytearray((0xFD2FB528).to_bytes(4, "little")) + bytes([fhd])
    if window is not None:
        out.append(window)
    if dict_flag:
        out += (7).to_bytes({1: 1, 2: 2, 3: 4}[dict_flag], "little")  # a dictionary id
    out += len(content).to_bytes(4, "little")
    out += (1 | (len(content) << 3)).to_bytes(3, "little")  # last block, raw
    return bytes(out + content)
