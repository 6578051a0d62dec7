"""Faults (issue #11): a writer killed with SIGKILL, a full disk, a read-only destination, many
readers of one file at once, and a hostile file that describes far more data than it holds.

Outputs are written under a temporary name beside the destination and renamed into place
(`wcfmt.atomic`, `wcfmt.io.folder.building_folder`), so whatever happens the destination either
does not exist or is complete. A process killed by SIGKILL cannot clean up: its temporary file or
folder (``.NAME.<pid>@<host>.<random>.tmp``, ``.NAME.wcfmt-<pid>@<host>.<random>.tmp``) stays beside
the destination, hidden, never at the final name, until the next write to that destination removes
it; every other fault removes it at once.

Subprocesses cost a torch import each (a few seconds on 2 cores), so the scenarios of one kind
run side by side in one test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import wcfmt
from common import assemble, heavy_tailed, write_small
from wcfmt.cli import main
from wcfmt.reader import AUTO_MAX_FLOOR, AUTO_MAX_RATIO, auto_max_bytes

ROOT = Path(__file__).resolve().parent.parent
TEMP_NAME = re.compile(r"^\..+\.tmp$")  # AtomicFile's and building_folder's temporary names


def _source_tensors() -> dict[str, torch.Tensor]:
    t = {f"model.layers.{i}.mlp.up_proj.weight": heavy_tailed((256, 512), torch.bfloat16, seed=i) for i in range(4)}
    t["model.norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
    return t


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1 MB safetensors file and a model folder holding it, and both packed (K = 16)."""
    d = tmp_path_factory.mktemp("faults")
    tensors = _source_tensors()
    f = d / "src.safetensors"
    safetensors.torch.save_file(tensors, f, metadata={"format": "pt"})
    folder = d / "src-model"
    folder.mkdir()
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    wcfmt.pack(f, d / "packed.wclust", k=16)
    wcfmt.pack(folder, d / "packed-model", k=16)
    return {"file": f, "folder": folder, "packed_file": d / "packed.wclust", "packed_folder": d / "packed-model"}


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _assert_nothing_at(dst: Path, keep: set[str], *, temp_allowed: bool) -> None:
    """``dst`` does not exist; its folder holds nothing new but (after SIGKILL) hidden temporaries."""
    assert not dst.exists() and not dst.is_symlink(), f"{dst} exists after the fault"
    extra = _leftovers(dst.parent, keep)
    if temp_allowed:
        bad = [n for n in extra if not (TEMP_NAME.match(n) and n.startswith(f".{dst.name}."))]
        assert not bad, f"left at a non-temporary name: {bad}"
    else:
        assert not extra, f"left behind: {extra}"


# -- kill -9 ------------------------------------------------------------------------------------
#: The child runs the real CLI with the writers patched to stop right after their first write to
#: the temporary output (flushed to disk) and announce it; the parent then kills it with SIGKILL.
#: This pins the moment of the kill without changing what is on disk.
_STALL_AND_RUN = """
import os, sys, time
from wcfmt import writer
from wcfmt.io import safetensors_io
ready = sys.argv[1]
def stall(cls, meth):
    orig = getattr(cls, meth)
    def f(self, *a, **k):
        out = orig(self, *a, **k)
        self._f.flush()
        os.fsync(self._f.fileno())
        open(ready, "w").close()
        time.sleep(600)
        return out
    setattr(cls, meth, f)
stall(writer.WclustWriter, "_put")
stall(safetensors_io.SafetensorsStreamWriter, "write")
from wcfmt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_during_pack_and_unpack_leaves_nothing_at_the_destination(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    cases = {
        "pack-file": ["pack", sources["file"], "-o", tmp_path / "pack-file" / "out.wclust", "--k", "16"],
        "pack-folder": ["pack", sources["folder"], "-o", tmp_path / "pack-folder" / "out", "--k", "16"],
        "unpack-file": ["unpack", sources["packed_file"], "-o", tmp_path / "unpack-file" / "out.safetensors"],
        "unpack-folder": ["unpack", sources["packed_folder"], "-o", tmp_path / "unpack-folder" / "out"],
    }
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    try:
        for name, args in cases.items():
            (tmp_path / name).mkdir()
            ready = tmp_path / f"{name}.ready"
            p = subprocess.Popen(
                [sys.executable, "-c", _STALL_AND_RUN, str(ready), *map(str, args)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            procs[name] = (p, ready, Path(args[3]))
        deadline = time.monotonic() + 240
        for name, (p, ready, dst) in procs.items():
            while not ready.exists():
                assert p.poll() is None, f"{name} ended before writing: {p.stderr.read().decode()}"  # type: ignore[union-attr]
                assert time.monotonic() < deadline, f"{name} never started writing"
                time.sleep(0.02)
            temps = _leftovers(dst.parent, set())
            assert temps and all(TEMP_NAME.match(n) for n in temps), temps  # a partial output exists, hidden
            os.kill(p.pid, signal.SIGKILL)
            assert p.wait(30) == -signal.SIGKILL
        for name, (p, ready, dst) in procs.items():
            _assert_nothing_at(dst, set(), temp_allowed=True)
    finally:
        for p, _, _ in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
    # the leftovers do not stand in the way of a new run, which removes them (their writer is gone)
    for name, args in cases.items():
        dst = Path(args[3])
        assert main([str(a) for a in args] + ["-q"]) == 0, name
        assert _leftovers(dst.parent, set()) == [dst.name], name
    safetensors.torch.load_file(tmp_path / "unpack-file" / "out.safetensors")


# -- full disk (RLIMIT_FSIZE) --------------------------------------------------------------------
LIMIT = 100_000  # bytes per file: below every output here, above every input the child reads


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_file_size_limit_gives_one_error_line_and_no_output(sources: dict[str, Path], tmp_path: Path) -> None:
    """CPython ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as a full disk
    fails with ENOSPC: the command prints one line naming the output and removes its temporary."""
    cases = {
        "pack-file": ["pack", sources["file"], "-o", tmp_path / "pack-file" / "out.wclust", "--k", "16"],
        "unpack-folder": ["unpack", sources["packed_folder"], "-o", tmp_path / "unpack-folder" / "out"],
    }
    procs = {}
    for name, args in cases.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "wcfmt", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_limit_file_size,
        )  # fmt: skip
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        dst = Path(cases[name][3])
        assert p.returncode == 1, (name, p.returncode, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("wcfmt: error: ") and "File too large" in lines[0], lines[0]
        assert str(dst) in lines[0], lines[0]  # the output, not a temporary name
        assert ".tmp" not in lines[0], lines[0]
        _assert_nothing_at(dst, set(), temp_allowed=False)


# -- read-only destination -------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path: Path) -> Any:
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    # root ignores permission bits: mount a read-only tmpfs where it may
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_read_only_destination_is_one_error_line(
    sources: dict[str, Path], readonly_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (
        ["pack", sources["file"], "-o", readonly_dir / "out.wclust", "--k", "16"],
        ["pack", sources["folder"], "-o", readonly_dir / "out", "--k", "16"],
        ["unpack", sources["packed_file"], "-o", readonly_dir / "out.safetensors"],
        ["unpack", sources["packed_folder"], "-o", readonly_dir / "out"],
    ):
        assert main([*map(str, args), "-q"]) == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wcfmt: error: "), err
        assert f"{args[3]}: " in lines[0] and re.search("Read-only file system|Permission denied", lines[0]), lines[0]
        assert not list(readonly_dir.iterdir())


# -- many readers ------------------------------------------------------------------------------------
_READ_IN_CHILD = """
import hashlib, json, sys, wcfmt
out = {}
for _ in range(3):
    t = wcfmt.load_file(sys.argv[1])
    out = {n: hashlib.sha256(v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
           for n, v in t.items()}
print(json.dumps(out))
"""


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        n: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, v in tensors.items()
    }


def test_threads_and_processes_reading_one_file_agree(sources: dict[str, Path], tmp_path: Path) -> None:
    """Two processes and eight threads read one file at once (whole loads, a shared `safe_open`
    handle, row slices, raw labels): every result equals a lone single-threaded read."""
    path = write_small(tmp_path)  # every blob kind, aliases included
    big = sources["packed_file"]
    procs = [
        subprocess.Popen([sys.executable, "-c", _READ_IN_CHILD, str(p)], stdout=subprocess.PIPE, text=True)
        for p in (big, path)
    ]
    want = {p: _digests(wcfmt.load_file(p, threads=1)) for p in (big, path)}
    with wcfmt.safe_open(big) as f:
        names = f.keys()
        want_rows = {n: _digests({n: f.get_slice(n)[100:300]})[n] for n in names}
        want_labels = {n: f.get_clustered(n).labels.clone() for n in names if "up_proj" in n}
    errors: list[BaseException] = []
    shared = wcfmt.safe_open(big)

    def work(i: int) -> None:
        try:
            for r in range(3):
                p = (big, path)[(i + r) % 2]
                assert _digests(wcfmt.load_file(p, threads=2)) == want[p]
                for n in names[i % len(names) :] + names[: i % len(names)]:
                    assert _digests({n: shared.get_tensor(n)}) == {n: want[big][n]}
                    assert _digests({n: shared.get_slice(n)[100:300]})[n] == want_rows[n]
                    if n in want_labels:
                        assert torch.equal(shared.get_clustered(n).labels, want_labels[n])
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's index
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    shared.close()
    assert not errors, errors[0]
    for p, proc in zip((big, path), procs):
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0
        assert json.loads(out) == want[p]


# -- allocation cap --------------------------------------------------------------------------------
def _hostile(path: Path, rows: int, cols: int, chunk_rows: int) -> Path:
    """A valid file: a k = 1 F32 tensor of ``rows x cols``, one 2-byte table per chunk and no label
    bytes, so it decodes to 4 * rows * cols bytes from 64 bytes per chunk plus its header."""
    table = np.array([1.5], "<f2").tobytes()
    n = -(-rows // chunk_rows)
    chunks = [
        {"k": 1, "label_bits": 0,
         "centroids": {"offset": 64 * (i + 1), "length": 2, "encoding": "raw", "crc32": zlib.crc32(table)},
         "labels": {"offset": 64 * (i + 2), "length": 0, "encoding": "raw", "crc32": 0}}
        for i in range(n)
    ]  # fmt: skip
    header = {"producer": "hostile", "tensors": {"w": {"dtype": "F32", "shape": [rows, cols], "codec": "clustered",
              "chunk_rows": chunk_rows, "chunks": chunks}}}  # fmt: skip
    assemble(path, (table + bytes(62)) * n, header)
    return path


def test_auto_cap() -> None:
    assert auto_max_bytes(0) == AUTO_MAX_FLOOR == 256 << 20
    assert auto_max_bytes(10 << 30) == AUTO_MAX_RATIO * (10 << 30)


def test_cli_caps_decoding_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file of 64 KB + header that decodes to 64 GiB (one chunk) or to 4 GiB in 4 MiB chunks: verify and
    unpack refuse it before decoding, in one line; the Python API has no cap unless asked."""
    one = _hostile(tmp_path / "one.wclust", 1 << 14, 1 << 20, 1 << 14)  # 64 GiB in one chunk
    many = _hostile(tmp_path / "many.wclust", 1 << 10, 1 << 20, 1)  # 4 GiB in 1024 chunks of 4 MiB
    for p in (one, many):
        assert p.stat().st_size < 300_000
        for cmd in (["verify", str(p)], ["unpack", str(p), "-o", str(tmp_path / "u.safetensors")]):
            assert main(cmd) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "decoding needs" in err[0] and "--max-bytes" in err[0], err
        assert not (tmp_path / "u.safetensors").exists()
        with pytest.raises(wcfmt.UsageError, match="decoding needs"):
            wcfmt.load_file(p, max_bytes="auto")
    # an explicit cap: 4 MiB chunks pass a 5 MB per-call cap but not the file's total
    assert main(["verify", str(many), "--max-bytes", "5MB"]) == 1
    assert "decoding needs 4294967296 bytes" in capsys.readouterr().err
    with wcfmt.safe_open(many, max_bytes=5_000_000) as f:
        assert f.get_slice("w")[3:4].shape == (1, 1 << 20)  # one chunk is within the cap
    # a real file is well within the default; so is a small file of constant tensors
    small = write_small(tmp_path)
    assert main(["verify", str(small), "-q"]) == 0
    zeros = tmp_path / "zeros.wclust"
    wcfmt.save_file({"z": torch.zeros(4096, 4096)}, zeros)  # 64 MiB from a few kB
    assert zeros.stat().st_size * AUTO_MAX_RATIO < 64 << 20
    assert main(["verify", str(zeros), "-q"]) == 0
    assert main(["unpack", str(zeros), "-o", str(tmp_path / "z.safetensors"), "-q"]) == 0
    assert main(["verify", str(zeros), "-q", "--max-bytes", "1MB"]) == 1
    assert main(["verify", str(zeros), "-q", "--max-bytes", "0"]) == 0
    capsys.readouterr()
