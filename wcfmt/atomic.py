"""Atomic file creation: write under a temporary name in the destination folder, rename into place.

Every file wcfmt writes (.wclust files, safetensors shards, index files) goes through
`AtomicFile`, so a crash, an error or a full disk never leaves a partial output and never
replaces a good file with a bad one.

A process killed with SIGKILL (or a machine that loses power) cannot remove its temporary file.
Temporary names therefore carry their writer, ``<pid>@<host>`` (`owner_tag`), and the next
write to the same destination removes the temporaries whose writer ran on this host and no
longer exists (`remove_stale_temps`), as lock-file tools do. Temporaries of a live process,
of another host (a shared network folder) or of a name that is not ours are never touched;
where a process cannot be looked up without side effects (Windows) nothing is removed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["AtomicFile", "new_file_mode", "write_text_atomic", "TMP_SUFFIX", "owner_tag", "remove_stale_temps",
           "temp_folder_name"]

#: Temporary files are named ``.<name>.<pid>@<host>.<random>.tmp`` beside their destination,
#: temporary folders (`wcfmt.io.folder.building_folder`) ``.<name>.wcfmt-[<tag>]<pid>@<host>.<random>.tmp``
#: (`temp_folder_name`).
TMP_SUFFIX = ".tmp"

log = logging.getLogger("wcfmt")

#: What follows ``.<name>.`` in a temporary name of ours: the writer's pid and host.
_OWNED = re.compile(r"^(?:wcfmt-(?:[a-z]+-)?)?(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "localhost"


def owner_tag() -> str:
    """``<pid>@<host>``: who writes a temporary file, so that a later run can tell a leftover of
    a killed process from a file another process is still writing."""
    return f"{os.getpid()}@{_host()}"


def temp_folder_name(dest: Path, tag: str = "") -> str:
    """A fresh temporary folder name for ``dest`` (``tag``: lowercase letters and a dash, e.g.
    ``"old-"``), in the form `remove_stale_temps` recognises."""
    return f".{dest.name}.wcfmt-{tag}{owner_tag()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: a lookup, nothing is sent (POSIX only, see remove_stale_temps)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists and belongs to another user
        return True
    return True


def remove_stale_temps(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders that writers of ``dest`` left beside it when they
    were killed: those named as ours for ``dest`` whose writer ran on this host and is gone.
    Returns what was removed (also logged at INFO on the ``wcfmt`` logger). Never raises: a
    leftover that cannot be removed stays, as it would have without this."""
    if sys.platform == "win32":  # os.kill(pid, 0) is not a lookup there
        return []
    dest = Path(dest)
    prefix, host, removed = f".{dest.name}.", _host(), []
    try:
        entries = list(os.scandir(dest.parent if str(dest.parent) else "."))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _OWNED.match(entry.name[len(prefix) :])
        if m is None or m.group(2) != host or _alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        log.info("removed %s, left by an interrupted run (process %s)", path, m.group(1))
        removed.append(path)
    return removed


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    try:  # Linux >= 4.7 reports it; reading it does not change process state
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class AtomicFile:
    """A binary file that appears at ``path`` only when `commit` is called.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> a = AtomicFile(p); _ = a.file.write(b"data"); os.path.exists(p)
    False
    >>> a.commit(); open(p, "rb").read()
    b'data'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        remove_stale_temps(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{owner_tag()}.", suffix=TMP_SUFFIX, dir=self.path.parent)
        except OSError as e:  # read-only or full: name the output, not a random temporary name
            raise type(e)(e.errno, e.strerror, str(self.path)) from None
        self.tmp = Path(tmp)
        try:
            os.chmod(fd, new_file_mode())  # mkstemp makes 0600; the result should look like any new file
            self.file: BinaryIO = _NamedFile(io.FileIO(fd, "r+"), self.path)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self.done = False

    def commit(self) -> None:
        """Flush to disk and rename into place (replacing an existing file)."""
        try:
            self.file.flush()
            try:
                os.fsync(self.file.fileno())
            except OSError as e:
                raise _named(e, self.path) from None
            self.file.close()
            os.replace(self.tmp, self.path)
            self.done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the temporary file; the destination is left as it was."""
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass  # flushing what is left failed (the disk is still full): it is being discarded anyway
        finally:
            self.tmp.unlink(missing_ok=True)


class _NamedFile(io.BufferedRandom):
    """The temporary file. A failed write (full disk, file size limit, I/O error) raises an
    `OSError` that names the destination: the OS gives none for a write, and the temporary name
    would mean nothing to the user."""

    def __init__(self, raw: io.FileIO, dest: Path) -> None:
        super().__init__(raw)
        self.dest = dest

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        try:
            return super().write(b)
        except OSError as e:
            raise _named(e, self.dest) from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            raise _named(e, self.dest) from None


def _named(e: OSError, path: Path) -> OSError:
    if e.filename is not None or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, str(path))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically."""
    f = AtomicFile(path)
    try:
        f.file.write(text.encode("utf-8"))
    except BaseException:
        f.abort()
        raise
    f.commit()
