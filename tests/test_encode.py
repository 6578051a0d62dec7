"""The encode stage (wcfmt/packing/encode.py): worker processes that never outlive `wcfmt pack`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wcfmt.packing import encode


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(d.name))
    return found


def _running_with(text: str) -> set[int]:
    """Live processes whose command line holds ``text`` (this test's own temporary path)."""
    found = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text.encode() in (d / "cmdline").read_bytes() and _alive(int(d.name)):
                found.add(int(d.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2 :].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_pack_leaves_no_worker_behind(tmp_path: Path) -> None:
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    # above the pool's threshold (64 MiB) so that pack clusters in worker processes, and F32 for
    # k-means, which takes about a second a tensor there: the kill lands mid-clustering
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g) for i in range(5)}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) >= encode.PROCESS_POOL_MIN_BYTES
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(src))
    del tensors
    proc = subprocess.Popen([sys.executable, "-m", "wcfmt", "pack", str(src), "-o", str(tmp_path / "m.wclust"),
                             "--k", "64", "--threads", "2", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "pack finished or stalled before its workers started"
    time.sleep(0.3)  # mid-clustering
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "pack finished before it was killed: give it more work"
    deadline = time.monotonic() + 15
    while _running_with(str(src)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(_running_with(str(src)))  # every process of that pack, workers or not
    for w in left:  # do not leave them to the rest of the suite either
        os.kill(w, signal.SIGKILL)
    assert not left, f"processes {left} of the killed pack outlived it (its workers were {sorted(workers)})"
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert not (tmp_path / "m.wclust").exists()


def test_a_worker_exits_when_its_parent_is_already_gone() -> None:
    """The race the parent-death signal cannot cover: the parent died before the worker armed
    it. `_die_with_parent` then exits at once, with no traceback."""
    code = ("import os, wcfmt.packing.encode as e; e._die_with_parent(os.getppid() + 10**7); print('alive')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 1 and b"alive" not in r.stdout and b"Traceback" not in r.stderr


def test_tensors_in_flight_are_bounded_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pool, tensors are clustered ahead of the writer up to the workers' count and
    `INFLIGHT_BYTES` of sources; a tensor above that goes alone. Same bytes either way."""
    import safetensors.torch

    import wcfmt
    from wcfmt.packing import write
    from wcfmt.writer import WclustWriter

    g = torch.Generator().manual_seed(1)
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 64, generator=g).bfloat16()
                                 for i in range(6)}, str(src))
    monkeypatch.setattr(encode, "PROCESS_POOL_MIN_BYTES", 0)
    ahead = {"now": 0, "most": 0}
    real_submit, real_add = encode.Clusterer.submit, WclustWriter.add

    def submit(self, t, spec):  # type: ignore[no-untyped-def]
        ahead["now"] += 1
        ahead["most"] = max(ahead["most"], ahead["now"])
        return real_submit(self, t, spec)

    def add(self, name, item):  # type: ignore[no-untyped-def]
        ahead["now"] -= 1
        return real_add(self, name, item)

    monkeypatch.setattr(encode.Clusterer, "submit", submit)
    monkeypatch.setattr(WclustWriter, "add", add)
    wcfmt.pack(src, tmp_path / "free.wclust", threads=2, calib="none")
    assert ahead["most"] == 3  # the workers' two ahead of the one being written
    monkeypatch.setattr(write, "INFLIGHT_BYTES", 64 * 64 * 2)  # one tensor's bytes
    ahead["most"] = 0
    wcfmt.pack(src, tmp_path / "bounded.wclust", threads=2, calib="none")
    assert ahead["most"] == 1
    assert (tmp_path / "free.wclust").read_bytes() == (tmp_path / "bounded.wclust").read_bytes()
