"""Hub push/load (wcfmt/io/hub.py). The network is replaced by a local fake of huggingface_hub's
calls: what matters here is what wcfmt sends and that it refuses to upload a corrupt folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch

import wcfmt
from wcfmt.constants import INDEX_NAME


class FakeHub:
    """Stands in for the Hub: create_repo/upload_folder copy into a local 'repo' folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, *, folder_path: str, repo_id: str, **kw: Any) -> Any:
        self.calls.append(("upload_folder", {"folder_path": folder_path, "repo_id": repo_id, **kw}))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    def snapshot_download(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("snapshot_download", {"repo_id": repo_id, **kw}))
        return str(self.root / repo_id)


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake.create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake.upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def _packed_folder(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "packed"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(4, generator=g)}
    wcfmt.save_file(tensors, folder / "model.wclust", metadata={"format": "pt"})
    (folder / INDEX_NAME).write_text(
        '{"metadata": {"total_size": 144}, "weight_map": {"a.weight": "model.wclust", "b.bias": "model.wclust"}}'
    )
    (folder / "config.json").write_text("{}")
    return folder, tensors


def test_push_then_load_round_trip(tmp_path: Path, hub: FakeHub) -> None:
    folder, tensors = _packed_folder(tmp_path)
    url = wcfmt.push_to_hub(folder, "me/tiny-wclust", private=True)
    assert url.endswith("/commit/1")
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["exist_ok"] is True
    loaded = wcfmt.load_from_hub("me/tiny-wclust", revision="main")
    assert hub.calls[-1][1]["allow_patterns"] == ["*.wclust", INDEX_NAME]
    assert hub.calls[-1][1]["revision"] == "main"
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


def test_push_refuses_corrupt_shard_before_uploading(tmp_path: Path, hub: FakeHub) -> None:
    folder, _ = _packed_folder(tmp_path)
    data = bytearray((folder / "model.wclust").read_bytes())
    data[64] ^= 0xFF  # first byte of the first blob
    (folder / "model.wclust").write_bytes(bytes(data))
    with pytest.raises(wcfmt.WclustError):
        wcfmt.push_to_hub(folder, "me/bad")
    assert hub.calls == []


def test_push_refuses_folder_without_shards(tmp_path: Path, hub: FakeHub) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(wcfmt.UsageError, match="no .wclust"):
        wcfmt.push_to_hub(tmp_path / "empty", "me/empty")
    assert hub.calls == []


def test_cli_push(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    from wcfmt.cli import main

    folder, _ = _packed_folder(tmp_path)
    assert main(["push", str(folder), "me/cli-push", "--revision", "dev"]) == 0
    assert capsys.readouterr().out.strip() == "https://hub.invalid/me/cli-push/commit/1"
    assert hub.calls[1][1]["revision"] == "dev"
    assert (hub.root / "me/cli-push" / "model.wclust").exists()


def test_push_without_network_is_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    folder, _ = _packed_folder(tmp_path)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path / "h")}
    r = subprocess.run([sys.executable, "-m", "wcfmt", "push", str(folder), "me/x"], capture_output=True, text=True,
                       env=env)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("wcfmt: error: push to me/x: ")
