"""Reading .wclust files safely (spec §3, §9). The reader never imports the writer.

Nothing in the file is trusted: the preamble is checked field by field, the header length is
capped before it is read, the header's CRC is verified before it is parsed, every blob's range
is checked against the file (and against every other blob) before anything is allocated, every
blob's CRC is verified when it is read, and decoded data is checked (labels < K, padding zero,
centroid tables finite and ascending).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np

from .codecs import clustered, entropy, lossless
from .codecs.bitpack import packed_size
from .constants import (
    ALIGNMENT,
    ENCODING_RAW,
    ENCODING_ZSTD,
    MAGIC,
    MAX_ZSTD_WINDOW,
    MAX_HEADER_BYTES,
    PREAMBLE_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
)
from .dtypes import itemsize, storage_dtype
from .errors import ChecksumError, FormatError, HeaderError, TensorNotFoundError, UsageError, VersionError, where
from .schema import AliasEntry, Blob, ClusteredEntry, Header, LosslessEntry, chunk_row_ranges, parse_header, rows_and_row_size

__all__ = ["WclustReader", "read_preamble", "auto_max_bytes", "AUTO_MAX_RATIO", "AUTO_MAX_FLOOR"]

#: ``max_bytes="auto"`` (the CLI's default): a file may decode to this many times its own size,
#: and never less than `AUTO_MAX_FLOOR`. Real files stay far below it: clustered bf16 weights at
#: 1-4 stored bits are 4-16x (32x in F32), lossless tensors about 1.5x, so only a file that is
#: mostly constant tensors (k = 1 chunks, zeros) or a hostile one goes past it.
AUTO_MAX_RATIO = 64
#: The least ``"auto"`` allows whatever the file's size, so that small files of constant tensors load.
AUTO_MAX_FLOOR = 256 << 20


def auto_max_bytes(file_size: int) -> int:
    """The decoding cap ``max_bytes="auto"`` sets for a file of ``file_size`` bytes (spec §9.1)."""
    return max(AUTO_MAX_FLOOR, AUTO_MAX_RATIO * file_size)

_PREAMBLE = struct.Struct("<8sHHIQQI28s")


def read_preamble(head: bytes, file_size: int, path: object) -> tuple[int, int, int, int, int]:
    """Validate the 64-byte preamble; return (major, minor, header_offset, header_length, header_crc)."""
    if head[: len(MAGIC)] != MAGIC[: len(head)] or not head:
        # Not ours at all (a text file, a safetensors file): say so, not "truncated" or "bad version".
        hint = "; it looks like a safetensors file: pack it with `wcfmt pack`" if _looks_like_safetensors(head) else ""
        raise FormatError(f"{path}: not a .wclust file (magic {head[: len(MAGIC)]!r}, expected {MAGIC!r}){hint}")
    if file_size < PREAMBLE_SIZE or len(head) < PREAMBLE_SIZE:
        raise FormatError(f"{path}: file is truncated ({file_size} bytes; a .wclust file has at least {PREAMBLE_SIZE})")
    magic, major, minor, flags, h_off, h_len, h_crc, reserved = _PREAMBLE.unpack(head[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise FormatError(f"{path}: not a .wclust file (magic {magic!r}, expected {MAGIC!r})")
    if major != VERSION_MAJOR:
        raise VersionError(
            f"{path}: format version {major}.{minor} is not supported (this reader implements {VERSION_MAJOR}.x)"
        )
    if flags != 0:
        raise FormatError(f"{path}: preamble flags are 0x{flags:08x}; reserved bits must be zero")
    if any(reserved):
        raise FormatError(f"{path}: preamble reserved bytes are not zero")
    if h_len > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {h_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if h_off < PREAMBLE_SIZE or h_off % ALIGNMENT:
        raise FormatError(f"{path}: header offset {h_off} is not an aligned position after the preamble")
    if h_off + h_len != file_size:
        kind = "truncated" if h_off + h_len > file_size else "followed by trailing bytes"
        raise FormatError(
            f"{path}: file is {kind} (header ends at {h_off + h_len}, file size is {file_size})"
        )
    return major, minor, h_off, h_len, h_crc


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON object.
    return len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (100 << 20)


class WclustReader:
    """Random access to the tensors of one .wclust file.

    ``use_mmap=False`` reads blobs with positioned reads instead of mapping the file (faster on
    network file systems, where mmap page faults are slow).

    ``max_bytes`` caps the decoded bytes any one call allocates (a chunk, a row range, a whole
    tensor; `wcfmt.load_file` applies it to all tensors together): a chunk with ``k = 1`` has no
    label bytes, so a tiny untrusted file can describe terabytes (spec §9.1). Over the cap, the
    call raises `UsageError` before allocating. ``None`` (the default) means no cap; ``"auto"``
    is `auto_max_bytes` of the file's size (what the ``wcfmt`` command uses).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, use_mmap: bool = True, max_bytes: int | str | None = None
    ) -> None:
        self.path = Path(path)
        if max_bytes is not None and max_bytes != "auto" and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
        ):
            raise UsageError(f"{self.path}: max_bytes must be a non-negative integer, 'auto' or None, got {max_bytes!r}")
        self.max_bytes: int | None = None
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a folder, not a .wclust file") from None
        try:
            self.file_size = os.fstat(self._fh.fileno()).st_size
            self.max_bytes = auto_max_bytes(self.file_size) if max_bytes == "auto" else max_bytes  # type: ignore[assignment]
            head = os.pread(self._fh.fileno(), PREAMBLE_SIZE, 0)
            self.version, self._header_offset, self.header = self._read_header(head)
            self._check_blobs()
            self._map: mmap.mmap | None = None
            if use_mmap and self.file_size:
                self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._fh.close()
            raise

    # -- opening ----------------------------------------------------------------------------
    def _read_header(self, head: bytes) -> tuple[tuple[int, int], int, Header]:
        major, minor, h_off, h_len, h_crc = read_preamble(head, self.file_size, self.path)
        raw = os.pread(self._fh.fileno(), h_len, h_off)
        if len(raw) != h_len:
            raise FormatError(f"{self.path}: file is truncated inside the header")
        got = entropy.crc32(raw)
        if got != h_crc:
            raise ChecksumError(f"{self.path}: header checksum mismatch (expected 0x{h_crc:08x}, got 0x{got:08x})")
        try:
            header = parse_header(raw, lenient=minor > VERSION_MINOR)
        except ValueError as e:
            raise HeaderError(f"{self.path}: invalid header: {e}") from None
        return (major, minor), h_off, header

    def _check_blobs(self) -> None:
        # spec §9.4 step 4: every known tensor's blobs, also those of a tensor of a known codec
        # that needs an unknown dtype, transform or encoding (§10); an unknown codec has none
        known = [
            (b.offset, b.length, f"tensor {n!r} {what}") for n, e in self.header.tensors.items() for b, what in _blobs_of(e)
        ]
        spans: list[tuple[int, int, str]] = []
        for offset, length, what in known + self.header.unsupported_blobs:
            end = offset + length
            if offset < PREAMBLE_SIZE or end > self._header_offset:
                raise FormatError(
                    f"{self.path}: {what} blob [{offset}, {end}) lies outside the data "
                    f"section [{PREAMBLE_SIZE}, {self._header_offset})"
                )
            if length:
                spans.append((offset, end, what))
        spans.sort()
        for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise FormatError(f"{self.path}: blobs overlap ({an} and {bn})")

    # -- context / lifetime -------------------------------------------------------------------
    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # arrays still view the mapping (e.g. a traceback's frames); it closes when they go
            self._map = None
        self._fh.close()

    def __enter__(self) -> "WclustReader":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- header views ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.header.tensors) + list(self.header.unsupported)

    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    def entry(self, name: str) -> ClusteredEntry | LosslessEntry | AliasEntry:
        try:
            return self.header.tensors[name]
        except KeyError:
            needs = self.header.unsupported.get(name)
            if needs is not None:
                raise VersionError(
                    f"{where(self.path, name)}: {needs} (file version {self.version[0]}.{self.version[1]}) "
                    f"is not implemented by this reader ({VERSION_MAJOR}.{VERSION_MINOR})"
                ) from None
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def resolve(self, name: str) -> tuple[str, ClusteredEntry | LosslessEntry]:
        """Follow an alias to the entry that holds the data."""
        e = self.entry(name)
        if isinstance(e, AliasEntry):
            return e.target, self.header.tensors[e.target]  # type: ignore[return-value]
        return name, e

    # -- blobs -------------------------------------------------------------------------------
    def _stored(self, blob: Blob) -> bytes | memoryview:
        if blob.length == 0:
            return b""
        if self._map is not None:
            return memoryview(self._map)[blob.offset : blob.offset + blob.length]
        data = os.pread(self._fh.fileno(), blob.length, blob.offset)
        if len(data) != blob.length:
            raise FormatError(f"{self.path}: short read at offset {blob.offset} (file changed while open?)")
        return data

    def _reader_for(self, name: str, chunk: int):  # type: ignore[no-untyped-def]
        def read(blob: Blob, expected: int, what: str, out: np.ndarray | None = None) -> bytes | memoryview:
            # out: a buffer a zstd frame decodes into (the loader's per-thread scratch), see entropy.decompress
            stored = self._stored(blob)
            got = entropy.crc32(stored)
            if got != blob.crc32:
                raise ChecksumError(
                    f"{where(self.path, name, chunk)}: {what} checksum mismatch "
                    f"(expected 0x{blob.crc32:08x}, got 0x{got:08x})"
                )
            try:
                if blob.encoding == ENCODING_ZSTD:
                    _zstd_frame_rules(stored)
                return entropy.decompress(stored, blob.encoding, expected, out)
            except ValueError as e:
                raise FormatError(f"{where(self.path, name, chunk)}: {what}: {e}") from None

        return read

    # -- decoding -------------------------------------------------------------------------------
    def read_centroids(self, name: str, chunk: int) -> np.ndarray:
        """Return the fp16 centroid table of one chunk of a clustered tensor (verified)."""
        name, e = self.resolve(name)
        e = self._clustered(name, e)
        return self._checked(name, chunk, lambda: clustered.read_centroids(e, chunk, self._reader_for(name, chunk)))

    def read_labels(self, name: str, chunk: int, scratch: entropy.Scratch | None = None) -> np.ndarray:
        """Return the packed label plane of one chunk (verified, decompressed, labels < K).

        With ``scratch``, a zstd plane decodes into its buffer (valid until its next use)."""
        name, e = self.resolve(name)
        e = self._clustered(name, e)
        read = self._reader_for(name, chunk)
        return self._checked(name, chunk, lambda: clustered.read_labels(e, chunk, read, scratch=scratch))

    def decode_chunk(
        self, name: str, chunk: int, out: np.ndarray | None = None, scratch: entropy.Scratch | None = None
    ) -> np.ndarray:
        """Return one chunk's values (flat, storage form) through the canonical decoder.

        ``out`` (a contiguous array of the chunk's size and storage dtype) receives the values;
        ``scratch`` holds the intermediate planes, so the loader allocates nothing per chunk."""
        name, e = self.resolve(name)
        codec = clustered if isinstance(e, ClusteredEntry) else lossless
        if 0 <= chunk < len(e.chunks):
            rows, row_size = rows_and_row_size(e.shape)
            a, b = chunk_row_ranges(rows, e.chunk_rows)[chunk]
            self.check_budget((b - a) * row_size * itemsize(e.dtype), f"{where(self.path, name, chunk)}")
        read = self._reader_for(name, chunk)
        values = self._checked(name, chunk, lambda: codec.decode_chunk(e, chunk, read, out=out, scratch=scratch))
        if e.dtype == "BOOL" and values.size and int(values.view(np.uint8).max()) > 1:
            # spec §6.3: a BOOL element is the byte 0 or 1; any other is refused, not read as True
            raise FormatError(f"{where(self.path, name, chunk)}: BOOL element holds a byte other than 0 or 1")
        return values

    def nbytes(self, name: str) -> int:
        """Decoded size of a tensor in bytes (its dtype's element size times its element count)."""
        _, e = self.resolve(name)
        return math.prod(e.shape) * itemsize(e.dtype)

    def check_budget(self, nbytes: int, what: str) -> None:
        """Raise `UsageError` if decoding ``nbytes`` would exceed ``max_bytes`` (spec §9.1)."""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise UsageError(
                f"{what}: decoding needs {nbytes} bytes, more than the cap of {self.max_bytes} "
                f"(max_bytes= / --max-bytes; raise it, or pass None / --max-bytes 0 if the file is trusted)"
            )

    def check_file_budget(self) -> None:
        """Raise `UsageError` if decoding every tensor the file stores (aliases once) would exceed
        ``max_bytes``: for whole-file passes (load, unpack, verify), checked before any decoding."""
        stored = [n for n, e in self.header.tensors.items() if not isinstance(e, AliasEntry)]
        self.check_budget(sum(self.nbytes(n) for n in stored), str(self.path))

    def decode_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Return rows [start, stop) (storage form, shape (stop-start, *shape[1:])), reading only their chunks."""
        name, e = self.resolve(name)
        rows, row_size = rows_and_row_size(e.shape)
        start, stop = max(0, start), min(rows, stop)
        out_shape = ([max(0, stop - start)] + list(e.shape[1:])) if e.shape else []
        self.check_budget(max(0, stop - start) * row_size * itemsize(e.dtype), where(self.path, name))
        if stop > start and row_size:
            ranges = chunk_row_ranges(rows, e.chunk_rows)
            self.check_sizes(name, [i for i, (a, b) in enumerate(ranges) if a < stop and b > start])
        out = np.empty(max(0, stop - start) * row_size, dtype=storage_dtype(e.dtype))
        if stop > start and row_size:
            for i, (a, b) in enumerate(chunk_row_ranges(rows, e.chunk_rows)):
                if b <= start or a >= stop:
                    continue
                values = self.decode_chunk(name, i)
                lo, hi = max(a, start), min(b, stop)
                out[(lo - start) * row_size : (hi - start) * row_size] = values[(lo - a) * row_size : (hi - a) * row_size]
        return out.reshape(out_shape)

    def check_sizes(self, name: str, chunks: list[int] | range) -> None:
        """Check that the blobs of these chunks declare the decoded sizes the header implies,
        before anything is allocated for them: a header shape that its blobs cannot fill is a
        FormatError (or a ChecksumError, if the blob is also damaged), not a huge allocation."""
        name, e = self.resolve(name)
        rows, row_size = rows_and_row_size(e.shape)
        ranges = chunk_row_ranges(rows, e.chunk_rows)
        for i in chunks:
            if not 0 <= i < len(e.chunks):
                raise FormatError(f"{where(self.path, name)}: chunk {i} does not exist ({len(e.chunks)} chunks)")
            count = (ranges[i][1] - ranges[i][0]) * row_size
            if isinstance(e, ClusteredEntry):
                c = e.chunks[i]
                sizes = [(c.centroids, 2 * c.k, "centroids"), (c.labels, packed_size(count, c.label_bits), "labels")]
            else:
                sizes = [(p, count, f"plane {j}") for j, p in enumerate(e.chunks[i].planes)]
            for blob, expected, what in sizes:
                if self._declared_size(blob) != expected:
                    read = self._reader_for(name, i)
                    self._checked(name, i, lambda: read(blob, expected, what))  # CRC first, then size
                    raise FormatError(f"{where(self.path, name, i)}: {what} does not hold {expected} bytes")

    def _declared_size(self, blob: Blob) -> int | None:
        """A blob's decoded size from its length (raw) or its zstd frame header (at most 18 bytes)."""
        if blob.encoding == ENCODING_RAW:
            return blob.length
        n = min(blob.length, 18)
        if self._map is not None:
            head: bytes | memoryview = memoryview(self._map)[blob.offset : blob.offset + n]
        else:
            head = os.pread(self._fh.fileno(), n, blob.offset)
        return entropy.declared_size(head, blob.encoding)

    def decode(self, name: str) -> np.ndarray:
        """Return the whole tensor in storage form (BF16 as uint16 bits), shaped."""
        _, e = self.resolve(name)
        rows, _ = rows_and_row_size(e.shape)
        return self.decode_rows(name, 0, rows).reshape(e.shape)

    def verify_tensor(self, name: str) -> None:
        """Read and check every blob of one tensor (nothing for an alias); raise on the first problem."""
        e = self.entry(name)  # VersionError for a tensor whose codec this reader lacks
        if not isinstance(e, AliasEntry):
            for i in range(len(e.chunks)):
                self.decode_chunk(name, i)

    def verify(self) -> None:
        """Read and check every blob of every tensor; raise on the first problem."""
        for name in self.keys():
            self.verify_tensor(name)

    # -- helpers ---------------------------------------------------------------------------------
    def _clustered(self, name: str, e: ClusteredEntry | LosslessEntry) -> ClusteredEntry:
        if not isinstance(e, ClusteredEntry):
            from .errors import UsageError

            raise UsageError(f"{where(self.path, name)}: tensor is stored {e.codec}, not clustered")
        return e

    def _checked(self, name: str, chunk: int, fn):  # type: ignore[no-untyped-def]
        _, e = self.resolve(name)
        if not 0 <= chunk < len(e.chunks):
            raise FormatError(f"{where(self.path, name)}: chunk {chunk} does not exist ({len(e.chunks)} chunks)")
        try:
            return fn()
        except (FormatError,):
            raise
        except ValueError as err:
            raise FormatError(f"{where(self.path, name, chunk)}: {err}") from None


def _zstd_frame_rules(stored: bytes | memoryview) -> None:
    """The rules of spec §7.1 that a one-shot zstd decoder does not check itself: the blob is a
    zstd frame (not a skippable one), its reserved bit is clear, it names no dictionary, and it
    has a window of at most 128 MiB.
    (Content size, truncation and further bytes are checked by `entropy.decompress`.)"""
    head = bytes(stored[:6])
    if len(head) < 5:
        return  # too short to be a frame: decompress reports it
    magic = int.from_bytes(head[:4], "little")
    if magic & 0xFFFFFFF0 == 0x184D2A50:
        raise ValueError("blob is a skippable zstd frame; it must be exactly one zstd frame")
    if magic != 0xFD2FB528:
        return  # not a frame: decompress reports it
    descriptor = head[4]
    if descriptor & 0x08:  # RFC 8878's Reserved_bit (bit 3); the Unused_bit (bit 4) may be either
        raise ValueError("zstd frame header descriptor has its reserved bit set")
    if descriptor & 0x03:
        raise ValueError("zstd frame names a dictionary; dictionaries are not allowed")
    if not descriptor & 0x20 and len(head) == 6:  # not single-segment: a window descriptor follows
        base = 1 << (10 + (head[5] >> 3))
        window = base + (base >> 3) * (head[5] & 7)
        if window > MAX_ZSTD_WINDOW:
            raise ValueError(f"zstd frame window is {window} bytes, more than {MAX_ZSTD_WINDOW}")


def _blobs_of(e: object) -> list[tuple[Blob, str]]:
    if isinstance(e, ClusteredEntry):
        out = []
        for i, c in enumerate(e.chunks):
            out += [(c.centroids, f"chunk {i} centroids"), (c.labels, f"chunk {i} labels")]
        return out
    if isinstance(e, LosslessEntry):
        return [(p, f"chunk {i} plane {j}") for i, c in enumerate(e.chunks) for j, p in enumerate(c.planes)]
    return []
