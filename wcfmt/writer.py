"""Streaming writer of .wclust files (spec §3): blobs first, header last, preamble patched.

Tensors are encoded and written one at a time, so memory stays near the largest tensor; the
header, which must list every blob, is written after the data and the preamble that points at
it is patched last. The file is built under a temporary name in the destination folder and
renamed into place only when complete: a crash or error never leaves a partial output.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Callable

import torch

from ._version import __version__
from .atomic import AtomicFile
from .clustered_tensor import ClusteredTensor
from .codecs import clustered, entropy, lossless
from .constants import ALIGNMENT, MAGIC, PREAMBLE_SIZE, VERSION_MAJOR, VERSION_MINOR
from .dtypes import DTYPES
from .errors import OutputExistsError, UsageError, where
from .ordered_pool import bounded_map
from .schema import AliasEntry, Blob, Header, PackSettings, serialize_header

__all__ = ["WclustWriter", "pack_preamble"]

#: little-endian: magic, major, minor, flags, header offset, header length, header crc32, reserved
PREAMBLE = struct.Struct("<8sHHIQQI28x")
assert PREAMBLE.size == PREAMBLE_SIZE


def pack_preamble(header_offset: int, header_length: int, header_crc: int) -> bytes:
    """Return the 64-byte preamble (spec §3.1)."""
    return PREAMBLE.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0, header_offset, header_length, header_crc)


class WclustWriter:
    """Write a .wclust file tensor by tensor.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.wclust")
    >>> with WclustWriter(path, metadata={"note": "demo"}) as w:
    ...     w.add("bias", torch.zeros(3))
    >>> os.path.getsize(path) > 64
    True
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: dict[str, str] | None = None,
        settings: PackSettings | None = None,
        level: int | None = None,
        threads: int | None = None,
        overwrite: bool = False,
        producer: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._producer = producer or f"wcfmt {__version__}"
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise UsageError(f"{self.path}: metadata must be a dict of str to str, like safetensors'")
        self._metadata = dict(metadata or {})
        self._settings = settings
        self._level = level
        self._threads = max(1, threads or min(4, os.cpu_count() or 1))
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path}: output exists (pass overwrite=True / --force to replace it)")
        if not self.path.parent.is_dir():
            raise UsageError(f"{self.path}: folder {self.path.parent} does not exist")
        self._out = AtomicFile(self.path)
        self._f = self._out.file
        self._f.write(bytes(PREAMBLE_SIZE))
        self._pos = PREAMBLE_SIZE
        self._entries: dict[str, object] = {}
        self._done = False

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "WclustWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- blobs -------------------------------------------------------------------------------
    def _put(self, payload: bytes, encoding: str) -> Blob:
        pad = -self._pos % ALIGNMENT
        if pad:
            self._f.write(bytes(pad))
            self._pos += pad
        offset = self._pos
        self._f.write(payload)
        self._pos += len(payload)
        return Blob(offset=offset, length=len(payload), encoding=encoding, crc32=entropy.crc32(payload))

    def _run(self, jobs: list[Callable[[], list[tuple[bytes, str]]]]) -> list[list[Blob]]:
        """Encode chunks in a thread pool (zstd and numpy release the GIL), write them in order."""
        out: list[list[Blob]] = []
        if self._threads == 1 or len(jobs) <= 1:
            for job in jobs:
                out.append([self._put(p, enc) for p, enc in job()])
            return out
        with ThreadPoolExecutor(self._threads) as pool:
            # Bounded look-ahead: at most 2 x threads encoded chunks wait in memory.
            for payloads in bounded_map(pool, jobs, 2 * self._threads):
                out.append([self._put(p, enc) for p, enc in payloads])
        return out

    # -- public --------------------------------------------------------------------------------
    def add(self, name: str, value: torch.Tensor | ClusteredTensor) -> None:
        """Encode and write one tensor: `ClusteredTensor` → clustered codec, `torch.Tensor` → lossless."""
        self._check_name(name)
        if isinstance(value, ClusteredTensor):
            entry = clustered.make_entry(value, self._run(clustered.encode_chunks(value, self._level)))
        elif isinstance(value, torch.Tensor):
            if value.dtype not in {v[2] for v in DTYPES.values()}:
                raise UsageError(f"{where(self.path, name)}: unsupported dtype {value.dtype}")
            if value.layout != torch.strided:
                raise UsageError(f"{where(self.path, name)}: only dense (strided) tensors can be stored")
            chunk_rows, jobs = lossless.encode_chunks(value, self._level)
            entry = lossless.make_entry(value, chunk_rows, self._run(jobs))
        else:
            raise UsageError(
                f"{where(self.path, name)}: value must be a torch.Tensor or ClusteredTensor, "
                f"got {type(value).__name__}"
            )
        self._entries[name] = entry

    def add_alias(self, name: str, target: str) -> None:
        """Record ``name`` as sharing ``target``'s data (tied weights, spec §4.5)."""
        self._check_name(name)
        t = self._entries.get(target)
        if t is None or isinstance(t, AliasEntry):
            raise UsageError(f"{where(self.path, name)}: alias target {target!r} must be a tensor already written")
        self._entries[name] = AliasEntry(dtype=t.dtype, shape=list(t.shape), codec="alias", target=target)  # type: ignore[attr-defined]

    def _check_name(self, name: str) -> None:
        if self._done:
            raise UsageError(f"{self.path}: writer is closed")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{self.path}: tensor names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise UsageError(f"{where(self.path, name)}: tensor written twice")

    def close(self) -> None:
        """Write header and preamble, flush, and rename into place (atomic)."""
        if self._done:
            return
        try:
            header = Header(
                producer=self._producer,
                metadata=self._metadata,
                settings=self._settings,
                tensors=self._entries,  # type: ignore[arg-type]
            )
            raw = serialize_header(header)
            pad = -self._pos % ALIGNMENT
            self._f.write(bytes(pad))
            offset = self._pos + pad
            self._f.write(raw)
            self._f.seek(0)
            self._f.write(pack_preamble(offset, len(raw), entropy.crc32(raw)))
        except BaseException:
            self.abort()
            raise
        self._out.commit()
        self._done = True

    def abort(self) -> None:
        """Discard the temporary file; the destination is left as it was."""
        self._done = True
        self._out.abort()
