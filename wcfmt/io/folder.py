"""Hugging Face model folders: finding shards, index files, copying the other files (spec §8).

A source folder holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; a packed folder holds ``.wclust`` shards listed by
``model.wclust.index.json``. Both indexes have the same shape:
``{"metadata": {"total_size": INT, ...}, "weight_map": {tensor name: shard file name}}``.
Everything else in a folder (config, tokenizer, README, subfolders) travels unchanged.

Folder outputs are built in a temporary folder beside the destination and renamed into place
(`building_folder`), so a failed run never leaves a partial model behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..constants import INDEX_NAME, SUFFIX
from ..atomic import new_file_mode, remove_stale_temps, temp_folder_name, write_text_atomic
from ..errors import FormatError, OutputExistsError, UsageError, first_few
from .safetensors_io import SAFETENSORS_SUFFIX

__all__ = [
    "INDEX_NAME",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "Shards",
    "find_safetensors_shards",
    "find_wclust_shards",
    "read_index",
    "write_index",
    "check_weight_map",
    "other_files",
    "copy_files",
    "building_folder",
    "check_output",
    "load_state_dict",
    "load_model",
    "untied_missing",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

#: Folders never copied: version control and download caches (huggingface_hub's ``.cache``).
_SKIP_DIRS = frozenset({".git", ".cache", "__pycache__"})


class Shards:
    """The model files of a folder: shard file names in order, and the index if there is one."""

    def __init__(self, folder: Path, files: list[str], index: str | None, weight_map: dict[str, str] | None,
                 index_metadata: dict[str, object] | None = None) -> None:
        self.folder = folder
        self.files = files
        self.index = index
        self.weight_map = weight_map
        self.index_metadata = dict(index_metadata or {})

    @property
    def paths(self) -> list[Path]:
        return [self.folder / f for f in self.files]

    def __repr__(self) -> str:
        return f"Shards({self.folder}, files={self.files}, index={self.index})"


def read_index(path: str | os.PathLike[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Read a safetensors-style index; return (metadata, weight_map). Raise `FormatError` if malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: index is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise FormatError(f"{path}: index has no 'weight_map' object")
    wm = data["weight_map"]
    for name, file in wm.items():
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
            raise FormatError(f"{path}: weight_map[{name!r}] = {file!r} is not a file name in this folder")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: index 'metadata' is not an object")
    return meta, dict(wm)


def write_index(path: str | os.PathLike[str], total_size: int, weight_map: dict[str, str],
                extra_metadata: dict[str, object] | None = None) -> None:
    """Write an index the way ``save_pretrained`` does (sorted keys, 2-space indent, final newline)."""
    meta = {k: v for k, v in (extra_metadata or {}).items() if k != "total_size"}
    meta["total_size"] = int(total_size)
    text = json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    write_text_atomic(path, text)


def _shards_from_index(folder: Path, index: str, suffix: str) -> Shards:
    meta, wm = read_index(folder / index)
    files: list[str] = []
    for f in wm.values():
        if f not in files:
            files.append(f)
    files.sort()
    for f in files:
        if not f.endswith(suffix):
            raise FormatError(f"{folder / index}: lists {f!r}, which is not a {suffix} file")
        if not (folder / f).is_file():
            raise FormatError(f"{folder / index}: lists {f!r}, which is not in the folder")
    return Shards(folder, files, index, wm, meta)


def find_safetensors_shards(folder: str | os.PathLike[str]) -> Shards:
    """Return the safetensors model files of a Hugging Face folder.

    With ``model.safetensors.index.json`` (or a single other ``*.safetensors.index.json``), the
    shards it lists; otherwise every top-level ``*.safetensors`` file (usually just
    ``model.safetensors``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    indexes = sorted(p.name for p in folder.glob(f"*{SAFETENSORS_SUFFIX}.index.json") if p.is_file())
    if SAFETENSORS_INDEX in indexes:
        return _shards_from_index(folder, SAFETENSORS_INDEX, SAFETENSORS_SUFFIX)
    if len(indexes) == 1:
        return _shards_from_index(folder, indexes[0], SAFETENSORS_SUFFIX)
    if len(indexes) > 1:
        raise UsageError(f"{folder}: several safetensors indexes ({', '.join(indexes)}); which model is meant?")
    files = sorted(p.name for p in folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
    if not files:
        raise UsageError(f"{folder}: no .safetensors files (and no {SAFETENSORS_INDEX})")
    return Shards(folder, files, None, None)


def find_wclust_shards(folder: str | os.PathLike[str]) -> Shards:
    """Return the .wclust files of a packed folder: those its index lists, else every ``*.wclust``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    if (folder / INDEX_NAME).is_file():
        return _shards_from_index(folder, INDEX_NAME, SUFFIX)
    files = sorted(p.name for p in folder.glob(f"*{SUFFIX}") if p.is_file())
    if not files:
        raise UsageError(f"{folder}: no {SUFFIX} files (and no {INDEX_NAME})")
    return Shards(folder, files, None, None)


def check_weight_map(shards: Shards, found: dict[str, str]) -> None:
    """Raise `FormatError` unless every tensor the index lists is in the shard it names.

    ``found`` maps each tensor to the shard file that actually holds it. Tensors that a shard
    holds but the index does not list are allowed (loaders read whole shards).
    """
    if shards.weight_map is None:
        return
    for name, f in shards.weight_map.items():
        if found.get(name) != f:
            where_ = f"it is in {found[name]}" if name in found else "no shard holds it"
            raise FormatError(f"{shards.folder / str(shards.index)}: lists tensor {name!r} in {f}, but {where_}")


def other_files(folder: str | os.PathLike[str], skip_suffixes: tuple[str, ...]) -> list[str]:
    """Relative paths of every file under ``folder`` that is not model data.

    Top-level files ending in one of ``skip_suffixes`` are the model and are skipped; so are
    temporary files of ours (``.*.tmp``) and ``.git``/``.cache`` folders. Subfolders are walked.
    """
    folder = Path(folder)
    out: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not _is_ours_tmp(d))
        rel_root = Path(root).relative_to(folder)
        for name in sorted(files):
            if rel_root == Path(".") and name.endswith(skip_suffixes):
                continue
            if _is_ours_tmp(name):
                continue
            out.append(str(rel_root / name) if rel_root != Path(".") else name)
    return out


def _is_ours_tmp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".wcfmt-" in name)


def copy_files(src: Path, dst: Path, names: list[str]) -> None:
    """Copy ``names`` (relative paths) from ``src`` to ``dst``, keeping subfolders and times."""
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, target)


def check_output(src: Path, dst: Path, *, force: bool, want_dir: bool) -> None:
    """Refuse outputs that exist (unless ``force``), that are or hold the source, or that change kind."""
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise UsageError(f"{dst}: output is the source")
    if s.is_relative_to(d):
        raise UsageError(f"{dst}: output would replace a folder that holds the source {src}")
    if src.is_dir() and d.is_relative_to(s):
        raise UsageError(f"{dst}: output inside the source folder {src} (the source is never modified)")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise OutputExistsError(f"{dst}: output exists (pass force=True / --force to replace it)")
        if want_dir and not dst.is_dir():
            raise UsageError(f"{dst}: exists and is a file; a folder output will not replace it")
        if not want_dir and dst.is_dir():
            raise UsageError(f"{dst}: exists and is a folder; a file output will not replace it")
    if not dst.parent.is_dir():
        raise UsageError(f"{dst}: folder {dst.parent} does not exist")


@contextlib.contextmanager
def building_folder(dst: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dst``; on success rename it to ``dst``.

    An existing ``dst`` is replaced only with ``force`` (swapped with the new folder in one atomic
    step where Linux's ``renameat2`` allows, else moved aside first; removed once the new folder
    is in place), and only when everything in it is what wcfmt writes: the files
    of the new output, model shards and indexes, the card and the remote-code shim. A folder that
    also holds other files (a user's notes, another tool's output) is refused with
    `OutputExistsError` naming them, so ``--force`` never deletes a file wcfmt did not write. On
    any error the temporary folder is removed and ``dst`` is left as it was.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst}: output exists (pass force=True / --force to replace it)")
    try:
        tmp = _fresh_dir(dst, "")
    except OSError as e:  # read-only or full: name the output, not a random temporary name
        raise type(e)(e.errno, e.strerror, str(dst)) from None
    try:
        yield tmp
        if dst.exists():
            if not force:
                raise OutputExistsError(f"{dst}: output appeared while it was being built")
            foreign = foreign_files(dst, tmp)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise OutputExistsError(
                    f"{dst}: holds files wcfmt did not write ({shown}); --force replaces only wcfmt's own output, "
                    "so move them away or choose another output folder"
                )
            if exchange_paths(tmp, dst):  # one atomic step: dst is the old or the new folder, never missing
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:  # no renameat2 here: two renames, with a moment in which dst does not exist
                old = _fresh_dir(dst, "old-")
                old.rmdir()
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _outside(e, tmp, dst) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` (two folders) in one atomic step with Linux's
    ``renameat2(RENAME_EXCHANGE)``, so a reader sees either the old or the new ``b``, never
    neither. Returns False, having changed nothing, where the system or file system does not
    offer it (other platforms, old kernels or C libraries, some network file systems)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _outside(e: OSError, tmp: Path, dst: Path) -> OSError:
    """The same error naming the output's own path (``dst/model.safetensors``) where it named a
    file in the temporary folder, which is gone by the time anyone reads the message."""

    def moved(name: object) -> object:
        if name is None:
            return None
        p = Path(os.fsdecode(name))  # type: ignore[arg-type]
        return str(dst / p.relative_to(tmp)) if p.is_relative_to(tmp) else name

    a, b = moved(e.filename), moved(e.filename2)
    if (a, b) == (e.filename, e.filename2) or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, a, None, b)


#: Top-level files a wcfmt folder output may hold besides the copied ones (an earlier pack/unpack).
_OURS_SUFFIXES = (SUFFIX, SAFETENSORS_SUFFIX, ".index.json")
_OURS_NAMES = frozenset({"README.md", "modeling_wclust.py"})


def foreign_files(dst: Path, new: Path) -> list[str]:
    """Files under ``dst`` that replacing it by folder ``new`` would delete and that wcfmt did not write.

    Ours: every path the new output also has (it replaces them), and top-level model shards,
    indexes, the card and the shim. Everything else (including ``.git``) is the user's.
    """
    if not dst.is_dir():
        return []
    out = []
    for p in sorted(dst.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(dst)
        if (new / rel).exists() or (new / rel).is_symlink():
            continue
        if len(rel.parts) == 1 and (rel.name.endswith(_OURS_SUFFIXES) or rel.name in _OURS_NAMES):
            continue
        out.append(str(rel))
    return out


def _fresh_dir(dst: Path, tag: str) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would become the output folder's; os.mkdir honours the
    # umask, as save_pretrained's os.makedirs does.
    remove_stale_temps(dst)
    for _ in range(100):
        p = dst.parent / temp_folder_name(dst, tag)
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "cannot create a temporary folder", str(dst.parent))


def load_state_dict(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Load a `.wclust` file or a packed folder as one dense state dict.

    ``path`` may also be a Hub repository, ``hf://org/name[@rev]`` or a bare ``org/name``
    (`wcfmt.io.sources`); only its ``.wclust`` files and index are downloaded.

    A folder's shards come from ``model.wclust.index.json`` (or every ``*.wclust`` in it).
    ``dtype`` casts floating-point tensors only (as ``from_pretrained(torch_dtype=...)``); tied
    tensors (aliases) stay one shared tensor. ``threads``: decode threads (default: every CPU).

    Memory: one copy of the weights. Each tensor is decoded straight into its final storage in
    its final dtype (`wcfmt.rebuild.stream.load_tensors`), and shards are read with positioned
    reads rather than mapped, so file pages do not count in the process's memory on top of the
    weights (mapped, a whole shard did by the end of it). With ``device="cuda"`` the weights
    are rebuilt on the device from bounded pinned staging buffers: no host copy of them.

    >>> import tempfile, os, wcfmt
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> wcfmt.save_file({"w": torch.ones(2), "n": torch.arange(2)}, p)
    >>> sd = load_state_dict(p, dtype="bf16")
    >>> sd["w"].dtype, sd["n"].dtype
    (torch.bfloat16, torch.int64)
    """
    from ..dtypes import torch_dtype_of  # one parser of dtype names for the library and the CLI
    from ..reader import WclustReader
    from ..rebuild.stream import load_tensors

    from .sources import resolve_source

    path = resolve_source(path, revision=revision, token=token, allow_patterns=[f"*{SUFFIX}", INDEX_NAME])
    want = torch_dtype_of(dtype) if dtype is not None else None
    files, shards = _wclust_files(path)
    out: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}
    for p in files:
        # use_mmap=False: pages of a mapped file count in RSS while the map lives, which put a
        # whole shard on top of the weights (1.076x the dense bytes instead of 1.008x, measured
        # with tools/bench_load_peak.py); positioned reads leave them in the page cache only.
        with WclustReader(p, use_mmap=False) as r:
            _record_names(found, p, r.header.tensors)
            out.update(load_tensors(r, device=device, dtype=want, threads=threads))
    if shards is not None:
        check_weight_map(shards, found)
    return out


def _record_names(found: dict[str, str], shard: Path, names: Iterable[str]) -> None:
    """Note which shard holds each name; a name in two shards is a `FormatError`."""
    for name in names:
        if name in found:
            raise FormatError(f"{shard}: tensor {name!r} is also in {found[name]}")
        found[name] = shard.name


def untied_missing(state: Mapping[str, torch.Tensor], missing: Iterable[str]) -> list[str]:
    """The names of ``missing`` (sorted) whose tensor in ``state`` shares no storage with a
    tensor of ``state`` that is not missing: a tied key (an LM head sharing the embedding's
    storage) holds the loaded values. Names ``state`` lacks stay missing."""
    gone = set(missing)
    loaded = {_storage_key(t) for n, t in state.items() if n not in gone}
    return sorted(n for n in gone if n not in state or _storage_key(state[n]) not in loaded)


def _wclust_files(path: Path) -> tuple[list[Path], Shards | None]:
    """The .wclust files of a file or a packed folder (and the folder's shards)."""
    if path.is_dir():
        shards = find_wclust_shards(path)
        return shards.paths, shards
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    return [path], None


def load_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    *,
    threads: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[list[str], list[str]]:
    """Load a `.wclust` file, a packed folder or a Hub repository into ``model``'s parameters and
    persistent buffers, in place, as ``safetensors.torch.load_model`` does for safetensors.

    Returns ``(missing, unexpected)``: the model's state-dict keys the files do not hold (keys
    tied to a loaded one, such as an LM head sharing the embedding's storage, are not missing)
    and the files' tensors the model has no key for. Where the files hold several keys of one
    tied tensor, the last of them in the model's state-dict order is the value it keeps, as
    with ``Module.load_state_dict``. With ``strict`` (the default) either list
    being non-empty is a `UsageError`; a shape that differs from the model's always is. Both
    are raised before any weight is written.

    Values are decoded straight into each CPU parameter that is contiguous and has the stored
    dtype (floating tensors: any floating dtype, clustered ones rebuilt from converted tables,
    lossless ones converted chunk by chunk), so loading into an existing model touches no fresh
    memory and makes no second copy; other parameters (on another device, not contiguous, an
    integer tensor of another dtype) receive ``copy_`` of the decoded tensor, as
    ``Module.load_state_dict`` would do. Values equal ``load_state_dict(path)[key].to(param.dtype)``.
    A decoding error (a checksum, say) can leave some parameters already loaded.

    >>> import tempfile, os, torch, wcfmt
    >>> m = torch.nn.Linear(3, 2)
    >>> p = os.path.join(tempfile.mkdtemp(), "m.wclust")
    >>> wcfmt.save_file({k: torch.ones_like(v) for k, v in m.state_dict().items()}, p)
    >>> load_model(m, p), m.weight.sum().item()
    (([], []), 6.0)
    """
    from contextlib import ExitStack

    from ..reader import WclustReader
    from ..rebuild.stream import load_tensors
    from ..schema import AliasEntry
    from .sources import resolve_source

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"load_model needs a torch.nn.Module, got {type(model).__name__}")
    path = resolve_source(path, revision=revision, token=token, allow_patterns=[f"*{SUFFIX}", INDEX_NAME])
    files, shards = _wclust_files(path)
    state = model.state_dict()
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise UsageError(f"{type(model).__name__} has tensors on the meta device ({meta[0]}, ...): "
                         "materialise it first (model.to_empty(device=...)) or use wcfmt.from_pretrained")
    with ExitStack() as stack:
        readers = [stack.enter_context(WclustReader(p, use_mmap=False)) for p in files]  # see load_state_dict
        found: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for p, r in zip(files, readers):
            tensors = r.header.tensors
            _record_names(found, p, tensors)
            for name, e in tensors.items():
                target = tensors[e.target] if isinstance(e, AliasEntry) else e
                shapes[name] = tuple(target.shape)
        if shards is not None:
            check_weight_map(shards, found)
        where = str(path)
        wrong = [f"{k}: {list(shapes[k])} in the file, {list(state[k].shape)} in the model"
                 for k in found if k in state and tuple(state[k].shape) != shapes[k]]
        if wrong:
            raise UsageError(f"{where}: shapes differ from {type(model).__name__}'s (nothing loaded): "
                             + first_few(wrong, sep="; "))
        missing = untied_missing(state, (k for k in state if k not in found))
        unexpected = sorted(k for k in found if k not in state)
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {first_few(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)}: {first_few(unexpected)}")
            raise UsageError(f"{where}: does not match {type(model).__name__} (nothing loaded; strict=False "
                             f"loads what matches): " + "; ".join(parts))
        # One key per tied tensor is loaded: the last in the model's order, as load_state_dict
        # would leave it (and no two decodes write one storage at once).
        last_of = {_storage_key(state[k]): k for k in state if k in found}
        chosen = set(last_of.values())
        with torch.no_grad():
            for r in readers:
                wanted = [n for n in r.header.tensors if n in chosen]
                by_device: dict[torch.device, list[str]] = {}
                for n in wanted:
                    by_device.setdefault(state[n].device, []).append(n)
                for dev, names in by_device.items():
                    into = {n: state[n] for n in names} if dev.type == "cpu" else None
                    got = load_tensors(r, names, device=dev, threads=threads, into=into)
                    for n in names:
                        dest, value = state[n], got[n]
                        if not (value.data_ptr() == dest.data_ptr() and value.dtype == dest.dtype):
                            dest.copy_(value)
                    del got
    return missing, unexpected


def _storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Tensors with equal keys are one tensor (tied weights). Empty tensors hold no storage to
    share (their data pointers may all be 0): each is its own."""
    if t.numel() == 0:
        return (-id(t), 0, tuple(t.shape))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
