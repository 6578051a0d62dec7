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


# -- side effects the tests above do not see (mutation audit 0.2: AT1, AT3, AT4) ----------------
def test_a_live_process_of_another_user_keeps_its_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill(pid, 0) on another user's process fails with EPERM: the process exists, so its
    temporary file is in use and stays. (These tests run as root, where pid 1 answers; the other
    user's process is simulated by os.kill raising PermissionError for that pid only.)"""
    other, dead = 4_000_001, 4_000_002
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == other:
            raise PermissionError(1, "Operation not permitted")
        if pid == dead:
            raise ProcessLookupError(3, "No such process")
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    live = tmp_path / f".m.wclust.{other}@{_host()}.abc123.tmp"
    gone = tmp_path / f".m.wclust.{dead}@{_host()}.abc123.tmp"
    live.write_bytes(b"x")
    gone.write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "m.wclust") == [gone]
    assert live.exists() and not gone.exists()


def test_only_whole_temporary_names_are_removed(tmp_path: Path) -> None:
    """The pattern is anchored at its end: a file that merely starts like a leftover of a dead
    writer (``....tmp.keep``, ``....tmpx``) is someone's file, not ours, and stays."""
    dead, host = _dead_pid(), _host()
    keep = [tmp_path / f".m.wclust.{dead}@{host}.abc123.tmp.keep", tmp_path / f".m.wclust.{dead}@{host}.abc123.tmpx",
            tmp_path / f".m.wclust.wcfmt-{dead}@{host}.abc123.tmp~"]
    ours = tmp_path / f".m.wclust.{dead}@{host}.abc123.tmp"
    for p in keep + [ours]:
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "m.wclust") == [ours]
    assert all(p.exists() for p in keep)


def test_commit_fsyncs_the_data_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AtomicFile.commit: flush, fsync the temporary file, then rename; seen through patched
    os.fsync and os.replace (a rename before the data is on disk can leave an empty file after a
    power cut)."""
    from wcfmt.atomic import AtomicFile

    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(a: object, b: object) -> None:
        events.append(("replace", os.stat(a).st_ino))  # type: ignore[arg-type]
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    a = AtomicFile(tmp_path / "x.bin")
    a.file.write(b"data")
    a.commit()
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    ino = (tmp_path / "x.bin").stat().st_ino
    assert events.index(("fsync", ino)) < events.index(("replace", ino))
