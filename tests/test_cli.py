"""The ``wcfmt`` command end to end: a real subprocess on a tiny Llama folder, and every error a
user can cause printing one line (``wcfmt: error: ...``) and exiting non-zero, never a traceback.

Subprocesses cost a torch import each (~2 s), so the end-to-end path and one error of each kind
run through ``python -m wcfmt.cli``; the remaining error cases call `wcfmt.cli.main` in-process,
which is the same code after argument parsing.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import wcfmt
from common import assert_bit_equal, flip, heavy_tailed, split
from test_convert import check_model_loads, make_hf_folder, source_tensors, tree_hash
from wcfmt.cli import main
from wcfmt.constants import INDEX_NAME, PREAMBLE_SIZE
from wcfmt.io import load_state_dict, read_index
from wcfmt.schema import LosslessEntry

pytest.importorskip("transformers")


def wcfmt_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wcfmt.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_one_error_line(r: subprocess.CompletedProcess[str] | tuple[int, str], *needles: str) -> None:
    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code == 1, (code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wcfmt: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("cli") / "tiny-llama")


# -- end to end ---------------------------------------------------------------------------------
def test_pack_unpack_info_verify_end_to_end(hf: Path, tmp_path: Path) -> None:
    before = tree_hash(hf)
    packed, unpacked = tmp_path / "packed", tmp_path / "unpacked"

    r = wcfmt_cli("pack", hf, "-o", packed)
    assert r.returncode == 0, r.stderr
    assert "ratio" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert tree_hash(hf) == before
    assert sorted(p.name for p in packed.glob("*.wclust")) == [f"model-0000{i}-of-00003.wclust" for i in (1, 2, 3)]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (packed / name).read_bytes() == (hf / name).read_bytes()
    _, wm = read_index(packed / INDEX_NAME)
    src_map = read_index(hf / "model.safetensors.index.json")[1]
    assert wm == {n: f.replace(".safetensors", ".wclust") for n, f in src_map.items()}

    r = wcfmt_cli("unpack", packed, "-o", unpacked, "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert (unpacked / "model.safetensors.index.json").exists() and (unpacked / "config.json").exists()
    got, src, ref = source_tensors(unpacked), source_tensors(hf), load_state_dict(packed)
    assert set(got) == set(src)
    for p in packed.glob("*.wclust"):
        with wcfmt.safe_open(p) as f:
            for name, e in f.header.tensors.items():
                assert_bit_equal(got[name], ref[name])
                if isinstance(e, LosslessEntry):
                    assert_bit_equal(got[name], src[name])
    check_model_loads(got)

    r = wcfmt_cli("info", packed, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {t["name"] for t in info["tensors"]} == set(src)
    assert info["totals"]["packed_bytes"] == sum(p.stat().st_size for p in packed.glob("*.wclust"))
    assert info["totals"]["original_bytes"] == sum(t.numel() * t.element_size() for t in src.values())
    assert 0 < info["totals"]["ratio"] < 1
    clustered = [t for t in info["tensors"] if t["codec"] == "clustered"]
    assert clustered and all(1 <= t["k_min"] <= t["k_max"] <= 256 and t["bits_per_weight"] < 16 for t in clustered)

    r = wcfmt_cli("verify", packed)
    assert r.returncode == 0 and r.stdout.startswith("OK:"), r.stderr

    victim = packed / "model-00002-of-00003.wclust"
    flip(victim, PREAMBLE_SIZE + 5)  # a byte inside the first blob
    r = wcfmt_cli("verify", packed)
    assert_one_error_line(r, "model-00002-of-00003.wclust", "checksum mismatch")
    assert r.stdout == ""


def test_info_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = heavy_tailed((16, 8))
    wcfmt.save_file({"emb": emb, "head": emb, "n": torch.arange(3)}, tmp_path / "t.wclust")
    assert main(["info", str(tmp_path / "t.wclust")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "shape", "dtype", "codec", "K", "bits/w", "ratio", "rel.err", "SQNR", "dB"]
    assert out[2].split()[:5] == ["head", "16x8", "BF16", "alias", "->"]
    assert out[-1].startswith("total: 3 tensors (1 alias, 2 lossless) in 1 file(s)")


def test_info_shows_quality_of_clustered_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = heavy_tailed((64, 32))
    ct = wcfmt.cluster_tensor(w, 16, 16)
    wcfmt.save_file({"w": ct}, tmp_path / "q.wclust")
    assert main(["info", str(tmp_path / "q.wclust")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == "w" and row[3] == "clustered"
    assert float(row[7]) == pytest.approx(ct.quality["rel_error"], abs=1e-4)
    assert float(row[8]) == pytest.approx(ct.quality["sqnr_db"], abs=0.05)
    assert main(["info", str(tmp_path / "q.wclust"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensors"][0]["quality"]["label_entropy_bits"] == pytest.approx(ct.quality["label_entropy_bits"])


def test_version_and_help() -> None:
    r = wcfmt_cli("--version")
    want = f"wcfmt {wcfmt.__version__} (.wclust format {wcfmt.FORMAT_VERSION})"
    assert r.returncode == 0 and r.stdout.strip() == want
    r = wcfmt_cli()
    assert r.returncode == 2 and "usage: wcfmt" in r.stderr


def test_quiet_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safetensors.torch.save_file({"w": heavy_tailed((8, 8))}, tmp_path / "m.safetensors")
    assert main(["pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.wclust"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert_one_error_line(run_main(capsys, "pack", tmp_path / "m.safetensors", "-o", tmp_path / "m.wclust"),
                          "m.wclust", "output exists", "--force")  # fmt: skip
    assert main(["pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.wclust"), "--force", "-q"]) == 0
    assert main(["unpack", str(tmp_path / "m.wclust"), "-o", str(tmp_path / "b.safetensors"), "-q"]) == 0
    assert main(["verify", str(tmp_path / "m.wclust"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")


# -- errors: one line, non-zero, no traceback -------------------------------------------------------
def test_errors_in_a_subprocess(tmp_path: Path) -> None:
    assert_one_error_line(wcfmt_cli("pack", tmp_path / "nope.safetensors", "-o", tmp_path / "x.wclust"),
                          "nope.safetensors", "No such file")  # fmt: skip
    (tmp_path / "bad.wclust").write_bytes(b"\x89WCLUST\n" + bytes(100))
    assert_one_error_line(wcfmt_cli("verify", tmp_path / "bad.wclust"), "bad.wclust")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wclust"]


def test_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not tensors")
    assert_one_error_line(run_main(capsys, "pack", tmp_path / "junk.safetensors", "-o", tmp_path / "x.wclust"),
                          "junk.safetensors", "not a safetensors file")  # fmt: skip

    raw = json.dumps({"z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "c64.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    assert_one_error_line(run_main(capsys, "pack", tmp_path / "c64.safetensors", "-o", tmp_path / "x.wclust"),
                          "c64.safetensors: tensor 'z': unsupported dtype C64")  # fmt: skip

    (tmp_path / "trunc.wclust").write_bytes(b"\x89WCLUST\n")
    for cmd in (["info"], ["verify"], ["unpack", "-o", str(tmp_path / "x.safetensors")]):
        assert_one_error_line(run_main(capsys, *cmd, tmp_path / "trunc.wclust"), "trunc.wclust", "truncated")

    wcfmt.save_file({"w": torch.ones(4)}, tmp_path / "ok.wclust")
    assert_one_error_line(run_main(capsys, "unpack", tmp_path / "ok.wclust", "-o", tmp_path / "o", "--dtype", "int3"),
                          "dtype 'int3'")  # fmt: skip
    assert_one_error_line(
        run_main(capsys, "unpack", tmp_path / "ok.wclust", "-o", tmp_path / "o", "--max-shard-size", "big"), "size"
    )
    bad_re = run_main(capsys, "pack", tmp_path / "junk.safetensors", "-o", tmp_path / "x", "--include", "(")
    assert_one_error_line(bad_re, "invalid regex")
    assert_one_error_line(run_main(capsys, "info", tmp_path / "missing"), "missing", "No such file")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(run_main(capsys, "verify", tmp_path / "empty"), "empty", "no .wclust files")
    assert_one_error_line(run_main(capsys, "pack", tmp_path / "empty", "-o", tmp_path / "out"), "no .safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c64.safetensors", "empty", "junk.safetensors", "ok.wclust", "trunc.wclust",
    ]  # fmt: skip


def test_corrupt_header_and_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wcfmt.save_file({"w": heavy_tailed((32, 16))}, tmp_path / "a.wclust")
    p = split(tmp_path / "a.wclust")
    flip(tmp_path / "a.wclust", p.header_offset + 3)
    assert_one_error_line(run_main(capsys, "info", tmp_path / "a.wclust"), "a.wclust", "header checksum mismatch")
    wcfmt.save_file({"w": heavy_tailed((32, 16))}, tmp_path / "b.wclust")
    flip(tmp_path / "b.wclust", PREAMBLE_SIZE)
    assert main(["info", str(tmp_path / "b.wclust")]) == 0  # info reads headers only
    capsys.readouterr()
    assert_one_error_line(run_main(capsys, "verify", tmp_path / "b.wclust"), "b.wclust: tensor 'w': chunk 0")
    assert_one_error_line(run_main(capsys, "unpack", tmp_path / "b.wclust", "-o", tmp_path / "b.safetensors"),
                          "b.wclust: tensor 'w': chunk 0", "checksum mismatch")  # fmt: skip
    assert not (tmp_path / "b.safetensors").exists()


def test_index_disagreeing_with_files(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(hf), "-o", str(tmp_path / "p"), "-q", "--exclude", "."]) == 0
    idx = json.loads((tmp_path / "p" / INDEX_NAME).read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00003.wclust"
    (tmp_path / "p" / INDEX_NAME).write_text(json.dumps(idx))
    for cmd in (["verify"], ["unpack", "-o", str(tmp_path / "u")], ["info"]):
        if cmd == ["info"]:  # info reads headers only; it lists what the files hold
            assert main([*cmd, str(tmp_path / "p")]) == 0
            continue
        err = run_main(capsys, *cmd, tmp_path / "p")
        assert_one_error_line(err, INDEX_NAME, "'ghost.weight'", "no shard holds it")
    assert not (tmp_path / "u").exists()


def test_disk_full_is_one_line_and_leaves_nothing(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from wcfmt.io import safetensors_io

    real = safetensors_io.SafetensorsStreamWriter.write

    def full(self, name, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(self._out.tmp))

    assert main(["pack", str(hf), "-o", str(tmp_path / "p"), "-q", "--exclude", "."]) == 0
    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "write", full)
    assert_one_error_line(run_main(capsys, "unpack", tmp_path / "p", "-o", tmp_path / "u"), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    monkeypatch.setattr(safetensors_io.SafetensorsStreamWriter, "write", real)


# -- issue #10: messages in flag names, not-a-.wclust, natural sort, python -m, degenerate packs ---------
def _run10(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "wcfmt", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_python_dash_m_wcfmt() -> None:
    r = _run10("--version")
    assert r.returncode == 0 and r.stdout.startswith("wcfmt ")


def test_messages_use_flag_names(tmp_path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file({"w.weight": torch.randn(8, 8)}, tmp_path / "m.safetensors")
    (tmp_path / "o.wclust").write_bytes(b"x")
    r = _run10("pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "o.wclust"))
    assert r.returncode == 1 and "pass --force to replace it" in r.stderr and "force=True" not in r.stderr
    r = _run10("pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "p.wclust"), "--chunk-rows", "0")
    assert r.returncode == 1 and "--chunk-rows must be" in r.stderr and "or None" not in r.stderr


def test_not_a_wclust_file(tmp_path: Path) -> None:
    import safetensors.torch

    (tmp_path / "notes.txt").write_text("hello")
    r = _run10("info", str(tmp_path / "notes.txt"))
    assert r.returncode == 1 and "not a .wclust file (magic b'hello'" in r.stderr and "truncated" not in r.stderr
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    r = _run10("verify", str(tmp_path / "m.safetensors"))
    assert r.returncode == 1 and "looks like a safetensors file: pack it with `wcfmt pack`" in r.stderr


def test_help_shows_defaults() -> None:
    r = _run10("unpack", "--help")
    assert "default 5GB" in r.stdout
    r = _run10("transform", "--help")
    assert "(default 0)" in r.stdout


def test_every_option_with_a_default_shows_it_in_help() -> None:
    """Hand-written "(default …)" texts or the formatter's suffix: --help never hides a default."""
    import argparse

    from wcfmt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in sub.choices.items():
        formatter = sp._get_formatter()
        for a in sp._actions:
            if a.option_strings and a.default is not None and a.default is not False and a.default != argparse.SUPPRESS:
                if "default" not in formatter._get_help_string(a):
                    missing.append(f"{name} {a.option_strings[-1]}")
    assert missing == []


def test_info_natural_sort_and_degenerate_flag(tmp_path: Path) -> None:
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.mlp.up_proj.weight": torch.randn(16, 16, generator=g) for i in (0, 1, 2, 10, 11)}
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    r = _run10("pack", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.wclust"), "--k", "1")
    assert r.returncode == 0 and "wcfmt: warning:" in r.stderr and "SQNR below 10 dB" in r.stderr
    r = _run10("info", str(tmp_path / "m.wclust"))
    names = [line.split()[0] for line in r.stdout.splitlines()[1:6]]
    assert names == [f"layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 10, 11)]
    assert r.stdout.count(" !") == 5 and "5 clustered tensor(s) with SQNR below 10 dB" in r.stdout


def test_hub_source_offline_is_one_line(tmp_path: Path) -> None:
    r = _run10("info", "hf://nobody/not-cached", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("wcfmt: error: hf://nobody/not-cached:")
