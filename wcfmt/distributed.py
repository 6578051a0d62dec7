"""Sharded loading on torch.distributed: a DCP `StorageReader` over .wclust row chunks (spec §4.6).

`torch.distributed.checkpoint` (DCP) loads a state dict of plain tensors or DTensors of any
placement by asking its storage reader for *checkpoint chunks*: boxes of a tensor, each stored
in one place. A .wclust tensor already is such a list: its row chunks (spec §4.6) are the unit
of random access, so `WclustReader` describes every row chunk as one DCP chunk (offsets
``(row_start, 0, ...)``, sizes ``(rows_in_chunk, *shape[1:])``) and DCP's resharding decides which
of them each rank reads. A rank decodes only the row chunks that overlap its shards: an FSDP2
``Shard(0)`` rank its rows' chunks (plus the chunks it shares with its neighbours at its two
ends), a ``Shard(1)`` rank every chunk, keeping its columns, a ``Replicate`` rank every chunk.

>>> import os, tempfile, torch, wcfmt
>>> import torch.distributed.checkpoint as dcp
>>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
>>> wcfmt.save_file({"w": torch.arange(12.0).reshape(6, 2)}, p)
>>> state = {"w": torch.zeros(6, 2)}
>>> with WclustReader(p) as reader:
...     dcp.load(state, storage_reader=reader, no_dist=True)
>>> torch.equal(state["w"], wcfmt.load_file(p)["w"])
True

Clustered chunks are rebuilt by the canonical decoder (`wcfmt.reader.WclustReader.decode_chunk`)
to the tensor's dtype, bit-equal to what `wcfmt.load_file` returns; DCP copies them into the
state dict's tensors (``copy_``, so a state dict in another dtype receives a cast).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .codecs.bitpack import packed_size
from .constants import INDEX_NAME, SUFFIX
from .dtypes import from_numpy, itemsize, torch_dtype
from .errors import FormatError, UsageError, where
from .io.folder import check_weight_map, find_wclust_shards
from .io.sources import PREFIX as HUB_PREFIX
from .io.sources import resolve_source
from .reader import WclustReader as FileReader
from .schema import ClusteredEntry, LosslessEntry, chunk_row_ranges, rows_and_row_size

__all__ = ["WclustReader", "ChunkRef", "DecodeStats"]


@dataclass(frozen=True)
class ChunkRef:
    """Where one DCP chunk lives (``Metadata.storage_data`` values): a .wclust file (its name in
    the folder), the tensor that stores the data (an alias's target) and the row chunk's index."""

    file: str
    tensor: str
    chunk: int


@dataclass
class DecodeStats:
    """What a reader decoded since its last `WclustReader.reset` (all `read_data` calls together).

    ``chunks``: every row chunk decoded, in order (a chunk appears once per `read_data` call that
    needs it, however many state-dict entries or shards it feeds). ``label_bytes``: the decoded
    label planes of clustered chunks, ``ceil(n·w/8)`` bytes each (spec §5.3). ``stored_bytes``: the
    blobs read from the files (labels, tables, planes, as stored). ``dense_bytes``: the values
    produced, in the tensors' dtypes.
    """

    chunks: list[ChunkRef] = field(default_factory=list)
    label_bytes: int = 0
    stored_bytes: int = 0
    dense_bytes: int = 0


class WclustReader(StorageReader):
    """A `torch.distributed.checkpoint.StorageReader` over a .wclust file or a packed folder.

    ``path``: a ``.wclust`` file, a packed folder (``model.wclust.index.json`` and its shards, or
    every ``*.wclust`` in it), or a Hub repository (``hf://org/name[@rev]`` or a bare ``org/name``,
    `wcfmt.io.sources`; only its ``.wclust`` files and index are downloaded, into the Hub cache;
    ``revision`` and ``token`` as `wcfmt.load_state_dict`). Opening reads and checks every
    file's header (not its data), so a missing or broken file fails here with a `wcfmt` error;
    blobs are checked when a rank decodes them (`ChecksumError` and `FormatError` name the file,
    the tensor and the chunk). ``max_bytes`` caps each chunk's decoded bytes (spec §9.1; None:
    trusted files) and ``use_mmap`` is `wcfmt.reader.WclustReader`'s.

    Each rank makes its own reader. Every tensor of the files is in the metadata, an alias under
    its own name with its target's chunks (loading both names decodes each chunk once); tensors
    stored with a codec this version lacks are left out. A state-dict key the files do not hold
    fails DCP's planning (``Missing key in checkpoint state_dict: NAME``) unless the planner is
    ``DefaultLoadPlanner(allow_partial_load=True)``. A tied LM head is often not stored at all
    (``save_pretrained`` leaves it out, so the packed folder has no alias for it): leave its key
    out of the dict DCP loads; it shares the embedding's storage and is filled with it.

    `stats` counts what this reader decoded (`DecodeStats`); `reset` clears it. Close the reader
    (or use it as a context manager) to release the files' mappings.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        max_bytes: int | str | None = None,
        use_mmap: bool = True,
    ) -> None:
        super().__init__()
        self._revision = revision
        self._token = token
        self._max_bytes = max_bytes
        self._use_mmap = use_mmap
        self._files: dict[str, FileReader] = {}
        self.stats = DecodeStats()
        self.load_id = uuid.uuid4().hex
        self._storage_data: dict[MetadataIndex, ChunkRef] = {}
        self._open(path)

    # -- opening ------------------------------------------------------------------------------
    def _open(self, source: str | os.PathLike[str]) -> None:
        self.close()
        self.source = source
        local = resolve_source(source, revision=self._revision, token=self._token,
                               allow_patterns=[f"*{SUFFIX}", INDEX_NAME])  # fmt: skip
        shards = find_wclust_shards(local) if local.is_dir() else None
        paths = shards.paths if shards is not None else [local]
        #: the local file or folder the chunks are read from (a Hub source's cached snapshot)
        self.path: Path = local
        try:
            for p in paths:
                self._files[p.name] = FileReader(p, use_mmap=self._use_mmap, max_bytes=self._max_bytes)
            self._metadata, holders = self._build_metadata()
            if shards is not None:
                check_weight_map(shards, holders)
        except BaseException:
            self.close()
            raise
        self._storage_data = self._metadata.storage_data

    def _build_metadata(self) -> tuple[Metadata, dict[str, str]]:
        """The DCP metadata of every tensor, and the file that holds each."""
        state: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, ChunkRef] = {}
        holders: dict[str, str] = {}
        for fname, reader in self._files.items():
            for name in reader.header.tensors:
                if name in holders:
                    raise FormatError(f"{reader.path}: tensor {name!r} is also in {holders[name]}")
                holders[name] = fname
                target, e = reader.resolve(name)
                shape = list(e.shape)
                rows, row_size = rows_and_row_size(shape)
                chunks = []
                # spec §4.6: a tensor with no elements has no chunks; a scalar is one row
                for i, (a, b) in enumerate(chunk_row_ranges(rows, e.chunk_rows) if rows * row_size else []):
                    offsets = torch.Size([a] + [0] * (len(shape) - 1)) if shape else torch.Size([])
                    sizes = torch.Size([b - a] + shape[1:]) if shape else torch.Size([])
                    chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                    storage[MetadataIndex(name, offsets, i)] = ChunkRef(fname, target, i)
                state[name] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=torch_dtype(e.dtype)), size=torch.Size(shape), chunks=chunks
                )
        metadata = Metadata(
            state_dict_metadata=state,  # type: ignore[arg-type]
            planner_data={name: (name,) for name in state},  # flat names, as flatten_state_dict maps them
            storage_data=storage,
        )
        return metadata, holders

    def close(self) -> None:
        """Release the files (their mappings close once no decoded view refers to them)."""
        files, self._files = self._files, {}
        for reader in files.values():
            reader.close()

    def __enter__(self) -> "WclustReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- StorageReader --------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load: clear `stats`; a ``checkpoint_id`` other than the current source
        opens that source instead (DCP passes ``dcp.load(..., checkpoint_id=...)`` here)."""
        self.stats = DecodeStats()
        self.load_id = uuid.uuid4().hex
        if checkpoint_id and str(checkpoint_id) != str(self.source):
            self._open(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor as a `TensorStorageMetadata` with one chunk per row chunk (built at opening)."""
        if not self._files:
            raise UsageError(f"{self.source}: reader is closed")
        md = self._metadata
        return Metadata(
            state_dict_metadata=md.state_dict_metadata,
            planner_data=md.planner_data,
            storage_data=md.storage_data,
            storage_meta=StorageMeta(checkpoint_id=str(self.source), load_id=self.load_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise UsageError(f"{self.source}: the metadata's storage_data is not a WclustReader's")
        self._storage_data = metadata.storage_data
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Decode each row chunk the plan reads once, and copy its boxes into the planner's tensors."""
        by_chunk: dict[ChunkRef, list[ReadItem]] = {}
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise UsageError(f"{self.source}: {item.storage_index.fqn!r}: only tensors are stored, not bytes")
            ref = self._storage_data.get(item.storage_index)
            if ref is None:
                raise UsageError(f"{self.source}: {item.storage_index.fqn!r}: no chunk at offset "
                                 f"{tuple(item.storage_index.offset or ())}")  # fmt: skip
            by_chunk.setdefault(ref, []).append(item)
        # file order: a rank reads its chunks front to back
        for ref in sorted(by_chunk, key=self._file_position):
            values = self._decode(ref)
            for item in by_chunk[ref]:
                box = values[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))]
                dest = planner.resolve_tensor(item).detach()
                if dest.size() != box.size():
                    raise UsageError(
                        f"{where(self._files[ref.file].path, item.storage_index.fqn, ref.chunk)}: the planner's "
                        f"tensor has size {tuple(dest.size())}, the stored box {tuple(box.size())}"
                    )
                dest.copy_(box)
                planner.commit_tensor(item, dest)
            del values  # a chunk lives only while its boxes are copied
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        """The source this reader was opened on (a path or a Hub reference)."""
        return self.source

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` names something this reader opens: an ``hf://`` reference, a
        .wclust file or a folder that holds .wclust files (looked at, not read)."""
        if isinstance(checkpoint_id, str) and checkpoint_id.startswith(HUB_PREFIX):
            return True
        path = Path(checkpoint_id)
        if path.is_dir():
            return (path / INDEX_NAME).is_file() or any(path.glob(f"*{SUFFIX}"))
        return path.is_file() and path.name.endswith(SUFFIX)

    # -- decoding -------------------------------------------------------------------------------
    def _file_position(self, ref: ChunkRef) -> tuple[str, int]:
        _, e = self._files[ref.file].resolve(ref.tensor)
        c = e.chunks[ref.chunk]
        blobs = [c.centroids, c.labels] if isinstance(e, ClusteredEntry) else c.planes  # type: ignore[union-attr]
        return ref.file, min(blob.offset for blob in blobs)

    def _decode(self, ref: ChunkRef) -> torch.Tensor:
        reader = self._files[ref.file]
        _, e = reader.resolve(ref.tensor)
        rows, row_size = rows_and_row_size(e.shape)
        a, b = chunk_row_ranges(rows, e.chunk_rows)[ref.chunk]
        reader.check_sizes(ref.tensor, [ref.chunk])  # the blobs can hold the chunk, before allocating
        flat = reader.decode_chunk(ref.tensor, ref.chunk)
        shape = [b - a, *e.shape[1:]] if e.shape else []
        count = (b - a) * row_size
        self.stats.chunks.append(ref)
        self.stats.dense_bytes += count * itemsize(e.dtype)
        if isinstance(e, ClusteredEntry):
            c = e.chunks[ref.chunk]
            self.stats.label_bytes += packed_size(count, c.label_bits)
            self.stats.stored_bytes += c.labels.length + c.centroids.length
        elif isinstance(e, LosslessEntry):
            self.stats.stored_bytes += sum(p.length for p in e.chunks[ref.chunk].planes)
        return from_numpy(flat, e.dtype).reshape(shape)
