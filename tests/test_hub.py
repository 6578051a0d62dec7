"""Hub push/load (wcfmt/io/hub.py, wcfmt/io/sources.py). Most tests replace huggingface_hub's
calls by a local fake (what wcfmt sends, refusing a corrupt folder); the round trip at the end runs
the real client over HTTP against a local server that plays the Hub (tests/hub_double.py)."""

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



# -- the real huggingface_hub client against a local HTTP server (tests/hub_double.py) ---------
@pytest.fixture()
def real_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The unpatched client, pointed at the double as HF_ENDPOINT would point it (set at import,
    so the constants are set here), with its own cache, a token, and the LFS protocol (no Xet)."""
    from huggingface_hub import constants
    from hub_double import HubDouble

    with HubDouble() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        yield server


def test_round_trip_through_the_real_client(tmp_path: Path, real_hub, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """wcfmt pack --push-to-hub, then from_pretrained("hf://...") online and offline from the warm
    cache: the bytes that arrive and come back are the packed folder's, the card names the base
    model, the model generates as the local folder does, and the offline load asks nothing."""
    from huggingface_hub import ModelCard, constants

    pytest.importorskip("transformers")
    from test_transformers_io import tiny_llama_folder

    from wcfmt.cli import main

    src, packed = tiny_llama_folder(tmp_path / "src"), tmp_path / "tiny-wclust"
    assert main(["pack", str(src), "-o", str(packed), "--k", "16", "--base-model", "org/tiny-base",
                 "--push-to-hub", "me/tiny-wclust", "--quiet"]) == 0  # fmt: skip
    local = {p.relative_to(packed).as_posix(): p.read_bytes() for p in packed.rglob("*") if p.is_file()}
    assert real_hub.repos["me/tiny-wclust"] == local  # every file arrived, byte for byte
    assert any(m == "PUT" and p.startswith("/_lfs/") for m, p in real_hub.requests)  # shards went by LFS
    card = ModelCard.load("me/tiny-wclust")  # downloaded by the client, parsed
    assert card.data.base_model == "org/tiny-base" and card.data.to_dict()["base_model_relation"] == "quantized"

    def generate(source: str | Path) -> list[int]:
        out = wcfmt.from_pretrained(source).generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8,
                                                     do_sample=False, attention_mask=torch.ones(1, 4, dtype=torch.long))
        return out[0].tolist()

    want = generate(packed)
    assert len(want) == 4 + 8
    assert generate("hf://me/tiny-wclust") == want
    snapshot = next(Path(constants.HF_HUB_CACHE).glob("models--me--tiny-wclust/snapshots/*"))
    back = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert back == local  # and came back identical
    asked = len(real_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert generate("hf://me/tiny-wclust") == want
    assert len(real_hub.requests) == asked  # offline from the warm cache: no request


def test_transform_reads_a_hub_source(tmp_path: Path, hub: FakeHub) -> None:
    """transform (like heal and sensitivity, which share resolve_source) takes hf://org/name."""
    from wcfmt.cluster import cluster_tensor

    repo = tmp_path / "hub" / "org" / "packed"
    repo.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    wcfmt.save_file({"w": cluster_tensor(torch.randn(16, 8, generator=g), k=8)}, repo / "model.wclust")
    rep = wcfmt.transforms.transform("hf://org/packed@v1", tmp_path / "out", "affine", a=2.0)
    assert rep.tensors == ["w"]
    kind, kw = hub.calls[0]
    assert (kind, kw["repo_id"], kw["revision"]) == ("snapshot_download", "org/packed", "v1")
    with wcfmt.safe_open(repo / "model.wclust") as a, wcfmt.safe_open(tmp_path / "out" / "model.wclust") as b:
        assert torch.equal(b.get_tensor("w"), (a.get_tensor("w").half() * 2).to(a.get_tensor("w").dtype))


def test_load_model_reads_a_hub_source(tmp_path: Path, hub: FakeHub) -> None:
    """load_model, like load_state_dict, takes a repository and downloads only shards and index."""
    folder, tensors = _packed_folder(tmp_path)
    wcfmt.push_to_hub(folder, "me/tiny-wclust")
    model = torch.nn.Module()
    model.a = torch.nn.Linear(4, 8, bias=False)
    model.b = torch.nn.Module()
    model.b.register_parameter("bias", torch.nn.Parameter(torch.zeros(4)))
    assert wcfmt.load_model(model, "hf://me/tiny-wclust@v2") == ([], [])
    kind, kw = hub.calls[-1]
    assert (kind, kw["repo_id"], kw["revision"], kw["allow_patterns"]) == (
        "snapshot_download", "me/tiny-wclust", "v2", ["*.wclust", INDEX_NAME])
    assert torch.equal(model.a.weight, tensors["a.weight"]) and torch.equal(model.b.bias, tensors["b.bias"])
