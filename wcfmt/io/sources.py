"""Where a model comes from: a local path, or a Hugging Face Hub repository.

Every command and loader that takes a source path (`pack`, `unpack`, `info`, `verify`,
`load_state_dict`, `from_pretrained`) accepts, besides a local file or folder:

- ``hf://org/name`` or ``hf://org/name@revision`` (a branch, tag or commit), and
- a bare repository id ``org/name`` when no local file or folder of that name exists.

A Hub source is fetched with ``huggingface_hub.snapshot_download`` into its usual cache, so the
second use makes no download, ``HF_HUB_OFFLINE=1`` works from a warm cache without a request, and
the stored login (or ``token=``) is used. Failures (no network, unknown repository or revision,
gated repository) become one-line `HubError`\\ s.

>>> parse_source("hf://HuggingFaceTB/SmolLM2-135M@v1.0")
HubSource(repo_id='HuggingFaceTB/SmolLM2-135M', revision='v1.0')
>>> parse_source("org/name-wclust")
HubSource(repo_id='org/name-wclust', revision=None)
>>> parse_source("model.wclust")
PosixPath('model.wclust')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import HubError, UsageError

__all__ = ["HubSource", "parse_source", "resolve_source", "hub_error"]

PREFIX = "hf://"

#: The Hub's repository id grammar (huggingface_hub.utils.validate_repo_id), one namespace.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
#: Bare ids that look like file names are local paths the user mistyped, not repositories.
_FILE_SUFFIXES = (".wclust", ".safetensors", ".json", ".bin", ".pt")


@dataclass(frozen=True)
class HubSource:
    """A model repository on the Hub, at ``revision`` (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_source(source: str | os.PathLike[str], revision: str | None = None) -> Path | HubSource:
    """Return the local path, or the Hub repository, that ``source`` names.

    A string that exists on disk is always the local path. ``revision`` applies to Hub sources
    (an ``@rev`` in the ``hf://`` form wins only when ``revision`` is not given).
    """
    if not isinstance(source, str):
        return Path(source)
    if source.startswith(PREFIX):
        rest = source[len(PREFIX):].strip("/")
        repo_id, _, rev = rest.partition("@")
        if not _REPO_ID.match(repo_id):
            raise UsageError(f"{source}: not a Hub repository (expected hf://org/name or hf://org/name@revision)")
        if rev and revision and rev != revision:
            raise UsageError(f"{source}: names revision {rev!r} but revision={revision!r} was also given")
        return HubSource(repo_id, revision or rev or None)
    path = Path(source)
    if path.exists() or path.is_symlink():
        return path
    if _REPO_ID.match(source) and not source.endswith(_FILE_SUFFIXES) and not source.startswith("."):
        return HubSource(source, revision)
    return path


def resolve_source(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """Return a local path for ``source``, downloading a Hub repository (cached) if it names one.

    ``allow_patterns`` limits what is downloaded (default: the whole repository, as a model
    folder needs its config and tokenizer). A local path is returned unchanged, existing or not
    (the caller reports a missing file as it always has).
    """
    where = parse_source(source, revision)
    if isinstance(where, Path):
        return where
    from huggingface_hub import snapshot_download

    from .._version import __version__

    try:
        local = snapshot_download(
            where.repo_id, revision=where.revision, token=token, cache_dir=cache_dir,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            library_name="wcfmt", library_version=__version__,
        )  # fmt: skip
    except Exception as e:  # huggingface_hub and httpx raise many kinds; none should escape raw
        raise hub_error(str(where), e) from None
    return Path(local)


def hub_error(what: str, e: BaseException) -> HubError:
    """One line for a failed Hub call: what was asked, the kind of failure, the server's words."""
    import huggingface_hub.errors as he

    kind = type(e).__name__
    if isinstance(e, he.RepositoryNotFoundError):
        why = "repository not found (or private: log in with `hf auth login` or pass a token)"
    elif isinstance(e, he.RevisionNotFoundError):
        why = "revision not found"
    elif isinstance(e, he.GatedRepoError):
        why = "gated repository: accept its terms on the Hub and log in"
    elif isinstance(e, he.LocalEntryNotFoundError) or "offline" in str(e).lower():
        why = "not in the local cache and the Hub cannot be reached (offline?)"
    elif isinstance(e, he.HfHubHTTPError):
        why = f"the Hub answered an error ({_first_line(e)})"
    elif isinstance(e, OSError) or "connect" in kind.lower() or "timeout" in kind.lower():
        why = f"cannot reach the Hub ({kind}: {_first_line(e)})"
    else:
        why = f"{kind}: {_first_line(e)}"
    return HubError(f"{what}: {why}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
