"""The pack pipeline's input: a ``.safetensors`` file or a Hugging Face folder (local or Hub).

`open_source` resolves a Hub id to its cached snapshot and checks that the source exists;
`Source.read_headers` reads and checks every shard's header (dtypes the format can store, the
index against the files' contents) before anything is written. Only headers are read here:
tensor data is read by the stages that need it, one tensor at a time.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import DTYPES
from ..errors import FormatError, UsageError, where
from ..io.folder import Shards, check_weight_map, find_safetensors_shards, other_files
from ..io.safetensors_io import SAFETENSORS_SUFFIX, TensorInfo, read_safetensors_header

__all__ = ["Source", "open_source", "check_exists", "checked_header"]


@dataclass
class Source:
    """What is packed: ``path`` (a file or folder on this machine) and, once `read_headers` ran,
    its shards' checked headers in order."""

    path: Path
    #: The Hub repository id when the source came from the Hub (the card's default base_model).
    hub_id: str | None = None
    files: list[tuple[Path, dict[str, TensorInfo]]] = field(default_factory=list)
    shards: Shards | None = None
    #: tensor -> source shard file name (folders)
    weight_map: dict[str, str] = field(default_factory=dict)
    #: top-level .safetensors files of the folder that its index does not list (not packed)
    skipped: list[str] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def file_bytes(self) -> int:
        """Bytes of the .safetensors files (every one of a folder): what the pack reads."""
        if self.is_dir:
            return sum(p.stat().st_size for p in self.path.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
        return self.path.stat().st_size if self.path.is_file() else 0

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every tensor's data in the packed shards (`read_headers` first)."""
        return sum(t.nbytes for _, h in self.files for t in h.values())

    def other_files(self) -> list[str]:
        """The folder's files that are copied as they are (config, tokenizer, ...)."""
        return other_files(self.path, (SAFETENSORS_SUFFIX, f"{SAFETENSORS_SUFFIX}.index.json"))

    def read_headers(self) -> None:
        """Read and check every shard's header (fails before anything is written)."""
        if self.is_dir:
            self.shards = find_safetensors_shards(self.path)
            self.files = [(p, checked_header(p)) for p in self.shards.paths]
            self.weight_map = _check_source_index(self.shards, [h for _, h in self.files])
            in_folder = {p.name for p in self.path.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file()}
            self.skipped = sorted(in_folder - set(self.shards.files))
        else:
            self.files = [(self.path, checked_header(self.path))]


def open_source(src: str | Path, token: str | bool | None = None) -> Source:
    """The source as a local path (a Hub repository, ``hf://org/name[@rev]`` or ``org/name``,
    downloaded to the cache first); FileNotFoundError when it does not exist."""
    from ..io.sources import HubSource, parse_source, resolve_source

    hub = parse_source(src) if isinstance(src, str) else None
    path = resolve_source(src, token=token)
    check_exists(path)
    return Source(path, hub.repo_id if isinstance(hub, HubSource) else None)


def check_exists(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or folder", str(src))


def checked_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, refusing dtypes the format cannot store."""
    tensors = read_safetensors_header(path)[1]
    for t in tensors.values():
        if t.dtype not in DTYPES:
            raise UsageError(f"{where(path, t.name)}: unsupported dtype {t.dtype} (supported: {', '.join(DTYPES)})")
    return tensors


def _check_source_index(shards: Shards, headers: list[dict[str, TensorInfo]]) -> dict[str, str]:
    """Return tensor -> source file, checking the index (if any) against the files' contents."""
    found: dict[str, str] = {}
    for f, h in zip(shards.files, headers, strict=True):
        for name in h:
            if name in found:
                raise FormatError(f"{shards.folder / f}: tensor {name!r} is also in {found[name]}")
            found[name] = f
    check_weight_map(shards, found)
    return found
