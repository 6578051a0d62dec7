"""Conformance vectors (spec/vectors/): every valid file decodes bit-for-bit, every invalid one
is rejected with its error class, and regenerating them gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load

import wcfmt

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("name", sorted(MANIFEST["valid"]))
def test_valid_vector_decodes_bit_exactly(name: str) -> None:
    entry = MANIFEST["valid"][name]
    path = VECTORS / "valid" / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    expected = st_load(str(VECTORS / "valid" / entry["expected"]))
    got = wcfmt.load_file(path)
    assert list(got) == list(expected) or set(got) == set(expected)
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        assert torch.equal(_bits(have), _bits(want)), key


@pytest.mark.parametrize("name", sorted(MANIFEST["invalid"]))
def test_invalid_vector_is_rejected(name: str) -> None:
    entry = MANIFEST["invalid"][name]
    path = VECTORS / "invalid" / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    error = getattr(wcfmt, entry["error"])
    with pytest.raises(error) as info:
        wcfmt.load_file(path)
    assert name in str(info.value)  # the message names the file


def test_regenerating_vectors_gives_identical_bytes(tmp_path: Path) -> None:
    """A failure here means the bytes on disk changed: update spec/, the version rule, the
    vectors (tools/make_vectors.py) and CHANGELOG.md together."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_vectors.py"), "--out", str(tmp_path)], check=True)
    fresh = json.loads((tmp_path / "vectors" / "manifest.json").read_text())
    assert fresh == MANIFEST
    assert (tmp_path / "header.schema.json").read_text() == (ROOT / "spec" / "header.schema.json").read_text()


def test_schema_file_matches_models() -> None:
    from wcfmt.schema import json_schema

    on_disk = json.loads((ROOT / "spec" / "header.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), "run tools/make_vectors.py"
