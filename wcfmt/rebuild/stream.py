"""Loading many tensors at once: a pipeline from a `WclustReader` to dense torch tensors (spec §5.5, §6).

`load_tensors` splits every requested tensor into *pieces* (consecutive row chunks of one
tensor) and runs them through two stages:

1. **Host, in a thread pool**: verify the CRC and entropy-decode the label plane (the CRC,
   python-zstandard and numpy all release the GIL, so the pool uses every core), convert the
   few centroids to the output dtype (`reference.centroids_as`).
2. **Rebuild**: on the CPU (backend ``"numpy"``) the worker itself gathers straight into the
   preallocated output with `fast.rebuild_chunk_fast`, one chunk per piece, so a chunk is
   CRC-checked, decoded into the worker's reusable buffer (`entropy.Scratch`), checked and
   gathered while it is still in cache, and nothing is allocated per chunk. Lossless chunks
   decode their planes into the scratch buffers and merge them straight into the output.
   Centroid tables and their lookup tables are built once per distinct table of a tensor
   (pack's default repeats one table in every chunk of a matrix). CPU outputs are plain
   `torch.empty` pages, as safetensors' are: advising them into transparent huge pages
   (``madvise(MADV_HUGEPAGE)``) was measured both ways on the 2-core test VM, 0.28 s instead of
   0.54 s to fault in 1.2 GB on one day and 1.1-2.7 s instead of 0.44-0.51 s on
   another (no compaction stalls: the huge page faults themselves were slow), which made the
   whole load 2x slower; a loader should not bet on the host's memory. On a device
   (``"triton"`` or ``"torch"``), the worker packs the piece's labels (1 byte or less per
   weight), tables and chunk metadata into a pinned staging slot; the main thread copies the
   slot to the device with one ``non_blocking`` copy on the slot's CUDA stream and launches the
   rebuild for all the piece's chunks on the same stream, so the copy of one piece overlaps
   the kernel of another and the host decodes ahead.

Host memory in flight is bounded: at most ``depth`` pieces are decoded and not yet rebuilt
(``2 * threads`` on the CPU; on a device, ``threads + 2`` staging slots of at most
`_PIECE_BYTES` each, reused only after their copy and kernel have finished).

Lossless tensors go through the same stages, chunk by chunk, with ``reader.decode_chunk`` (the
canonical decoder) on the host and a plain copy instead of a rebuild; with ``dtype`` each chunk
is converted as it is written (on the CPU from the worker's decoded chunk, on a device after
the copy), so no tensor is ever whole in two dtypes. Aliases come back as the same tensor object
as their target.

Requirements on ``reader`` (a `wcfmt.reader.WclustReader` meets them): ``header.tensors``
(name -> `ClusteredEntry` / `LosslessEntry` / `AliasEntry`), ``read_labels(name, i, scratch=)``
returning a packed plane *already checked* (every label < K, padding bits zero: the gather
relies on it), ``read_centroids(name, i)`` (fp16), ``decode_chunk(name, i, out=, scratch=)``
(flat values in storage form; the CPU path passes ``out`` and ``scratch``), and
optionally ``entry(name)`` (used to raise the reader's own error for unknown names or codecs)
and ``check_sizes(name, chunks)`` (called for every tensor before its output is allocated, so
a header whose blobs cannot fill the shape it claims fails before a huge allocation).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..ordered_pool import bounded_map
from ..codecs.bitpack import packed_size
from ..codecs.entropy import Scratch
from ..dtypes import from_numpy, itemsize, to_numpy, torch_dtype
from ..errors import UsageError
from ..schema import AliasEntry, ClusteredEntry, LosslessEntry, chunk_row_ranges, rows_and_row_size
from .backend import ChunkSpec, default_backend
from .fast import GatherTable, gather_table, rebuild_chunk_fast
from .reference import centroids_as

__all__ = ["load_tensors"]

#: Device path: a piece gathers consecutive chunks up to this many staged bytes, so one launch
#: and one copy cover several small chunks; a chunk larger than this is a piece of its own.
_PIECE_BYTES = 16 << 20

_ALIGN = 16  # staging layout: tables and metadata start on this boundary

#: Distinct (converted, tabulated) centroid tables a CPU worker keeps: a K=256 pair table is
#: 256 KiB, so this bounds the cache to 2 MiB per thread.
_TABLES_CACHED = 8


def load_tensors(
    reader: Any,
    names: Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    backend: str | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the named tensors (all, in header order, if ``names`` is None) dense on ``device``.

    Values are bit-identical to ``reader.decode(name)``. ``dtype``, if given, converts
    floating-point tensors as ``tensor.to(dtype)`` would (clustered tensors convert their small
    tables instead, which gives the same bits); integer and bool tensors keep their dtype.
    ``threads`` (default: the CPUs this process may use) sizes the host decode pool; ``backend``
    (default `backend.default_backend(device)`, overridable with ``$WCFMT_BACKEND``) is
    ``"numpy"`` (CPU only), ``"torch"`` or ``"triton"``.

    ``into`` maps names to existing tensors (a model's parameters) that receive the values in
    place, when one can: same shape, contiguous, on ``device``, with the stored dtype (integer
    and bool tensors) or any floating dtype (floating tensors: clustered ones rebuilt from
    converted tables, lossless ones converted chunk by chunk), on the numpy backend. The
    tensor returned for such a name is that tensor; for the others a new one, as without
    ``into``. No fresh memory is touched for them, so no page faults: what `wcfmt.load_model`
    uses.

    >>> import tempfile, os, wcfmt
    >>> from wcfmt.reader import WclustReader
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> wcfmt.save_file({"a": torch.arange(6.0).reshape(2, 3)}, p)
    >>> with WclustReader(p) as r:
    ...     load_tensors(r, dtype=torch.float16)["a"]
    tensor([[0., 1., 2.],
            [3., 4., 5.]], dtype=torch.float16)
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    nthreads = threads if threads is not None else _cpu_count()
    if nthreads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    chosen = backend if backend is not None else default_backend(dev)
    if chosen not in ("numpy", "torch", "triton"):
        raise UsageError(f"backend must be 'numpy', 'torch' or 'triton', got {chosen!r}")
    if chosen == "numpy" and dev.type != "cpu":
        raise UsageError(f"backend 'numpy' rebuilds on the CPU only, not on {dev}")

    tensors = reader.header.tensors
    wanted = list(tensors) if names is None else list(dict.fromkeys(names))
    if names is None:
        for name in getattr(reader.header, "unsupported", {}):
            _entry(reader, name)  # the reader raises its VersionError naming the codec
    for name in wanted:
        if name not in tensors:
            _entry(reader, name)  # the reader's own error (TensorNotFoundError, VersionError)
            raise KeyError(name)
    targets = list(dict.fromkeys(tensors[n].target if isinstance(tensors[n], AliasEntry) else n for n in wanted))

    check_sizes = getattr(reader, "check_sizes", None)
    if check_sizes is not None:  # spec §9.1: blobs must declare the sizes the header implies
        for n in targets:  # before anything is allocated for them
            check_sizes(n, range(len(getattr(tensors[n], "chunks", []))))
    dests = {} if into is None or chosen != "numpy" else into
    outs: dict[str, _Output] = {n: _Output.make(n, tensors[n], dev, dtype, dests.get(n)) for n in targets}
    if chosen == "numpy":
        _run_cpu(reader, outs, nthreads)
    else:
        _run_device(reader, outs, dev, nthreads, chosen)

    done = {n: o.finish() for n, o in outs.items()}
    return {n: done[tensors[n].target if isinstance(tensors[n], AliasEntry) else n] for n in wanted}


# -- planning ---------------------------------------------------------------------------------
@dataclass
class _Output:
    """One tensor being filled: its entry, its flat destination and its chunks' element ranges."""

    name: str
    entry: ClusteredEntry | LosslessEntry
    tensor: torch.Tensor  # flat, in the final dtype (no second, stored-dtype copy of the tensor)
    ranges: list[tuple[int, int]]  # element [start, stop) of each chunk
    value_dtype: torch.dtype  # the dtype values are written in
    in_place: bool = False  # ``tensor`` is a caller's tensor (`load_tensors(into=)`), kept as it is

    @property
    def cast(self) -> bool:
        """A lossless tensor written in another dtype than stored: each decoded chunk is
        converted (as ``Tensor.to``) into its slice of the output."""
        return isinstance(self.entry, LosslessEntry) and self.value_dtype != torch_dtype(self.entry.dtype)

    @staticmethod
    def make(
        name: str, e: Any, dev: torch.device, dtype: torch.dtype | None, dest: torch.Tensor | None = None
    ) -> "_Output":
        """``dest``: an existing tensor to fill in place, used when it fits (see `load_tensors`)."""
        if not isinstance(e, (ClusteredEntry, LosslessEntry)):
            raise UsageError(f"tensor {name!r}: codec {getattr(e, 'codec', '?')!r} cannot be loaded")
        rows, row_size = rows_and_row_size(e.shape)
        stored = torch_dtype(e.dtype)
        value = stored
        if dtype is not None and stored.is_floating_point:
            value = dtype  # clustered: converted tables; lossless: each chunk converted as it lands
        rows_per = [] if rows * row_size == 0 else chunk_row_ranges(rows, e.chunk_rows)
        ranges = [(a * row_size, b * row_size) for a, b in rows_per]
        if dest is not None and _fits(dest, e, dev, stored, dtype):
            return _Output(name, e, dest.detach().view(-1), ranges, dest.dtype, in_place=True)
        flat = torch.empty(rows * row_size, dtype=value, device=dev)
        return _Output(name, e, flat, ranges, value)

    def finish(self) -> torch.Tensor:
        return self.tensor.view(self.entry.shape)  # already in its final dtype: no cast, no copy

    def table(self, reader: Any, chunk: int) -> np.ndarray:
        """The chunk's centroids in the storage form of the dtype values are written in."""
        return self._converted(reader.read_centroids(self.name, chunk))

    def _converted(self, f16: np.ndarray) -> np.ndarray:
        e = self.entry
        base = centroids_as(f16, e.dtype)
        if self.value_dtype == torch_dtype(e.dtype):
            return base
        return to_numpy(from_numpy(base, e.dtype).to(self.value_dtype))

    def lookup(
        self, reader: Any, chunk: int, cache: dict[Any, tuple[np.ndarray, GatherTable | None]]
    ) -> tuple[np.ndarray, GatherTable | None]:
        """The chunk's converted table and its gather table, built once per distinct table
        (the fp16 table is read and checked every time; converting and tabulating it is not
        repeated). ``cache`` belongs to one worker thread."""
        f16 = reader.read_centroids(self.name, chunk)
        bits = self.entry.chunks[chunk].label_bits
        a, b = self.ranges[chunk]
        key = (self.name, f16.tobytes(), bits, b - a)
        hit = cache.get(key)
        if hit is None:
            table = self._converted(f16)
            lut = gather_table(table, bits, b - a) if bits else None
            if len(cache) >= _TABLES_CACHED:  # bounded: files with a table per chunk repeat none
                del cache[next(iter(cache))]
            hit = cache[key] = (table, lut)
        return hit


def _fits(
    dest: torch.Tensor, e: ClusteredEntry | LosslessEntry, dev: torch.device, stored: torch.dtype,
    dtype: torch.dtype | None,
) -> bool:
    """Whether values of entry ``e`` (converted to ``dtype``, if given) can be written straight
    into ``dest``."""
    if not isinstance(dest, torch.Tensor) or dest.device != dev:
        return False
    if dtype is not None and stored.is_floating_point and dest.dtype != dtype:
        return False
    if tuple(dest.shape) != tuple(e.shape) or not dest.is_contiguous():
        return False
    if stored.is_floating_point:  # converted on the way in (tables, or each lossless chunk)
        return dest.dtype.is_floating_point
    return dest.dtype == stored


@dataclass
class _Piece:
    out: _Output
    chunks: list[int]

    @property
    def clustered(self) -> bool:
        return isinstance(self.out.entry, ClusteredEntry)

    @property
    def start(self) -> int:
        return self.out.ranges[self.chunks[0]][0]

    @property
    def stop(self) -> int:
        return self.out.ranges[self.chunks[-1]][1]


def _staged_bytes(out: _Output, chunk: int) -> int:
    """Bytes one chunk occupies in a staging slot (labels + table + metadata, or values)."""
    a, b = out.ranges[chunk]
    e = out.entry
    if isinstance(e, ClusteredEntry):
        c = e.chunks[chunk]
        width = out.tensor.element_size()
        return packed_size(b - a, c.label_bits) + c.k * width + 5 * 8 + 2 * _ALIGN
    return (b - a) * itemsize(e.dtype)  # staged as stored; a cast happens on the device


def _pieces(outs: Iterable[_Output], budget: int) -> list[_Piece]:
    """Consecutive chunks of one tensor, grouped while their staged size stays within ``budget``."""
    pieces: list[_Piece] = []
    for out in outs:
        cur: list[int] = []
        size = 0
        for i in range(len(out.ranges)):
            n = _staged_bytes(out, i)
            if cur and size + n > budget:
                pieces.append(_Piece(out, cur))
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            pieces.append(_Piece(out, cur))
    return pieces


# -- the CPU path -----------------------------------------------------------------------------
def _run_cpu(reader: Any, outs: dict[str, _Output], threads: int) -> None:
    pieces = _pieces(outs.values(), budget=0)  # one chunk per piece: finest load balance

    local = threading.local()  # one scratch buffer set and table cache per worker thread
    flats = {n: to_numpy(o.tensor) for n, o in outs.items()}

    def job(p: _Piece) -> Callable[[], None]:
        def run() -> None:
            out, i = p.out, p.chunks[0]
            a, b = out.ranges[i]
            dst = flats[out.name][a:b]
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = Scratch()
                local.tables = {}
            if p.clustered:
                table, lut = out.lookup(reader, i, local.tables)
                packed = reader.read_labels(out.name, i, scratch=scratch)
                # read_labels checked every label < K: the pair tables may skip the check.
                bits = out.entry.chunks[i].label_bits
                rebuild_chunk_fast(packed, bits, b - a, table, out=dst, checked=True, lut=lut)
            elif out.cast:  # one chunk in the stored dtype at a time, never the whole tensor
                values = reader.decode_chunk(out.name, i, scratch=scratch)
                out.tensor[a:b].copy_(from_numpy(values, out.entry.dtype))
            else:
                reader.decode_chunk(out.name, i, out=dst, scratch=scratch)

        return run

    jobs = [job(p) for p in pieces]
    if threads == 1 or len(jobs) <= 1:
        for j in jobs:
            j()
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="wcfmt-load") as pool:
        for _ in bounded_map(pool, jobs, 2 * threads):
            pass


# -- the device path --------------------------------------------------------------------------
@dataclass
class _Staged:
    """What a worker left in a staging slot: byte ranges of labels / tables / metadata."""

    used: int
    specs: list[ChunkSpec]
    tables_at: int = 0
    meta_at: int = 0


class _Slot:
    """A host staging buffer (pinned on CUDA), its device twin, and the stream that uses both."""

    def __init__(self, size: int, dev: torch.device) -> None:
        cuda = dev.type == "cuda"
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
        self.device_buf = torch.empty(size, dtype=torch.uint8, device=dev)
        self.stream = torch.cuda.Stream(dev) if cuda else None
        self.event: Any = None

    def wait_free(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def context(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _stage(reader: Any, p: _Piece, host: np.ndarray) -> _Staged:
    """Worker: decode piece ``p`` into the staging buffer ``host`` (uint8)."""
    out = p.out
    if not p.clustered:
        pos = 0
        for i in p.chunks:
            values = np.ascontiguousarray(reader.decode_chunk(out.name, i)).view(np.uint8).reshape(-1)
            host[pos : pos + values.size] = values
            pos += values.size
        return _Staged(pos, [])
    planes = []
    tables = []
    specs = []
    lab = tab = 0
    for i in p.chunks:
        a, b = out.ranges[i]
        packed = reader.read_labels(out.name, i)  # checked: every label < K
        table = out.table(reader, i)
        bits = out.entry.chunks[i].label_bits
        specs.append(ChunkSpec(lab, a, b - a, bits, tab))
        planes.append(packed)
        tables.append(table)
        lab += packed.size
        tab += table.size
    pos = 0
    for plane in planes:
        host[pos : pos + plane.size] = plane
        pos += plane.size
    tables_at = _align(pos)
    tv = np.concatenate(tables).view(np.uint8)
    host[tables_at : tables_at + tv.size] = tv
    meta_at = _align(tables_at + tv.size)
    mv = np.asarray([list(s) for s in specs], dtype="<i8").view(np.uint8).reshape(-1)
    host[meta_at : meta_at + mv.size] = mv
    return _Staged(meta_at + mv.size, specs, tables_at, meta_at)


def _run_device(reader: Any, outs: dict[str, _Output], dev: torch.device, threads: int, backend: str) -> None:
    if backend == "triton":
        from .triton_kernel import rebuild_chunks_triton as rebuild
    else:
        from .torch_gather import rebuild_chunks_torch as rebuild_torch

        def rebuild(packed, tables, chunks, out, *, meta=None):  # type: ignore[no-untyped-def]
            return rebuild_torch(packed, tables, chunks, out)

    pieces = _pieces(outs.values(), budget=_PIECE_BYTES)
    if not pieces:
        return
    size = max(sum(_staged_bytes(p.out, i) for i in p.chunks) for p in pieces)
    depth = min(len(pieces), threads + 2)
    slots = [_Slot(size, dev) for _ in range(depth)]
    hosts = [s.host.numpy() for s in slots]
    if dev.type == "cuda":
        main = torch.cuda.current_stream(dev)
        for s in slots:
            s.stream.wait_stream(main)  # the outputs were allocated on the main stream

    def launch(p: _Piece, slot: _Slot, st: _Staged) -> None:
        out = p.out
        with slot.context():
            if not p.clustered and out.cast:  # stored values cross as they are, converted on the device
                buf = slot.device_buf[: st.used]
                buf.copy_(slot.host[: st.used], non_blocking=True)
                out.tensor[p.start : p.stop].copy_(buf.view(torch_dtype(out.entry.dtype)))
            elif not p.clustered:
                width = out.tensor.element_size()
                dst = out.tensor.view(torch.uint8)[p.start * width : p.stop * width]
                dst.copy_(slot.host[: st.used], non_blocking=True)
            else:
                buf = slot.device_buf[: st.used]
                buf.copy_(slot.host[: st.used], non_blocking=True)
                width = out.tensor.element_size()
                n_tab = sum(out.entry.chunks[i].k for i in p.chunks)
                tables = buf[st.tables_at : st.tables_at + n_tab * width].view(_int_of(width))
                meta = buf[st.meta_at : st.meta_at + 40 * len(st.specs)].view(torch.int64).reshape(-1, 5)
                rebuild(buf[: st.tables_at], tables, st.specs, out.tensor, meta=meta)
            if slot.stream is not None:
                out.tensor.record_stream(slot.stream)
                # a blocking event: waiting on it sleeps instead of spinning, the decode threads need the CPU
                slot.event = torch.cuda.Event(blocking=True)
                slot.event.record(slot.stream)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="wcfmt-load")
    futures: dict[int, Future[_Staged]] = {}
    try:
        submitted = 0
        for j, p in enumerate(pieces):
            while submitted < len(pieces) and submitted < j + depth:
                k = submitted % depth
                slots[k].wait_free()  # piece submitted - depth was launched; its copy and kernel must end
                futures[submitted] = pool.submit(_stage, reader, pieces[submitted], hosts[k])
                submitted += 1
            launch(p, slots[j % depth], futures.pop(j).result())
    finally:
        for f in futures.values():
            f.cancel()
        pool.shutdown(wait=True)
        if dev.type == "cuda":
            for s in slots:
                main.wait_stream(s.stream)


def _int_of(width: int) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]


def _entry(reader: Any, name: str) -> Any:
    entry = getattr(reader, "entry", None)
    if entry is not None:
        return entry(name)
    return reader.header.tensors[name]


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

