"""The Hugging Face Hub: push a packed model folder, load one back (no network in tests: mocked).

A packed folder is an ordinary model repository: `.wclust` shards, `model.wclust.index.json`,
config and tokenizer files. Pushing verifies every shard first, so a corrupt file never leaves
the machine; loading downloads only what a loader needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..constants import INDEX_NAME, SUFFIX
from ..errors import UsageError
from ..reader import WclustReader

__all__ = ["push_to_hub", "load_from_hub"]

#: What a packed model repository holds besides the shards (README, config, tokenizer, ...).
_WEIGHTS_PATTERNS = [f"*{SUFFIX}", INDEX_NAME]


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Verify a packed folder (or single .wclust file) and upload it; return the commit URL.

    Creates the repository if needed (``exist_ok``). Every `.wclust` file is checked (structure
    and every checksum) before anything is uploaded.
    """
    from huggingface_hub import HfApi

    path = Path(folder)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    shards = [path] if path.is_file() else sorted(path.glob(f"*{SUFFIX}"))
    if not shards:
        raise UsageError(f"{path}: holds no {SUFFIX} files; pack a model first (wcfmt pack)")
    for shard in shards:
        with WclustReader(shard) as r:
            r.verify()
    from .sources import hub_error

    try:
        return _upload(HfApi(token=token), path, repo_id, len(shards), private, revision, commit_message, create_pr)
    except Exception as e:  # no network, no permission, ...: one line, not an httpx traceback
        raise hub_error(f"push to {repo_id}", e) from None


def _upload(api, path: Path, repo_id: str, n: int, private, revision, commit_message, create_pr) -> str:  # type: ignore[no-untyped-def]
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    message = commit_message or f"Upload {n} .wclust shard(s) with wcfmt"
    if path.is_file():
        info = api.upload_file(
            path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, revision=revision,
            commit_message=message, create_pr=create_pr,
        )
    else:
        info = api.upload_folder(
            folder_path=str(path), repo_id=repo_id, revision=revision, commit_message=message,
            create_pr=create_pr, ignore_patterns=[".*", "*.tmp"],
        )
    return str(getattr(info, "commit_url", info))


def load_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> dict[str, torch.Tensor]:
    """Download a packed model's shards and index (cached by huggingface_hub) and load them dense."""
    from huggingface_hub import snapshot_download

    from .folder import load_state_dict

    local = snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=_WEIGHTS_PATTERNS
    )
    return load_state_dict(local, device=device, dtype=dtype)
