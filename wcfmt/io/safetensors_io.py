"""Reading safetensors files tensor by tensor, and writing them tensor by tensor.

The reader parses and checks the safetensors header itself (to learn dtypes, shapes and file
order before any data is read, and to name the file in every error), has
``safetensors.safe_open`` — the reference reader — check it too, then reads one tensor at a time
with positioned reads (see `SafetensorsSource` for why not through safe_open's memory map).

The writer streams: the safetensors header lists every tensor's offsets, but those follow from
dtypes and shapes alone, so the header is written first and each tensor's bytes are appended as
they are produced (a chunk at a time if the caller likes). Peak memory is one chunk, where
``safetensors.torch.save_file`` needs the whole shard in memory. The bytes are the ones
``safetensors.torch.save_file`` writes for the same tensors and metadata (same tensor order —
dtype alignment descending, then name — same JSON, same space padding), checked by a test.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import numpy as np
import torch

from ..atomic import AtomicFile
from ..dtypes import DTYPES, itemsize, torch_dtype
from ..errors import FormatError, OutputExistsError, TensorNotFoundError, UsageError, where

__all__ = [
    "SAFETENSORS_SUFFIX",
    "TensorInfo",
    "SafetensorsSource",
    "SafetensorsStreamWriter",
    "read_safetensors_header",
    "safetensors_order",
    "parse_size",
    "plan_shards",
    "shard_file_name",
    "format_size",
]

SAFETENSORS_SUFFIX = ".safetensors"

#: safetensors refuses headers above 100 MB; so do we (bounded allocation on untrusted input).
_MAX_HEADER = 100_000_000

#: safetensors' ``Dtype`` enum order (Rust ``derive(Ord)``); files sort tensors by it, descending.
_DTYPE_RANK: dict[str, int] = {
    name: i
    for i, name in enumerate(
        "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}

#: Size units of ``parse_size``: decimal, as huggingface_hub's ``parse_size_to_int``.
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


# --------------------------------------------------------------------------------------------
# sizes and shard plans (huggingface_hub's rules)
# --------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Return a byte count from an int or a string such as ``"5GB"`` or ``"500MB"``.

    Units are decimal (``KB`` = 1000 bytes), as huggingface_hub's ``parse_size_to_int``; a bare
    number, or one ending in ``B``, is bytes.

    >>> parse_size("5GB"), parse_size("1.5 MB"), parse_size("42"), parse_size(7)
    (5000000000, 1500000, 42, 7)
    """
    if isinstance(size, bool):
        raise UsageError(f"size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        text = size.strip()
        unit = text[-2:].upper()
        if unit in _SIZE_UNITS:
            number, mult = text[:-2], _SIZE_UNITS[unit]
        else:  # bytes: "42" or "42B"
            number, mult = (text[:-1] if text[-1:].upper() == "B" else text), 1
        try:
            value = int(float(number.strip()) * mult)
        except ValueError:
            raise UsageError(
                f"size {size!r} is not a size (expected a number of bytes or e.g. '5GB', '500MB'; units: "
                f"{', '.join(_SIZE_UNITS)})"
            ) from None
    else:
        raise UsageError(f"size must be an int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise UsageError(f"size must be positive, got {size!r}")
    return value


def shard_file_name(index: int, count: int, stem: str = "model", suffix: str = SAFETENSORS_SUFFIX) -> str:
    """Return a shard's name as ``save_pretrained`` writes it (``index`` counts from 0).

    >>> shard_file_name(0, 1), shard_file_name(1, 3)
    ('model.safetensors', 'model-00002-of-00003.safetensors')
    """
    if count == 1:
        return f"{stem}{suffix}"
    return f"{stem}-{index + 1:05d}-of-{count:05d}{suffix}"


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int | str) -> list[list[str]]:
    """Split tensors (name, bytes), in order, into shards as huggingface_hub does.

    A new shard starts when the next tensor would tip the current one over the limit; a tensor
    larger than the limit gets a shard of its own, placed when it is met, while the current shard
    stays open. No bin packing. (huggingface_hub's ``split_torch_state_dict_into_shards`` gives
    the same split; a test compares them.)

    >>> plan_shards([("a", 6), ("b", 6), ("c", 2), ("d", 11), ("e", 2)], 10)
    [['a'], ['d'], ['b', 'c', 'e']]
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > limit:
            shards.append([name])
            continue
        if current_size + size > limit and current:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def safetensors_order(dtypes: dict[str, str]) -> list[str]:
    """Return tensor names in the order safetensors lays them out: dtype descending, then name.

    >>> safetensors_order({"b": "F32", "a": "BF16", "c": "F32"})
    ['b', 'c', 'a']
    """
    return sorted(dtypes, key=lambda n: (-_DTYPE_RANK.get(dtypes[n], -1), n))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype name, shape and where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse and check a safetensors header; return (metadata, tensors in file order).

    Raises `FormatError` naming the file when it is not a valid safetensors file (it checks what
    safetensors checks: header size, JSON, dtype/shape/offset consistency, offsets covering the
    data exactly).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            raw = f.read(n)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, expected a .safetensors file") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = data.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    infos: list[TensorInfo] = []
    for name, e in data.items():
        try:
            dtype, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(a, int)
                and isinstance(b, int)
                and 0 <= a <= b
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FormatError(f"{where(path, name)}: malformed safetensors entry {e!r}")
        if dtype in DTYPES and math.prod(shape) * itemsize(dtype) != b - a:
            raise FormatError(
                f"{where(path, name)}: {b - a} data bytes do not match shape {shape} of dtype {dtype}"
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), base + a, base + b))
    infos.sort(key=lambda t: (t.start, t.stop))
    pos = base
    for t in infos:
        if t.start != pos:
            raise FormatError(f"{where(path, t.name)}: data offsets overlap or leave a gap (at byte {t.start - base})")
        pos = t.stop
    if pos != size:
        raise FormatError(f"{path}: data section is {size - base} bytes, the header describes {pos - base}")
    return dict(meta), {t.name: t for t in infos}


class SafetensorsSource:
    """One safetensors file opened for reading tensor by tensor.

    The file is checked twice on opening — by `read_safetensors_header` and by
    ``safetensors.safe_open``, the reference reader — and then each tensor is read with plain
    positioned reads into a fresh buffer. Not through safe_open's memory map: mapped pages stay
    resident (and count in the RSS) until the map closes, so a pass over a 5 GB shard would peak
    at 5 GB; read this way the peak is the largest tensor.

    >>> import tempfile, os, safetensors.torch
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> safetensors.torch.save_file({"w": torch.ones(2, 3)}, p, metadata={"format": "pt"})
    >>> with SafetensorsSource(p) as src:
    ...     list(src.tensors), src.metadata, src.get_tensor("w").shape
    (['w'], {'format': 'pt'}, torch.Size([2, 3]))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(self.path))
        self.metadata, self.tensors = read_safetensors_header(self.path)
        for t in self.tensors.values():
            if t.dtype not in DTYPES:
                raise UsageError(f"{where(self.path, t.name)}: unsupported dtype {t.dtype}")
        try:
            with safe_open(str(self.path), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (a plain Exception)
            raise FormatError(f"{self.path}: not a valid safetensors file ({e})") from None
        self._fh: Any = open(self.path, "rb", buffering=0)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def get_tensor(self, name: str) -> torch.Tensor:
        """Return a new tensor holding the bytes of ``name`` (it owns its memory)."""
        if self._fh is None:
            raise UsageError(f"{self.path}: file is closed")
        try:
            info = self.tensors[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}") from None
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        buf = np.empty(info.nbytes, np.uint8)
        view, done = memoryview(buf), 0
        self._fh.seek(info.start)
        while done < info.nbytes:
            n = self._fh.readinto(view[done:])
            if not n:
                raise FormatError(f"{where(self.path, name)}: file is truncated (changed while open?)")
            done += n
        return torch.from_numpy(buf).view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors are declared up front and filled in order.

    ``specs`` maps name -> (dtype name, shape). The header is written at once; then call
    `write` with each tensor's bytes (in `order`, possibly in several pieces). On clean exit the
    file is flushed, synced and renamed into place; on error the temporary file is removed.

    >>> import tempfile, os, safetensors.torch
    >>> p = os.path.join(tempfile.mkdtemp(), "s.safetensors")
    >>> with SafetensorsStreamWriter(p, {"w": ("F32", (2,))}, metadata={"format": "pt"}) as w:
    ...     w.write("w", np.array([1.0, 2.0], np.float32))
    >>> safetensors.torch.load_file(p)["w"]
    tensor([1., 2.])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: dict[str, tuple[str, tuple[int, ...] | list[int]]],
        metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path}: output exists (pass force=True / --force to replace it)")
        dtypes = {n: d for n, (d, _) in specs.items()}
        for n, d in dtypes.items():
            if d not in DTYPES:
                raise UsageError(f"{where(self.path, n)}: unsupported dtype {d}")
        self.order = safetensors_order(dtypes)
        header: dict[str, Any] = {}
        if metadata is not None:
            header["__metadata__"] = dict(sorted(metadata.items()))
        self._sizes: dict[str, int] = {}
        offset = 0
        for n in self.order:
            d, shape = specs[n]
            nbytes = math.prod(shape) * itemsize(d)
            header[n] = {"dtype": d, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes[n] = nbytes
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_size = offset
        self._out = AtomicFile(self.path)
        self._f = self._out.file
        self._next = 0  # index into order
        self._left = self._sizes[self.order[0]] if self.order else 0
        self._done = False
        try:
            self._f.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def _skip_empty(self) -> None:
        while self._next < len(self.order) and self._left == 0:
            self._next += 1
            self._left = self._sizes[self.order[self._next]] if self._next < len(self.order) else 0

    def expected(self) -> str | None:
        """The tensor whose bytes come next (None when all are written)."""
        self._skip_empty()
        return self.order[self._next] if self._next < len(self.order) else None

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes of tensor ``name`` (little-endian, C order); tensors must come in `order`."""
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if len(buf) == 0:
            return
        want = self.expected()
        if name != want:
            raise UsageError(f"{where(self.path, name)}: bytes written out of order (expected {want!r})")
        if len(buf) > self._left:
            raise UsageError(f"{where(self.path, name)}: {len(buf)} bytes is more than the {self._left} left")
        self._f.write(buf)
        self._left -= len(buf)

    def close(self) -> None:
        if self._done:
            return
        try:
            missing = self.expected()
            if missing is not None:
                raise UsageError(f"{where(self.path, missing)}: closed before all tensor bytes were written")
        except BaseException:
            self.abort()
            raise
        self._out.commit()
        self._done = True

    def abort(self) -> None:
        self._done = True
        self._out.abort()

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if t is None:
            self.close()
        else:
            self.abort()


def format_size(n: int | float) -> str:
    """Return a byte count in decimal units, as `parse_size` reads them.

    >>> format_size(999), format_size(1_234_567), format_size(5e9)
    ('999 B', '1.23 MB', '5.00 GB')
    """
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.2f} {unit}"
    return f"{int(n)} B"
