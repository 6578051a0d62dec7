"""Leftovers of killed writers (`wcfmt.atomic.remove_stale_temps`): the next write to the same
destination removes the temporary files and folders whose writer ran on this host and is gone,
and nothing else. (tests/test_faults.py kills real writers with SIGKILL and runs them again.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import wcfmt
from common import heavy_tailed
from wcfmt.atomic import _host, owner_tag, remove_stale_temps
from wcfmt.cli import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="leftovers are kept on Windows")


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(out.stdout)


def _leftovers(folder: Path, name: str, dead: int) -> dict[str, Path]:
    """One temporary of every kind beside ``folder / name``; the keys say whose it is."""
    host = _host()
    made = {
        "dead file": folder / f".{name}.{dead}@{host}.ab12cd34.tmp",
        "dead folder": folder / f".{name}.wcfmt-{dead}@{host}.0a1b2c3d.tmp",
        "dead old folder": folder / f".{name}.wcfmt-old-{dead}@{host}.0a1b2c3e.tmp",
        "live file": folder / f".{name}.{os.getppid()}@{host}.ab12cd35.tmp",  # the test runner's parent
        "own file": folder / f".{name}.{owner_tag()}.ab12cd36.tmp",
        "other host": folder / f".{name}.{dead}@{host}x.ab12cd37.tmp",
        "other name": folder / f".{name}x.{dead}@{host}.ab12cd38.tmp",
        "no owner (0.1 name)": folder / f".{name}.ab12cd39.tmp",
        "user file": folder / f"{name}.{dead}@{host}.ab12cd40.tmp",
    }
    for key, p in made.items():
        if "folder" in key:
            p.mkdir()
            (p / "model.wclust").write_bytes(b"partial")
        else:
            p.write_bytes(b"partial")
    return made


DEAD = {"dead file", "dead folder", "dead old folder"}


def test_remove_stale_temps_removes_only_dead_writers_of_this_name(tmp_path: Path) -> None:
    made = _leftovers(tmp_path, "out.wclust", _dead_pid())
    removed = remove_stale_temps(tmp_path / "out.wclust")
    assert sorted(removed) == sorted(made[k] for k in DEAD)
    assert {k for k, p in made.items() if not p.exists()} == DEAD
    assert remove_stale_temps(tmp_path / "out.wclust") == []  # nothing left to do
    assert remove_stale_temps(tmp_path / "missing-folder" / "x") == []  # no folder: no error


def test_save_file_removes_leftovers_of_its_destination(tmp_path: Path) -> None:
    made = _leftovers(tmp_path, "out.wclust", _dead_pid())
    wcfmt.save_file({"w": heavy_tailed((64, 64))}, tmp_path / "out.wclust")
    assert {k for k, p in made.items() if not p.exists()} == DEAD
    assert wcfmt.load_file(tmp_path / "out.wclust")["w"].shape == (64, 64)


def test_cli_pack_folder_removes_leftovers_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    safetensors.torch.save_file({"model.layers.0.mlp.up_proj.weight": heavy_tailed((64, 128), torch.bfloat16)},
                                src / "model.safetensors")  # fmt: skip
    dead = _dead_pid()
    made = _leftovers(tmp_path, "out", dead)
    assert main(["pack", str(src), "-o", str(tmp_path / "out"), "--k", "16"]) == 0
    assert {k for k, p in made.items() if not p.exists()} == DEAD
    err = capsys.readouterr().err
    assert err.count("wcfmt: note: removed ") == 3 and f"left by an interrupted run (process {dead})" in err
    made = _leftovers(tmp_path, "out", dead)
    assert main(["pack", str(src), "-o", str(tmp_path / "out"), "--k", "16", "--force", "-q"]) == 0
    assert {k for k, p in made.items() if not p.exists()} == DEAD
    assert capsys.readouterr().err == ""  # --quiet: no note


def test_temporary_names_carry_their_writer(tmp_path: Path) -> None:
    from wcfmt.atomic import AtomicFile

    f = AtomicFile(tmp_path / "x.bin")
    try:
        assert f.tmp.name.startswith(f".x.bin.{os.getpid()}@") and f.tmp.name.endswith(".tmp")
        assert remove_stale_temps(tmp_path / "x.bin") == []  # its writer (this process) is alive
    finally:
        f.abort()
