"""The reference decoder (spec/reference/wclust_ref.py) and wcfmt agree on every file.

The reference decoder was written from the spec alone and imports no part of wcfmt. On every
conformance vector and on files wcfmt's writer makes (hand-built, random, and a packed SmolLM2
when the model is on the machine), both must give the same tensors bit for bit, in the same
order, or reject the file with the same error class (spec §9.4).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common import reference_decoder, hypothesis_settings, random_clustered, special_values
import wcfmt

ROOT = Path(__file__).resolve().parent.parent
REF_PATH = ROOT / "spec" / "reference" / "wclust_ref.py"
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


ref = reference_decoder()


def ref_outcome(path: Path, max_bytes: int | None = None) -> tuple[str, Any]:
    try:
        d = ref.decode_file(str(path), max_bytes=max_bytes)
    except ref.FormatError as e:
        return "error", type(e).__name__
    except MemoryError:
        return "error", "limit"
    return "ok", [(n, t.dtype, list(t.shape), hashlib.sha256(t.data).hexdigest()) for n, t in d.tensors.items()]


def wcfmt_outcome(path: Path, max_bytes: int | None = None) -> tuple[str, Any]:
    try:
        got = wcfmt.load_file(path, max_bytes=max_bytes)
        with wcfmt.safe_open(path) as f:
            dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    except wcfmt.UsageError:
        return "error", "limit"
    except wcfmt.WclustError as e:
        return "error", type(e).__name__
    out = []
    for n, t in got.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append((n, dtypes[n], list(t.shape), hashlib.sha256(data).hexdigest()))
    return "ok", out


def assert_agree(path: Path, max_bytes: int | None = None) -> tuple[str, Any]:
    a, b = ref_outcome(path, max_bytes), wcfmt_outcome(path, max_bytes)
    assert a == b, f"{path.name}: reference {a[0]} {a[1] if a[0] == 'error' else ''} / wcfmt {b[0]} {b[1] if b[0] == 'error' else ''}"
    return a


def test_reference_decoder_imports_no_wcfmt() -> None:
    """Independent by construction: only the standard library, numpy and zstandard."""
    tree = ast.parse(REF_PATH.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "hashlib", "json", "math", "struct", "sys", "zlib", "dataclasses", "typing",
                     "numpy", "zstandard"}, roots  # fmt: skip
    code = (f"import runpy, sys; runpy.run_path({str(REF_PATH)!r}, run_name='wclust_ref'); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('wcfmt', 'torch')], 'imports wcfmt/torch'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_reference_decoder_command_line() -> None:
    path = VECTORS / "valid" / "tied_and_metadata.wclust"
    bad = VECTORS / "invalid" / "zstd_dictionary_id.wclust"
    out = subprocess.run([sys.executable, str(REF_PATH), str(path), str(bad)], capture_output=True, text=True, check=True).stdout
    assert "lm_head.weight BF16 [16, 8] sha256=" in out
    assert f"{bad}: FormatError:" in out


@pytest.mark.parametrize("kind,name", [("valid", n) for n in sorted(MANIFEST["valid"])]
                         + [("invalid", n) for n in sorted(MANIFEST["invalid"])])  # fmt: skip
def test_agree_on_every_vector(kind: str, name: str) -> None:
    outcome = assert_agree(VECTORS / kind / name)
    if kind == "invalid":
        assert outcome == ("error", MANIFEST["invalid"][name]["error"])
    else:
        assert outcome[0] == "ok" and [t[0] for t in outcome[1]] == MANIFEST["valid"][name]["tensors"]


def test_agree_on_files_the_writer_makes(tmp_path: Path) -> None:
    tensors: dict[str, Any] = {
        "clu": random_clustered((37, 20), [16, 3, 256, 1, 64], 8, torch.bfloat16, seed=1),
        "f32": random_clustered((5, 3, 4), 2, 5, torch.float32, seed=2),
        "f16": random_clustered((10,), [1, 5, 17], 4, torch.float16, seed=3),
    }
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tensors[f"special_{dt}"] = special_values(dt, 200)
    tensors["ints"] = torch.arange(-1000, 1000, dtype=torch.int64).reshape(40, 50)
    tensors["u8"] = torch.arange(256, dtype=torch.uint8).repeat(3)
    tensors["mask"] = torch.arange(30) % 3 == 0
    tensors["big"] = torch.arange(700_000, dtype=torch.int64).reshape(-1, 1) * 7919  # 5.6 MB: several chunks
    tensors["tied"] = tensors["ints"]
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 7)
    path = tmp_path / "mixed.wclust"
    wcfmt.save_file(tensors, path, metadata={"a": "b"})
    with wcfmt.safe_open(path) as f:
        assert len(f.reader.header.tensors["big"].chunks) > 1
    outcome = assert_agree(path)
    assert outcome[0] == "ok" and len(outcome[1]) == len(tensors)


@hypothesis_settings(15)
@given(
    rows=st.integers(0, 40), cols=st.integers(1, 9), chunk_rows=st.integers(1, 12),
    ks=st.lists(st.integers(1, 256), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_agree_on_random_clustered_files(rows: int, cols: int, chunk_rows: int, ks: list[int], dtype: torch.dtype,
                                         seed: int, tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    n_chunks = 0 if rows == 0 else -(-rows // chunk_rows)
    per_chunk = [ks[i % len(ks)] for i in range(n_chunks)]
    ct = random_clustered((rows, cols), per_chunk if n_chunks else 1, chunk_rows, dtype, seed=seed) if n_chunks else None
    tensors: dict[str, Any] = {"w": ct} if ct is not None else {"w": torch.zeros(0, cols, dtype=dtype)}
    tensors["lossless"] = torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)).to(dtype)
    path = tmp_path_factory.mktemp("h") / "r.wclust"
    wcfmt.save_file(tensors, path)
    assert assert_agree(path)[0] == "ok"


def test_agree_on_max_bytes(tmp_path: Path) -> None:
    """A k = 1 tensor whose header claims a large shape (CRC fixed): a valid file that both
    decoders refuse to allocate for under a cap, and decode without one."""
    from common import rewrite

    path = tmp_path / "k1.wclust"
    wcfmt.save_file({"ones": random_clustered((4, 3), 1, 4, torch.float16)}, path)

    def grow(h: dict[str, Any]) -> None:
        h["tensors"]["ones"]["shape"] = [4, 3_000_000]  # 24 MB from a file of a few hundred bytes

    rewrite(path, grow)
    assert os.path.getsize(path) < 1000
    assert assert_agree(path, max_bytes=1 << 20) == ("error", "limit")
    assert assert_agree(path)[0] == "ok"


SMOL = Path(os.environ.get("WCFMT_SMOLLM2_BF16", "/tmp/wc/smollm2-bf16"))


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOL / "model.safetensors").exists(), reason="SmolLM2 bf16 folder not on this machine")
def test_agree_on_packed_smollm2(tmp_path: Path) -> None:
    """The reference decoder and wcfmt agree on the whole packed SmolLM2-135M (about a minute)."""
    out = tmp_path / "smollm2.wclust"
    wcfmt.pack(SMOL / "model.safetensors", out)
    outcome = assert_agree(out)
    assert outcome[0] == "ok" and len(outcome[1]) > 200


@pytest.mark.parametrize("name", sorted(n for n, e in MANIFEST["invalid"].items() if "unsupported" in e))
def test_reference_reads_the_other_tensors_of_a_newer_minor(name: str) -> None:
    """spec §9.4 steps 5-6 run for the requested tensors only: the reference decoder, asked for
    every tensor but those needing an unknown value, gives fault_base's bytes; asked for one of
    those, VersionError."""
    unsupported = MANIFEST["invalid"][name]["unsupported"]
    raw = (VECTORS / "valid" / MANIFEST["valid"]["fault_base.wclust"]["expected"]).read_bytes()
    n_head = int.from_bytes(raw[:8], "little")  # safetensors: header length, JSON header, data
    base = {k: raw[8 + n_head + v["data_offsets"][0] : 8 + n_head + v["data_offsets"][1]]
            for k, v in json.loads(raw[8 : 8 + n_head]).items() if k != "__metadata__"}  # fmt: skip
    path = str(VECTORS / "invalid" / name)
    got = ref.decode_file(path, names=[n for n in base if n not in unsupported])
    for n, t in got.tensors.items():
        assert t.data == base[n], n
    assert set(got.tensors) == set(base) - set(unsupported)
    for n in unsupported:
        with pytest.raises(ref.VersionError):
            ref.decode_file(path, names=[n])
